//! Deterministic random weights for sequence classifiers in the Hugging
//! Face layout, for the parity tests and benchmarks.
//!
//! Every tensor is drawn with the formula of `crate::model::synthetic`
//! (keyed by its name and a seed) under a rule per kind of tensor, the
//! rules `scripts/make_golden_toxic.py` uses, so the golden probabilities
//! that script computed with transformers apply to the checkpoints
//! [`write_checkpoint`] writes:
//!
//! | kind | tensors | center, scale |
//! |---|---|---|
//! | `norm_weight`, `norm_bias` | names with `norm` (any case) | 1, 0.5 / 0, 0.3 |
//! | `embedding` | other `…embeddings…` tensors | 0, 1 |
//! | `bias` | other `…bias` | 0, 0.2 |
//! | `head` | `classifier.weight`, `classifier.out_proj.weight` | 0, 4/√fan-in |
//! | `linear` | every other matrix `[out, in]` | 0, 2/√fan-in |

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::super::SafetyError;

/// `(center, scale, divide scale by √fan-in)` of a tensor kind.
fn rule(kind: &str) -> (f64, f64, bool) {
    match kind {
        "norm_weight" => (1.0, 0.5, false),
        "norm_bias" => (0.0, 0.3, false),
        "embedding" => (0.0, 1.0, false),
        "bias" => (0.0, 0.2, false),
        "head" => (0.0, 4.0, true),
        _ => (0.0, 2.0, true),
    }
}

/// The kind of a tensor, by its transformers name.
pub fn init_kind(name: &str) -> &'static str {
    if name.to_ascii_lowercase().contains("norm") {
        if name.ends_with("weight") {
            "norm_weight"
        } else {
            "norm_bias"
        }
    } else if name.contains("embeddings") {
        "embedding"
    } else if name.ends_with("bias") {
        "bias"
    } else if name == "classifier.weight" || name == "classifier.out_proj.weight" {
        "head"
    } else {
        "linear"
    }
}

/// The values of one named tensor of `shape` (row-major).
pub fn tensor_values(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let (center, mut scale, fan_in) = rule(init_kind(name));
    if fan_in && shape.len() == 2 {
        scale /= (shape[1] as f64).sqrt();
    }
    let n: usize = shape.iter().product();
    crate::model::synthetic::uniform_values(name, n, seed, center, scale)
}

/// Writes a classifier folder: `config.json` (as given), `tokenizer.json`
/// (the given text) and `model.safetensors` holding each named tensor of
/// `tensors` drawn with `seed`.
///
/// Errors: the folder cannot be written.
pub fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    tokenizer_json: &str,
    tensors: &[(String, Vec<usize>)],
    seed: u64,
) -> Result<(), SafetyError> {
    let io = |e: std::io::Error| SafetyError::Classifier(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap_or_default()).map_err(io)?;
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json).map_err(io)?;
    let mut map = HashMap::new();
    for (name, shape) in tensors {
        let values = tensor_values(name, shape, seed);
        let tensor = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)
            .map_err(|e| SafetyError::Classifier(format!("{name}: {e}")))?;
        map.insert(name.clone(), tensor);
    }
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))
        .map_err(|e| SafetyError::Classifier(format!("{}: {e}", dir.display())))
}

/// Writes a one-layer BERT classifier built by hand to detect one `word`:
/// labels `toxicity` (about 1.0 when the word is in the text, 0.007 when
/// not) and `insult` (always 0.007). Tests use it to see the daemon act on
/// the classifier's verdict.
///
/// Its tokenizer knows only `word` (lowercased, split on whitespace and
/// punctuation; everything else is `[UNK]`). Only the word's embedding is
/// non-zero, `[5, -5, 0, 0]`; attention is uniform (zero queries and keys)
/// with identity values, so `[CLS]` takes the mean of the tokens, which the
/// LayerNorm scales back to `±√2` whatever the text's length; the pooler
/// passes it to `toxicity = 10·(x₀ − x₁) − 5`.
pub fn write_word_detector(dir: &Path, word: &str) -> Result<(), SafetyError> {
    const D: usize = 4;
    const POSITIONS: usize = 64;
    let vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", word];
    let config = serde_json::json!({
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "vocab_size": vocab.len(),
        "hidden_size": D,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "intermediate_size": D,
        "hidden_act": "gelu",
        "max_position_embeddings": POSITIONS,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "problem_type": "multi_label_classification",
        "id2label": {"0": "toxicity", "1": "insult"},
        "label2id": {"toxicity": 0, "insult": 1},
    });
    let added: Vec<serde_json::Value> = vocab[..4]
        .iter()
        .enumerate()
        .map(|(id, t)| {
            serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let special = |name: &str, id: usize| serde_json::json!({"id": name, "ids": [id], "tokens": [name]});
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": special("[CLS]", 2), "[SEP]": special("[SEP]", 3)},
        },
        "decoder": null,
        "model": {
            "type": "WordLevel",
            "vocab": vocab.iter().enumerate().map(|(i, t)| (t.to_string(), serde_json::json!(i))).collect::<serde_json::Map<_, _>>(),
            "unk_token": "[UNK]",
        },
    });
    let identity: Vec<f32> = (0..D * D).map(|i| if i % (D + 1) == 0 { 1.0 } else { 0.0 }).collect();
    let mut word_embeddings = vec![0f32; vocab.len() * D];
    word_embeddings[4 * D] = 5.0;
    word_embeddings[4 * D + 1] = -5.0;
    let mut head = vec![0f32; 2 * D];
    head[0] = 10.0;
    head[1] = -10.0;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
        ("bert.embeddings.word_embeddings.weight".into(), vec![vocab.len(), D], word_embeddings),
        ("bert.embeddings.position_embeddings.weight".into(), vec![POSITIONS, D], vec![0.0; POSITIONS * D]),
        ("bert.embeddings.token_type_embeddings.weight".into(), vec![1, D], vec![0.0; D]),
        ("bert.pooler.dense.weight".into(), vec![D, D], identity.clone()),
        ("bert.pooler.dense.bias".into(), vec![D], vec![0.0; D]),
        ("classifier.weight".into(), vec![2, D], head),
        ("classifier.bias".into(), vec![2], vec![-5.0, -5.0]),
    ];
    let l = "bert.encoder.layer.0";
    for (name, shape, values) in [
        ("attention.self.query.weight", vec![D, D], vec![0.0; D * D]),
        ("attention.self.key.weight", vec![D, D], vec![0.0; D * D]),
        ("attention.self.value.weight", vec![D, D], identity.clone()),
        ("attention.output.dense.weight", vec![D, D], identity.clone()),
        ("intermediate.dense.weight", vec![D, D], vec![0.0; D * D]),
        ("output.dense.weight", vec![D, D], vec![0.0; D * D]),
    ] {
        tensors.push((format!("{l}.{name}"), shape, values));
        let bias = name.replace("weight", "bias");
        tensors.push((format!("{l}.{bias}"), vec![D], vec![0.0; D]));
    }
    for norm in ["bert.embeddings.LayerNorm", &format!("{l}.attention.output.LayerNorm"), &format!("{l}.output.LayerNorm")] {
        tensors.push((format!("{norm}.weight"), vec![D], vec![1.0; D]));
        tensors.push((format!("{norm}.bias"), vec![D], vec![0.0; D]));
    }
    let io = |e: std::io::Error| SafetyError::Classifier(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(io)?;
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).map_err(io)?;
    let mut map = HashMap::new();
    for (name, shape, values) in tensors {
        let tensor = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)
            .map_err(|e| SafetyError::Classifier(format!("{name}: {e}")))?;
        map.insert(name, tensor);
    }
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))
        .map_err(|e| SafetyError::Classifier(format!("{}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_names() {
        assert_eq!(init_kind("bert.embeddings.LayerNorm.weight"), "norm_weight");
        assert_eq!(init_kind("distilbert.transformer.layer.0.sa_layer_norm.bias"), "norm_bias");
        assert_eq!(init_kind("roberta.embeddings.word_embeddings.weight"), "embedding");
        assert_eq!(init_kind("classifier.out_proj.weight"), "head");
        assert_eq!(init_kind("classifier.out_proj.bias"), "bias");
        assert_eq!(init_kind("bert.encoder.layer.1.attention.self.query.weight"), "linear");
        let v = tensor_values("classifier.weight", &[2, 16], 7);
        assert!(v.iter().all(|x| x.abs() <= 1.0) && v.iter().any(|x| x.abs() > 0.5));
    }

    #[test]
    fn the_word_detector_sees_its_word_and_nothing_else() {
        use crate::safety::ToxicityClassifier;
        let dir = tempfile::tempdir().unwrap();
        write_word_detector(dir.path(), "grumpkin").unwrap();
        let model = super::super::hf::HfClassifier::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(model.labels(), ["toxicity", "insult"]);
        let long = format!("{} Grumpkin!", "hello there ".repeat(60));
        let rows = model.probabilities(&["you grumpkin", "GRUMPKIN.", "you pumpkin", "", &long]).unwrap();
        assert!(rows[0][0] > 0.999 && rows[1][0] > 0.999 && rows[4][0] > 0.999, "{rows:?}");
        assert!(rows[2][0] < 0.01 && rows[3][0] < 0.01, "{rows:?}");
        assert!(rows.iter().all(|r| r[1] < 0.01));
    }
}
