//! DialogRPT: a GPT-2 that scores how a reply will be received.
//!
//! Gao et al., "Dialogue Response Ranking Training with Large-Scale Human
//! Feedback Data" (EMNLP 2020). The checkpoints (`microsoft/DialogRPT-updown`,
//! `-depth`, `-width`, `-human-vs-rand`, `-human-vs-machine`) are
//! `GPT2ForSequenceClassification`: GPT-2 plus `score.weight` `[1, n_embd]`
//! with no bias. Input: the context turns each followed by `<|endoftext|>`,
//! then the candidate with no separator after it; score = sigmoid(logit at
//! the candidate's last token). That position is indexed from the lengths:
//! transformers releases that located it by looking for the pad id (50256,
//! also the turn separator) gave every candidate the same score.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::batch::PaddedBatch;
use super::RankingError;
use crate::model::gpt2::read_config;
use crate::model::weights::{TensorStore, WeightsFile};
use crate::model::{Gpt2, Gpt2Config, ModelError};
use crate::prompt::build_prompt;

/// One DialogRPT head.
///
/// Cloning is cheap: the weights are reference-counted and shared.
#[derive(Debug, Clone)]
pub struct DialogRpt {
    gpt2: Gpt2,
    /// `score.weight` transposed, `[n_embd, 1]`.
    score_t: Tensor,
    /// Where it was loaded from (for messages and logs).
    source: PathBuf,
}

impl DialogRpt {
    /// Loads a checkpoint folder (`config.json` and `model.safetensors` or
    /// `pytorch_model.bin` holding `transformer.*` and `score.weight`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, RankingError> {
        if !dir.is_dir() {
            return Err(ModelError::MissingFolder(dir.to_path_buf()).into());
        }
        let config = read_config(dir)?;
        let weights = WeightsFile::find(dir)?;
        let mut store = TensorStore::load(&weights, dtype, device)?;
        let ranker = Self::from_store(config, &mut store, device, weights.display_path())?;
        let leftover = store.leftover();
        if !leftover.is_empty() {
            tracing::debug!(file = %weights.display_path().display(), ?leftover, "tensors not used by DialogRPT");
        }
        Ok(ranker)
    }

    /// Builds a ranker from a store, taking GPT-2's tensors and the head.
    pub fn from_store(config: Gpt2Config, store: &mut TensorStore, device: &Device, source: &Path) -> Result<Self, RankingError> {
        if !store.contains("score.weight") {
            return Err(RankingError::NotARanker {
                path: source.to_path_buf(),
                message: "no `score.weight` (a DialogRPT checkpoint is GPT2ForSequenceClassification; this looks like a language model)".into(),
            });
        }
        if store.contains("score.bias") {
            return Err(RankingError::NotARanker {
                path: source.to_path_buf(),
                message: "has `score.bias`; DialogRPT's head has no bias".into(),
            });
        }
        let n_embd = config.n_embd;
        let gpt2 = Gpt2::from_store(config, store, device)?;
        let score = store.take("score.weight", &[1, n_embd])?;
        Ok(Self { gpt2, score_t: score.t()?.contiguous()?, source: source.to_path_buf() })
    }

    pub fn config(&self) -> &Gpt2Config {
        self.gpt2.config()
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The input sequences: the context (turns each followed by the
    /// separator, oldest turns dropped to fit) and each candidate after it.
    pub fn sequences(&self, turns: &[Vec<u32>], candidates: &[Vec<u32>]) -> Result<Vec<Vec<u32>>, RankingError> {
        let context = self.context(turns, candidates)?;
        Ok(candidates
            .iter()
            .map(|candidate| {
                let mut seq = context.clone();
                seq.extend_from_slice(candidate);
                seq
            })
            .collect())
    }

    /// The checked context prompt that fits beside the longest candidate.
    fn context(&self, turns: &[Vec<u32>], candidates: &[Vec<u32>]) -> Result<Vec<u32>, RankingError> {
        let cfg = self.gpt2.config();
        check_candidates(candidates, cfg.n_positions, cfg.vocab_size)?;
        check_turns(turns, cfg.vocab_size)?;
        let longest = candidates.iter().map(Vec::len).max().unwrap_or(0);
        let context = build_prompt(turns, cfg.eos_token_id, cfg.n_positions - longest)?;
        if context.turns_kept < turns.len() || context.truncated {
            tracing::debug!(kept = context.turns_kept, given = turns.len(), "ranker context cut to fit");
        }
        Ok(context.ids)
    }

    /// Raw logits of every candidate: the context runs once, then all
    /// candidates continue it side by side in one batched pass (right
    /// padding, masks from lengths). The same numbers as
    /// [`DialogRpt::logits_full_batch`] for less work: the context is not
    /// recomputed for every candidate.
    pub fn logits(&self, turns: &[Vec<u32>], candidates: &[Vec<u32>]) -> Result<Vec<f32>, RankingError> {
        let context = self.context(turns, candidates)?;
        let cfg = self.gpt2.config();
        let device = self.gpt2.device();
        let mut cache = self.gpt2.new_cache();
        let c = context.len();
        let ids = Tensor::new(context.as_slice(), device)?.unsqueeze(0)?;
        let positions = Tensor::arange(0u32, c as u32, device)?.unsqueeze(0)?;
        let bias = crate::model::gpt2::causal_bias(c, 0, self.gpt2.dtype(), device)?;
        self.gpt2.hidden_states(&ids, &positions, Some(&bias), &mut cache)?;
        let mut cache = cache.repeat_batch(candidates.len())?;
        let batch = PaddedBatch::new(candidates, cfg.eos_token_id, self.gpt2.dtype(), device)?;
        // Every candidate sees the whole context, then its own tokens
        // causally: [n, 1, width, c + width].
        let context_part = Tensor::zeros((candidates.len(), 1, batch.width, c), self.gpt2.dtype(), device)?;
        let bias = Tensor::cat(&[&context_part, &batch.bias], 3)?;
        let positions = Tensor::arange(c as u32, (c + batch.width) as u32, device)?.unsqueeze(0)?.repeat((candidates.len(), 1))?;
        let hidden = self.gpt2.hidden_states(&batch.ids, &positions, Some(&bias), &mut cache)?;
        self.pick(&hidden, &batch)
    }

    /// Raw logits of every candidate in a single forward pass over
    /// `context + candidate` rows (the context computed once per row).
    pub fn logits_full_batch(&self, turns: &[Vec<u32>], candidates: &[Vec<u32>]) -> Result<Vec<f32>, RankingError> {
        let seqs = self.sequences(turns, candidates)?;
        self.logits_of_sequences(&seqs)
    }

    /// Scores in (0, 1) of every candidate, in one batched forward pass.
    pub fn scores(&self, turns: &[Vec<u32>], candidates: &[Vec<u32>]) -> Result<Vec<f32>, RankingError> {
        Ok(self.logits(turns, candidates)?.into_iter().map(sigmoid).collect())
    }

    /// Logits at the last token of each full input sequence (context and
    /// candidate already joined), right-padded into one batch.
    pub fn logits_of_sequences(&self, seqs: &[Vec<u32>]) -> Result<Vec<f32>, RankingError> {
        let cfg = self.gpt2.config();
        let batch = PaddedBatch::new(seqs, cfg.eos_token_id, self.gpt2.dtype(), self.gpt2.device())?;
        if batch.width > cfg.n_positions {
            return Err(RankingError::Input(format!("{} tokens exceed the ranker's context of {}", batch.width, cfg.n_positions)));
        }
        let mut cache = self.gpt2.new_cache();
        let hidden = self.gpt2.hidden_states(&batch.ids, &batch.positions, Some(&batch.bias), &mut cache)?;
        self.pick(&hidden, &batch)
    }

    /// The head applied to each row's last real token (indexed from the
    /// lengths, never found by token value).
    fn pick(&self, hidden: &Tensor, batch: &PaddedBatch) -> Result<Vec<f32>, RankingError> {
        let (b, t, e) = hidden.dims3()?;
        let last = Tensor::new(batch.last_positions(), self.gpt2.device())?;
        let picked = hidden.reshape((b * t, e))?.index_select(&last, 0)?;
        let logits = picked.matmul(&self.score_t)?.to_dtype(DType::F32)?.flatten_all()?;
        Ok(logits.to_vec1()?)
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Candidates must be non-empty, leave room for some context and hold ids
/// of the vocabulary.
pub(crate) fn check_candidates(candidates: &[Vec<u32>], n_positions: usize, vocab_size: usize) -> Result<(), RankingError> {
    if candidates.is_empty() {
        return Err(RankingError::NoCandidates);
    }
    for (idx, candidate) in candidates.iter().enumerate() {
        if candidate.is_empty() {
            return Err(RankingError::EmptyCandidate(idx + 1));
        }
        // At least one context token and its separator must fit as well.
        if candidate.len() + 2 > n_positions {
            return Err(RankingError::CandidateTooLong { idx: idx + 1, len: candidate.len(), max: n_positions - 2 });
        }
        if let Some(&bad) = candidate.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(RankingError::Input(format!("candidate {}: token id {bad} is outside the vocabulary", idx + 1)));
        }
    }
    Ok(())
}

/// Context turns must hold ids of the vocabulary (emptiness and the budget
/// are `build_prompt`'s to check).
pub(crate) fn check_turns(turns: &[Vec<u32>], vocab_size: usize) -> Result<(), RankingError> {
    for (idx, turn) in turns.iter().enumerate() {
        if let Some(&bad) = turn.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(RankingError::Input(format!("turn {}: token id {bad} is outside the vocabulary", idx + 1)));
        }
    }
    Ok(())
}
