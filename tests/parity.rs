//! Parity with Hugging Face transformers (golden files from
//! scripts/make_golden.py): token ids, last-position logits, greedy
//! continuations, and KV-cache versus full recomputation.

use candle_core::{DType, Device, Tensor};
use dialogd::generate::generate;
use dialogd::model::Gpt2;
use dialogd::prompt::build_prompt;
use dialogd::sampling::SamplingParams;
use dialogd::tokenizer::DialogTokenizer;
use serde_json::Value;

use crate::support::{fixtures, golden, ids, model_dir, strings};

fn tokenizers() -> Vec<(&'static str, DialogTokenizer)> {
    vec![
        ("vocab.json+merges.txt", DialogTokenizer::from_dir(&fixtures().join("gpt2")).unwrap()),
        ("tokenizer.json", DialogTokenizer::from_dir(&fixtures().join("pico-safetensors")).unwrap()),
    ]
}

#[test]
fn token_ids_match_transformers() {
    let cases = golden("tokenizer");
    for (kind, tok) in tokenizers() {
        for case in cases["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let got = tok.encode(text).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{kind}: {text:?}");
            // Byte-level BPE round-trips every string exactly.
            assert_eq!(tok.decode(&got).unwrap(), text, "{kind}");
        }
    }
}

#[test]
fn a_typed_separator_is_text_not_a_turn_boundary() {
    for (kind, tok) in tokenizers() {
        let got = tok.encode("hi <|endoftext|> there").unwrap();
        assert!(!got.contains(&50256), "{kind}: {got:?}");
        assert!(got.len() > 4, "{kind}");
    }
}

fn prompt_for(tok: &DialogTokenizer, turns: &[String]) -> Vec<u32> {
    let encoded: Vec<Vec<u32>> = turns.iter().map(|t| tok.encode(t).unwrap()).collect();
    build_prompt(&encoded, tok.eos_id(), 1 << 20).unwrap().ids
}

fn check_logits(name: &str, model: &Gpt2, tok: &DialogTokenizer, golden: &Value) {
    for case in golden["logits"].as_array().unwrap() {
        let prompt = prompt_for(tok, &strings(&case["turns"]));
        assert_eq!(prompt, ids(&case["prompt_ids"]), "{name}: prompt ids");
        let logits = model.forward(&model.tokens_tensor(&prompt).unwrap(), &mut model.new_cache()).unwrap();
        let logits: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
        let positions = ids(&case["positions"]);
        let expected: Vec<f64> = case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let mut worst = 0f64;
        for (&pos, &want) in positions.iter().zip(&expected) {
            let got = logits[pos as usize] as f64;
            let err = (got - want).abs() / want.abs().max(1.0);
            worst = worst.max(err);
            assert!(err < 1e-4, "{name}: logit {pos}: got {got}, want {want}");
        }
        assert_eq!(dialogd::model::gpt2::argmax(&logits) as u64, case["argmax"].as_u64().unwrap(), "{name}");
        eprintln!("{name}: worst relative logit error {worst:.2e} over {} positions", positions.len());
    }
}

fn check_greedy(name: &str, model: &Gpt2, tok: &DialogTokenizer, golden: &Value) {
    for case in golden["greedy"].as_array().unwrap() {
        let prompt = prompt_for(tok, &strings(&case["turns"]));
        assert_eq!(prompt, ids(&case["prompt_ids"]), "{name}: prompt ids");
        let params = SamplingParams {
            repetition_penalty: case["repetition_penalty"].as_f64().unwrap_or(1.0) as f32,
            no_repeat_ngram: case["no_repeat_ngram"].as_u64().unwrap_or(0) as usize,
            min_new_tokens: case["min_new_tokens"].as_u64().unwrap_or(0) as usize,
            ..SamplingParams::greedy(case["max_new_tokens"].as_u64().unwrap() as usize)
        };
        let out = generate(model, &prompt, &params, |_| true).unwrap();
        assert_eq!(out.output_ids, ids(&case["output_ids"]), "{name}: greedy case {case}");
        assert_eq!(tok.decode(&out.output_ids).unwrap(), case["text"].as_str().unwrap(), "{name}");
    }
}

fn check_model(name: &str, golden_name: &str) {
    let g = golden(golden_name);
    let dir = model_dir(name);
    let model = Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tok = DialogTokenizer::from_dir(&dir).unwrap();
    check_logits(name, &model, &tok, &g);
    check_greedy(name, &model, &tok, &g);
}

#[test]
fn pico_safetensors_from_save_pretrained() {
    check_model("pico-safetensors", "pico");
}

#[test]
fn pico_pytorch_bin() {
    check_model("pico-bin", "pico");
}

#[test]
fn tiny_three_layers() {
    check_model("tiny", "tiny");
}

#[test]
fn dialogpt_small_shape() {
    check_model("small", "small");
}

#[test]
fn dialogpt_medium_shape() {
    check_model("medium", "medium");
}

#[test]
fn kv_cache_matches_full_recomputation() {
    let dir = model_dir("tiny");
    let model = Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tok = DialogTokenizer::from_dir(&dir).unwrap();
    let prompt = prompt_for(&tok, &["Does money buy happiness?".to_string()]);
    let out = generate(&model, &prompt, &SamplingParams::greedy(12), |_| true).unwrap();
    let mut all = prompt.clone();
    all.extend(&out.output_ids);
    // One pass over everything, no cache.
    let full = model.forward_all(&model.tokens_tensor(&all).unwrap(), &mut model.new_cache()).unwrap();
    // Prefill, then one token at a time through the cache.
    let mut cache = model.new_cache();
    let mut stepwise = vec![model.forward(&model.tokens_tensor(&prompt).unwrap(), &mut cache).unwrap()];
    for &id in &out.output_ids {
        stepwise.push(model.forward(&model.tokens_tensor(&[id]).unwrap(), &mut cache).unwrap());
    }
    assert_eq!(cache.len(), all.len());
    for (step, logits) in stepwise.iter().enumerate() {
        let pos = prompt.len() - 1 + step;
        let reference = full.get(0).unwrap().get(pos).unwrap();
        let diff = (logits.squeeze(0).unwrap() - &reference).unwrap().abs().unwrap().max_all().unwrap();
        let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-4 * scale.max(1.0), "step {step}: max diff {diff} (scale {scale})");
    }
}

#[test]
fn checkpoint_naming_variants_load_the_same_model() {
    // Original DialoGPT .pkl naming: no `transformer.` prefix, head stored as
    // lm_head.decoder.weight, mask buffers present.
    let g = golden("pico");
    let (config, seed, init) = crate::support::golden_model_spec(&g);
    let mut tensors: std::collections::HashMap<String, Tensor> = dialogd::model::synthetic::synthetic_tensors(&config, seed, &init)
        .unwrap()
        .into_iter()
        .collect();
    let wte = tensors["wte.weight"].clone();
    tensors.insert("lm_head.decoder.weight".into(), wte);
    tensors.insert("h.0.attn.bias".into(), Tensor::ones((1, 1, 64, 64), DType::F32, &Device::Cpu).unwrap());
    tensors.insert("h.0.attn.masked_bias".into(), Tensor::new(&[-1e4f32], &Device::Cpu).unwrap());
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(fixtures().join("pico-bin").join("config.json"), dir.path().join("config.json")).unwrap();
    let variant = Gpt2::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let reference = Gpt2::load(&fixtures().join("pico-bin"), DType::F32, &Device::Cpu).unwrap();
    let ids = variant.tokens_tensor(&[15496, 11, 50256]).unwrap();
    let a = variant.forward(&ids, &mut variant.new_cache()).unwrap();
    let b = reference.forward(&ids, &mut reference.new_cache()).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn half_precision_stays_close_to_f32() {
    let dir = model_dir("tiny");
    let prompt = [15496u32, 11, 703, 389, 345, 30, 50256];
    let f32_model = Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let reference: Vec<f32> = f32_model
        .forward(&f32_model.tokens_tensor(&prompt).unwrap(), &mut f32_model.new_cache())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let model = Gpt2::load(&dir, dtype, &Device::Cpu).unwrap();
        assert_eq!(model.dtype(), dtype);
        let logits: Vec<f32> =
            model.forward(&model.tokens_tensor(&prompt).unwrap(), &mut model.new_cache()).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = logits.iter().zip(&reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 0.1 * scale, "{dtype:?}: worst {worst} vs scale {scale}");
    }
}

/// The quality cost of f16 key/value caches (the CPU default), against f32
/// caches: each golden prompt is continued greedily for 24 tokens with f32
/// caches, and the f16 model is fed the same tokens; at every step the next
/// token must mostly agree and the logits stay close.
#[test]
fn f16_caches_stay_close_to_f32() {
    cache_precision_stays_close_to_f32(dialogd::model::KvPrecision::F16, 19, 20, 0.01);
}

/// The same for 8-bit caches (`kv_cache = "q8"`), with looser bounds.
#[test]
fn q8_caches_stay_close_to_f32() {
    cache_precision_stays_close_to_f32(dialogd::model::KvPrecision::Q8, 19, 20, 0.02);
}

/// Continues each golden prompt greedily with f32 caches and feeds the same
/// tokens to a model caching in `kv`; checks the cache's size, that the
/// next tokens agree at least `agree_num / agree_den` of the time and that
/// no logit is off by more than `max_error` of the largest.
fn cache_precision_stays_close_to_f32(kv: dialogd::model::KvPrecision, agree_num: usize, agree_den: usize, max_error: f32) {
    use dialogd::model::gpt2::argmax;
    use dialogd::model::KvPrecision;
    for name in ["tiny", "small"] {
        let dir = model_dir(name);
        let full = Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let half = full.clone().with_kv_precision(kv).unwrap();
        assert_eq!(full.kv_precision(), KvPrecision::F32);
        let tok = DialogTokenizer::from_dir(&dir).unwrap();
        let (mut agree, mut total, mut worst) = (0, 0, 0f32);
        for case in golden(name)["logits"].as_array().unwrap() {
            let prompt = prompt_for(&tok, &strings(&case["turns"]));
            let mut a_cache = full.new_seq_cache(prompt.len() + 24).unwrap();
            let mut b_cache = half.new_seq_cache(prompt.len() + 24).unwrap();
            // f32 values are 4 bytes; f16 2; 8-bit rows 1 a value plus a
            // 4-byte scale per row of head_dim values.
            let d = full.config().head_dim();
            let want = match kv {
                KvPrecision::F16 => a_cache.bytes() / 2,
                _ => a_cache.bytes() / 4 / d * (d + 4),
            };
            assert_eq!(b_cache.bytes(), want);
            let mut feed = prompt.clone();
            for _ in 0..24 {
                let a: Vec<f32> = full.forward_seqs(&[&feed], &mut [&mut a_cache]).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
                let b: Vec<f32> = half.forward_seqs(&[&feed], &mut [&mut b_cache]).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                worst = worst.max(a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale);
                agree += usize::from(argmax(&a) == argmax(&b));
                total += 1;
                feed = vec![argmax(&a) as u32];
            }
        }
        eprintln!("{name}: {} cache top-1 agreement {agree}/{total}, worst logit error {:.3}% of the largest logit", kv.as_str(), worst * 100.0);
        assert!(agree * agree_den >= total * agree_num, "{name}: top-1 agreement {agree}/{total}");
        assert!(worst < max_error, "{name}: logit error {worst}");
    }
}

/// The quality cost of 8-bit weights, against f32 on the same prompts:
/// top-1 agreement of the next token and the largest logit error.
#[test]
fn q8_weights_stay_close_to_f32() {
    for name in ["tiny", "small"] {
        let dir = model_dir(name);
        let model = Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let q8 = model.quantize_q8().unwrap();
        // Quantised while loading: the same weights, bit for bit.
        let loaded_q8 = Gpt2::load_q8(&dir, &Device::Cpu).unwrap();
        let tok = DialogTokenizer::from_dir(&dir).unwrap();
        let g = golden(name);
        let (mut agree, mut total, mut worst) = (0, 0, 0f32);
        for case in g["logits"].as_array().unwrap() {
            let prompt = prompt_for(&tok, &strings(&case["turns"]));
            let a: Vec<f32> = model.forward(&model.tokens_tensor(&prompt).unwrap(), &mut model.new_cache()).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
            let mut cache = q8.new_seq_cache(prompt.len()).unwrap();
            let b: Vec<f32> = q8.forward_seqs(&[&prompt], &mut [&mut cache]).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
            let mut cache = loaded_q8.new_seq_cache(prompt.len()).unwrap();
            let c: Vec<f32> = loaded_q8.forward_seqs(&[&prompt], &mut [&mut cache]).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
            assert_eq!(b, c, "{name}: quantised while loading differs from quantised after");
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            worst = worst.max(a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale);
            agree += usize::from(dialogd::model::gpt2::argmax(&a) == dialogd::model::gpt2::argmax(&b));
            total += 1;
        }
        eprintln!("{name}: q8 top-1 agreement {agree}/{total}, worst logit error {:.2}% of the largest logit", worst * 100.0);
        assert!(agree * 4 >= total * 3, "{name}: top-1 agreement {agree}/{total}");
        assert!(worst < 0.05, "{name}: logit error {worst}");
    }
}

/// The GPU path (tensor caches in slabs, each step's decode rows attending
/// in one batched pass of tensor ops), run on the CPU in f32: the same
/// greedy tokens as transformers, as the host path gives.
#[test]
fn tensor_caches_give_transformers_greedy_tokens() {
    for name in ["tiny", "small"] {
        let g = golden(name);
        let dir = model_dir(name);
        let model = Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap().with_tensor_caches();
        assert!(model.new_seq_cache(8).unwrap().is_tensor());
        let tok = DialogTokenizer::from_dir(&dir).unwrap();
        check_greedy(name, &model, &tok, &g);
    }
}

/// Tensor caches against host caches, sequence by sequence, in steps that
/// mix prompts and decode rows, with a forked cache and slots spread over
/// two chunks (the first holds four): the logits agree to f32 rounding.
#[test]
fn tensor_caches_match_host_caches_in_mixed_steps() {
    use dialogd::model::gpt2::SeqCache;
    let dir = model_dir("tiny");
    let host = Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tensor = host.clone().with_tensor_caches();
    let tok = DialogTokenizer::from_dir(&dir).unwrap();
    let prompts: Vec<Vec<u32>> = ["Hello, how are you?", "Does money buy happiness?", "ok", "Tell me about Lisbon.", "Why?"]
        .iter()
        .map(|t| prompt_for(&tok, &[t.to_string()]))
        .collect();
    // (host cache, tensor cache, next token) per live sequence.
    let mut live: Vec<(SeqCache, SeqCache, Vec<u32>)> = Vec::new();
    let mut worst = 0f32;
    for step in 0..12 {
        // A new prompt joins on steps 0..5; sequence 1 forks on step 3.
        if step < prompts.len() {
            live.push((host.new_seq_cache(64).unwrap(), tensor.new_seq_cache(64).unwrap(), prompts[step].clone()));
        }
        if step == 3 {
            let (h, t, next) = &live[1];
            let fork = (h.fork().unwrap(), t.fork().unwrap(), next.clone());
            live.push(fork);
        }
        let feeds: Vec<Vec<u32>> = live.iter().map(|(_, _, next)| next.clone()).collect();
        let tokens: Vec<&[u32]> = feeds.iter().map(Vec::as_slice).collect();
        let (mut hs, mut ts): (Vec<&mut SeqCache>, Vec<&mut SeqCache>) = live.iter_mut().map(|(h, t, _)| (h, t)).unzip();
        let a = host.forward_seqs(&tokens, &mut hs).unwrap();
        let b = tensor.forward_seqs(&tokens, &mut ts).unwrap();
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        worst = worst.max(diff / scale);
        let a: Vec<Vec<f32>> = a.to_vec2().unwrap();
        let b: Vec<Vec<f32>> = b.to_vec2().unwrap();
        for (i, (ra, rb)) in a.iter().zip(&b).enumerate() {
            let (na, nb) = (dialogd::model::gpt2::argmax(ra) as u32, dialogd::model::gpt2::argmax(rb) as u32);
            assert_eq!(na, nb, "step {step}, sequence {i}");
            live[i].2 = vec![na];
        }
        for (h, t, _) in &live {
            assert_eq!(h.len(), t.len());
        }
    }
    assert!(worst < 1e-5, "worst logit difference {worst} of the largest");
    eprintln!("tensor vs host caches: worst logit difference {worst:.2e} of the largest");
}

/// `quantize = "auto"`: 8-bit weights where they fit (f32 on the CPU with
/// widths that are multiples of 32), the same bits as `q8`; as loaded
/// where they do not (pico's n_embd is 8).
#[test]
fn auto_quantizes_where_it_fits() {
    use dialogd::model::ServingOptions;
    let auto = ServingOptions::parse("auto", "f32").unwrap();
    let dir = model_dir("small");
    let model = auto.load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert!(model.is_quantized(), "auto on the CPU makes 8-bit weights");
    let q8 = Gpt2::load_q8(&dir, &Device::Cpu).unwrap();
    let prompt = [50256u32, 15496, 11, 703];
    let logits = |m: &Gpt2| -> Vec<f32> {
        let mut cache = m.new_seq_cache(prompt.len()).unwrap();
        m.forward_seqs(&[&prompt], &mut [&mut cache]).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
    };
    assert_eq!(logits(&model), logits(&q8), "auto's 8-bit weights are q8's");
    let pico = auto.load(&model_dir("pico-safetensors"), DType::F32, &Device::Cpu).unwrap();
    assert!(!pico.is_quantized(), "n_embd 8 does not fit 8-bit blocks of 32: served as loaded");
    let f16 = auto.load(&model_dir("tiny"), DType::F16, &Device::Cpu).unwrap();
    assert!(!f16.is_quantized(), "an f16 model is served as loaded");
}
