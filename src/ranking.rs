//! Ranking candidate replies: DialogRPT, MMI, and screening.
//!
//! The generator draws several candidates; this module decides which one is
//! sent. The pipeline calls, in order:
//!
//! - [`degeneration::screen`]: drop empty candidates, repeats of the bot's
//!   recent turns, verbatim echoes of the user and duplicates.
//! - [`Ensemble::scores`]: the DialogRPT heads ([`DialogRpt`]), each scoring
//!   all candidates in one batched forward pass, combined as
//!   prior × cond.
//! - [`MmiScorer::scores`] (optional): the DialoGPT paper's reverse model.
//! - [`Weights::mix`]: one number per candidate.
//! - [`select::choose`]: the reply to send: a finished candidate (one that
//!   ended with `<|endoftext|>`) before a cut-off one, then the highest
//!   score.
//!
//! [`spec`] parses the `[HEAD=]DIR[:WEIGHT]` ranker specs of the settings
//! and the CLI.
//!
//! Everything takes token ids (context turns without separators, candidates
//! as generated, without their end-of-text); separators are placed by
//! [`crate::prompt::build_prompt`] only.

pub mod batch;
pub mod degeneration;
pub mod dialogrpt;
pub mod ensemble;
pub mod mmi;
pub mod select;
pub mod spec;

use std::path::PathBuf;

pub use dialogrpt::DialogRpt;
pub use ensemble::{Ensemble, EnsembleScores, Group, Head, Member, Weights};
pub use mmi::MmiScorer;
pub use spec::{parse_ranker, RankerSpec, SpecError};

use crate::model::ModelError;
use crate::prompt::PromptError;

/// Ranking failures.
#[derive(Debug, thiserror::Error)]
pub enum RankingError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: not a DialogRPT checkpoint: {message}")]
    NotARanker { path: PathBuf, message: String },
    #[error("no candidates to rank")]
    NoCandidates,
    #[error("candidate {0} is empty")]
    EmptyCandidate(usize),
    #[error("candidate {idx} has {len} tokens; at most {max} fit beside a context")]
    CandidateTooLong { idx: usize, len: usize, max: usize },
    #[error("context: {0}")]
    Prompt(#[from] PromptError),
    #[error("ensemble: {0}")]
    Ensemble(String),
    #[error("input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
