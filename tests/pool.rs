//! The generation pool: batching must not change answers, and every
//! request is answered, refused, cancelled or failed on its own.

use std::time::Duration;

use candle_core::{DType, Device};
use dialogd::generate::{generate, FinishReason};
use dialogd::model::Gpt2;
use dialogd::pool::{GenerationPool, GenerationRequest, PoolConfig, PoolError};
use dialogd::sampling::SamplingParams;
use dialogd::tokenizer::DialogTokenizer;

use crate::support::model_dir;

fn tiny() -> (Gpt2, DialogTokenizer) {
    let dir = model_dir("tiny");
    (Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap(), DialogTokenizer::from_dir(&dir).unwrap())
}

fn prompts(tok: &DialogTokenizer) -> Vec<Vec<u32>> {
    [
        "Hello, how are you?",
        "Does money buy happiness?",
        "What is the best way to buy happiness? I have asked everyone I know.",
        "ok",
        "Tell me about the weather in Lisbon in the spring, please.",
        "Why?",
    ]
    .iter()
    .map(|t| {
        let mut ids = tok.encode(t).unwrap();
        ids.push(tok.eos_id());
        ids
    })
    .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn batched_greedy_equals_unbatched() {
    let (model, tok) = tiny();
    batched_equals_unbatched(model, &tok);
}

/// The 8-bit kernels quantise each activation row on its own and sum in a
/// fixed order, so batching must not change their answers either.
#[test]
fn batched_greedy_equals_unbatched_with_8_bit_weights() {
    let (model, tok) = tiny();
    batched_equals_unbatched(model.quantize_q8().unwrap(), &tok);
}

/// Half-precision caches are written and read per sequence; batching must
/// not change a sequence's answer either.
#[test]
fn batched_greedy_equals_unbatched_with_f16_caches() {
    let (model, tok) = tiny();
    let model = model.with_kv_precision(dialogd::model::KvPrecision::F16).unwrap();
    batched_equals_unbatched(model.clone(), &tok);
    batched_equals_unbatched(model.quantize_q8().unwrap(), &tok);
    let eight = model.with_kv_precision(dialogd::model::KvPrecision::Q8).unwrap();
    batched_equals_unbatched(eight, &tok);
}

/// The GPU path (tensor caches, batched decode attention in tensor ops)
/// forced on the CPU in f32: the host path's greedy tokens, and batching
/// (six requests over two slab chunks, slots freed and reused across the
/// rounds) changes nothing.
#[test]
fn batched_greedy_equals_unbatched_with_tensor_caches() {
    let (model, tok) = tiny();
    let params = SamplingParams::greedy(20);
    let tensor = model.clone().with_tensor_caches();
    for p in prompts(&tok) {
        let host = generate(&model, &p, &params, |_| true).unwrap().output_ids;
        assert_eq!(generate(&tensor, &p, &params, |_| true).unwrap().output_ids, host);
    }
    batched_equals_unbatched(tensor, &tok);
}

fn batched_equals_unbatched(model: Gpt2, tok: &DialogTokenizer) {
    let params = SamplingParams::greedy(20);
    let alone: Vec<Vec<u32>> =
        prompts(tok).iter().map(|p| generate(&model, p, &params, |_| true).unwrap().output_ids).collect();
    for max_batch in [2, 3, 8] {
        let pool = GenerationPool::start(model.clone(), PoolConfig { max_batch, ..PoolConfig::default() }).unwrap();
        let handle = pool.handle();
        let batched: Vec<Vec<u32>> = runtime().block_on(async {
            let tasks: Vec<_> = prompts(tok)
                .into_iter()
                .map(|p| {
                    let handle = handle.clone();
                    let params = params.clone();
                    tokio::spawn(async move { handle.generate(GenerationRequest::new(p, params)).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap().unwrap().candidates.remove(0).output_ids);
            }
            out
        });
        assert_eq!(batched, alone, "max_batch {max_batch}");
        let m = handle.metrics().snapshot();
        assert_eq!(m.requests_completed, 6);
        assert!(m.decode_steps < 6 * 20, "steps were shared: {}", m.decode_steps);
        drop(handle);
        pool.shutdown();
    }
}

#[test]
fn candidates_are_reproducible_with_a_seed_and_differ_from_each_other() {
    let (model, tok) = tiny();
    let pool = GenerationPool::start(model, PoolConfig::default()).unwrap();
    let handle = pool.handle();
    let prompt = prompts(&tok).remove(1);
    let request = GenerationRequest {
        n_candidates: 4,
        ..GenerationRequest::new(prompt, SamplingParams { temperature: 1.0, seed: Some(5), max_new_tokens: 12, ..SamplingParams::default() })
    };
    let a = handle.generate_blocking(request.clone()).unwrap();
    let b = handle.generate_blocking(request).unwrap();
    assert_eq!(a.candidates.len(), 4);
    assert_eq!(a.candidates, b.candidates);
    let distinct: std::collections::HashSet<_> = a.candidates.iter().map(|c| c.output_ids.clone()).collect();
    assert!(distinct.len() > 1, "four samples, one reply: {:?}", a.candidates);
    assert!(a.candidates.iter().all(|c| c.logprob.is_finite() && c.logprob <= 0.0));
}

#[test]
fn ignore_eos_makes_exactly_max_new_tokens() {
    let (model, tok) = tiny();
    let pool = GenerationPool::start(model, PoolConfig::default()).unwrap();
    let request = GenerationRequest { ignore_eos: true, ..GenerationRequest::new(prompts(&tok).remove(0), SamplingParams::greedy(30)) };
    let result = pool.handle().generate_blocking(request).unwrap();
    assert_eq!(result.candidates[0].output_ids.len(), 30);
    assert_eq!(result.candidates[0].finish, FinishReason::MaxTokens);
}

#[test]
fn a_full_queue_refuses_at_once_and_counts_it() {
    let (model, tok) = tiny();
    let pool = GenerationPool::start(model, PoolConfig { max_batch: 1, queue_capacity: 1, max_candidates: 1, ..PoolConfig::default() }).unwrap();
    let handle = pool.handle();
    let prompt = prompts(&tok).remove(0);
    let (ok, busy) = runtime().block_on(async {
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let handle = handle.clone();
                let request = GenerationRequest { ignore_eos: true, ..GenerationRequest::new(prompt.clone(), SamplingParams::greedy(60)) };
                tokio::spawn(async move { handle.generate(request).await })
            })
            .collect();
        let (mut ok, mut busy) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(r) => {
                    assert_eq!(r.candidates[0].output_ids.len(), 60);
                    ok += 1
                }
                Err(PoolError::Busy { .. }) => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        (ok, busy)
    });
    assert!(busy >= 1, "nothing refused ({ok} ok)");
    assert!(ok >= 1);
    assert_eq!(ok + busy, 12);
    assert_eq!(handle.metrics().snapshot().refusals, busy as u64);
}

#[test]
fn a_caller_that_goes_away_frees_its_slot() {
    let (model, tok) = tiny();
    let pool = GenerationPool::start(model, PoolConfig { max_batch: 1, queue_capacity: 4, max_candidates: 1, ..PoolConfig::default() }).unwrap();
    let handle = pool.handle();
    let prompt = prompts(&tok).remove(0);
    runtime().block_on(async {
        // A request that would run to the end of the context...
        let long = GenerationRequest { ignore_eos: true, ..GenerationRequest::new(prompt.clone(), SamplingParams::greedy(120)) };
        let h = handle.clone();
        let task = tokio::spawn(async move { h.generate(long).await });
        while handle.metrics().snapshot().active_sequences == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // ...is abandoned; the single slot must come free for the next one.
        task.abort();
        let short = GenerationRequest::new(prompt, SamplingParams::greedy(5));
        let result = tokio::time::timeout(Duration::from_secs(60), handle.generate(short)).await.unwrap().unwrap();
        assert!(result.candidates[0].output_ids.len() <= 5);
    });
    let m = handle.metrics().snapshot();
    assert_eq!(m.requests_cancelled, 1);
    assert!(m.tokens_generated < 120, "the abandoned request ran on: {m:?}");
}

#[test]
fn a_failing_request_fails_alone() {
    one_request_fails_alone(|request| request.fault_at_token = Some(3));
}

/// A prompt whose forward pass fails, in a step it may share with other
/// prompts and decode rows, fails alone too.
#[test]
fn a_failing_prefill_fails_alone() {
    one_request_fails_alone(|request| request.fault_in_prefill = true);
}

fn one_request_fails_alone(inject: impl Fn(&mut GenerationRequest)) {
    let (model, tok) = tiny();
    let params = SamplingParams::greedy(15);
    let all = prompts(&tok);
    let alone: Vec<Vec<u32>> = all.iter().map(|p| generate(&model, p, &params, |_| true).unwrap().output_ids).collect();
    let pool = GenerationPool::start(model, PoolConfig::default()).unwrap();
    let handle = pool.handle();
    let results = runtime().block_on(async {
        let tasks: Vec<_> = all
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let handle = handle.clone();
                let mut request = GenerationRequest::new(p.clone(), params.clone());
                if i == 2 {
                    inject(&mut request);
                }
                tokio::spawn(async move { handle.generate(request).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (i, result) in results.into_iter().enumerate() {
        if i == 2 {
            assert!(matches!(result, Err(PoolError::Failed(_))), "{result:?}");
        } else {
            assert_eq!(result.unwrap().candidates[0].output_ids, alone[i]);
        }
    }
    assert_eq!(handle.metrics().snapshot().requests_failed, 1);
    // The pool still serves.
    assert!(handle.generate_blocking(GenerationRequest::new(all[0].clone(), params)).is_ok());
}

#[test]
fn many_concurrent_submitters_all_complete() {
    let (model, tok) = tiny();
    let pool = GenerationPool::start(model, PoolConfig { max_batch: 8, queue_capacity: 64, max_candidates: 4, ..PoolConfig::default() }).unwrap();
    let handle = pool.handle();
    let all = prompts(&tok);
    let done = runtime().block_on(async {
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let handle = handle.clone();
                let request = GenerationRequest {
                    n_candidates: 1 + i % 3,
                    ..GenerationRequest::new(
                        all[i % all.len()].clone(),
                        SamplingParams { seed: Some(i as u64), max_new_tokens: 8, ..SamplingParams::default() },
                    )
                };
                tokio::spawn(async move { handle.generate(request).await.map(|r| (i, r)) })
            })
            .collect();
        let mut done = 0;
        for t in tasks {
            let (i, r) = t.await.unwrap().unwrap();
            assert_eq!(r.candidates.len(), 1 + i % 3);
            done += 1;
        }
        done
    });
    assert_eq!(done, 40);
    let m = handle.metrics().snapshot();
    assert_eq!((m.requests_completed, m.queue_depth, m.active_sequences), (40, 0, 0));
}

#[test]
fn bad_requests_are_refused_before_queueing() {
    let (model, _) = tiny();
    let n_positions = model.config().n_positions;
    let pool = GenerationPool::start(model, PoolConfig::default()).unwrap();
    let h = pool.handle();
    let invalid = |r: GenerationRequest| matches!(h.generate_blocking(r), Err(PoolError::Invalid(_)));
    assert!(invalid(GenerationRequest::new(vec![], SamplingParams::greedy(4))));
    assert!(invalid(GenerationRequest::new(vec![50257], SamplingParams::greedy(4))));
    assert!(invalid(GenerationRequest::new(vec![1; n_positions], SamplingParams::greedy(4))));
    assert!(invalid(GenerationRequest { n_candidates: 0, ..GenerationRequest::new(vec![1], SamplingParams::greedy(4)) }));
    // Near the end of the context: stops when the context is full.
    let r = h.generate_blocking(GenerationRequest { ignore_eos: true, ..GenerationRequest::new(vec![1; n_positions - 3], SamplingParams::greedy(50)) }).unwrap();
    assert_eq!(r.candidates[0].finish, FinishReason::ContextFull);
    assert_eq!(r.candidates[0].output_ids.len(), 3);
}

/// A model swap under load: requests in the batch finish on the old model,
/// queued and later ones run on the new one, and none is lost.
#[test]
fn a_model_swap_under_load_loses_no_request() {
    let (model_a, tok) = tiny();
    let g = crate::support::golden("tiny");
    let (config, seed, init) = crate::support::golden_model_spec(&g);
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        dialogd::model::synthetic::synthetic_tensors(&config, seed + 1, &init).unwrap().into_iter().collect();
    let mut store = dialogd::model::weights::TensorStore::from_tensors("tiny-b", tensors);
    let model_b = Gpt2::from_store(config, &mut store, &Device::Cpu).unwrap();
    let params = SamplingParams::greedy(12);
    let all = prompts(&tok);
    let by = |m: &Gpt2| -> Vec<Vec<u32>> { all.iter().map(|p| generate(m, p, &params, |_| true).unwrap().output_ids).collect() };
    let (out_a, out_b) = (by(&model_a), by(&model_b));
    assert_ne!(out_a, out_b, "the two models must differ for this test to mean anything");

    let pool = GenerationPool::start(model_a, PoolConfig { max_batch: 3, queue_capacity: 32, max_candidates: 1, ..PoolConfig::default() }).unwrap();
    let handle = pool.handle();
    runtime().block_on(async {
        let submit = |i: usize| {
            let handle = handle.clone();
            let request = GenerationRequest::new(all[i].clone(), params.clone());
            tokio::spawn(async move { (i, handle.generate(request).await) })
        };
        let before: Vec<_> = (0..all.len()).map(submit).collect();
        let version = handle.swap_model(model_b).await.unwrap();
        assert_eq!(version, 1);
        let after: Vec<_> = (0..all.len()).map(submit).collect();
        for task in before {
            let (i, result) = task.await.unwrap();
            let ids = result.expect("no request may be lost").candidates.remove(0).output_ids;
            assert!(ids == out_a[i] || ids == out_b[i], "request {i} matches neither model");
        }
        for task in after {
            let (i, result) = task.await.unwrap();
            assert_eq!(result.unwrap().candidates.remove(0).output_ids, out_b[i], "request {i} after the swap");
        }
    });
    let m = handle.metrics().snapshot();
    assert_eq!((m.requests_completed, m.model_version), (2 * all.len() as u64, 1));
    // A model of another shape is refused.
    let (pico, _) = (Gpt2::load(&crate::support::model_dir("pico-bin"), DType::F32, &Device::Cpu).unwrap(), ());
    assert!(matches!(runtime().block_on(handle.swap_model(pico)), Err(PoolError::Invalid(_))));
}
