//! GPT-2 for training: the inference network rebuilt from differentiable
//! candle ops, with trainable parameters as `Var`s.
//!
//! candle's fused `candle_nn::ops::layer_norm` and `softmax_last_dim` have
//! no backward pass: a loss built on them gives gradients to the token
//! embedding alone. Here layer norm is mean/variance arithmetic, softmax is
//! `exp(x - max) / sum` (the max is detached: softmax does not depend on
//! it), and masking is an added bias. The result matches
//! [`crate::model::Gpt2::forward_all`] on the same weights (tested), and
//! every trainable parameter receives a gradient (tested).
//!
//! Two modes: full fine-tuning (every weight a `Var`) and LoRA (weights
//! frozen; each `c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` gets
//! `x·Aᵀ·Bᵀ·(alpha/r)` added, as PEFT computes it). Training runs in f32
//! without dropout.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::{Result, SplitMix, TrainingError};
use crate::model::config::{Activation, Gpt2Config};
use crate::model::gpt2::read_config;
use crate::model::synthetic::tensor_shapes;
use crate::model::weights::{TensorStore, WeightsFile};
use crate::model::lora::LORA_TARGETS;
use crate::model::ModelError;

/// A weight of the network: trained, or held fixed.
#[derive(Debug, Clone)]
enum Param {
    Trainable(Var),
    Frozen(Tensor),
}

impl Param {
    fn tensor(&self) -> &Tensor {
        match self {
            Param::Trainable(v) => v.as_tensor(),
            Param::Frozen(t) => t,
        }
    }
}

/// The adapter's shape: rank and scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    pub rank: usize,
    /// The update is scaled by `alpha / rank`.
    pub alpha: f64,
}

impl LoraSettings {
    /// Rank `rank` with PEFT's habit of `alpha = 2 × rank`.
    pub fn with_rank(rank: usize) -> Self {
        Self { rank, alpha: 2.0 * rank as f64 }
    }

    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(TrainingError::Settings(format!(
                "LoRA needs a positive rank and alpha (have rank {}, alpha {})",
                self.rank, self.alpha
            )));
        }
        Ok(())
    }
}

/// One projection's LoRA pair: `a` is `[r, in]`, `b` is `[out, r]` (PEFT's
/// `lora_A.weight` / `lora_B.weight`).
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
}

/// What a trainable parameter is, for the optimizer.
#[derive(Debug, Clone)]
pub struct TrainableParam {
    /// Canonical weight name (`h.0.attn.c_attn.weight`) or LoRA name
    /// (`h.0.attn.c_attn.lora_A`).
    pub name: String,
    pub var: Var,
    /// Whether AdamW's weight decay applies: matrices (embeddings
    /// included) yes; biases and layer norms no (`LSP_train.py`'s
    /// `no_decay`); LoRA factors no (PEFT's default).
    pub decay: bool,
}

/// GPT-2 whose forward pass has gradients.
#[derive(Debug)]
pub struct TrainableGpt2 {
    config: Gpt2Config,
    /// Every weight of `GPT2Model`, by canonical name.
    params: BTreeMap<String, Param>,
    /// LoRA pairs by projection prefix (`h.0.attn.c_attn`), when training an
    /// adapter.
    lora: BTreeMap<String, LoraPair>,
    lora_settings: Option<LoraSettings>,
    device: Device,
}

/// Reads a checkpoint folder's config and every GPT-2 weight, f32, checked
/// for shape and finiteness.
pub fn load_weights(dir: &Path, device: &Device) -> Result<(Gpt2Config, BTreeMap<String, Tensor>)> {
    if !dir.is_dir() {
        return Err(ModelError::MissingFolder(dir.to_path_buf()).into());
    }
    let config = read_config(dir)?;
    let file = WeightsFile::find(dir)?;
    let mut store = TensorStore::load(&file, DType::F32, device)?;
    let mut weights = BTreeMap::new();
    for (name, shape) in tensor_shapes(&config) {
        let tensor = store.take(&name, &shape)?;
        weights.insert(name, tensor);
    }
    if store.contains("lm_head.weight") {
        // Tied to wte; only its shape is checked.
        store.discard("lm_head.weight", &[config.vocab_size, config.n_embd])?;
    }
    Ok((config, weights))
}

impl TrainableGpt2 {
    /// Loads a checkpoint folder for full fine-tuning (`lora: None`) or for
    /// training a LoRA adapter initialised from `seed`.
    pub fn load(dir: &Path, lora: Option<LoraSettings>, seed: u64, device: &Device) -> Result<Self> {
        let (config, weights) = load_weights(dir, device)?;
        Self::from_weights(config, weights, lora, seed, device)
    }

    /// Builds the model from weights in canonical naming (see
    /// [`load_weights`]).
    pub fn from_weights(
        config: Gpt2Config,
        weights: BTreeMap<String, Tensor>,
        lora: Option<LoraSettings>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let mut params = BTreeMap::new();
        for (name, shape) in tensor_shapes(&config) {
            let tensor = weights
                .get(&name)
                .ok_or_else(|| TrainingError::Settings(format!("weight `{name}` is missing")))?
                .to_dtype(DType::F32)?
                .to_device(device)?;
            if tensor.dims() != shape.as_slice() {
                return Err(TrainingError::Settings(format!("weight `{name}` has shape {:?}, expected {shape:?}", tensor.dims())));
            }
            let param = if lora.is_some() { Param::Frozen(tensor) } else { Param::Trainable(Var::from_tensor(&tensor)?) };
            params.insert(name, param);
        }
        let mut pairs = BTreeMap::new();
        if let Some(settings) = &lora {
            settings.validate()?;
            let mut rng = SplitMix::new(seed ^ 0x4C6F_5241);
            for prefix in lora_prefixes(&config) {
                let (n_in, n_out) = {
                    let w = params[&format!("{prefix}.weight")].tensor();
                    w.dims2()?
                };
                // PEFT's default: A ~ kaiming_uniform(a=√5), i.e. U(±1/√in);
                // B = 0, so the adapter starts as the identity.
                let bound = 1.0 / (n_in as f64).sqrt();
                let values: Vec<f32> =
                    (0..settings.rank * n_in).map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32).collect();
                let a = Var::from_tensor(&Tensor::from_vec(values, (settings.rank, n_in), device)?)?;
                let b = Var::zeros((n_out, settings.rank), DType::F32, device)?;
                pairs.insert(prefix, LoraPair { a, b });
            }
        }
        Ok(Self { config, params, lora: pairs, lora_settings: lora, device: device.clone() })
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn lora_settings(&self) -> Option<&LoraSettings> {
        self.lora_settings.as_ref()
    }

    /// The LoRA pairs by projection prefix (empty for full fine-tuning).
    pub fn lora_pairs(&self) -> &BTreeMap<String, LoraPair> {
        &self.lora
    }

    /// The parameters training updates, in a fixed order.
    pub fn trainable(&self) -> Vec<TrainableParam> {
        if self.lora_settings.is_some() {
            return self
                .lora
                .iter()
                .flat_map(|(prefix, pair)| {
                    [
                        TrainableParam { name: format!("{prefix}.lora_A"), var: pair.a.clone(), decay: false },
                        TrainableParam { name: format!("{prefix}.lora_B"), var: pair.b.clone(), decay: false },
                    ]
                })
                .collect();
        }
        self.params
            .iter()
            .filter_map(|(name, p)| match p {
                Param::Trainable(var) => Some(TrainableParam {
                    name: name.clone(),
                    var: var.clone(),
                    decay: var.rank() == 2,
                }),
                Param::Frozen(_) => None,
            })
            .collect()
    }

    /// Current weights in canonical naming, LoRA merged in (what a full
    /// checkpoint holds and what [`crate::model::Gpt2`] serves).
    pub fn merged_weights(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, param) in &self.params {
            let mut w = param.tensor().detach().copy()?;
            if let (Some(settings), Some(prefix)) = (&self.lora_settings, name.strip_suffix(".weight")) {
                if let Some(pair) = self.lora.get(prefix) {
                    w = (w + lora_delta(pair.a.as_tensor(), pair.b.as_tensor(), settings.scaling())?)?;
                }
            }
            out.insert(name.clone(), w);
        }
        Ok(out)
    }

    fn w(&self, name: &str) -> Result<&Tensor> {
        self.params
            .get(name)
            .map(Param::tensor)
            .ok_or_else(|| TrainingError::Settings(format!("no weight `{name}`")))
    }

    fn layer_norm(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.config.layer_norm_epsilon)?.sqrt()?)?;
        Ok(normed.broadcast_mul(self.w(&format!("{prefix}.weight"))?)?.broadcast_add(self.w(&format!("{prefix}.bias"))?)?)
    }

    /// A `Conv1D` (`x: [rows, in]` to `[rows, out]`), plus its LoRA update.
    fn conv1d(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let mut y = x.matmul(self.w(&format!("{prefix}.weight"))?)?.broadcast_add(self.w(&format!("{prefix}.bias"))?)?;
        if let (Some(settings), Some(pair)) = (&self.lora_settings, self.lora.get(prefix)) {
            let update = x.matmul(&pair.a.as_tensor().t()?)?.matmul(&pair.b.as_tensor().t()?)?;
            y = (y + (update * settings.scaling())?)?;
        }
        Ok(y)
    }

    /// Final hidden states `[batch * len, n_embd]` for `input_ids`
    /// (`[batch, len]`, u32) under `attn_bias` (`[batch or 1, 1, len, len]`,
    /// additive: 0 where a query may see a key, -inf where not).
    pub fn hidden(&self, input_ids: &Tensor, attn_bias: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let cfg = &self.config;
        if t == 0 || t > cfg.n_positions {
            return Err(TrainingError::Settings(format!("{t} positions do not fit the model's {}", cfg.n_positions)));
        }
        let (e, h) = (cfg.n_embd, cfg.n_head);
        let d = cfg.head_dim();
        let positions = Tensor::arange(0u32, t as u32, &self.device)?;
        let tokens = self.w("wte.weight")?.index_select(&input_ids.flatten_all()?, 0)?.reshape((b, t, e))?;
        let pos = self.w("wpe.weight")?.index_select(&positions, 0)?.unsqueeze(0)?;
        let mut x = tokens.broadcast_add(&pos)?.reshape((b * t, e))?;
        for layer in 0..cfg.n_layer {
            let p = format!("h.{layer}");
            let mut scale = 1.0;
            if cfg.scale_attn_weights {
                scale /= (d as f64).sqrt();
            }
            if cfg.scale_attn_by_inverse_layer_idx {
                scale /= (layer + 1) as f64;
            }
            let qkv = self.conv1d(&self.layer_norm(&x, &format!("{p}.ln_1"))?, &format!("{p}.attn.c_attn"))?;
            let qkv = qkv.reshape((b, t, 3 * e))?;
            let heads = |i: usize| -> Result<Tensor> {
                Ok(qkv.narrow(2, i * e, e)?.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?)
            };
            let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(attn_bias)?;
            let probs = softmax_last_dim(&scores)?;
            let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * t, e))?;
            x = (x + self.conv1d(&attn, &format!("{p}.attn.c_proj"))?)?;
            let m = self.conv1d(&self.layer_norm(&x, &format!("{p}.ln_2"))?, &format!("{p}.mlp.c_fc"))?;
            let m = match cfg.activation_function {
                Activation::GeluNew => m.gelu()?,
                Activation::Gelu => m.gelu_erf()?,
                Activation::Relu => m.relu()?,
                Activation::Silu => m.silu()?,
            };
            x = (x + self.conv1d(&m, &format!("{p}.mlp.c_proj"))?)?;
        }
        self.layer_norm(&x, "ln_f")
    }

    /// Logits `[rows, vocab]` for hidden states `[rows, n_embd]` (the head
    /// is tied to the token embedding).
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.matmul(&self.w("wte.weight")?.t()?)?)
    }

    /// Logits of every position, `[batch, len, vocab]`.
    pub fn logits(&self, input_ids: &Tensor, attn_bias: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        Ok(self.head(&self.hidden(input_ids, attn_bias)?)?.reshape((b, t, self.config.vocab_size))?)
    }

    /// The weighted next-token loss of a batch: `Σ w·nll / Σ w` over the
    /// positions with a positive weight (the others never reach the head).
    /// Returns the scalar loss and `Σ w·nll` as a plain number.
    pub fn loss(&self, batch: &super::data::Batch) -> Result<(Tensor, f64)> {
        let hidden = self.hidden(&batch.input_ids, &batch.attn_bias)?;
        let weights: Vec<f32> = batch.weights.flatten_all()?.to_vec1()?;
        let rows: Vec<u32> = weights.iter().enumerate().filter(|(_, &w)| w > 0.0).map(|(i, _)| i as u32).collect();
        if rows.is_empty() {
            return Err(TrainingError::Settings("a batch with no trained position".into()));
        }
        let rows = Tensor::new(rows.as_slice(), &self.device)?;
        let hidden = hidden.index_select(&rows, 0)?;
        let targets = batch.targets.flatten_all()?.index_select(&rows, 0)?;
        let weights = batch.weights.flatten_all()?.index_select(&rows, 0)?;
        let logits = self.head(&hidden)?;
        let nll = nll_rows(&logits, &targets)?;
        let weighted = (nll * &weights)?.sum_all()?;
        let total = weights.sum_all()?.to_scalar::<f32>()? as f64;
        let sum = weighted.to_scalar::<f32>()? as f64;
        Ok(((weighted / total)?, sum))
    }
}

/// The projections that get LoRA pairs, as prefixes (`h.0.attn.c_attn`).
pub fn lora_prefixes(config: &Gpt2Config) -> Vec<String> {
    (0..config.n_layer)
        .flat_map(|i| LORA_TARGETS.iter().map(move |t| format!("h.{i}.{t}")))
        .collect()
}

/// LoRA's update to a `Conv1D` weight `[in, out]`: `(B·A)ᵀ·scaling`.
pub fn lora_delta(a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    Ok((a.t()?.matmul(&b.t()?)? * scaling)?)
}

/// Softmax over the last dimension from differentiable ops.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    Ok(exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?)
}

/// Negative log-likelihood of `targets` (`[rows]`, u32) under `logits`
/// (`[rows, vocab]`), `[rows]`, from differentiable ops.
pub fn nll_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    Ok((log_sum - picked)?.squeeze(1)?)
}
