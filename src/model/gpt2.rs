//! GPT-2, the network behind DialoGPT and DialogRPT.
//!
//! Radford et al., "Language Models are Unsupervised Multitask Learners"
//! (2019); Zhang et al., "DialoGPT" (2020). Pre-LayerNorm transformer
//! decoder with learned absolute positions and a head tied to the token
//! embedding. Tensor names mirror Hugging Face's `GPT2Model`; the projection
//! layers are `Conv1D`, whose weights are stored `[in, out]`, so they multiply
//! from the right without a transpose.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::config::{Activation, Gpt2Config};
use super::weights::{TensorStore, WeightsFile};
use super::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

/// Keys and values of every layer for the tokens seen so far.
///
/// Each layer holds `[batch, n_head, len, head_dim]` tensors. The cache
/// belongs to the caller, so one model can serve many sequences.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        Self { layers: vec![None; n_layer], len: 0 }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// A cache of `n` rows, each a copy of this one-row cache: a context
    /// run once, then continued by `n` sequences side by side (rankers
    /// scoring several candidates after the same context).
    pub fn repeat_batch(&self, n: usize) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|layer| match layer {
                None => Ok(None),
                Some((k, v)) => {
                    if k.dim(0)? != 1 {
                        return Err(ModelError::Input(format!("repeat_batch needs a one-row cache, not {} rows", k.dim(0)?)));
                    }
                    Ok(Some((k.repeat((n, 1, 1, 1))?, v.repeat((n, 1, 1, 1))?)))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers, len: self.len })
    }
}

#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(store: &mut TensorStore, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: store.take(&format!("{prefix}.weight"), &[dim])?,
            bias: store.take(&format!("{prefix}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }
}

/// GPT-2's `Conv1D`: a linear layer whose weight is stored `[in, out]`.
#[derive(Debug, Clone)]
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    fn load(store: &mut TensorStore, prefix: &str, n_in: usize, n_out: usize) -> Result<Self> {
        Ok(Self {
            weight: store.take(&format!("{prefix}.weight"), &[n_in, n_out])?,
            bias: store.take(&format!("{prefix}.bias"), &[n_out])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, n_in) = x.dims3()?;
        let n_out = self.bias.dim(0)?;
        let y = x.reshape((b * t, n_in))?.matmul(&self.weight)?.broadcast_add(&self.bias)?;
        Ok(y.reshape((b, t, n_out))?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    n_head: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn load(store: &mut TensorStore, prefix: &str, cfg: &Gpt2Config, layer_idx: usize) -> Result<Self> {
        let e = cfg.n_embd;
        let mut scale = 1.0;
        if cfg.scale_attn_weights {
            scale /= (cfg.head_dim() as f64).sqrt();
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer_idx + 1) as f64;
        }
        Ok(Self {
            c_attn: Conv1D::load(store, &format!("{prefix}.c_attn"), e, 3 * e)?,
            c_proj: Conv1D::load(store, &format!("{prefix}.c_proj"), e, e)?,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            scale,
        })
    }

    fn split_heads(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let e = self.n_head * self.head_dim;
        Ok(x.narrow(2, offset * e, e)?.reshape((b, t, self.n_head, self.head_dim))?.transpose(1, 2)?.contiguous()?)
    }

    fn forward(&self, x: &Tensor, attn_bias: Option<&Tensor>, cache: &mut Option<(Tensor, Tensor)>) -> Result<Tensor> {
        let (b, t, e) = x.dims3()?;
        let qkv = self.c_attn.forward(x)?;
        let q = self.split_heads(&qkv, 0)?;
        let mut k = self.split_heads(&qkv, 1)?;
        let mut v = self.split_heads(&qkv, 2)?;
        if let Some((past_k, past_v)) = cache.as_ref() {
            k = Tensor::cat(&[past_k, &k], 2)?;
            v = Tensor::cat(&[past_v, &v], 2)?;
        }
        *cache = Some((k.clone(), v.clone()));
        let mut scores = (q.matmul(&k.t()?)? * self.scale)?;
        if let Some(bias) = attn_bias {
            scores = scores.broadcast_add(bias)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, e))?;
        self.c_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
    activation: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c_fc.forward(x)?;
        let h = match self.activation {
            Activation::GeluNew => h.gelu()?,
            Activation::Gelu => h.gelu_erf()?,
            Activation::Relu => h.relu()?,
        };
        self.c_proj.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn load(store: &mut TensorStore, idx: usize, cfg: &Gpt2Config) -> Result<Self> {
        let p = format!("h.{idx}");
        let (e, inner) = (cfg.n_embd, cfg.inner_dim());
        Ok(Self {
            ln_1: LayerNorm::load(store, &format!("{p}.ln_1"), e, cfg.layer_norm_epsilon)?,
            attn: Attention::load(store, &format!("{p}.attn"), cfg, idx)?,
            ln_2: LayerNorm::load(store, &format!("{p}.ln_2"), e, cfg.layer_norm_epsilon)?,
            mlp: Mlp {
                c_fc: Conv1D::load(store, &format!("{p}.mlp.c_fc"), e, inner)?,
                c_proj: Conv1D::load(store, &format!("{p}.mlp.c_proj"), inner, e)?,
                activation: cfg.activation_function,
            },
        })
    }

    fn forward(&self, x: &Tensor, attn_bias: Option<&Tensor>, cache: &mut Option<(Tensor, Tensor)>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, attn_bias, cache)?)?;
        Ok((&x + self.mlp.forward(&self.ln_2.forward(&x)?)?)?)
    }
}

/// A GPT-2 language model with its head tied to the token embedding.
///
/// Cloning is cheap: tensors are reference-counted, so clones share weights.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    config: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    device: Device,
    dtype: DType,
}

impl Gpt2 {
    /// Loads a Hugging Face checkpoint folder (`config.json` plus
    /// `model.safetensors` or `pytorch_model.bin`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::MissingFolder(dir.to_path_buf()));
        }
        let config = read_config(dir)?;
        let weights = WeightsFile::find(dir)?;
        let mut store = TensorStore::load(&weights, dtype, device)?;
        let model = Self::from_store(config, &mut store, device)?;
        let leftover = store.leftover();
        if !leftover.is_empty() {
            tracing::debug!(file = %weights.display_path().display(), ?leftover, "tensors not used by GPT-2");
        }
        Ok(model)
    }

    /// Builds the model from a store, taking the tensors it needs.
    pub fn from_store(config: Gpt2Config, store: &mut TensorStore, device: &Device) -> Result<Self> {
        config.validate()?;
        let e = config.n_embd;
        let wte = store.take("wte.weight", &[config.vocab_size, e])?;
        let dtype = wte.dtype();
        let wpe = store.take("wpe.weight", &[config.n_positions, e])?;
        let blocks = (0..config.n_layer).map(|i| Block::load(store, i, &config)).collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(store, "ln_f", e, config.layer_norm_epsilon)?;
        // The head is tied to `wte` (as transformers ties it on load); a stored
        // copy is only checked for shape.
        if store.contains("lm_head.weight") {
            store.take("lm_head.weight", &[config.vocab_size, e])?;
        }
        Ok(Self { config, wte, wpe, blocks, ln_f, device: device.clone(), dtype })
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.n_layer)
    }

    /// The final hidden states `[batch, len, n_embd]` for `input_ids`
    /// (`[batch, len]`, u32) at `position_ids` (`[batch, len]`, u32), with an
    /// optional additive attention bias broadcastable to
    /// `[batch, n_head, len, cached + len]`. Appends to `cache`, whose length
    /// grows by `len`.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        attn_bias: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let e = self.config.n_embd;
        let tokens = self.wte.index_select(&input_ids.flatten_all()?, 0)?.reshape((b, t, e))?;
        let positions = self.wpe.index_select(&position_ids.flatten_all()?, 0)?.reshape((b, t, e))?;
        let mut x = (tokens + positions)?;
        for (block, layer_cache) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = block.forward(&x, attn_bias, layer_cache)?;
        }
        cache.len += t;
        self.ln_f.forward(&x)
    }

    /// Logits `[n, vocab]` (f32) for hidden states `[n, n_embd]`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.matmul(&self.wte.t()?)?.to_dtype(DType::F32)?)
    }

    /// Runs the next tokens of the sequences in `cache` (every row of
    /// `input_ids` continues from the same cached length) and returns the
    /// logits at the last position, `[batch, vocab]` in f32.
    pub fn forward(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, cache)?;
        let (b, t, _) = hidden.dims3()?;
        let last = hidden.narrow(1, t - 1, 1)?.reshape((b, self.config.n_embd))?;
        self.lm_head(&last)
    }

    /// Like [`Gpt2::forward`] but returns the logits of every position,
    /// `[batch, len, vocab]`.
    pub fn forward_all(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, cache)?;
        let (b, t, e) = hidden.dims3()?;
        Ok(self.lm_head(&hidden.reshape((b * t, e))?)?.reshape((b, t, self.config.vocab_size))?)
    }

    /// One sequence's ids as a `[1, len]` tensor, checked against the
    /// vocabulary.
    pub fn tokens_tensor(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(ModelError::Input(format!("token id {bad} is outside the vocabulary of {}", self.config.vocab_size)));
        }
        Ok(Tensor::new(ids, &self.device)?.unsqueeze(0)?)
    }

    fn forward_hidden(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t == 0 {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        let past = cache.len();
        if past + t > self.config.n_positions {
            return Err(ModelError::Input(format!(
                "{} tokens exceed the model's context of {} positions",
                past + t,
                self.config.n_positions
            )));
        }
        let positions = Tensor::arange(past as u32, (past + t) as u32, &self.device)?.unsqueeze(0)?.repeat((b, 1))?;
        let bias = if t > 1 { Some(causal_bias(t, past, self.dtype, &self.device)?) } else { None };
        self.hidden_states(input_ids, &positions, bias.as_ref(), cache)
    }
}

/// The additive causal mask `[1, 1, len, past + len]`: query `i` sees keys
/// `0..=past + i`.
pub fn causal_bias(len: usize, past: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = past + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..total).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(mask, (1, 1, len, total), device)?.to_dtype(dtype)?)
}

/// Reads and validates `config.json` from a checkpoint folder.
pub fn read_config(dir: &Path) -> Result<Gpt2Config> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ModelError::File { path: path.clone(), message: format!("cannot read: {e}") })?;
    Gpt2Config::from_json(&text).map_err(|e| ModelError::File { path, message: e.to_string() })
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}
