//! The engine thread: admit, prefill, step every active sequence, answer.
//!
//! Backpressure: a job is taken off the bounded queue only when its
//! candidates fit in the batch, so at most one job waits outside the queue
//! and a full queue refuses new work at once. Failures are contained: a
//! request whose prefill or sampling fails (or panics) is answered with an
//! error and leaves; a failed batched step is retried one request at a time
//! so that only the request at fault fails.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{Candidate, GenerationRequest, GenerationResult, Job, PoolConfig, PoolError, PoolMetrics, Swap, Work};
use crate::generate::FinishReason;
use crate::model::gpt2::SeqCache;
use crate::model::{Gpt2, Gpt2Config, LoraRuntime, ModelError};
use crate::sampling::Sampler;

/// One candidate being generated.
struct Seq {
    cache: SeqCache,
    /// Prompt and reply so far (repetition penalty and n-gram bans see both).
    history: Vec<u32>,
    output: Vec<u32>,
    sampler: Sampler,
    /// The id to feed at the next step.
    next: u32,
    finish: Option<FinishReason>,
    logprob: f32,
}

/// One admitted request.
struct Active {
    request: GenerationRequest,
    seqs: Vec<Seq>,
    reply: Option<tokio::sync::oneshot::Sender<Result<GenerationResult, PoolError>>>,
    submitted: Instant,
    ttft: Duration,
    /// Tokens sampled for this request so far (for the fault hook).
    sampled: usize,
}

impl Active {
    fn unfinished(&self) -> usize {
        self.seqs.iter().filter(|s| s.finish.is_none()).count()
    }

    fn cancelled(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| r.is_closed())
    }

    fn fail(&mut self, metrics: &PoolMetrics, why: String) {
        tracing::warn!(error = %why, "generation request failed");
        metrics.failed();
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(Err(PoolError::Failed(why)));
        }
    }
}

pub(crate) struct Engine {
    model: Gpt2,
    config: PoolConfig,
    metrics: Arc<PoolMetrics>,
    eos: u32,
    /// The served model's config as the handles see it (updated on a swap).
    served: Arc<RwLock<Gpt2Config>>,
}

impl Engine {
    pub fn new(model: Gpt2, config: PoolConfig, metrics: Arc<PoolMetrics>, served: Arc<RwLock<Gpt2Config>>) -> Self {
        let eos = model.config().eos_token_id;
        Self { model, config, metrics, eos, served }
    }

    /// Serves until every handle is dropped and the last request answered.
    pub fn run(mut self, mut rx: mpsc::Receiver<Work>) {
        let mut active: Vec<Active> = Vec::new();
        let mut pending: Option<Work> = None;
        let mut open = true;
        let mut version = 0u64;
        loop {
            // Take work: block only when there is nothing else to do.
            if open && active.is_empty() && pending.is_none() {
                match rx.blocking_recv() {
                    Some(work) => pending = Some(work),
                    None => open = false,
                }
            }
            loop {
                if pending.is_none() && open {
                    match rx.try_recv() {
                        Ok(work) => pending = Some(work),
                        Err(mpsc::error::TryRecvError::Empty) => {}
                        Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                    }
                }
                let job = match pending.take() {
                    None => break,
                    Some(Work::Swap(swap)) if active.is_empty() => {
                        version += 1;
                        self.swap(swap, version);
                        continue;
                    }
                    Some(swap @ Work::Swap(_)) => {
                        // Let the batch drain on the old model; admit nothing.
                        pending = Some(swap);
                        break;
                    }
                    Some(Work::Job(job)) => job,
                };
                if job.reply.is_closed() {
                    self.metrics.dequeued();
                    self.metrics.cancelled();
                    continue;
                }
                let in_batch: usize = active.iter().map(Active::unfinished).sum();
                if in_batch + job.request.n_candidates > self.config.max_batch {
                    pending = Some(Work::Job(job));
                    break;
                }
                self.metrics.dequeued();
                if let Some(admitted) = self.admit(job) {
                    active.push(admitted);
                }
            }
            if active.is_empty() {
                if !open && pending.is_none() {
                    return;
                }
                continue;
            }
            self.step(&mut active);
            self.finish(&mut active);
        }
    }

    /// Replaces the model (the batch is empty).
    fn swap(&mut self, swap: Swap, version: u64) {
        let Swap { model, done } = swap;
        self.eos = model.config().eos_token_id;
        *self.served.write().unwrap_or_else(|e| e.into_inner()) = model.config().clone();
        self.model = model;
        self.metrics.swapped(version);
        tracing::info!(version, "generation pool now serves the new model");
        let _ = done.send(Ok(version));
    }

    /// Prefills a request once and forks its cache per candidate.
    fn admit(&self, job: Job) -> Option<Active> {
        let Job { request, submitted, reply } = job;
        let mut active = Active { request, seqs: Vec::new(), reply: Some(reply), submitted, ttft: Duration::ZERO, sampled: 0 };
        let result = catch_unwind(AssertUnwindSafe(|| self.prefill(&mut active)));
        match result {
            Ok(Ok(())) => {
                active.ttft = active.submitted.elapsed();
                self.metrics.first_token(active.ttft);
                Some(active)
            }
            Ok(Err(e)) => {
                active.fail(&self.metrics, e.to_string());
                None
            }
            Err(_) => {
                active.fail(&self.metrics, "prefill panicked".into());
                None
            }
        }
    }

    fn prefill(&self, active: &mut Active) -> Result<(), ModelError> {
        let request = &active.request;
        let prompt = &request.prompt_ids;
        let n_positions = self.model.config().n_positions;
        let capacity = (prompt.len() + request.params.max_new_tokens).min(n_positions);
        let mut cache = self.model.new_seq_cache(capacity)?;
        // The adapter was checked against the model at submission; the
        // forward pass checks again (a swap may have come in between).
        let logits = self.model.forward_seqs_with(&[prompt], &mut [&mut cache], &[request.adapter.as_deref()])?;
        self.metrics.prefilled(prompt.len());
        let row: Vec<f32> = logits.get(0)?.to_vec1()?;
        let n = request.n_candidates;
        let mut caches = Vec::with_capacity(n);
        for _ in 1..n {
            caches.push(cache.fork()?);
        }
        caches.push(cache);
        for (i, cache) in caches.into_iter().enumerate() {
            let mut params = request.params.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
            active.seqs.push(Seq {
                cache,
                history: prompt.clone(),
                output: Vec::new(),
                sampler: Sampler::new(params, self.eos),
                next: self.eos,
                finish: None,
                logprob: 0.0,
            });
        }
        for i in 0..active.seqs.len() {
            self.sample_into(active, i, row.clone())?;
        }
        Ok(())
    }

    /// Draws the next id of one candidate from its logits row.
    fn sample_into(&self, active: &mut Active, seq_idx: usize, mut row: Vec<f32>) -> Result<(), ModelError> {
        if active.request.fault_at_token == Some(active.sampled) {
            panic!("injected fault at token {}", active.sampled);
        }
        active.sampled += 1;
        let ignore_eos = active.request.ignore_eos;
        let max_new = active.request.params.max_new_tokens;
        let seq = &mut active.seqs[seq_idx];
        let lse = log_sum_exp(&row);
        let raw = row.clone();
        if ignore_eos {
            if let Some(l) = row.get_mut(self.eos as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let id = seq.sampler.next_token(&mut row, &seq.history, seq.output.len());
        if id == self.eos {
            seq.finish = Some(FinishReason::EndOfText);
            return Ok(());
        }
        seq.logprob += raw.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY) - lse;
        seq.output.push(id);
        seq.history.push(id);
        seq.next = id;
        self.metrics.tokens(1);
        if seq.output.len() >= max_new {
            seq.finish = Some(FinishReason::MaxTokens);
        } else if seq.history.len() >= self.model.config().n_positions {
            seq.finish = Some(FinishReason::ContextFull);
        }
        Ok(())
    }

    /// One decode step over every unfinished candidate of every request.
    fn step(&self, active: &mut [Active]) {
        for a in active.iter_mut().filter(|a| a.reply.is_some() && a.cancelled()) {
            self.metrics.cancelled();
            a.reply = None;
        }
        let started = Instant::now();
        let all: Vec<usize> = (0..active.len()).filter(|&i| active[i].reply.is_some() && active[i].unfinished() > 0).collect();
        if all.is_empty() {
            return;
        }
        match self.forward(active, &all) {
            Ok(rows) => self.sample_rows(active, &all, rows),
            Err(why) if all.len() > 1 => {
                // Find the request at fault: retry each on its own.
                tracing::warn!(error = %why, "batched step failed; retrying requests one at a time");
                for &i in &all {
                    match self.forward(active, &[i]) {
                        Ok(rows) => self.sample_rows(active, &[i], rows),
                        Err(why) => active[i].fail(&self.metrics, why),
                    }
                }
            }
            Err(why) => active[all[0]].fail(&self.metrics, why),
        }
        self.metrics.step(started.elapsed());
    }

    /// Runs the unfinished candidates of the given requests; one logits row
    /// each, in order.
    fn forward(&self, active: &mut [Active], which: &[usize]) -> Result<Vec<Vec<f32>>, String> {
        let mut tokens: Vec<[u32; 1]> = Vec::new();
        let mut caches: Vec<&mut SeqCache> = Vec::new();
        // Each candidate's adapter (its request's); empty when no request
        // in the step has one, so a plain batch pays nothing.
        let mut adapters: Vec<Option<&LoraRuntime>> = Vec::new();
        let mut chosen = which.iter().peekable();
        for (i, a) in active.iter_mut().enumerate() {
            if chosen.peek() != Some(&&i) {
                continue;
            }
            chosen.next();
            let adapter = a.request.adapter.as_deref();
            for seq in a.seqs.iter_mut().filter(|s| s.finish.is_none()) {
                tokens.push([seq.next]);
                caches.push(&mut seq.cache);
                adapters.push(adapter);
            }
        }
        if adapters.iter().all(Option::is_none) {
            adapters.clear();
        }
        let token_refs: Vec<&[u32]> = tokens.iter().map(|t| t.as_slice()).collect();
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Vec<f32>>, ModelError> {
            Ok(self.model.forward_seqs_with(&token_refs, &mut caches, &adapters)?.to_vec2()?)
        }));
        match result {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("decode step panicked".into()),
        }
    }

    fn sample_rows(&self, active: &mut [Active], which: &[usize], rows: Vec<Vec<f32>>) {
        let mut rows = rows.into_iter();
        for &i in which {
            let a = &mut active[i];
            let seq_ids: Vec<usize> = (0..a.seqs.len()).filter(|&s| a.seqs[s].finish.is_none()).collect();
            let mut failure = None;
            for s in seq_ids {
                let Some(row) = rows.next() else { return };
                if failure.is_some() {
                    continue;
                }
                match catch_unwind(AssertUnwindSafe(|| self.sample_into(a, s, row))) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failure = Some(e.to_string()),
                    Err(_) => failure = Some("sampling panicked".into()),
                }
            }
            if let Some(why) = failure {
                a.fail(&self.metrics, why);
            }
        }
    }

    /// Answers finished requests and drops failed or cancelled ones. The
    /// metrics are updated before the answers go out, so a caller that sees
    /// its answer sees counters that include it.
    fn finish(&self, active: &mut Vec<Active>) {
        let mut done = Vec::new();
        let mut i = 0;
        while i < active.len() {
            if active[i].reply.is_none() {
                active.swap_remove(i);
            } else if active[i].unfinished() == 0 {
                done.push(active.swap_remove(i));
            } else {
                i += 1;
            }
        }
        self.metrics.set_active(active.iter().map(Active::unfinished).sum());
        for mut a in done {
            let candidates = a
                .seqs
                .iter_mut()
                .map(|s| Candidate {
                    output_ids: std::mem::take(&mut s.output),
                    finish: s.finish.unwrap_or(FinishReason::MaxTokens),
                    logprob: s.logprob,
                })
                .collect();
            let result = GenerationResult { candidates, time_to_first_token: a.ttft, total: a.submitted.elapsed() };
            self.metrics.completed();
            if let Some(reply) = a.reply.take() {
                let _ = reply.send(Ok(result));
            }
        }
    }
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
    max + sum.ln()
}
