//! Right-padded batches of token sequences with masks built from lengths.
//!
//! `<|endoftext|>` (50256) is both GPT-2's pad and DialoGPT's turn
//! separator, so nothing here ever looks at token values to find padding:
//! every mask and every gathered position comes from the lengths.

use candle_core::{DType, Device, Tensor};

use super::RankingError;

/// Sequences of different lengths side by side, padded on the right.
#[derive(Debug)]
pub struct PaddedBatch {
    /// `[batch, width]` u32 ids; padding holds `pad_id`.
    pub ids: Tensor,
    /// `[batch, width]` u32 positions `0..width` (every row starts at 0).
    pub positions: Tensor,
    /// `[batch, 1, width, width]` additive bias: query `i` of row `b` sees
    /// key `j` when `j <= i` and `j < lengths[b]`. Padded queries still see
    /// the row's real tokens, so no softmax row is empty (no NaN).
    pub bias: Tensor,
    /// Real length of each row.
    pub lengths: Vec<usize>,
    /// Padded length.
    pub width: usize,
}

impl PaddedBatch {
    pub fn new(seqs: &[Vec<u32>], pad_id: u32, dtype: DType, device: &Device) -> Result<Self, RankingError> {
        let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let width = lengths.iter().copied().max().unwrap_or(0);
        if width == 0 || lengths.contains(&0) {
            return Err(RankingError::Input("a sequence of the batch is empty".into()));
        }
        let b = seqs.len();
        let mut ids = Vec::with_capacity(b * width);
        for seq in seqs {
            ids.extend_from_slice(seq);
            ids.extend(std::iter::repeat_n(pad_id, width - seq.len()));
        }
        let ids = Tensor::from_vec(ids, (b, width), device)?;
        let positions = Tensor::arange(0u32, width as u32, device)?.unsqueeze(0)?.repeat((b, 1))?;
        let mut bias = Vec::with_capacity(b * width * width);
        for &len in &lengths {
            for i in 0..width {
                bias.extend((0..width).map(|j| if j <= i && j < len { 0f32 } else { f32::NEG_INFINITY }));
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, width, width), device)?.to_dtype(dtype)?;
        Ok(Self { ids, positions, bias, lengths, width })
    }

    /// Flat row indices (into `[batch · width, …]`) of each row's last real
    /// token.
    pub fn last_positions(&self) -> Vec<u32> {
        self.lengths.iter().enumerate().map(|(row, &len)| (row * self.width + len - 1) as u32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_come_from_lengths_not_from_pad_ids() {
        // The first row ends in 50256 (a separator) and is full length; the
        // second is padded with the same id.
        let seqs = vec![vec![5, 50256, 7, 50256], vec![9, 50256]];
        let batch = PaddedBatch::new(&seqs, 50256, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(batch.lengths, vec![4, 2]);
        assert_eq!(batch.last_positions(), vec![3, 5]);
        let bias: Vec<Vec<Vec<f32>>> = batch.bias.squeeze(1).unwrap().to_vec3().unwrap();
        // Row 0, last query: every key visible, separators included.
        assert!(bias[0][3].iter().all(|&v| v == 0.0));
        // Row 1, query 3 (padding): sees the two real tokens only.
        assert_eq!(bias[1][3][..2], [0.0, 0.0]);
        assert!(bias[1][3][2..].iter().all(|v| v.is_infinite()));
        // Causal: query 0 sees key 0 only.
        assert!(bias[1][0][1..].iter().all(|v| v.is_infinite()));
    }

    #[test]
    fn empty_rows_are_refused() {
        assert!(PaddedBatch::new(&[vec![1], vec![]], 0, DType::F32, &Device::Cpu).is_err());
        assert!(PaddedBatch::new(&[], 0, DType::F32, &Device::Cpu).is_err());
    }
}
