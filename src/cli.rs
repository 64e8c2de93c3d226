//! The `dialogd` command line: argument types and the commands behind them.
//!
//! - [`generate`]: `dialogd generate`, one reply to turns given as arguments.
//! - [`chat`]: `dialogd chat`, a console conversation through the daemon's pipeline.
//! - [`bench`]: `dialogd bench`, the generation pool's speed.
//! - [`rank`]: `dialogd rank`, DialogRPT (and MMI) scores of candidate replies.
//! - [`moderate`]: `dialogd moderate`, the safety filter's verdict on a text.
//! - [`run`]: `dialogd run`, the daemon, and `dialogd check-config`.
//! - [`train`]: `dialogd train`, fine-tuning (full or a LoRA persona adapter).
//! - [`jobs`]: `dialogd jobs`, the daemon's fine-tuning jobs (list, run,
//!   cancel, rollback).
//! - [`manual`]: `dialogd completions` and `dialogd man`, from the same
//!   definitions as the parser ([`command`]).

pub mod bench;
pub mod chat;
pub mod generate;
pub mod jobs;
pub mod manual;
pub mod moderate;
pub mod rank;
pub mod run;
pub mod train;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use crate::model::Gpt2;
use crate::serving::{self, ModelSpec};
use crate::sampling::SamplingParams;
use crate::tokenizer::DialogTokenizer;

use crate::prompt::MAX_TURN_BYTES;

#[derive(Debug, Parser)]
#[command(name = "dialogd", version, about = "DialoGPT chat bot daemon", propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate one reply to the given turns (oldest first).
    Generate(generate::GenerateArgs),
    /// Talk with the bot in the console, through the daemon's pipeline.
    Chat(chat::ChatArgs),
    /// Measure the generation pool: time to first token and tokens/s.
    Bench(bench::BenchArgs),
    /// Score candidate replies to the given turns with DialogRPT.
    Rank(rank::RankArgs),
    /// Check a text with the safety filter.
    Moderate(moderate::ModerateArgs),
    /// Run the daemon (until SIGTERM or SIGINT; SIGHUP reloads [generation]).
    Run(run::RunArgs),
    /// Validate the settings and print them, secrets redacted.
    CheckConfig(run::RunArgs),
    /// Generate for daemons with `[generation] backend = "redis"`: load
    /// [model], take requests from the Redis stream {context.key_prefix}:gen:requests
    /// (consumer group "generation") and answer them, until SIGTERM or SIGINT
    /// (then finish what was taken). Run several, on any hosts. Persona
    /// adapters are fetched from Redis by content hash into
    /// worker.cache_dir; with [jobs] enabled, promoted base models are
    /// loaded from jobs.artifacts_dir (a shared folder) as they change.
    Worker(run::RunArgs),
    /// The settings' documentation: `config defaults` prints every key.
    Config(run::ConfigArgs),
    /// Fine-tune a model, or a LoRA persona adapter, on dialogue files.
    Train(train::TrainArgs),
    /// The daemon's fine-tuning jobs: list, show, run, cancel, rollback.
    Jobs(jobs::JobsArgs),
    /// Print a shell completion script (bash, zsh or fish) on stdout.
    Completions(manual::CompletionsArgs),
    /// Print the manual page (roff) on stdout, or write one per command.
    Man(manual::ManArgs),
}

/// Where the model comes from and where it runs.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A checkpoint folder, or a hub id such as microsoft/DialoGPT-medium.
    #[arg(long, value_name = "M")]
    pub model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "D")]
    pub device: String,
    /// auto (f32 on CPU, bf16 on GPU), f32, f16 or bf16.
    #[arg(long, default_value = "auto", value_name = "T")]
    pub dtype: String,
    /// Weights for the projections and head: auto (8-bit on the CPU where
    /// they fit, as loaded on a GPU), none (as loaded: exactly
    /// transformers' numbers) or q8 (8-bit, CPU).
    #[arg(long, default_value = "auto", value_name = "auto|none|q8")]
    pub quantize: String,
    /// What each sequence's key/value cache holds: auto (f16 on CPU, the
    /// model's dtype on a GPU), f32 (exactly transformers' numbers), f16, or
    /// q8 (8 bits and a scale per row, CPU).
    #[arg(long, default_value = "auto", value_name = "auto|f32|f16|q8")]
    pub kv_cache: String,
}

/// Sampling flags; anything not given keeps the mode's default (the
/// defaults [`command`] shows in `--help` are [`SamplingParams::default`]'s,
/// which are `[generation]`'s defaults).
#[derive(Debug, Clone, Default, Args)]
pub struct SamplingArgs {
    /// Always take the most likely token; the other sampling flags not
    /// given are then off.
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub greedy: bool,
    /// Sampling temperature (0: greedy).
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens with probability P (1: all).
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Penalty for tokens already seen (1: none).
    #[arg(long, value_name = "R")]
    pub repetition_penalty: Option<f32>,
    /// Never repeat an n-gram of this size (0: off).
    #[arg(long, value_name = "N")]
    pub no_repeat_ngram: Option<usize>,
    /// Generate at least N tokens before end-of-text is allowed.
    #[arg(long, value_name = "N")]
    pub min_new_tokens: Option<usize>,
    /// The longest reply, in tokens.
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// The same seed gives the same reply.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The effective parameters: greedy mode turns every processor off
    /// unless asked for; sampling mode starts from the chat defaults.
    pub fn params(&self) -> anyhow::Result<SamplingParams> {
        let base = if self.greedy { SamplingParams::greedy(SamplingParams::default().max_new_tokens) } else { SamplingParams::default() };
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_k: self.top_k.unwrap_or(base.top_k),
            top_p: self.top_p.unwrap_or(base.top_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(base.repetition_penalty),
            no_repeat_ngram: self.no_repeat_ngram.unwrap_or(base.no_repeat_ngram),
            min_new_tokens: self.min_new_tokens.unwrap_or(base.min_new_tokens),
            max_new_tokens: self.max_new_tokens.unwrap_or(base.max_new_tokens),
            seed: self.seed,
        };
        params.validate()?;
        Ok(params)
    }
}

pub use crate::serving::Loaded;

/// The command line's definition: [`Cli`]'s, with the effective default of
/// each optional sampling flag ([`SamplingParams::default`]) in its help,
/// as clap shows a `default_value`. The parser, `completions` and `man`
/// all use this one.
pub fn command() -> clap::Command {
    let d = SamplingParams::default();
    let defaults = [
        ("temperature", d.temperature.to_string()),
        ("top_k", d.top_k.to_string()),
        ("top_p", d.top_p.to_string()),
        ("repetition_penalty", d.repetition_penalty.to_string()),
        ("no_repeat_ngram", d.no_repeat_ngram.to_string()),
        ("min_new_tokens", d.min_new_tokens.to_string()),
        ("max_new_tokens", d.max_new_tokens.to_string()),
    ];
    let mut cli = Cli::command();
    let sampling: Vec<String> = cli
        .get_subcommands()
        .filter(|sub| sub.get_arguments().any(|a| a.get_id() == "temperature"))
        .map(|sub| sub.get_name().to_string())
        .collect();
    for name in sampling {
        cli = cli.mut_subcommand(name, |mut sub| {
            for (id, value) in &defaults {
                sub = sub.mut_arg(*id, |arg| {
                    let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                    arg.help(format!("{help} [default: {value}]"))
                });
            }
            sub
        });
    }
    cli
}

impl ModelArgs {
    /// The flags as a serving spec.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            model: self.model.clone(),
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            quantize: self.quantize.clone(),
            kv_cache: self.kv_cache.clone(),
        }
    }
}

/// Resolves, loads and checks a model and its tokenizer
/// ([`crate::serving::load`]), saying what it does on stderr with
/// `progress`.
pub fn load(args: &ModelArgs, progress: bool) -> anyhow::Result<Loaded> {
    let started = Instant::now();
    if progress {
        eprintln!("loading {} ({} on {})…", args.model, args.dtype, args.device);
    }
    let loaded = serving::load(&args.spec()).map_err(|e| match e {
        // On the command line the options are flags.
        serving::ServingError::Options(what) => anyhow::anyhow!("--{what}").context("bad model options"),
        other => other.into(),
    })?;
    if progress {
        let cfg = loaded.model.config();
        eprintln!(
            "ready: {:.0}M parameters, {} layers, context {} tokens, loaded in {:.1}s",
            cfg.n_params() as f64 / 1e6,
            cfg.n_layer,
            cfg.n_positions,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(loaded)
}

/// Encodes a turn, in the form every path gives it
/// ([`crate::prompt::normalize_turn`]), after checking it is not empty or
/// oversized.
pub fn encode_turn(tokenizer: &DialogTokenizer, turn_no: usize, text: &str) -> anyhow::Result<Vec<u32>> {
    if text.trim().is_empty() {
        anyhow::bail!("turn {turn_no} is empty");
    }
    if text.len() > MAX_TURN_BYTES {
        anyhow::bail!("turn {turn_no} is {} bytes, more than the {MAX_TURN_BYTES} a turn may have", text.len());
    }
    tokenizer.encode(&crate::prompt::normalize_turn(text)).with_context(|| format!("turn {turn_no}"))
}

/// The prompt budget: the model's context less the room for the reply.
pub fn prompt_budget(model: &Gpt2, params: &SamplingParams) -> anyhow::Result<usize> {
    let n_positions = model.config().n_positions;
    if params.max_new_tokens + 2 > n_positions {
        anyhow::bail!(
            "--max-new-tokens {} leaves no room for a prompt in a context of {n_positions} tokens",
            params.max_new_tokens
        );
    }
    Ok(n_positions - params.max_new_tokens)
}

/// Sets up logging to stderr, filtered by `RUST_LOG` (default: warnings,
/// and a hub download's progress).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,dialogd::model::hub=info".into());
    use std::io::IsTerminal as _;
    // Colours only on a terminal.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Fixes `RAYON_NUM_THREADS` (when unset) to rayon's own default, the
/// number of logical CPUs, before any thread starts.
///
/// candle asks for its thread count on every matrix product, and when
/// `RAYON_NUM_THREADS` is unset the answer comes from re-reading
/// `/proc/cpuinfo` (`num_cpus::get_physical`, not cached): per attention
/// product, per sequence, per layer. Measured on `dialogd bench --quantize
/// q8` (2 vCPUs): about +30% tokens/s at 1, 8 and 32 concurrent requests.
/// rayon's pool, which the kernels use, keeps its size; candle's own pools
/// follow it (logical rather than physical CPUs, the same on machines
/// without SMT).
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Single-threaded still: nothing reads the environment concurrently.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

/// Keeps candle's element-wise thread pool to the calling thread (when
/// `CANDLE_NUM_THREADS` is unset) for the commands that serve a model.
///
/// candle splits element-wise ops of 64K values or more (bias and residual
/// adds of a prefill or a batched step) over its own "barrier pool", whose
/// workers spin for 25,000 iterations after each op and whose caller spins
/// until they finish. Beside the rayon pool that runs the products and
/// attention, on few cores the spinners take turns off the workers doing
/// the real work (measured with `dialogd bench --quantize q8` on 2 vCPUs:
/// batch-1 time to first token 31-110 ms with the pool, a steady 33-35 ms
/// without; see BENCHMARKS.md). Training (`dialogd train`), whose big
/// element-wise ops are most of its work, keeps candle's default.
fn pin_candle_pool(command: &Command) {
    if !matches!(command, Command::Train(_)) && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Single-threaded still: no thread has been started.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Runs the command line; errors are reported once, here.
pub fn main() -> ExitCode {
    pin_thread_count();
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    pin_candle_pool(&cli.command);
    // The daemon sets up its own logging from its settings.
    if !matches!(cli.command, Command::Run(_) | Command::Worker(_)) {
        init_tracing();
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Rank(args) => rank::run(args),
        Command::Moderate(args) => moderate::run(args),
        Command::Run(args) => run::run(args),
        Command::CheckConfig(args) => run::check_config(args),
        Command::Worker(args) => run::worker(args),
        Command::Config(args) => run::config(args),
        Command::Train(args) => train::run(args),
        Command::Jobs(args) => jobs::run(args),
        Command::Completions(args) => manual::completions(args),
        Command::Man(args) => manual::man(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: a layer whose
/// text already holds its cause's (`#[error("key: {0}")]` over a
/// `#[source]`, or a cause's own text carried in a string) is not followed
/// by that text again.
fn report(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let shown = cause.to_string();
        if text.contains(&shown) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&shown);
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("store unavailable: {0}")]
    struct Inner(String);

    #[derive(Debug, thiserror::Error)]
    #[error("context.redis_url: {0}")]
    struct Outer(#[source] Inner);

    #[test]
    fn a_cause_already_shown_is_not_repeated() {
        let err = anyhow::Error::new(Outer(Inner("\"redis://h/x\" cannot be used: Invalid database number".into())));
        assert_eq!(format!("{err:#}").matches("Invalid database number").count(), 2, "anyhow's own chain repeats it");
        assert_eq!(
            super::report(&err),
            "context.redis_url: store unavailable: \"redis://h/x\" cannot be used: Invalid database number"
        );
        let err = anyhow::Error::new(Inner("down".into())).context("starting the daemon");
        assert_eq!(super::report(&err), "starting the daemon: store unavailable: down");
    }

    /// Every flag and argument of every command says what it is for.
    #[test]
    fn every_flag_has_a_description() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::command(), "dialogd", &mut missing);
        assert!(missing.is_empty(), "flags without a description: {missing:?}");
    }
}
