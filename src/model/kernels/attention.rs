//! Attention over per-sequence key/value caches, every sequence of a batch
//! in one call.
//!
//! A batched step holds sequences of different lengths, each with its own
//! cache. Doing their attention with tensor ops costs about ten small ops
//! per sequence per layer (split, copy into the cache, two products, mask,
//! softmax, transpose), each with an allocation, on the engine thread while
//! the other cores wait. Here one rayon task per (sequence, head) writes
//! the new keys and values into the cache in place and attends its query
//! rows over the cached positions, straight from the fused `qkv`
//! projection to the `[rows, n_embd]` output.
//!
//! A task's arithmetic depends only on its own sequence and head (same
//! operations in the same order whatever else is in the batch and however
//! many threads run), so a sequence's output does not depend on its batch.

use rayon::prelude::*;

/// The attention layout of a layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub n_head: usize,
    pub head_dim: usize,
    /// Multiplies every query-key dot product.
    pub scale: f32,
}

impl Heads {
    fn n_embd(&self) -> usize {
        self.n_head * self.head_dim
    }
}

/// A number a cache holds: f32, f16 (half the memory and the bytes each
/// step reads; attention over long caches is bound by memory bandwidth) or
/// 8-bit with a scale per row ([`KvQ8`], a quarter). Values are widened to
/// f32 for the arithmetic. A cached row (one position of one head) is
/// `head_dim + ROW_EXTRA` values.
pub trait KvValue: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// Values a row stores beside its `head_dim` (a scale, for 8 bits).
    const ROW_EXTRA: usize = 0;
    /// Stores one row of f32 values (`dst` is `src.len() + ROW_EXTRA` long).
    fn put(src: &[f32], dst: &mut [Self]);
    /// Whole rows as f32, `head_dim` values each: `src` itself when already
    /// f32, otherwise widened into `scratch`.
    fn view<'a>(src: &'a [Self], head_dim: usize, scratch: &'a mut Vec<f32>) -> &'a [f32];
}

impl KvValue for f32 {
    fn put(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    fn view<'a>(src: &'a [f32], _head_dim: usize, _scratch: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }
}

/// One byte of an 8-bit cache row: `head_dim` values `q` (−127..=127) and
/// then the row's f32 scale in four bytes; a value is `q · scale`, with
/// `scale = max|x| / 127` over the row (so the largest keeps full 8 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct KvQ8(pub i8);

impl KvValue for KvQ8 {
    const ROW_EXTRA: usize = 4;

    fn put(src: &[f32], dst: &mut [KvQ8]) {
        let max = src.iter().fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
        // A NaN or infinite value makes the whole row NaN, as in f32.
        let finite = src.iter().all(|v| v.is_finite());
        let scale = if !finite { f32::NAN } else if max > 0.0 { max / 127.0 } else { 0.0 };
        let inverse = if finite && max > 0.0 { 127.0 / max } else { 0.0 };
        let (values, tail) = dst.split_at_mut(src.len());
        for (q, &v) in values.iter_mut().zip(src) {
            *q = KvQ8((v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8);
        }
        for (q, b) in tail.iter_mut().zip(scale.to_le_bytes()) {
            *q = KvQ8(b as i8);
        }
    }

    #[inline(always)]
    fn view<'a>(src: &'a [KvQ8], head_dim: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let stride = head_dim + Self::ROW_EXTRA;
        let rows = src.len() / stride;
        if scratch.len() < rows * head_dim {
            scratch.resize(rows * head_dim, 0.0);
        }
        let out = &mut scratch[..rows * head_dim];
        for (o, row) in out.chunks_exact_mut(head_dim).zip(src.chunks_exact(stride)) {
            let b = &row[head_dim..];
            let scale = f32::from_le_bytes([b[0].0 as u8, b[1].0 as u8, b[2].0 as u8, b[3].0 as u8]);
            for (o, q) in o.iter_mut().zip(&row[..head_dim]) {
                *o = f32::from(q.0) * scale;
            }
        }
        out
    }
}

impl KvValue for half::f16 {
    fn put(src: &[f32], dst: &mut [half::f16]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }

    #[inline(always)]
    fn view<'a>(src: &'a [half::f16], _head_dim: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        // The scratch is the task thread's own and keeps its size, so this
        // is one pass over the cache, inlined into the caller's
        // vectorised (AVX2) code, not a call per 8 values.
        if scratch.len() < src.len() {
            scratch.resize(src.len(), 0.0);
        }
        let out = &mut scratch[..src.len()];
        for (o, h) in out.iter_mut().zip(src) {
            *o = f16_bits_to_f32(h.to_bits());
        }
        out
    }
}

/// An f16's value as f32, exactly (f16 ⊂ f32), in branch-free integer and
/// float steps that vectorise: the exponent and mantissa moved into f32's
/// places and scaled by 2^112 (which also normalises f16 subnormals), the
/// exponent saturated for infinities and NaNs, the sign put back.
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let scaled = f32::from_bits((h & 0x7fff) << 13) * f32::from_bits(0x7780_0000);
    let inf_nan = if h & 0x7c00 == 0x7c00 { 0x7f80_0000 } else { 0 };
    f32::from_bits(scaled.to_bits() | inf_nan | sign)
}

thread_local! {
    /// Widened keys and values of the task running on this thread.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// One sequence's part of a batched attention call.
#[derive(Debug)]
pub struct SeqAttention<'a, T> {
    /// First row of this sequence in `qkv` and in the output.
    pub start: usize,
    /// Its new tokens (rows), written to the cache at `past..past + len`.
    pub len: usize,
    /// Positions already cached.
    pub past: usize,
    /// Keys and values, `[n_head, capacity, head_dim]` each.
    pub keys: &'a mut [T],
    pub values: &'a mut [T],
}

/// One (sequence, head) task: first row, new rows, cached positions, head,
/// and that head's keys and values.
type HeadTask<'a, T> = (usize, usize, usize, usize, &'a mut [T], &'a mut [T]);

/// The output pointer shared by the tasks; each writes only its own
/// (row, head) slices, which no other task touches.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint ranges (see `attend`), and the buffer
// outlives the parallel section.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Causal attention for every sequence: `qkv` is `[rows, 3 * n_embd]`
/// (queries, keys, values side by side, as GPT-2's `c_attn` gives them)
/// and the result is `[rows, n_embd]`, heads side by side. Row `start + j`
/// of a sequence sees its cached positions and its own new tokens up to
/// `j`. Fails (writing nothing) when a sequence's rows or cache do not fit.
pub fn attend<T: KvValue>(qkv: &[f32], heads: Heads, seqs: Vec<SeqAttention<'_, T>>) -> Result<Vec<f32>, String> {
    let e = heads.n_embd();
    if e == 0 || !qkv.len().is_multiple_of(3 * e) {
        return Err(format!("qkv of {} values is not rows of 3 × {e}", qkv.len()));
    }
    let rows = qkv.len() / (3 * e);
    // Values a cached position of one head takes.
    let stride = heads.head_dim + T::ROW_EXTRA;
    let per_head = |buf: &[T]| buf.len() / (heads.n_head * stride);
    for s in &seqs {
        let capacity = per_head(s.keys);
        if s.keys.len() != capacity * heads.n_head * stride || s.values.len() != s.keys.len() {
            return Err(format!("a cache of {} keys and {} values is not [{}, capacity, {}]", s.keys.len(), s.values.len(), heads.n_head, heads.head_dim));
        }
        if s.len == 0 || s.start + s.len > rows {
            return Err(format!("rows {}..{} are outside the {rows} rows given", s.start, s.start + s.len));
        }
        if s.past + s.len > capacity {
            return Err(format!("{} positions exceed the sequence's cache of {capacity}", s.past + s.len));
        }
    }
    let mut out = vec![0f32; rows * e];
    let out_ptr = Out(out.as_mut_ptr());
    let tasks: Vec<HeadTask<'_, T>> = seqs
        .into_iter()
        .flat_map(|s| {
            let capacity = per_head(s.keys);
            let (start, len, past) = (s.start, s.len, s.past);
            s.keys
                .chunks_mut(capacity * stride)
                .zip(s.values.chunks_mut(capacity * stride))
                .enumerate()
                .map(move |(h, (k, v))| (start, len, past, h, k, v))
        })
        .collect();
    tasks.into_par_iter().with_max_len(4).for_each(|(start, len, past, h, keys, values)| {
        let out = out_ptr;
        head_dispatch(qkv, heads, start, len, past, h, keys, values, out);
    });
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn head_dispatch<T: KvValue>(qkv: &[f32], heads: Heads, start: usize, len: usize, past: usize, h: usize, keys: &mut [T], values: &mut [T], out: Out) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked above).
            return unsafe { head_avx2(qkv, heads, start, len, past, h, keys, values, out) };
        }
    }
    head(qkv, heads, start, len, past, h, keys, values, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_avx2<T: KvValue>(qkv: &[f32], heads: Heads, start: usize, len: usize, past: usize, h: usize, keys: &mut [T], values: &mut [T], out: Out) {
    head(qkv, heads, start, len, past, h, keys, values, out)
}

/// One head of one sequence: store its new keys and values, then attend
/// each new row causally. Plain multiplies and adds (no fused
/// multiply-add), so every code path rounds the same way.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn head<T: KvValue>(qkv: &[f32], heads: Heads, start: usize, len: usize, past: usize, h: usize, keys: &mut [T], values: &mut [T], out: Out) {
    let (d, e) = (heads.head_dim, heads.n_embd());
    let stride = d + T::ROW_EXTRA;
    for j in 0..len {
        let row = &qkv[(start + j) * 3 * e..(start + j + 1) * 3 * e];
        let at = (past + j) * stride..(past + j + 1) * stride;
        T::put(&row[e + h * d..e + (h + 1) * d], &mut keys[at.clone()]);
        T::put(&row[2 * e + h * d..2 * e + (h + 1) * d], &mut values[at]);
    }
    // The thread's buffers are moved out and back (no allocation once they
    // have grown), so the widening and the attention below stay in this
    // function's code (compiled for AVX2 by `head_avx2`), not a closure's.
    let (mut key_scratch, mut value_scratch) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let keys = T::view(&keys[..(past + len) * stride], d, &mut key_scratch);
    let values = T::view(&values[..(past + len) * stride], d, &mut value_scratch);
    attend_rows(qkv, heads, start, len, past, h, keys, values, out);
    SCRATCH.with(|s| *s.borrow_mut() = (key_scratch, value_scratch));
}

/// The attention of one head's new rows over `keys`/`values` (f32, every
/// cached position and the new ones).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_rows(qkv: &[f32], heads: Heads, start: usize, len: usize, past: usize, h: usize, keys: &[f32], values: &[f32], out: Out) {
    let (d, e) = (heads.head_dim, heads.n_embd());
    let mut scores = vec![0f32; past + len];
    let mut acc = vec![0f32; d];
    for j in 0..len {
        let row = start + j;
        let q = &qkv[row * 3 * e + h * d..row * 3 * e + (h + 1) * d];
        let total = past + j + 1;
        let scores = &mut scores[..total];
        let mut max = f32::NEG_INFINITY;
        for (i, s) in scores.iter_mut().enumerate() {
            *s = dot(q, &keys[i * d..(i + 1) * d]) * heads.scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (i, &p) in scores.iter().enumerate() {
            for (a, &v) in acc.iter_mut().zip(&values[i * d..(i + 1) * d]) {
                *a += p * v;
            }
        }
        // SAFETY: `row` belongs to this task's sequence and `h` to this
        // task, so no other task writes `out[row * e + h * d..][..d]`; the
        // range lies inside the `rows * e` buffer (`attend` checked rows).
        let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(row * e + h * d), d) };
        for (o, &a) in dst.iter_mut().zip(&acc) {
            *o = a / sum;
        }
    }
}

/// Lanes of the dot product: independent partial sums the compiler keeps
/// in vector registers.
const LANES: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (x, y) = (&a[c * LANES..(c + 1) * LANES], &b[c * LANES..(c + 1) * LANES]);
        for l in 0..LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut sum = 0f32;
    for l in lanes {
        sum += l;
    }
    for i in chunks * LANES..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook computation, one query at a time, in f64.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let scores: Vec<f64> = keys.iter().map(|k| q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale as f64).collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        (0..q.len()).map(|c| (exps.iter().zip(values).map(|(p, v)| p * v[c] as f64).sum::<f64>() / sum) as f32).collect()
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_textbook_causal_attention_and_fills_the_caches() {
        let heads = Heads { n_head: 3, head_dim: 20, scale: 0.3 };
        let e = heads.n_embd();
        // Two sequences: 5 new tokens after 2 cached, and 1 new after 6 cached.
        let plan = [(5usize, 2usize), (1, 6)];
        let rows: usize = plan.iter().map(|p| p.0).sum();
        let qkv = pseudo(rows * 3 * e, 7);
        let capacity = 8;
        let mut caches: Vec<(Vec<f32>, Vec<f32>)> = (0..plan.len())
            .map(|i| (pseudo(heads.n_head * capacity * heads.head_dim, 100 + i as u32), pseudo(heads.n_head * capacity * heads.head_dim, 200 + i as u32)))
            .collect();
        let before = caches.clone();
        let mut start = 0;
        let mut seqs = Vec::new();
        for ((len, past), (k, v)) in plan.iter().zip(caches.iter_mut()) {
            seqs.push(SeqAttention { start, len: *len, past: *past, keys: k, values: v });
            start += len;
        }
        let out = attend(&qkv, heads, seqs).unwrap();
        let d = heads.head_dim;
        let mut start = 0;
        for (s, &(len, past)) in plan.iter().enumerate() {
            for h in 0..heads.n_head {
                let at = |buf: &Vec<f32>, p: usize| buf[h * capacity * d + p * d..h * capacity * d + (p + 1) * d].to_vec();
                // The new keys and values landed at past..past + len; the rest is untouched.
                for p in 0..capacity {
                    let (k, v) = (at(&caches[s].0, p), at(&caches[s].1, p));
                    if p >= past && p < past + len {
                        let r = start + p - past;
                        assert_eq!(k, qkv[r * 3 * e + e + h * d..r * 3 * e + e + (h + 1) * d].to_vec());
                        assert_eq!(v, qkv[r * 3 * e + 2 * e + h * d..r * 3 * e + 2 * e + (h + 1) * d].to_vec());
                    } else {
                        assert_eq!((k, v), (at(&before[s].0, p), at(&before[s].1, p)), "position {p} changed");
                    }
                }
                for j in 0..len {
                    let r = start + j;
                    let q = &qkv[r * 3 * e + h * d..r * 3 * e + (h + 1) * d];
                    let seen = past + j + 1;
                    let keys: Vec<Vec<f32>> = (0..seen).map(|p| at(&caches[s].0, p)).collect();
                    let values: Vec<Vec<f32>> = (0..seen).map(|p| at(&caches[s].1, p)).collect();
                    let want = reference(q, &keys, &values, heads.scale);
                    let got = &out[r * e + h * d..r * e + (h + 1) * d];
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() < 1e-5, "seq {s} head {h} row {j}: {g} vs {w}");
                    }
                }
            }
            start += len;
        }
    }

    #[test]
    fn a_sequence_gives_the_same_bits_alone_and_in_a_batch() {
        let heads = Heads { n_head: 2, head_dim: 32, scale: 0.125 };
        let e = heads.n_embd();
        let capacity = 10;
        let cache = || (vec![0f32; heads.n_head * capacity * heads.head_dim], vec![0f32; heads.n_head * capacity * heads.head_dim]);
        let mine = pseudo(4 * 3 * e, 1);
        let (mut k1, mut v1) = cache();
        let alone = attend(&mine, heads, vec![SeqAttention { start: 0, len: 4, past: 0, keys: &mut k1, values: &mut v1 }]).unwrap();
        let mut batch = pseudo(3 * 3 * e, 2);
        batch.extend_from_slice(&mine);
        let (mut k0, mut v0) = cache();
        let (mut k2, mut v2) = cache();
        let together = attend(
            &batch,
            heads,
            vec![
                SeqAttention { start: 0, len: 3, past: 0, keys: &mut k0, values: &mut v0 },
                SeqAttention { start: 3, len: 4, past: 0, keys: &mut k2, values: &mut v2 },
            ],
        )
        .unwrap();
        assert_eq!(alone, together[3 * e..].to_vec());
        assert_eq!((k1, v1), (k2, v2));
    }

    /// Runs a 6-token prefill and 3 decode steps through f32 caches and
    /// through caches of `T`, checking every output is within `tolerance`;
    /// returns both caches' keys and values and the positions filled.
    #[allow(clippy::type_complexity)]
    fn beside_f32<T: KvValue>(zero: T, seed: u32, tolerance: f32) -> ((Vec<f32>, Vec<f32>), (Vec<T>, Vec<T>), usize) {
        let heads = Heads { n_head: 2, head_dim: 32, scale: 0.2 };
        let e = heads.n_embd();
        let capacity = 12;
        let size = heads.n_head * capacity * heads.head_dim;
        let (mut k32, mut v32) = (vec![0f32; size], vec![0f32; size]);
        let size_t = heads.n_head * capacity * (heads.head_dim + T::ROW_EXTRA);
        let (mut kt, mut vt) = (vec![zero; size_t], vec![zero; size_t]);
        let mut past = 0;
        for (step, len) in [6usize, 1, 1, 1].into_iter().enumerate() {
            let qkv = pseudo(len * 3 * e, seed + step as u32);
            let full = attend(&qkv, heads, vec![SeqAttention { start: 0, len, past, keys: &mut k32, values: &mut v32 }]).unwrap();
            let other = attend(&qkv, heads, vec![SeqAttention { start: 0, len, past, keys: &mut kt, values: &mut vt }]).unwrap();
            for (a, b) in full.iter().zip(&other) {
                assert!((a - b).abs() < tolerance, "step {step}: {a} vs {b}");
            }
            past += len;
        }
        ((k32, v32), (kt, vt), past)
    }

    #[test]
    fn half_precision_caches_stay_close_to_f32() {
        let ((k32, v32), (k16, v16), _) = beside_f32(half::f16::ZERO, 40, 2e-3);
        for (a, b) in k32.iter().zip(&k16).chain(v32.iter().zip(&v16)) {
            assert_eq!(half::f16::from_f32(*a), *b);
        }
    }

    #[test]
    fn eight_bit_caches_stay_close_to_f32_and_keep_a_scale_per_row() {
        let ((k32, _), (k8, _), past) = beside_f32(KvQ8(0), 60, 2e-2);
        let head_dim = 32;
        // Each stored row widens back to within half a step of its scale.
        let mut scratch = Vec::new();
        let stride = head_dim + KvQ8::ROW_EXTRA;
        let widened = KvQ8::view(&k8[..past * stride], head_dim, &mut scratch).to_vec();
        for (row, (w, x)) in widened.chunks(head_dim).zip(k32[..past * head_dim].chunks(head_dim)).enumerate() {
            let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in w.iter().zip(x) {
                assert!((a - b).abs() <= max / 254.0 * 1.001, "row {row}: {a} vs {b}");
            }
        }
        // A row with a NaN widens to NaN; an all-zero row to zeros.
        let mut row = vec![KvQ8(0); 8 + KvQ8::ROW_EXTRA];
        KvQ8::put(&[1.0, f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], &mut row);
        assert!(KvQ8::view(&row, 8, &mut scratch).iter().all(|v| v.is_nan()));
        KvQ8::put(&[0.0; 8], &mut row);
        assert!(KvQ8::view(&row, 8, &mut scratch).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn f16_widening_is_exact_for_every_value() {
        for bits in 0..=u16::MAX {
            let h = half::f16::from_bits(bits);
            let got = f16_bits_to_f32(bits);
            if h.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), h.to_f32().to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn rows_or_positions_that_do_not_fit_are_refused() {
        let heads = Heads { n_head: 1, head_dim: 4, scale: 1.0 };
        let qkv = vec![0f32; 2 * 12];
        let (mut k, mut v) = (vec![0f32; 3 * 4], vec![0f32; 3 * 4]);
        let err = attend(&qkv, heads, vec![SeqAttention { start: 0, len: 2, past: 2, keys: &mut k, values: &mut v }]).unwrap_err();
        assert!(err.contains("exceed the sequence's cache of 3"), "{err}");
        let err = attend(&qkv, heads, vec![SeqAttention { start: 1, len: 2, past: 0, keys: &mut k, values: &mut v }]).unwrap_err();
        assert!(err.contains("outside the 2 rows"), "{err}");
        assert!(k.iter().chain(&v).all(|&x| x == 0.0), "a refused call wrote to the cache");
    }
}
