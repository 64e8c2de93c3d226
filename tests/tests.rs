//! dialogd's integration tests, in one binary to keep link time down.
//!
//! - `support`: fixtures, golden files, synthetic checkpoints, the binary.
//! - `parity`: the model runtime against outputs of Hugging Face transformers.
//! - `classifier`: the safety classifier (BERT, RoBERTa, XLM-R, DistilBERT)
//!   against transformers, long texts in windows, batching, broken folders.
//! - `quality`: safety and ranking end to end through the daemon's HTTP adapter.
//! - `pool`: the generation pool (batching, candidates, refusals, cancellation, failures).
//! - `cli`: `dialogd generate` and `dialogd chat` as users run them, bad input included.
//! - `legacy`: legacy (pre-1.6) `torch.save` files: tensors, views, refusals, commands.
//! - `ranking`: DialogRPT and MMI against transformers, the ensemble, `dialogd rank`.
//! - `safety`: the filter on a labelled set, obfuscation, innocents, `dialogd moderate`.
//! - `context`: the Redis context store against a real redis-server.
//! - `http`: the daemon in-process over loopback HTTP: API, commands,
//!   duplicates, order, rate limits, Redis outages, a load run.
//! - `openai`: the OpenAI-compatible API over loopback HTTP: models,
//!   completions, `n`, stop strings, the filter, errors, streaming.
//! - `daemon`: the `dialogd run` binary: settings, restarts, signals, logs.
//! - `operator`: the operator's path as the README writes it (the shipped
//!   example checked with the install section's own commands).
//! - `jobs`: fine-tuning jobs through the daemon: /train, the gate,
//!   promotion under load, rollback, failures, kills, cancels, schedules.
//! - `persona_runtime`: LoRA persona adapters applied per sequence at run
//!   time: against the merged persona, mixed batches, refusals, 8-bit, CLI.
//! - `training`: fine-tuning: forward parity, gradients, learning, checkpoints, LoRA, resume, opt-out.
//! - `floors`: the crate's module floors and the absence of import cycles.
//! - `fakes`: loopback fakes of the Telegram Bot API and of Discord.
//! - `telegram`: the Telegram adapter (teloxide) against the fake Bot API.
//! - `discord`: the Discord adapter (serenity) against the fake Discord.
//! - `remote`: generation over Redis Streams: a daemon, workers in process
//!   and as processes, a killed worker, deadlines and a full stream.
//! - `variants`: config.json and PEFT adapter_config.json variants against
//!   transformers' and PEFT's logits, and the fields refused by name.

mod classifier;
mod cli;
mod context;
mod daemon;
mod discord;
mod fakes;
mod floors;
mod http;
mod jobs;
mod legacy;
mod openai;
mod operator;
mod parity;
mod persona_runtime;
mod pool;
mod quality;
mod remote;
mod ranking;
mod safety;
mod support;
mod training;
mod telegram;
mod variants;
