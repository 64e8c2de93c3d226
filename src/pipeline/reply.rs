//! The reply path of one message, in the order a message meets it:
//!
//! 1. [`process`]: a command goes to [`super::commands`]; a message not
//!    addressed to the bot, or in a muted channel, gets no answer.
//! 2. [`admit`]: duplicate deliveries, rate limits and the input filter (a
//!    toxic message is answered per `safety.toxic_input` and never stored,
//!    so never learned from).
//! 3. [`prepare`]: the channel's context and persona into a prompt
//!    ([`persona_prompt`], the function the jobs' gate uses too).
//! 4. [`choose`]: candidates from the engine; empty ones, echoes, repeats
//!    and flagged ones are dropped, drawing again up to
//!    `safety.max_attempts` rounds; a finished candidate beats a cut-off
//!    one, then the ranker (or the likeliest) picks.
//! 5. [`finish`]: the user's turn and the bot's stored in one atomic
//!    append, the exchange collected where the channel consented.

use std::sync::Arc;

use dialogd_adapters::{Answer, ChannelKey, CoreError, Inbound};

use super::commands::{self, Command};
use super::engine::{Drawn, EngineError};
use super::limits::Verdict;
use super::{say, silent, Shared};
use crate::context::{Appended, ContextError, EditOutcome, Turn};
use crate::personas::{moderation_scope, persona_prompt, ActivePersona};
use crate::prompt::{normalize_turn, Prompt, MAX_TURN_BYTES};
use crate::ranking::select::{self, Contender};
use crate::safety::{Filter, Policy, WordList};
use crate::settings::{GenerationSettings, SafetySettings, ToxicInput};
use crate::telemetry::{Direction, Metrics, Refusal};

/// Tracks whether this message had to do without its stored context.
struct Degraded<'a> {
    metrics: &'a Metrics,
    counted: bool,
}

impl Degraded<'_> {
    fn note(&mut self, channel: &ChannelKey, what: &str, err: &ContextError) {
        tracing::debug!(%channel, error = %err, "context {what} failed");
        if !self.counted {
            self.counted = true;
            self.metrics.context_degraded.inc();
        }
    }
}

/// The safety filter of one message: the filter under the live
/// thresholds, the channel's words and policy.
pub(super) struct Screen {
    pub(super) filter: Filter,
    pub(super) words: Arc<WordList>,
    pub(super) policy: Policy,
    pub(super) metrics: Arc<Metrics>,
}

impl Screen {
    /// Verdicts for `texts`, in order, each classifier label over its
    /// threshold counted for `direction`; a filter with a classifier runs
    /// on a blocking thread (its forward pass would stall the async workers).
    pub(super) async fn check(&self, texts: Vec<String>, direction: Direction) -> Result<Vec<crate::safety::Verdict>, CoreError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let (filter, words, policy) = (self.filter.clone(), self.words.clone(), self.policy);
        let run = move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            filter.check_batch(&refs, policy, Some(&words))
        };
        let verdicts = if self.filter.has_classifier() {
            tokio::task::spawn_blocking(run).await.map_err(super::internal)?
        } else {
            run()
        };
        let verdicts = verdicts.map_err(super::internal)?;
        for label in verdicts.iter().flat_map(|v| v.classifier_labels()) {
            self.metrics.classifier_flagged(label, direction);
        }
        Ok(verdicts)
    }
}

/// The safety settings in force and the screen of `inbound`'s channel:
/// its policy, the operator's blocked words with its scope's moderators'
/// words ([`moderation_scope`]). Without the store, the operator's words
/// alone (logged).
async fn screen_for(shared: &Shared, inbound: &Inbound) -> (Arc<SafetySettings>, Screen) {
    let (safety, blocked, filter) = shared.safety();
    let scope = moderation_scope(&inbound.channel, inbound.group.as_deref());
    let words = match shared.words.list(&scope).await {
        Ok(list) if list == WordList::default() => blocked,
        Ok(list) => Arc::new(blocked.merged(&list)),
        Err(e) => {
            tracing::warn!(channel = %inbound.channel, %scope, error = %e, "cannot read the moderators' word list; filtering without it");
            blocked
        }
    };
    let policy = safety.policy_for(&inbound.channel.to_string());
    (safety, Screen { filter, words, policy, metrics: shared.metrics.clone() })
}

/// A message that passed admission, with what its reply is drawn from.
struct Prepared {
    /// The stored turns, oldest first.
    history: Vec<Turn>,
    /// Each kept turn encoded, the message last.
    encoded: Vec<Vec<u32>>,
    prompt: Prompt,
    persona: Option<ActivePersona>,
    /// `[generation]` as it was when the message started.
    generation: Arc<GenerationSettings>,
}

/// An edited message (`Inbound::edit`): the input filter's verdict on the
/// new text, then [`crate::context::apply_edit`] does the rest.
async fn edited(shared: &Shared, inbound: &Inbound) -> Result<EditOutcome, CoreError> {
    let (Some(id), Some(edit)) = (inbound.msg_id.as_deref(), inbound.edit) else { return Ok(EditOutcome::Done("edit_ignored")) };
    // Stored in the form every path encodes, as a new message is.
    let normalized = normalize_turn(&inbound.text);
    let text = normalized.as_str();
    if text.is_empty() || text.len() > MAX_TURN_BYTES {
        return Ok(EditOutcome::Done("edit_ignored"));
    }
    let (_, screen) = screen_for(shared, inbound).await;
    let flagged = screen.check(vec![text.to_string()], Direction::In).await?.remove(0).flagged;
    crate::context::apply_edit(&*shared.store, &inbound.channel, &inbound.author, id, text, flagged, edit.answer)
        .await
        .map_err(|e| CoreError::Unavailable(e.to_string()))
}

/// Candidates drawn for one message and those that passed the screens
/// and the filter, over every attempt.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub drawn: usize,
    pub kept: usize,
}

/// The one info line per handled message: channel, platform, latency_ms,
/// candidates drawn and kept, and, without a reply, the reason (the
/// `reason` word, or the refusal's text).
pub(super) fn log_handled(channel: &ChannelKey, started: std::time::Instant, tally: &Tally, answer: &Result<Answer, CoreError>) {
    let latency_ms = started.elapsed().as_millis() as u64;
    let reason = match answer {
        Ok(Answer::Reply(_)) => None,
        Ok(Answer::Silent { reason }) => Some(reason.clone()),
        Err(e) => Some(e.to_string()),
    };
    tracing::info!(
        channel = %channel.channel_id,
        platform = channel.platform.as_str(),
        latency_ms,
        candidates_drawn = tally.drawn,
        candidates_kept = tally.kept,
        replied = reason.is_none(),
        reason = reason.as_deref(),
        "message handled"
    );
}

/// Handles one message: a command, or a turn of conversation. An edit
/// corrects the stored context and, answered again, goes on as a new
/// message under the id [`crate::context::apply_edit`] gives it.
pub(super) async fn process(shared: Arc<Shared>, mut inbound: Inbound, tally: &mut Tally) -> Result<Answer, CoreError> {
    if inbound.edit.is_some() {
        match edited(&shared, &inbound).await? {
            EditOutcome::Done(reason) => return Ok(silent(reason)),
            EditOutcome::AnswerAs(id) => inbound.msg_id = Some(id),
        }
    }
    let metrics = &shared.metrics;
    // The form every path encodes (NFC, no outer whitespace); stored so.
    let normalized = normalize_turn(&inbound.text);
    let mut text = normalized.as_str();
    if text.is_empty() {
        metrics.refused(Refusal::Invalid);
        return Err(CoreError::Invalid("the message is empty".into()));
    }
    if text.len() > MAX_TURN_BYTES {
        metrics.refused(Refusal::Invalid);
        return Err(CoreError::Invalid(format!("the message is over {MAX_TURN_BYTES} bytes")));
    }
    match Command::parse(text) {
        Some(Command::Ask("")) => return Ok(say(&inbound, "Ask me something: /ask how are you?")),
        Some(Command::Ask(question)) => text = question,
        Some(command) => {
            if let Some(answer) = claim_command(&shared, &inbound).await {
                return Ok(answer);
            }
            return commands::run(&shared, &inbound, command).await;
        }
        None if !inbound.addressed_to_bot => return Ok(silent("not_addressed")),
        None => {}
    }
    if commands::is_muted(&shared, &inbound.channel).await {
        return Ok(silent("muted"));
    }
    let mut degraded = Degraded { metrics, counted: false };
    let (safety, screen) = screen_for(&shared, &inbound).await;
    if let Some(answer) = admit(&shared, &inbound, text, &safety, &screen, &mut degraded).await? {
        return Ok(answer);
    }
    let prepared = prepare(&shared, &inbound, text, &mut degraded).await?;
    let chosen = choose(&shared, &inbound, text, &prepared, &safety, &screen, tally).await?;
    finish(&shared, &inbound, text, &prepared, chosen, &safety, &mut degraded).await
}

/// Claims a command's message id before it runs (an append of no turn
/// that records the id), so a command delivered twice runs once: the
/// second gets `duplicate`. With the store down it runs unclaimed, as
/// messages are answered then.
async fn claim_command(shared: &Shared, inbound: &Inbound) -> Option<Answer> {
    let id = inbound.msg_id.as_deref()?;
    match shared.store.append(&inbound.channel, &[], Some(id)).await {
        Ok(Appended::Duplicate) => {
            shared.metrics.refused(Refusal::Duplicate);
            Some(silent("duplicate"))
        }
        Ok(Appended::Stored) => None,
        Err(e) => {
            tracing::debug!(channel = %inbound.channel, error = %e, "command duplicate check failed");
            None
        }
    }
}

/// Duplicate check, rate limits and the input filter. `Some(answer)` ends
/// the message there.
async fn admit(
    shared: &Shared,
    inbound: &Inbound,
    text: &str,
    safety: &SafetySettings,
    screen: &Screen,
    degraded: &mut Degraded<'_>,
) -> Result<Option<Answer>, CoreError> {
    let (metrics, channel) = (&shared.metrics, &inbound.channel);
    if let Some(id) = inbound.msg_id.as_deref() {
        match shared.store.seen(channel, id).await {
            Ok(true) => {
                metrics.refused(Refusal::Duplicate);
                return Ok(Some(silent("duplicate")));
            }
            Ok(false) => {}
            Err(e) => degraded.note(channel, "duplicate check", &e),
        }
    }
    match shared.limiter.check(&*shared.store, channel, &inbound.author).await {
        Verdict::Allow => {}
        Verdict::Notice { notice, retry_after } => {
            metrics.refused(Refusal::RateLimited);
            tracing::info!(%channel, author = %inbound.author, "rate limited: notice sent");
            return Err(CoreError::RateLimited { notice: Some(notice.into()), retry_after });
        }
        Verdict::Drop { retry_after } => {
            metrics.refused(Refusal::RateLimited);
            return Err(CoreError::RateLimited { notice: None, retry_after });
        }
    }
    let verdict = screen.check(vec![text.to_string()], Direction::In).await?.remove(0);
    if verdict.flagged {
        metrics.refused(Refusal::ToxicInput);
        tracing::info!(%channel, categories = %crate::safety::Category::joined(&verdict.categories), "message failed the safety filter");
        return Ok(Some(match safety.toxic_input {
            ToxicInput::Notice => say(inbound, safety.notice.clone()),
            ToxicInput::Silent => silent("toxic_input"),
        }));
    }
    Ok(None)
}

/// Reads the context and the persona and builds the prompt within
/// `min(context.max_tokens, n_positions − max_new_tokens)`.
async fn prepare(shared: &Shared, inbound: &Inbound, text: &str, degraded: &mut Degraded<'_>) -> Result<Prepared, CoreError> {
    let channel = &inbound.channel;
    let history = shared.store.turns(channel).await.unwrap_or_else(|e| {
        degraded.note(channel, "read", &e);
        Vec::new()
    });
    let tokenizer = &shared.tokenizer;
    let mut encoded: Vec<Vec<u32>> = history
        .iter()
        .filter_map(|turn| tokenizer.encode(&normalize_turn(&turn.text)).ok().filter(|ids| !ids.is_empty()))
        .collect();
    let message_ids = tokenizer.encode(text).map_err(|e| CoreError::Invalid(e.to_string()))?;
    if message_ids.is_empty() {
        shared.metrics.refused(Refusal::Invalid);
        return Err(CoreError::Invalid("the message encodes to no tokens".into()));
    }
    encoded.push(message_ids);
    let persona = shared.personas.for_channel(channel, inbound.group.as_deref()).await.unwrap_or_else(|e| {
        tracing::warn!(%channel, error = %e, "cannot look up the channel's persona; answering without one");
        None
    });
    let generation = shared.live.generation();
    let budget = shared.max_tokens.min(shared.engine.n_positions().saturating_sub(generation.max_new_tokens));
    let seed = persona.as_ref().map_or(&[][..], |p| &p.seed[..]);
    let prompt = persona_prompt(tokenizer, seed, &encoded, budget).map_err(|e| {
        CoreError::Internal(format!("{e} (generation.max_new_tokens and the persona's seed turns leave too little of {budget} tokens of context)"))
    })?;
    Ok(Prepared { history, encoded, prompt, persona, generation })
}

/// Draws candidates, screens them and picks one; `None` when no candidate
/// passed in `safety.max_attempts` rounds. Returns the text, its ids and
/// the round it came from.
async fn choose(
    shared: &Shared,
    inbound: &Inbound,
    text: &str,
    prepared: &Prepared,
    safety: &SafetySettings,
    screen: &Screen,
    tally: &mut Tally,
) -> Result<Option<(String, Vec<u32>, usize)>, CoreError> {
    let (channel, tokenizer) = (&inbound.channel, &shared.tokenizer);
    let generation = &prepared.generation;
    let recent_bot: Vec<String> = prepared.history.iter().rev().filter(|t| t.bot).take(8).map(|t| t.text.clone()).collect();
    let adapter = prepared.persona.as_ref().and_then(|p| p.adapter.clone());
    for attempt in 1..=safety.max_attempts {
        let params = generation.sampling();
        let drawn = draw(shared, channel, prepared.prompt.ids.clone(), params, generation.candidates.max(1), adapter.clone()).await?;
        tally.drawn += drawn.len();
        let texts: Vec<String> =
            drawn.iter().map(|d| tokenizer.decode(&d.ids).map(|t| t.trim().to_string()).unwrap_or_default()).collect();
        let survivors = survivors(shared, channel, &texts, text, &recent_bot, screen).await?;
        tally.kept += survivors.len();
        if survivors.is_empty() {
            tracing::debug!(%channel, attempt, "no candidate passed; drawing again");
            continue;
        }
        let best = pick(shared, channel, prepared, &drawn, &survivors).await;
        return Ok(Some((texts[best].clone(), drawn[best].ids.clone(), attempt)));
    }
    Ok(None)
}

/// `n_candidates` candidates for `prompt_ids` from the engine, counted;
/// a failure is logged and answered busy (a full queue) or internal.
pub(super) async fn draw(
    shared: &Shared,
    channel: &ChannelKey,
    prompt_ids: Vec<u32>,
    params: crate::sampling::SamplingParams,
    n_candidates: usize,
    adapter: Option<crate::personas::PersonaAdapter>,
) -> Result<Vec<Drawn>, CoreError> {
    let metrics = &shared.metrics;
    let drawn = match shared.engine.reply(prompt_ids, params, n_candidates, adapter).await {
        Ok(drawn) => drawn,
        Err(EngineError::Busy) => return Err(CoreError::Busy),
        Err(e) => {
            metrics.refused(Refusal::Failed);
            tracing::warn!(%channel, error = %e, "generation failed");
            return Err(CoreError::Internal(e.to_string()));
        }
    };
    metrics.candidates_drawn.inc_by(drawn.len() as u64);
    Ok(drawn)
}

/// The indices of `texts` (candidates answering `text`) that pass the
/// screen (empty, echo, repeat of `recent_bot`, duplicate) and the safety
/// filter, counted in the metrics.
pub(super) async fn survivors(
    shared: &Shared,
    channel: &ChannelKey,
    texts: &[String],
    text: &str,
    recent_bot: &[String],
    screen: &Screen,
) -> Result<Vec<usize>, CoreError> {
    let metrics = &shared.metrics;
    let rejections = crate::ranking::degeneration::screen(texts, text, recent_bot);
    let mut unscreened = Vec::new();
    for (i, rejection) in rejections.iter().enumerate() {
        if let Some(why) = rejection {
            metrics.candidates_screened.inc();
            tracing::debug!(%channel, candidate = i, ?why, "candidate screened out");
            continue;
        }
        unscreened.push(i);
    }
    // Every candidate left in one call: the classifier reads them as one batch.
    let verdicts = screen.check(unscreened.iter().map(|&i| texts[i].clone()).collect(), Direction::Out).await?;
    let mut survivors = Vec::new();
    for (&i, verdict) in unscreened.iter().zip(verdicts) {
        if verdict.flagged {
            metrics.candidates_flagged.inc();
            tracing::debug!(%channel, candidate = i, categories = %crate::safety::Category::joined(&verdict.categories), "candidate flagged");
            continue;
        }
        survivors.push(i);
    }
    Ok(survivors)
}

/// The score of each of `survivors` (indices into `drawn`), higher is
/// better: the ranker's when `[ranking]` names models and there is a
/// choice (`context`: the prompt's turns, oldest first), else the mean
/// log-probability (also when ranking fails, logged).
pub(super) async fn scores(shared: &Shared, channel: &ChannelKey, context: &[Vec<u32>], drawn: &[Drawn], survivors: &[usize]) -> Vec<f32> {
    let mean_logprob = |i: usize| drawn[i].logprob / drawn[i].ids.len().max(1) as f32;
    let likeliest = || survivors.iter().map(|&i| mean_logprob(i)).collect::<Vec<f32>>();
    let Some(ranker) = shared.ranker.as_ref().filter(|_| survivors.len() > 1) else { return likeliest() };
    let ids: Vec<Vec<u32>> = survivors.iter().map(|&i| drawn[i].ids.clone()).collect();
    match ranker.score(context.to_vec(), ids, likeliest()).await {
        Ok(scores) => {
            shared.metrics.candidates_ranked.inc_by(scores.len() as u64);
            tracing::debug!(%channel, candidates = survivors.len(), scores = ?scores, "ranked");
            scores.iter().map(|s| s.score as f32).collect()
        }
        Err(e) => {
            tracing::warn!(%channel, error = %e, "ranking failed; taking the likeliest candidate");
            likeliest()
        }
    }
}

/// The survivor to send ([`crate::ranking::select::choose`]): a finished
/// candidate before one cut off by `max_new_tokens`, then the ranker's
/// score when `[ranking]` names models and there is a choice, else the
/// mean log-probability. A cut-off reply is logged and counted.
async fn pick(shared: &Shared, channel: &ChannelKey, prepared: &Prepared, drawn: &[Drawn], survivors: &[usize]) -> usize {
    let encoded = &prepared.encoded;
    let scores = scores(shared, channel, &encoded[encoded.len() - prepared.prompt.turns_kept..], drawn, survivors).await;
    let contenders: Vec<Contender> =
        survivors.iter().zip(&scores).map(|(&i, &score)| Contender { finished: drawn[i].finished, score }).collect();
    let (top, cut_off) = select::choose(&contenders).unwrap_or((0, false));
    let best = survivors[top];
    if cut_off {
        shared.metrics.replies_cut_off.inc();
        tracing::info!(%channel, tokens = drawn[best].ids.len(), "reply cut off by max_new_tokens: no candidate finished");
    }
    best
}

/// Stores the exchange (or the user's turn alone when nothing passed),
/// collects it where the channel consented, and answers.
async fn finish(
    shared: &Shared,
    inbound: &Inbound,
    text: &str,
    prepared: &Prepared,
    chosen: Option<(String, Vec<u32>, usize)>,
    safety: &SafetySettings,
    degraded: &mut Degraded<'_>,
) -> Result<Answer, CoreError> {
    let (metrics, channel, store) = (&shared.metrics, &inbound.channel, &shared.store);
    let msg_id = inbound.msg_id.as_deref();
    let user_turn = Turn::user(&inbound.author, text, inbound.msg_id.clone());
    let Some((reply_text, ids, attempt)) = chosen else {
        // The user's turn was fine: keep it; the bot says nothing.
        metrics.refused(Refusal::NoSafeCandidate);
        tracing::info!(%channel, attempts = safety.max_attempts, "no candidate passed the filter; staying silent");
        if let Err(e) = store.append(channel, &[user_turn], msg_id).await {
            degraded.note(channel, "append", &e);
        }
        return Ok(silent("no_safe_candidate"));
    };
    // Screening drops candidates without content, so the reply has some.
    let (turns, answer) = (vec![user_turn, Turn::bot(&reply_text, &inbound.author)], say(inbound, &reply_text));
    match store.append(channel, &turns, msg_id).await {
        Ok(Appended::Stored) => {}
        Ok(Appended::Duplicate) => {
            // Another daemon sharing the store took this message meanwhile.
            metrics.refused(Refusal::Duplicate);
            return Ok(silent("duplicate"));
        }
        Err(e) => degraded.note(channel, "append", &e),
    }
    if matches!(answer, Answer::Reply(_)) {
        metrics.replied(channel.platform);
        collect(shared, inbound, text, prepared, &reply_text).await;
    }
    tracing::debug!(%channel, prompt_turns = prepared.prompt.turns_kept, reply_tokens = ids.len(), attempt, "reply stored");
    Ok(answer)
}

/// Opted-in channels: the exchange (the context the model saw, the
/// message, the reply) goes to the training logs. Toxic messages never get
/// this far; flagged replies are never chosen.
async fn collect(shared: &Shared, inbound: &Inbound, text: &str, prepared: &Prepared, reply_text: &str) {
    let channel = &inbound.channel;
    let Some(collector) = shared.collector.as_ref().filter(|c| c.wants(&channel.to_string())) else { return };
    let history = &prepared.history;
    let context = history.len().saturating_sub(prepared.prompt.turns_kept.saturating_sub(1));
    let mut turns: Vec<(String, String, bool)> = history[context..].iter().map(|t| (t.author.clone(), t.text.clone(), t.bot)).collect();
    turns.push((inbound.author.clone(), text.to_string(), false));
    turns.push(("bot".to_string(), reply_text.to_string(), true));
    let (collector, key) = (collector.clone(), channel.to_string());
    let written = tokio::task::spawn_blocking(move || {
        let refs: Vec<(&str, &str, bool)> = turns.iter().map(|(a, t, b)| (a.as_str(), t.as_str(), *b)).collect();
        collector.record(&key, &refs)
    })
    .await;
    match written {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(%channel, error = %e, "could not collect the exchange"),
        Err(e) => tracing::warn!(%channel, error = %e, "could not collect the exchange"),
    }
}
