//! 8-bit weights and the integer kernels that multiply by them.
//!
//! Weights are quantised q8_0-style: every block of [`Q8_BLOCK`] consecutive
//! values along the *input* dimension of one output column shares an f32
//! scale, `w ≈ q · scale`, `q` in −127..=127 (symmetric, round to nearest).
//! The blocks run along the input dimension because that is the dimension a
//! product sums over: at run time each activation row is quantised the same
//! way (per block of 32, its own scale), so a block's contribution to an
//! output is an exact integer dot product times two scales, and the sum over
//! 32 values costs a handful of integer instructions instead of 32 fused
//! multiply-adds.
//!
//! ## Layout
//!
//! Output columns are grouped in tiles of 16 (one 512-bit register of i32
//! lanes). For each tile and each block of 32 inputs, 512 bytes sit
//! together: eight groups of 64 bytes, each holding, for the tile's 16
//! columns in order, 4 consecutive inputs of that column. That is the
//! operand `vpdpbusd` wants: one load gives every lane its column's 4 bytes,
//! and one broadcast of 4 activation bytes feeds all 16 lanes. A tile's
//! blocks follow each other, so a tile is one contiguous stream. The scales
//! are a second stream in the same order (16 f32 per tile and block).
//! Widths that are not multiples of 16 (columns) or 32 (inputs) are padded
//! with zero weights, and padded outputs are never written.
//!
//! ## Signed × unsigned
//!
//! `vpdpbusd` multiplies *unsigned* bytes by *signed* bytes. The weights are
//! stored offset by 128 (`u = q + 128`, 1..=255) as the unsigned operand and
//! the activations stay signed, so a block sums `Σ u·x = Σ q·x + 128·Σ x`.
//! The activation quantiser records `−128·Σ x` per row and block, and the
//! block's accumulator starts from it, so what comes out is exactly `Σ q·x`.
//! (The other usual choice, activations + 128 and a correction per weight
//! column and block, streams a second per-block array with the weights; this
//! one costs no bandwidth.) A block's sum is at most 32 · 255 · 127 in size:
//! no overflow, and exact in f32 (below 2²⁴). Without VNNI, the AVX2 path
//! reaches the same integers by llama.cpp's other route (see `Avx2`):
//! weights back to signed, the activation's sign moved onto them.
//!
//! Activations are quantised per row and block of 32: `scale = max|x| / 127`,
//! `q = round(x · 127 / max|x|)` (ties to even); an infinity or NaN makes its row's
//! outputs NaN.
//!
//! ## Order of operations, and why every path gives the same bits
//!
//! Every output is `sum = fma(f32(dot_b), w_scale_b · x_scale_b, sum)` for
//! blocks `b = 0, 1, …` in order, starting from 0. The integer part is
//! exact and the float part runs lane by lane, so the AVX-512 VNNI,
//! AVX-VNNI, AVX2 and portable paths all give the same bits, and a row's
//! result depends neither on the other rows, nor on the batch size, nor on
//! the number of threads. The work is split over the rayon pool by column
//! ranges (every task computes all rows of its columns), so one row still
//! uses both cores.

// The micro-kernels index several register arrays by the same row and
// tile; indices say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Inputs sharing one scale, for weights and activations alike.
pub const Q8_BLOCK: usize = 32;

/// Output columns per tile (16 i32 lanes of a 512-bit register).
const TILE: usize = 16;

/// Consecutive inputs per i32 lane (`vpdpbusd` sums 4 byte products).
const GROUP: usize = 4;

/// Bytes of one tile's block of weights.
const TILE_BLOCK: usize = Q8_BLOCK * TILE;

/// Tiles (of 16 columns) handed to one rayon task.
const CHUNK_TILES: usize = 4;

/// Rows quantised on the calling thread; more are split over the pool.
const SERIAL_ROWS: usize = 4;

/// Quantised weights in the kernels' layout: `k` inputs by `n` outputs.
#[derive(Debug)]
struct Q8Weights {
    k: usize,
    n: usize,
    /// `k` in blocks of 32, rounded up.
    blocks: usize,
    /// `n` in tiles of 16, rounded up.
    tiles: usize,
    /// `tiles × blocks × 512` bytes, each `q + 128` (see the module docs).
    q: Vec<u8>,
    /// `tiles × blocks × 16` scales (0 for padded columns).
    scales: Vec<f32>,
}

impl Q8Weights {
    /// Quantises the `k × n` matrix whose value at input `i`, output `c` is
    /// `at(i, c)`.
    fn quantize(k: usize, n: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let blocks = k.div_ceil(Q8_BLOCK);
        let tiles = n.div_ceil(TILE);
        // 128 is the stored form of a zero weight: padding needs no more.
        let mut q = vec![128u8; tiles * blocks * TILE_BLOCK];
        let mut scales = vec![0f32; tiles * blocks * TILE];
        if q.is_empty() {
            return Self { k, n, blocks, tiles, q, scales };
        }
        q.par_chunks_mut(blocks * TILE_BLOCK)
            .zip(scales.par_chunks_mut(blocks * TILE))
            .enumerate()
            .for_each(|(t, (q, scales))| {
                for j in 0..TILE.min(n - t * TILE) {
                    let c = t * TILE + j;
                    for b in 0..blocks {
                        let k0 = b * Q8_BLOCK;
                        let mut values = [0f32; Q8_BLOCK];
                        for (i, v) in values.iter_mut().enumerate().take(k - k0) {
                            *v = at(k0 + i, c);
                        }
                        let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                        scales[b * TILE + j] = scale;
                        for (i, v) in values.iter().enumerate() {
                            let qv = (v / scale).round().clamp(-127.0, 127.0) as i32;
                            q[b * TILE_BLOCK + (i / GROUP) * (TILE * GROUP) + j * GROUP + i % GROUP] = (qv + 128) as u8;
                        }
                    }
                }
            });
        Self { k, n, blocks, tiles, q, scales }
    }

    fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }
}

/// A tied head `[n, k]` in 8 bits (one scale per 32 values of a vocabulary
/// row), for `x @ wᵀ` ([`rows_times_q8_t`]). A quarter of the bytes of f32,
/// so a bandwidth-bound decode step reads a quarter as much.
#[derive(Debug)]
pub struct Q8Matrix {
    weights: Q8Weights,
}

impl Q8Matrix {
    /// Quantises a row-major `[rows, cols]` f32 tensor (any width; a width
    /// that is not a multiple of 32 is padded with zeros).
    pub fn quantize(w: &Tensor) -> candle_core::Result<Self> {
        let (rows, cols) = w.dims2()?;
        let values: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Self { weights: Q8Weights::quantize(cols, rows, |i, c| values[c * cols + i]) })
    }

    /// `(rows, cols)` of the quantised tensor.
    pub fn dims(&self) -> (usize, usize) {
        (self.weights.n, self.weights.k)
    }

    pub fn bytes(&self) -> usize {
        self.weights.bytes()
    }
}

/// A projection `[k, n]` (GPT-2's Conv1D layout) in 8 bits, one scale per
/// 32 inputs of each output column, for `x @ w` ([`rows_times_packed_q8`]).
#[derive(Debug)]
pub struct PackedQ8 {
    weights: Q8Weights,
}

impl PackedQ8 {
    /// Quantises a row-major `[k, n]` f32 tensor (any shape; see the module
    /// docs for the padding).
    pub fn quantize(w: &Tensor) -> candle_core::Result<Self> {
        let (k, n) = w.dims2()?;
        let src: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Self { weights: Q8Weights::quantize(k, n, |i, c| src[i * n + c]) })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.weights.k, self.weights.n)
    }

    pub fn bytes(&self) -> usize {
        self.weights.bytes()
    }
}

/// `x @ w` for `x: [rows, k]` (any number of rows) and an 8-bit `w: [k, n]`.
pub fn rows_times_packed_q8(x: &Tensor, w: &PackedQ8) -> candle_core::Result<Tensor> {
    apply("rows_times_packed_q8", x, &w.weights, None)
}

/// `x @ w + bias` (bias `[n]`, f32), the bias added by each task to the
/// columns it has just written: the same bits as adding it afterwards, one
/// pass over the output fewer, and off the engine thread.
pub fn rows_times_packed_q8_plus(x: &Tensor, w: &PackedQ8, bias: &Tensor) -> candle_core::Result<Tensor> {
    apply("rows_times_packed_q8_plus", x, &w.weights, Some(bias))
}

/// `x @ wᵀ` for `x: [rows, k]` and an 8-bit `w: [n, k]` (the tied head).
pub fn rows_times_q8_t(x: &Tensor, w: &Q8Matrix) -> candle_core::Result<Tensor> {
    apply("rows_times_q8_t", x, &w.weights, None)
}

/// `x: [rows, k]` times weights of `k` inputs and `n` outputs, plus an
/// optional bias `[n]`; `name` says who asked in a shape error.
fn apply(name: &str, x: &Tensor, w: &Q8Weights, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (rows, k) = x.dims2()?;
    if w.k != k {
        candle_core::bail!("{name}: x is [{rows}, {k}] but the weights take {} inputs ({} outputs)", w.k, w.n)
    }
    if let Some(bias) = bias.filter(|b| b.dims() != [w.n]) {
        candle_core::bail!("{name}: a bias of shape {:?} for {} outputs", bias.dims(), w.n)
    }
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let out = match bias {
        None => product(&xs, rows, w, Path::best(), None),
        Some(bias) => super::with_f32(&bias.to_dtype(DType::F32)?, |b| product(&xs, rows, w, Path::best(), Some(b)))?,
    };
    Tensor::from_vec(out, (rows, w.n), x.device())
}

// ---- activations -----------------------------------------------------------

/// Activation rows quantised per block of 32: `x ≈ q · scale`.
struct QuantRows {
    rows: usize,
    blocks: usize,
    /// `rows × blocks × 32`, zero-padded past `k`.
    q: Vec<i8>,
    /// `rows × blocks` (0 for an all-zero block).
    scales: Vec<f32>,
    /// `rows × blocks`: `−128 · Σ q` over the block, where its integer sum
    /// starts (the offset of the stored weights, see the module docs).
    offsets: Vec<i32>,
}

fn quantize_rows(xs: &[f32], rows: usize, k: usize) -> QuantRows {
    let blocks = k.div_ceil(Q8_BLOCK);
    let stride = blocks * Q8_BLOCK;
    let mut q = vec![0i8; rows * stride];
    let mut scales = vec![0f32; rows * blocks];
    let mut offsets = vec![0i32; rows * blocks];
    type Row<'a> = (usize, ((&'a mut [i8], &'a mut [f32]), &'a mut [i32]));
    let one_row = |(r, ((q, scales), offsets)): Row| quantize_row_dispatch(&xs[r * k..(r + 1) * k], q, scales, offsets);
    if rows <= SERIAL_ROWS || k == 0 {
        q.chunks_mut(stride.max(1))
            .zip(scales.chunks_mut(blocks.max(1)))
            .zip(offsets.chunks_mut(blocks.max(1)))
            .enumerate()
            .for_each(one_row);
    } else {
        q.par_chunks_mut(stride)
            .zip(scales.par_chunks_mut(blocks))
            .zip(offsets.par_chunks_mut(blocks))
            .enumerate()
            .for_each(one_row);
    }
    QuantRows { rows, blocks, q, scales, offsets }
}

fn quantize_row_dispatch(x: &[f32], q: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { quantize_row_avx2(x, q, scales, offsets) };
        }
    }
    quantize_row(x, q, scales, offsets)
}

/// [`quantize_row`] with AVX2 intrinsics for the whole blocks (the
/// compiler vectorises the portable loop only in part), the same bits: the
/// largest magnitude of finite values does not depend on the order, and
/// `vcvtps2dq` rounds ties to even under the default rounding mode.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
    use std::arch::x86_64::*;
    let whole = x.len() / Q8_BLOCK;
    for b in 0..whole {
        let at = x.as_ptr().add(b * Q8_BLOCK);
        let v = [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8)), _mm256_loadu_ps(at.add(16)), _mm256_loadu_ps(at.add(24))];
        let sign = _mm256_set1_ps(-0.0);
        let a = v.map(|v| _mm256_andnot_ps(sign, v));
        let limit = _mm256_set1_ps(f32::MAX);
        let finite = a.iter().fold(_mm256_castsi256_ps(_mm256_set1_epi32(-1)), |ok, &a| _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_LE_OQ>(a, limit)));
        let block = &mut q[b * Q8_BLOCK..(b + 1) * Q8_BLOCK];
        if _mm256_movemask_ps(finite) != 0xff {
            block.fill(0);
            scales[b] = f32::NAN;
            offsets[b] = 0;
            continue;
        }
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let max = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        let (scale, inverse) = if max > 0.0 { (max / 127.0, 127.0 / max) } else { (0.0, 0.0) };
        let inverse = _mm256_set1_ps(inverse);
        let qi = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inverse)));
        let total = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
        let total = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256::<1>(total));
        let total = _mm_add_epi32(total, _mm_unpackhi_epi64(total, total));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(total, _mm_shuffle_epi32::<1>(total)));
        // Packing works within 128-bit halves; the permutation puts the
        // 4-byte groups back in order.
        let packed = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
        let packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(block.as_mut_ptr().cast(), packed);
        scales[b] = scale;
        offsets[b] = -128 * sum;
    }
    if whole * Q8_BLOCK < x.len() {
        quantize_row(&x[whole * Q8_BLOCK..], &mut q[whole * Q8_BLOCK..], &mut scales[whole..], &mut offsets[whole..]);
    }
}

/// One row: per block, `scale = max|x| / 127`, `q = round(x · 127 / max|x|)`
/// (ties to even). Plain IEEE operations in a fixed order, so the bits do not
/// depend on which wrapper compiled it. A block holding an infinity or a NaN
/// gets a NaN scale (and zero values), so the outputs it touches are NaN, as
/// they would be in f32.
#[inline(always)]
fn quantize_row(x: &[f32], q: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
    for (b, chunk) in x.chunks(Q8_BLOCK).enumerate() {
        // A fixed-length copy (zero-padded): constant trip counts vectorise.
        let mut values = [0f32; Q8_BLOCK];
        values[..chunk.len()].copy_from_slice(chunk);
        // The largest magnitude, in 8 lanes then across them (a maximum is
        // the same in any order once non-finite values are set aside).
        let (mut lanes, mut finite) = ([0f32; 8], true);
        for (i, v) in values.iter().enumerate() {
            let a = v.abs();
            lanes[i % 8] = if a > lanes[i % 8] { a } else { lanes[i % 8] };
            finite &= a <= f32::MAX;
        }
        let max = lanes.iter().fold(0f32, |m, &a| if a > m { a } else { m });
        let block = &mut q[b * Q8_BLOCK..(b + 1) * Q8_BLOCK];
        if !finite {
            block.fill(0);
            scales[b] = f32::NAN;
            offsets[b] = 0;
            continue;
        }
        let (scale, inverse) = if max > 0.0 { (max / 127.0, 127.0 / max) } else { (0.0, 0.0) };
        // |v · inverse| ≤ 127 (+ rounding), so the conversion never saturates.
        let mut quantised = [0i32; Q8_BLOCK];
        for (o, v) in quantised.iter_mut().zip(values) {
            *o = (v * inverse).round_ties_even() as i32;
        }
        let mut sum = 0i32;
        for (o, v) in block.iter_mut().zip(quantised) {
            *o = v as i8;
            sum += v;
        }
        scales[b] = scale;
        offsets[b] = -128 * sum;
    }
}

// ---- the product -----------------------------------------------------------

/// Which kernel runs: the best the CPU has, chosen at run time. All give the
/// same bits (see the module docs); tests run each one the CPU supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// AVX-512 VNNI: `vpdpbusd` on 512-bit registers, 4 rows × 2 tiles.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// AVX-VNNI: the same instruction on 256-bit registers, 3 rows × 1 tile
    /// (16 registers).
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    /// AVX2 without VNNI: `vpmaddubsw` + `vpmaddwd`, with the signs moved
    /// onto the weights (`vpsignb`), 2 rows × 1 tile.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Path {
    fn best() -> Self {
        Self::available()[0]
    }

    /// Every path this CPU can run, best first.
    fn available() -> Vec<Self> {
        let mut paths = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            if avx2 && std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vnni") {
                paths.push(Self::Avx512Vnni);
            }
            if avx2 && std::is_x86_feature_detected!("avxvnni") {
                paths.push(Self::AvxVnni);
            }
            if avx2 {
                paths.push(Self::Avx2);
            }
        }
        paths.push(Self::Portable);
        paths
    }
}

/// `[rows, n]` = the `rows` rows of `xs` (`[rows, k]`) times `w`.
fn product(xs: &[f32], rows: usize, w: &Q8Weights, path: Path, bias: Option<&[f32]>) -> Vec<f32> {
    let act = quantize_rows(xs, rows, w.k);
    let mut out = vec![0f32; rows * w.n];
    let dst = Dst { ptr: out.as_mut_ptr(), rows, n: w.n };
    (0..w.tiles.div_ceil(CHUNK_TILES)).into_par_iter().for_each(|chunk| {
        let t0 = chunk * CHUNK_TILES;
        let t1 = (t0 + CHUNK_TILES).min(w.tiles);
        // SAFETY: each task writes only the columns of its own tiles, and
        // the chosen path's CPU features were detected by `Path::available`.
        unsafe { run_tiles(path, &act, w, t0, t1, dst) }
        if let Some(bias) = bias {
            let (c0, c1) = (t0 * TILE, (t1 * TILE).min(w.n));
            for r in 0..rows {
                // SAFETY: columns c0..c1 of every row are this task's own
                // (as in `run_tiles`), inside the `rows × n` buffer.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.ptr.add(r * w.n + c0), c1 - c0) };
                for (o, b) in row.iter_mut().zip(&bias[c0..c1]) {
                    *o += b;
                }
            }
        }
    });
    out
}

/// # Safety
/// `path` must be one of [`Path::available`]; no other task may write the
/// columns of tiles `t0..t1` of `dst` meanwhile.
unsafe fn run_tiles(path: Path, act: &QuantRows, w: &Q8Weights, t0: usize, t1: usize, dst: Dst) {
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => tiles_avx512vnni(act, w, t0, t1, dst),
        #[cfg(target_arch = "x86_64")]
        Path::AvxVnni => tiles_avxvnni(act, w, t0, t1, dst),
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => tiles_avx2(act, w, t0, t1, dst),
        Path::Portable => drive::<Portable, 4, 1>(act, w, t0, t1, dst),
    }
}

// Each path has its own `#[target_feature]` wrapper around the inlined
// driver and micro-kernel (see `band_axpy` in kernels.rs for why).

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
unsafe fn tiles_avx512vnni(act: &QuantRows, w: &Q8Weights, t0: usize, t1: usize, dst: Dst) {
    drive::<Avx512Vnni, 4, 2>(act, w, t0, t1, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn tiles_avxvnni(act: &QuantRows, w: &Q8Weights, t0: usize, t1: usize, dst: Dst) {
    drive::<AvxVnni, 3, 1>(act, w, t0, t1, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tiles_avx2(act: &QuantRows, w: &Q8Weights, t0: usize, t1: usize, dst: Dst) {
    drive::<Avx2, 2, 1>(act, w, t0, t1, dst)
}

/// The output matrix `[rows, n]`, shared by the tasks of one product, each
/// of which writes its own columns.
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    rows: usize,
    n: usize,
}

// SAFETY: tasks write disjoint columns (see `product`), and the buffer
// outlives them (rayon's `for_each` returns after every task).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// Writes one tile's results for row `r`: columns `c0..c0 + 16`, those
    /// past `n` (padding) left out.
    ///
    /// # Safety
    /// No other thread writes these columns meanwhile.
    #[inline(always)]
    unsafe fn store(self, r: usize, c0: usize, values: &[f32; TILE]) {
        assert!(r < self.rows && c0 < self.n);
        let len = TILE.min(self.n - c0);
        std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.add(r * self.n + c0), len)
    }
}

/// A register tile: `G` rows × `T` tiles over every block of `w`.
trait Micro {
    /// Writes `out[g][t]` = rows `r0 + g` times tile `t0 + t`.
    ///
    /// # Safety
    /// The CPU has the implementation's features; `r0 + G <= act.rows`,
    /// `t0 + T <= w.tiles`, and `act` was quantised for `w.k`.
    unsafe fn run<const G: usize, const T: usize>(act: &QuantRows, r0: usize, w: &Q8Weights, t0: usize, out: &mut [[[f32; TILE]; T]; G]);
}

/// Rows in groups of up to `MAX_G`, tiles in groups of `T` (the last one by
/// one), every group through `M`.
///
/// # Safety
/// As [`run_tiles`], for `M`'s features.
#[inline(always)]
unsafe fn drive<M: Micro, const MAX_G: usize, const T: usize>(act: &QuantRows, w: &Q8Weights, t0: usize, t1: usize, dst: Dst) {
    let mut r = 0;
    while r < act.rows {
        let g = (act.rows - r).min(MAX_G);
        match g {
            4 => row_group::<M, 4, T>(act, r, w, t0, t1, dst),
            3 => row_group::<M, 3, T>(act, r, w, t0, t1, dst),
            2 => row_group::<M, 2, T>(act, r, w, t0, t1, dst),
            _ => row_group::<M, 1, T>(act, r, w, t0, t1, dst),
        }
        r += g;
    }
}

#[inline(always)]
unsafe fn row_group<M: Micro, const G: usize, const T: usize>(act: &QuantRows, r0: usize, w: &Q8Weights, t0: usize, t1: usize, dst: Dst) {
    let mut t = t0;
    while t + T <= t1 {
        let mut out = [[[0f32; TILE]; T]; G];
        M::run::<G, T>(act, r0, w, t, &mut out);
        for (g, row) in out.iter().enumerate() {
            for (i, tile) in row.iter().enumerate() {
                dst.store(r0 + g, (t + i) * TILE, tile);
            }
        }
        t += T;
    }
    while t < t1 {
        let mut out = [[[0f32; TILE]; 1]; G];
        M::run::<G, 1>(act, r0, w, t, &mut out);
        for (g, row) in out.iter().enumerate() {
            dst.store(r0 + g, t * TILE, &row[0]);
        }
        t += 1;
    }
}

/// Plain Rust, the reference the vector paths must match bit for bit.
struct Portable;

impl Micro for Portable {
    #[inline(always)]
    unsafe fn run<const G: usize, const T: usize>(act: &QuantRows, r0: usize, w: &Q8Weights, t0: usize, out: &mut [[[f32; TILE]; T]; G]) {
        let blocks = w.blocks;
        let stride = blocks * Q8_BLOCK;
        let mut sum = [[[0f32; TILE]; T]; G];
        for b in 0..blocks {
            let mut acc = [[[0i32; TILE]; T]; G];
            for (g, acc) in acc.iter_mut().enumerate() {
                *acc = [[act.offsets[(r0 + g) * blocks + b]; TILE]; T];
            }
            for group in 0..Q8_BLOCK / GROUP {
                for t in 0..T {
                    let at = ((t0 + t) * blocks + b) * TILE_BLOCK + group * TILE * GROUP;
                    let wq = &w.q[at..at + TILE * GROUP];
                    for g in 0..G {
                        let at = (r0 + g) * stride + b * Q8_BLOCK + group * GROUP;
                        let x = &act.q[at..at + GROUP];
                        for j in 0..TILE {
                            let mut s = acc[g][t][j];
                            for i in 0..GROUP {
                                s += i32::from(wq[j * GROUP + i]) * i32::from(x[i]);
                            }
                            acc[g][t][j] = s;
                        }
                    }
                }
            }
            for t in 0..T {
                let at = ((t0 + t) * blocks + b) * TILE;
                let wscale = &w.scales[at..at + TILE];
                for g in 0..G {
                    let xscale = act.scales[(r0 + g) * blocks + b];
                    for j in 0..TILE {
                        sum[g][t][j] = (acc[g][t][j] as f32).mul_add(wscale[j] * xscale, sum[g][t][j]);
                    }
                }
            }
        }
        *out = sum;
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx512Vnni;

#[cfg(target_arch = "x86_64")]
impl Micro for Avx512Vnni {
    #[inline(always)]
    unsafe fn run<const G: usize, const T: usize>(act: &QuantRows, r0: usize, w: &Q8Weights, t0: usize, out: &mut [[[f32; TILE]; T]; G]) {
        use std::arch::x86_64::*;
        let blocks = w.blocks;
        let stride = blocks * Q8_BLOCK;
        assert!(r0 + G <= act.rows && t0 + T <= w.tiles && act.blocks == blocks);
        let wq = w.q.as_ptr().add(t0 * blocks * TILE_BLOCK);
        let ws = w.scales.as_ptr().add(t0 * blocks * TILE);
        let xq = act.q.as_ptr().add(r0 * stride);
        let xs = act.scales.as_ptr().add(r0 * blocks);
        let xo = act.offsets.as_ptr().add(r0 * blocks);
        let mut sum = [[_mm512_setzero_ps(); T]; G];
        for b in 0..blocks {
            let mut acc = [[_mm512_setzero_si512(); T]; G];
            for (g, acc) in acc.iter_mut().enumerate() {
                *acc = [_mm512_set1_epi32(*xo.add(g * blocks + b)); T];
            }
            for group in 0..Q8_BLOCK / GROUP {
                let mut wv = [_mm512_setzero_si512(); T];
                for (t, wv) in wv.iter_mut().enumerate() {
                    *wv = _mm512_loadu_si512(wq.add((t * blocks + b) * TILE_BLOCK + group * TILE * GROUP).cast());
                }
                for (g, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_epi32(xq.add(g * stride + b * Q8_BLOCK + group * GROUP).cast::<i32>().read_unaligned());
                    for t in 0..T {
                        acc[t] = _mm512_dpbusd_epi32(acc[t], wv[t], x);
                    }
                }
            }
            for t in 0..T {
                let wscale = _mm512_loadu_ps(ws.add((t * blocks + b) * TILE));
                for g in 0..G {
                    let scale = _mm512_mul_ps(wscale, _mm512_set1_ps(*xs.add(g * blocks + b)));
                    sum[g][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[g][t]), scale, sum[g][t]);
                }
            }
        }
        for g in 0..G {
            for t in 0..T {
                _mm512_storeu_ps(out[g][t].as_mut_ptr(), sum[g][t]);
            }
        }
    }
}

/// 256-bit registers: each 16-column tile is two halves of 8 lanes.
#[cfg(target_arch = "x86_64")]
struct AvxVnni;

#[cfg(target_arch = "x86_64")]
impl Micro for AvxVnni {
    #[inline(always)]
    unsafe fn run<const G: usize, const T: usize>(act: &QuantRows, r0: usize, w: &Q8Weights, t0: usize, out: &mut [[[f32; TILE]; T]; G]) {
        use std::arch::x86_64::*;
        let blocks = w.blocks;
        let stride = blocks * Q8_BLOCK;
        assert!(r0 + G <= act.rows && t0 + T <= w.tiles && act.blocks == blocks);
        let wq = w.q.as_ptr().add(t0 * blocks * TILE_BLOCK);
        let ws = w.scales.as_ptr().add(t0 * blocks * TILE);
        let xq = act.q.as_ptr().add(r0 * stride);
        let xs = act.scales.as_ptr().add(r0 * blocks);
        let xo = act.offsets.as_ptr().add(r0 * blocks);
        let mut sum = [[[_mm256_setzero_ps(); 2]; T]; G];
        for b in 0..blocks {
            let mut acc = [[[_mm256_setzero_si256(); 2]; T]; G];
            for (g, acc) in acc.iter_mut().enumerate() {
                *acc = [[_mm256_set1_epi32(*xo.add(g * blocks + b)); 2]; T];
            }
            for group in 0..Q8_BLOCK / GROUP {
                let mut wv = [[_mm256_setzero_si256(); 2]; T];
                for (t, wv) in wv.iter_mut().enumerate() {
                    let at = wq.add((t * blocks + b) * TILE_BLOCK + group * TILE * GROUP);
                    *wv = [_mm256_loadu_si256(at.cast()), _mm256_loadu_si256(at.add(TILE * GROUP / 2).cast())];
                }
                for (g, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_epi32(xq.add(g * stride + b * Q8_BLOCK + group * GROUP).cast::<i32>().read_unaligned());
                    for t in 0..T {
                        for h in 0..2 {
                            acc[t][h] = _mm256_dpbusd_avx_epi32(acc[t][h], wv[t][h], x);
                        }
                    }
                }
            }
            for t in 0..T {
                for h in 0..2 {
                    let wscale = _mm256_loadu_ps(ws.add((t * blocks + b) * TILE + h * TILE / 2));
                    for g in 0..G {
                        let scale = _mm256_mul_ps(wscale, _mm256_set1_ps(*xs.add(g * blocks + b)));
                        sum[g][t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[g][t][h]), scale, sum[g][t][h]);
                    }
                }
            }
        }
        for g in 0..G {
            for t in 0..T {
                for h in 0..2 {
                    _mm256_storeu_ps(out[g][t].as_mut_ptr().add(h * TILE / 2), sum[g][t][h]);
                }
            }
        }
    }
}

/// AVX2 without VNNI. `vpmaddubsw` (unsigned × signed bytes, pairs summed
/// into i16) would saturate on offset weights (2 · 255 · 127 > 32767), so
/// this path takes llama.cpp's other route: the weights back to signed
/// (`u ^ 0x80 = q`), the activation's sign moved onto them (`vpsignb`), its
/// magnitude as the unsigned operand. Pairs then stay within
/// 2 · 127 · 127, and `vpmaddwd` by ones widens them to i32. The sum is
/// `Σ q·x` directly (no offset), the same integers as the other paths.
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Micro for Avx2 {
    #[inline(always)]
    unsafe fn run<const G: usize, const T: usize>(act: &QuantRows, r0: usize, w: &Q8Weights, t0: usize, out: &mut [[[f32; TILE]; T]; G]) {
        use std::arch::x86_64::*;
        let blocks = w.blocks;
        let stride = blocks * Q8_BLOCK;
        assert!(r0 + G <= act.rows && t0 + T <= w.tiles && act.blocks == blocks);
        let wq = w.q.as_ptr().add(t0 * blocks * TILE_BLOCK);
        let ws = w.scales.as_ptr().add(t0 * blocks * TILE);
        let xq = act.q.as_ptr().add(r0 * stride);
        let xs = act.scales.as_ptr().add(r0 * blocks);
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        let mut sum = [[[_mm256_setzero_ps(); 2]; T]; G];
        for b in 0..blocks {
            let mut acc = [[[_mm256_setzero_si256(); 2]; T]; G];
            for group in 0..Q8_BLOCK / GROUP {
                let mut wv = [[_mm256_setzero_si256(); 2]; T];
                for (t, wv) in wv.iter_mut().enumerate() {
                    let at = wq.add((t * blocks + b) * TILE_BLOCK + group * TILE * GROUP);
                    *wv = [
                        _mm256_xor_si256(_mm256_loadu_si256(at.cast()), flip),
                        _mm256_xor_si256(_mm256_loadu_si256(at.add(TILE * GROUP / 2).cast()), flip),
                    ];
                }
                for (g, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_epi32(xq.add(g * stride + b * Q8_BLOCK + group * GROUP).cast::<i32>().read_unaligned());
                    let magnitude = _mm256_abs_epi8(x);
                    for t in 0..T {
                        for h in 0..2 {
                            let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(wv[t][h], x));
                            acc[t][h] = _mm256_add_epi32(acc[t][h], _mm256_madd_epi16(pairs, ones));
                        }
                    }
                }
            }
            for t in 0..T {
                for h in 0..2 {
                    let wscale = _mm256_loadu_ps(ws.add((t * blocks + b) * TILE + h * TILE / 2));
                    for g in 0..G {
                        let scale = _mm256_mul_ps(wscale, _mm256_set1_ps(*xs.add(g * blocks + b)));
                        sum[g][t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[g][t][h]), scale, sum[g][t][h]);
                    }
                }
            }
        }
        for g in 0..G {
            for t in 0..T {
                for h in 0..2 {
                    _mm256_storeu_ps(out[g][t].as_mut_ptr().add(h * TILE / 2), sum[g][t][h]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    #[test]
    fn the_fused_bias_gives_the_same_bits_as_adding_it_after() {
        let dev = Device::Cpu;
        // 40 columns: two whole tiles and a padded one, several tasks' worth.
        for (rows, k, n) in [(1, 64, 40), (5, 96, 48), (33, 64, 2304)] {
            let w = Tensor::randn(0f32, 0.05, (k, n), &dev).unwrap();
            let q = PackedQ8::quantize(&w).unwrap();
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let want = rows_times_packed_q8(&x, &q).unwrap().broadcast_add(&bias).unwrap().to_vec2::<f32>().unwrap();
            let got = rows_times_packed_q8_plus(&x, &q, &bias).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(got, want, "{rows}×{k}×{n}");
        }
        let bad = rows_times_packed_q8_plus(
            &Tensor::zeros((1, 64), DType::F32, &dev).unwrap(),
            &PackedQ8::quantize(&Tensor::zeros((64, 32), DType::F32, &dev).unwrap()).unwrap(),
            &Tensor::zeros(31, DType::F32, &dev).unwrap(),
        );
        assert!(bad.is_err());
    }

    #[test]
    fn projections_are_close_to_f32_and_batch_invariant() {
        let dev = Device::Cpu;
        // 300 inputs and 70 outputs: padding in both dimensions, and an odd
        // number of tiles.
        for (k, n) in [(300, 96), (96, 70), (768, 2304)] {
            let x = Tensor::randn(0f32, 1.0, (9, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.1, (k, n), &dev).unwrap();
            let q = PackedQ8::quantize(&w).unwrap();
            let reference = x.matmul(&w).unwrap();
            let all = rows_times_packed_q8(&x, &q).unwrap();
            let scale = max_abs(&reference);
            assert!(close(&all, &reference) < 0.02 * scale, "{k}×{n}: {} vs {scale}", close(&all, &reference));
            // Every batch size groups the rows differently (4 + 4 + 1, 3, …).
            for rows in 1..=8 {
                let some = rows_times_packed_q8(&x.narrow(0, 9 - rows, rows).unwrap(), &q).unwrap();
                assert_eq!(close(&some, &all.narrow(0, 9 - rows, rows).unwrap()), 0.0, "{k}×{n}, {rows} rows");
            }
        }
    }

    #[test]
    fn every_path_gives_the_same_bits() {
        let paths = Path::available();
        eprintln!("8-bit paths on this CPU: {paths:?}");
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for (rows, k, n) in [(1, 64, 16), (7, 300, 70), (33, 96, 200)] {
            let xs: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let wv: Vec<f32> = (0..k * n).map(|_| next() * 0.2).collect();
            let w = Q8Weights::quantize(k, n, |i, c| wv[i * n + c]);
            let reference = product(&xs, rows, &w, Path::Portable, None);
            for &path in &paths {
                assert_eq!(product(&xs, rows, &w, path, None), reference, "{path:?}, {rows}×{k}×{n}");
            }
        }
    }

    // The two checks below are the 8-bit tests kernels.rs had before the
    // integer kernels, at the same thresholds.

    #[test]
    fn q8_head_is_close_to_f32() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (5, 96), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (96, 320), &dev).unwrap();
        let scale = x.matmul(&w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // A width that is not a multiple of 32 is padded (it used to be refused).
        assert_eq!(Q8Matrix::quantize(&Tensor::zeros((10, 50), DType::F32, &dev).unwrap()).unwrap().dims(), (10, 50));
        let wt = Tensor::randn(0f32, 0.1, (70, 96), &dev).unwrap();
        let qt = Q8Matrix::quantize(&wt).unwrap();
        let reference = x.matmul(&wt.t().unwrap()).unwrap();
        assert!(close(&rows_times_q8_t(&x, &qt).unwrap(), &reference) < 0.02 * scale);
    }

    #[test]
    fn packed_q8_is_close_to_f32_and_batch_invariant() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (6, 300), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (300, 96), &dev).unwrap();
        let q = PackedQ8::quantize(&w).unwrap();
        let reference = x.matmul(&w).unwrap();
        let got = rows_times_packed_q8(&x, &q).unwrap();
        let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(close(&got, &reference) < 0.02 * scale, "{} vs {scale}", close(&got, &reference));
        let one = rows_times_packed_q8(&x.narrow(0, 4, 1).unwrap(), &q).unwrap();
        assert_eq!(close(&got.narrow(0, 4, 1).unwrap(), &one), 0.0);
    }

    #[test]
    fn a_head_with_a_ragged_width_is_close_to_f32() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (5, 100), &dev).unwrap();
        let wt = Tensor::randn(0f32, 0.1, (70, 100), &dev).unwrap();
        let q = Q8Matrix::quantize(&wt).unwrap();
        assert_eq!(q.dims(), (70, 100));
        let reference = x.matmul(&wt.t().unwrap()).unwrap();
        let got = rows_times_q8_t(&x, &q).unwrap();
        assert!(close(&got, &reference) < 0.02 * max_abs(&reference));
    }

    #[test]
    fn zero_rows_and_zero_activations() {
        let dev = Device::Cpu;
        let w = PackedQ8::quantize(&Tensor::randn(0f32, 0.1, (64, 32), &dev).unwrap()).unwrap();
        let none = rows_times_packed_q8(&Tensor::zeros((0, 64), DType::F32, &dev).unwrap(), &w).unwrap();
        assert_eq!(none.dims(), &[0, 32]);
        let zeros = rows_times_packed_q8(&Tensor::zeros((2, 64), DType::F32, &dev).unwrap(), &w).unwrap();
        assert_eq!(max_abs(&zeros), 0.0);
    }

    #[test]
    fn a_non_finite_activation_gives_nan_in_its_row_only() {
        let dev = Device::Cpu;
        let w = PackedQ8::quantize(&Tensor::randn(0f32, 0.1, (64, 32), &dev).unwrap()).unwrap();
        for bad in [f32::NAN, f32::INFINITY] {
            let mut xs = vec![0.5f32; 3 * 64];
            xs[64 + 40] = bad;
            let out: Vec<Vec<f32>> = rows_times_packed_q8(&Tensor::from_vec(xs, (3, 64), &dev).unwrap(), &w).unwrap().to_vec2().unwrap();
            assert!(out[1].iter().all(|v| v.is_nan()), "{bad}");
            assert!(out[0].iter().chain(&out[2]).all(|v| v.is_finite()), "{bad}");
        }
    }

    #[test]
    fn the_activation_quantisers_agree() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            for k in [32usize, 100, 768] {
                let mut x: Vec<f32> = (0..k)
                    .map(|_| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        f32::from_bits((rng >> 32) as u32 & 0x3fff_ffff | (rng as u32 & 0x8000_0000)) * 1e-3
                    })
                    .collect();
                x[5] = 0.0;
                x[7] = 127.5 / 127.0 * x[9];
                if k > 64 {
                    x[40..72].fill(0.0);
                    x[80] = f32::NAN;
                }
                let blocks = k.div_ceil(Q8_BLOCK);
                type Quantiser<'a> = &'a dyn Fn(&mut [i8], &mut [f32], &mut [i32]);
                let run = |f: Quantiser| {
                    let (mut q, mut s, mut o) = (vec![0i8; blocks * Q8_BLOCK], vec![0f32; blocks], vec![0i32; blocks]);
                    f(&mut q, &mut s, &mut o);
                    (q, s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), o)
                };
                // SAFETY: AVX2 and FMA detected above.
                let vector = run(&|q, s, o| unsafe { quantize_row_avx2(&x, q, s, o) });
                assert_eq!(vector, run(&|q, s, o| quantize_row(&x, q, s, o)), "k = {k}");
            }
        }
    }
}
