//! MMI reranking with a reverse model, as in the DialoGPT paper.
//!
//! Zhang et al., "DialoGPT" (2020), §4: a GPT-2 trained on dialogues
//! reversed scores P(source | candidate), which favours candidates that
//! answer this context rather than any context ("I don't know"). Input:
//! `candidate <|endoftext|> source`, where the source is the context turns
//! **newest first**, each followed by `<|endoftext|>`; score = −mean NLL of
//! the source tokens (its separators included). Higher is better; scores
//! are ≤ 0.
//!
//! The order is the one the reverse models were trained on: the original
//! `prepro.py --reverse` (microsoft/DialoGPT) reverses the whole list of
//! turns `[context…, response]` before joining them, so the model reads the
//! response, then the turn it answered, then the one before that. A source
//! read oldest first is a sequence it never saw (single-turn contexts are
//! the same either way).

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use super::batch::PaddedBatch;
use super::dialogrpt::{check_candidates, check_turns};
use super::RankingError;
use crate::model::Gpt2;
use crate::prompt::build_prompt;

/// The MMI source for `turns` (oldest first): the newest turns that fit
/// `budget` tokens, as [`build_prompt`] keeps them (whole turns from the
/// newest back; a newest turn longer than the budget keeps its end), then
/// joined newest first, each followed by `eos`.
pub fn reverse_source(turns: &[Vec<u32>], eos: u32, budget: usize) -> Result<Vec<u32>, RankingError> {
    let forward = build_prompt(turns, eos, budget)?;
    if forward.truncated || forward.turns_kept == 1 {
        return Ok(forward.ids);
    }
    let newest_first: Vec<Vec<u32>> = turns[turns.len() - forward.turns_kept..].iter().rev().cloned().collect();
    Ok(build_prompt(&newest_first, eos, budget)?.ids)
}

/// A reverse DialoGPT (any GPT-2 language model checkpoint).
#[derive(Debug, Clone)]
pub struct MmiScorer {
    gpt2: Gpt2,
}

impl MmiScorer {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, RankingError> {
        Ok(Self { gpt2: Gpt2::load(dir, dtype, device)? })
    }

    pub fn new(gpt2: Gpt2) -> Self {
        Self { gpt2 }
    }

    /// −mean NLL of the source given each candidate, in one batched
    /// forward pass. The source loses its oldest turns (or a single long
    /// turn its beginning) to fit beside the longest candidate.
    pub fn scores(&self, turns: &[Vec<u32>], candidates: &[Vec<u32>]) -> Result<Vec<f32>, RankingError> {
        let cfg = self.gpt2.config();
        check_candidates(candidates, cfg.n_positions, cfg.vocab_size)?;
        check_turns(turns, cfg.vocab_size)?;
        let eos = cfg.eos_token_id;
        let longest = candidates.iter().map(Vec::len).max().unwrap_or(0);
        let source = reverse_source(turns, eos, cfg.n_positions - longest - 1)?;
        let mut seqs = Vec::with_capacity(candidates.len());
        let mut starts = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            // The candidate as a one-turn prompt: it and its separator.
            let mut seq = build_prompt(std::slice::from_ref(candidate), eos, candidate.len() + 1)?.ids;
            starts.push(seq.len());
            seq.extend_from_slice(&source);
            seqs.push(seq);
        }
        let batch = PaddedBatch::new(&seqs, eos, self.gpt2.dtype(), self.gpt2.device())?;
        let mut cache = self.gpt2.new_cache();
        let hidden = self.gpt2.hidden_states(&batch.ids, &batch.positions, Some(&batch.bias), &mut cache)?;
        let (b, t, e) = hidden.dims3()?;
        // Position p predicts token p + 1: gather the rows that predict the
        // source tokens, and those tokens.
        let (mut rows, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        for (idx, (seq, &start)) in seqs.iter().zip(&starts).enumerate() {
            for (pos, &token) in seq.iter().enumerate().skip(start) {
                rows.push((idx * t + pos - 1) as u32);
                targets.push(token);
                owner.push(idx);
            }
        }
        let device = self.gpt2.device();
        let picked = hidden.reshape((b * t, e))?.index_select(&Tensor::new(rows, device)?, 0)?;
        let log_probs = candle_nn::ops::log_softmax(&self.gpt2.lm_head(&picked)?, D::Minus1)?;
        let n = targets.len();
        let chosen: Vec<f32> = log_probs.gather(&Tensor::from_vec(targets, (n, 1), device)?, 1)?.flatten_all()?.to_vec1()?;
        let mut sums = vec![0f64; b];
        let mut counts = vec![0usize; b];
        for (value, idx) in chosen.into_iter().zip(owner) {
            sums[idx] += value as f64;
            counts[idx] += 1;
        }
        Ok(sums.iter().zip(&counts).map(|(s, &c)| (s / c as f64) as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 50256;

    #[test]
    fn the_source_is_newest_first_within_the_budget() {
        let turns = [vec![1, 2, 3], vec![4], vec![5, 6]];
        assert_eq!(reverse_source(&turns, EOS, 100).unwrap(), vec![5, 6, EOS, 4, EOS, 1, 2, 3, EOS]);
        // The oldest turn does not fit: the two newest, newest first.
        assert_eq!(reverse_source(&turns, EOS, 8).unwrap(), vec![5, 6, EOS, 4, EOS]);
        // A newest turn longer than the budget keeps its end, alone.
        assert_eq!(reverse_source(&turns, EOS, 2).unwrap(), vec![6, EOS]);
        assert_eq!(reverse_source(&[vec![7, 8]], EOS, 10).unwrap(), vec![7, 8, EOS]);
        assert!(reverse_source(&[], EOS, 10).is_err());
    }
}
