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
}
