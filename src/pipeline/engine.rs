//! The pipeline's one door to generation: the [`ReplyEngine`] trait, and
//! [`PoolEngine`], the generation pool behind it.
//!
//! The trait is kept small so the pipeline knows nothing of batching or
//! devices. Its contract:
//!
//! - `reply` returns at once with a future; model compute never runs on the
//!   caller's (tokio) thread.
//! - A full queue is an immediate [`EngineError::Busy`], never a wait.
//! - Dropping the future cancels the job: a queued job is skipped, a
//!   running one leaves the batch at the next step.
//! - The answer is the candidates' new ids, excluding `<|endoftext|>`.

use std::sync::Arc;
use std::time::Instant;

use dialogd_adapters::BoxFuture;

use crate::generate::FinishReason;
use crate::model::Gpt2;
use crate::personas::PersonaAdapter;
use crate::pool::{GenerationPool, GenerationRequest, PoolConfig, PoolError, PoolHandle};
use crate::sampling::SamplingParams;
use crate::settings::GenerationSettings;
use crate::telemetry::{Metrics, Refusal};

/// Generation failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The queue is full; the job was not taken.
    #[error("generation queue is full")]
    Busy,
    /// The engine has stopped (its thread ended).
    #[error("generation engine has stopped")]
    Stopped,
    /// This job failed (bad input, a model error, a panic); others go on.
    #[error("generation failed: {0}")]
    Failed(String),
}

/// One drawn reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    /// New ids, excluding `<|endoftext|>`.
    pub ids: Vec<u32>,
    /// The generator's summed log-probability of `ids`.
    pub logprob: f32,
    /// Whether it ended with `<|endoftext|>` (not cut off by
    /// `max_new_tokens` or the context size).
    pub finished: bool,
}

/// Generates replies. Implementations own their threads and queue.
pub trait ReplyEngine: Send + Sync + 'static {
    /// `n_candidates` replies (new ids, excluding `<|endoftext|>`) to a prompt
    /// that fits [`Self::n_positions`] with room for `params.max_new_tokens`.
    /// `adapter`: the persona's LoRA adapter, applied to this request only
    /// (a local pool applies its runtime; workers fetch its blob by id).
    fn reply(
        &self,
        prompt_ids: Vec<u32>,
        params: SamplingParams,
        n_candidates: usize,
        adapter: Option<PersonaAdapter>,
    ) -> BoxFuture<'static, Result<Vec<Drawn>, EngineError>>;
    /// The model's context size in tokens (prompt and reply together).
    fn n_positions(&self) -> usize;
}

/// The generation pool behind the trait: continuous batching across
/// channels, candidates drawn from one prefill.
pub struct PoolEngine {
    handle: PoolHandle,
    n_positions: usize,
    metrics: Arc<Metrics>,
}

impl PoolEngine {
    /// Starts the pool's engine thread, which owns `model`.
    pub fn start(model: Gpt2, generation: &GenerationSettings, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let n_positions = model.config().n_positions;
        let config = PoolConfig {
            max_batch: generation.max_batch,
            queue_capacity: generation.queue_depth,
            max_candidates: generation.candidates.max(1),
            max_prefill_tokens: generation.max_prefill_tokens,
        };
        let pool = GenerationPool::start(model, config)?;
        let handle = pool.handle();
        // The engine thread lives as long as a handle does; it is not joined.
        drop(pool);
        let _ = metrics.pool.set(handle.metrics_arc());
        Ok(Self { handle, n_positions, metrics })
    }

    pub fn handle(&self) -> &PoolHandle {
        &self.handle
    }
}

impl ReplyEngine for PoolEngine {
    fn reply(
        &self,
        prompt_ids: Vec<u32>,
        params: SamplingParams,
        n_candidates: usize,
        adapter: Option<PersonaAdapter>,
    ) -> BoxFuture<'static, Result<Vec<Drawn>, EngineError>> {
        let handle = self.handle.clone();
        let metrics = self.metrics.clone();
        let request =
            GenerationRequest { n_candidates, adapter: adapter.map(|a| a.runtime), ..GenerationRequest::new(prompt_ids, params) };
        Box::pin(async move {
            let started = Instant::now();
            let result = handle.generate(request).await;
            match result {
                Ok(result) => {
                    metrics.observe_generation(started.elapsed());
                    Ok(result
                        .candidates
                        .into_iter()
                        .map(|c| Drawn { ids: c.output_ids, logprob: c.logprob, finished: c.finish == FinishReason::EndOfText })
                        .collect())
                }
                Err(PoolError::Busy { .. }) => {
                    metrics.refused(Refusal::Busy);
                    Err(EngineError::Busy)
                }
                Err(PoolError::Closed) => Err(EngineError::Stopped),
                Err(e) => Err(EngineError::Failed(e.to_string())),
            }
        })
    }

    fn n_positions(&self) -> usize {
        self.n_positions
    }
}

/// Generation by `dialogd worker` processes through Redis Streams
/// (`[generation] backend = "redis"`; see [`crate::remote`]). The daemon
/// holds no model: `n_positions` comes from the checkpoint's config. A
/// persona's adapter goes as its blob id ([`crate::remote::blobs`]).
pub struct RemoteEngine {
    client: Arc<crate::remote::StreamClient>,
    n_positions: usize,
    metrics: Arc<Metrics>,
}

impl RemoteEngine {
    /// Wraps `client`; its counters show in `metrics`
    /// (`dialogd_generation_answers_dropped_total{reason}`).
    pub fn new(client: crate::remote::StreamClient, n_positions: usize, metrics: Arc<Metrics>) -> Self {
        let _ = metrics.remote.set(client.stats.clone());
        Self { client: Arc::new(client), n_positions, metrics }
    }
}

impl ReplyEngine for RemoteEngine {
    fn reply(
        &self,
        prompt_ids: Vec<u32>,
        params: SamplingParams,
        n_candidates: usize,
        adapter: Option<PersonaAdapter>,
    ) -> BoxFuture<'static, Result<Vec<Drawn>, EngineError>> {
        use crate::remote::RemoteError;
        let (client, metrics) = (self.client.clone(), self.metrics.clone());
        Box::pin(async move {
            // Workers get the adapter's blob id; one that could not be
            // stored fails here rather than answer with the base model
            // under a persona's name.
            let adapter = match adapter {
                None => None,
                Some(PersonaAdapter { blob: Some(id), .. }) => Some(id),
                Some(PersonaAdapter { blob: None, .. }) => {
                    return Err(EngineError::Failed("the persona's adapter is not stored in Redis for the workers (see the log)".into()))
                }
            };
            let started = Instant::now();
            let request = crate::remote::WireRequest { prompt_ids, params, n_candidates, adapter };
            match client.generate(&request).await {
                Ok(candidates) => {
                    metrics.observe_generation(started.elapsed());
                    Ok(candidates.into_iter().map(|c| Drawn { ids: c.ids, logprob: c.logprob, finished: c.finished }).collect())
                }
                Err(RemoteError::Busy(_)) => {
                    metrics.refused(Refusal::Busy);
                    Err(EngineError::Busy)
                }
                Err(e) => Err(EngineError::Failed(e.to_string())),
            }
        })
    }

    fn n_positions(&self) -> usize {
        self.n_positions
    }
}

/// A [`ReplyEngine`] that answers from a script, for tests of the pipeline
/// without a model: each `reply` call takes the next scripted round (its
/// candidates' ids and summed log-probabilities) and records the prompt it
/// was given. An exhausted script answers [`EngineError::Failed`].
#[derive(Debug, Default)]
pub struct ScriptedEngine {
    rounds: std::sync::Mutex<std::collections::VecDeque<Result<Vec<Drawn>, EngineError>>>,
    /// Every call's prompt ids and number of candidates asked for.
    pub calls: std::sync::Mutex<Vec<(Vec<u32>, usize)>>,
    /// The context size it claims.
    pub n_positions: usize,
}

impl ScriptedEngine {
    /// An engine with an empty script and a context of `n_positions`.
    pub fn new(n_positions: usize) -> Self {
        Self { n_positions, ..Self::default() }
    }

    /// Adds a round that answers these candidates.
    pub fn then(&self, candidates: Vec<Drawn>) -> &Self {
        self.rounds.lock().unwrap_or_else(|e| e.into_inner()).push_back(Ok(candidates));
        self
    }

    /// Adds a round that fails with `error`.
    pub fn then_fail(&self, error: EngineError) -> &Self {
        self.rounds.lock().unwrap_or_else(|e| e.into_inner()).push_back(Err(error));
        self
    }
}

impl ReplyEngine for ScriptedEngine {
    fn reply(
        &self,
        prompt_ids: Vec<u32>,
        _params: SamplingParams,
        n_candidates: usize,
        _adapter: Option<PersonaAdapter>,
    ) -> BoxFuture<'static, Result<Vec<Drawn>, EngineError>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).push((prompt_ids, n_candidates));
        let next = self.rounds.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
        Box::pin(async move { next.unwrap_or_else(|| Err(EngineError::Failed("the script has no more rounds".into()))) })
    }

    fn n_positions(&self) -> usize {
        self.n_positions
    }
}
