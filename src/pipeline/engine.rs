//! The pipeline's one door to generation: the [`ReplyEngine`] trait, and
//! [`ModelThread`], the interim engine behind it.
//!
//! The trait is kept small so the batching generation pool can replace
//! `ModelThread` without the pipeline changing. Its contract:
//!
//! - `reply` returns at once with a future; model compute never runs on the
//!   caller's (tokio) thread.
//! - A full queue is an immediate [`EngineError::Busy`], never a wait.
//! - Dropping the future cancels the job: a queued job is skipped, a
//!   running one stops at its next token.
//! - The answer is the reply's new ids, excluding `<|endoftext|>`.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use dialogd_adapters::BoxFuture;
use tokio::sync::oneshot;

use crate::generate::generate;
use crate::model::Gpt2;
use crate::sampling::SamplingParams;
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

/// Generates replies. Implementations own their threads and queue.
pub trait ReplyEngine: Send + Sync + 'static {
    /// One reply (new ids, excluding `<|endoftext|>`) to a prompt that fits
    /// [`Self::n_positions`] with room for `params.max_new_tokens`.
    fn reply(&self, prompt_ids: Vec<u32>, params: SamplingParams) -> BoxFuture<'static, Result<Vec<u32>, EngineError>>;
    /// The model's context size in tokens (prompt and reply together).
    fn n_positions(&self) -> usize;
}

/// One queued request.
struct Job {
    prompt_ids: Vec<u32>,
    params: SamplingParams,
    /// Closed when the caller dropped its future: the job is then skipped
    /// or stopped.
    answer: oneshot::Sender<Result<Vec<u32>, EngineError>>,
    queued_at: Instant,
}

/// The model on one dedicated OS thread, fed by a bounded queue; jobs run
/// one at a time in arrival order.
pub struct ModelThread {
    queue: mpsc::SyncSender<Job>,
    n_positions: usize,
    metrics: Arc<Metrics>,
}

impl ModelThread {
    /// Starts the thread. It ends when the `ModelThread` is dropped and the
    /// queue has drained.
    pub fn spawn(model: Gpt2, queue_depth: usize, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let n_positions = model.config().n_positions;
        let (queue, jobs) = mpsc::sync_channel::<Job>(queue_depth);
        let thread_metrics = metrics.clone();
        std::thread::Builder::new().name("dialogd-model".into()).spawn(move || {
            for job in jobs {
                thread_metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                run_job(&model, job, &thread_metrics);
            }
            tracing::debug!("model thread stopped");
        })?;
        Ok(Self { queue, n_positions, metrics })
    }
}

fn run_job(model: &Gpt2, job: Job, metrics: &Metrics) {
    let Job { prompt_ids, params, answer, queued_at } = job;
    if answer.is_closed() {
        return;
    }
    // A panic in one job must not end the thread that serves all of them.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        generate(model, &prompt_ids, &params, |_| !answer.is_closed())
    }));
    let result = match result {
        Ok(Ok(generation)) => Ok(generation.output_ids),
        Ok(Err(e)) => Err(EngineError::Failed(e.to_string())),
        Err(_) => Err(EngineError::Failed("generation panicked".into())),
    };
    metrics.observe_generation(queued_at.elapsed());
    let _ = answer.send(result);
}

impl ReplyEngine for ModelThread {
    fn reply(&self, prompt_ids: Vec<u32>, params: SamplingParams) -> BoxFuture<'static, Result<Vec<u32>, EngineError>> {
        let (answer, receiver) = oneshot::channel();
        let job = Job { prompt_ids, params, answer, queued_at: Instant::now() };
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        let sent = self.queue.try_send(job);
        if sent.is_err() {
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        }
        let metrics = self.metrics.clone();
        Box::pin(async move {
            match sent {
                Ok(()) => receiver.await.unwrap_or(Err(EngineError::Stopped)),
                Err(TrySendError::Full(_)) => {
                    metrics.refused(Refusal::Busy);
                    Err(EngineError::Busy)
                }
                Err(TrySendError::Disconnected(_)) => Err(EngineError::Stopped),
            }
        })
    }

    fn n_positions(&self) -> usize {
        self.n_positions
    }
}
