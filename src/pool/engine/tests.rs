//! The engine's turns driven one at a time, with the queue filled by hand
//! between them, so that what each step takes in and gives out is exact
//! (no threads racing the engine, no clocks).

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use candle_core::{DType, Device};
use tokio::sync::{mpsc, oneshot};

use super::{log_sum_exp, log_sum_exp_portable, Engine, State};
use crate::generate::generate;
use crate::model::Gpt2;
use crate::pool::{GenerationRequest, GenerationResult, Job, PoolConfig, PoolError, PoolMetrics, PoolMetricsSnapshot, Work};
use crate::sampling::SamplingParams;

type Answer = oneshot::Receiver<Result<GenerationResult, PoolError>>;

/// The committed `pico` checkpoint: the full vocabulary, 64 positions.
fn pico() -> Gpt2 {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join("pico-safetensors");
    Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap()
}

/// A prompt of `len` ordinary ids ending in the separator.
fn prompt(seed: u32, len: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (1..len as u32).map(|i| (seed * 7919 + i * 104_729) % 50_000).collect();
    ids.push(50256);
    ids
}

struct Harness {
    engine: Engine,
    state: State,
    tx: mpsc::Sender<Work>,
    rx: mpsc::Receiver<Work>,
    metrics: Arc<PoolMetrics>,
}

impl Harness {
    fn new(model: Gpt2, config: PoolConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let metrics = Arc::new(PoolMetrics::default());
        let served = Arc::new(RwLock::new(model.config().clone()));
        let engine = Engine::new(model, config, metrics.clone(), served);
        Self { engine, state: State::default(), tx, rx, metrics }
    }

    /// Queues a request as `PoolHandle::generate` would.
    fn submit(&self, request: GenerationRequest) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(Work::Job(Job { request, submitted: Instant::now(), reply })).unwrap_or_else(|_| panic!("queue full"));
        self.metrics.queued();
        answer
    }

    /// One turn of the engine (there must be work, or it would wait).
    fn turn(&mut self) -> PoolMetricsSnapshot {
        assert!(self.has_work(), "a turn with nothing to do would block");
        assert!(self.engine.turn(&mut self.state, &mut self.rx));
        self.metrics.snapshot()
    }

    fn has_work(&self) -> bool {
        !self.state.active.is_empty() || self.state.pending.is_some() || !self.rx.is_empty()
    }

    /// Turns until everything queued is answered.
    fn drain(&mut self) {
        while self.has_work() {
            self.turn();
        }
    }
}

fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> GenerationRequest {
    GenerationRequest::new(prompt, SamplingParams::greedy(max_new_tokens))
}

fn output(answer: &mut Answer) -> Vec<u32> {
    answer.try_recv().expect("answered").expect("succeeded").candidates.remove(0).output_ids
}

/// How many requests have had their first token.
fn first_tokens(m: &PoolMetricsSnapshot) -> u64 {
    *m.ttft_buckets.last().unwrap()
}

#[test]
fn prompts_admitted_together_run_in_one_step_and_answer_as_alone() {
    let model = pico();
    let prompts: Vec<Vec<u32>> = [5, 1, 12, 7].iter().enumerate().map(|(i, &len)| prompt(i as u32, len)).collect();
    let alone: Vec<Vec<u32>> =
        prompts.iter().map(|p| generate(&model, p, &SamplingParams::greedy(9), |_| true).unwrap().output_ids).collect();
    let mut h = Harness::new(model, PoolConfig::default());
    let mut answers: Vec<Answer> = prompts.iter().map(|p| h.submit(greedy(p.clone(), 9))).collect();
    let m = h.turn();
    // One step prefilled all four and drew each one's first token.
    assert_eq!((m.decode_steps, m.prefill_tokens, first_tokens(&m)), (1, 25, 4), "{m:?}");
    assert_eq!(m.queue_depth, 0);
    assert!(h.state.active.iter().all(|a| !a.awaiting_prefill()));
    h.drain();
    let batched: Vec<Vec<u32>> = answers.iter_mut().map(output).collect();
    assert_eq!(batched, alone);
    assert!(alone.iter().any(|o| o.len() > 1), "the replies must run past the prefill step to mean anything: {alone:?}");
}

#[test]
fn a_request_arriving_mid_decode_joins_the_next_step() {
    let mut h = Harness::new(pico(), PoolConfig::default());
    let long = GenerationRequest { ignore_eos: true, ..greedy(prompt(1, 6), 20) };
    let _a = h.submit(long.clone());
    for _ in 0..3 {
        h.turn();
    }
    let m = h.metrics.snapshot();
    assert_eq!((m.decode_steps, m.tokens_generated, first_tokens(&m)), (3, 3, 1));
    let _b = h.submit(GenerationRequest { prompt_ids: prompt(2, 9), ..long });
    let m = h.turn();
    // The fourth step carried the first request's fourth token and the
    // second request's whole prompt and first token.
    assert_eq!((m.decode_steps, m.tokens_generated, m.prefill_tokens, first_tokens(&m)), (4, 5, 15, 2), "{m:?}");
    assert_eq!(m.active_sequences, 2);
}

#[test]
fn the_prompt_budget_spreads_a_burst_over_steps_in_arrival_order() {
    let model = pico();
    let lens = [4, 4, 4, 12, 3];
    let prompts: Vec<Vec<u32>> = lens.iter().enumerate().map(|(i, &len)| prompt(i as u32, len)).collect();
    let alone: Vec<Vec<u32>> =
        prompts.iter().map(|p| generate(&model, p, &SamplingParams::greedy(6), |_| true).unwrap().output_ids).collect();
    let mut h = Harness::new(model, PoolConfig { max_prefill_tokens: 10, ..PoolConfig::default() });
    let mut answers: Vec<Answer> = prompts.iter().map(|p| h.submit(greedy(p.clone(), 6))).collect();
    let mut prefilled = Vec::new();
    let mut firsts = Vec::new();
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let m = h.turn();
        prefilled.push(m.prefill_tokens);
        firsts.push(first_tokens(&m));
        waiting.push(m.queue_depth);
    }
    // Every step fills its budget of 10 in arrival order: 4 + 4 + 2 of
    // the third; its last 2 + 8 of the 12; the 12's last 4 + 3.
    assert_eq!(prefilled, [10, 20, 27]);
    assert_eq!(firsts, [2, 3, 5]);
    assert_eq!(waiting, [2, 1, 0]);
    h.drain();
    let batched: Vec<Vec<u32>> = answers.iter_mut().map(output).collect();
    assert_eq!(batched, alone);
}

/// Chunked prefill: a prompt longer than the budget is fed a budget's
/// worth per step while another request goes on decoding beside it (one
/// token per step), and its reply is the one an unchunked run gives, to
/// the bit (same ids, same log-probabilities).
#[test]
fn a_long_prompt_is_prefilled_in_chunks_beside_decoding_sequences() {
    chunked_prefill_is_exact(pico());
    // With f16 caches (the CPU default) too: the earlier chunks' keys and
    // values come back from the f16 cache, and the bits still agree.
    chunked_prefill_is_exact(pico().with_kv_precision(crate::model::KvPrecision::F16).unwrap());
}

fn chunked_prefill_is_exact(model: Gpt2) {
    let long = prompt(3, 40);
    let request = |ids: Vec<u32>| GenerationRequest {
        n_candidates: 2,
        ..GenerationRequest::new(ids, SamplingParams { seed: Some(7), max_new_tokens: 8, ..Default::default() })
    };
    let whole = {
        let mut h = Harness::new(model.clone(), PoolConfig::default());
        let mut answer = h.submit(request(long.clone()));
        h.drain();
        answer.try_recv().unwrap().unwrap()
    };
    let mut h = Harness::new(model, PoolConfig { max_prefill_tokens: 16, ..PoolConfig::default() });
    let decoding = GenerationRequest { ignore_eos: true, ..greedy(prompt(1, 4), 20) };
    let _a = h.submit(decoding);
    h.turn();
    let mut b = h.submit(request(long.clone()));
    let mut steps = Vec::new();
    for _ in 0..3 {
        let before = h.metrics.snapshot();
        let m = h.turn();
        steps.push((m.prefill_tokens - before.prefill_tokens, m.tokens_generated - before.tokens_generated, first_tokens(&m)));
    }
    // 16 + 16 + 8 prompt tokens; the decoding request draws every step;
    // the long one's two candidates draw first in the step of its last
    // chunk.
    assert_eq!(steps, [(16, 1, 1), (16, 1, 1), (8, 3, 2)]);
    h.drain();
    let chunked = b.try_recv().unwrap().unwrap();
    let ids = |r: &GenerationResult| r.candidates.iter().map(|c| (c.output_ids.clone(), c.logprob.to_bits())).collect::<Vec<_>>();
    assert_eq!(ids(&chunked), ids(&whole));
    assert!(whole.candidates.iter().any(|c| c.output_ids.len() > 1), "{:?}", ids(&whole));
}

#[test]
fn the_batch_limit_still_holds_prompts_back() {
    let mut h = Harness::new(pico(), PoolConfig { max_batch: 3, ..PoolConfig::default() });
    let request = |seed, n_candidates| GenerationRequest {
        n_candidates,
        ignore_eos: true,
        ..GenerationRequest::new(prompt(seed, 4), SamplingParams { seed: Some(1), max_new_tokens: 3, ..Default::default() })
    };
    let _a = h.submit(request(0, 2));
    let _b = h.submit(request(1, 2));
    let m = h.turn();
    // The second request's two candidates do not fit beside the first's.
    assert_eq!((m.prefill_tokens, m.active_sequences, m.queue_depth), (4, 2, 1));
    assert!(matches!(h.state.pending, Some(Work::Job(_))));
    h.drain();
    let m = h.metrics.snapshot();
    assert_eq!((m.requests_completed, m.prefill_tokens, m.tokens_generated), (2, 8, 12));
}

#[test]
fn a_failing_prefill_among_several_fails_alone() {
    let model = pico();
    let prompts: Vec<Vec<u32>> = (0..5).map(|i| prompt(i, 3 + i as usize)).collect();
    let alone: Vec<Vec<u32>> =
        prompts.iter().map(|p| generate(&model, p, &SamplingParams::greedy(8), |_| true).unwrap().output_ids).collect();
    let mut h = Harness::new(model, PoolConfig::default());
    // One request already decoding when the others arrive.
    let mut decoding = h.submit(greedy(prompts[0].clone(), 8));
    h.turn();
    let mut fine = h.submit(greedy(prompts[1].clone(), 8));
    let mut bad_forward = h.submit(GenerationRequest { fault_in_prefill: true, ..greedy(prompts[2].clone(), 8) });
    let mut bad_draw = h.submit(GenerationRequest { fault_at_token: Some(0), ..greedy(prompts[3].clone(), 8) });
    let mut also_fine = h.submit(greedy(prompts[4].clone(), 8));
    let m = h.turn();
    // The shared pass failed; retried one by one, only the faulty
    // prompt's pass failed, and only the faulty draw.
    assert_eq!((m.decode_steps, m.requests_failed, first_tokens(&m)), (2, 2, 3), "{m:?}");
    match bad_forward.try_recv().unwrap() {
        Err(PoolError::Failed(why)) => assert!(why.contains("vocabulary"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(bad_draw.try_recv().unwrap(), Err(PoolError::Failed(_))));
    h.drain();
    assert_eq!(output(&mut decoding), alone[0]);
    assert_eq!(output(&mut fine), alone[1]);
    assert_eq!(output(&mut also_fine), alone[4]);
    let m = h.metrics.snapshot();
    assert_eq!((m.requests_completed, m.requests_failed, m.active_sequences), (3, 2, 0));
}

#[test]
fn a_failing_prefill_alone_fails_and_the_engine_goes_on() {
    let mut h = Harness::new(pico(), PoolConfig::default());
    let mut bad = h.submit(GenerationRequest { fault_in_prefill: true, ..greedy(prompt(0, 4), 4) });
    h.turn();
    assert!(matches!(bad.try_recv().unwrap(), Err(PoolError::Failed(_))));
    assert!(h.state.active.is_empty());
    let mut good = h.submit(greedy(prompt(0, 4), 4));
    h.drain();
    output(&mut good);
    let m = h.metrics.snapshot();
    assert_eq!((m.requests_completed, m.requests_failed), (1, 1));
}

/// Draws run in parallel; each candidate's draws must come out the same
/// whatever the number of threads, log-probabilities to the bit.
#[test]
fn draws_do_not_depend_on_the_number_of_threads() {
    let model = pico();
    let run = |threads: usize| -> Vec<Vec<(Vec<u32>, u32)>> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut h = Harness::new(model.clone(), PoolConfig::default());
        let answers: Vec<Answer> = (0..6)
            .map(|i| {
                let params = SamplingParams { temperature: 1.0, seed: Some(i), max_new_tokens: 12, ..Default::default() };
                h.submit(GenerationRequest { n_candidates: 1 + i as usize % 3, ..GenerationRequest::new(prompt(i as u32, 5), params) })
            })
            .collect();
        pool.install(|| h.drain());
        answers
            .into_iter()
            .map(|mut a| {
                let result = a.try_recv().unwrap().unwrap();
                result.candidates.into_iter().map(|c| (c.output_ids, c.logprob.to_bits())).collect()
            })
            .collect()
    };
    let one = run(1);
    assert_eq!(one, run(3));
    let replies: std::collections::HashSet<_> = one.iter().flatten().map(|c| c.0.clone()).collect();
    assert!(replies.len() > 3, "the draws must differ to mean anything: {one:?}");
}

#[test]
fn log_sum_exp_matches_a_double_precision_sum() {
    let reference = |row: &[f32]| -> f64 {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln()
    };
    let mut rng = crate::sampling::Rng::new(3);
    for len in [1, 15, 16, 17, 1000, 50257] {
        let row: Vec<f32> = (0..len).map(|_| (rng.next_f64() as f32 - 0.5) * 40.0).collect();
        let got = log_sum_exp(&row) as f64;
        let want = reference(&row);
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "len {len}: {got} vs {want}");
    }
    assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
    assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
    assert!(log_sum_exp(&[1.0, f32::NAN, 2.0]).is_nan());
}

/// The vector path (picked at run time) and the portable one must agree to
/// the bit, or a log-probability would depend on the machine.
#[test]
fn log_sum_exp_gives_the_same_bits_on_every_path() {
    let mut rng = crate::sampling::Rng::new(11);
    for len in [3, 16, 50257] {
        let row: Vec<f32> = (0..len).map(|_| (rng.next_f64() as f32 - 0.5) * 60.0).collect();
        assert_eq!(log_sum_exp(&row).to_bits(), log_sum_exp_portable(&row).to_bits(), "len {len}");
    }
}

/// An empty prompt that got past `PoolHandle::check` is answered with an
/// error at once (it has no chunk to feed, so it would never be), and the
/// request beside it is served.
#[test]
fn an_empty_prompt_in_the_queue_fails_at_once() {
    let mut h = Harness::new(pico(), PoolConfig::default());
    let mut empty = h.submit(greedy(Vec::new(), 4));
    let mut fine = h.submit(greedy(prompt(1, 5), 4));
    h.drain();
    let err = empty.try_recv().expect("answered").expect_err("an empty prompt fails");
    assert!(err.to_string().contains("empty prompt"), "{err}");
    assert!(!output(&mut fine).is_empty());
}

#[test]
fn a_request_reports_its_longest_wait_between_two_tokens() {
    let mut h = Harness::new(pico(), PoolConfig::default());
    let mut one = h.submit(GenerationRequest { ignore_eos: true, ..greedy(prompt(2, 4), 1) });
    let mut several = h.submit(GenerationRequest { ignore_eos: true, ..greedy(prompt(1, 4), 4) });
    h.turn();
    h.turn();
    // Nothing steps the engine for a while: the next token waits that long.
    std::thread::sleep(std::time::Duration::from_millis(40));
    h.drain();
    let one = one.try_recv().unwrap().unwrap();
    assert_eq!(one.longest_token_gap, std::time::Duration::ZERO, "one token has no gap");
    let several = several.try_recv().unwrap().unwrap();
    assert_eq!(several.candidates[0].output_ids.len(), 4);
    assert!(several.longest_token_gap >= std::time::Duration::from_millis(40), "{:?}", several.longest_token_gap);
}
