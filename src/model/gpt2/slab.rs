//! Tensor key/value caches in shared slabs, and decode attention for every
//! sequence of a step in a fixed number of tensor ops.
//!
//! A GPU model (or a CPU model asked for tensor caches, which is how the
//! tests run this path) keeps each layer's keys and values for many
//! sequences in one preallocated tensor per chunk of slots,
//! `[slots, n_head, n_positions, head_dim]`. A sequence owns one slot for
//! its life ([`Slot`], returned when dropped); its per-layer cache is a view
//! into the chunk, written in place. A decode step (one new token per
//! sequence) then runs, per layer and chunk: two `scatter_set`s writing the
//! new keys and values of all its sequences, one scatter of the queries,
//! two batched matmuls over the chunk's slots and a softmax; no cache is
//! concatenated or copied. Slots not in the step attend to their first
//! position only, and their rows are dropped.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::super::ModelError;

type Result<T> = std::result::Result<T, ModelError>;

/// Slots per chunk: the first chunk has 4, each next one twice the last,
/// up to this many (a chunk of DialoGPT-small in bf16 is 37.7 MB a slot).
const MAX_CHUNK_SLOTS: usize = 32;

/// Every chunk of one model's tensor caches.
#[derive(Debug)]
pub(crate) struct Slabs {
    shape: SlabShape,
    chunks: Mutex<Vec<Arc<Chunk>>>,
}

#[derive(Debug, Clone, Copy)]
struct SlabShape {
    n_layer: usize,
    n_head: usize,
    head_dim: usize,
    positions: usize,
}

/// One chunk: per layer, keys and values `[slots, n_head, positions, head_dim]`.
#[derive(Debug)]
pub(crate) struct Chunk {
    layers: Vec<(Tensor, Tensor)>,
    free: Mutex<Vec<usize>>,
}

/// A sequence's slot in a chunk; the slot is free again when this drops.
#[derive(Debug)]
pub(crate) struct Slot {
    slabs: Arc<Slabs>,
    chunk: Arc<Chunk>,
    index: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.chunk.free.lock().unwrap_or_else(|e| e.into_inner()).push(self.index);
    }
}

impl Slabs {
    pub(crate) fn new(n_layer: usize, n_head: usize, head_dim: usize, positions: usize) -> Self {
        Self { shape: SlabShape { n_layer, n_head, head_dim, positions }, chunks: Mutex::new(Vec::new()) }
    }

    /// A free slot (the lowest of the first chunk with one, so the slots in
    /// use stay packed at the front), or one in a new chunk of `dtype` on
    /// `device`. Errors: the device cannot allocate the chunk.
    pub(crate) fn acquire(self: &Arc<Self>, dtype: DType, device: &Device) -> Result<Slot> {
        let mut chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        for chunk in chunks.iter() {
            let mut free = chunk.free.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, _)) = free.iter().enumerate().min_by_key(|&(_, &slot)| slot) {
                let index = free.swap_remove(at);
                return Ok(Slot { slabs: self.clone(), chunk: chunk.clone(), index });
            }
        }
        let slots = (4usize << chunks.len().min(3)).min(MAX_CHUNK_SLOTS);
        let SlabShape { n_layer, n_head, head_dim, positions } = self.shape;
        let layers = (0..n_layer)
            .map(|_| {
                let shape = (slots, n_head, positions, head_dim);
                Ok((Tensor::zeros(shape, dtype, device)?, Tensor::zeros(shape, dtype, device)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let chunk = Arc::new(Chunk { layers, free: Mutex::new((1..slots).collect()) });
        chunks.push(chunk.clone());
        Ok(Slot { slabs: self.clone(), chunk, index: 0 })
    }
}

impl Slot {
    /// Layer `layer`'s keys and values for this slot, `[n_head, positions,
    /// head_dim]` views into the chunk (writes land in the chunk).
    pub(crate) fn views(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let (k, v) = &self.chunk.layers[layer];
        Ok((k.narrow(0, self.index, 1)?.squeeze(0)?, v.narrow(0, self.index, 1)?.squeeze(0)?))
    }

    /// Another slot of the same slabs holding this one's first `len`
    /// positions.
    pub(crate) fn fork(&self, len: usize) -> Result<Slot> {
        let (k0, _) = &self.chunk.layers[0];
        let slot = self.slabs.acquire(k0.dtype(), k0.device())?;
        if len > 0 {
            for layer in 0..self.slabs.shape.n_layer {
                let (from_k, from_v) = self.views(layer)?;
                let (to_k, to_v) = slot.views(layer)?;
                to_k.slice_set(&owned(&from_k.narrow(1, 0, len)?)?, 1, 0)?;
                to_v.slice_set(&owned(&from_v.narrow(1, 0, len)?)?, 1, 0)?;
            }
        }
        Ok(slot)
    }
}

/// A contiguous copy of `t` in storage of its own (`copy` keeps a view's
/// strides; `contiguous` of a contiguous view shares its storage).
fn owned(t: &Tensor) -> Result<Tensor> {
    Ok(if t.is_contiguous() { t.copy()? } else { t.contiguous()? })
}

/// The decode rows of one step that live in one chunk, and the index and
/// mask tensors their attention needs (built once a step, used by every
/// layer).
pub(crate) struct DecodeGroup {
    chunk: Arc<Chunk>,
    /// Indices into the step's sequences, ascending.
    pub(crate) members: Vec<usize>,
    /// Slots `0..used` take part in the batched products.
    used: usize,
    /// Positions attended: the longest member's length after this token.
    len: usize,
    /// `[n]` u32: each member's row in the step's activations.
    rows: Tensor,
    /// `[n * n_head, head_dim]` u32: the row of the chunk (seen as
    /// `[slots * n_head * positions, head_dim]`) each new key/value goes to.
    write: Tensor,
    /// `[n * n_head, head_dim]` u32: the row of the `[used * n_head,
    /// head_dim]` queries each member's query goes to.
    queries: Tensor,
    /// `[n]` u32: each member's slot.
    pick: Tensor,
    /// `[used, 1, 1, len]` additive mask in the activations' dtype.
    mask: Tensor,
}

/// One decode row: its sequence, its row in the step, its slot and the
/// number of positions cached before it.
pub(crate) struct DecodeRow<'a> {
    pub(crate) seq: usize,
    pub(crate) row: usize,
    pub(crate) slot: &'a Slot,
    pub(crate) past: usize,
}

/// Groups a step's decode rows by chunk and builds their tensors.
pub(crate) fn plan(rows: &[DecodeRow<'_>], dtype: DType, device: &Device) -> Result<Vec<DecodeGroup>> {
    let mut groups: Vec<(Arc<Chunk>, Vec<&DecodeRow<'_>>)> = Vec::new();
    for row in rows {
        match groups.iter_mut().find(|(c, _)| Arc::ptr_eq(c, &row.slot.chunk)) {
            Some((_, members)) => members.push(row),
            None => groups.push((row.slot.chunk.clone(), vec![row])),
        }
    }
    groups
        .into_iter()
        .map(|(chunk, members)| {
            let (k0, _) = &chunk.layers[0];
            let (_, n_head, positions, head_dim) = k0.dims4()?;
            let used = members.iter().map(|m| m.slot.index + 1).max().unwrap_or(1);
            let len = members.iter().map(|m| m.past + 1).max().unwrap_or(1);
            let n = members.len();
            let mut write = Vec::with_capacity(n * n_head * head_dim);
            let mut queries = Vec::with_capacity(n * n_head * head_dim);
            for m in &members {
                for h in 0..n_head {
                    let to = ((m.slot.index * n_head + h) * positions + m.past) as u32;
                    write.extend(std::iter::repeat_n(to, head_dim));
                    queries.extend(std::iter::repeat_n((m.slot.index * n_head + h) as u32, head_dim));
                }
            }
            // Slots outside the step see their first position only (their
            // rows are dropped); members see their own positions.
            let mut mask = vec![f32::NEG_INFINITY; used * len];
            for s in 0..used {
                mask[s * len] = 0.0;
            }
            for m in &members {
                mask[m.slot.index * len..m.slot.index * len + m.past + 1].fill(0.0);
            }
            let u32s = |v: Vec<u32>| Tensor::from_vec(v, (n * n_head, head_dim), device);
            Ok(DecodeGroup {
                members: members.iter().map(|m| m.seq).collect(),
                used,
                len,
                rows: Tensor::new(members.iter().map(|m| m.row as u32).collect::<Vec<_>>().as_slice(), device)?,
                write: u32s(write)?,
                queries: u32s(queries)?,
                pick: Tensor::new(members.iter().map(|m| m.slot.index as u32).collect::<Vec<_>>().as_slice(), device)?,
                mask: Tensor::from_vec(mask, (used, 1, 1, len), device)?.to_dtype(dtype)?,
                chunk,
            })
        })
        .collect()
}

impl DecodeGroup {
    /// Layer `layer`'s attention for the group's rows of `qkv` (`[rows, 3 *
    /// n_embd]`): writes their keys and values into the chunk and returns
    /// `[n, n_embd]`, one row per member in order.
    pub(crate) fn attend(&self, qkv: &Tensor, layer: usize, scale: f64) -> Result<Tensor> {
        let (cache_k, cache_v) = &self.chunk.layers[layer];
        let (slots, n_head, positions, head_dim) = cache_k.dims4()?;
        let e = n_head * head_dim;
        let n = self.members.len();
        let picked = qkv.index_select(&self.rows, 0)?;
        let part = |i: usize| -> Result<Tensor> { Ok(picked.narrow(1, i * e, e)?.contiguous()?.reshape((n * n_head, head_dim))?) };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let flat = (slots * n_head * positions, head_dim);
        cache_k.reshape(flat)?.scatter_set(&self.write, &k, 0)?;
        cache_v.reshape(flat)?.scatter_set(&self.write, &v, 0)?;
        let all_q = Tensor::zeros((self.used * n_head, head_dim), q.dtype(), q.device())?;
        all_q.scatter_set(&self.queries, &q, 0)?;
        let all_q = all_q.reshape((self.used, n_head, 1, head_dim))?;
        // Views over the slots and positions in use: the batch strides are
        // the chunk's, which the batched matmul takes without a copy.
        let keys = cache_k.narrow(0, 0, self.used)?.narrow(2, 0, self.len)?;
        let values = cache_v.narrow(0, 0, self.used)?.narrow(2, 0, self.len)?;
        let scores = (all_q.matmul(&keys.t()?)? * scale)?.broadcast_add(&self.mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&values)?.reshape((self.used, e))?;
        Ok(out.index_select(&self.pick, 0)?)
    }
}
