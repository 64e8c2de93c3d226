//! Matrix products for the few-rows case, where decoding spends its time.
//!
//! A decode step multiplies a handful of activation rows (one per sequence
//! in the batch) by every weight matrix once, so at small batches it is
//! bound by memory bandwidth, not arithmetic. candle's gemm runs such
//! products on one thread (measured: ~60% of the bandwidth of these
//! machines). These kernels stream each weight matrix exactly once, split
//! across the rayon pool in fixed bands, fuse multiply and add (AVX2 + FMA
//! chosen at run time), and keep every row's sum in the same order whatever
//! the number of rows, so a sequence's result does not depend on what else
//! is in the batch.
//!
//! Weights are plain row-major f32 slices read straight from the tensor's
//! storage; the few activation rows are copied out and the result copied back.
//!
//! On AVX-512 CPUs the packed projections (from 4 rows) and the head (from
//! 8) take the kernels in `kernels/wide.rs` instead: split by columns, wider
//! register tiles, the same bits. The 8-bit products (integer dot products
//! on quantised activations) are in `kernels/q8.rs`; attention over the per-sequence caches of a batched
//! step is in `kernels/attention.rs`.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

pub mod attention;
mod q8;
mod wide;

pub use wide::F32_KERNELS_ENV;
pub use q8::{rows_times_packed_q8, rows_times_packed_q8_plus, rows_times_q8_t, PackedQ8, Q8Matrix, Q8_BLOCK};

/// Rows up to which decode steps use these kernels rather than gemm. Every
/// batch size up to this bound computes a row's sums in the same order, so
/// a sequence's greedy output does not depend on its batch.
pub const SMALL_ROWS: usize = 32;

/// Vocabulary rows handed to one rayon task in [`rows_times_matrix_t`].
const COLUMN_BLOCK: usize = 256;

/// Whether `x @ w` should take the few-rows path.
pub fn wants_small_path(x: &Tensor, w: &Tensor, rows: usize) -> bool {
    rows <= SMALL_ROWS && cpu_f32(x, w)
}

/// Whether the head's `x @ wᵀ` should take [`rows_times_matrix_t`]: few
/// rows, or any number where the AVX-512 kernels run (same bits either way;
/// otherwise gemm, whose sums depend on the shape).
pub fn wants_head_path(x: &Tensor, w: &Tensor, rows: usize) -> bool {
    (rows <= SMALL_ROWS || wide::available()) && cpu_f32(x, w)
}

/// Whether these kernels take `x` and `w` at all: f32 on the CPU, `w`
/// contiguous.
fn cpu_f32(x: &Tensor, w: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && w.dtype() == DType::F32 && w.is_contiguous()
}

/// Runs `f` over a contiguous CPU f32 tensor's values (an error for any
/// other tensor).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("few-rows kernel needs a CPU tensor")
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("few-rows kernel needs a contiguous tensor".into()))?;
    Ok(f(&data[start..end]))
}

/// GPT-2's `gelu_new`, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`,
/// written as `x / (1 + exp(−2u))` (the same function: `0.5·(1 + tanh u)`
/// is `sigmoid(2u)`), element-wise over rayon chunks. candle's `gelu`
/// calls `tanhf` per element on one thread; this is what a decode step's
/// MLP spends its non-product time on. Every element is computed alone, so
/// a row never depends on its batch. Non-CPU or non-f32 tensors take
/// candle's op.
pub fn gelu_new(x: &Tensor) -> candle_core::Result<Tensor> {
    if !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 || !x.is_contiguous() {
        return x.gelu();
    }
    const CHUNK: usize = 8192;
    let out = with_f32(x, |xs| {
        let mut out = vec![0f32; xs.len()];
        if xs.len() <= CHUNK {
            gelu_dispatch(xs, &mut out);
        } else {
            out.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(o, i)| gelu_dispatch(i, o));
        }
        out
    })?;
    Tensor::from_vec(out, x.shape(), x.device())
}

fn gelu_dispatch(xs: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { gelu_avx2(xs, out) };
        }
    }
    gelu_slice(xs, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(xs: &[f32], out: &mut [f32]) {
    gelu_slice(xs, out)
}

#[inline(always)]
fn gelu_slice(xs: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(xs) {
        let u = 0.797_884_6_f32 * (v + 0.044_715 * v * v * v);
        *o = v / (1.0 + exp_approx(-2.0 * u));
    }
}

/// `e^x` within about 2 ulp of `f32::exp`, in straight-line arithmetic
/// that vectorises (libm's `expf` is a call per element): Cephes' `expf`
/// (a split `ln 2` for the range reduction, a degree-7 polynomial on
/// `|r| ≤ ln 2 / 2`), `2^n` built from its bits. Below −87 (under `f32`'s
/// normal range) it gives 0, above 88 it gives `e^88` (finite); NaN stays
/// NaN. The GELU and the pool's log-sum-exp use it.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    // Adding 1.5 · 2^23 rounds to an integer, which the low bits then hold.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(-87.0, 88.0);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let k = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_66;
    let p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    let scale = f32::from_bits((k.wrapping_add(127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        e * scale
    }
}

/// `x @ w` for `x: [rows, k]` and `w: [k, n]` (GPT-2's Conv1D layout).
///
/// Each task takes a fixed band of `K_BLOCK` weight rows, a contiguous
/// stretch of memory the prefetchers stream well, and accumulates partial
/// sums for every output column; the partial sums are then added in band
/// order. The bands depend only on `k`, so the result does not depend on the
/// number of rows or threads.
pub fn rows_times_matrix(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let (wk, n) = w.dims2()?;
    if wk != k {
        candle_core::bail!("rows_times_matrix: x is [{rows}, {k}] but w is [{wk}, {n}]")
    }
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let out = with_f32(w, |w| banded(k, rows, n, |k0, k1, acc| band_axpy(&xs, k, &w[k0 * n..k1 * n], k0, n, rows, acc)))?;
    Tensor::from_vec(out, (rows, n), x.device())
}

/// Weight rows per task in the banded kernels.
const K_BLOCK: usize = 128;

/// Runs `band(k0, k1, acc)` for fixed bands of `K_BLOCK` weight rows across
/// the rayon pool, each into its own `[rows, n]` partial sum, and adds the
/// partials in band order (a fixed order, whatever the thread count).
fn banded(k: usize, rows: usize, n: usize, band: impl Fn(usize, usize, &mut [f32]) + Sync) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = (0..k.div_ceil(K_BLOCK))
        .into_par_iter()
        .map(|b| {
            let k0 = b * K_BLOCK;
            let mut acc = vec![0f32; rows * n];
            band(k0, (k0 + K_BLOCK).min(k), &mut acc);
            acc
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut out = partials.next().unwrap_or_else(|| vec![0f32; rows * n]);
    for p in partials {
        add_assign(&mut out, &p);
    }
    out
}

/// `acc[r] += Σ_kk xs[r, k0 + kk] · band[kk]` over the band's rows.
///
/// Each kernel has its own small `#[target_feature]` wrapper on purpose: a
/// generic "run this closure with AVX2" helper was tried and measured 10×
/// slower, because the kernel inside the closure is then compiled without
/// the features (and `mul_add` becomes a libm call).
fn band_axpy(xs: &[f32], k: usize, band: &[f32], k0: usize, n: usize, rows: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { band_axpy_avx2(xs, k, band, k0, n, rows, acc) };
        }
    }
    band_axpy_portable(xs, k, band, k0, n, rows, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn band_axpy_avx2(xs: &[f32], k: usize, band: &[f32], k0: usize, n: usize, rows: usize, acc: &mut [f32]) {
    band_axpy_portable(xs, k, band, k0, n, rows, acc)
}

/// Streams the band row by row. Only weights that cannot be packed (a
/// column count that is not a multiple of 16) come here; packed ones take
/// [`rows_times_packed`]. Every output element is `fma(x[r, kk], w[kk, c], ·)`
/// over the band's rows in order, starting from 0, exactly as the packed
/// kernel computes it.
#[inline(always)]
fn band_axpy_portable(xs: &[f32], k: usize, band: &[f32], k0: usize, n: usize, rows: usize, acc: &mut [f32]) {
    for (i, wrow) in band.chunks_exact(n).enumerate() {
        for r in 0..rows {
            let xv = xs[r * k + k0 + i];
            for (d, &wv) in acc[r * n..(r + 1) * n].iter_mut().zip(wrow) {
                *d = xv.mul_add(wv, *d);
            }
        }
    }
}

/// Output columns per register tile.
const TILE: usize = 16;

fn add_assign(out: &mut [f32], p: &[f32]) {
    for (o, v) in out.iter_mut().zip(p) {
        *o += v;
    }
}

/// `x @ wᵀ` for `x: [rows, k]` and `w: [n, k]` (the tied head: one dot
/// product per vocabulary row).
pub fn rows_times_matrix_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    if wk != k {
        candle_core::bail!("rows_times_matrix_t: x is [{rows}, {k}] but w is [{n}, {wk}]")
    }
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let out = with_f32(w, |w| {
        let wide = if rows >= wide::HEAD_FROM_ROWS { wide::rows_times_matrix_t(&xs, rows, k, w) } else { None };
        wide.unwrap_or_else(|| matrix_t_few(&xs, rows, k, w))
    })?;
    Tensor::from_vec(out, (rows, n), x.device())
}

/// [`rows_times_matrix_t`] on the few-rows kernel: `[rows, n]`.
fn matrix_t_few(xs: &[f32], rows: usize, k: usize, w: &[f32]) -> Vec<f32> {
    let n = w.len() / k;
    // Column-major result, one chunk of vocabulary rows per task.
    let mut by_col = vec![0f32; n * rows];
    by_col.par_chunks_mut(COLUMN_BLOCK * rows).enumerate().for_each(|(block, dst)| {
        let v0 = block * COLUMN_BLOCK;
        for (i, out_v) in dst.chunks_mut(rows).enumerate() {
            let wrow = &w[(v0 + i) * k..(v0 + i + 1) * k];
            dots_dispatch(xs, k, wrow, out_v);
        }
    });
    let mut out = vec![0f32; rows * n];
    for v in 0..n {
        for r in 0..rows {
            out[r * n + v] = by_col[v * rows + r];
        }
    }
    out
}

/// `out[r] = x[r] · w` for every row of `xs` (`[rows, k]`).
fn dots_dispatch(xs: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { dots_avx2(xs, k, w, out) };
        }
    }
    dots(xs, k, w, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(xs: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
    dots(xs, k, w, out)
}

/// Lanes per dot product: four independent vector chains, so the adds do
/// not wait on each other.
const LANES: usize = 32;

#[inline(always)]
fn dots(xs: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
    let rows = out.len();
    let mut r = 0;
    while r < rows {
        let group = (rows - r).min(2);
        if group == 2 {
            dot_group::<2>(xs, k, w, r, out);
        } else {
            dot_group::<1>(xs, k, w, r, out);
        }
        r += group;
    }
}

/// `G` dot products sharing each load of `w`; each row's sum is the same
/// whatever `G` (32 lanes in order, then a fixed reduction, then the tail).
#[inline(always)]
fn dot_group<const G: usize>(xs: &[f32], k: usize, w: &[f32], r0: usize, out: &mut [f32]) {
    let mut lanes = [[0f32; LANES]; G];
    let chunks = k / LANES;
    for c in 0..chunks {
        let wc: &[f32; LANES] = w[c * LANES..(c + 1) * LANES].try_into().unwrap_or_else(|_| unreachable!());
        for g in 0..G {
            let x = &xs[(r0 + g) * k + c * LANES..(r0 + g) * k + (c + 1) * LANES];
            for l in 0..LANES {
                lanes[g][l] = x[l].mul_add(wc[l], lanes[g][l]);
            }
        }
    }
    for g in 0..G {
        let x = &xs[(r0 + g) * k..(r0 + g + 1) * k];
        let mut width = LANES;
        let lane = &mut lanes[g];
        while width > 1 {
            width /= 2;
            for l in 0..width {
                lane[l] += lane[l + width];
            }
        }
        let mut tail = 0f32;
        for i in chunks * LANES..k {
            tail = x[i].mul_add(w[i], tail);
        }
        out[r0 + g] = lane[0] + tail;
    }
}

// ---- packed f32 weights ---------------------------------------------------

/// An f32 `[k, n]` weight matrix repacked so that every register tile's
/// reads are contiguous: for each band of `K_BLOCK` rows, each 16-column
/// tile's `band_rows × 16` values sit together. Same size as the original;
/// the products are bit-identical to [`rows_times_matrix`]'s.
#[derive(Debug)]
pub struct PackedMatrix {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedMatrix {
    /// Packs a row-major `[k, n]` f32 tensor; `n` must be a multiple of 16.
    pub fn pack(w: &Tensor) -> candle_core::Result<Self> {
        let (k, n) = w.dims2()?;
        if n % TILE != 0 {
            candle_core::bail!("packed weights need a multiple of {TILE} columns, not {n}")
        }
        let src: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut data = vec![0f32; k * n];
        for k0 in (0..k).step_by(K_BLOCK) {
            let band_rows = (k0 + K_BLOCK).min(k) - k0;
            for t in 0..n / TILE {
                let base = k0 * n + t * band_rows * TILE;
                for i in 0..band_rows {
                    let from = (k0 + i) * n + t * TILE;
                    data[base + i * TILE..base + (i + 1) * TILE].copy_from_slice(&src[from..from + TILE]);
                }
            }
        }
        Ok(Self { k, n, data })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The original row-major `[k, n]` tensor.
    pub fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        let (k, n) = (self.k, self.n);
        let mut out = vec![0f32; k * n];
        for k0 in (0..k).step_by(K_BLOCK) {
            let band_rows = (k0 + K_BLOCK).min(k) - k0;
            for t in 0..n / TILE {
                let base = k0 * n + t * band_rows * TILE;
                for i in 0..band_rows {
                    let to = (k0 + i) * n + t * TILE;
                    out[to..to + TILE].copy_from_slice(&self.data[base + i * TILE..base + (i + 1) * TILE]);
                }
            }
        }
        Tensor::from_vec(out, (k, n), device)
    }
}

/// `x @ w` for `x: [rows, k]` (any number of rows) and a packed `w`.
pub fn rows_times_packed(x: &Tensor, w: &PackedMatrix) -> candle_core::Result<Tensor> {
    rows_times_packed_plus(x, w, None)
}

/// `x @ w + bias` for `x: [rows, k]` (any number of rows), a packed `w`
/// (`[k, n]`) and an optional f32 `bias` (`[n]`): `[rows, n]`. On AVX-512
/// the bias goes in inside the kernel's tasks; the bits are those of adding
/// it afterwards.
pub fn rows_times_packed_plus(x: &Tensor, w: &PackedMatrix, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let (wk, n) = w.dims();
    if wk != k {
        candle_core::bail!("rows_times_packed: x is [{rows}, {k}] but w is [{wk}, {n}]")
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let bias = bias.map(|b| b.to_dtype(DType::F32)?.contiguous()).transpose()?;
    if let Some(b) = &bias {
        if b.dims() != [n] {
            candle_core::bail!("rows_times_packed: bias is {:?}, not [{n}]", b.dims())
        }
    }
    let wide = if rows < wide::PROJECTION_FROM_ROWS {
        None
    } else {
        with_f32(&x, |xs| match &bias {
            Some(b) => with_f32(b, |b| wide::packed_product(xs, rows, w, Some(b))),
            None => Ok(wide::packed_product(xs, rows, w, None)),
        })??
    };
    if let Some(out) = wide {
        return Tensor::from_vec(out, (rows, n), x.device());
    }
    let out = with_f32(&x, |xs| packed_few(xs, rows, w))?;
    let y = Tensor::from_vec(out, (rows, n), x.device())?;
    match bias {
        Some(b) => y.broadcast_add(&b),
        None => Ok(y),
    }
}

/// [`rows_times_packed`] on the few-rows kernel: `[rows, n]`.
fn packed_few(xs: &[f32], rows: usize, w: &PackedMatrix) -> Vec<f32> {
    let (k, n) = w.dims();
    banded(k, rows, n, |k0, k1, acc| packed_band_dispatch(xs, k, &w.data[k0 * n..k1 * n], k0, n, rows, acc))
}

fn packed_band_dispatch(xs: &[f32], k: usize, band: &[f32], k0: usize, n: usize, rows: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { packed_band_avx2(xs, k, band, k0, n, rows, acc) };
        }
    }
    packed_band(xs, k, band, k0, n, rows, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn packed_band_avx2(xs: &[f32], k: usize, band: &[f32], k0: usize, n: usize, rows: usize, acc: &mut [f32]) {
    packed_band(xs, k, band, k0, n, rows, acc)
}

#[inline(always)]
fn packed_band(xs: &[f32], k: usize, band: &[f32], k0: usize, n: usize, rows: usize, acc: &mut [f32]) {
    let band_rows = band.len() / n;
    for t in 0..n / TILE {
        let strip = &band[t * band_rows * TILE..(t + 1) * band_rows * TILE];
        let mut r = 0;
        while r < rows {
            let group = (rows - r).min(4);
            match group {
                4 => packed_tile::<4>(xs, k, strip, k0, n, r, t * TILE, acc),
                3 => packed_tile::<3>(xs, k, strip, k0, n, r, t * TILE, acc),
                2 => packed_tile::<2>(xs, k, strip, k0, n, r, t * TILE, acc),
                _ => packed_tile::<1>(xs, k, strip, k0, n, r, t * TILE, acc),
            }
            r += group;
        }
    }
}

/// `G` rows × 16 columns over one contiguous strip, in registers; the same
/// fused multiply-adds in the same order as [`band_axpy_portable`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn packed_tile<const G: usize>(xs: &[f32], k: usize, strip: &[f32], k0: usize, n: usize, r0: usize, c0: usize, acc: &mut [f32]) {
    let mut a = [[0f32; TILE]; G];
    for (i, w) in strip.chunks_exact(TILE).enumerate() {
        let w: &[f32; TILE] = w.try_into().unwrap_or_else(|_| unreachable!());
        for g in 0..G {
            let xv = xs[(r0 + g) * k + k0 + i];
            for j in 0..TILE {
                a[g][j] = xv.mul_add(w[j], a[g][j]);
            }
        }
    }
    for g in 0..G {
        acc[(r0 + g) * n + c0..(r0 + g) * n + c0 + TILE].copy_from_slice(&a[g]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn kernels_match_gemm() {
        let dev = Device::Cpu;
        for (rows, k, n) in [(1, 768, 2304), (3, 64, 300), (4, 17, 5)] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (k, n), &dev).unwrap();
            let reference = x.matmul(&w).unwrap();
            assert!(close(&rows_times_matrix(&x, &w).unwrap(), &reference) < 1e-3);
            let wt = w.t().unwrap().contiguous().unwrap();
            assert!(close(&rows_times_matrix_t(&x, &wt).unwrap(), &reference) < 1e-3);
        }
    }

    #[test]
    fn packed_weights_give_the_same_bits_as_the_banded_kernel() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (300, 96), &dev).unwrap();
        let p = PackedMatrix::pack(&w).unwrap();
        assert_eq!(close(&p.to_tensor(&dev).unwrap(), &w), 0.0);
        for rows in [1, 3, 5, 40] {
            let x = Tensor::randn(0f32, 1.0, (rows, 300), &dev).unwrap();
            let packed = rows_times_packed(&x, &p).unwrap();
            if rows <= SMALL_ROWS {
                assert_eq!(close(&packed, &rows_times_matrix(&x, &w).unwrap()), 0.0, "rows {rows}");
            }
            assert!(close(&packed, &x.matmul(&w).unwrap()) < 1e-3);
            let one = rows_times_packed(&x.narrow(0, rows - 1, 1).unwrap(), &p).unwrap();
            assert_eq!(close(&packed.narrow(0, rows - 1, 1).unwrap(), &one), 0.0);
        }
        assert!(PackedMatrix::pack(&Tensor::zeros((4, 20), DType::F32, &dev).unwrap()).is_err());
    }

    #[test]
    fn a_row_does_not_depend_on_its_neighbours() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 96), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (96, 530), &dev).unwrap();
        let all = rows_times_matrix(&x, &w).unwrap();
        let one = rows_times_matrix(&x.narrow(0, 2, 1).unwrap(), &w).unwrap();
        assert_eq!(close(&all.narrow(0, 2, 1).unwrap(), &one), 0.0);
        let wt = w.t().unwrap().contiguous().unwrap();
        let all = rows_times_matrix_t(&x, &wt).unwrap();
        let one = rows_times_matrix_t(&x.narrow(0, 2, 1).unwrap(), &wt).unwrap();
        assert_eq!(close(&all.narrow(0, 2, 1).unwrap(), &one), 0.0);
    }

    #[test]
    fn exp_approx_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let got = exp_approx(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_7;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert_eq!(exp_approx(-88.0), 0.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert!(exp_approx(1000.0).is_finite() && exp_approx(1000.0) > 1e38);
        assert!(exp_approx(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_new_matches_candles() {
        let x = (Tensor::randn(0f32, 3.0, (64, 3072), &Device::Cpu).unwrap() * 1.0).unwrap();
        let extremes = Tensor::new(&[[-100f32, -20.0, -5.0, -0.0, 0.0, 1e-6, 5.0, 20.0, 100.0, f32::MIN_POSITIVE]], &Device::Cpu).unwrap();
        for x in [&x, &extremes] {
            let want = x.gelu().unwrap();
            let got = gelu_new(x).unwrap();
            let err = (&got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 2e-6, "gelu differs by {err}");
        }
        let t0 = std::time::Instant::now();
        for _ in 0..20 {
            x.gelu().unwrap();
        }
        let candle = t0.elapsed();
        let t0 = std::time::Instant::now();
        for _ in 0..20 {
            gelu_new(&x).unwrap();
        }
        eprintln!("gelu over [64, 3072] ×20: candle {candle:?}, ours {:?}", t0.elapsed());
    }
}
