//! The training loop: data → batches → loss → accumulated, clipped
//! gradients → AdamW, with checkpoints, `--resume`, a progress bar,
//! evaluation before and after, and the output folder.
//!
//! Determinism: the data order of every epoch is a pure function of the
//! seed and the epoch (see [`super::data::epoch_order`]), LoRA factors are
//! drawn from the seed, there is no dropout, and CPU kernels reduce in a
//! fixed order; so the same inputs give the same weights, and a run resumed
//! from its checkpoint at step k takes exactly the batches an
//! uninterrupted run takes after step k, from the same parameters and
//! AdamW moments (tested bit for bit on the CPU).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::checkpoint::{latest_state, load_state, restore_params, save_hf_checkpoint, save_state, ResumeState};
use super::data::{build_examples, epoch_order, load_dialogues, split, Batch, Example, LoadReport, OptOut};
use super::eval::{evaluate, gate, EvalMetrics, GateDecision};
use super::lora::{save_adapter, LoraSettings};
use super::model::TrainableGpt2;
use super::optim::{clip_global_norm, learning_rate, AdamW, AdamWParams};
use super::progress::{duration_text, ProgressFile};
use super::{file_error, fnv1a64, Result, TrainingError};
use crate::tokenizer::DialogTokenizer;

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum TrainLength {
    /// Passes over the training set (fractions allowed), rounded up to
    /// whole optimizer steps.
    Epochs(f64),
    /// Optimizer steps (each `batch_size × grad_accum` examples).
    Steps(usize),
}

/// Everything a training job needs.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The base checkpoint folder (a resolved local path).
    pub base: PathBuf,
    /// How the base was named (written into `adapter_config.json`).
    pub base_name: String,
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub length: TrainLength,
    /// Peak learning rate.
    pub lr: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    /// `None`: full fine-tuning.
    pub lora: Option<LoraSettings>,
    pub eval_fraction: f64,
    pub seed: u64,
    /// Warm-up steps; `None`: 10% of the steps.
    pub warmup_steps: Option<usize>,
    /// Global gradient-norm limit (0: no clipping).
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    /// Write resumable state every N steps (0: never).
    pub checkpoint_every: usize,
    /// Continue from the newest checkpoint under `out`.
    pub resume: bool,
    pub opt_out: OptOut,
    /// The gate's allowed relative perplexity regression, recorded in the
    /// metrics file.
    pub max_ppl_regression: f64,
    pub device: Device,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
    /// Keep this file's [`Progress`](super::progress::Progress) current
    /// (`--progress-file`; the daemon's jobs read it).
    pub progress_file: Option<PathBuf>,
}

impl TrainConfig {
    /// A configuration with the command line's defaults.
    pub fn new(base: PathBuf, data: Vec<PathBuf>, out: PathBuf) -> Self {
        Self {
            base_name: base.display().to_string(),
            base,
            data,
            out,
            length: TrainLength::Epochs(1.0),
            lr: 5e-5,
            batch_size: 8,
            grad_accum: 1,
            max_seq_len: 128,
            lora: None,
            eval_fraction: 0.1,
            seed: 42,
            warmup_steps: None,
            max_grad_norm: 1.0,
            weight_decay: 0.01,
            checkpoint_every: 200,
            resume: false,
            opt_out: OptOut::default(),
            max_ppl_regression: 0.0,
            device: Device::Cpu,
            progress: false,
            progress_file: None,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainingError::Settings(m));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr must be positive, not {}", self.lr));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("--batch-size and --grad-accum must be at least 1".into());
        }
        if self.max_seq_len < 2 {
            return bad(format!("--max-seq-len must be at least 2, not {}", self.max_seq_len));
        }
        match self.length {
            TrainLength::Steps(0) => return bad("--steps must be at least 1".into()),
            TrainLength::Epochs(e) if !(e.is_finite() && e > 0.0) => return bad(format!("--epochs must be positive, not {e}")),
            _ => {}
        }
        if let Some(lora) = &self.lora {
            lora.validate()?;
        }
        if !(self.max_grad_norm >= 0.0 && self.weight_decay >= 0.0) {
            return bad("--max-grad-norm and --weight-decay must not be negative".into());
        }
        Ok(())
    }
}

/// What a run did; also written as `OUT/metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub mode: String,
    pub steps: usize,
    pub total_steps: usize,
    /// Whether the run stopped before `total_steps` (the stop callback);
    /// then no model was written, only the resumable state.
    pub stopped_early: bool,
    pub resumed_from_step: Option<usize>,
    pub train_examples: usize,
    pub eval_examples: usize,
    /// Input tokens processed by this run's steps.
    pub tokens: u64,
    /// Input tokens per second of this run's steps (evaluation excluded).
    pub tokens_per_s: f64,
    pub final_train_loss: f64,
    pub eval_before: Option<EvalMetrics>,
    pub eval_after: Option<EvalMetrics>,
    pub gate: GateDecision,
    pub data: LoadReport,
    pub out: PathBuf,
}

/// Runs a training job. `stop(step)` is asked after every optimizer step
/// (after any checkpoint of that step); `true` ends the run there, as a
/// kill would, without writing the model (the daemon's cancel, and the
/// tests' stand-in for a crash).
pub fn train(config: &TrainConfig, stop: &dyn Fn(usize) -> bool) -> Result<TrainSummary> {
    config.validate()?;
    let tokenizer = DialogTokenizer::from_dir(&config.base)?;
    let n_positions = crate::model::gpt2::read_config(&config.base)?.n_positions;
    let max_seq_len = if config.max_seq_len > n_positions {
        tracing::warn!(requested = config.max_seq_len, n_positions, "--max-seq-len exceeds the model's context; using the context");
        n_positions
    } else {
        config.max_seq_len
    };
    let eos = tokenizer.eos_id();
    let (dialogues, mut report) = load_dialogues(&config.data, &config.opt_out)?;
    let (examples, without_loss) = build_examples(&dialogues, &tokenizer, max_seq_len)?;
    report.without_loss = without_loss;
    if examples.is_empty() {
        return Err(TrainingError::EmptyDataset(format!(
            "{} dialogue(s) read, {} malformed line(s) skipped, {} record(s) opted out, {} without a trained turn",
            report.dialogues,
            report.skipped.len(),
            report.opted_out,
            without_loss
        )));
    }
    let fingerprint = run_fingerprint(config, &examples)?;
    let (train_set, eval_set) = split(examples, config.eval_fraction, config.seed)?;

    let model = TrainableGpt2::load(&config.base, config.lora, config.seed, &config.device)?;
    let batches_per_epoch = train_set.len().div_ceil(config.batch_size);
    let total_steps = match config.length {
        TrainLength::Steps(n) => n,
        TrainLength::Epochs(e) => ((e * batches_per_epoch as f64) / config.grad_accum as f64).ceil().max(1.0) as usize,
    };
    let warmup = config.warmup_steps.unwrap_or(total_steps / 10).min(total_steps);
    let params = AdamWParams { weight_decay: config.weight_decay, ..AdamWParams::default() };
    let mut optimizer = AdamW::new(model.trainable(), params)?;

    let eval_before = evaluate(&model, &eval_set, config.batch_size, eos)?;

    let mut start_step = 0;
    let mut tokens_seen = 0u64;
    let mut resumed_from_step = None;
    let existing = latest_state(&config.out)?;
    if config.resume {
        let Some(dir) = existing else {
            return Err(TrainingError::Resume { path: config.out.clone(), message: "no checkpoint to resume from".into() });
        };
        let (state, tensors) = load_state(&dir)?;
        if state.fingerprint != fingerprint {
            return Err(TrainingError::Resume {
                path: dir,
                message: "it belongs to a different run (base, data or settings changed)".into(),
            });
        }
        restore_params(&model, &tensors)?;
        optimizer.restore(&tensors, state.step)?;
        start_step = state.step;
        tokens_seen = state.tokens_seen;
        resumed_from_step = Some(state.step);
        tracing::info!(step = state.step, dir = %dir.display(), "resuming");
    } else if let Some(dir) = existing {
        return Err(TrainingError::Resume {
            path: dir,
            message: "the output folder already holds a checkpoint of a run: pass --resume to continue it, or choose a new --out"
                .into(),
        });
    }

    let bar = match config.progress {
        true => super::progress::bar(total_steps as u64, start_step as u64),
        false => indicatif::ProgressBar::hidden(),
    };
    let mut progress_file = ProgressFile::start(config.progress_file.clone(), start_step, total_steps)?;
    let started = Instant::now();
    let mut run_tokens = 0u64;
    let mut last_loss = f64::NAN;
    let mut stopped_early = false;
    let mut order_cache: Option<(usize, Vec<usize>)> = None;
    let mut step = start_step;
    while step < total_steps {
        let trainable = optimizer.params().to_vec();
        let mut accumulated: Vec<Option<Tensor>> = vec![None; trainable.len()];
        let mut loss_sum = 0f64;
        let mut step_tokens = 0u64;
        for micro in 0..config.grad_accum {
            let index = step * config.grad_accum + micro;
            let (epoch, within) = (index / batches_per_epoch, index % batches_per_epoch);
            if order_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
                order_cache = Some((epoch, epoch_order(train_set.len(), config.seed, epoch)));
            }
            let order = &order_cache.as_ref().map(|(_, o)| o).ok_or_else(|| TrainingError::Settings("no order".into()))?;
            let end = ((within + 1) * config.batch_size).min(train_set.len());
            let batch_examples: Vec<&Example> = order[within * config.batch_size..end].iter().map(|&i| &train_set[i]).collect();
            let batch = Batch::new(&batch_examples, eos, &config.device)?;
            let (loss, _) = model.loss(&batch)?;
            let loss_value = loss.to_scalar::<f32>()?;
            if !loss_value.is_finite() {
                return Err(TrainingError::Diverged { step: step + 1, loss: loss_value });
            }
            loss_sum += loss_value as f64;
            step_tokens += batch.n_tokens as u64;
            let grads = (loss / config.grad_accum as f64)?.backward()?;
            for (slot, param) in accumulated.iter_mut().zip(&trainable) {
                let Some(g) = grads.get(param.var.as_tensor()) else { continue };
                *slot = Some(match slot.take() {
                    None => g.clone(),
                    Some(acc) => (acc + g)?,
                });
            }
        }
        let mut grads: Vec<Tensor> = accumulated
            .into_iter()
            .zip(&trainable)
            .map(|(g, p)| g.map(Ok).unwrap_or_else(|| p.var.as_tensor().zeros_like()))
            .collect::<candle_core::Result<_>>()?;
        let grad_norm = clip_global_norm(&mut grads, config.max_grad_norm)?;
        let lr = learning_rate(step, warmup, total_steps, config.lr);
        optimizer.step(&grads, lr)?;
        step += 1;
        last_loss = loss_sum / config.grad_accum as f64;
        run_tokens += step_tokens;
        tokens_seen += step_tokens;
        let tokens_per_s = run_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(step as u64);
        let eta = progress_file.eta_s(step).map_or(String::new(), |s| format!(" · ETA {}", duration_text(s)));
        bar.set_message(format!("loss {last_loss:.4} · {tokens_per_s:.0} tok/s · lr {lr:.2e}{eta}"));
        tracing::debug!(step, loss = last_loss, grad_norm, lr, tokens_per_s, "step");
        if config.checkpoint_every > 0 && step % config.checkpoint_every == 0 && step < total_steps {
            let state = ResumeState { step, fingerprint: fingerprint.clone(), last_loss, tokens_seen };
            save_state(&config.out, &model, &optimizer, &state)?;
        }
        let stopping = step < total_steps && stop(step);
        progress_file.step(step, last_loss, tokens_per_s, stopping);
        if stopping {
            stopped_early = true;
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let tokens_per_s = if elapsed > 0.0 { run_tokens as f64 / elapsed } else { 0.0 };

    let eval_after = if stopped_early { None } else { evaluate(&model, &eval_set, config.batch_size, eos)? };
    let decision = gate(eval_before.as_ref(), eval_after.as_ref(), config.max_ppl_regression);
    let summary = TrainSummary {
        mode: match config.lora {
            Some(l) => format!("lora (rank {}, alpha {})", l.rank, l.alpha),
            None => "full".into(),
        },
        steps: step,
        total_steps,
        stopped_early,
        resumed_from_step,
        train_examples: train_set.len(),
        eval_examples: eval_set.len(),
        tokens: run_tokens,
        tokens_per_s,
        final_train_loss: last_loss,
        eval_before,
        eval_after,
        gate: decision,
        data: report,
        out: config.out.clone(),
    };
    if !stopped_early {
        write_outputs(config, &model)?;
        let path = config.out.join("metrics.json");
        std::fs::write(&path, serde_json::to_string_pretty(&summary).unwrap_or_default()).map_err(|e| file_error(&path, e))?;
        // The run is complete: its resumable state is no longer needed.
        let checkpoints = config.out.join("checkpoints");
        if checkpoints.is_dir() {
            std::fs::remove_dir_all(&checkpoints).map_err(|e| file_error(&checkpoints, e))?;
        }
    }
    Ok(summary)
}

fn write_outputs(config: &TrainConfig, model: &TrainableGpt2) -> Result<()> {
    match config.lora {
        Some(_) => save_adapter(&config.out, model, &config.base_name),
        None => save_hf_checkpoint(&config.out, &model.merged_weights()?, &config.base),
    }
}

/// A hash of what defines a run: the base's config and weights file size,
/// the examples, and every setting that changes the trajectory.
fn run_fingerprint(config: &TrainConfig, examples: &[Example]) -> Result<String> {
    let mut bytes = Vec::new();
    let base_config = config.base.join("config.json");
    bytes.extend(std::fs::read(&base_config).map_err(|e| file_error(&base_config, e))?);
    if let Ok(weights) = crate::model::weights::WeightsFile::find(&config.base) {
        let len = std::fs::metadata(weights.display_path()).map(|m| m.len()).unwrap_or(0);
        bytes.extend(len.to_le_bytes());
    }
    for e in examples {
        bytes.extend(e.inputs.iter().chain(&e.targets).flat_map(|id| id.to_le_bytes()));
        bytes.extend(e.weights.iter().flat_map(|w| w.to_le_bytes()));
    }
    let settings = format!(
        "{:?}|{}|{}|{}|{}|{:?}|{}|{}|{:?}|{}|{}",
        config.length,
        config.lr,
        config.batch_size,
        config.grad_accum,
        config.max_seq_len,
        config.lora,
        config.eval_fraction,
        config.seed,
        config.warmup_steps,
        config.max_grad_norm,
        config.weight_decay
    );
    bytes.extend(settings.as_bytes());
    Ok(format!("{:016x}", fnv1a64(&bytes)))
}
