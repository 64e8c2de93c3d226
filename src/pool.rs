//! The generation pool: one model, many channels, continuous batching.
//!
//! An engine owns the model on a dedicated OS thread (never a tokio worker)
//! and takes requests from a bounded queue. Every step advances all active
//! sequences in one forward pass, and the prompts of the requests admitted
//! at that step run in the same pass (up to
//! [`PoolConfig::max_prefill_tokens`] prompt tokens per step; a longer
//! prompt is prefilled in chunks over several steps), so a new request
//! whose prompt fits has its first token at the end of the step that
//! admits it;
//! finished sequences leave without stalling the rest. A request may ask
//! for several candidates of one prompt: the prompt is prefilled once and
//! its cache forked. A full queue is an immediate, counted
//! [`PoolError::Busy`]; a caller that goes away (drops the future) has its
//! sequences dropped at the next step. A request may name a persona's LoRA
//! adapter ([`GenerationRequest::adapter`]): its sequences run through it
//! while the rest of the batch runs on the base weights or other adapters.
//!
//! - [`engine`]: the thread and its step loop.
//! - [`metrics`]: counters and gauges the daemon exports.

pub(crate) mod engine;
pub mod metrics;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::generate::FinishReason;
use crate::model::{Gpt2, Gpt2Config, LoraRuntime};
use crate::sampling::SamplingParams;

pub use metrics::{PoolMetrics, PoolMetricsSnapshot};

/// How the pool is sized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Most sequences (candidates included) advanced in one decode step.
    pub max_batch: usize,
    /// Requests that may wait for a place before new ones are refused.
    pub queue_capacity: usize,
    /// Most candidates one request may ask for.
    pub max_candidates: usize,
    /// Most prompt tokens prefilled in one step; the rest wait for the next
    /// step, and a prompt longer than what is left is fed in chunks over
    /// several steps (its first token comes with its last chunk). On
    /// a CPU a prompt costs about the same per token alone or beside others,
    /// so a bigger step only makes each prompt in it wait for the last and
    /// stalls the sequences decoding beside it, while decode rows ride along
    /// almost free: 256 (four 64-token prompts) kept `dialogd bench`'s time
    /// to first token where one-prompt-at-a-time prefill had it and raised
    /// throughput; 2048 put every first token of a 32-request burst at ~1 s.
    pub max_prefill_tokens: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self { max_batch: 32, queue_capacity: 64, max_candidates: 8, max_prefill_tokens: 256 }
    }
}

/// One request: a prompt and how to answer it.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt ids, every turn followed by `<|endoftext|>`.
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    /// How many replies to draw from this prompt (candidates for ranking).
    /// With a seed, candidate i uses seed + i.
    pub n_candidates: usize,
    /// Keep generating through `<|endoftext|>` (benchmarks: every request
    /// then makes exactly `max_new_tokens`).
    pub ignore_eos: bool,
    /// The persona's LoRA adapter, applied at run time to this request's
    /// sequences only; `None`: the base model. It must fit the served
    /// model's shape, and should live on its device
    /// ([`LoraRuntime::to_device`]; otherwise it is copied there per use).
    pub adapter: Option<Arc<LoraRuntime>>,
    /// Test hook: panic while sampling this request's n-th token, to prove
    /// that a failing request fails alone.
    #[doc(hidden)]
    pub fault_at_token: Option<usize>,
    /// Test hook: feed an id outside the vocabulary in place of this
    /// request's prompt, so that every forward pass that prefills it fails.
    #[doc(hidden)]
    pub fault_in_prefill: bool,
}

impl GenerationRequest {
    pub fn new(prompt_ids: Vec<u32>, params: SamplingParams) -> Self {
        Self {
            prompt_ids,
            params,
            n_candidates: 1,
            ignore_eos: false,
            adapter: None,
            fault_at_token: None,
            fault_in_prefill: false,
        }
    }
}

/// One drawn reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// New ids up to and excluding the first `<|endoftext|>`.
    pub output_ids: Vec<u32>,
    pub finish: FinishReason,
    /// Sum of the model's log-probabilities of the drawn ids (before any
    /// sampling processor), for rankers that mix it in.
    pub logprob: f32,
}

/// The answer to a request.
#[derive(Debug, Clone)]
pub struct GenerationResult {
    pub candidates: Vec<Candidate>,
    /// From submission to the end of the draws of the step that prefilled
    /// the prompt (every candidate's first token).
    pub time_to_first_token: Duration,
    /// From submission to the last token.
    pub total: Duration,
    /// The longest wait between two consecutive tokens of this request
    /// (between the ends of two steps that drew them; zero for one token):
    /// what a long prompt prefilled beside it costs its stream.
    pub longest_token_gap: Duration,
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("generation pool busy: {queued} requests already waiting")]
    Busy { queued: usize },
    #[error("generation pool is shut down")]
    Closed,
    #[error("invalid generation request: {0}")]
    Invalid(String),
    #[error("generation failed: {0}")]
    Failed(String),
}

/// What travels to the engine: requests, and model swaps in their order.
pub(crate) enum Work {
    Job(Job),
    Swap(Swap),
}

/// A new model to serve from, once the requests in the batch have finished.
pub(crate) struct Swap {
    pub model: Gpt2,
    pub done: oneshot::Sender<Result<u64, PoolError>>,
}

/// A request on its way to the engine.
pub(crate) struct Job {
    pub request: GenerationRequest,
    pub submitted: Instant,
    pub reply: oneshot::Sender<Result<GenerationResult, PoolError>>,
}

/// The cheap, cloneable way in to the pool.
#[derive(Clone)]
pub struct PoolHandle {
    tx: mpsc::Sender<Work>,
    metrics: Arc<PoolMetrics>,
    config: PoolConfig,
    n_positions: usize,
    vocab_size: usize,
    /// The served model's config, replaced by the engine on a swap, so
    /// adapters are checked against the model that will run them.
    served: Arc<RwLock<Gpt2Config>>,
}

impl std::fmt::Debug for PoolHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolHandle").field("config", &self.config).finish_non_exhaustive()
    }
}

impl PoolHandle {
    /// Submits a request and waits for its answer. Dropping the returned
    /// future cancels the request.
    pub async fn generate(&self, request: GenerationRequest) -> Result<GenerationResult, PoolError> {
        self.check(&request)?;
        let (reply, answer) = oneshot::channel();
        let job = Job { request, submitted: Instant::now(), reply };
        match self.tx.try_send(Work::Job(job)) {
            Ok(()) => self.metrics.queued(),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.refused();
                return Err(PoolError::Busy { queued: self.config.queue_capacity });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(PoolError::Closed),
        }
        answer.await.unwrap_or(Err(PoolError::Closed))
    }

    /// Serves from `model` from now on: requests already in the batch
    /// finish on the old model, requests still queued (and all later ones)
    /// run on the new one; none is dropped. While the batch drains no new
    /// request is admitted. Returns the new model version (1, 2, …).
    pub async fn swap_model(&self, model: Gpt2) -> Result<u64, PoolError> {
        let cfg = model.config();
        if cfg.n_positions != self.n_positions || cfg.vocab_size != self.vocab_size {
            return Err(PoolError::Invalid(format!(
                "the new model has {} positions and {} ids; the pool serves {} and {}",
                cfg.n_positions, cfg.vocab_size, self.n_positions, self.vocab_size
            )));
        }
        let (done, answer) = oneshot::channel();
        self.tx.send(Work::Swap(Swap { model, done })).await.map_err(|_| PoolError::Closed)?;
        answer.await.unwrap_or(Err(PoolError::Closed))
    }

    /// Blocking variant for code outside an async runtime.
    pub fn generate_blocking(&self, request: GenerationRequest) -> Result<GenerationResult, PoolError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| PoolError::Failed(e.to_string()))?;
        runtime.block_on(self.generate(request))
    }

    pub fn metrics(&self) -> &PoolMetrics {
        &self.metrics
    }

    /// The counters, shared (for exporters that outlive this handle).
    pub fn metrics_arc(&self) -> Arc<PoolMetrics> {
        self.metrics.clone()
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The served model's config (the new one after a swap): what an
    /// adapter must fit.
    pub fn served_config(&self) -> Gpt2Config {
        self.served.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn check(&self, request: &GenerationRequest) -> Result<(), PoolError> {
        let invalid = |m: String| Err(PoolError::Invalid(m));
        request.params.validate().map_err(|e| PoolError::Invalid(e.to_string()))?;
        if request.prompt_ids.is_empty() {
            return invalid("empty prompt".into());
        }
        if request.n_candidates == 0 || request.n_candidates > self.config.max_candidates {
            return invalid(format!("n_candidates must be 1..={}, not {}", self.config.max_candidates, request.n_candidates));
        }
        if request.n_candidates > self.config.max_batch {
            return invalid(format!("{} candidates do not fit a batch of {}", request.n_candidates, self.config.max_batch));
        }
        if request.prompt_ids.len() >= self.n_positions {
            return invalid(format!(
                "prompt of {} tokens leaves no room to reply in a context of {}",
                request.prompt_ids.len(),
                self.n_positions
            ));
        }
        if let Some(&bad) = request.prompt_ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return invalid(format!("token id {bad} is outside the vocabulary of {}", self.vocab_size));
        }
        if let Some(adapter) = &request.adapter {
            let served = self.served.read().unwrap_or_else(|e| e.into_inner());
            adapter.check_fits(&served).map_err(|e| PoolError::Invalid(e.to_string()))?;
        }
        Ok(())
    }
}

/// A running pool: the handle to submit with, and the engine thread.
pub struct GenerationPool {
    handle: PoolHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GenerationPool {
    /// Starts an engine thread that owns `model`.
    pub fn start(model: Gpt2, config: PoolConfig) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let metrics = Arc::new(PoolMetrics::default());
        let served = Arc::new(RwLock::new(model.config().clone()));
        let handle = PoolHandle {
            tx,
            metrics: metrics.clone(),
            config: config.clone(),
            n_positions: model.config().n_positions,
            vocab_size: model.config().vocab_size,
            served: served.clone(),
        };
        // The engine loop runs on a worker of its own rayon pool (as many
        // threads as the global one), so the thread that steps the model
        // also takes a share of each step's parallel work instead of
        // sleeping beside the workers and competing with them for the cores
        // during the step's serial parts.
        let threads = rayon::current_num_threads();
        let workers = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("dialogd-engine-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        let thread = std::thread::Builder::new()
            .name("dialogd-engine".into())
            .spawn(move || workers.install(move || engine::Engine::new(model, config, metrics, served).run(rx)))?;
        Ok(Self { handle, thread: Some(thread) })
    }

    pub fn handle(&self) -> PoolHandle {
        self.handle.clone()
    }

    /// Stops taking requests, lets the engine finish what it holds, and
    /// waits for its thread. Other handles still alive keep it open until
    /// they are dropped.
    pub fn shutdown(mut self) {
        let thread = self.thread.take();
        drop(self);
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}
