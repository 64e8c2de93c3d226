//! `[generation]`: sampling and batching; SIGHUP changes it live.

use serde::{Deserialize, Serialize};

use super::{invalid, SettingsError};
use crate::sampling::SamplingParams;

/// `[generation]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGeneration {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub no_repeat_ngram: usize,
    pub candidates: usize,
    pub queue_depth: usize,
    pub max_batch: usize,
    pub max_prefill_tokens: usize,
    pub backend: Backend,
    pub timeout_ms: u64,
}

/// Where replies are generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process, by its own generation pool.
    Local,
    /// By `dialogd worker` processes, through Redis Streams.
    Redis,
}

/// The settings SIGHUP can change live (`backend` and `timeout_ms` need a
/// restart).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationSettings {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub no_repeat_ngram: usize,
    pub candidates: usize,
    pub queue_depth: usize,
    pub max_batch: usize,
    pub max_prefill_tokens: usize,
    pub backend: Backend,
    /// How long a daemon with `backend = "redis"` waits for a worker's
    /// answer (the request's deadline), in milliseconds.
    pub timeout_ms: u64,
}

impl GenerationSettings {
    /// Sampling parameters for one reply (a fresh seed each time).
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram: self.no_repeat_ngram,
            min_new_tokens: 0,
            max_new_tokens: self.max_new_tokens,
            seed: None,
        }
    }
}

impl RawGeneration {
    pub(super) fn validate(self) -> Result<GenerationSettings, SettingsError> {
        let g = GenerationSettings {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram: self.no_repeat_ngram,
            candidates: self.candidates,
            queue_depth: self.queue_depth,
            max_batch: self.max_batch,
            max_prefill_tokens: self.max_prefill_tokens,
            backend: self.backend,
            timeout_ms: self.timeout_ms,
        };
        if g.timeout_ms < 100 || g.timeout_ms > 600_000 {
            return Err(invalid("generation.timeout_ms", format!("{} is not in 100..=600000", g.timeout_ms)));
        }
        if g.max_new_tokens == 0 || g.max_new_tokens > 1000 {
            return Err(invalid("generation.max_new_tokens", format!("{} is not in 1..=1000", g.max_new_tokens)));
        }
        if !g.temperature.is_finite() || g.temperature < 0.0 {
            return Err(invalid("generation.temperature", format!("{} is not 0 (greedy) or positive", g.temperature)));
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return Err(invalid("generation.top_p", format!("{} is not in (0, 1]", g.top_p)));
        }
        if !g.repetition_penalty.is_finite() || g.repetition_penalty <= 0.0 {
            return Err(invalid("generation.repetition_penalty", format!("{} is not positive", g.repetition_penalty)));
        }
        if g.candidates == 0 || g.candidates > 16 {
            return Err(invalid("generation.candidates", format!("{} is not in 1..=16", g.candidates)));
        }
        if g.queue_depth == 0 {
            return Err(invalid("generation.queue_depth", "must be at least 1"));
        }
        if g.max_batch < g.candidates || g.max_batch > 256 {
            return Err(invalid("generation.max_batch", format!("{} is not in generation.candidates..=256", g.max_batch)));
        }
        if g.max_prefill_tokens == 0 || g.max_prefill_tokens > 65_536 {
            return Err(invalid("generation.max_prefill_tokens", format!("{} is not in 1..=65536", g.max_prefill_tokens)));
        }
        Ok(g)
    }
}
