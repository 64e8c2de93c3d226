//! Fine-tuning jobs: records, schedules, the runner, promotion and rollback.
//!
//! A job trains one *target*, the base model (full fine-tune) or one
//! persona's LoRA adapter, on a snapshot of the exchanges collected in some
//! channels. Its life: `queued` → `running` (a `dialogd train` child
//! process) → `promoted` (the gate passed; the target now serves it),
//! `rejected` (the gate said no), `failed` or `cancelled`; a promoted job
//! becomes `rolled_back` when a rollback returns its target to the version
//! before it.
//!
//! - [`store`]: the records in Redis, the queue, per-device locks, the
//!   promoted versions of every target, and personas.
//!
//! Schedules are parsed by [`crate::cron`].
//! - [`runner`]: the daemon's side: schedules, claiming and running jobs,
//!   the gate, and keeping what the pool serves in step with the promoted
//!   versions.
//! - [`gate`]: the promotion decision on a trained job (probe replies
//!   judged like served ones) and the rollback message.

pub mod dataset;
pub mod gate;
pub mod runner;
pub mod store;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::settings::TrainMode;
use crate::training::Progress;

pub use store::{JobStore, StoreError};

/// Where a job's output goes when it is promoted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Target {
    /// The base model every persona is served on (a full fine-tune).
    Base,
    /// A persona's LoRA adapter.
    Persona(String),
}

impl Target {
    /// `base` or `persona:NAME`, as stored and printed.
    pub fn key(&self) -> String {
        match self {
            Target::Base => "base".into(),
            Target::Persona(name) => format!("persona:{name}"),
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "base" => Ok(Target::Base),
            _ => match text.strip_prefix("persona:") {
                Some(name) if crate::settings::persona_name_ok(name) => Ok(Target::Persona(name.into())),
                _ => Err(format!("{text:?} is not `base` or `persona:NAME`")),
            },
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

impl From<Target> for String {
    fn from(target: Target) -> String {
        target.key()
    }
}

impl TryFrom<String> for Target {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Target::parse(&text)
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    /// Trained and gated; its target serves it.
    Promoted,
    /// Trained, but the gate kept the serving version.
    Rejected,
    Failed,
    Cancelled,
    /// Was promoted; a rollback returned its target to the version before.
    RolledBack,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Promoted => "promoted",
            JobState::Rejected => "rejected",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::RolledBack => "rolled_back",
        }
    }

    /// Whether the job is over (nothing will run it again).
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// One probe prompt and what the new model answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub prompt: String,
    pub reply: String,
    /// Empty, degenerate or flagged by the safety filter.
    pub failed: Option<String>,
}

/// A job, as kept in Redis (`P:job:ID`, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u64,
    pub target: Target,
    pub state: JobState,
    /// Who asked: `cli`, `schedule:NAME` or `moderator:PLATFORM:CHANNEL`.
    pub trigger: String,
    /// Channels whose exchanges it trains on (empty: all collected).
    pub channels: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    pub started: Option<u64>,
    pub finished: Option<u64>,
    /// Trainer runs so far (a killed trainer is resumed).
    pub attempts: u32,
    /// The job's folder (snapshot, log, output).
    pub dir: Option<PathBuf>,
    /// The trainer's output and errors.
    pub log: Option<PathBuf>,
    /// The trained checkpoint or adapter folder.
    pub output: Option<PathBuf>,
    /// The running trainer's process id and the daemon that owns it.
    pub pid: Option<u32>,
    pub owner: Option<String>,
    /// Examples in the snapshot.
    pub examples: Option<usize>,
    /// The trainer's summary (`metrics.json`): losses, perplexity before and
    /// after, tokens/s, its gate decision.
    pub metrics: Option<serde_json::Value>,
    /// Where training stands (the trainer's `progress.json`, copied in by
    /// the runner every `jobs.poll` while it trains): step, total_steps,
    /// loss, tokens_per_s, eta_s, updated. `None` before training starts.
    #[serde(default)]
    pub progress: Option<Progress>,
    pub probes: Vec<ProbeResult>,
    /// Why the job failed, was rejected or cancelled.
    pub reason: Option<String>,
}

impl JobRecord {
    pub fn new(id: u64, target: Target, trigger: String, channels: Vec<String>) -> Self {
        Self {
            id,
            target,
            state: JobState::Queued,
            trigger,
            channels,
            created: now_secs(),
            started: None,
            finished: None,
            attempts: 0,
            dir: None,
            log: None,
            output: None,
            pid: None,
            owner: None,
            examples: None,
            metrics: None,
            progress: None,
            probes: Vec::new(),
            reason: None,
        }
    }

    /// One line for people: `#7 persona:pirate promoted (held-out
    /// perplexity 41.20 → 30.50)`, or while it trains `#7 persona:pirate
    /// running: step 12/100, loss 3.2104, 1520 tokens/s, ETA 1m 20s`.
    pub fn summary(&self) -> String {
        let mut line = format!("#{} {} {}", self.id, self.target, self.state.as_str());
        if let (JobState::Running, Some(progress)) = (self.state, &self.progress) {
            line.push_str(&format!(": {}", progress.describe()));
        }
        let ppl = |key: &str| self.metrics.as_ref()?.get(key)?.get("perplexity")?.as_f64();
        if let (Some(before), Some(after)) = (ppl("eval_before"), ppl("eval_after")) {
            line.push_str(&format!(" (held-out perplexity {before:.2} → {after:.2})"));
        }
        // A promotion's reason is the gate's numbers, already on the line.
        match &self.reason {
            Some(reason) if !matches!(self.state, JobState::Promoted | JobState::RolledBack) => {
                line.push_str(&format!(": {reason}"));
            }
            _ => {}
        }
        line
    }
}

/// `/train` in a channel without a persona while `jobs.mode = "lora"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("jobs train a persona's adapter here, and this channel has none: /persona create NAME, then /persona use NAME")]
pub struct NoPersona;

impl TrainMode {
    /// The target a moderator's `/train` trains in this mode.
    pub fn target_for(self, persona: Option<&str>) -> Result<Target, NoPersona> {
        match (self, persona) {
            (TrainMode::Full, _) => Ok(Target::Base),
            (TrainMode::Lora, Some(name)) => Ok(Target::Persona(name.to_string())),
            (TrainMode::Lora, None) => Err(NoPersona),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_round_trip() {
        for text in ["base", "persona:pirate", "persona:a-b_1"] {
            assert_eq!(Target::parse(text).unwrap().key(), text);
        }
        for bad in ["", "persona:", "persona:Bad Name", "model"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        let mut record = JobRecord::new(3, Target::Persona("pirate".into()), "cli".into(), vec![]);
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains(r#""target":"persona:pirate""#) && json.contains(r#""state":"queued""#), "{json}");
        assert_eq!(serde_json::from_str::<JobRecord>(&json).unwrap(), record);
        // Records written before progress was kept still read.
        let old = json.replace(r#""progress":null,"#, "");
        assert!(!old.contains("progress"), "{json}");
        assert_eq!(serde_json::from_str::<JobRecord>(&old).unwrap(), record);
        // A running job's line says where it stands; a finished one's not.
        record.state = JobState::Running;
        record.progress = Some(Progress { step: 3, total_steps: 10, loss: Some(2.5), tokens_per_s: 99.6, eta_s: Some(7), updated: 0 });
        assert_eq!(record.summary(), "#3 persona:pirate running: step 3/10, loss 2.5000, 100 tokens/s, ETA 7s");
        record.state = JobState::Cancelled;
        assert_eq!(record.summary(), "#3 persona:pirate cancelled");
    }
}
