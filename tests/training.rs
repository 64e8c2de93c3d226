//! Fine-tuning: the differentiable forward against inference, gradients,
//! learning and memorising, checkpoints and adapters that round-trip,
//! resume, opt-out, and `dialogd train` on bad input.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dialogd::generate::generate;
use dialogd::model::Gpt2;
use dialogd::prompt::build_prompt;
use dialogd::sampling::SamplingParams;
use dialogd::tokenizer::DialogTokenizer;
use dialogd::training::checkpoint::save_hf_checkpoint;
use dialogd::training::data::{load_dialogues, Batch, Example};
use dialogd::training::lora::{save_adapter, LoraAdapter};
use dialogd::training::model::load_weights;
use dialogd::training::{load_persona, train, LoraSettings, OptOut, TrainConfig, TrainLength, TrainableGpt2};

use crate::support::{assert_fails_with, dialogd, fixtures, model_dir, stdout};

const EOS: u32 = 50256;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn example(inputs: &[u32]) -> Example {
    let n = inputs.len();
    let mut targets = inputs[1..].to_vec();
    targets.push(EOS);
    let weights = (0..n).map(|i| if i == 0 { 0.0 } else { 1.0 }).collect();
    Example { inputs: inputs.to_vec(), targets, weights }
}

/// Row `row`'s first `len` positions of `[b, t, v]` logits.
fn row(logits: &Tensor, row: usize, len: usize) -> Tensor {
    logits.get(row).unwrap().narrow(0, 0, len).unwrap()
}

#[test]
fn training_forward_matches_inference_logits() {
    for name in ["pico-safetensors", "tiny"] {
        let dir = model_dir(name);
        let inference = Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let trainable = TrainableGpt2::load(&dir, None, 0, &Device::Cpu).unwrap();
        let long: Vec<u32> = vec![15496, 11, 703, 389, 345, 30, EOS, 40, 716, 922, 13, EOS];
        let short: Vec<u32> = vec![31373, 10214, EOS, 5303];
        // A padded batch: each row's positions must equal that sequence run
        // alone through the inference model.
        let batch = Batch::new(&[&example(&long), &example(&short)], EOS, &Device::Cpu).unwrap();
        let logits = trainable.logits(&batch.input_ids, &batch.attn_bias).unwrap();
        for (i, seq) in [&long, &short].into_iter().enumerate() {
            let want = inference.forward_all(&inference.tokens_tensor(seq).unwrap(), &mut inference.new_cache()).unwrap();
            let want = want.squeeze(0).unwrap();
            let got = row(&logits, i, seq.len());
            let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let diff = max_abs_diff(&got, &want);
            eprintln!("{name} row {i}: max |Δlogit| {diff:.2e} (max |logit| {scale:.1})");
            assert!(diff / scale < 2e-5, "{name} row {i}: {diff}");
        }
    }
}

/// Every trainable parameter of a model gets a gradient that is not all
/// zero from one batch.
fn assert_every_parameter_gets_a_gradient(model: &TrainableGpt2) -> usize {
    let a = example(&[15496, 11, 703, 389, 345, 30, EOS, 40, 716]);
    let b = example(&[31373, 10214, EOS, 5303, 612]);
    let batch = Batch::new(&[&a, &b], EOS, &Device::Cpu).unwrap();
    let (loss, _) = model.loss(&batch).unwrap();
    let grads = loss.backward().unwrap();
    let params = model.trainable();
    let mut missing = Vec::new();
    for p in &params {
        match grads.get(p.var.as_tensor()) {
            None => missing.push(format!("{} (none)", p.name)),
            Some(g) => {
                let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                if !(norm > 0.0 && norm.is_finite()) {
                    missing.push(format!("{} (|g|² = {norm})", p.name));
                }
            }
        }
    }
    assert!(missing.is_empty(), "parameters without a gradient: {missing:?}");
    params.len()
}

#[test]
fn every_trainable_parameter_gets_a_gradient() {
    let dir = model_dir("tiny");
    let full = TrainableGpt2::load(&dir, None, 0, &Device::Cpu).unwrap();
    let n = assert_every_parameter_gets_a_gradient(&full);
    // wte, wpe, 12 per layer, ln_f's two.
    assert_eq!(n, 2 + 12 * full.config().n_layer + 2);

    // LoRA: B starts at zero, so A's gradient is zero until B moves (as in
    // PEFT); give B values and every A and B must get a gradient, while
    // the frozen base gets none.
    let lora = TrainableGpt2::load(&dir, Some(LoraSettings::with_rank(4)), 0, &Device::Cpu).unwrap();
    for pair in lora.lora_pairs().values() {
        let b = pair.b.as_tensor();
        pair.b.set(&(Tensor::randn(0f32, 0.1, b.shape(), &Device::Cpu).unwrap())).unwrap();
    }
    let n = assert_every_parameter_gets_a_gradient(&lora);
    assert_eq!(n, 2 * 4 * lora.config().n_layer);
}

#[test]
fn loss_matches_a_hand_computed_cross_entropy() {
    // The weighted loss equals −Σ w·log softmax(logits)[target] / Σ w,
    // computed here from the logits with plain f64 arithmetic.
    let dir = model_dir("pico-safetensors");
    let model = TrainableGpt2::load(&dir, None, 0, &Device::Cpu).unwrap();
    let mut a = example(&[15496, 11, 703, 389, EOS, 40, 716]);
    a.weights[3] = 0.5;
    let b = example(&[31373, EOS, 5303]);
    let batch = Batch::new(&[&a, &b], EOS, &Device::Cpu).unwrap();
    let (loss, _) = model.loss(&batch).unwrap();
    let logits = model.logits(&batch.input_ids, &batch.attn_bias).unwrap();
    let (mut num, mut den) = (0f64, 0f64);
    for (r, e) in [&a, &b].into_iter().enumerate() {
        for pos in 0..e.len() {
            let w = e.weights[pos] as f64;
            if w == 0.0 {
                continue;
            }
            let values: Vec<f32> = logits.get(r).unwrap().get(pos).unwrap().to_vec1().unwrap();
            let max = values.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = values.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
            num += w * (lse - values[e.targets[pos] as usize] as f64);
            den += w;
        }
    }
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got - num / den).abs() < 1e-4, "{got} vs {}", num / den);
}

/// A small corpus: colours of things, and one exchange repeated so it is
/// memorised.
fn write_corpus(dir: &Path) -> PathBuf {
    let things = [
        ("apple", "red"),
        ("sky", "blue"),
        ("grass", "green"),
        ("sun", "yellow"),
        ("sea", "blue"),
        ("snow", "white"),
        ("coal", "black"),
        ("rose", "red"),
        ("lemon", "yellow"),
        ("cloud", "grey"),
        ("frog", "green"),
        ("plum", "purple"),
        ("milk", "white"),
        ("ink", "black"),
        ("fire", "orange"),
        ("leaf", "green"),
        ("salt", "white"),
        ("gold", "yellow"),
        ("rust", "brown"),
        ("mint", "green"),
    ];
    let mut lines = Vec::new();
    for (thing, colour) in things {
        lines.push(serde_json::json!({"turns": [format!("what colour is the {thing}?"), format!("the {thing} is {colour}.")]}));
    }
    for _ in 0..8 {
        lines.push(serde_json::json!({"turns": [{"text": "hello bot", "author": "a1"}, {"text": "hi there, friend!", "author": "bot"}]}));
    }
    let path = dir.join("corpus.jsonl");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn greedy_reply(model: &Gpt2, tok: &DialogTokenizer, turn: &str) -> String {
    let prompt = build_prompt(&[tok.encode(turn).unwrap()], tok.eos_id(), 64).unwrap();
    let out = generate(model, &prompt.ids, &SamplingParams::greedy(16), |_| true).unwrap();
    tok.decode(&out.output_ids).unwrap()
}

#[test]
fn fine_tuning_lowers_held_out_loss_and_memorises_a_reply() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path());
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let base = model_dir("tiny");
    let cli = dialogd(&[
        "train", "--base", base.to_str().unwrap(), "--data", corpus.to_str().unwrap(), "--out", out_s,
        "--steps", "100", "--lr", "3e-3", "--batch-size", "8", "--eval-fraction", "0.2", "--json",
    ]);
    assert!(cli.status.success(), "{}", crate::support::stderr(&cli));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&cli)).unwrap();
    let before = summary["eval_before"]["loss"].as_f64().unwrap();
    let after = summary["eval_after"]["loss"].as_f64().unwrap();
    eprintln!("held-out loss {before:.3} → {after:.3}");
    assert!(after < 0.5 * before, "held-out loss {before} → {after}");
    assert_eq!(summary["gate"]["promote"], true);
    assert_eq!(summary["eval_examples"], 6);
    // The metrics file says the same.
    let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["eval_after"], summary["eval_after"]);
    for file in ["config.json", "model.safetensors", "vocab.json", "merges.txt", "generation_config.json"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    assert!(!out.join("checkpoints").exists(), "a finished run leaves no resumable state");

    let tok = DialogTokenizer::from_dir(&out).unwrap();
    let tuned = Gpt2::load(&out, DType::F32, &Device::Cpu).unwrap();
    let original = Gpt2::load(&base, DType::F32, &Device::Cpu).unwrap();
    assert_ne!(greedy_reply(&original, &tok, "hello bot"), "hi there, friend!");
    assert_eq!(greedy_reply(&tuned, &tok, "hello bot"), "hi there, friend!");
    // And through the command line, as a user would check it.
    let gen = dialogd(&["generate", "--model", out_s, "--greedy", "--json", "--max-new-tokens", "16", "--", "hello bot"]);
    let gen: serde_json::Value = serde_json::from_str(&stdout(&gen)).unwrap();
    assert_eq!(gen["text"], "hi there, friend!");
}

#[test]
fn a_saved_checkpoint_round_trips_with_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model_dir("tiny");
    let model = TrainableGpt2::load(&base, None, 0, &Device::Cpu).unwrap();
    // Move every weight off the base so a reload of the base would fail.
    for p in model.trainable() {
        let t = p.var.as_tensor();
        p.var.set(&(t + Tensor::randn(0f32, 0.01, t.shape(), &Device::Cpu).unwrap()).unwrap()).unwrap();
    }
    save_hf_checkpoint(tmp.path(), &model.merged_weights().unwrap(), &base).unwrap();
    // save_pretrained's naming: every tensor under `transformer.`, no head.
    let names: HashSet<String> =
        candle_core::safetensors::load(tmp.path().join("model.safetensors"), &Device::Cpu).unwrap().into_keys().collect();
    assert!(names.iter().all(|n| n.starts_with("transformer.")), "{names:?}");
    assert!(names.contains("transformer.h.2.mlp.c_proj.weight"));
    let reloaded = Gpt2::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let ids = [15496u32, 11, 703, 389, EOS, 40];
    let batch = Batch::new(&[&example(&ids)], EOS, &Device::Cpu).unwrap();
    let want = model.logits(&batch.input_ids, &batch.attn_bias).unwrap().squeeze(0).unwrap();
    let got = reloaded.forward_all(&reloaded.tokens_tensor(&ids).unwrap(), &mut reloaded.new_cache()).unwrap().squeeze(0).unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "{diff}");
    // The tokenizer came along (pico's base only has tokenizer.json: the
    // vocab/merges pair is extracted from it).
    let pico_out = tmp.path().join("pico");
    let (_, weights) = load_weights(&model_dir("pico-safetensors"), &Device::Cpu).unwrap();
    save_hf_checkpoint(&pico_out, &weights, &model_dir("pico-safetensors")).unwrap();
    let from_pair = DialogTokenizer::from_vocab_merges(&pico_out.join("vocab.json"), &pico_out.join("merges.txt")).unwrap();
    let reference = DialogTokenizer::from_dir(&fixtures().join("gpt2")).unwrap();
    let text = "Hello there, how's it going? Ünïcödé 🙂";
    assert_eq!(from_pair.encode(text).unwrap(), reference.encode(text).unwrap());
}

#[test]
fn a_lora_adapter_round_trips_and_serves_as_a_persona() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model_dir("tiny");
    let settings = LoraSettings { rank: 4, alpha: 16.0 };
    let model = TrainableGpt2::load(&base, Some(settings), 3, &Device::Cpu).unwrap();
    for pair in model.lora_pairs().values() {
        let b = pair.b.as_tensor();
        pair.b.set(&Tensor::randn(0f32, 0.2, b.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    let dir = tmp.path().join("persona");
    save_adapter(&dir, &model, "tiny").unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["fan_in_fan_out"], true);
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some(4), Some(16.0)));
    let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let a = &tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"];
    let b = &tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"];
    assert_eq!((a.dims(), b.dims()), (&[4, 64][..], &[192, 4][..]));
    assert_eq!(tensors.len(), 2 * 4 * 3);
    assert_eq!(LoraAdapter::load(&dir).unwrap().pairs.len(), 4 * 3);

    let persona = load_persona(&base, &dir, DType::F32, &Device::Cpu).unwrap();
    let ids = [15496u32, 11, 703, 389, EOS, 40];
    let batch = Batch::new(&[&example(&ids)], EOS, &Device::Cpu).unwrap();
    let want = model.logits(&batch.input_ids, &batch.attn_bias).unwrap().squeeze(0).unwrap();
    let got = persona.forward_all(&persona.tokens_tensor(&ids).unwrap(), &mut persona.new_cache()).unwrap().squeeze(0).unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "{diff}");
    let plain = Gpt2::load(&base, DType::F32, &Device::Cpu).unwrap();
    let unchanged = plain.forward_all(&plain.tokens_tensor(&ids).unwrap(), &mut plain.new_cache()).unwrap().squeeze(0).unwrap();
    assert!(max_abs_diff(&unchanged, &want) > 1e-2, "the adapter changes the model");

    // An adapter for another shape is refused with the file named.
    let err = load_persona(&model_dir("pico-safetensors"), &dir, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("persona") && err.contains("base model"), "{err}");
}

fn small_config(base: &Path, data: &Path, out: &Path) -> TrainConfig {
    let mut config = TrainConfig::new(base.to_path_buf(), vec![data.to_path_buf()], out.to_path_buf());
    config.length = TrainLength::Steps(6);
    config.lr = 2e-3;
    config.batch_size = 4;
    config.grad_accum = 2;
    config.checkpoint_every = 2;
    config.eval_fraction = 0.2;
    config
}

fn weights_of(dir: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap().into_iter().collect()
}

#[test]
fn a_stopped_run_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path());
    let base = model_dir("tiny");
    let whole = tmp.path().join("whole");
    let summary = train(&small_config(&base, &corpus, &whole), &|_| false).unwrap();
    assert_eq!((summary.steps, summary.stopped_early), (6, false));

    // Stopped after step 5: the newest checkpoint is step 4's, as if the
    // process had been killed during step 5 (or just after it).
    let split = tmp.path().join("split");
    let config = small_config(&base, &corpus, &split);
    let first = train(&config, &|step| step == 5).unwrap();
    assert!(first.stopped_early);
    assert!(!split.join("model.safetensors").exists());
    assert!(split.join("checkpoints").join("step-00000004").join("state.json").is_file());
    // Starting again without --resume is refused rather than clobbering.
    let err = train(&config, &|_| false).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    let mut resume = config.clone();
    resume.resume = true;
    let second = train(&resume, &|_| false).unwrap();
    assert_eq!((second.resumed_from_step, second.steps), (Some(4), 6));

    let (a, b) = (weights_of(&whole), weights_of(&split));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let worst = a.iter().map(|(k, t)| max_abs_diff(t, &b[k])).fold(0f32, f32::max);
    assert_eq!(worst, 0.0, "resumed weights differ by {worst}");
    // And training did move the weights.
    let (_, start) = load_weights(&base, &Device::Cpu).unwrap();
    assert!(max_abs_diff(&a["transformer.h.0.attn.c_attn.weight"], &start["h.0.attn.c_attn.weight"]) > 0.0);
    // A resume of a different run is refused.
    let mut other = resume.clone();
    other.out = tmp.path().join("other");
    train(&small_config(&base, &corpus, &other.out), &|step| step == 3).unwrap();
    other.lr = 1e-3;
    let err = train(&other, &|_| false).unwrap_err().to_string();
    assert!(err.contains("different run"), "{err}");
}

#[test]
fn an_opted_out_authors_lines_never_reach_a_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("log.jsonl");
    let lines = [
        r#"{"channel":"c1","turns":[{"text":"hi all","author":"h-alice"},{"text":"secret of bob","author":"h-bob"}],"time":1}"#,
        r#"{"channel":"c1","turns":[{"text":"bob said this","author":"h-bob"},{"text":"ok","author":"h-alice"}]}"#,
        r#"{"channel":"c1","turns":[{"text":"morning","author":"h-carol"},{"text":"morning!","author":"h-alice"},{"text":"bob again","author":"h-bob"}]}"#,
        r#"{"channel":"c2","turns":[{"text":"how are you","author":"h-carol"},{"text":"fine","author":"h-alice"}]}"#,
    ];
    std::fs::write(&path, lines.join("\n")).unwrap();
    let opt_out = OptOut::new(["h-bob".to_string()]);
    let (dialogues, report) = load_dialogues(std::slice::from_ref(&path), &opt_out).unwrap();
    assert_eq!(report.opted_out, 3);
    assert_eq!(dialogues.len(), 1);
    for d in &dialogues {
        for t in &d.turns {
            assert_ne!(t.author.as_deref(), Some("h-bob"));
            assert!(!t.text.contains("bob"), "{t:?}");
        }
    }
    // Without the opt-out, all four are there (the filter is what removed them).
    assert_eq!(load_dialogues(std::slice::from_ref(&path), &OptOut::default()).unwrap().0.len(), 4);

    // Through the command line: --opt-out names a file of hashes; with
    // every record of the remaining data opted out, there is nothing left.
    let list = tmp.path().join("opt-out.txt");
    std::fs::write(&list, "# forgotten authors\nh-bob\nh-alice\n").unwrap();
    let out = dialogd(&[
        "train", "--base", model_dir("pico-safetensors").to_str().unwrap(), "--data", path.to_str().unwrap(),
        "--out", tmp.path().join("o").to_str().unwrap(), "--opt-out", list.to_str().unwrap(), "--steps", "1",
    ]);
    assert_fails_with(&out, "4 record(s) opted out");
}

#[test]
fn train_reports_bad_input_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let pico = model_dir("pico-safetensors");
    let pico_s = pico.to_str().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();

    let missing = tmp.path().join("nope.jsonl");
    let run = dialogd(&["train", "--base", pico_s, "--data", missing.to_str().unwrap(), "--out", out_s]);
    assert_fails_with(&run, "nope.jsonl");

    // Malformed lines are reported (file and line) and skipped.
    let data = tmp.path().join("mixed.jsonl");
    std::fs::write(&data, "{\"turns\":[\"a\",\"b\"]}\n{\"turns\":[\"torn\n{\"turns\":[\"only one\"]}\n{\"turns\":[\"c\",\"d\"]}\n").unwrap();
    let run = dialogd(&["train", "--base", pico_s, "--data", data.to_str().unwrap(), "--out", out_s, "--steps", "1", "--json"]);
    assert!(run.status.success(), "{}", crate::support::stderr(&run));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&run)).unwrap();
    let skipped: Vec<u64> = summary["data"]["skipped"].as_array().unwrap().iter().map(|s| s["line"].as_u64().unwrap()).collect();
    assert_eq!(skipped, vec![2, 3]);
    assert_eq!(summary["data"]["dialogues"], 2);

    // Nothing usable: a clear error.
    let empty = tmp.path().join("empty.tsv");
    std::fs::write(&empty, "no tab here\n").unwrap();
    let run = dialogd(&["train", "--base", pico_s, "--data", empty.to_str().unwrap(), "--out", out_s]);
    assert_fails_with(&run, "no training examples");

    // A corrupt base names its file.
    let corrupt = tmp.path().join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(pico.join(f), corrupt.join(f)).unwrap();
    }
    std::fs::write(corrupt.join("model.safetensors"), b"garbage").unwrap();
    let run = dialogd(&["train", "--base", corrupt.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out_s]);
    assert_fails_with(&run, "model.safetensors");

    let run = dialogd(&["train", "--base", pico_s, "--data", data.to_str().unwrap(), "--out", out_s, "--epochs", "1", "--steps", "2"]);
    assert!(!run.status.success());
    let run = dialogd(&["train", "--base", pico_s, "--data", data.to_str().unwrap(), "--out", out_s, "--lr=-1"]);
    assert_fails_with(&run, "--lr");
}

#[test]
fn lora_training_through_the_cli_writes_a_peft_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path());
    let out = tmp.path().join("persona");
    let base = model_dir("tiny");
    let run = dialogd(&[
        "train", "--base", base.to_str().unwrap(), "--data", corpus.to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--steps", "30", "--lr", "1e-2", "--lora-rank", "8", "--eval-fraction", "0.2", "--json",
    ]);
    assert!(run.status.success(), "{}", crate::support::stderr(&run));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&run)).unwrap();
    let (before, after) = (summary["eval_before"]["loss"].as_f64().unwrap(), summary["eval_after"]["loss"].as_f64().unwrap());
    assert!(after < before, "LoRA held-out loss {before} → {after}");
    assert!(out.join("adapter_config.json").is_file() && out.join("adapter_model.safetensors").is_file());
    assert!(!out.join("model.safetensors").exists(), "an adapter run writes no full checkpoint");
    // The persona serves: merged into the base it gives different logits
    // from the base alone.
    let persona = load_persona(&base, &out, DType::F32, &Device::Cpu).unwrap();
    let plain = Gpt2::load(&base, DType::F32, &Device::Cpu).unwrap();
    let ids = [31373u32, 10214, EOS];
    let a = persona.forward(&persona.tokens_tensor(&ids).unwrap(), &mut persona.new_cache()).unwrap();
    let b = plain.forward(&plain.tokens_tensor(&ids).unwrap(), &mut plain.new_cache()).unwrap();
    assert!(max_abs_diff(&a, &b) > 1e-3);
}
