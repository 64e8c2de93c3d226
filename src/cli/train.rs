//! `dialogd train`: fine-tune a model (or a LoRA persona adapter) on
//! dialogue files and write a Hugging Face checkpoint folder.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{ArgGroup, Args};

use crate::model;
use crate::training::{self, LoraSettings, OptOut, TrainConfig, TrainLength};

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("length").args(["epochs", "steps"])))]
pub struct TrainArgs {
    /// The base model: a checkpoint folder or a hub id.
    #[arg(long, value_name = "M")]
    pub base: String,
    /// Dialogue files: JSONL (`{"turns": [...]}` per line) or DialoGPT TSV.
    #[arg(long, value_name = "PATH", num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Output folder: the checkpoint (or adapter), metrics.json, and
    /// resumable state while training.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Passes over the training set (default 1).
    #[arg(long, value_name = "N")]
    pub epochs: Option<f64>,
    /// Optimizer steps (instead of --epochs).
    #[arg(long, value_name = "N")]
    pub steps: Option<usize>,
    /// Peak learning rate (after warm-up; decays linearly to 0).
    #[arg(long, value_name = "LR", default_value_t = 5e-5)]
    pub lr: f64,
    /// Examples per micro-batch.
    #[arg(long, value_name = "B", default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub grad_accum: usize,
    /// Longest example, in tokens (longer dialogues lose their oldest turns;
    /// capped at the model's context).
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub max_seq_len: usize,
    /// Train a LoRA adapter of this rank instead of every weight.
    #[arg(long, value_name = "R")]
    pub lora_rank: Option<usize>,
    /// LoRA scale numerator (the update is scaled by alpha / rank); default 2 × rank.
    #[arg(long, value_name = "A", requires = "lora_rank")]
    pub lora_alpha: Option<f64>,
    /// Share of examples held out for evaluation.
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub eval_fraction: f64,
    /// cpu, cuda or cuda:N.
    #[arg(long, value_name = "D", default_value = "cpu")]
    pub device: String,
    /// Seed for the data order and LoRA initialisation.
    #[arg(long, value_name = "S", default_value_t = 42)]
    pub seed: u64,
    /// Warm-up steps (default: 10% of the steps).
    #[arg(long, value_name = "N")]
    pub warmup_steps: Option<usize>,
    /// Clip the global gradient norm to this (0: off).
    #[arg(long, value_name = "X", default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// AdamW weight decay on weight matrices.
    #[arg(long, value_name = "X", default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Write resumable state every N steps (0: never).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub checkpoint_every: usize,
    /// Continue the run from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// A file of author hashes (one per line) whose lines are never used.
    #[arg(long, value_name = "FILE")]
    pub opt_out: Option<PathBuf>,
    /// Promotion gate: the allowed relative rise of held-out perplexity.
    #[arg(long, value_name = "X", default_value_t = 0.0)]
    pub max_ppl_regression: f64,
    /// Keep this JSON file current while training: step, total_steps,
    /// loss, tokens_per_s, eta_s, updated (replaced whole about once a
    /// second; the daemon's jobs read it).
    #[arg(long, value_name = "FILE")]
    pub progress_file: Option<PathBuf>,
    /// Print the summary as one JSON line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let device = crate::serving::device(&args.device)?;
    let base = model::hub::resolve_model(&args.base)?;
    let opt_out = match &args.opt_out {
        Some(path) => OptOut::from_file(path).with_context(|| "reading --opt-out")?,
        None => OptOut::default(),
    };
    let mut config = TrainConfig::new(base, args.data.clone(), args.out.clone());
    config.base_name = args.base.clone();
    config.length = match (args.epochs, args.steps) {
        (_, Some(steps)) => TrainLength::Steps(steps),
        (Some(epochs), None) => TrainLength::Epochs(epochs),
        (None, None) => TrainLength::Epochs(1.0),
    };
    config.lr = args.lr;
    config.batch_size = args.batch_size;
    config.grad_accum = args.grad_accum;
    config.max_seq_len = args.max_seq_len;
    config.lora = args.lora_rank.map(|rank| LoraSettings { rank, alpha: args.lora_alpha.unwrap_or(2.0 * rank as f64) });
    config.eval_fraction = args.eval_fraction;
    config.seed = args.seed;
    config.warmup_steps = args.warmup_steps;
    config.max_grad_norm = args.max_grad_norm;
    config.weight_decay = args.weight_decay;
    config.checkpoint_every = args.checkpoint_every;
    config.resume = args.resume;
    config.opt_out = opt_out;
    config.max_ppl_regression = args.max_ppl_regression;
    config.device = device;
    config.progress = !args.json;
    config.progress_file = args.progress_file.clone();

    let summary = training::train(&config, &|_| false)?;
    let peak_rss_mb = super::bench::peak_rss_mb();
    if args.json {
        let mut value = serde_json::to_value(&summary)?;
        value["peak_rss_mb"] = serde_json::json!(peak_rss_mb);
        println!("{}", serde_json::to_string(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    if !summary.data.skipped.is_empty() {
        println!("skipped {} malformed line(s) (listed above and in metrics.json)", summary.data.skipped.len());
    }
    println!(
        "{}: {} steps on {} examples ({} held out); {} tokens at {:.0} tokens/s; final train loss {:.4}; peak RSS {:.0} MB",
        summary.mode,
        summary.steps,
        summary.train_examples,
        summary.eval_examples,
        summary.tokens,
        summary.tokens_per_s,
        summary.final_train_loss,
        peak_rss_mb
    );
    if let (Some(before), Some(after)) = (&summary.eval_before, &summary.eval_after) {
        println!(
            "held-out loss {:.4} → {:.4}, perplexity {:.2} → {:.2}",
            before.loss, after.loss, before.perplexity, after.perplexity
        );
    }
    println!("gate: {} ({})", if summary.gate.promote { "promote" } else { "hold" }, summary.gate.reason);
    println!("wrote {}", summary.out.display());
    Ok(ExitCode::SUCCESS)
}
