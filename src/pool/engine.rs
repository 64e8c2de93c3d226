//! The engine thread: admit, step every sequence, answer.
//!
//! Each turn of the loop takes the jobs that fit off the queue and runs one
//! step: a single forward pass over the next token of every unfinished
//! candidate *and* the prompts of the requests awaiting their prefill, so
//! the matrix products see all those rows at once and a new request whose
//! prompt fits the step has its first token at the end of the step that
//! admits it. Prompts share a budget of `max_prefill_tokens` per step, and
//! a prompt longer than what is left of it is prefilled in chunks over
//! several steps (chunked prefill, as vLLM and TGI schedule it): a step
//! never carries more prompt tokens than the budget, so one long prompt
//! delays the sequences decoding beside it by at most a budget's worth of
//! work per token instead of its whole length. A prompt is run once (its
//! chunks continue one cache); that cache is then forked per candidate. The step's rows are then
//! sampled in parallel: each candidate owns its sampler, and each row is
//! drawn by one thread in a fixed order, so the results do not depend on
//! the number of threads.
//!
//! Backpressure: a job is taken off the bounded queue only when its
//! candidates fit in the batch and some of the step's prompt-token budget
//! is left (prompts already admitted take theirs first, in arrival order),
//! so at most one job waits outside the queue and a full queue refuses new
//! work at once. Failures are contained: a request whose sampling fails
//! (or panics) is answered with an error and leaves; a failed step is
//! retried one request at a time (each one's decode rows, or its prompt)
//! so that only the request at fault fails.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::mpsc;

use super::{Candidate, GenerationRequest, GenerationResult, Job, PoolConfig, PoolError, PoolMetrics, Swap, Work};
use crate::generate::FinishReason;
use crate::model::gpt2::SeqCache;
use crate::model::kernels::exp_approx;
use crate::model::{Gpt2, Gpt2Config, LoraRuntime, ModelError};
use crate::sampling::Sampler;

#[cfg(test)]
mod tests;

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
    /// The copy of its logits row that the sampler's processors change (the
    /// model's row stays as it was, for the log-probability); kept from one
    /// draw to the next so that a draw allocates nothing.
    scratch: Vec<f32>,
}

/// One admitted request.
struct Active {
    request: GenerationRequest,
    /// The prompt's cache, from admission until the step that feeds the
    /// prompt's last chunk; after that each candidate in `seqs` holds a
    /// fork of it.
    prompt_cache: Option<SeqCache>,
    /// Prompt tokens already in `prompt_cache`.
    prefilled: usize,
    /// Prompt tokens this step feeds (0: none this step), set by `admit`.
    chunk: usize,
    seqs: Vec<Seq>,
    reply: Option<tokio::sync::oneshot::Sender<Result<GenerationResult, PoolError>>>,
    submitted: Instant,
    ttft: Duration,
    /// When the last step that drew this request's tokens ended.
    last_draw: Option<Instant>,
    /// The longest wait between two such steps so far.
    longest_gap: Duration,
    /// Tokens drawn for this request so far (for the fault hook).
    sampled: usize,
}

impl Active {
    /// Admitted, but its prompt has not run yet.
    fn awaiting_prefill(&self) -> bool {
        self.prompt_cache.is_some()
    }

    fn unfinished(&self) -> usize {
        self.seqs.iter().filter(|s| s.finish.is_none()).count()
    }

    /// Places it takes in the batch: every candidate until the prefill,
    /// then its unfinished ones.
    fn in_batch(&self) -> usize {
        if self.awaiting_prefill() {
            self.request.n_candidates
        } else {
            self.unfinished()
        }
    }

    /// Has rows in the next step.
    fn runs(&self) -> bool {
        self.reply.is_some() && if self.awaiting_prefill() { self.chunk > 0 } else { self.unfinished() > 0 }
    }

    /// Prompt tokens still to feed.
    fn prompt_left(&self) -> usize {
        if self.awaiting_prefill() {
            self.request.prompt_ids.len() - self.prefilled
        } else {
            0
        }
    }

    /// Every cache holds exactly what was fed before this step: the chunks
    /// already run for a prompt, and all but the last drawn id for a
    /// candidate. A failed forward pass that left this true can be retried.
    fn caches_unmoved(&self) -> bool {
        self.prompt_cache.as_ref().is_none_or(|c| c.len() == self.prefilled)
            && self.seqs.iter().filter(|s| s.finish.is_none()).all(|s| s.cache.len() + 1 == s.history.len())
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

/// What the loop carries from one turn to the next.
struct State {
    /// Admitted requests.
    active: Vec<Active>,
    /// Work taken off the queue that cannot start yet: a job that does not
    /// fit this step, or a swap waiting for the batch to drain.
    pending: Option<Work>,
    /// False once every handle is gone.
    open: bool,
    /// The served model's version: 0, then one more per swap.
    version: u64,
}

impl Default for State {
    fn default() -> Self {
        Self { active: Vec::new(), pending: None, open: true, version: 0 }
    }
}

/// A step's logits: one row of `vocab` values per sequence, in the order
/// the step fed them.
struct Rows {
    data: Vec<f32>,
    vocab: usize,
}

impl Rows {
    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.vocab..(r + 1) * self.vocab]
    }
}

/// One candidate's draw in a step.
struct Draw<'a> {
    seq: &'a mut Seq,
    request: &'a GenerationRequest,
    /// Its logits row, as the model gave it.
    row: &'a [f32],
    /// Which of its request's draws this is (the fault hook counts them).
    draw_idx: usize,
}

impl Draw<'_> {
    /// Draws the candidate's next id; true when that is a new token (not
    /// the end of the reply).
    fn run(self, eos: u32, n_positions: usize) -> bool {
        let Draw { seq, request, row, draw_idx } = self;
        if request.fault_at_token == Some(draw_idx) {
            panic!("injected fault at token {draw_idx}");
        }
        seq.scratch.clear();
        seq.scratch.extend_from_slice(row);
        if request.ignore_eos {
            if let Some(l) = seq.scratch.get_mut(eos as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let id = seq.sampler.next_token(&mut seq.scratch, &seq.history, seq.output.len());
        if id == eos {
            seq.finish = Some(FinishReason::EndOfText);
            return false;
        }
        seq.logprob += row.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY) - log_sum_exp(row);
        seq.output.push(id);
        seq.history.push(id);
        seq.next = id;
        if seq.output.len() >= request.params.max_new_tokens {
            seq.finish = Some(FinishReason::MaxTokens);
        } else if seq.history.len() >= n_positions {
            seq.finish = Some(FinishReason::ContextFull);
        }
        true
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
        let mut state = State::default();
        while self.turn(&mut state, &mut rx) {}
    }

    /// One turn of the loop: wait for work if there is nothing else to do,
    /// admit what fits, run one step, answer what finished. False once the
    /// queue is closed and everything taken from it has been answered.
    fn turn(&mut self, state: &mut State, rx: &mut mpsc::Receiver<Work>) -> bool {
        if state.open && state.active.is_empty() && state.pending.is_none() {
            match rx.blocking_recv() {
                Some(work) => state.pending = Some(work),
                None => state.open = false,
            }
        }
        self.admit(state, rx);
        if state.active.is_empty() {
            return state.open || state.pending.is_some();
        }
        self.step(&mut state.active);
        self.finish(&mut state.active);
        true
    }

    /// Shares this step's prompt budget out: first to the prompts admitted
    /// earlier and not yet fed whole (in arrival order), then to jobs taken
    /// off the queue while their candidates fit in the batch and some
    /// budget is left. Swaps the model when a swap reaches the front with
    /// the batch empty.
    fn admit(&mut self, state: &mut State, rx: &mut mpsc::Receiver<Work>) {
        let budget = self.config.max_prefill_tokens.max(1);
        let mut prompt_tokens = 0;
        for a in state.active.iter_mut() {
            a.chunk = a.prompt_left().min(budget - prompt_tokens);
            prompt_tokens += a.chunk;
        }
        loop {
            if state.pending.is_none() && state.open {
                match rx.try_recv() {
                    Ok(work) => state.pending = Some(work),
                    Err(mpsc::error::TryRecvError::Empty) => {}
                    Err(mpsc::error::TryRecvError::Disconnected) => state.open = false,
                }
            }
            let job = match state.pending.take() {
                None => break,
                Some(Work::Swap(swap)) if state.active.is_empty() => {
                    state.version += 1;
                    self.swap(swap, state.version);
                    continue;
                }
                Some(swap @ Work::Swap(_)) => {
                    // Let the batch drain on the old model; admit nothing.
                    state.pending = Some(swap);
                    break;
                }
                Some(Work::Job(job)) => job,
            };
            if job.reply.is_closed() {
                self.metrics.dequeued();
                self.metrics.cancelled();
                continue;
            }
            let in_batch: usize = state.active.iter().map(Active::in_batch).sum();
            if in_batch + job.request.n_candidates > self.config.max_batch || prompt_tokens >= budget {
                state.pending = Some(Work::Job(job));
                break;
            }
            self.metrics.dequeued();
            if let Some(mut admitted) = self.start(job) {
                admitted.chunk = admitted.request.prompt_ids.len().min(budget - prompt_tokens);
                prompt_tokens += admitted.chunk;
                state.active.push(admitted);
            }
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

    /// A job taken off the queue, with its prompt's cache, ready for the
    /// next step.
    fn start(&self, job: Job) -> Option<Active> {
        let Job { request, submitted, reply } = job;
        let n_positions = self.model.config().n_positions;
        let capacity = (request.prompt_ids.len() + request.params.max_new_tokens).min(n_positions);
        let mut active = Active {
            request,
            prompt_cache: None,
            prefilled: 0,
            chunk: 0,
            seqs: Vec::new(),
            reply: Some(reply),
            submitted,
            ttft: Duration::ZERO,
            last_draw: None,
            longest_gap: Duration::ZERO,
            sampled: 0,
        };
        // `PoolHandle::check` refuses an empty prompt before it is queued;
        // one here would never be fed and so never answered.
        if active.request.prompt_ids.is_empty() {
            active.fail(&self.metrics, "empty prompt".into());
            return None;
        }
        match catch_unwind(AssertUnwindSafe(|| self.model.new_seq_cache(capacity))) {
            Ok(Ok(cache)) => {
                active.prompt_cache = Some(cache);
                Some(active)
            }
            Ok(Err(e)) => {
                active.fail(&self.metrics, e.to_string());
                None
            }
            Err(_) => {
                active.fail(&self.metrics, "allocating the prompt's cache panicked".into());
                None
            }
        }
    }

    /// One step: a forward pass over the prompt of every request admitted
    /// this turn and the next token of every unfinished candidate, then a
    /// draw for each candidate.
    fn step(&self, active: &mut [Active]) {
        for a in active.iter_mut().filter(|a| a.reply.is_some() && a.cancelled()) {
            self.metrics.cancelled();
            a.reply = None;
        }
        let started = Instant::now();
        let all: Vec<usize> = (0..active.len()).filter(|&i| active[i].runs()).collect();
        if all.is_empty() {
            return;
        }
        match self.forward(active, &all) {
            Ok(rows) => self.sample_rows(active, &all, &rows),
            Err(why) if all.len() > 1 => {
                // Find the request at fault: retry each on its own.
                tracing::warn!(error = %why, "batched step failed; retrying requests one at a time");
                for &i in &all {
                    if !active[i].caches_unmoved() {
                        // The failed pass wrote this request's caches on;
                        // feeding the same ids again would be wrong.
                        active[i].fail(&self.metrics, format!("{why} (after its cache had moved on)"));
                        continue;
                    }
                    match self.forward(active, &[i]) {
                        Ok(rows) => self.sample_rows(active, &[i], &rows),
                        Err(why) => active[i].fail(&self.metrics, why),
                    }
                }
            }
            Err(why) => active[all[0]].fail(&self.metrics, why),
        }
        self.metrics.step(started.elapsed());
    }

    /// Runs one forward pass over the given requests (indices in ascending
    /// order): this step's chunk of the prompt of each that awaits its
    /// prefill, the next id of each unfinished candidate of the others. One
    /// logits row per sequence, in that order.
    fn forward(&self, active: &mut [Active], which: &[usize]) -> Result<Rows, String> {
        let mut tokens: Vec<&[u32]> = Vec::new();
        let mut caches: Vec<&mut SeqCache> = Vec::new();
        // Each sequence's adapter (its request's); empty when no request
        // in the step has one, so a plain batch pays nothing.
        let mut adapters: Vec<Option<&LoraRuntime>> = Vec::new();
        for a in chosen(active, which) {
            let Active { request, prompt_cache, seqs, prefilled, chunk, .. } = a;
            let request: &GenerationRequest = request;
            let adapter = request.adapter.as_deref();
            if let Some(cache) = prompt_cache {
                let chunk = &request.prompt_ids[*prefilled..*prefilled + *chunk];
                tokens.push(if request.fault_in_prefill { &[u32::MAX] } else { chunk });
                caches.push(cache);
                adapters.push(adapter);
                continue;
            }
            for seq in seqs.iter_mut().filter(|s| s.finish.is_none()) {
                let Seq { next, cache, .. } = seq;
                let next: &u32 = next;
                tokens.push(std::slice::from_ref(next));
                caches.push(cache);
                adapters.push(adapter);
            }
        }
        if adapters.iter().all(Option::is_none) {
            adapters.clear();
        }
        let n_rows = tokens.len();
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<Rows, ModelError> {
            let logits = self.model.forward_seqs_with(&tokens, &mut caches, &adapters)?;
            let (rows, vocab) = logits.dims2()?;
            if rows != n_rows {
                return Err(ModelError::Input(format!("the forward pass gave {rows} rows of logits for {n_rows} sequences")));
            }
            Ok(Rows { data: logits.flatten_all()?.to_vec1()?, vocab })
        }));
        match result {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("forward pass panicked".into()),
        }
    }

    /// Draws the next id of every unfinished candidate of the given
    /// requests from `rows` (in [`Engine::forward`]'s order). A request
    /// whose prompt's last chunk ran in this step first forks its prompt's
    /// cache per candidate; all its candidates draw from its one row, and
    /// its first token is out when the draws end; one with chunks still to
    /// run draws nothing. Draws run in parallel.
    fn sample_rows(&self, active: &mut [Active], which: &[usize], rows: &Rows) {
        let mut requests = chosen(active, which);
        // Each request's first row, and whether this step prefilled it.
        let mut first_rows = Vec::with_capacity(requests.len());
        let mut next_row = 0;
        for a in requests.iter_mut() {
            if a.awaiting_prefill() {
                a.prefilled += a.chunk;
                self.metrics.prefilled(a.chunk);
                a.chunk = 0;
            }
            if a.prompt_left() > 0 {
                // More chunks to come: its row is not a next-token row.
                first_rows.push((next_row, false));
                next_row += 1;
                continue;
            }
            match a.prompt_cache.take() {
                Some(cache) => {
                    first_rows.push((next_row, true));
                    next_row += 1;
                    match catch_unwind(AssertUnwindSafe(|| self.fork_candidates(a, cache))) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => a.fail(&self.metrics, e.to_string()),
                        Err(_) => a.fail(&self.metrics, "forking the prompt's cache panicked".into()),
                    }
                }
                None => {
                    first_rows.push((next_row, false));
                    next_row += a.unfinished();
                }
            }
        }

        let mut draws = Vec::new();
        // The request (index into `requests`) of each draw.
        let mut owners = Vec::new();
        let mut drew = vec![false; requests.len()];
        for (r, (a, &(first_row, prefilled))) in requests.iter_mut().zip(&first_rows).enumerate() {
            if a.reply.is_none() {
                continue;
            }
            let Active { request, seqs, sampled, .. } = &mut **a;
            let request: &GenerationRequest = request;
            let mut k = 0;
            for seq in seqs.iter_mut().filter(|s| s.finish.is_none()) {
                let row = rows.row(if prefilled { first_row } else { first_row + k });
                draws.push(Draw { seq, request, row, draw_idx: *sampled + k });
                owners.push(r);
                k += 1;
            }
            drew[r] = k > 0;
            *sampled += k;
        }
        let (eos, n_positions) = (self.eos, self.model.config().n_positions);
        let outcomes: Vec<Option<bool>> =
            draws.into_par_iter().map(|draw| catch_unwind(AssertUnwindSafe(|| draw.run(eos, n_positions))).ok()).collect();

        let mut failed = vec![false; requests.len()];
        let mut tokens = 0;
        for (&r, outcome) in owners.iter().zip(&outcomes) {
            match outcome {
                Some(new_token) => tokens += usize::from(*new_token),
                None => failed[r] = true,
            }
        }
        self.metrics.tokens(tokens);
        let now = Instant::now();
        for (((a, &(_, prefilled)), failed), drew) in requests.iter_mut().zip(&first_rows).zip(failed).zip(drew) {
            if failed {
                a.fail(&self.metrics, "sampling panicked".into());
                continue;
            }
            if prefilled && a.reply.is_some() {
                a.ttft = a.submitted.elapsed();
                self.metrics.first_token(a.ttft);
            }
            if drew {
                if let Some(last) = a.last_draw {
                    a.longest_gap = a.longest_gap.max(now - last);
                }
                a.last_draw = Some(now);
            }
        }
    }

    /// Gives a request one candidate per `n_candidates`, each with its own
    /// fork of the prefilled prompt's cache and its own seed.
    fn fork_candidates(&self, active: &mut Active, cache: SeqCache) -> Result<(), ModelError> {
        let request = &active.request;
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
                history: request.prompt_ids.clone(),
                output: Vec::new(),
                sampler: Sampler::new(params, self.eos),
                next: self.eos,
                finish: None,
                logprob: 0.0,
                scratch: Vec::new(),
            });
        }
        Ok(())
    }

    /// Answers finished requests and drops failed or cancelled ones. The
    /// metrics are updated before the answers go out, so a caller that sees
    /// its answer sees counters that include it.
    fn finish(&self, active: &mut Vec<Active>) {
        let mut done = Vec::new();
        let mut i = 0;
        while i < active.len() {
            // `remove`, not `swap_remove`: the order is the arrival order,
            // in which prompts take the step's budget.
            if active[i].reply.is_none() {
                active.remove(i);
            } else if !active[i].awaiting_prefill() && active[i].unfinished() == 0 {
                done.push(active.remove(i));
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
            let result = GenerationResult {
                candidates,
                time_to_first_token: a.ttft,
                total: a.submitted.elapsed(),
                longest_token_gap: a.longest_gap,
            };
            self.metrics.completed();
            if let Some(reply) = a.reply.take() {
                let _ = reply.send(Ok(result));
            }
        }
    }
}

/// The requests at the given indices (ascending), borrowed together.
fn chosen<'a>(active: &'a mut [Active], which: &[usize]) -> Vec<&'a mut Active> {
    let mut which = which.iter().peekable();
    active
        .iter_mut()
        .enumerate()
        .filter_map(|(i, a)| {
            (which.peek() == Some(&&i)).then(|| {
                which.next();
                a
            })
        })
        .collect()
}

/// `ln Σ exp(row)`, the normaliser of a row's log-probabilities.
///
/// One pass for the maximum and one for the sum, each over 16 lanes that
/// take every 16th value, folded in a fixed order: the compiler turns the
/// lanes into vector registers (AVX2 where the CPU has it, chosen at run
/// time), and since the arithmetic per lane is the same either way, the
/// same row always gives the same bits. NaN in the row gives NaN; a row
/// with no finite maximum gives that maximum, as `f32::max` finds it.
fn log_sum_exp(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked above).
            return unsafe { log_sum_exp_avx2(row) };
        }
    }
    log_sum_exp_portable(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn log_sum_exp_avx2(row: &[f32]) -> f32 {
    log_sum_exp_portable(row)
}

const LANES: usize = 16;

#[inline(always)]
fn log_sum_exp_portable(row: &[f32]) -> f32 {
    let (chunks, rest) = row.as_chunks::<LANES>();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            // Not `f32::max`, whose NaN rule keeps this from vectorising;
            // a NaN never wins a `>`, so it is skipped here as there.
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if !max.is_finite() {
        return max;
    }
    let mut lanes = [0f32; LANES];
    for chunk in chunks {
        for (s, &v) in lanes.iter_mut().zip(chunk) {
            *s += exp_approx(v - max);
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    let sum = rest.iter().fold(lanes[0], |s, &v| s + exp_approx(v - max));
    max + sum.ln()
}

