//! The path of one message: commands, context, prompt, generation, context.
//!
//! [`Pipeline`] is the daemon's [`Core`]: adapters hand it [`Inbound`]
//! messages and get [`Answer`]s back. Messages of one channel are handled
//! one at a time in the order `handle` was called (each channel has a
//! queue and a worker task that exists while the queue has work); channels
//! run concurrently. A failure on one message is logged and answered with
//! an error; it never stops the daemon.
//!
//! - [`engine`]: the narrow door to generation ([`ReplyEngine`]).
//! - [`limits`]: rate limits per user and per channel.
//!
//! Commands: `/start` and `/help` say what the bot does, `/ask TEXT` asks
//! (in groups, where plain messages need a mention), `/reset` forgets the
//! channel's context, `/forget` deletes what is stored about the author.
//! Moderators (the adapter says who is one) also have `/mute` and
//! `/unmute` (the bot stops or resumes answering in the channel; commands
//! still work), `/persona` and `/train` (not available yet). Everyone else
//! gets a clear refusal, and every moderator action is logged.

pub mod engine;
pub mod rank;
pub mod limits;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dialogd_adapters::{Answer, BoxFuture, ChannelKey, ContextTurn, Core, CoreError, Health, Inbound, Outbound};
use tokio::sync::{mpsc, oneshot, Notify};

use self::engine::{EngineError, ReplyEngine};
use crate::context::{Appended, ContextError, ContextStore, EditOutcome, Turn};
use crate::prompt::build_prompt;
use self::rank::Ranker;
use crate::collect::Collector;
use crate::jobs::personas::{group_scope, Personas};
use crate::jobs::{JobState, JobStore, Target};
use crate::settings::JobSettings;
use crate::safety::{Filter, WordList};
use crate::settings::{GenerationSettings, SafetySettings, ToxicInput};
use self::limits::{RateLimiter, Verdict};
use crate::settings::RateLimitSettings;
use crate::telemetry::{Metrics, Refusal};
use crate::tokenizer::DialogTokenizer;

/// The longest message accepted, in bytes (as `dialogd chat`).
pub use crate::prompt::MAX_TURN_BYTES;

/// Messages waiting per channel at most; more are refused as busy.
const CHANNEL_QUEUE: usize = 32;

const HELP: &str = "I'm a DialoGPT chat bot. Commands: /ask TEXT asks me something (in groups you can \
also mention me or reply to me); /reset forgets this channel's conversation; /forget deletes everything \
stored about you; /optout stops me learning from your messages (/optin allows it again); /help shows this. \
Moderators: /mute, /unmute, /persona (list, show, use NAME [server], create NAME SEED | SEED…, off), \
/train (status, cancel, rollback), /collect (on, off, status).";

const START: &str = "Hello! I'm a DialoGPT chat bot: talk to me and I'll answer. /help lists the commands.";

use dialogd_adapters::text::MODERATOR_COMMANDS;

/// One accepted message on its way through a channel's queue.
struct Work {
    inbound: Inbound,
    answer: oneshot::Sender<Result<Answer, CoreError>>,
    /// Counts the message as in flight until it is answered.
    _in_flight: InFlight,
}

/// Decrements the in-flight count when the message is done.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Everything the channel workers share.
struct Shared {
    engine: Arc<dyn ReplyEngine>,
    store: Arc<dyn ContextStore>,
    tokenizer: DialogTokenizer,
    /// Replaced whole on SIGHUP; readers clone the Arc.
    generation: RwLock<Arc<GenerationSettings>>,
    /// The context's token budget (`context.max_tokens`).
    max_tokens: usize,
    /// `[safety]` and its word list; replaced whole on SIGHUP.
    safety: RwLock<Arc<SafetyState>>,
    filter: Filter,
    /// The DialogRPT/MMI ranker, when `[ranking]` names one.
    ranker: Option<Arc<Ranker>>,
    /// Consented log collection, when `[collect]` is enabled.
    collector: Option<Arc<Collector>>,
    /// Which persona each channel speaks as.
    personas: Arc<Personas>,
    /// Fine-tuning jobs, when `[jobs]` is enabled.
    jobs: Option<Jobs>,
    metrics: Arc<Metrics>,
    /// Channels with queued or running work. A std mutex: held only to
    /// look up, insert or remove, never across an await.
    channels: Mutex<HashMap<ChannelKey, mpsc::Sender<Work>>>,
    /// False once shutdown begins: new messages are refused.
    accepting: AtomicBool,
    in_flight: AtomicUsize,
    /// Woken when `in_flight` drops to zero.
    idle: Notify,
    /// Channels a moderator muted. In memory: a restart unmutes.
    muted: Mutex<HashSet<ChannelKey>>,
    limiter: RateLimiter,
}

/// `[safety]` with its blocked words compiled into a word list.
struct SafetyState {
    settings: SafetySettings,
    blocked: WordList,
}

impl SafetyState {
    fn new(settings: SafetySettings) -> Self {
        let mut lists = crate::safety::WordLists::default();
        for word in &settings.blocked_words {
            // Validated in settings; an entry the list refuses is skipped.
            let _ = lists.block("global", word);
        }
        let blocked = lists.get("global").cloned().unwrap_or_default();
        Self { settings, blocked }
    }
}

/// The daemon's core. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    shared: Arc<Shared>,
}

/// The jobs side of the pipeline: where `/train` queues jobs.
#[derive(Clone, Debug)]
pub struct Jobs {
    pub store: JobStore,
    pub settings: JobSettings,
}

/// What a pipeline is built from.
pub struct Parts {
    pub engine: Arc<dyn ReplyEngine>,
    pub store: Arc<dyn ContextStore>,
    pub tokenizer: DialogTokenizer,
    pub generation: GenerationSettings,
    /// The context's token budget (`context.max_tokens`).
    pub max_tokens: usize,
    pub rate_limit: RateLimitSettings,
    pub safety: SafetySettings,
    pub ranker: Option<Arc<Ranker>>,
    pub collector: Option<Arc<Collector>>,
    pub personas: Arc<Personas>,
    pub jobs: Option<Jobs>,
    pub metrics: Arc<Metrics>,
}

impl Pipeline {
    pub fn new(parts: Parts) -> Self {
        let Parts { engine, store, tokenizer, generation, max_tokens, rate_limit, safety, ranker, collector, personas, jobs, metrics } = parts;
        Self {
            shared: Arc::new(Shared {
                engine,
                store,
                tokenizer,
                generation: RwLock::new(Arc::new(generation)),
                max_tokens,
                safety: RwLock::new(Arc::new(SafetyState::new(safety))),
                filter: Filter::new(),
                ranker,
                collector,
                personas,
                jobs,
                metrics,
                channels: Mutex::new(HashMap::new()),
                accepting: AtomicBool::new(true),
                in_flight: AtomicUsize::new(0),
                idle: Notify::new(),
                muted: Mutex::new(HashSet::new()),
                limiter: RateLimiter::new(rate_limit),
            }),
        }
    }

    /// Why a new model's answer to a probe prompt fails the promotion gate
    /// (empty, an echo of the prompt, flagged by the safety filter as now
    /// configured), or `None` if it passes.
    pub fn judge_probe(&self, prompt: &str, reply: &str) -> Option<String> {
        if reply.trim().is_empty() {
            return Some("empty reply".into());
        }
        if let Some(Some(why)) = crate::ranking::degeneration::screen(&[reply.to_string()], prompt, &[]).first() {
            return Some(format!("{why:?}"));
        }
        let safety = self.shared.safety.read().unwrap_or_else(|e| e.into_inner()).clone();
        match self.shared.filter.check(reply, safety.settings.policy, Some(&safety.blocked)) {
            Ok(verdict) if verdict.flagged => Some(format!("flagged by the safety filter: {:?}", verdict.categories)),
            Ok(_) => None,
            Err(e) => Some(format!("safety filter failed: {e}")),
        }
    }

    /// The safety settings now in force.
    pub fn safety(&self) -> SafetySettings {
        self.shared.safety.read().unwrap_or_else(|e| e.into_inner()).settings.clone()
    }

    /// Replaces the safety settings (policies, notice, blocked words);
    /// messages already in the pipeline keep the ones they started with.
    pub fn set_safety(&self, safety: SafetySettings) {
        *self.shared.safety.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(SafetyState::new(safety));
    }

    /// The generation settings now in force.
    pub fn generation(&self) -> Arc<GenerationSettings> {
        self.shared.generation.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the generation settings; messages already generating keep
    /// the ones they started with.
    pub fn set_generation(&self, generation: GenerationSettings) {
        *self.shared.generation.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(generation);
    }

    /// Refuses new messages from now on (shutdown).
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::Release);
    }

    /// Messages accepted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Resolves when no message is in flight.
    pub async fn drained(&self) {
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Queues a message on its channel (in call order), starting the
    /// channel's worker when it has none.
    fn enqueue(&self, inbound: Inbound) -> Result<oneshot::Receiver<Result<Answer, CoreError>>, CoreError> {
        let shared = &self.shared;
        if !shared.accepting.load(Ordering::Acquire) {
            shared.metrics.refused(Refusal::ShuttingDown);
            return Err(CoreError::ShuttingDown);
        }
        shared.metrics.messages_in.fetch_add(1, Ordering::Relaxed);
        let (answer, receiver) = oneshot::channel();
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        let work = Work { inbound, answer, _in_flight: InFlight(shared.clone()) };
        let mut channels = shared.channels.lock().unwrap_or_else(|e| e.into_inner());
        let key = work.inbound.channel.clone();
        let sender = channels.entry(key.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
            tokio::spawn(channel_worker(shared.clone(), key, rx));
            tx
        });
        match sender.try_send(work) {
            Ok(()) => Ok(receiver),
            Err(_) => {
                shared.metrics.refused(Refusal::Busy);
                Err(CoreError::Busy)
            }
        }
    }
}

/// Handles one channel's messages in order; ends when its queue is empty.
async fn channel_worker(shared: Arc<Shared>, key: ChannelKey, mut queue: mpsc::Receiver<Work>) {
    loop {
        let work = match queue.try_recv() {
            Ok(work) => work,
            Err(_) => {
                // Remove the channel under the map lock, where senders
                // send, so nothing can arrive after the last look.
                let mut channels = shared.channels.lock().unwrap_or_else(|e| e.into_inner());
                match queue.try_recv() {
                    Ok(work) => work,
                    Err(_) => {
                        channels.remove(&key);
                        return;
                    }
                }
            }
        };
        let Work { inbound, answer, _in_flight } = work;
        let channel = inbound.channel.clone();
        // A panic inside one message is that message's failure only.
        let result = tokio::spawn(process(shared.clone(), inbound)).await.unwrap_or_else(|e| {
            tracing::error!(%channel, error = %e, "message handling panicked");
            Err(CoreError::Internal("message handling failed".into()))
        });
        if result.is_ok() {
            shared.metrics.messages_out.fetch_add(1, Ordering::Relaxed);
        }
        let _ = answer.send(result);
    }
}

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
            self.metrics.context_degraded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A command word (`/reset`, `/reset@botname`), if the text is one.
fn command(text: &str) -> Option<&str> {
    dialogd_adapters::text::command_word(text).map(|(word, _)| word)
}

fn reply(inbound: &Inbound, text: impl Into<String>) -> Answer {
    Answer::Reply(Outbound { channel: inbound.channel.clone(), text: text.into(), reply_to: inbound.msg_id.clone() })
}

fn silent(reason: &str) -> Answer {
    Answer::Silent { reason: reason.into() }
}

/// An edited message (`Inbound::edit`): the input filter's verdict on the
/// new text, then `context::apply_edit` does the rest.
async fn edited(shared: &Shared, inbound: &Inbound) -> Result<EditOutcome, CoreError> {
    let (Some(id), Some(edit)) = (inbound.msg_id.as_deref(), inbound.edit) else { return Ok(EditOutcome::Done("edit_ignored")) };
    let text = inbound.text.trim();
    if text.is_empty() || text.len() > MAX_TURN_BYTES {
        return Ok(EditOutcome::Done("edit_ignored"));
    }
    let safety = shared.safety.read().unwrap_or_else(|e| e.into_inner()).clone();
    let policy = safety.settings.policy_for(&inbound.channel.to_string());
    let flagged = shared.filter.check(text, policy, Some(&safety.blocked)).map_err(internal)?.flagged;
    crate::context::apply_edit(&*shared.store, &inbound.channel, &inbound.author, id, text, flagged, edit.answer)
        .await
        .map_err(|e| CoreError::Unavailable(e.to_string()))
}

async fn process(shared: Arc<Shared>, mut inbound: Inbound) -> Result<Answer, CoreError> {
    if inbound.edit.is_some() {
        match edited(&shared, &inbound).await? {
            EditOutcome::Done(reason) => return Ok(silent(reason)),
            EditOutcome::AnswerAs(id) => inbound.msg_id = Some(id),
        }
    }
    let metrics = &shared.metrics;
    let channel = &inbound.channel;
    let text = inbound.text.trim();
    if text.is_empty() {
        metrics.refused(Refusal::Invalid);
        return Err(CoreError::Invalid("the message is empty".into()));
    }
    if text.len() > MAX_TURN_BYTES {
        metrics.refused(Refusal::Invalid);
        return Err(CoreError::Invalid(format!("the message is over {MAX_TURN_BYTES} bytes")));
    }
    let mut text = text;
    if let Some(word) = command(text) {
        let word = word.to_ascii_lowercase();
        if word != "ask" {
            return run_command(&shared, &inbound, &word).await;
        }
        text = dialogd_adapters::text::command_argument(text);
        if text.is_empty() {
            return Ok(reply(&inbound, "Ask me something: /ask how are you?"));
        }
    } else if !inbound.addressed_to_bot {
        return Ok(silent("not_addressed"));
    }
    if shared.muted.lock().unwrap_or_else(|e| e.into_inner()).contains(channel) {
        return Ok(silent("muted"));
    }
    let store = &shared.store;
    let mut degraded = Degraded { metrics, counted: false };
    let msg_id = inbound.msg_id.as_deref();
    if let Some(id) = msg_id {
        match store.seen(channel, id).await {
            Ok(true) => {
                metrics.refused(Refusal::Duplicate);
                return Ok(silent("duplicate"));
            }
            Ok(false) => {}
            Err(e) => degraded.note(channel, "duplicate check", &e),
        }
    }
    match shared.limiter.check(channel, &inbound.author) {
        Verdict::Allow => {}
        Verdict::Notice(notice) => {
            metrics.refused(Refusal::RateLimited);
            tracing::info!(%channel, author = %inbound.author, "rate limited: notice sent");
            return Ok(reply(&inbound, notice));
        }
        Verdict::Drop => {
            metrics.refused(Refusal::RateLimited);
            return Ok(silent("rate_limited"));
        }
    }
    // The input filter: a toxic message is answered per policy and never
    // stored (so never learned from).
    let safety = shared.safety.read().unwrap_or_else(|e| e.into_inner()).clone();
    let policy = safety.settings.policy_for(&channel.to_string());
    let verdict = shared.filter.check(text, policy, Some(&safety.blocked)).map_err(|e| CoreError::Internal(e.to_string()))?;
    if verdict.flagged {
        metrics.refused(Refusal::ToxicInput);
        tracing::info!(%channel, categories = ?verdict.categories, "message failed the safety filter");
        return Ok(match safety.settings.toxic_input {
            ToxicInput::Notice => reply(&inbound, safety.settings.notice.clone()),
            ToxicInput::Silent => silent("toxic_input"),
        });
    }
    let history = store.turns(channel).await.unwrap_or_else(|e| {
        degraded.note(channel, "read", &e);
        Vec::new()
    });

    let generation = shared.generation.read().unwrap_or_else(|e| e.into_inner()).clone();
    let params = generation.sampling();
    let tokenizer = &shared.tokenizer;
    let mut encoded: Vec<Vec<u32>> = history
        .iter()
        .filter_map(|turn| tokenizer.encode(&turn.text).ok().filter(|ids| !ids.is_empty()))
        .collect();
    let message_ids = tokenizer.encode(text).map_err(|e| CoreError::Invalid(e.to_string()))?;
    if message_ids.is_empty() {
        metrics.refused(Refusal::Invalid);
        return Err(CoreError::Invalid("the message encodes to no tokens".into()));
    }
    encoded.push(message_ids);
    // The channel's persona: its seed turns go before the context (always
    // kept; the context gets what they leave of the budget).
    let persona = shared.personas.for_channel(channel, inbound.group.as_deref()).await.unwrap_or_else(|e| {
        tracing::warn!(%channel, error = %e, "cannot look up the channel's persona; answering without one");
        None
    });
    let mut seed_ids = Vec::new();
    for turn in persona.iter().flat_map(|p| p.seed.iter()) {
        if let Ok(ids) = tokenizer.encode(turn) {
            seed_ids.extend(ids);
            seed_ids.push(tokenizer.eos_id());
        }
    }
    let room = shared.engine.n_positions().saturating_sub(params.max_new_tokens);
    let budget = shared.max_tokens.min(room).saturating_sub(seed_ids.len());
    let mut prompt = build_prompt(&encoded, tokenizer.eos_id(), budget).map_err(|e| {
        CoreError::Internal(format!("{e} (generation.max_new_tokens and the persona's seed turns leave {budget} tokens of context)"))
    })?;
    if !seed_ids.is_empty() {
        seed_ids.extend_from_slice(&prompt.ids);
        prompt.ids = seed_ids;
    }

    // Draw candidates; drop empty ones, echoes, repeats and toxic ones;
    // try again up to the bound; never send a flagged reply.
    let recent_bot: Vec<String> = history.iter().rev().filter(|t| t.bot).take(8).map(|t| t.text.clone()).collect();
    let n_candidates = generation.candidates.max(1);
    let mut chosen: Option<(String, Vec<u32>, usize)> = None;
    for attempt in 1..=safety.settings.max_attempts {
        let adapter = persona.as_ref().and_then(|p| p.adapter.clone());
        let drawn = match shared.engine.reply(prompt.ids.clone(), params.clone(), n_candidates, adapter).await {
            Ok(drawn) => drawn,
            Err(EngineError::Busy) => return Err(CoreError::Busy),
            Err(e) => {
                metrics.refused(Refusal::Failed);
                tracing::warn!(%channel, error = %e, "generation failed");
                return Err(CoreError::Internal(e.to_string()));
            }
        };
        metrics.candidates_drawn.fetch_add(drawn.len() as u64, Ordering::Relaxed);
        let texts: Vec<String> = drawn
            .iter()
            .map(|d| tokenizer.decode(&d.ids).map(|t| t.trim().to_string()).unwrap_or_default())
            .collect();
        let rejections = crate::ranking::degeneration::screen(&texts, text, &recent_bot);
        let mut survivors = Vec::new();
        for (i, rejection) in rejections.iter().enumerate() {
            if let Some(why) = rejection {
                metrics.candidates_screened.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%channel, candidate = i, ?why, "candidate screened out");
                continue;
            }
            let verdict = shared.filter.check(&texts[i], policy, Some(&safety.blocked)).map_err(|e| CoreError::Internal(e.to_string()))?;
            if verdict.flagged {
                metrics.candidates_flagged.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%channel, candidate = i, categories = ?verdict.categories, "candidate flagged");
                continue;
            }
            survivors.push(i);
        }
        if survivors.is_empty() {
            tracing::debug!(%channel, attempt, "no candidate passed; drawing again");
            continue;
        }
        let mean_logprob = |i: usize| drawn[i].logprob / drawn[i].ids.len().max(1) as f32;
        let best = match &shared.ranker {
            Some(ranker) if survivors.len() > 1 => {
                let context = encoded[encoded.len() - prompt.turns_kept..].to_vec();
                let ids: Vec<Vec<u32>> = survivors.iter().map(|&i| drawn[i].ids.clone()).collect();
                let logprobs: Vec<f32> = survivors.iter().map(|&i| mean_logprob(i)).collect();
                match ranker.score(context, ids, logprobs).await {
                    Ok(scores) => {
                        metrics.candidates_ranked.fetch_add(scores.len() as u64, Ordering::Relaxed);
                        let top = (0..scores.len()).max_by(|&a, &b| scores[a].score.total_cmp(&scores[b].score)).unwrap_or(0);
                        tracing::debug!(%channel, candidates = survivors.len(), chosen = survivors[top],
                            score = scores[top].score, dialogrpt = ?scores[top].dialogrpt, mmi = ?scores[top].mmi, "ranked");
                        survivors[top]
                    }
                    Err(e) => {
                        tracing::warn!(%channel, error = %e, "ranking failed; taking the likeliest candidate");
                        *survivors.iter().max_by(|&&a, &&b| mean_logprob(a).total_cmp(&mean_logprob(b))).unwrap_or(&survivors[0])
                    }
                }
            }
            _ => *survivors.iter().max_by(|&&a, &&b| mean_logprob(a).total_cmp(&mean_logprob(b))).unwrap_or(&survivors[0]),
        };
        let ids = drawn[best].ids.clone();
        chosen = Some((texts[best].clone(), ids, attempt));
        break;
    }

    let user_turn = Turn::user(&inbound.author, text, inbound.msg_id.clone());
    let Some((reply_text, ids, attempt)) = chosen else {
        // The user's turn was fine: keep it; the bot says nothing.
        metrics.refused(Refusal::NoSafeCandidate);
        tracing::info!(%channel, attempts = safety.settings.max_attempts, "no candidate passed the filter; staying silent");
        if let Err(e) = store.append(channel, &[user_turn], msg_id).await {
            degraded.note(channel, "append", &e);
        }
        return Ok(silent("no_safe_candidate"));
    };
    let user_turn = Turn::user(&inbound.author, text, inbound.msg_id.clone());
    let (turns, answer) = if reply_text.is_empty() {
        metrics.refused(Refusal::EmptyReply);
        (vec![user_turn], silent("empty_reply"))
    } else {
        (vec![user_turn, Turn::bot(&reply_text, &inbound.author)], reply(&inbound, &reply_text))
    };
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
        metrics.replies.fetch_add(1, Ordering::Relaxed);
        // Opted-in channels: the exchange (the context the model saw, the
        // message, the reply) goes to the training logs. Toxic messages
        // never get this far; flagged replies are never chosen.
        if let Some(collector) = shared.collector.as_ref().filter(|c| c.wants(&channel.to_string())) {
            let context = history.len().saturating_sub(prompt.turns_kept.saturating_sub(1));
            let mut turns: Vec<(String, String, bool)> =
                history[context..].iter().map(|t| (t.author.clone(), t.text.clone(), t.bot)).collect();
            turns.push((inbound.author.clone(), text.to_string(), false));
            turns.push(("bot".to_string(), reply_text.clone(), true));
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
    }
    tracing::debug!(%channel, prompt_turns = prompt.turns_kept, reply_tokens = ids.len(), attempt, "answered");
    Ok(answer)
}

async fn run_command(shared: &Shared, inbound: &Inbound, word: &str) -> Result<Answer, CoreError> {
    let unavailable = |e: ContextError| CoreError::Unavailable(e.to_string());
    let channel = &inbound.channel;
    if MODERATOR_COMMANDS.contains(&word) {
        if !inbound.moderator {
            tracing::info!(%channel, author = %inbound.author, command = word, "moderator command refused");
            return Ok(reply(inbound, format!("Sorry, only moderators can use /{word}.")));
        }
        tracing::info!(%channel, moderator = %inbound.author, command = word, "moderator action");
    }
    match word {
        "mute" => {
            shared.muted.lock().unwrap_or_else(|e| e.into_inner()).insert(channel.clone());
            Ok(reply(inbound, "Muted: I won't answer in this channel until a moderator says /unmute."))
        }
        "unmute" => {
            shared.muted.lock().unwrap_or_else(|e| e.into_inner()).remove(channel);
            Ok(reply(inbound, "Unmuted: I'm listening again."))
        }
        "persona" => persona_command(shared, inbound).await,
        "train" => train_command(shared, inbound).await,
        "collect" => {
            let Some(collector) = shared.collector.clone() else {
                return Ok(reply(inbound, "Collection is off on this bot ([collect] enabled = false)."));
            };
            let key = channel.to_string();
            let choice = match argument(inbound).as_str() {
                "on" => Some(true),
                "off" => Some(false),
                _ => None,
            };
            let answer = match choice {
                Some(on) => {
                    let (c, k) = (collector.clone(), key.clone());
                    tokio::task::spawn_blocking(move || c.set_channel(&k, on)).await.map_err(internal)?.map_err(internal)?;
                    if on {
                        "Collecting: this channel's conversations may now be used to train me (members can /optout)."
                    } else {
                        "Not collecting: nothing more from this channel will be used for training."
                    }
                }
                None if collector.wants(&key) => "This channel's conversations are collected for training (/collect off stops it).",
                None => "This channel's conversations are not collected (/collect on starts it).",
            };
            Ok(reply(inbound, answer))
        }
        "optout" | "optin" => {
            let Some(collector) = shared.collector.clone() else {
                return Ok(reply(inbound, "Nothing is collected for training on this bot."));
            };
            let author = inbound.author.clone();
            if word == "optout" {
                let n = tokio::task::spawn_blocking(move || collector.opt_out(&author)).await.map_err(internal)?.map_err(internal)?;
                Ok(reply(inbound, format!("Done: I won't learn from your messages, and I've deleted {n} collected exchanges you were part of. /optin undoes this.")))
            } else {
                let was = tokio::task::spawn_blocking(move || collector.opt_in(&author)).await.map_err(internal)?.map_err(internal)?;
                Ok(reply(inbound, if was { "Done: your messages in collecting channels may be used for training again." } else { "You had not opted out." }))
            }
        }
        "start" => Ok(reply(inbound, START)),
        "reset" => {
            shared.store.clear(&inbound.channel).await.map_err(unavailable)?;
            Ok(reply(inbound, "Done: I've forgotten this channel's conversation."))
        }
        "forget" => {
            let n = shared.store.forget_author(inbound.channel.platform, &inbound.author).await.map_err(unavailable)?;
            let mut collected = 0;
            if let Some(collector) = shared.collector.clone() {
                let author = inbound.author.clone();
                collected = tokio::task::spawn_blocking(move || collector.forget(&author))
                    .await
                    .map_err(|e| CoreError::Internal(e.to_string()))?
                    .map_err(|e| CoreError::Internal(e.to_string()))?;
            }
            if collected > 0 {
                return Ok(reply(inbound, format!("Done: I've deleted {n} stored turns of yours and my replies to them, and {collected} collected exchanges.")));
            }
            Ok(reply(inbound, format!("Done: I've deleted {n} stored turns of yours and my replies to them.")))
        }
        _ => Ok(reply(inbound, HELP)),
    }
}

fn internal(e: impl std::fmt::Display) -> CoreError {
    CoreError::Internal(e.to_string())
}

/// The text after a command word, trimmed and lower-cased first word kept
/// as typed after it.
fn argument(inbound: &Inbound) -> String {
    dialogd_adapters::text::command_argument(inbound.text.trim()).trim().to_string()
}

/// `/persona [show | list | use NAME [server] | create NAME SEED | SEED… | off [server]]`.
async fn persona_command(shared: &Shared, inbound: &Inbound) -> Result<Answer, CoreError> {
    let personas = &shared.personas;
    let channel = &inbound.channel;
    let arg = argument(inbound);
    let mut words = arg.split_whitespace();
    let verb = words.next().unwrap_or("show").to_ascii_lowercase();
    let scope_of = |word: Option<&str>| -> Result<String, String> {
        match (word, inbound.group.as_deref()) {
            (None, _) => Ok(channel.to_string()),
            (Some("server" | "guild"), Some(group)) => Ok(group_scope(channel, group)),
            (Some("server" | "guild"), None) => Err("this channel belongs to no server: choose for the channel".into()),
            (Some(other), _) => Err(format!("{other:?}: say `server` to choose for the whole server, or nothing for this channel")),
        }
    };
    let text = match verb.as_str() {
        "show" => match personas.chosen(channel, inbound.group.as_deref()).await.map_err(unavailable_text)? {
            None => "I speak as myself here (no persona). /persona list shows the personas.".to_string(),
            Some(name) => match personas.for_channel(channel, inbound.group.as_deref()).await.map_err(unavailable_text)? {
                Some(p) => format!(
                    "I speak as {} here ({} seed turn(s); adapter: {}).",
                    p.name,
                    p.seed.len(),
                    match (p.version, &p.adapter_dir) {
                        (Some(v), _) => format!("trained by job #{v}"),
                        (None, Some(_)) => "configured".into(),
                        (None, None) => "none yet".into(),
                    }
                ),
                None => format!("The persona chosen here, {name}, no longer exists; I speak as myself."),
            },
        },
        "list" => {
            let all = personas.all().await.map_err(unavailable_text)?;
            if all.is_empty() {
                "There are no personas yet: /persona create NAME first turn | second turn".to_string()
            } else {
                format!("Personas: {}.", all.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "))
            }
        }
        "use" => {
            let Some(name) = words.next() else { return Ok(reply(inbound, "Which one? /persona use NAME")) };
            let name = name.to_ascii_lowercase();
            let scope = match scope_of(words.next()) {
                Ok(scope) => scope,
                Err(why) => return Ok(reply(inbound, why)),
            };
            match personas.choose(&scope, Some(&name)).await {
                Ok(()) => format!("From now on I speak as {name} {}.", if scope.contains(":group:") { "on this server" } else { "in this channel" }),
                Err(why) => why,
            }
        }
        "off" => {
            let scope = match scope_of(words.next()) {
                Ok(scope) => scope,
                Err(why) => return Ok(reply(inbound, why)),
            };
            personas.choose(&scope, None).await.map_err(unavailable_text)?;
            "Persona cleared: I speak as myself (or the server's persona).".to_string()
        }
        "create" => {
            let Some(name) = words.next() else {
                return Ok(reply(inbound, "/persona create NAME first seed turn | second seed turn"));
            };
            let rest = words.collect::<Vec<_>>().join(" ");
            let seed: Vec<String> = rest.split('|').map(str::trim).filter(|t| !t.is_empty()).map(str::to_string).collect();
            // Whoever moderates this server (or, outside one, this channel)
            // owns what they create.
            let owner = match inbound.group.as_deref() {
                Some(group) => group_scope(channel, group),
                None => channel.to_string(),
            };
            match personas.create(&name.to_ascii_lowercase(), seed, &owner).await {
                Ok(spec) => format!(
                    "Created persona {} with {} seed turn(s). /persona use {} to speak as it here; /train teaches it this channel's ways.",
                    spec.name,
                    spec.seed.len(),
                    spec.name
                ),
                Err(why) => why,
            }
        }
        _ => "Usage: /persona [show | list | use NAME [server] | create NAME SEED | SEED… | off [server]]".to_string(),
    };
    Ok(reply(inbound, text))
}

fn unavailable_text(why: String) -> CoreError {
    CoreError::Unavailable(why)
}

/// `/train [status | cancel | rollback]`.
async fn train_command(shared: &Shared, inbound: &Inbound) -> Result<Answer, CoreError> {
    let Some(jobs) = &shared.jobs else {
        return Ok(reply(inbound, "Training is off on this bot ([jobs] enabled = false)."));
    };
    let channel = inbound.channel.to_string();
    let unavailable = |e: crate::jobs::StoreError| CoreError::Unavailable(e.to_string());
    let persona = shared.personas.chosen(&inbound.channel, inbound.group.as_deref()).await.map_err(unavailable_text)?;
    let target = jobs.settings.mode.target_for(persona.as_deref());
    let trigger = format!("moderator:{channel}");
    let text = match argument(inbound).to_ascii_lowercase().as_str() {
        "" | "start" => {
            let target = match target {
                Ok(target) => target,
                Err(why) => return Ok(reply(inbound, why)),
            };
            if !shared.collector.as_ref().is_some_and(|c| c.wants(&channel)) {
                return Ok(reply(inbound, "This channel's conversations are not collected, so there is nothing to train on: /collect on first."));
            }
            let record = jobs.store.create(target, trigger, vec![channel.clone()]).await.map_err(unavailable)?;
            tracing::info!(job = record.id, target = %record.target, %channel, "training job queued by a moderator");
            format!(
                "Training job #{} queued for {} on this channel's collected conversations. /train status shows how it goes; /train cancel stops it.",
                record.id, record.target
            )
        }
        "status" => {
            let mine: Vec<_> = jobs
                .store
                .list(50)
                .await
                .map_err(unavailable)?
                .into_iter()
                .filter(|r| r.trigger == trigger || target.as_ref().is_ok_and(|t| *t == r.target))
                .take(3)
                .collect();
            if mine.is_empty() {
                "No training jobs for this channel yet: /train starts one.".to_string()
            } else {
                let mut lines: Vec<String> = mine.iter().map(|r| r.summary()).collect();
                if let Some(probe) = mine[0].probes.first() {
                    lines.push(format!("Probe: \"{}\" → \"{}\"", probe.prompt, probe.reply));
                }
                lines.join("\n")
            }
        }
        "cancel" => {
            let open = jobs
                .store
                .list(50)
                .await
                .map_err(unavailable)?
                .into_iter()
                .find(|r| r.trigger == trigger && !r.state.is_final());
            match open {
                None => "No queued or running job from this channel.".to_string(),
                Some(r) => match jobs.store.cancel(r.id).await {
                    Ok(r) if r.state == JobState::Cancelled => format!("Cancelled job #{}.", r.id),
                    Ok(r) => format!("Stopping job #{}…", r.id),
                    Err(e) => e.to_string(),
                },
            }
        }
        "rollback" => {
            let target = match target {
                Ok(target) => target,
                Err(why) => return Ok(reply(inbound, why)),
            };
            rollback_text(&jobs.store, &target).await.map_err(unavailable)?
        }
        _ => "Usage: /train [status | cancel | rollback]".to_string(),
    };
    Ok(reply(inbound, text))
}

/// Rolls `target` back one version and says what it serves now.
pub async fn rollback_text(store: &JobStore, target: &Target) -> Result<String, crate::jobs::StoreError> {
    Ok(match store.rollback(target).await? {
        None => format!("{target} already serves its original version."),
        Some(id) => {
            let now = store.versions(target).await?.last().map_or("its original version".to_string(), |v| format!("job #{v}"));
            format!("Rolled back job #{id}: {target} serves {now} again (within a few seconds).")
        }
    })
}

impl Core for Pipeline {
    fn handle(&self, inbound: Inbound) -> BoxFuture<'static, Result<Answer, CoreError>> {
        let queued = self.enqueue(inbound);
        Box::pin(async move {
            match queued {
                Ok(receiver) => receiver.await.unwrap_or(Err(CoreError::Internal("message was dropped".into()))),
                Err(e) => Err(e),
            }
        })
    }

    fn turns(&self, channel: ChannelKey) -> BoxFuture<'static, Result<Vec<ContextTurn>, CoreError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let turns = shared.store.turns(&channel).await.map_err(|e| CoreError::Unavailable(e.to_string()))?;
            Ok(turns.into_iter().map(|t| ContextTurn { author: t.author, text: t.text, bot: t.bot }).collect())
        })
    }

    fn clear(&self, channel: ChannelKey) -> BoxFuture<'static, Result<(), CoreError>> {
        let shared = self.shared.clone();
        Box::pin(async move { shared.store.clear(&channel).await.map_err(|e| CoreError::Unavailable(e.to_string())) })
    }

    fn health(&self) -> Health {
        Health { ready: true, store: self.shared.store.kind().into(), store_up: self.shared.store.is_up() }
    }
}

#[cfg(test)]
mod tests {
    use super::command;

    #[test]
    fn commands_are_recognised() {
        assert_eq!(command("/reset"), Some("reset"));
        assert_eq!(command("/reset@dialogd_bot now"), Some("reset"));
        assert_eq!(command("/ hi"), None);
        assert_eq!(command("hello /reset"), None);
        assert_eq!(command("/-)"), None);
    }
}
