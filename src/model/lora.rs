//! LoRA adapters applied at run time, per sequence, over shared base
//! weights.
//!
//! A persona's adapter changes the four projections of every block
//! (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) by a low-rank
//! update. Merged, that is a full copy of the weights per persona; applied
//! at run time it is `y += (x · A) · B` on the rows of the sequences that use
//! the adapter, so one model serves many personas in the same batch.
//!
//! [`LoraRuntime`] holds the pairs ready for that product: `A` as `[in, r]`
//! and `B` as `[r, out]` with the scaling (`alpha / r`) folded in, f32, in
//! `Conv1D` orientation. Reading PEFT's files is `training::lora`'s job
//! (`LoraAdapter::runtime`); this module only checks shapes against a
//! [`Gpt2Config`] and does the arithmetic.
//!
//! On the CPU in f32 (f32 and 8-bit models alike) every row's update is
//! computed from that row alone, in a fixed order, and added in place, so a
//! sequence's output does not depend on what else is in the batch. Other
//! devices and dtypes run one candle product per span.

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor};
use rayon::prelude::*;

use super::config::Gpt2Config;
use super::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

/// The projections an adapter may change, relative to `h.N.` (PEFT's
/// `target_modules` `c_attn`, `c_proj`, `c_fc` match exactly these four).
pub const LORA_TARGETS: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

/// Index into a block's pairs, in [`LORA_TARGETS`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    AttnCAttn = 0,
    AttnCProj = 1,
    MlpCFc = 2,
    MlpCProj = 3,
}

/// Adapted rows up to which the update runs on the calling thread (below
/// this, handing rows to rayon costs more than it saves).
const PARALLEL_ROWS: usize = 8;

/// One projection's low-rank update, ready to use.
#[derive(Debug, Clone)]
pub(crate) struct LoraPair {
    /// `[in, r]`, f32, contiguous.
    a: Tensor,
    /// `[r, out]`, f32, contiguous, scaled by `alpha / r`.
    b: Tensor,
}

impl LoraPair {
    fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    fn n_in(&self) -> usize {
        self.a.dims()[0]
    }

    fn n_out(&self) -> usize {
        self.b.dims()[1]
    }
}

/// A persona's adapter for one base model shape: per block, an optional
/// pair for each of the four projections.
///
/// Cheap to share (`Arc<LoraRuntime>`); tensors are reference-counted, so
/// clones share them too.
#[derive(Debug, Clone)]
pub struct LoraRuntime {
    /// `blocks[layer][target as usize]`.
    blocks: Vec<[Option<LoraPair>; 4]>,
    rank: usize,
    /// The shape it was checked against (see [`LoraRuntime::check_fits`]).
    n_embd: usize,
    inner: usize,
}

impl LoraRuntime {
    /// Builds the runtime form from pairs as PEFT stores them: keyed by
    /// canonical projection prefix (`h.0.attn.c_attn`), `lora_A` `[r, in]`
    /// and `lora_B` `[out, r]`, each with its own `scaling` (PEFT's
    /// `alpha / r`, or `alpha / √r` for rsLoRA; ranks and alphas may
    /// differ per projection, PEFT's `rank_pattern`/`alpha_pattern`); the
    /// update to a projection is `x · lora_Aᵀ · lora_Bᵀ · scaling`. Every
    /// pair is checked against `config` (layer, projection, both shapes,
    /// finite values); an error names the tensor. Projections without a
    /// pair are left unchanged.
    pub fn from_peft_pairs<'a>(
        config: &Gpt2Config,
        pairs: impl IntoIterator<Item = (&'a str, &'a Tensor, &'a Tensor, f64)>,
    ) -> Result<Self> {
        let bad = |message: String| ModelError::Adapter(message);
        let (e, inner) = (config.n_embd, config.inner_dim());
        let mut blocks: Vec<[Option<LoraPair>; 4]> = (0..config.n_layer).map(|_| Default::default()).collect();
        let (mut count, mut max_rank) = (0, 0);
        for (prefix, lora_a, lora_b, scaling) in pairs {
            let (layer, target) = parse_prefix(prefix, config.n_layer).ok_or_else(|| {
                bad(format!(
                    "targets `{prefix}`, which is not a c_attn/c_proj/c_fc of this model ({} layers)",
                    config.n_layer
                ))
            })?;
            let (n_in, n_out) = match target {
                Target::AttnCAttn => (e, 3 * e),
                Target::AttnCProj => (e, e),
                Target::MlpCFc => (e, inner),
                Target::MlpCProj => (inner, e),
            };
            let rank = lora_a.dims().first().copied().unwrap_or(0);
            if rank == 0 || !scaling.is_finite() {
                return Err(bad(format!("`{prefix}`: rank {rank} and scaling {scaling}: need a positive rank and a finite scaling")));
            }
            if lora_a.dims() != [rank, n_in] {
                return Err(bad(format!(
                    "`{prefix}.lora_A` is {:?}; this model (n_embd {e}, MLP width {inner}) needs [{rank}, {n_in}]",
                    lora_a.dims()
                )));
            }
            if lora_b.dims() != [n_out, rank] {
                return Err(bad(format!(
                    "`{prefix}.lora_B` is {:?}; this model (n_embd {e}, MLP width {inner}) needs [{n_out}, {rank}]",
                    lora_b.dims()
                )));
            }
            for (name, t) in [("lora_A", lora_a), ("lora_B", lora_b)] {
                let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                if values.iter().any(|v| !v.is_finite()) {
                    return Err(bad(format!("`{prefix}.{name}` holds values that are not finite")));
                }
            }
            let slot = &mut blocks[layer][target as usize];
            if slot.is_some() {
                return Err(bad(format!("`{prefix}` is given twice")));
            }
            let a = lora_a.to_dtype(DType::F32)?.t()?.contiguous()?;
            let b = (lora_b.to_dtype(DType::F32)?.t()? * scaling)?.contiguous()?;
            *slot = Some(LoraPair { a, b });
            count += 1;
            max_rank = max_rank.max(rank);
        }
        if count == 0 {
            return Err(bad("holds no LoRA pairs".into()));
        }
        Ok(Self { blocks, rank: max_rank, n_embd: e, inner })
    }

    /// The largest rank of its pairs.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Whether this adapter fits a model of `config`'s shape (layers,
    /// `n_embd`, MLP width); the error says what differs.
    pub fn check_fits(&self, config: &Gpt2Config) -> Result<()> {
        let have = (self.blocks.len(), self.n_embd, self.inner);
        let want = (config.n_layer, config.n_embd, config.inner_dim());
        if have != want {
            return Err(ModelError::Adapter(format!(
                "made for {} layers, n_embd {}, MLP width {}; the model has {} layers, n_embd {}, MLP width {}",
                have.0, have.1, have.2, want.0, want.1, want.2
            )));
        }
        Ok(())
    }

    /// The same adapter with its tensors on `device` (for a model on a
    /// GPU; the runtime is built on the CPU).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let blocks = self
            .blocks
            .iter()
            .map(|block| {
                let mut moved: [Option<LoraPair>; 4] = Default::default();
                for (slot, pair) in moved.iter_mut().zip(block) {
                    if let Some(p) = pair {
                        *slot = Some(LoraPair { a: p.a.to_device(device)?, b: p.b.to_device(device)? });
                    }
                }
                Ok(moved)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks, ..self.clone() })
    }

    /// Bytes held by the pairs.
    pub fn bytes(&self) -> usize {
        self.blocks.iter().flatten().flatten().map(|p| 4 * (p.a.elem_count() + p.b.elem_count())).sum()
    }

    pub(crate) fn pair(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        self.blocks.get(layer).and_then(|b| b[target as usize].as_ref())
    }
}

/// `h.{layer}.{target}` to its indices, for layers below `n_layer`.
fn parse_prefix(prefix: &str, n_layer: usize) -> Option<(usize, Target)> {
    let rest = prefix.strip_prefix("h.")?;
    let (layer, target) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let target = match LORA_TARGETS.iter().position(|t| *t == target)? {
        0 => Target::AttnCAttn,
        1 => Target::AttnCProj,
        2 => Target::MlpCFc,
        _ => Target::MlpCProj,
    };
    (layer < n_layer).then_some((layer, target))
}

/// One sequence's rows (`start..start + len` of the batch) and the pair to
/// apply to them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SpanDelta<'a> {
    pub start: usize,
    pub len: usize,
    pub pair: &'a LoraPair,
}

/// `y[span] += (x[span] · A) · B` for every span (`x: [rows, in]`,
/// `y: [rows, out]`, spans in row order and disjoint). Rows outside the
/// spans are left exactly as they are.
pub(crate) fn add_deltas(x: &Tensor, y: Tensor, spans: &[SpanDelta]) -> Result<Tensor> {
    if spans.is_empty() {
        return Ok(y);
    }
    let (rows, n_in) = x.dims2()?;
    let (y_rows, n_out) = y.dims2()?;
    for s in spans {
        if s.start + s.len > rows || s.pair.n_in() != n_in || s.pair.n_out() != n_out || y_rows != rows {
            return Err(ModelError::Input(format!(
                "LoRA update of rows {}..{} with a [{}, {}] pair does not fit x [{rows}, {n_in}] / y [{y_rows}, {n_out}]",
                s.start,
                s.start + s.len,
                s.pair.n_in(),
                s.pair.n_out()
            )));
        }
    }
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if cpu_f32(x) && cpu_f32(&y) && spans.iter().all(|s| cpu_f32(&s.pair.a) && cpu_f32(&s.pair.b)) {
        add_deltas_cpu(x, &y, spans)?;
        Ok(y)
    } else {
        add_deltas_candle(x, &y, spans)
    }
}

/// Any device or dtype: one `x_span · A · B` product per span (in f32),
/// the rows put back together with `cat`.
pub(crate) fn add_deltas_candle(x: &Tensor, y: &Tensor, spans: &[SpanDelta]) -> Result<Tensor> {
    let rows = y.dim(0)?;
    let mut pieces = Vec::with_capacity(2 * spans.len() + 1);
    let mut at = 0;
    for s in spans {
        if s.start > at {
            pieces.push(y.narrow(0, at, s.start - at)?);
        }
        let xs = x.narrow(0, s.start, s.len)?.to_dtype(DType::F32)?;
        let a = s.pair.a.to_device(x.device())?;
        let b = s.pair.b.to_device(x.device())?;
        let delta = xs.matmul(&a)?.matmul(&b)?.to_dtype(y.dtype())?;
        pieces.push((y.narrow(0, s.start, s.len)? + delta)?);
        at = s.start + s.len;
    }
    if at < rows {
        pieces.push(y.narrow(0, at, rows - at)?);
    }
    Ok(Tensor::cat(&pieces, 0)?)
}

/// CPU, f32: the update of each adapted row, added into `y` in place.
fn add_deltas_cpu(x: &Tensor, y: &Tensor, spans: &[SpanDelta]) -> Result<()> {
    // Read access to x and every pair for the duration of the update; y
    // is a fresh tensor of its own, written under its own lock.
    let (x_storage, x_layout) = x.storage_and_layout();
    {
        // y is written under its storage's lock: it must not be x's.
        let (y_storage, _) = y.storage_and_layout();
        if std::ptr::eq(&*x_storage, &*y_storage) {
            return Err(ModelError::Input("a LoRA update cannot write into its own input".into()));
        }
    }
    let xs = cpu_slice(&x_storage, x_layout)?;
    let guards: Vec<_> = spans.iter().map(|s| (s.pair.a.storage_and_layout(), s.pair.b.storage_and_layout())).collect();
    let mut pairs = Vec::with_capacity(spans.len());
    for (s, ((a_storage, a_layout), (b_storage, b_layout))) in spans.iter().zip(&guards) {
        let a = cpu_slice(a_storage, a_layout)?;
        let b = cpu_slice(b_storage, b_layout)?;
        pairs.push((s.start, s.len, a, b, s.pair.rank()));
    }
    let op = AddRowDeltas { xs, n_in: x.dim(1)?, n_out: y.dim(1)?, spans: pairs };
    Ok(y.inplace_op1(&op)?)
}

fn cpu_slice<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(ModelError::Input("the CPU LoRA path needs CPU tensors".into()));
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| ModelError::Input("the CPU LoRA path needs contiguous tensors".into()))?;
    Ok(&data[start..end])
}

/// The in-place update: `spans` are `(start, len, A [in, r], B [r, out], r)`.
/// One span's rows and its pair: first row, row count, `A`, `B`, rank.
type RowSpan<'a> = (usize, usize, &'a [f32], &'a [f32], usize);

struct AddRowDeltas<'a> {
    xs: &'a [f32],
    n_in: usize,
    n_out: usize,
    spans: Vec<RowSpan<'a>>,
}

impl InplaceOp1 for AddRowDeltas<'_> {
    fn name(&self) -> &'static str {
        "lora-add-row-deltas"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("LoRA update needs an f32 output")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("LoRA update needs a contiguous output")
        };
        let ys = &mut data[start..end];
        let (n_in, n_out) = (self.n_in, self.n_out);
        // (x row, y row, A, B, r) for every adapted row; spans are in row
        // order and disjoint, so one pass over y's rows pairs them up.
        let mut wanted = self
            .spans
            .iter()
            .flat_map(|&(start, len, a, b, r)| (start..start + len).map(move |row| (row, a, b, r)))
            .peekable();
        let mut rows = Vec::new();
        for (row, y) in ys.chunks_exact_mut(n_out).enumerate() {
            if let Some((_, a, b, r)) = wanted.next_if(|w| w.0 == row) {
                rows.push((&self.xs[row * n_in..(row + 1) * n_in], y, a, b, r));
            }
        }
        if rows.len() <= PARALLEL_ROWS {
            rows.into_iter().for_each(|(x, y, a, b, r)| row_delta(x, a, b, r, y));
        } else {
            rows.into_par_iter().for_each(|(x, y, a, b, r)| row_delta(x, a, b, r, y));
        }
        Ok(())
    }
}

/// `y += (x · A) · B` for one row: `x` `[in]`, `A` `[in, r]`, `B` `[r, out]`.
/// Sums run in a fixed order (fused multiply-adds over `in`, then over `r`,
/// into `y`), whatever the batch.
fn row_delta(x: &[f32], a: &[f32], b: &[f32], rank: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { row_delta_avx2(x, a, b, rank, y) };
        }
    }
    row_delta_portable(x, a, b, rank, y)
}

/// A wrapper of its own so the body is compiled with the features (see
/// `kernels::band_axpy`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_delta_avx2(x: &[f32], a: &[f32], b: &[f32], rank: usize, y: &mut [f32]) {
    row_delta_portable(x, a, b, rank, y)
}

/// `x · A` runs over groups of this many rank columns, one vector register
/// each (a narrower last group is zero-padded).
const GROUP: usize = 8;

#[inline(always)]
fn row_delta_portable(x: &[f32], a: &[f32], b: &[f32], rank: usize, y: &mut [f32]) {
    // Ranks are small (4 to 64): the intermediate lives on the stack.
    let mut buf = [0f32; 64];
    let mut heap = Vec::new();
    let u: &mut [f32] = if rank <= buf.len() {
        &mut buf[..rank]
    } else {
        heap.resize(rank, 0f32);
        &mut heap
    };
    // u = x · A, GROUP columns at a time.
    for c0 in (0..rank).step_by(GROUP) {
        let width = (rank - c0).min(GROUP);
        let sums = if width == GROUP {
            group_dot(x, a, rank, |row| row[c0..c0 + GROUP].try_into().unwrap_or([0.0; GROUP]))
        } else {
            group_dot(x, a, rank, |row| {
                let mut padded = [0f32; GROUP];
                padded[..width].copy_from_slice(&row[c0..c0 + width]);
                padded
            })
        };
        u[c0..c0 + width].copy_from_slice(&sums[..width]);
    }
    // y += u · B, one row of B at a time.
    for (&uj, b_row) in u.iter().zip(b.chunks_exact(y.len())) {
        for (yk, &bjk) in y.iter_mut().zip(b_row) {
            *yk = uj.mul_add(bjk, *yk);
        }
    }
}

/// `Σ_i x[i] · load(A[i])` for one group of columns, in four independent
/// partial sums (input i into sum i mod 4, a tail into the first), added
/// pairwise at the end: a fixed order for every row, and no chain of
/// dependent multiply-adds waiting on each other.
#[inline(always)]
fn group_dot(x: &[f32], a: &[f32], rank: usize, load: impl Fn(&[f32]) -> [f32; GROUP]) -> [f32; GROUP] {
    let mut acc = [[0f32; GROUP]; 4];
    let mut x_quads = x.chunks_exact(4);
    let mut a_quads = a.chunks_exact(4 * rank);
    for (xq, aq) in (&mut x_quads).zip(&mut a_quads) {
        let rows = [load(&aq[..rank]), load(&aq[rank..2 * rank]), load(&aq[2 * rank..3 * rank]), load(&aq[3 * rank..])];
        for q in 0..4 {
            for l in 0..GROUP {
                acc[q][l] = xq[q].mul_add(rows[q][l], acc[q][l]);
            }
        }
    }
    for (&xi, row) in x_quads.remainder().iter().zip(a_quads.remainder().chunks_exact(rank)) {
        let row = load(row);
        for l in 0..GROUP {
            acc[0][l] = xi.mul_add(row[l], acc[0][l]);
        }
    }
    let mut out = [0f32; GROUP];
    for l in 0..GROUP {
        out[l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Gpt2Config {
        Gpt2Config::with_shape(32, 2, 4)
    }

    fn peft_pairs(cfg: &Gpt2Config, rank: usize) -> Vec<(String, Tensor, Tensor)> {
        let (e, inner) = (cfg.n_embd, cfg.inner_dim());
        let mut out = Vec::new();
        for layer in 0..cfg.n_layer {
            for (target, (n_in, n_out)) in LORA_TARGETS.iter().zip([(e, 3 * e), (e, e), (e, inner), (inner, e)]) {
                let a = Tensor::randn(0f32, 0.3, (rank, n_in), &Device::Cpu).unwrap();
                let b = Tensor::randn(0f32, 0.3, (n_out, rank), &Device::Cpu).unwrap();
                out.push((format!("h.{layer}.{target}"), a, b));
            }
        }
        out
    }

    fn build(cfg: &Gpt2Config, pairs: &[(String, Tensor, Tensor)]) -> Result<LoraRuntime> {
        LoraRuntime::from_peft_pairs(cfg, pairs.iter().map(|(p, a, b)| (p.as_str(), a, b, 2.0)))
    }

    #[test]
    fn cpu_update_matches_candle_products_and_leaves_other_rows_alone() {
        // Ranks narrower than a group, one full group, a group and a tail.
        for rank in [4, 8, 12] {
            check_cpu_update(rank);
        }
    }

    fn check_cpu_update(rank: usize) {
        let cfg = config();
        let pairs = peft_pairs(&cfg, rank);
        let runtime = build(&cfg, &pairs).unwrap();
        assert_eq!(runtime.rank(), rank);
        let pair = runtime.pair(1, Target::MlpCFc).unwrap();
        let x = Tensor::randn(0f32, 1.0, (7, 32), &Device::Cpu).unwrap();
        let y = Tensor::randn(0f32, 1.0, (7, 128), &Device::Cpu).unwrap();
        let spans = [SpanDelta { start: 1, len: 3, pair }, SpanDelta { start: 5, len: 1, pair }];
        let want = add_deltas_candle(&x, &y, &spans).unwrap();
        let got = add_deltas(&x, y.copy().unwrap(), &spans).unwrap();
        let diff = (got.clone() - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{diff}");
        // The reference against PEFT's formula, x·Aᵀ·Bᵀ·scaling.
        let (_, a, b) = &pairs[4 + 2];
        let peft = (x.narrow(0, 1, 3).unwrap().matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * 2.0).unwrap();
        let ours = (got.narrow(0, 1, 3).unwrap() - y.narrow(0, 1, 3).unwrap()).unwrap();
        let diff = (ours - peft).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{diff}");
        for row in [0, 4, 6] {
            let same: Vec<f32> = got.get(row).unwrap().to_vec1().unwrap();
            assert_eq!(same, y.get(row).unwrap().to_vec1::<f32>().unwrap(), "row {row} untouched");
        }
        // A row's update does not depend on the rows around it.
        let alone = add_deltas(&x.narrow(0, 5, 1).unwrap(), y.narrow(0, 5, 1).unwrap().copy().unwrap(), &[SpanDelta { start: 0, len: 1, pair }]).unwrap();
        assert_eq!(alone.get(0).unwrap().to_vec1::<f32>().unwrap(), got.get(5).unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn shapes_are_checked_and_named() {
        let cfg = config();
        let mut pairs = peft_pairs(&cfg, 4);
        pairs[3].1 = Tensor::zeros((4, 16), DType::F32, &Device::Cpu).unwrap();
        let err = build(&cfg, &pairs).unwrap_err().to_string();
        assert!(err.contains("`h.0.mlp.c_proj.lora_A` is [4, 16]") && err.contains("[4, 128]"), "{err}");
        let mut pairs = peft_pairs(&cfg, 4);
        pairs[0].0 = "h.7.attn.c_attn".into();
        let err = build(&cfg, &pairs).unwrap_err().to_string();
        assert!(err.contains("h.7.attn.c_attn") && err.contains("2 layers"), "{err}");
        let runtime = build(&cfg, &peft_pairs(&cfg, 4)).unwrap();
        assert!(runtime.check_fits(&cfg).is_ok());
        let err = runtime.check_fits(&Gpt2Config::with_shape(64, 2, 4)).unwrap_err().to_string();
        assert!(err.contains("n_embd 32") && err.contains("n_embd 64"), "{err}");
        assert!(build(&cfg, &[]).is_err());
    }
}
