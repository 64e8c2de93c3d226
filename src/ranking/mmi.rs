//! MMI reranking with a reverse model, as in the DialoGPT paper.
//!
//! Zhang et al., "DialoGPT" (2020), §4: a GPT-2 trained on dialogues
//! reversed scores P(source | candidate), which favours candidates that
//! answer this context rather than any context ("I don't know"). Input:
//! `candidate <|endoftext|> source`, where the source is the context turns
//! each followed by `<|endoftext|>`; score = −mean NLL of the source tokens
//! (its separators included). Higher is better; scores are ≤ 0.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use super::batch::PaddedBatch;
use super::dialogrpt::{check_candidates, check_turns};
use super::RankingError;
use crate::model::Gpt2;
use crate::prompt::build_prompt;

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
        let source = build_prompt(turns, eos, cfg.n_positions - longest - 1)?;
        let mut seqs = Vec::with_capacity(candidates.len());
        let mut starts = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            // The candidate as a one-turn prompt: it and its separator.
            let mut seq = build_prompt(std::slice::from_ref(candidate), eos, candidate.len() + 1)?.ids;
            starts.push(seq.len());
            seq.extend_from_slice(&source.ids);
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
