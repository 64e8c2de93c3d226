//! The matrix products of one DialoGPT-small step, alone: the four
//! projections of a layer (× 12) and the tied head, for f32 packed weights
//! and 8-bit weights, at a few row counts (1 = a batch-1 decode step,
//! 8 and 32 = batched decode, 64 = a prefill). Random weights.
//!
//! `cargo run --release --example kernel_bench [reps]`. Prints the best of
//! `reps` (default 5) per row count, in ms per step.

use std::time::Instant;

use candle_core::{Device, Tensor};
use dialogd::model::kernels::{rows_times_matrix_t, rows_times_packed, rows_times_packed_q8, rows_times_q8_t, PackedMatrix, PackedQ8, Q8Matrix};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let dev = Device::Cpu;
    let (e, vocab, layers) = (768, 50257, 12);
    let shapes = [(e, 3 * e), (e, e), (e, 4 * e), (4 * e, e)];
    let weights: Vec<Tensor> = shapes.iter().map(|&(k, n)| Tensor::randn(0f32, 0.02, (k, n), &dev)).collect::<Result<_, _>>()?;
    let packed: Vec<PackedMatrix> = weights.iter().map(PackedMatrix::pack).collect::<Result<_, _>>()?;
    let q8: Vec<PackedQ8> = weights.iter().map(PackedQ8::quantize).collect::<Result<_, _>>()?;
    let wte = Tensor::randn(0f32, 0.02, (vocab, e), &dev)?;
    let head_q8 = Q8Matrix::quantize(&wte)?;
    println!("rows  f32 layers×12  f32 head  q8 layers×12  q8 head   (ms, best of {reps})");
    for rows in [1, 2, 4, 8, 32, 64] {
        let xs: Vec<Tensor> = shapes.iter().map(|&(k, _)| Tensor::randn(0f32, 1.0, (rows, k), &dev)).collect::<Result<_, _>>()?;
        let h = Tensor::randn(0f32, 1.0, (rows, e), &dev)?;
        let best = |f: &dyn Fn() -> candle_core::Result<()>| -> candle_core::Result<f64> {
            let mut best = f64::MAX;
            for _ in 0..reps {
                let t = Instant::now();
                f()?;
                best = best.min(t.elapsed().as_secs_f64() * 1e3);
            }
            Ok(best)
        };
        let f32_layers = best(&|| {
            for _ in 0..layers {
                for (x, w) in xs.iter().zip(&packed) {
                    rows_times_packed(x, w)?;
                }
            }
            Ok(())
        })?;
        let f32_head = best(&|| rows_times_matrix_t(&h, &wte).map(drop))?;
        let q8_layers = best(&|| {
            for _ in 0..layers {
                for (x, w) in xs.iter().zip(&q8) {
                    rows_times_packed_q8(x, w)?;
                }
            }
            Ok(())
        })?;
        let q8_head = best(&|| rows_times_q8_t(&h, &head_q8).map(drop))?;
        println!("{rows:>4}  {f32_layers:>13.2}  {f32_head:>8.2}  {q8_layers:>12.2}  {q8_head:>7.2}");
    }
    Ok(())
}
