//! dialogd's integration tests, in one binary to keep link time down.
//!
//! - `support`: fixtures, golden files, synthetic checkpoints, the binary.
//! - `parity`: the model runtime against outputs of Hugging Face transformers.
//! - `pool`: the generation pool (batching, candidates, refusals, cancellation, failures).
//! - `cli`: `dialogd generate` and `dialogd chat` as users run them, bad input included.
//! - `ranking`: DialogRPT and MMI against transformers, the ensemble, `dialogd rank`.
//! - `safety`: the filter on a labelled set, obfuscation, innocents, `dialogd moderate`.
//! - `training`: fine-tuning: forward parity, gradients, learning, checkpoints, LoRA, resume, opt-out.

mod cli;
mod parity;
mod pool;
mod ranking;
mod safety;
mod support;
mod training;
