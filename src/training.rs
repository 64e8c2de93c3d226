//! Fine-tuning DialoGPT (full or LoRA) in candle: data, a differentiable
//! GPT-2, AdamW, checkpoints, evaluation and the training loop.
//!
//! The objective is DialoGPT's (`prepro.py` / `LSP_train.py`): the turns of
//! a dialogue joined by `<|endoftext|>`, next-token loss on the response
//! turns only, never on the first turn. The parts, in the order a job meets
//! them:
//!
//! - [`data`]: our JSONL logs and the original DialoGPT TSV to dialogues
//!   (with the opt-out filter), dialogues to examples with per-token loss
//!   weights, the held-out split, padded batches with masks from lengths.
//! - [`model`]: [`model::TrainableGpt2`], GPT-2 built from differentiable
//!   ops only (candle's fused `layer_norm` and `softmax_last_dim` carry no
//!   gradient), with every weight a `Var` (full fine-tune) or frozen weights
//!   plus LoRA adapters.
//! - [`lora`]: LoRA settings, PEFT's adapter layout on disk, and serving a
//!   persona: an adapter readied for run time
//!   ([`crate::model::LoraRuntime`]) or merged into a [`crate::model::Gpt2`].
//! - [`optim`]: AdamW, the warm-up/decay schedule, global-norm clipping,
//!   with state that can be saved and restored.
//! - [`checkpoint`]: the Hugging Face checkpoint folder a job writes, and the
//!   resumable training state.
//! - [`eval`]: held-out loss and perplexity, the metrics file, the
//!   promotion gate.
//! - [`trainer`]: the loop that ties them together ([`trainer::train`]).
//! - [`progress`]: where a run stands (`progress.json`, written as it
//!   trains), shown as a line of text or a bar.

pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod lora;
pub mod model;
pub mod optim;
pub mod progress;
pub mod trainer;

use std::path::PathBuf;

pub use data::{Dialogue, Example, OptOut, Turn};
pub use eval::{gate, EvalMetrics, GateDecision};
pub use lora::{load_persona, load_runtime, LoraSettings};
pub use model::TrainableGpt2;
pub use progress::Progress;
pub use trainer::{train, TrainConfig, TrainLength, TrainSummary};

/// Everything that can go wrong while preparing data, training, or writing
/// and reading what training produces.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error("no training examples: {0}")]
    EmptyDataset(String),
    #[error("invalid training settings: {0}")]
    Settings(String),
    #[error("{path}: LoRA adapter: {message}")]
    Adapter { path: PathBuf, message: String },
    #[error("cannot resume from {path}: {message}")]
    Resume { path: PathBuf, message: String },
    #[error("the loss is not finite at step {step} ({loss}); lower --lr")]
    Diverged { step: usize, loss: f32 },
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for this module's results.
pub type Result<T> = std::result::Result<T, TrainingError>;

/// An I/O error on `path`, as a [`TrainingError`].
pub(crate) fn file_error(path: &std::path::Path, e: impl std::fmt::Display) -> TrainingError {
    TrainingError::File { path: path.to_path_buf(), message: e.to_string() }
}

/// splitmix64, the one pseudo-random source of training (shuffles, LoRA
/// initialisation), so a seed fixes a run on every platform.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_f64() * n as f64) as usize % n.max(1)
    }
}

/// FNV-1a, for stable content hashes (the held-out split).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3))
}
