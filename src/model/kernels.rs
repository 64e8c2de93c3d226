//! Matrix products for the few-rows case, where decoding spends its time.
//!
//! At batch 1-4 a decode step multiplies a handful of activation rows by
//! every weight matrix once, so it is bound by memory bandwidth, not
//! arithmetic. candle's gemm runs such products on one thread (measured:
//! ~60% of the bandwidth of these machines). These kernels stream each weight
//! matrix exactly once, split across the rayon pool by output columns, and
//! keep every row's sum in the same order whatever the number of rows, so a
//! sequence's result does not depend on what else is in the batch.
//!
//! Weights are plain row-major f32 slices read straight from the tensor's
//! storage; the few activation rows are copied out and the result copied back.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

/// Rows up to which the kernels beat gemm on these machines.
pub const SMALL_ROWS: usize = 4;

/// Vocabulary rows handed to one rayon task in [`rows_times_matrix_t`].
const COLUMN_BLOCK: usize = 256;

/// Whether `x @ w` should take the few-rows path.
pub fn wants_small_path(x: &Tensor, w: &Tensor, rows: usize) -> bool {
    rows <= SMALL_ROWS
        && matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.is_contiguous()
}

fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
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
    let out = with_f32(w, |w| {
        let partials: Vec<Vec<f32>> = (0..k.div_ceil(K_BLOCK))
            .into_par_iter()
            .map(|band| {
                let k0 = band * K_BLOCK;
                let k1 = (k0 + K_BLOCK).min(k);
                let mut acc = vec![0f32; rows * n];
                band_axpy(&xs, k, &w[k0 * n..k1 * n], k0, n, rows, &mut acc);
                acc
            })
            .collect();
        let mut partials = partials.into_iter();
        let mut out = partials.next().unwrap_or_else(|| vec![0f32; rows * n]);
        for p in partials {
            add_assign(&mut out, &p);
        }
        out
    })?;
    Tensor::from_vec(out, (rows, n), x.device())
}

/// Weight rows per task in [`rows_times_matrix`].
const K_BLOCK: usize = 128;

/// `acc[r] += Σ_kk xs[r, k0 + kk] · band[kk]` over the band's rows.
fn band_axpy(xs: &[f32], k: usize, band: &[f32], k0: usize, n: usize, rows: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked above).
            return unsafe { band_axpy_avx2(xs, k, band, k0, n, rows, acc) };
        }
    }
    band_axpy_portable(xs, k, band, k0, n, rows, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn band_axpy_avx2(xs: &[f32], k: usize, band: &[f32], k0: usize, n: usize, rows: usize, acc: &mut [f32]) {
    band_axpy_portable(xs, k, band, k0, n, rows, acc)
}

#[inline(always)]
fn band_axpy_portable(xs: &[f32], k: usize, band: &[f32], k0: usize, n: usize, rows: usize, acc: &mut [f32]) {
    for (i, wrow) in band.chunks_exact(n).enumerate() {
        for r in 0..rows {
            let xv = xs[r * k + k0 + i];
            for (d, &wv) in acc[r * n..(r + 1) * n].iter_mut().zip(wrow) {
                *d += xv * wv;
            }
        }
    }
}

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
        // Column-major result, one chunk of vocabulary rows per task.
        let mut by_col = vec![0f32; n * rows];
        by_col.par_chunks_mut(COLUMN_BLOCK * rows).enumerate().for_each(|(block, dst)| {
            let v0 = block * COLUMN_BLOCK;
            for (i, out_v) in dst.chunks_mut(rows).enumerate() {
                let wrow = &w[(v0 + i) * k..(v0 + i + 1) * k];
                for (r, o) in out_v.iter_mut().enumerate() {
                    *o = dot_dispatch(&xs[r * k..(r + 1) * k], wrow);
                }
            }
        });
        let mut out = vec![0f32; rows * n];
        for v in 0..n {
            for r in 0..rows {
                out[r * n + v] = by_col[v * rows + r];
            }
        }
        out
    })?;
    Tensor::from_vec(out, (rows, n), x.device())
}

fn dot_dispatch(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot(a, b)
}

/// A dot product in eight independent lanes (so it vectorises), summed in a
/// fixed order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (pa, pb) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            lanes[l] += pa[l] * pb[l];
        }
    }
    let mut tail = 0f32;
    for i in chunks * 8..a.len() {
        tail += a[i] * b[i];
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail
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
}
