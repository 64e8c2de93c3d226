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
    let n: usize = shape.iter().product();
    Ok(uniform_values(name, n, seed, rule.center, scale))
}

/// `n` values `center + scale · (2u − 1)` of the formula above, keyed by
/// `name` and `seed` (f64 arithmetic, stored as f32); other synthetic
/// models (`safety::classifier::synthetic`) draw with their own rules.
pub fn uniform_values(name: &str, n: usize, seed: u64, center: f64, scale: f64) -> Vec<f32> {
    let key = fnv1a64(name) ^ seed;
    (0..n as u64)
        .map(|i| {
            let u = (splitmix64(key, i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            (center + scale * (2.0 * u - 1.0)) as f32
        })
        .collect()
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
    let mut tensors = synthetic_tensors(cfg, seed, init)?;
    if ranker {
        tensors.insert("score.weight".to_string(), synthetic_score(cfg, seed, init)?);
    }
    write_tensors(dir, cfg, tensors, tokenizer_dir, ranker)
}

/// `config.json`, `model.safetensors` (GPT-2 tensors under `transformer.`,
/// as `save_pretrained` writes them; `score.weight` as it is) and the
/// tokenizer files copied from `tokenizer_dir`.
fn write_tensors(
    dir: &Path,
    cfg: &Gpt2Config,
    tensors: BTreeMap<String, Tensor>,
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
    let tensors: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| if name == "score.weight" { (name, t) } else { (format!("transformer.{name}"), t) })
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    for file in ["vocab.json", "merges.txt"] {
        let from = tokenizer_dir.join(file);
        std::fs::copy(&from, dir.join(file)).map_err(|e| io(&from, e))?;
    }
    Ok(())
}

/// A scripted next-token table: for a token, the tokens that may follow it
/// and their logits. Every token the script does not name after it gets a
/// logit of about 0 (the token itself about 1).
pub type BigramScript = [(u32, Vec<(u32, f32)>)];

/// The weights of a GPT-2 whose next token depends only on the current one,
/// as `script` says: a model that "says `yes<|endoftext|>` or repeats `no`"
/// for tests of what the daemon does with such replies. Attention and
/// position embeddings are zero; each scripted token has its own pair of
/// embedding dimensions (`+s`, `−s`, so LayerNorm keeps its direction) and
/// one MLP unit that fires on it alone and writes the scripted followers'
/// directions, plus a spare "sink" direction that brings every scripted
/// state to the same norm. With the final LayerNorm's gain `G`, the logit
/// of a follower `j` is then exactly its scripted value.
///
/// Needs `2 × (scripted tokens + 1) ≤ n_embd` and as many MLP units;
/// errors name what does not fit.
pub fn bigram_tensors(cfg: &Gpt2Config, script: &BigramScript) -> Result<BTreeMap<String, Tensor>, ModelError> {
    let (n, inner) = (cfg.n_embd, cfg.n_inner.unwrap_or(4 * cfg.n_embd));
    let mut keys: Vec<u32> = Vec::new();
    for (from, next) in script {
        for id in std::iter::once(from).chain(next.iter().map(|(j, _)| j)) {
            if *id as usize >= cfg.vocab_size {
                return Err(ModelError::Config(format!("bigram script: token {id} is outside the vocabulary")));
            }
            if !keys.contains(id) {
                keys.push(*id);
            }
        }
    }
    if 2 * (keys.len() + 1) > n || keys.len() > inner {
        return Err(ModelError::Config(format!("bigram script: {} tokens need n_embd ≥ {}", keys.len(), 2 * (keys.len() + 1))));
    }
    let code = |id: u32| keys.iter().position(|k| *k == id).unwrap_or(0);
    let sink = keys.len();
    // Embedding scale, final gain and the norm every scripted state gets.
    let (scale, gain, sigma) = (1.0f64, 10.0f64, 20.0f64);
    let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
    // LayerNorm turns an embedding into ±√(n/2) on its pair.
    let r = (n as f64 / 2.0).sqrt();
    let fired = gelu(r);
    let mut tensors: BTreeMap<String, Vec<f32>> = tensor_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let fill = if name.ends_with("ln_1.weight") || name.ends_with("ln_2.weight") { 1.0 } else { 0.0 };
            (name, vec![fill; shape.iter().product()])
        })
        .collect();
    let mut set = |name: &str, idx: usize, value: f64| {
        if let Some(t) = tensors.get_mut(name) {
            t[idx] = value as f32;
        }
    };
    for (k, key) in keys.iter().enumerate() {
        set("wte.weight", *key as usize * n + 2 * k, scale);
        set("wte.weight", *key as usize * n + 2 * k + 1, -scale);
    }
    for (from, next) in script {
        let k = code(*from);
        // The unit that fires on `from`: Conv1D weights are [in, out].
        set("h.0.mlp.c_fc.weight", (2 * k) * inner + k, 1.0);
        set("h.0.mlp.c_fc.weight", (2 * k + 1) * inner + k, -1.0);
        set("h.0.mlp.c_fc.bias", k, -r);
        // What it writes: a follower j's pair gets a_j = z_j·σ/(2·G·s).
        let mut coefficient = vec![0f64; keys.len()];
        coefficient[k] += scale;
        for (j, logit) in next {
            coefficient[code(*j)] += *logit as f64 * sigma / (2.0 * gain * scale);
        }
        let squares: f64 = coefficient.iter().map(|c| c * c).sum();
        let sink_sq = sigma * sigma * n as f64 / 2.0 - squares;
        if sink_sq < 0.0 {
            return Err(ModelError::Config(format!("bigram script: the logits after token {from} are too large")));
        }
        for (c, value) in coefficient.iter().enumerate() {
            let written = if c == k { value - scale } else { *value };
            set("h.0.mlp.c_proj.weight", k * n + 2 * c, written / fired);
            set("h.0.mlp.c_proj.weight", k * n + 2 * c + 1, -written / fired);
        }
        set("h.0.mlp.c_proj.weight", k * n + 2 * sink, sink_sq.sqrt() / fired);
        set("h.0.mlp.c_proj.weight", k * n + 2 * sink + 1, -sink_sq.sqrt() / fired);
    }
    if let Some(g) = tensors.get_mut("ln_f.weight") {
        g.iter_mut().for_each(|v| *v = gain as f32);
    }
    let shapes: BTreeMap<String, Vec<usize>> = tensor_shapes(cfg).into_iter().collect();
    tensors
        .into_iter()
        .map(|(name, values)| {
            let shape = shapes[&name].clone();
            Ok((name, Tensor::from_vec(values, shape, &Device::Cpu)?))
        })
        .collect()
}

/// Writes a checkpoint folder of [`bigram_tensors`] (one layer), as
/// [`write_checkpoint`] does.
pub fn write_bigram_checkpoint(dir: &Path, cfg: &Gpt2Config, script: &BigramScript, tokenizer_dir: &Path) -> Result<(), ModelError> {
    if cfg.n_layer != 1 {
        return Err(ModelError::Config("a bigram model has one layer".into()));
    }
    let tensors = bigram_tensors(cfg, script)?;
    write_tensors(dir, cfg, tensors, tokenizer_dir, false)
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
