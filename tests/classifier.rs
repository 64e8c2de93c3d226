//! The safety classifier against Hugging Face transformers: tiny BERT,
//! RoBERTa, XLM-R and DistilBERT sequence classifiers, multi- and
//! single-label (golden file from scripts/make_golden_toxic.py), long texts
//! in windows, batched versus one at a time, a `pytorch_model.bin` torch
//! wrote, and broken folders.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use dialogd::safety::classifier::hf::{Activation, HfClassifier};
use dialogd::safety::classifier::synthetic::write_checkpoint;
use dialogd::safety::ToxicityClassifier;
use serde_json::Value;

use crate::support::{cached_checkpoint, fixtures, ids, strings};

const MODELS: [&str; 8] = [
    "bert-multi",
    "bert-single",
    "roberta-multi",
    "roberta-single",
    "xlmr-multi",
    "xlmr-single",
    "distilbert-multi",
    "distilbert-single",
];

fn golden() -> &'static Value {
    static GOLDEN: OnceLock<Value> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let path = fixtures().join("classifiers").join("golden.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    })
}

fn tokenizer_json(kind: &str) -> String {
    std::fs::read_to_string(fixtures().join("classifiers").join(format!("{kind}.json"))).unwrap()
}

/// The golden model's folder, written once per run from the formula.
pub fn classifier_dir(name: &str) -> PathBuf {
    let spec = &golden()["models"][name];
    let key = format!("classifier{name}{}{}{}", spec["config"], spec["seed"], golden()["init"]);
    cached_checkpoint(&key, name, |dir| {
        let tensors: Vec<(String, Vec<usize>)> = spec["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t[0].as_str().unwrap().to_string(), ids(&t[1]).into_iter().map(|d| d as usize).collect()))
            .collect();
        let tokenizer = tokenizer_json(spec["tokenizer"].as_str().unwrap());
        write_checkpoint(dir, &spec["config"], &tokenizer, &tensors, spec["seed"].as_u64().unwrap()).unwrap();
    })
}

fn texts() -> Vec<String> {
    strings(&golden()["texts"])
}

fn want(name: &str) -> Vec<Vec<f64>> {
    golden()["models"][name]["probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect()
}

fn worst(got: &[Vec<f32>], want: &[Vec<f64>]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .flat_map(|(g, w)| {
            assert_eq!(g.len(), w.len());
            g.iter().zip(w).map(|(a, b)| (*a as f64 - b).abs())
        })
        .fold(0.0, f64::max)
}

#[test]
fn classifiers_match_transformers() {
    let texts = texts();
    for name in MODELS {
        let spec = &golden()["models"][name];
        let model = HfClassifier::load(&classifier_dir(name), &Device::Cpu).unwrap();
        assert_eq!(model.architecture().class_name(), spec["architecture"].as_str().unwrap());
        let labels: Vec<String> = (0..model.labels().len()).map(|i| spec["config"]["id2label"][i.to_string()].as_str().unwrap().to_string()).collect();
        assert_eq!(model.labels(), labels.as_slice(), "{name}: labels in id order");
        let multi = spec["config"]["problem_type"] == "multi_label_classification";
        assert_eq!(model.activation(), if multi { Activation::Sigmoid } else { Activation::Softmax }, "{name}");
        assert_eq!(model.window(), spec["window"].as_u64().unwrap() as usize, "{name}");
        // The windows are the ones transformers saw.
        for (i, text) in texts.iter().enumerate() {
            let windows = model.windows(text).unwrap();
            assert_eq!(windows.len() as u64, spec["windows"][i].as_u64().unwrap(), "{name}: windows of text {i}");
            assert_eq!(windows[0], ids(&spec["first_window_ids"][i]), "{name}: ids of text {i}");
            assert!(windows.iter().all(|w| w.len() <= model.window()));
        }
        let one_at_a_time: Vec<Vec<f32>> = texts.iter().map(|t| model.probabilities(&[t.as_str()]).unwrap().remove(0)).collect();
        let diff = worst(&one_at_a_time, &want(name));
        eprintln!("{name}: worst |p - transformers| = {diff:.2e}");
        assert!(diff < 1e-4, "{name}: {diff}");
        if !multi {
            // A one-window text's softmax sums to 1 (a longer one's row is a
            // maximum over windows).
            for (i, row) in one_at_a_time.iter().enumerate().filter(|(i, _)| spec["windows"][i] == 1) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{name}: softmax row {i} sums to 1");
            }
        }
    }
    // Several texts need several windows, one of them more than 512 tokens' worth.
    let windows = golden()["models"]["bert-multi"]["windows"].as_array().unwrap();
    assert!(windows.iter().filter(|w| w.as_u64().unwrap() > 1).count() >= 2);
    assert!(windows.iter().any(|w| w.as_u64().unwrap() * 64 > 512));
}

#[test]
fn batched_equals_one_at_a_time() {
    let texts = texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for name in MODELS {
        let model = HfClassifier::load(&classifier_dir(name), &Device::Cpu).unwrap();
        let batched = model.probabilities(&refs).unwrap();
        let alone: Vec<Vec<f32>> = refs.iter().map(|t| model.probabilities(&[t]).unwrap().remove(0)).collect();
        let alone64: Vec<Vec<f64>> = alone.iter().map(|r| r.iter().map(|&x| x as f64).collect()).collect();
        let diff = worst(&batched, &alone64);
        assert!(diff < 1e-5, "{name}: batched differs by {diff}");
        assert!(diff < 1e-4 && worst(&batched, &want(name)) < 1e-4, "{name}");
        // An empty batch is an empty answer.
        assert!(model.probabilities(&[]).unwrap().is_empty());
    }
}

#[test]
fn a_pytorch_bin_torch_wrote_loads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let from = fixtures().join("classifiers").join("distilbert-single");
    std::fs::copy(from.join("pytorch_model.bin"), dir.path().join("pytorch_model.bin")).unwrap();
    std::fs::copy(from.join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer_json("bert")).unwrap();
    let model = HfClassifier::load(dir.path(), &Device::Cpu).unwrap();
    let texts = texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let diff = worst(&model.probabilities(&refs).unwrap(), &want("distilbert-single"));
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn broken_classifier_folders_fail_clearly() {
    let good = classifier_dir("bert-multi");
    let copy = |skip: &str| {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            if f != skip {
                std::fs::copy(good.join(f), dir.path().join(f)).unwrap();
            }
        }
        dir
    };
    let message = |dir: &std::path::Path| HfClassifier::load(dir, &Device::Cpu).unwrap_err().to_string();
    assert!(message(copy("tokenizer.json").path()).contains("no tokenizer.json"));
    assert!(message(copy("model.safetensors").path()).contains("no weights"));
    assert!(message(copy("config.json").path()).contains("config.json"));
    // An architecture this does not read, by name.
    let dir = copy("");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    config["architectures"] = serde_json::json!(["GPT2ForSequenceClassification"]);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    assert!(message(dir.path()).contains("GPT2ForSequenceClassification"));
    // Weights of another shape: the tensor is named.
    let dir = copy("");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    config["hidden_size"] = serde_json::json!(32);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    assert!(message(dir.path()).contains("bert.embeddings"), "{}", message(dir.path()));
}


