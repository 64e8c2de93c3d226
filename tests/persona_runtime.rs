//! Persona adapters served at run time: one base model, each sequence of a
//! batch through its own LoRA adapter (or none).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use dialogd::generate::{generate, generate_with_adapter};
use dialogd::model::gpt2::argmax;
use dialogd::model::Gpt2;
use dialogd::pool::{GenerationPool, GenerationRequest, PoolConfig, PoolError};
use dialogd::sampling::SamplingParams;
use dialogd::tokenizer::DialogTokenizer;
use dialogd::training::lora::{load_runtime, LoraAdapter};
use dialogd::training::load_persona;

use crate::support::{assert_fails_with, dialogd, model_dir, stdout, write_adapter};

fn tiny() -> (Gpt2, DialogTokenizer) {
    let dir = model_dir("tiny");
    (Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap(), DialogTokenizer::from_dir(&dir).unwrap())
}

fn prompts(tok: &DialogTokenizer) -> Vec<Vec<u32>> {
    ["Hello, how are you?", "Does money buy happiness?", "Tell me about the weather in Lisbon in the spring, please.", "ok"]
        .iter()
        .map(|t| {
            let mut ids = tok.encode(t).unwrap();
            ids.push(tok.eos_id());
            ids
        })
        .collect()
}

fn row(logits: &Tensor) -> Vec<f32> {
    logits.squeeze(0).unwrap().to_vec1().unwrap()
}

/// Largest difference relative to the largest logit of `want`.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn a_runtime_adapter_computes_what_the_merged_persona_does() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = model_dir("tiny");
    let (base, tok) = tiny();
    let adapter_dir = write_adapter(&base_dir, &tmp.path().join("persona"), 11);
    let merged = load_persona(&base_dir, &adapter_dir, DType::F32, &Device::Cpu).unwrap();
    let adapter = load_runtime(&adapter_dir, base.config()).unwrap();
    assert_eq!(adapter.rank(), 4);
    let mut changed = 0;
    for prompt in prompts(&tok) {
        // Prefill, then decode steps fed the merged model's greedy token.
        let capacity = prompt.len() + 12;
        let (mut c_merged, mut c_runtime) = (merged.new_seq_cache(capacity).unwrap(), base.new_seq_cache(capacity).unwrap());
        let mut want = row(&merged.forward_seqs(&[&prompt], &mut [&mut c_merged]).unwrap());
        let mut got = row(&base.forward_seqs_with(&[&prompt], &mut [&mut c_runtime], &[Some(&adapter)]).unwrap());
        for step in 0..12 {
            let err = relative_error(&got, &want);
            assert!(err < 1e-4, "step {step}: logits differ by {err} of the largest");
            assert_eq!(argmax(&got), argmax(&want), "step {step}");
            let next = [argmax(&want) as u32];
            want = row(&merged.forward_seqs(&[&next], &mut [&mut c_merged]).unwrap());
            got = row(&base.forward_seqs_with(&[&next], &mut [&mut c_runtime], &[Some(&adapter)]).unwrap());
        }
        // Greedy replies, end-of-text and all, are the same.
        let params = SamplingParams::greedy(24);
        let persona = generate(&merged, &prompt, &params, |_| true).unwrap();
        let served = generate_with_adapter(&base, Some(&adapter), &prompt, &params, |_| true).unwrap();
        assert_eq!(served, persona);
        // No adapter is the base model, bit for bit.
        let plain = generate(&base, &prompt, &params, |_| true).unwrap();
        assert_eq!(generate_with_adapter(&base, None, &prompt, &params, |_| true).unwrap(), plain);
        changed += usize::from(plain.output_ids != persona.output_ids);
    }
    assert!(changed > 0, "the adapter changes some greedy reply");
}

#[test]
fn a_sequence_output_does_not_depend_on_its_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = model_dir("tiny");
    let (base, tok) = tiny();
    let a = load_runtime(&write_adapter(&base_dir, &tmp.path().join("a"), 1), base.config()).unwrap();
    let b = load_runtime(&write_adapter(&base_dir, &tmp.path().join("b"), 2), base.config()).unwrap();
    let q8 = base.quantize_q8().unwrap();
    let prompts = prompts(&tok);
    let adapters = [Some(&a), None, Some(&b), Some(&a)];
    for model in [&base, &q8] {
        // Alone: each prompt with its adapter, prefill and one decode step.
        let alone: Vec<(Vec<f32>, Vec<f32>)> = prompts
            .iter()
            .zip(adapters)
            .map(|(p, adapter)| {
                let mut cache = model.new_seq_cache(p.len() + 1).unwrap();
                let first = row(&model.forward_seqs_with(&[p], &mut [&mut cache], &[adapter]).unwrap());
                let next = [argmax(&first) as u32];
                (first.clone(), row(&model.forward_seqs_with(&[&next], &mut [&mut cache], &[adapter]).unwrap()))
            })
            .collect();
        // Together: all prompts in one prefill (spans of many rows), then
        // one decode step (one row each).
        let mut caches: Vec<_> = prompts.iter().map(|p| model.new_seq_cache(p.len() + 1).unwrap()).collect();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let tokens: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let first: Vec<Vec<f32>> = model.forward_seqs_with(&tokens, &mut refs, &adapters).unwrap().to_vec2().unwrap();
        let next: Vec<[u32; 1]> = first.iter().map(|r| [argmax(r) as u32]).collect();
        let next_refs: Vec<&[u32]> = next.iter().map(|n| n.as_slice()).collect();
        let second: Vec<Vec<f32>> = model.forward_seqs_with(&next_refs, &mut refs, &adapters).unwrap().to_vec2().unwrap();
        for (i, (want_first, want_second)) in alone.iter().enumerate() {
            assert_eq!(&first[i], want_first, "sequence {i}, prefill, quantised {}", model.is_quantized());
            assert_eq!(&second[i], want_second, "sequence {i}, decode, quantised {}", model.is_quantized());
        }
    }
}

#[test]
fn a_mixed_batch_gives_each_request_what_it_gets_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = model_dir("tiny");
    let (base, tok) = tiny();
    let a = Arc::new(load_runtime(&write_adapter(&base_dir, &tmp.path().join("a"), 1), base.config()).unwrap());
    let b = Arc::new(load_runtime(&write_adapter(&base_dir, &tmp.path().join("b"), 2), base.config()).unwrap());
    let prompts = prompts(&tok);
    let greedy = SamplingParams::greedy(20);
    let sampled = SamplingParams { seed: Some(5), ..SamplingParams::default() };
    // The same prompt as base, persona A and persona B; more prompts for
    // both personas; one request drawing three seeded candidates.
    let requests: Vec<GenerationRequest> = vec![
        GenerationRequest::new(prompts[0].clone(), greedy.clone()),
        GenerationRequest { adapter: Some(a.clone()), ..GenerationRequest::new(prompts[0].clone(), greedy.clone()) },
        GenerationRequest { adapter: Some(b.clone()), ..GenerationRequest::new(prompts[0].clone(), greedy.clone()) },
        GenerationRequest { adapter: Some(a.clone()), ..GenerationRequest::new(prompts[1].clone(), greedy.clone()) },
        GenerationRequest::new(prompts[2].clone(), greedy.clone()),
        GenerationRequest { adapter: Some(b.clone()), ..GenerationRequest::new(prompts[3].clone(), greedy.clone()) },
        GenerationRequest {
            adapter: Some(a.clone()),
            n_candidates: 3,
            ..GenerationRequest::new(prompts[2].clone(), SamplingParams { max_new_tokens: 20, ..sampled.clone() })
        },
        GenerationRequest { adapter: Some(b.clone()), n_candidates: 2, ..GenerationRequest::new(prompts[1].clone(), greedy.clone()) },
    ];
    let outputs = |result: dialogd::pool::GenerationResult| -> Vec<Vec<u32>> {
        result.candidates.into_iter().map(|c| c.output_ids).collect()
    };
    // Alone: one at a time through the pool.
    let pool = GenerationPool::start(base.clone(), PoolConfig::default()).unwrap();
    let handle = pool.handle();
    let alone: Vec<Vec<Vec<u32>>> = requests.iter().map(|r| outputs(handle.generate_blocking(r.clone()).unwrap())).collect();
    drop(handle);
    pool.shutdown();
    // The single-sequence loop agrees on the greedy ones.
    for (r, want) in requests.iter().zip(&alone).filter(|(r, _)| r.params.is_greedy() && r.n_candidates == 1) {
        let got = generate_with_adapter(&base, r.adapter.as_deref(), &r.prompt_ids, &r.params, |_| true).unwrap();
        assert_eq!(got.output_ids, want[0]);
    }
    assert_ne!(alone[0], alone[1], "persona A answers differently from the base");
    assert_ne!(alone[1], alone[2], "persona B answers differently from persona A");
    assert!(alone[6].iter().any(|c| c != &alone[6][0]), "seeded candidates differ: {:?}", alone[6]);
    // Together, in batches of several sizes.
    for max_batch in [3, 6, 16] {
        let pool = GenerationPool::start(base.clone(), PoolConfig { max_batch, ..PoolConfig::default() }).unwrap();
        let handle = pool.handle();
        let together: Vec<Vec<Vec<u32>>> = runtime().block_on(async {
            let tasks: Vec<_> = requests
                .iter()
                .map(|r| {
                    let (handle, r) = (handle.clone(), r.clone());
                    tokio::spawn(async move { handle.generate(r).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(outputs(t.await.unwrap().unwrap()));
            }
            out
        });
        for (i, (got, want)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(got, want, "request {i}, max_batch {max_batch}");
        }
        assert!(handle.metrics().snapshot().decode_steps < 8 * 20, "steps were shared");
        drop(handle);
        pool.shutdown();
    }
}

#[test]
fn an_adapter_for_another_shape_is_refused_with_the_tensor_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, tok) = tiny();
    // Made for the pico model (n_embd 8, 2 layers).
    let pico_adapter = write_adapter(&model_dir("pico-safetensors"), &tmp.path().join("pico-persona"), 3);
    let err = load_runtime(&pico_adapter, base.config()).unwrap_err().to_string();
    assert!(err.contains("pico-persona") && err.contains(".lora_A` is [4, 8]") && err.contains("[4, 64]"), "{err}");
    let err = LoraAdapter::load(&pico_adapter).unwrap().runtime(base.config()).unwrap_err().to_string();
    assert!(err.contains("lora_A"), "{err}");

    // One projection's B of the wrong width in an otherwise fitting adapter.
    let dir = write_adapter(&model_dir("tiny"), &tmp.path().join("bent"), 4);
    let path = dir.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.insert(
        "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight".into(),
        Tensor::ones((100, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_runtime(&dir, base.config()).unwrap_err().to_string();
    assert!(err.contains("bent") && err.contains("`h.1.mlp.c_fc.lora_B` is [100, 4]") && err.contains("[256, 4]"), "{err}");

    // The pool refuses an adapter built for another model, before queueing.
    let pico = Gpt2::load(&model_dir("pico-safetensors"), DType::F32, &Device::Cpu).unwrap();
    let foreign = Arc::new(load_runtime(&pico_adapter, pico.config()).unwrap());
    let pool = GenerationPool::start(base.clone(), PoolConfig::default()).unwrap();
    let handle = pool.handle();
    let prompt = prompts(&tok).remove(0);
    let request = GenerationRequest { adapter: Some(foreign.clone()), ..GenerationRequest::new(prompt.clone(), SamplingParams::greedy(4)) };
    match handle.generate_blocking(request) {
        Err(PoolError::Invalid(message)) => assert!(message.contains("n_embd 8") && message.contains("n_embd 64"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // …and still serves everyone else.
    assert!(handle.generate_blocking(GenerationRequest::new(prompt.clone(), SamplingParams::greedy(4))).is_ok());
    assert_eq!(handle.metrics().snapshot().requests_completed, 1);
    drop(handle);
    pool.shutdown();
    // The model refuses it too, rather than panicking mid-product.
    let mut cache = base.new_seq_cache(prompt.len()).unwrap();
    let err = base.forward_seqs_with(&[&prompt], &mut [&mut cache], &[Some(&*foreign)]).unwrap_err().to_string();
    assert!(err.contains("LoRA adapter"), "{err}");
}

#[test]
fn the_8_bit_model_with_an_adapter_stays_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = model_dir("tiny");
    let (base, tok) = tiny();
    let adapter = load_runtime(&write_adapter(&base_dir, &tmp.path().join("persona"), 7), base.config()).unwrap();
    let q8 = base.quantize_q8().unwrap();
    let (mut agree, mut total, mut worst) = (0, 0, 0f32);
    for prompt in prompts(&tok) {
        let mut c_f32 = base.new_seq_cache(prompt.len()).unwrap();
        let mut c_q8 = q8.new_seq_cache(prompt.len()).unwrap();
        let want = row(&base.forward_seqs_with(&[&prompt], &mut [&mut c_f32], &[Some(&adapter)]).unwrap());
        let got = row(&q8.forward_seqs_with(&[&prompt], &mut [&mut c_q8], &[Some(&adapter)]).unwrap());
        worst = worst.max(relative_error(&got, &want));
        agree += usize::from(argmax(&got) == argmax(&want));
        total += 1;
    }
    eprintln!("q8 with an adapter: top-1 agreement {agree}/{total}, worst logit error {:.2}% of the largest", worst * 100.0);
    assert!(agree * 4 >= total * 3, "top-1 agreement {agree}/{total}");
    assert!(worst < 0.05, "logit error {worst}");
    // Through the pool too, as the single-sequence loop has it.
    let adapter = Arc::new(adapter);
    let prompt = prompts(&tok).remove(1);
    let want = generate_with_adapter(&q8, Some(&adapter), &prompt, &SamplingParams::greedy(8), |_| true).unwrap();
    let pool = GenerationPool::start(q8, PoolConfig::default()).unwrap();
    let request = GenerationRequest { adapter: Some(adapter), ..GenerationRequest::new(prompt, SamplingParams::greedy(8)) };
    let result = pool.handle().generate_blocking(request).unwrap();
    assert_eq!(result.candidates[0].output_ids, want.output_ids);
    pool.shutdown();
}

/// Half precision takes the general path (one candle product per span).
#[test]
fn a_bf16_model_with_an_adapter_stays_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = model_dir("tiny");
    let (base, tok) = tiny();
    let adapter = load_runtime(&write_adapter(&base_dir, &tmp.path().join("persona"), 7), base.config()).unwrap();
    let half = Gpt2::load(&base_dir, DType::BF16, &Device::Cpu).unwrap();
    for prompt in prompts(&tok) {
        let mut c_f32 = base.new_seq_cache(prompt.len()).unwrap();
        let mut c_half = half.new_seq_cache(prompt.len()).unwrap();
        let want = row(&base.forward_seqs_with(&[&prompt], &mut [&mut c_f32], &[Some(&adapter)]).unwrap());
        let got = row(&half.forward_seqs_with(&[&prompt], &mut [&mut c_half], &[Some(&adapter)]).unwrap());
        let plain = row(&half.forward_seqs(&[&prompt], &mut [&mut half.new_seq_cache(prompt.len()).unwrap()]).unwrap());
        let err = relative_error(&got, &want);
        assert!(err < 0.1, "bf16 with an adapter: {err} of the largest logit");
        assert!(relative_error(&plain, &want) > err, "the adapter is applied");
    }
}

#[test]
fn generate_and_bench_take_an_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = model_dir("tiny");
    let adapter_dir = write_adapter(&base_dir, &tmp.path().join("persona"), 9);
    let (model, adapter) = (base_dir.to_str().unwrap(), adapter_dir.to_str().unwrap());
    let out = dialogd(&[
        "generate", "--model", model, "--adapter", adapter, "--quantize", "none", "--greedy", "--max-new-tokens", "16", "--json", "--", "Hello, how are you?",
    ]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let merged = load_persona(&base_dir, &adapter_dir, DType::F32, &Device::Cpu).unwrap();
    let want = generate(&merged, &ids(&json["prompt_ids"]), &SamplingParams::greedy(16), |_| true).unwrap();
    assert_eq!(ids(&json["output_ids"]), want.output_ids, "the CLI replies as the merged persona does");

    let foreign = write_adapter(&model_dir("pico-safetensors"), &tmp.path().join("pico-persona"), 3);
    let out = dialogd(&["generate", "--model", model, "--adapter", foreign.to_str().unwrap(), "--greedy", "--", "Hi"]);
    assert_fails_with(&out, "lora_A");
    let out = dialogd(&["generate", "--model", model, "--adapter", tmp.path().join("nowhere").to_str().unwrap(), "--", "Hi"]);
    assert_fails_with(&out, "adapter_config.json");

    let out = dialogd(&[
        "bench", "--model", model, "--adapter", adapter, "--concurrency", "1,2", "--prompt-tokens", "8", "--new-tokens", "4", "--json",
    ]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["concurrency"], 2);
}
