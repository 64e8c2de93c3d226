//! Deterministic random GPT-2 weights, for tests and benchmarks.
//!
//! The hub is out of reach where dialogd is tested, so the suite builds its
//! own checkpoints of any shape (including DialoGPT-small and -medium) from a
//! formula that `scripts/make_golden.py` implements identically in numpy.
//! The golden outputs that script produced with transformers therefore apply
//! to the very weights these functions write, without committing them:
//!
//! ```text
//! z = splitmix64(fnv1a64(name) ^ seed, index)      u = (z >> 11) · 2⁻⁵³ ∈ [0, 1)
//! w = center + scale · (2u − 1)                    (f64 arithmetic, stored as f32)
//! ```
//!
//! `scale` is divided by √fan-in for the projection matrices. The default
//! [`InitSpec`] uses larger-than-usual block weights and random LayerNorm
//! gains: with GPT-2's std-0.02 init a random model only repeats its last
//! token and greedy parity would prove nothing.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::Gpt2Config;
use super::ModelError;

/// How one kind of tensor is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InitRule {
    pub center: f64,
    pub scale: f64,
    /// Divide `scale` by √(first dimension).
    pub fan_in: bool,
}

/// Rules per tensor kind: `wte`, `wpe`, `ln_weight`, `ln_bias`,
/// `attn_c_attn`, `attn_c_proj`, `mlp_c_fc`, `mlp_c_proj`, `bias`, and for
/// rankers `score` (DialogRPT's head, see [`ranker_init`]).
pub type InitSpec = BTreeMap<String, InitRule>;

/// The rules `scripts/make_golden.py` uses.
pub fn default_init() -> InitSpec {
    let rule = |center, scale, fan_in| InitRule { center, scale, fan_in };
    [
        ("wte", rule(0.0, 0.1, false)),
        ("wpe", rule(0.0, 0.5, false)),
        ("ln_weight", rule(1.0, 0.5, false)),
        ("ln_bias", rule(0.0, 0.3, false)),
        ("attn_c_attn", rule(0.0, 1.5, true)),
        ("attn_c_proj", rule(0.0, 1.5, true)),
        ("mlp_c_fc", rule(0.0, 2.5, true)),
        ("mlp_c_proj", rule(0.0, 1.5, true)),
        ("bias", rule(0.0, 0.2, false)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// [`default_init`] plus the rule for DialogRPT's `score.weight` that
/// `scripts/make_golden_rpt.py` uses (scaled so a random ranker's scores
/// spread over (0, 1) rather than saturate).
pub fn ranker_init() -> InitSpec {
    let mut init = default_init();
    init.insert("score".to_string(), InitRule { center: 0.0, scale: 0.25, fan_in: false });
    init
}

fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3))
}

fn splitmix64(key: u64, index: u64) -> u64 {
    let mut z = key.wrapping_add((index + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn init_kind(name: &str) -> &'static str {
    match name {
        "score.weight" => "score",
        "wte.weight" => "wte",
        "wpe.weight" => "wpe",
        _ if name.contains(".ln_") || name.starts_with("ln_f") => {
            if name.ends_with("weight") {
                "ln_weight"
            } else {
                "ln_bias"
            }
        }
        _ if name.ends_with("bias") => "bias",
        _ if name.contains(".attn.c_attn") => "attn_c_attn",
        _ if name.contains(".attn.c_proj") => "attn_c_proj",
        _ if name.contains(".mlp.c_fc") => "mlp_c_fc",
        _ => "mlp_c_proj",
    }
}

/// The values of one named tensor.
pub fn tensor_values(name: &str, shape: &[usize], seed: u64, init: &InitSpec) -> Result<Vec<f32>, ModelError> {
    let kind = init_kind(name);
    let rule = init.get(kind).ok_or_else(|| ModelError::Config(format!("init spec has no rule for `{kind}`")))?;
    let mut scale = rule.scale;
    if rule.fan_in {
        scale /= (shape[0] as f64).sqrt();
    }
    let key = fnv1a64(name) ^ seed;
    let n: usize = shape.iter().product();
    Ok((0..n as u64)
        .map(|i| {
            let u = (splitmix64(key, i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            (rule.center + scale * (2.0 * u - 1.0)) as f32
        })
        .collect())
}

/// Every weight of a GPT-2 with this config, in `GPT2Model` naming.
pub fn tensor_shapes(cfg: &Gpt2Config) -> Vec<(String, Vec<usize>)> {
    let (e, inner) = (cfg.n_embd, cfg.inner_dim());
    let mut shapes = vec![
        ("wte.weight".to_string(), vec![cfg.vocab_size, e]),
        ("wpe.weight".to_string(), vec![cfg.n_positions, e]),
    ];
    for i in 0..cfg.n_layer {
        let p = format!("h.{i}");
        shapes.extend([
            (format!("{p}.ln_1.weight"), vec![e]),
            (format!("{p}.ln_1.bias"), vec![e]),
            (format!("{p}.attn.c_attn.weight"), vec![e, 3 * e]),
            (format!("{p}.attn.c_attn.bias"), vec![3 * e]),
            (format!("{p}.attn.c_proj.weight"), vec![e, e]),
            (format!("{p}.attn.c_proj.bias"), vec![e]),
            (format!("{p}.ln_2.weight"), vec![e]),
            (format!("{p}.ln_2.bias"), vec![e]),
            (format!("{p}.mlp.c_fc.weight"), vec![e, inner]),
            (format!("{p}.mlp.c_fc.bias"), vec![inner]),
            (format!("{p}.mlp.c_proj.weight"), vec![inner, e]),
            (format!("{p}.mlp.c_proj.bias"), vec![e]),
        ]);
    }
    shapes.push(("ln_f.weight".to_string(), vec![e]));
    shapes.push(("ln_f.bias".to_string(), vec![e]));
    shapes
}

/// All tensors of a synthetic GPT-2, f32 on the CPU.
pub fn synthetic_tensors(cfg: &Gpt2Config, seed: u64, init: &InitSpec) -> Result<BTreeMap<String, Tensor>, ModelError> {
    tensor_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let values = tensor_values(&name, &shape, seed, init)?;
            let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?;
            Ok((name, tensor))
        })
        .collect()
}

/// Writes a checkpoint folder (`config.json`, `model.safetensors` with the
/// `transformer.` prefix as `save_pretrained` writes it, and the tokenizer
/// files copied from `tokenizer_dir`).
pub fn write_checkpoint(
    dir: &Path,
    cfg: &Gpt2Config,
    seed: u64,
    init: &InitSpec,
    tokenizer_dir: &Path,
) -> Result<(), ModelError> {
    write_folder(dir, cfg, seed, init, tokenizer_dir, false)
}

/// Writes a DialogRPT-layout checkpoint: a `GPT2ForSequenceClassification`
/// with one label, i.e. the GPT-2 of [`write_checkpoint`] plus `score.weight`
/// (`[1, n_embd]`, no bias) drawn with the `score` rule (see [`ranker_init`]).
pub fn write_ranker_checkpoint(
    dir: &Path,
    cfg: &Gpt2Config,
    seed: u64,
    init: &InitSpec,
    tokenizer_dir: &Path,
) -> Result<(), ModelError> {
    write_folder(dir, cfg, seed, init, tokenizer_dir, true)
}

/// The head of a synthetic ranker, `[1, n_embd]`, f32 on the CPU.
pub fn synthetic_score(cfg: &Gpt2Config, seed: u64, init: &InitSpec) -> Result<Tensor, ModelError> {
    let shape = [1, cfg.n_embd];
    Ok(Tensor::from_vec(tensor_values("score.weight", &shape, seed, init)?, shape.to_vec(), &Device::Cpu)?)
}

fn write_folder(
    dir: &Path,
    cfg: &Gpt2Config,
    seed: u64,
    init: &InitSpec,
    tokenizer_dir: &Path,
    ranker: bool,
) -> Result<(), ModelError> {
    let io = |path: &Path, e: std::io::Error| ModelError::File { path: path.to_path_buf(), message: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut config = serde_json::to_value(cfg).map_err(|e| ModelError::Config(e.to_string()))?;
    config["model_type"] = serde_json::json!("gpt2");
    if ranker {
        config["architectures"] = serde_json::json!(["GPT2ForSequenceClassification"]);
        config["num_labels"] = serde_json::json!(1);
        config["pad_token_id"] = serde_json::json!(cfg.eos_token_id);
    } else {
        config["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    }
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap_or_default()).map_err(|e| io(&config_path, e))?;
    let mut tensors: std::collections::HashMap<String, Tensor> = synthetic_tensors(cfg, seed, init)?
        .into_iter()
        .map(|(name, t)| (format!("transformer.{name}"), t))
        .collect();
    if ranker {
        tensors.insert("score.weight".to_string(), synthetic_score(cfg, seed, init)?);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    for file in ["vocab.json", "merges.txt"] {
        let from = tokenizer_dir.join(file);
        std::fs::copy(&from, dir.join(file)).map_err(|e| io(&from, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_matches_known_values() {
        // Reference values printed by scripts/make_golden.py's numpy code:
        // splitmix_uniform(fnv1a64("wte.weight") ^ 1, 3).
        assert_eq!(fnv1a64(""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xAF63_DC4C_8601_EC8C);
        let init = default_init();
        let v = tensor_values("h.0.ln_1.weight", &[4], 1, &init).unwrap();
        assert!(v.iter().all(|x| (0.5..=1.5).contains(x)), "{v:?}");
        let a = tensor_values("h.0.attn.c_attn.weight", &[16, 48], 1, &init).unwrap();
        let b = tensor_values("h.0.attn.c_attn.weight", &[16, 48], 2, &init).unwrap();
        assert_ne!(a, b);
        assert!(a.iter().all(|x| x.abs() <= 1.5 / 4.0));
    }

    #[test]
    fn shapes_cover_every_parameter() {
        let cfg = Gpt2Config::dialogpt_small();
        let total: usize = tensor_shapes(&cfg).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(total, cfg.n_params());
    }
}
