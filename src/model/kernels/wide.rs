//! f32 products on AVX-512 registers, for every row count and built for
//! many rows: a batched decode step at 8–32 sequences and prompt prefill.
//!
//! The few-rows kernels in `kernels.rs` split a product over the rayon pool
//! by bands of [`K_BLOCK`](super::K_BLOCK) weight rows: each band writes a
//! whole `[rows, n]` partial sum, and the partials are then added on the
//! calling thread. At one row that streams the weights well; at 32 rows the
//! partials are megabytes written, read back and added on one thread, and
//! the 4 × 16 register tile (AVX2) feeds two multiply-adds per broadcast.
//! Here the work is split by *columns* instead: each task owns 64 output
//! columns for every row, keeps a `6 × 64` register tile (24 ZMM
//! accumulators, four weight loads and six broadcasts per 24 fused
//! multiply-adds), and adds each band's sum into its own columns of the
//! output while they are still in cache. Nothing is reduced on the calling
//! thread.
//!
//! ## Same bits as the few-rows kernels
//!
//! A projection's output element is, exactly as in `packed_band`,
//! `p_b = fma(x[k0+127], w[k0+127], … fma(x[k0], w[k0], 0))` for each band
//! `b` of 128 weight rows, then `p_0 + p_1 + … ` added in band order. A
//! fused multiply-add rounds once whatever the register width, so the
//! result is bit for bit that of the AVX2 and portable kernels, for any
//! number of rows, any register grouping and any split over threads: a
//! row's result never depends on its batch (tested).
//!
//! The head's dot products keep `dots`' order: 32 lanes, lane `l`
//! accumulating `x[32c + l] · w[32c + l]` over `c` by fused multiply-adds,
//! then the fixed halving reduction (`l += l + 16`, `+ 8`, `+ 4`, `+ 2`,
//! `+ 1`), then the tail beyond the last 32. The 32 lanes are two ZMM
//! registers and each halving is one vector add after a lane permute.
//!
//! On a CPU without AVX-512F these functions answer `None` and the caller
//! takes the few-rows kernels, which give the same bits. So does setting
//! `DIALOGD_F32_KERNELS=avx2` in the environment (read once), to compare the
//! two on one machine (`dialogd bench`, `examples/kernel_bench.rs`).

// The micro-kernels index several register arrays by the same row and
// tile; indices say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::{PackedMatrix, K_BLOCK, LANES, TILE};

/// The environment variable that, set to `avx2`, keeps the few-rows
/// kernels on an AVX-512 CPU (to compare the two on one machine).
pub const F32_KERNELS_ENV: &str = "DIALOGD_F32_KERNELS";

/// Whether the kernels here run: this CPU has AVX-512F and
/// [`F32_KERNELS_ENV`] is not `avx2`.
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let detected = std::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let detected = false;
        detected && std::env::var(F32_KERNELS_ENV).map_or(true, |v| v != "avx2")
    })
}

/// Rows from which the projections take these kernels: below it the
/// few-rows kernels' split by bands streams the weights better
/// (`examples/kernel_bench.rs`, AMD EPYC Zen 4: even at 2 rows, 10% faster
/// here at 4, 1.5× at 32).
pub const PROJECTION_FROM_ROWS: usize = 4;
/// Rows from which the head takes these kernels (few-rows kernels ahead up
/// to 4 rows, these 1.4× ahead at 8 and 2.1× at 32, same machine).
pub const HEAD_FROM_ROWS: usize = 8;

/// Column tiles (of 16) per task: 64 columns, four ZMM registers a row.
const TASK_TILES: usize = 4;
/// Rows per register tile with four column tiles (24 accumulators).
const MAX_ROWS: usize = 6;
/// Vocabulary rows per task in [`rows_times_matrix_t`].
const VOCAB_PER_TASK: usize = 192;

/// The output `[rows, n]`, written by tasks that each own a set of columns.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    n: usize,
}

// SAFETY: tasks write disjoint columns, and the buffer outlives them
// (rayon's `for_each` returns after every task).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `xs @ w (+ bias)` for `xs: [rows, k]` row-major and a packed `[k, n]`
/// weight; `[rows, n]` row-major. `bias` (`[n]`) is added after the last
/// band, the same single rounding as adding it afterwards. `None` without
/// AVX-512F.
pub fn packed_product(xs: &[f32], rows: usize, w: &PackedMatrix, bias: Option<&[f32]>) -> Option<Vec<f32>> {
    let (k, n) = (w.k, w.n);
    assert_eq!(xs.len(), rows * k, "packed_product: {} values for [{rows}, {k}]", xs.len());
    assert!(bias.is_none_or(|b| b.len() == n), "packed_product: bias is not [{n}]");
    if !available() {
        return None;
    }
    Some(by_columns(rows, n, n / TILE, TASK_TILES, |t0, t1, dst| {
        // SAFETY: AVX-512F is present (checked above); the task writes only
        // columns t0·16..t1·16 (its own), inside the `rows × n` buffer.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            packed_columns_avx512(xs, rows, w, t0, t1, bias, dst)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{t0}{t1}{dst:p}", dst = dst.ptr)
    }))
}

/// A `[rows, n]` output whose columns are `units` units (tiles, or single
/// columns) split over the rayon pool, `per_task` units a task:
/// `task(first, end, out)` writes the columns of units `first..end`.
fn by_columns(rows: usize, n: usize, units: usize, per_task: usize, task: impl Fn(usize, usize, Out) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    if rows == 0 || units == 0 {
        return out;
    }
    let dst = Out { ptr: out.as_mut_ptr(), n };
    (0..units.div_ceil(per_task)).into_par_iter().for_each(|i| {
        let first = i * per_task;
        task(first, (first + per_task).min(units), dst)
    });
    out
}

/// `xs @ wᵀ` for `xs: [rows, k]` and `w: [n, k]` row-major (the tied head);
/// `[rows, n]` row-major. `None` without AVX-512F.
pub fn rows_times_matrix_t(xs: &[f32], rows: usize, k: usize, w: &[f32]) -> Option<Vec<f32>> {
    assert_eq!(xs.len(), rows * k, "rows_times_matrix_t: {} values for [{rows}, {k}]", xs.len());
    assert!(k > 0 && w.len().is_multiple_of(k), "rows_times_matrix_t: {} weights are not rows of {k}", w.len());
    if !available() {
        return None;
    }
    let n = w.len() / k;
    Some(by_columns(rows, n, n, VOCAB_PER_TASK, |v0, v1, dst| {
        // SAFETY: AVX-512F is present (checked above); the task writes only
        // columns v0..v1 (its own), inside the `rows × n` buffer.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            dots_avx512(xs, rows, k, w, v0, v1, dst)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{v0}{v1}{dst:p}", dst = dst.ptr)
    }))
}

// ---- projections ------------------------------------------------------------

/// Every row of columns `t0·16..t1·16`: band by band, each band's sums for
/// all row groups (so the band's weights are read from cache, not memory,
/// by every group after the first), added into the output in band order.
///
/// # Safety
/// AVX-512F; no other thread writes these columns of `dst` meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn packed_columns_avx512(xs: &[f32], rows: usize, w: &PackedMatrix, t0: usize, t1: usize, bias: Option<&[f32]>, dst: Out) {
    let k = w.k;
    let bands = k.div_ceil(K_BLOCK);
    for band in 0..bands {
        let k0 = band * K_BLOCK;
        let band_rows = (k0 + K_BLOCK).min(k) - k0;
        let step = Step { first: band == 0, bias: if band + 1 == bands { bias } else { None } };
        let mut r = 0;
        while r < rows {
            let g = (rows - r).min(MAX_ROWS);
            match g {
                6 => tile_columns::<6>(xs, k, w, k0, band_rows, r, t0, t1, step, dst),
                5 => tile_columns::<5>(xs, k, w, k0, band_rows, r, t0, t1, step, dst),
                4 => tile_columns::<4>(xs, k, w, k0, band_rows, r, t0, t1, step, dst),
                3 => tile_columns::<3>(xs, k, w, k0, band_rows, r, t0, t1, step, dst),
                2 => tile_columns::<2>(xs, k, w, k0, band_rows, r, t0, t1, step, dst),
                _ => tile_columns::<1>(xs, k, w, k0, band_rows, r, t0, t1, step, dst),
            }
            r += g;
        }
    }
}

/// What to do with a band's sums: store them (the first band) or add them
/// to what is there, then add the bias (the last band).
#[derive(Clone, Copy)]
struct Step<'a> {
    first: bool,
    bias: Option<&'a [f32]>,
}

/// Rows `r0..r0 + G` of tiles `t0..t1` over one band: four tiles at a time,
/// then one at a time.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_columns<const G: usize>(
    xs: &[f32],
    k: usize,
    w: &PackedMatrix,
    k0: usize,
    band_rows: usize,
    r0: usize,
    t0: usize,
    t1: usize,
    step: Step,
    dst: Out,
) {
    let mut t = t0;
    while t + TASK_TILES <= t1 {
        band_tile::<G, TASK_TILES>(xs, k, w, k0, band_rows, r0, t, step, dst);
        t += TASK_TILES;
    }
    while t < t1 {
        band_tile::<G, 1>(xs, k, w, k0, band_rows, r0, t, step, dst);
        t += 1;
    }
}

/// `G` rows × `T` tiles of one band in registers, then into the output.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn band_tile<const G: usize, const T: usize>(
    xs: &[f32],
    k: usize,
    w: &PackedMatrix,
    k0: usize,
    band_rows: usize,
    r0: usize,
    t0: usize,
    step: Step,
    dst: Out,
) {
    use std::arch::x86_64::*;
    let n = w.n;
    assert!((r0 + G) * k <= xs.len() && k0 + band_rows <= k && (t0 + T) * TILE <= n);
    // The band's tiles are consecutive strips of `band_rows × 16` values.
    let strip = band_rows * TILE;
    let wp = w.data.as_ptr().add(k0 * n + t0 * strip);
    let xp = xs.as_ptr().add(r0 * k + k0);
    let mut acc = [[_mm512_setzero_ps(); T]; G];
    for i in 0..band_rows {
        let mut wv = [_mm512_setzero_ps(); T];
        for t in 0..T {
            wv[t] = _mm512_loadu_ps(wp.add(t * strip + i * TILE));
        }
        for g in 0..G {
            let xb = _mm512_set1_ps(*xp.add(g * k + i));
            for t in 0..T {
                acc[g][t] = _mm512_fmadd_ps(xb, wv[t], acc[g][t]);
            }
        }
    }
    for g in 0..G {
        for t in 0..T {
            let c0 = (t0 + t) * TILE;
            let at = dst.ptr.add((r0 + g) * n + c0);
            let mut v = if step.first { acc[g][t] } else { _mm512_add_ps(_mm512_loadu_ps(at), acc[g][t]) };
            if let Some(bias) = step.bias {
                v = _mm512_add_ps(v, _mm512_loadu_ps(bias.as_ptr().add(c0)));
            }
            _mm512_storeu_ps(at, v);
        }
    }
}

// ---- the head's dot products ---------------------------------------------------

/// Columns `v0..v1` (vocabulary rows of `w`) for every row of `xs`: three
/// vocabulary rows × four activation rows at a time, two ZMM registers (32
/// lanes) each.
///
/// # Safety
/// AVX-512F; no other thread writes these columns of `dst` meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512(xs: &[f32], rows: usize, k: usize, w: &[f32], v0: usize, v1: usize, dst: Out) {
    const V: usize = 3;
    let mut v = v0;
    while v < v1 {
        let nv = (v1 - v).min(V);
        let mut r = 0;
        while r < rows {
            let g = (rows - r).min(4);
            match (nv, g) {
                (3, 4) => dot_tile::<3, 4>(xs, k, w, v, r, dst),
                (3, 3) => dot_tile::<3, 3>(xs, k, w, v, r, dst),
                (3, 2) => dot_tile::<3, 2>(xs, k, w, v, r, dst),
                (3, _) => dot_tile::<3, 1>(xs, k, w, v, r, dst),
                (2, 4) => dot_tile::<2, 4>(xs, k, w, v, r, dst),
                (2, 3) => dot_tile::<2, 3>(xs, k, w, v, r, dst),
                (2, 2) => dot_tile::<2, 2>(xs, k, w, v, r, dst),
                (2, _) => dot_tile::<2, 1>(xs, k, w, v, r, dst),
                (_, 4) => dot_tile::<1, 4>(xs, k, w, v, r, dst),
                (_, 3) => dot_tile::<1, 3>(xs, k, w, v, r, dst),
                (_, 2) => dot_tile::<1, 2>(xs, k, w, v, r, dst),
                _ => dot_tile::<1, 1>(xs, k, w, v, r, dst),
            }
            r += g;
        }
        v += nv;
    }
}

/// `V` vocabulary rows (from `v0`) dotted with `G` activation rows (from
/// `r0`), in `dots`' order of operations.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_tile<const V: usize, const G: usize>(xs: &[f32], k: usize, w: &[f32], v0: usize, r0: usize, dst: Out) {
    use std::arch::x86_64::*;
    assert!((r0 + G) * k <= xs.len() && (v0 + V) * k <= w.len());
    let chunks = k / LANES;
    let wp = w.as_ptr().add(v0 * k);
    let xp = xs.as_ptr().add(r0 * k);
    let mut lo = [[_mm512_setzero_ps(); G]; V];
    let mut hi = [[_mm512_setzero_ps(); G]; V];
    for c in 0..chunks {
        let at = c * LANES;
        let mut wl = [_mm512_setzero_ps(); V];
        let mut wh = [_mm512_setzero_ps(); V];
        for v in 0..V {
            wl[v] = _mm512_loadu_ps(wp.add(v * k + at));
            wh[v] = _mm512_loadu_ps(wp.add(v * k + at + 16));
        }
        for g in 0..G {
            let xl = _mm512_loadu_ps(xp.add(g * k + at));
            let xh = _mm512_loadu_ps(xp.add(g * k + at + 16));
            for v in 0..V {
                lo[v][g] = _mm512_fmadd_ps(xl, wl[v], lo[v][g]);
                hi[v][g] = _mm512_fmadd_ps(xh, wh[v], hi[v][g]);
            }
        }
    }
    // Lane l + width folded onto lane l, for width 8, 4, 2, 1 (lanes past
    // the width take any other lane and are never read).
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mask = _mm512_set1_epi32(15);
    let s8 = _mm512_and_si512(_mm512_add_epi32(lanes, _mm512_set1_epi32(8)), mask);
    let s4 = _mm512_and_si512(_mm512_add_epi32(lanes, _mm512_set1_epi32(4)), mask);
    let s2 = _mm512_and_si512(_mm512_add_epi32(lanes, _mm512_set1_epi32(2)), mask);
    let s1 = _mm512_and_si512(_mm512_add_epi32(lanes, _mm512_set1_epi32(1)), mask);
    for v in 0..V {
        for g in 0..G {
            let mut s = _mm512_add_ps(lo[v][g], hi[v][g]);
            s = _mm512_add_ps(s, _mm512_permutexvar_ps(s8, s));
            s = _mm512_add_ps(s, _mm512_permutexvar_ps(s4, s));
            s = _mm512_add_ps(s, _mm512_permutexvar_ps(s2, s));
            s = _mm512_add_ps(s, _mm512_permutexvar_ps(s1, s));
            let x = &xs[(r0 + g) * k..(r0 + g + 1) * k];
            let wrow = &w[(v0 + v) * k..(v0 + v + 1) * k];
            let mut tail = 0f32;
            for i in chunks * LANES..k {
                tail = x[i].mul_add(wrow[i], tail);
            }
            *dst.ptr.add((r0 + g) * dst.n + v0 + v) = _mm512_cvtss_f32(s) + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn randn(shape: (usize, usize)) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// Whether the kernels run here (saying so when they do not).
    fn here() -> bool {
        available() || {
            eprintln!("no AVX-512F here (or DIALOGD_F32_KERNELS=avx2): nothing to compare");
            false
        }
    }

    #[test]
    fn projections_give_the_few_rows_kernels_bits_at_every_row_count() {
        if !here() {
            return;
        }
        // k: one band, a ragged last band, several bands; n: one task of one
        // tile, ragged tasks.
        for (k, n) in [(96, 16), (300, 96), (768, 2304), (3072, 80)] {
            let w = randn((k, n));
            let packed = PackedMatrix::pack(&w).unwrap();
            let bias = values(&randn((1, n)));
            for rows in [1, 2, 5, 6, 7, 13, 32, 64] {
                let x = randn((rows, k));
                let xs = values(&x);
                let few = super::super::packed_few(&xs, rows, &packed);
                let wide = packed_product(&xs, rows, &packed, None).unwrap();
                assert!(same_bits(&few, &wide), "k {k} n {n} rows {rows}");
                let plus = packed_product(&xs, rows, &packed, Some(&bias)).unwrap();
                let added: Vec<f32> = few.iter().enumerate().map(|(i, v)| v + bias[i % n]).collect();
                assert!(same_bits(&plus, &added), "bias, k {k} n {n} rows {rows}");
                // One row alone gives the bits it had in the batch.
                let last = packed_product(&xs[(rows - 1) * k..], 1, &packed, None).unwrap();
                assert!(same_bits(&last, &wide[(rows - 1) * n..]), "alone, k {k} n {n} rows {rows}");
            }
        }
    }

    #[test]
    fn head_dots_give_the_few_rows_kernels_bits_at_every_row_count() {
        if !here() {
            return;
        }
        // k with and without a tail past the last 32; vocabularies that
        // leave 1 and 2 rows after the groups of 3 and ragged tasks.
        for (k, n) in [(64, 7), (96, 385), (77, 200), (768, 1000)] {
            let w = randn((n, k));
            let ws = values(&w);
            for rows in [1, 3, 4, 5, 32] {
                let x = randn((rows, k));
                let few = super::super::matrix_t_few(&values(&x), rows, k, &ws);
                let wide = rows_times_matrix_t(&values(&x), rows, k, &ws).unwrap();
                assert!(same_bits(&few, &wide), "k {k} n {n} rows {rows}");
                let reference = values(&x.matmul(&w.t().unwrap()).unwrap());
                assert!(reference.iter().zip(&wide).all(|(a, b)| (a - b).abs() < 1e-3), "k {k} n {n} rows {rows}");
            }
        }
    }

    #[test]
    fn no_rows_give_an_empty_product() {
        if !here() {
            return;
        }
        let packed = PackedMatrix::pack(&randn((32, 16))).unwrap();
        assert!(packed_product(&[], 0, &packed, None).unwrap().is_empty());
        assert!(rows_times_matrix_t(&[], 0, 32, &values(&randn((5, 32)))).unwrap().is_empty());
    }
}
