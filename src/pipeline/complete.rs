//! Stateless completions (the OpenAI-compatible API): a conversation sent
//! whole, answered with `n` ranked replies through the reply path's parts,
//! touching no channel's context.
//!
//! In order: the `model` names the base model (answered as a channel with
//! no persona chosen: `[personas] default`, if any) or a persona; the
//! caller (`user`, else `anonymous`) passes the rate limits as the author
//! of channel `http:openai:USER`; every turn passes the input filter (one
//! flagged turn refuses the request with the operator's notice); the turns
//! and the persona's seed make the prompt; candidates are drawn
//! (`generation.candidates` per round), cut at the first stop string,
//! screened and filtered as a channel's are, in rounds until `n` passed or
//! `safety.max_attempts` rounds were drawn; the survivors are ranked (a
//! finished candidate first, then the ranker's score or the mean
//! log-probability) and the best `n` returned. Places no candidate filled
//! are `content_filter` choices with no text.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use dialogd_adapters::{ChannelKey, Completion, CompletionChoice, CompletionError, CompletionRequest, CoreError, FinishReason, ModelCard, Platform};

use super::engine::Drawn;
use super::limits::Verdict;
use super::reply::{draw, scores, survivors, Screen};
use super::Shared;
use crate::personas::{persona_prompt, ActivePersona};
use crate::prompt::{normalize_turn, MAX_TURN_BYTES};
use crate::telemetry::Refusal;

/// The caller named when a request has no `user`.
const ANONYMOUS: &str = "anonymous";

/// The base model, then every persona.
pub(super) async fn models(shared: &Shared) -> Result<Vec<ModelCard>, CoreError> {
    let personas = shared.personas.all().await.map_err(|e| CoreError::Unavailable(e.to_string()))?;
    let mut models = vec![ModelCard { id: shared.model_name.clone(), persona: false }];
    models.extend(personas.into_iter().map(|p| ModelCard { id: p.name, persona: true }));
    Ok(models)
}

fn invalid(param: &'static str, message: impl Into<String>) -> CompletionError {
    CompletionError::Invalid { param, message: message.into() }
}

/// The persona `model` names: the base model's id gives the default
/// persona (or none).
async fn persona_for(shared: &Shared, model: &str) -> Result<Option<ActivePersona>, CompletionError> {
    let unavailable = |e: crate::personas::PersonaError| CompletionError::Core(CoreError::Unavailable(e.to_string()));
    if model == shared.model_name {
        let Some(name) = shared.personas.default_name() else { return Ok(None) };
        return shared.personas.named(name).await.map_err(unavailable);
    }
    match shared.personas.named(model).await.map_err(unavailable)? {
        Some(persona) => Ok(Some(persona)),
        None => Err(CompletionError::UnknownModel(model.to_string())),
    }
}

/// A candidate that passed, ready to rank.
struct Kept {
    text: String,
    /// Ended by the model or by a stop string.
    stopped: bool,
    /// For the ranker: the kept text's ids and log-probability.
    drawn: Drawn,
}

/// `text` up to the first of `stop`, and whether one was met.
fn cut_at_stop<'a>(text: &'a str, stop: &[String]) -> (&'a str, bool) {
    match stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(at) => (text[..at].trim_end(), true),
        None => (text, false),
    }
}

/// Answers `request` (see the module's docs).
pub(super) async fn complete(shared: Arc<Shared>, request: CompletionRequest) -> Result<Completion, CompletionError> {
    let metrics = &shared.metrics;
    if !shared.accepting.load(Ordering::Acquire) {
        metrics.refused(Refusal::ShuttingDown);
        return Err(CoreError::ShuttingDown.into());
    }
    metrics.message_in(Platform::Http);
    let author = request.user.clone().unwrap_or_else(|| ANONYMOUS.into());
    let channel = ChannelKey::new(Platform::Http, format!("openai:{author}"));
    let mut turns = Vec::with_capacity(request.turns.len());
    for (i, turn) in request.turns.iter().enumerate() {
        let text = normalize_turn(&turn.text);
        if text.is_empty() || text.len() > MAX_TURN_BYTES {
            metrics.refused(Refusal::Invalid);
            return Err(invalid("messages", format!("messages: turn {i} must have 1 to {MAX_TURN_BYTES} bytes")));
        }
        turns.push(text);
    }
    let generation = shared.live.generation();
    if request.n > generation.candidates.max(1) {
        metrics.refused(Refusal::Invalid);
        return Err(invalid("n", format!("n must be at most {} (generation.candidates)", generation.candidates.max(1))));
    }
    let persona = persona_for(&shared, &request.model).await?;
    match shared.limiter.check(&*shared.store, &channel, &author).await {
        Verdict::Allow => {}
        Verdict::Notice { notice, retry_after } => {
            metrics.refused(Refusal::RateLimited);
            return Err(CoreError::RateLimited { notice: Some(notice.into()), retry_after }.into());
        }
        Verdict::Drop { retry_after } => {
            metrics.refused(Refusal::RateLimited);
            return Err(CoreError::RateLimited { notice: None, retry_after }.into());
        }
    }
    let (safety, blocked, filter) = shared.safety();
    let screen = Screen { filter, words: blocked, policy: safety.policy_for(&channel.to_string()), metrics: shared.metrics.clone() };
    let verdicts = screen.check(turns.clone(), crate::telemetry::Direction::In).await?;
    if let Some(verdict) = verdicts.iter().find(|v| v.flagged) {
        metrics.refused(Refusal::ToxicInput);
        tracing::info!(%channel, categories = %crate::safety::Category::joined(&verdict.categories), "completion request failed the safety filter");
        return Err(CompletionError::ContentFilter(safety.notice.clone()));
    }

    let tokenizer = &shared.tokenizer;
    let mut encoded = Vec::with_capacity(turns.len());
    for text in &turns {
        let ids = tokenizer.encode(text).map_err(|e| invalid("messages", e.to_string()))?;
        if ids.is_empty() {
            return Err(invalid("messages", "a turn encodes to no tokens"));
        }
        encoded.push(ids);
    }
    let max_new_tokens = request.max_new_tokens.unwrap_or(generation.max_new_tokens).min(generation.max_new_tokens);
    let budget = shared.max_tokens.min(shared.engine.n_positions().saturating_sub(max_new_tokens));
    let seed = persona.as_ref().map_or(&[][..], |p| &p.seed[..]);
    let prompt = persona_prompt(tokenizer, seed, &encoded, budget)
        .map_err(|e| CoreError::Internal(format!("{e} (max_tokens and the persona's seed turns leave too little of {budget} tokens of context)")))?;
    let mut params = generation.sampling();
    params.max_new_tokens = max_new_tokens;
    params.temperature = request.temperature.unwrap_or(params.temperature);
    params.top_p = request.top_p.unwrap_or(params.top_p);

    let user_text = turns.last().map_or("", String::as_str);
    let recent_bot: Vec<String> =
        request.turns.iter().zip(&turns).rev().filter(|(turn, _)| turn.bot).take(8).map(|(_, text)| text.clone()).collect();
    let adapter = persona.as_ref().and_then(|p| p.adapter.clone());
    let n_candidates = generation.candidates.max(1);
    let mut kept: Vec<Kept> = Vec::new();
    for round in 0..safety.max_attempts {
        // A fixed seed still draws new candidates in a later round.
        params.seed = request.seed.map(|s| s.wrapping_add((round * n_candidates) as u64));
        let drawn = draw(&shared, &channel, prompt.ids.clone(), params.clone(), n_candidates, adapter.clone()).await?;
        let cut: Vec<(String, bool)> = drawn
            .iter()
            .map(|d| {
                let text = tokenizer.decode(&d.ids).map(|t| t.trim().to_string()).unwrap_or_default();
                let (text, stopped) = cut_at_stop(&text, &request.stop);
                (text.to_string(), stopped)
            })
            .collect();
        let texts: Vec<String> = cut.iter().map(|(t, _)| t.clone()).collect();
        for i in survivors(&shared, &channel, &texts, user_text, &recent_bot, &screen).await? {
            let (text, stop_met) = cut[i].clone();
            if kept.iter().any(|k| k.text == text) {
                continue;
            }
            let mut candidate = drawn[i].clone();
            if stop_met {
                let ids = tokenizer.encode(&text).unwrap_or_default();
                candidate.logprob *= ids.len() as f32 / candidate.ids.len().max(1) as f32;
                candidate.ids = ids;
            }
            kept.push(Kept { stopped: stop_met || candidate.finished, text, drawn: candidate });
        }
        if kept.len() >= request.n {
            break;
        }
        tracing::debug!(%channel, round, kept = kept.len(), wanted = request.n, "too few candidates passed; drawing again");
    }

    let drawn: Vec<Drawn> = kept.iter().map(|k| Drawn { finished: k.stopped, ..k.drawn.clone() }).collect();
    let all: Vec<usize> = (0..kept.len()).collect();
    let context = &encoded[encoded.len() - prompt.turns_kept..];
    let ranked = scores(&shared, &channel, context, &drawn, &all).await;
    // A finished candidate first, then the higher score (NaN lowest);
    // ties keep the drawing order.
    let key = |i: usize| (kept[i].stopped, if ranked[i].is_nan() { f32::NEG_INFINITY } else { ranked[i] });
    let mut order = all;
    order.sort_by(|&a, &b| key(b).partial_cmp(&key(a)).unwrap_or(std::cmp::Ordering::Equal));
    let mut choices: Vec<CompletionChoice> = Vec::with_capacity(request.n);
    let mut completion_tokens = 0;
    for &i in order.iter().take(request.n) {
        completion_tokens += kept[i].drawn.ids.len();
        let finish = if kept[i].stopped { FinishReason::Stop } else { FinishReason::Length };
        choices.push(CompletionChoice { text: kept[i].text.clone(), finish });
    }
    if choices.is_empty() {
        metrics.refused(Refusal::NoSafeCandidate);
        tracing::info!(%channel, attempts = safety.max_attempts, "no candidate passed the filter; completion has no text");
    } else {
        metrics.replied(Platform::Http);
    }
    choices.resize(request.n, CompletionChoice { text: String::new(), finish: FinishReason::ContentFilter });
    tracing::debug!(%channel, model = %request.model, prompt_tokens = prompt.ids.len(), completion_tokens, "completion answered");
    Ok(Completion { choices, prompt_tokens: prompt.ids.len(), completion_tokens })
}

#[cfg(test)]
mod tests {
    use super::cut_at_stop;

    #[test]
    fn replies_end_before_the_first_stop_string() {
        let stop = vec!["!".to_string(), "you".to_string()];
        assert_eq!(cut_at_stop("I like you a lot!", &stop), ("I like", true));
        assert_eq!(cut_at_stop("Fine, thanks", &stop), ("Fine, thanks", false));
        assert_eq!(cut_at_stop("Hi!", &[]), ("Hi!", false));
    }
}
