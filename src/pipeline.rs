//! The path of one message: commands, context, prompt, generation, context.
//!
//! [`Pipeline`] is the daemon's [`Core`]: adapters hand it [`Inbound`]
//! messages and get [`Answer`]s back. A failure on one message is logged
//! and answered with an error; it never stops the daemon.
//!
//! - [`queue`]: per-channel ordered queues. Messages of one channel are
//!   handled one at a time in the order `handle` was called; channels run
//!   concurrently.
//! - [`reply`]: the reply path of one message (admission, input filter,
//!   context, the persona's prompt, candidates, screening, output filter,
//!   ranking, storing, collection).
//! - `complete`: stateless completions for the OpenAI-compatible API (a
//!   conversation sent whole, `n` ranked replies, no channel context).
//! - [`commands`]: `/start /help /ask /reset /forget /optout /optin` for
//!   everyone and `/mute /unmute /persona /train /collect /block /unblock
//!   /allow /disallow /blocklist` for moderators
//!   (the adapter says who is one), parsed into a [`commands::Command`]
//!   with one handler each; refusals and moderator actions are logged.
//! - [`engine`]: the narrow door to generation ([`ReplyEngine`]).
//! - [`rank`]: the DialogRPT/MMI ranker on its own thread.
//! - [`limits`]: rate limits per user and per channel.

pub mod commands;
mod complete;
pub mod engine;
pub mod limits;
pub mod queue;
pub mod rank;
pub mod reply;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dialogd_adapters::{
    Answer, BoxFuture, ChannelKey, Completion, CompletionError, CompletionRequest, ContextTurn, Core, CoreError, Health, Inbound, ModelCard,
    Outbound,
};

use self::engine::ReplyEngine;
use self::limits::RateLimiter;
use self::queue::{Job, Queues};
use self::rank::Ranker;
use crate::collect::Collector;
use crate::context::{lease, ContextStore};
use crate::jobs::JobStore;
use crate::personas::Personas;
use crate::safety::{blocked_list, Filter, ToxicityClassifier, WordList, WordStore};
use crate::settings::live::LiveSettings;
use crate::settings::{GenerationSettings, JobSettings, RateLimitSettings, SafetySettings};
use crate::telemetry::{Metrics, Refusal};
use crate::tokenizer::DialogTokenizer;

/// Safety settings, their compiled blocked words and their filter.
type CompiledSafety = (Arc<SafetySettings>, Arc<WordList>, Filter);

/// Everything the channel workers share.
struct Shared {
    engine: Arc<dyn ReplyEngine>,
    store: Arc<dyn ContextStore>,
    tokenizer: DialogTokenizer,
    /// The base model's id for completions (`model.path` as configured).
    model_name: String,
    /// `[generation]` and `[safety]`, replaced whole on SIGHUP; a message
    /// reads them once, when it starts.
    live: Arc<LiveSettings>,
    /// The blocked words and the filter (with its classifier thresholds)
    /// of the safety settings they were compiled from, rebuilt when those
    /// change. A std lock, never held across an await.
    blocked: Mutex<Option<CompiledSafety>>,
    /// The context's token budget (`context.max_tokens`).
    max_tokens: usize,
    /// `[safety] classifier`, loaded at start.
    classifier: Option<Arc<dyn ToxicityClassifier>>,
    /// Moderators' blocked and allowed words per scope (`/block`, …).
    words: Arc<WordStore>,
    /// The DialogRPT/MMI ranker, when `[ranking]` names one.
    ranker: Option<Arc<Ranker>>,
    /// Consented log collection, when `[collect]` is enabled.
    collector: Option<Arc<Collector>>,
    /// Which persona each channel speaks as.
    personas: Arc<Personas>,
    /// Fine-tuning jobs, when `[jobs]` is enabled.
    jobs: Option<Jobs>,
    metrics: Arc<Metrics>,
    queues: Queues,
    /// False once shutdown begins: new messages are refused.
    accepting: AtomicBool,
    /// Muted channels as last read from or written to the store, for
    /// while it cannot be reached (the store's word is the one that counts).
    muted: Mutex<HashSet<ChannelKey>>,
    limiter: RateLimiter,
    /// This daemon's name in channel leases (see [`crate::context::lease`]).
    holder: String,
}

impl Shared {
    /// The safety settings now in force, their compiled blocked words and
    /// the filter under their classifier thresholds.
    fn safety(&self) -> CompiledSafety {
        let settings = self.live.safety();
        let mut cache = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        match &*cache {
            Some((from, list, filter)) if Arc::ptr_eq(from, &settings) => (settings, list.clone(), filter.clone()),
            _ => {
                let list = Arc::new(blocked_list(settings.blocked_words.iter().map(String::as_str)));
                let filter = match &self.classifier {
                    Some(c) => Filter::new().with_classifier(c.clone(), settings.classifier_thresholds.clone()),
                    None => Filter::new(),
                };
                *cache = Some((settings.clone(), list.clone(), filter.clone()));
                (settings, list, filter)
            }
        }
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
    /// The base model's id for completions (`model.path` as configured).
    pub model_name: String,
    /// The live `[generation]` and `[safety]` settings (shared with the
    /// daemon, which reloads them, and the jobs' gate).
    pub live: Arc<LiveSettings>,
    /// The context's token budget (`context.max_tokens`).
    pub max_tokens: usize,
    pub rate_limit: RateLimitSettings,
    pub ranker: Option<Arc<Ranker>>,
    /// `[safety] classifier`, loaded (its thresholds come from the live
    /// `[safety]`).
    pub classifier: Option<Arc<dyn ToxicityClassifier>>,
    /// Moderators' word lists (Redis with the context, else memory).
    pub words: Arc<WordStore>,
    pub collector: Option<Arc<Collector>>,
    pub personas: Arc<Personas>,
    pub jobs: Option<Jobs>,
    pub metrics: Arc<Metrics>,
}

impl Pipeline {
    pub fn new(parts: Parts) -> Self {
        let Parts { engine, store, tokenizer, model_name, live, max_tokens, rate_limit, ranker, classifier, words, collector, personas, jobs, metrics } = parts;
        if let Some(classifier) = &classifier {
            metrics.classifier_labels(classifier.labels());
        }
        Self {
            shared: Arc::new(Shared {
                engine,
                store,
                tokenizer,
                model_name,
                live,
                blocked: Mutex::new(None),
                max_tokens,
                classifier,
                words,
                ranker,
                collector,
                personas,
                jobs,
                metrics,
                queues: Queues::new(),
                accepting: AtomicBool::new(true),
                muted: Mutex::new(HashSet::new()),
                limiter: RateLimiter::new(rate_limit),
                holder: crate::remote::process_name(),
            }),
        }
    }

    /// The live settings this pipeline reads.
    pub fn live(&self) -> &Arc<LiveSettings> {
        &self.shared.live
    }

    /// The safety settings now in force.
    pub fn safety(&self) -> SafetySettings {
        (*self.shared.live.safety()).clone()
    }

    /// The labels of the classifier, when there is one.
    pub fn classifier_labels(&self) -> Option<Vec<String>> {
        self.shared.classifier.as_ref().map(|c| c.labels().to_vec())
    }

    /// Replaces the safety settings (policies, notice, blocked words);
    /// messages already in the pipeline keep the ones they started with.
    pub fn set_safety(&self, safety: SafetySettings) {
        self.shared.live.set_safety(safety);
    }

    /// The generation settings now in force.
    pub fn generation(&self) -> Arc<GenerationSettings> {
        self.shared.live.generation()
    }

    /// Replaces the generation settings; messages already generating keep
    /// the ones they started with.
    pub fn set_generation(&self, generation: GenerationSettings) {
        self.shared.live.set_generation(generation);
    }

    /// Refuses new messages from now on (shutdown).
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::Release);
    }

    /// Messages accepted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.shared.queues.in_flight()
    }

    /// After the drain's bound: every message still queued or running is
    /// answered [`CoreError::ShuttingDown`] (HTTP 503).
    pub fn abandon(&self) {
        self.shared.queues.abandon()
    }

    /// Resolves when no message is in flight.
    pub async fn drained(&self) {
        self.shared.queues.drained().await
    }
}

/// A reply to `inbound` in its channel.
fn say(inbound: &Inbound, text: impl Into<String>) -> Answer {
    Answer::Reply(Outbound { channel: inbound.channel.clone(), text: text.into(), reply_to: inbound.msg_id.clone() })
}

/// No answer, for `reason` (a snake_case word).
fn silent(reason: &str) -> Answer {
    Answer::Silent { reason: reason.into() }
}

fn internal(e: impl std::fmt::Display) -> CoreError {
    CoreError::Internal(e.to_string())
}

impl Core for Pipeline {
    fn handle(&self, inbound: Inbound) -> BoxFuture<'static, Result<Answer, CoreError>> {
        let shared = self.shared.clone();
        let queued = if shared.accepting.load(Ordering::Acquire) {
            shared.metrics.message_in(inbound.channel.platform);
            let channel = inbound.channel.clone();
            let platform = channel.platform;
            let worker = shared.clone();
            let logged = channel.clone();
            let job: Job = Box::new(move || {
                Box::pin(async move {
                    // One message of a channel at a time across daemons, too.
                    let (store, holder, leased) = (worker.store.clone(), worker.holder.clone(), inbound.channel.clone());
                    let started = std::time::Instant::now();
                    let mut tally = reply::Tally::default();
                    let work = reply::process(worker.clone(), inbound, &mut tally);
                    let answer = lease::exclusive(&*store, &leased, &holder, lease::TTL, lease::MAX_WAIT, work).await;
                    reply::log_handled(&logged, started, &tally, &answer);
                    if answer.is_ok() {
                        worker.metrics.message_out(platform);
                    }
                    answer
                })
            });
            shared.queues.push(channel, job).inspect_err(|_| shared.metrics.refused(Refusal::Busy))
        } else {
            shared.metrics.refused(Refusal::ShuttingDown);
            Err(CoreError::ShuttingDown)
        };
        let queues = shared.queues.clone();
        Box::pin(async move { queues.answer(queued?).await })
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

    fn models(&self) -> BoxFuture<'static, Result<Vec<ModelCard>, CoreError>> {
        let shared = self.shared.clone();
        Box::pin(async move { complete::models(&shared).await })
    }

    fn complete(&self, request: CompletionRequest) -> BoxFuture<'static, Result<Completion, CompletionError>> {
        Box::pin(complete::complete(self.shared.clone(), request))
    }
}
