//! dialogd: a chat bot daemon that serves DialoGPT to Discord and Telegram.
//!
//! The crate is the daemon's core; platform code lives in the
//! `dialogd-adapters` crate. Modules, in the order a message meets them:
//!
//! - [`tokenizer`]: GPT-2 byte-level BPE; user text never becomes a special token.
//! - [`prompt`]: turns joined by `<|endoftext|>` within a token budget.
//! - [`model`]: GPT-2 in candle, checkpoint loading, the hub.
//! - [`sampling`]: greedy, temperature, top-k/p, repetition controls, seeds.
//! - [`serving`]: the one loader of a model to serve, one device per process.
//! - [`generate`]: one reply from one prompt with a KV cache.
//! - [`pool`]: the generation pool: continuous batching across channels.
//! - [`collect`]: consented log collection for fine-tuning.
//! - [`safety`]: the toxicity filter for turns in and candidates out.
//! - [`ranking`]: DialogRPT and MMI reranking of candidates, screening.
//! - [`context`]: each channel's recent turns (Redis, or memory).
//! - [`personas`]: which persona a channel speaks as (Redis or memory), its prompt.
//! - [`pipeline`]: the path of one message, and the door to generation.
//! - [`settings`]: layered raw settings validated into typed ones.
//! - [`cron`]: five-field cron expressions for the job schedules.
//! - [`telemetry`]: logs and Prometheus metrics.
//! - [`daemon`]: start, serve, drain, reload.
//! - [`training`]: fine-tuning (full or LoRA persona adapters), evaluation gate.
//! - [`cli`]: the `dialogd` command line.
//!
//! See ARCHITECTURE.md for the whole picture and its invariants.

pub mod cli;
pub mod collect;
pub mod context;
pub mod cron;
pub mod daemon;
pub mod generate;
pub mod jobs;
pub mod model;
pub mod pool;
pub mod personas;
pub mod pipeline;
pub mod prompt;
pub mod remote;
pub mod ranking;
pub mod safety;
pub mod sampling;
pub mod serving;
pub mod settings;
pub mod telemetry;
pub mod tokenizer;
pub mod training;
