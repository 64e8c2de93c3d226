//! `[jobs]`: fine-tuning jobs and their `[[jobs.schedules]]`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use super::personas::persona_name_ok;
use super::{invalid, serialize_millis, SettingsError};
use crate::cron::Cron;

/// `[jobs]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJobs {
    pub enabled: bool,
    pub dir: String,
    pub artifacts_dir: String,
    pub trainer: String,
    pub device: String,
    pub mode: String,
    pub lora_rank: usize,
    pub steps: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub eval_fraction: f64,
    pub checkpoint_every: usize,
    pub min_examples: usize,
    pub max_ppl_regression: f64,
    pub probes: Vec<String>,
    pub max_attempts: u32,
    pub poll_ms: u64,
    pub schedules: Vec<RawSchedule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    pub name: String,
    pub cron: String,
    #[serde(default)]
    pub persona: String,
    #[serde(default)]
    pub channels: Vec<String>,
}

/// What a job trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainMode {
    /// A persona's LoRA adapter.
    Lora,
    /// Every weight: a new base checkpoint.
    Full,
}

/// `[jobs]`: fine-tuning jobs (moderators' `/train`, `dialogd jobs`,
/// schedules), run as child processes, promoted through a gate.
#[derive(Debug, Clone, Serialize)]
pub struct JobSettings {
    pub enabled: bool,
    /// One folder per job under this.
    pub dir: std::path::PathBuf,
    /// Where each job's output (a promoted checkpoint or adapter) is
    /// written, `{artifacts_dir}/job-{id}/output`: a path every host that
    /// serves the model sees (a shared filesystem), since `dialogd worker`s
    /// load promoted base models from it. Empty in the file: `dir`.
    pub artifacts_dir: std::path::PathBuf,
    /// The program run as `TRAINER train …`; `None`: this executable.
    #[serde(serialize_with = "serialize_opt_path")]
    pub trainer: Option<std::path::PathBuf>,
    /// The device jobs train on (one job at a time per device).
    pub device: String,
    pub mode: TrainMode,
    pub lora_rank: usize,
    pub steps: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub eval_fraction: f64,
    pub checkpoint_every: usize,
    /// A job with fewer collected exchanges fails at once.
    pub min_examples: usize,
    /// Gate: allowed relative rise of held-out perplexity.
    pub max_ppl_regression: f64,
    /// Gate: prompts the new model must answer with a non-empty reply that
    /// passes the safety filter.
    pub probes: Vec<String>,
    /// Tries of a job whose trainer was killed (each resumes).
    pub max_attempts: u32,
    #[serde(rename = "poll_ms", serialize_with = "serialize_millis")]
    pub poll: Duration,
    pub schedules: Vec<Schedule>,
}

/// One `[[jobs.schedules]]` entry.
#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    pub name: String,
    #[serde(serialize_with = "display")]
    pub cron: Cron,
    /// The persona trained (LoRA mode); empty: the base model (full mode).
    pub persona: String,
    /// Channels whose collected exchanges are used; empty: all.
    pub channels: Vec<String>,
}

impl JobSettings {
    /// Where job `id`'s output goes, and where every host finds it once
    /// promoted: `{artifacts_dir}/job-{id}/output`.
    pub fn output_dir(&self, id: u64) -> std::path::PathBuf {
        crate::serving::job_output(&self.artifacts_dir, id)
    }
}

fn serialize_opt_path<S: Serializer>(path: &Option<std::path::PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
}

fn display<T: fmt::Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&value.to_string())
}

impl RawJobs {
    pub(super) fn validate(self, store_is_redis: bool) -> Result<JobSettings, SettingsError> {
        if self.enabled {
            if !store_is_redis {
                return Err(invalid("jobs.enabled", "jobs keep their records in Redis: set context.store = \"redis\""));
            }
            if self.dir.trim().is_empty() {
                return Err(invalid("jobs.dir", "must name a folder when jobs are enabled"));
            }
        }
        let mode = match self.mode.as_str() {
            "lora" => TrainMode::Lora,
            "full" => TrainMode::Full,
            other => return Err(invalid("jobs.mode", format!("{other:?} is not \"lora\" or \"full\""))),
        };
        crate::serving::device(&self.device).map_err(|e| invalid("jobs.device", e.to_string()))?;
        if self.lora_rank == 0 || self.lora_rank > 256 {
            return Err(invalid("jobs.lora_rank", format!("{} is not in 1..=256", self.lora_rank)));
        }
        if self.steps == 0 {
            return Err(invalid("jobs.steps", "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(invalid("jobs.lr", format!("{} is not positive", self.lr)));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err(invalid("jobs.batch_size", "batch_size and grad_accum must be at least 1"));
        }
        if self.max_seq_len < 2 {
            return Err(invalid("jobs.max_seq_len", "must be at least 2"));
        }
        if !(self.eval_fraction > 0.0 && self.eval_fraction < 1.0) {
            return Err(invalid("jobs.eval_fraction", format!("{} is not in (0, 1): the gate needs held-out data", self.eval_fraction)));
        }
        if !(self.max_ppl_regression.is_finite() && self.max_ppl_regression >= 0.0) {
            return Err(invalid("jobs.max_ppl_regression", "must be 0 or more"));
        }
        if self.max_attempts == 0 {
            return Err(invalid("jobs.max_attempts", "must be at least 1"));
        }
        if self.poll_ms < 10 {
            return Err(invalid("jobs.poll_ms", "must be at least 10"));
        }
        if let Some(p) = self.probes.iter().find(|p| p.trim().is_empty() || p.len() > 1000) {
            return Err(invalid("jobs.probes", format!("{p:?}: a probe must be 1-1000 bytes")));
        }
        let mut schedules = Vec::new();
        for s in self.schedules {
            let cron = Cron::parse(&s.cron).map_err(|e| invalid("jobs.schedules", format!("{}: {e}", s.name)))?;
            if s.name.trim().is_empty() {
                return Err(invalid("jobs.schedules", "every schedule needs a name"));
            }
            if !s.persona.is_empty() && !persona_name_ok(&s.persona) {
                return Err(invalid("jobs.schedules", format!("{}: {:?} is not a persona name", s.name, s.persona)));
            }
            if mode == TrainMode::Lora && s.persona.is_empty() {
                return Err(invalid("jobs.schedules", format!("{}: LoRA jobs (jobs.mode = \"lora\") train a persona: set persona", s.name)));
            }
            if let Some(c) = s.channels.iter().find(|c| dialogd_adapters::ChannelKey::parse(c).is_none()) {
                return Err(invalid("jobs.schedules", format!("{}: {c:?} is not platform:channel_id", s.name)));
            }
            schedules.push(Schedule { name: s.name, cron, persona: s.persona, channels: s.channels });
        }
        Ok(JobSettings {
            enabled: self.enabled,
            artifacts_dir: match self.artifacts_dir.trim() {
                "" => self.dir.clone().into(),
                path => path.into(),
            },
            dir: self.dir.into(),
            trainer: (!self.trainer.trim().is_empty()).then(|| self.trainer.trim().into()),
            device: self.device,
            mode,
            lora_rank: self.lora_rank,
            steps: self.steps,
            lr: self.lr,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            max_seq_len: self.max_seq_len,
            eval_fraction: self.eval_fraction,
            checkpoint_every: self.checkpoint_every,
            min_examples: self.min_examples,
            max_ppl_regression: self.max_ppl_regression,
            probes: self.probes,
            max_attempts: self.max_attempts,
            poll: Duration::from_millis(self.poll_ms),
            schedules,
        })
    }
}
