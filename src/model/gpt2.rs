//! GPT-2, the network behind DialoGPT and DialogRPT.
//!
//! Radford et al., "Language Models are Unsupervised Multitask Learners"
//! (2019); Zhang et al., "DialoGPT" (2020). Pre-LayerNorm transformer
//! decoder with learned absolute positions and a head tied to the token
//! embedding. Tensor names mirror Hugging Face's `GPT2Model`; the projection
//! layers are `Conv1D`, whose weights are stored `[in, out]`, so they multiply
//! from the right without a transpose.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::{Activation, Gpt2Config};
use super::kernels;
use super::lora::{self, LoraRuntime, SpanDelta, Target};
use super::weights::{TensorStore, WeightsFile};
use super::ModelError;

mod slab;

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

/// A projection's weight, dense or quantised.
#[derive(Debug, Clone)]
enum ProjWeight {
    /// `[in, out]`, as the checkpoint stores it.
    Dense(Tensor),
    /// f32 `[in, out]` repacked for the CPU kernels (see
    /// [`kernels::PackedMatrix`]); used for every batch size.
    Packed(Arc<kernels::PackedMatrix>),
    /// 8-bit weights in the packed tile layout.
    Quantized(Arc<kernels::PackedQ8>),
}

/// GPT-2's `Conv1D`: a linear layer whose weight is stored `[in, out]`.
#[derive(Debug, Clone)]
struct Conv1D {
    weight: ProjWeight,
    bias: Tensor,
}

impl Conv1D {
    /// `quantize`: 8-bit weights straight from the checkpoint's f32.
    fn load(store: &mut TensorStore, prefix: &str, n_in: usize, n_out: usize, quantize: bool) -> Result<Self> {
        let weight = store.take(&format!("{prefix}.weight"), &[n_in, n_out])?;
        let weight = if quantize {
            ProjWeight::Quantized(Arc::new(kernels::PackedQ8::quantize(&weight)?))
        } else if weight.device().is_cpu() && weight.dtype() == DType::F32 && n_out.is_multiple_of(16) {
            // f32 on the CPU: repack once for the kernels (same memory).
            ProjWeight::Packed(Arc::new(kernels::PackedMatrix::pack(&weight)?))
        } else {
            ProjWeight::Dense(weight)
        };
        Ok(Self { weight, bias: store.take(&format!("{prefix}.bias"), &[n_out])? })
    }

    fn quantized(&self) -> Result<Self> {
        let weight = match &self.weight {
            ProjWeight::Dense(w) => ProjWeight::Quantized(Arc::new(kernels::PackedQ8::quantize(w)?)),
            ProjWeight::Packed(p) => ProjWeight::Quantized(Arc::new(kernels::PackedQ8::quantize(&p.to_tensor(&Device::Cpu)?)?)),
            ProjWeight::Quantized(q) => ProjWeight::Quantized(q.clone()),
        };
        Ok(Self { weight, bias: self.bias.to_dtype(DType::F32)? })
    }

    /// `x: [rows, in]` to `[rows, out]`.
    fn forward_2d(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let y = match &self.weight {
            // The bias goes in inside the kernel's tasks (same bits).
            ProjWeight::Quantized(q) => return Ok(kernels::rows_times_packed_q8_plus(x, q, &self.bias)?),
            ProjWeight::Packed(p) => return Ok(kernels::rows_times_packed_plus(x, p, Some(&self.bias))?),
            ProjWeight::Dense(w) if kernels::wants_small_path(x, w, rows) => kernels::rows_times_matrix(x, w)?,
            ProjWeight::Dense(w) => x.matmul(w)?,
        };
        Ok(y.broadcast_add(&self.bias)?)
    }

    /// [`Conv1D::forward_2d`] plus each span's LoRA update (none: the
    /// plain product, nothing else).
    fn forward_2d_lora(&self, x: &Tensor, deltas: &[SpanDelta]) -> Result<Tensor> {
        let y = self.forward_2d(x)?;
        lora::add_deltas(x, y, deltas)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, n_in) = x.dims3()?;
        let n_out = self.bias.dim(0)?;
        Ok(self.forward_2d(&x.reshape((b * t, n_in))?)?.reshape((b, t, n_out))?)
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
    fn load(store: &mut TensorStore, prefix: &str, cfg: &Gpt2Config, layer_idx: usize, quantize: bool) -> Result<Self> {
        let e = cfg.n_embd;
        let mut scale = 1.0;
        if cfg.scale_attn_weights {
            scale /= (cfg.head_dim() as f64).sqrt();
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer_idx + 1) as f64;
        }
        Ok(Self {
            c_attn: Conv1D::load(store, &format!("{prefix}.c_attn"), e, 3 * e, quantize)?,
            c_proj: Conv1D::load(store, &format!("{prefix}.c_proj"), e, e, quantize)?,
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

impl Attention {
    /// Attention for one sequence whose keys/values live in a preallocated
    /// cache: `q`, `k`, `v` are `[n_head, t, head_dim]` for the `t` new
    /// tokens; they are written at the cache's current length and attended
    /// over everything cached. Returns `[t, n_embd]`.
    fn attend_cached(&self, q: &Tensor, k: &Tensor, v: &Tensor, layer: &mut LayerCache, past: usize) -> Result<Tensor> {
        let t = q.dim(1)?;
        let LayerCache::Device { k: cache_k, v: cache_v } = layer else {
            return Err(ModelError::Input("a host cache reached the tensor attention path".into()));
        };
        cache_k.slice_set(k, 1, past)?;
        cache_v.slice_set(v, 1, past)?;
        let total = past + t;
        // Views over the first `total` positions: batch stride is the
        // capacity, which candle's matmul accepts without a copy.
        let keys = cache_k.narrow(1, 0, total)?;
        let values = cache_v.narrow(1, 0, total)?;
        let mut scores = (q.matmul(&keys.t()?)? * self.scale)?;
        if t > 1 {
            let bias = causal_bias(t, past, scores.dtype(), scores.device())?.squeeze(0)?;
            scores = scores.broadcast_add(&bias)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&values)?; // [n_head, t, head_dim]
        Ok(out.transpose(0, 1)?.reshape((t, self.n_head * self.head_dim))?)
    }

    /// Attention for every sequence of a batch at once over host caches
    /// (see [`kernels::attention`]): `qkv` is `[rows, 3 * n_embd]` f32 on
    /// the CPU. `None` when the caches or `qkv` are not of that kind; the
    /// per-sequence tensor path runs then.
    fn attend_host(&self, qkv: &Tensor, spans: &[(usize, usize)], caches: &mut [&mut SeqCache], layer_idx: usize) -> Result<Option<Tensor>> {
        use kernels::attention::{attend, Heads, SeqAttention};
        if !qkv.device().is_cpu() || qkv.dtype() != DType::F32 || !qkv.is_contiguous() {
            return Ok(None);
        }
        let mut full = Vec::new();
        let mut half = Vec::new();
        let mut eight = Vec::new();
        for (&(start, len), cache) in spans.iter().zip(caches.iter_mut()) {
            let past = cache.len;
            match &mut cache.layers[layer_idx] {
                LayerCache::Host(HostKv::F32 { k, v }) => full.push(SeqAttention { start, len, past, keys: k, values: v }),
                LayerCache::Host(HostKv::F16 { k, v }) => half.push(SeqAttention { start, len, past, keys: k, values: v }),
                LayerCache::Host(HostKv::Q8 { k, v }) => eight.push(SeqAttention { start, len, past, keys: k, values: v }),
                LayerCache::Device { .. } => return Ok(None),
            }
        }
        if [full.is_empty(), half.is_empty(), eight.is_empty()].iter().filter(|&&e| !e).count() > 1 {
            return Err(ModelError::Input("one batch mixes caches of different precisions".into()));
        }
        let heads = Heads { n_head: self.n_head, head_dim: self.head_dim, scale: self.scale as f32 };
        let out = kernels::with_f32(qkv, |qkv_values| {
            if !half.is_empty() {
                attend(qkv_values, heads, half)
            } else if !eight.is_empty() {
                attend(qkv_values, heads, eight)
            } else {
                attend(qkv_values, heads, full)
            }
        })?
        .map_err(ModelError::Input)?;
        let rows = qkv.dim(0)?;
        Ok(Some(Tensor::from_vec(out, (rows, self.n_head * self.head_dim), qkv.device())?))
    }

    /// Attention over tensor caches: the decode rows of each chunk in one
    /// batched pass ([`slab::DecodeGroup::attend`]), every other sequence
    /// (a prompt) on its own. Returns `[rows, n_embd]` in the rows' order.
    fn attend_tensors(
        &self,
        qkv: &Tensor,
        spans: &[(usize, usize)],
        caches: &mut [&mut SeqCache],
        layer_idx: usize,
        decode: &[slab::DecodeGroup],
    ) -> Result<Tensor> {
        let mut outs: Vec<Option<Tensor>> = vec![None; spans.len()];
        for group in decode {
            let out = group.attend(qkv, layer_idx, self.scale)?;
            if group.members.len() == spans.len() {
                // A step of decode rows only, all in one chunk: in order.
                return Ok(out);
            }
            for (j, &seq) in group.members.iter().enumerate() {
                outs[seq] = Some(out.narrow(0, j, 1)?);
            }
        }
        for (i, (&(start, t), cache)) in spans.iter().zip(caches.iter_mut()).enumerate() {
            if outs[i].is_none() {
                let (q, k, v) = self.split_rows(qkv, start, t)?;
                let past = cache.len;
                outs[i] = Some(self.attend_cached(&q, &k, &v, &mut cache.layers[layer_idx], past)?);
            }
        }
        let mut outs: Vec<Tensor> = outs.into_iter().flatten().collect();
        if outs.len() == 1 {
            Ok(outs.pop().unwrap_or_else(|| unreachable!()))
        } else {
            Ok(Tensor::cat(&outs, 0)?)
        }
    }

    /// `[rows, 3 * n_embd]` projections to one sequence's q, k, v, each
    /// `[n_head, t, head_dim]`, for rows `start..start + t`.
    fn split_rows(&self, qkv: &Tensor, start: usize, t: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let e = self.n_head * self.head_dim;
        let rows = qkv.narrow(0, start, t)?;
        let part = |i: usize| -> Result<Tensor> {
            Ok(rows.narrow(1, i * e, e)?.reshape((t, self.n_head, self.head_dim))?.transpose(0, 1)?.contiguous()?)
        };
        Ok((part(0)?, part(1)?, part(2)?))
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
            Activation::GeluNew => kernels::gelu_new(&h)?,
            Activation::Gelu => h.gelu_erf()?,
            Activation::Relu => h.relu()?,
            Activation::Silu => h.silu()?,
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
    fn load(store: &mut TensorStore, idx: usize, cfg: &Gpt2Config, quantize: bool) -> Result<Self> {
        let p = format!("h.{idx}");
        let (e, inner) = (cfg.n_embd, cfg.inner_dim());
        Ok(Self {
            ln_1: LayerNorm::load(store, &format!("{p}.ln_1"), e, cfg.layer_norm_epsilon)?,
            attn: Attention::load(store, &format!("{p}.attn"), cfg, idx, quantize)?,
            ln_2: LayerNorm::load(store, &format!("{p}.ln_2"), e, cfg.layer_norm_epsilon)?,
            mlp: Mlp {
                c_fc: Conv1D::load(store, &format!("{p}.mlp.c_fc"), e, inner, quantize)?,
                c_proj: Conv1D::load(store, &format!("{p}.mlp.c_proj"), inner, e, quantize)?,
                activation: cfg.activation_function,
            },
        })
    }

    fn forward(&self, x: &Tensor, attn_bias: Option<&Tensor>, cache: &mut Option<(Tensor, Tensor)>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, attn_bias, cache)?)?;
        Ok((&x + self.mlp.forward(&self.ln_2.forward(&x)?)?)?)
    }
}

impl Block {
    /// One layer over the rows of several sequences (`spans[i]` = rows of
    /// sequence i, in order), each attending over its own cache. `adapted`
    /// lists the spans that run through a LoRA adapter (rows, adapter), in
    /// row order; each projection adds their updates to those rows only.
    fn forward_rows(
        &self,
        x: &Tensor,
        spans: &[(usize, usize)],
        caches: &mut [&mut SeqCache],
        layer_idx: usize,
        adapted: &[AdaptedSpan],
        decode: &[slab::DecodeGroup],
    ) -> Result<Tensor> {
        let deltas = |target: Target| -> Vec<SpanDelta> {
            adapted
                .iter()
                .filter_map(|s| s.adapter.pair(layer_idx, target).map(|pair| SpanDelta { start: s.start, len: s.len, pair }))
                .collect()
        };
        let h = self.ln_1.forward(x)?;
        let qkv = self.attn.c_attn.forward_2d_lora(&h, &deltas(Target::AttnCAttn))?;
        let attn = match self.attn.attend_host(&qkv, spans, caches, layer_idx)? {
            Some(attn) => attn,
            None => self.attn.attend_tensors(&qkv, spans, caches, layer_idx, decode)?,
        };
        let x = (x + self.attn.c_proj.forward_2d_lora(&attn, &deltas(Target::AttnCProj))?)?;
        let h = self.ln_2.forward(&x)?;
        let h = self.mlp.c_fc.forward_2d_lora(&h, &deltas(Target::MlpCFc))?;
        let h = match self.mlp.activation {
            Activation::GeluNew => kernels::gelu_new(&h)?,
            Activation::Gelu => h.gelu_erf()?,
            Activation::Relu => h.relu()?,
            Activation::Silu => h.silu()?,
        };
        Ok((&x + self.mlp.c_proj.forward_2d_lora(&h, &deltas(Target::MlpCProj))?)?)
    }

    fn quantized(&self) -> Result<Self> {
        let mut block = self.clone();
        block.attn.c_attn = self.attn.c_attn.quantized()?;
        block.attn.c_proj = self.attn.c_proj.quantized()?;
        block.mlp.c_fc = self.mlp.c_fc.quantized()?;
        block.mlp.c_proj = self.mlp.c_proj.quantized()?;
        Ok(block)
    }
}

/// A sequence's rows in a batch that runs through an adapter.
struct AdaptedSpan<'a> {
    start: usize,
    len: usize,
    adapter: &'a LoraRuntime,
}

/// One layer's keys and values, `[n_head, capacity, head_dim]` each
/// (tensor caches: `[n_head, n_positions, head_dim]` views into a slab).
#[derive(Debug, Clone)]
enum LayerCache {
    /// Buffers on the host, written and read in place by the batched
    /// attention kernel (CPU models with f32 activations).
    Host(HostKv),
    /// Tensors on the model's device (GPUs, half-precision models, or
    /// [`Gpt2::with_tensor_caches`]): views into the sequence's
    /// [`slab::Slot`].
    Device { k: Tensor, v: Tensor },
}

/// Host cache buffers in the model's [`KvPrecision`].
#[derive(Debug, Clone)]
enum HostKv {
    F32 { k: Vec<f32>, v: Vec<f32> },
    F16 { k: Vec<half::f16>, v: Vec<half::f16> },
    /// Rows of `head_dim` bytes and a 4-byte scale (see [`kernels::attention::KvQ8`]).
    Q8 { k: Vec<kernels::attention::KvQ8>, v: Vec<kernels::attention::KvQ8> },
}

/// The precision of the keys and values a CPU model caches per sequence.
///
/// f16 halves the cache (DialoGPT-small: 4.7 instead of 9.4 MB per
/// sequence of 128 tokens) and the bytes a decode step reads from it, at a
/// small cost measured against f32 in the parity tests. Arithmetic stays
/// f32 either way. GPU models cache in their own dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvPrecision {
    /// Exactly what transformers computes.
    #[default]
    F32,
    F16,
    /// 8 bits and a scale per cached row (a position of one head): about a
    /// quarter of f32.
    Q8,
}

impl KvPrecision {
    /// `f32`, `f16` or `q8`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "q8" => Ok(Self::Q8),
            other => Err(format!("{other:?} is not a cache precision (f32, f16 or q8)")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8 => "q8",
        }
    }
}

/// A preallocated KV cache for one sequence, as the generation pool uses
/// it: appends write in place, so a decode step copies nothing but the new
/// token's keys and values.
#[derive(Debug)]
pub struct SeqCache {
    layers: Vec<LayerCache>,
    len: usize,
    capacity: usize,
    /// The slab slot tensor caches live in (`None`: host caches).
    slot: Option<slab::Slot>,
}

impl SeqCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A deep copy (for the candidates of one prompt, which share a prefill
    /// and then diverge).
    pub fn fork(&self) -> Result<Self> {
        if let Some(slot) = &self.slot {
            let slot = slot.fork(self.len)?;
            let layers = slot_layers(&slot, self.layers.len())?;
            return Ok(Self { layers, len: self.len, capacity: self.capacity, slot: Some(slot) });
        }
        Ok(Self { layers: self.layers.clone(), len: self.len, capacity: self.capacity, slot: None })
    }

    /// Whether keys and values live in tensors (a slab slot), not host buffers.
    pub fn is_tensor(&self) -> bool {
        self.slot.is_some()
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerCache::Host(HostKv::F32 { k, v }) => (k.len() + v.len()) * std::mem::size_of::<f32>(),
                LayerCache::Host(HostKv::F16 { k, v }) => (k.len() + v.len()) * std::mem::size_of::<half::f16>(),
                LayerCache::Host(HostKv::Q8 { k, v }) => k.len() + v.len(),
                LayerCache::Device { k, v } => (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes(),
            })
            .sum()
    }
}

/// A slot's per-layer views as the layers of a [`SeqCache`].
fn slot_layers(slot: &slab::Slot, n_layer: usize) -> Result<Vec<LayerCache>> {
    (0..n_layer)
        .map(|layer| {
            let (k, v) = slot.views(layer)?;
            Ok(LayerCache::Device { k, v })
        })
        .collect()
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
    /// The head in 8 bits, when the model is quantised (`wte` stays dense
    /// for the embedding lookup).
    head_q: Option<Arc<kernels::Q8Matrix>>,
    /// What [`Gpt2::new_seq_cache`] stores keys and values in (CPU).
    kv: KvPrecision,
    device: Device,
    dtype: DType,
    /// Where tensor caches live; shared by clones.
    slabs: Arc<slab::Slabs>,
    /// Tensor caches even where host caches would be used (CPU, f32).
    tensor_caches: bool,
}

impl Gpt2 {
    /// Loads a Hugging Face checkpoint folder (`config.json` plus
    /// `model.safetensors`, `pytorch_model.bin` or a `.pkl`/`.pt`/`.pth`
    /// file), or a weights file itself: its configuration is the
    /// `config.json` beside it or, when there is none, inferred from its
    /// shapes ([`TensorStore::infer_gpt2_config`]).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(dir, dtype, device, Q8::Never)
    }

    /// [`Gpt2::load`], with 8-bit weights made as each matrix is read as
    /// `q8` says.
    fn load_with(path: &Path, dtype: DType, device: &Device, q8: Q8) -> Result<Self> {
        let (config, weights) = if path.is_dir() {
            (Some(read_config(path)?), WeightsFile::find(path)?)
        } else if path.is_file() {
            let beside = path.parent().unwrap_or(Path::new("."));
            let config = if beside.join("config.json").is_file() { Some(read_config(beside)?) } else { None };
            (config, WeightsFile::at(path))
        } else {
            return Err(ModelError::MissingFolder(path.to_path_buf()));
        };
        let mut store = TensorStore::load(&weights, dtype, device)?;
        let config = match config {
            Some(config) => config,
            None => {
                let config = store.infer_gpt2_config()?;
                tracing::info!(file = %path.display(), n_embd = config.n_embd, n_layer = config.n_layer, n_head = config.n_head, "no config.json beside the weights: shape inferred");
                config
            }
        };
        let model = Self::from_store_with(config, &mut store, device, q8)?;
        let leftover = store.leftover();
        if !leftover.is_empty() {
            tracing::debug!(file = %weights.display_path().display(), ?leftover, "tensors not used by GPT-2");
        }
        Ok(model)
    }

    /// Builds the model from a store, taking the tensors it needs.
    pub fn from_store(config: Gpt2Config, store: &mut TensorStore, device: &Device) -> Result<Self> {
        Self::from_store_with(config, store, device, Q8::Never)
    }

    /// Loads a checkpoint folder with 8-bit projection and head weights,
    /// quantising each matrix as it is read: the f32 copy of a projection
    /// lives only until its 8-bit copy exists, so loading never holds the
    /// whole model in f32 (what [`Gpt2::quantize_q8`] on a loaded model
    /// does). Same result as `load` then `quantize_q8`.
    pub fn load_q8(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with(dir, DType::F32, device, Q8::Always)
    }

    /// [`Gpt2::load_q8`] where 8-bit weights fit (a CPU device, `dtype`
    /// f32, `n_embd` and the MLP width multiples of 32), else
    /// [`Gpt2::load`]: what `model.quantize = "auto"` loads.
    /// [`Gpt2::is_quantized`] tells which it did.
    pub fn load_auto_q8(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(dir, dtype, device, Q8::WhereItFits)
    }

    fn from_store_with(config: Gpt2Config, store: &mut TensorStore, device: &Device, q8: Q8) -> Result<Self> {
        config.validate()?;
        let e = config.n_embd;
        let wte = store.take("wte.weight", &[config.vocab_size, e])?;
        let dtype = wte.dtype();
        let quantize = match q8 {
            Q8::Never => false,
            Q8::Always => {
                check_q8(&config, dtype, device)?;
                true
            }
            Q8::WhereItFits => check_q8(&config, dtype, device).is_ok(),
        };
        let wpe = store.take("wpe.weight", &[config.n_positions, e])?;
        let blocks = (0..config.n_layer).map(|i| Block::load(store, i, &config, quantize)).collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(store, "ln_f", e, config.layer_norm_epsilon)?;
        // The head is tied to `wte` (as transformers ties it on load); a stored
        // copy is only checked for shape.
        if store.contains("lm_head.weight") {
            store.discard("lm_head.weight", &[config.vocab_size, e])?;
        }
        let head_q = if quantize { Some(Arc::new(kernels::Q8Matrix::quantize(&wte)?)) } else { None };
        let slabs = Arc::new(slab::Slabs::new(config.n_layer, config.n_head, config.head_dim(), config.n_positions));
        Ok(Self {
            config,
            wte,
            wpe,
            blocks,
            ln_f,
            head_q,
            kv: KvPrecision::F32,
            device: device.clone(),
            dtype,
            slabs,
            tensor_caches: false,
        })
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
        let rows = hidden.dim(0)?;
        let logits = match &self.head_q {
            Some(q) => kernels::rows_times_q8_t(hidden, q)?,
            None if kernels::wants_head_path(hidden, &self.wte, rows) => kernels::rows_times_matrix_t(hidden, &self.wte)?,
            None => hidden.matmul(&self.wte.t()?)?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// The same model with 8-bit projection and head weights (one scale
    /// per 32 values, see [`kernels::Q8Matrix`]), for
    /// CPU decoding where memory bandwidth is the limit. Needs f32 weights
    /// and `n_embd` a multiple of 32.
    pub fn quantize_q8(&self) -> Result<Self> {
        check_q8(&self.config, self.dtype, &self.device)?;
        let blocks = self.blocks.iter().map(|b| b.quantized()).collect::<Result<Vec<_>>>()?;
        let head = Arc::new(kernels::Q8Matrix::quantize(&self.wte)?);
        Ok(Self { blocks, head_q: Some(head), ..self.clone() })
    }

    pub fn is_quantized(&self) -> bool {
        self.head_q.is_some()
    }

    /// Whether [`Gpt2::quantize_q8`] would take this model: f32 weights on
    /// the CPU, `n_embd` and the MLP width multiples of 32, not already
    /// 8-bit.
    pub fn fits_q8(&self) -> bool {
        !self.is_quantized() && check_q8(&self.config, self.dtype, &self.device).is_ok()
    }

    /// The same model, caching keys and values in `kv` from its next
    /// [`Gpt2::new_seq_cache`] on. Only CPU models with f32 activations
    /// keep host caches; on a GPU the cache has the model's dtype, and
    /// asking for another is an error.
    pub fn with_kv_precision(self, kv: KvPrecision) -> Result<Self> {
        if kv != KvPrecision::F32 && !(self.device.is_cpu() && self.activation_dtype() == DType::F32) {
            return Err(ModelError::Input(format!(
                "a {} key/value cache is a CPU option for f32 or 8-bit models; this model caches in {:?} on its device",
                kv.as_str(),
                self.activation_dtype()
            )));
        }
        Ok(Self { kv, ..self })
    }

    pub fn kv_precision(&self) -> KvPrecision {
        self.kv
    }

    /// The same model, keeping each sequence's keys and values in tensor
    /// caches ([`slab`]: the GPU path, with batched decode attention in
    /// tensor ops) even on the CPU with f32, where host caches and the
    /// CPU attention kernel are the default. The cache then has the
    /// model's activation dtype ([`Gpt2::with_kv_precision`] no longer
    /// applies). For tests that run the GPU path here, and for comparing
    /// the two.
    pub fn with_tensor_caches(self) -> Self {
        Self { tensor_caches: true, slabs: Arc::new(slab::Slabs::new(self.config.n_layer, self.config.n_head, self.config.head_dim(), self.config.n_positions)), ..self }
    }

    /// A cache for one sequence of at most `capacity` tokens.
    pub fn new_seq_cache(&self, capacity: usize) -> Result<SeqCache> {
        if capacity == 0 || capacity > self.config.n_positions {
            return Err(ModelError::Input(format!(
                "a sequence of {capacity} tokens does not fit the model's context of {}",
                self.config.n_positions
            )));
        }
        let (h, d) = (self.config.n_head, self.config.head_dim());
        let dtype = self.activation_dtype();
        let host = self.device.is_cpu() && dtype == DType::F32 && !self.tensor_caches;
        if !host {
            let slot = self.slabs.acquire(dtype, &self.device)?;
            let layers = slot_layers(&slot, self.config.n_layer)?;
            return Ok(SeqCache { layers, len: 0, capacity, slot: Some(slot) });
        }
        let layers = (0..self.config.n_layer)
            .map(|_| {
                // Zeroed pages are only touched as positions fill.
                let n = h * capacity * d;
                LayerCache::Host(match self.kv {
                    KvPrecision::F32 => HostKv::F32 { k: vec![0f32; n], v: vec![0f32; n] },
                    KvPrecision::F16 => HostKv::F16 { k: vec![half::f16::ZERO; n], v: vec![half::f16::ZERO; n] },
                    KvPrecision::Q8 => {
                        use kernels::attention::{KvQ8, KvValue};
                        let n = h * capacity * (d + KvQ8::ROW_EXTRA);
                        HostKv::Q8 { k: vec![KvQ8(0); n], v: vec![KvQ8(0); n] }
                    }
                })
            })
            .collect();
        Ok(SeqCache { layers, len: 0, capacity, slot: None })
    }

    /// The dtype activations (and so caches) have: f32 for 8-bit models.
    fn activation_dtype(&self) -> DType {
        if self.head_q.is_some() {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// Runs several sequences forward at once: sequence i feeds
    /// `tokens[i]` (one or more ids) after what `caches[i]` holds. Returns the
    /// logits at each sequence's last new token, `[n_seqs, vocab]` in f32.
    ///
    /// Positions come from each cache's own length, and each sequence
    /// attends only over its own cache, so sequences of different lengths
    /// sit side by side with no padding and no mask built from token ids.
    pub fn forward_seqs(&self, tokens: &[&[u32]], caches: &mut [&mut SeqCache]) -> Result<Tensor> {
        self.forward_seqs_with(tokens, caches, &[])
    }

    /// [`Gpt2::forward_seqs`] with a LoRA adapter per sequence:
    /// `adapters[i]` (if any) changes sequence i's projections, computed
    /// from its own rows only, so a sequence's output does not depend on
    /// the adapters of the others. `adapters` is empty (no adapter at all)
    /// or has one entry per sequence; each adapter must fit this model.
    pub fn forward_seqs_with(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut SeqCache],
        adapters: &[Option<&LoraRuntime>],
    ) -> Result<Tensor> {
        if tokens.len() != caches.len() || tokens.is_empty() {
            return Err(ModelError::Input("forward_seqs needs one cache per sequence".into()));
        }
        if !adapters.is_empty() && adapters.len() != tokens.len() {
            return Err(ModelError::Input(format!(
                "{} adapters for {} sequences: give one (or None) per sequence, or none at all",
                adapters.len(),
                tokens.len()
            )));
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(tokens.len());
        let mut adapted = Vec::new();
        for (i, (seq, cache)) in tokens.iter().zip(caches.iter()).enumerate() {
            if seq.is_empty() {
                return Err(ModelError::Input("a sequence with no new tokens".into()));
            }
            if cache.len + seq.len() > cache.capacity {
                return Err(ModelError::Input(format!(
                    "{} tokens exceed the sequence's cache of {}",
                    cache.len + seq.len(),
                    cache.capacity
                )));
            }
            if let Some(&bad) = seq.iter().find(|&&id| id as usize >= self.config.vocab_size) {
                return Err(ModelError::Input(format!("token id {bad} is outside the vocabulary of {}", self.config.vocab_size)));
            }
            if let Some(adapter) = adapters.get(i).copied().flatten() {
                adapter.check_fits(&self.config)?;
                adapted.push(AdaptedSpan { start: ids.len(), len: seq.len(), adapter });
            }
            spans.push((ids.len(), seq.len()));
            ids.extend_from_slice(seq);
            positions.extend((cache.len..cache.len + seq.len()).map(|p| p as u32));
        }
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let dtype = self.activation_dtype();
        // Tensor caches: each chunk's decode rows attend in one pass.
        let decode_rows: Vec<slab::DecodeRow> = spans
            .iter()
            .zip(caches.iter())
            .enumerate()
            .filter_map(|(seq, (&(row, t), cache))| {
                let slot = cache.slot.as_ref().filter(|_| t == 1)?;
                Some(slab::DecodeRow { seq, row, slot, past: cache.len })
            })
            .collect();
        let decode = slab::plan(&decode_rows, dtype, &self.device)?;
        drop(decode_rows);
        let mut x = (self.wte.index_select(&ids, 0)? + self.wpe.index_select(&positions, 0)?)?.to_dtype(dtype)?;
        for (layer_idx, block) in self.blocks.iter().enumerate() {
            x = block.forward_rows(&x, &spans, caches, layer_idx, &adapted, &decode)?;
        }
        for (cache, seq) in caches.iter_mut().zip(tokens) {
            cache.len += seq.len();
        }
        // Only each sequence's last row goes through the head.
        let last: Vec<u32> = spans.iter().map(|&(start, t)| (start + t - 1) as u32).collect();
        let last = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        self.lm_head(&self.ln_f.forward(&last)?)
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

/// Whether a model of this shape, dtype and device can have 8-bit weights.
/// When loading makes 8-bit projection and head weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Q8 {
    Never,
    /// An error where they do not fit ([`check_q8`]).
    Always,
    /// Only where they fit; otherwise as loaded.
    WhereItFits,
}

fn check_q8(config: &Gpt2Config, dtype: DType, device: &Device) -> Result<()> {
    if dtype != DType::F32 || !config.n_embd.is_multiple_of(32) || !config.inner_dim().is_multiple_of(32) {
        return Err(ModelError::Input(format!(
            "8-bit weights need an f32 model with n_embd and the MLP width multiples of 32 (have {:?}, {}, {})",
            dtype,
            config.n_embd,
            config.inner_dim()
        )));
    }
    if !device.is_cpu() {
        return Err(ModelError::Input("8-bit weights are a CPU option; GPUs use f16/bf16".into()));
    }
    Ok(())
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
