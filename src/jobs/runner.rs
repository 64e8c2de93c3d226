//! The daemon's job runner: schedules, claiming and running jobs in child
//! processes, the gate, and promotion.
//!
//! Every `jobs.poll` the runner (1) makes what this daemon serves match the
//! promoted versions in Redis (a promotion or a rollback made anywhere —
//! here, by `dialogd jobs rollback`, by another daemon — is applied within
//! one poll; the base model is swapped in the pool between batches), (2)
//! queues the schedules that came due, (3) puts back jobs whose daemon died
//! while running them, and (4) takes the oldest queued job when no daemon
//! holds the device.
//!
//! A job runs `TRAINER train …` as a child process (a crash or an
//! out-of-memory kill there cannot touch serving) on a snapshot of the
//! collected exchanges, logging to the job's folder. A trainer killed by a
//! signal is resumed from its last checkpoint (`--resume`) up to
//! `jobs.max_attempts` tries; one that exits with an error fails the job.
//! A finished job is promoted only if the trainer's held-out perplexity
//! gate passed and the new model answers every probe prompt with a
//! non-empty reply that passes the safety filter.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use dialogd_adapters::Shutdown;
use tokio::sync::watch;

use super::gate::{trainer_decision, GateError, Probe};
use super::store::{JobStore, StoreError};
use super::{now_secs, JobRecord, JobState, ProbeResult, Target};
use crate::model::Gpt2;
use crate::personas::{PersonaError, Personas};
use crate::pool::PoolHandle;
use crate::serving::ModelSpec;
use crate::settings::{GenerationSettings, JobSettings, SafetySettings, Schedule};
use crate::telemetry::Metrics;

/// Why a job (or the runner's bookkeeping) failed; a job's error becomes
/// its record's `reason`.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Persona(#[from] PersonaError),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The job cannot run as asked (too little data, a missing output);
    /// the message says why.
    #[error("{0}")]
    Refused(String),
    /// The trainer process failed or could not be started.
    #[error("{0}")]
    Trainer(String),
    /// A model could not be loaded into, or swapped into, the pool.
    #[error("serving: {0}")]
    Serve(String),
    #[error("a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> RunnerError + '_ {
    move |source| RunnerError::Io { path: path.to_path_buf(), source }
}

type Result<T> = std::result::Result<T, RunnerError>;

/// What the runner needs to know about the model it trains and serves.
#[derive(Debug, Clone)]
pub struct BaseModel {
    /// The original base checkpoint (a resolved local folder).
    pub dir: PathBuf,
    /// How it is served (`[model]`): a promoted base model is served the
    /// same way.
    pub spec: ModelSpec,
}

/// What a runner is built from.
pub struct RunnerParts {
    pub store: JobStore,
    pub settings: JobSettings,
    /// Where the collected exchanges are (`collect.dir`).
    pub collect_dir: PathBuf,
    pub base: BaseModel,
    /// The pool whose base model promotions replace; `None`: base
    /// promotions are recorded but not served here.
    pub pool: Option<PoolHandle>,
    /// The served `[generation]` and `[safety]` settings, as SIGHUP
    /// reloads them: probes sample and are judged like served replies.
    pub generation: watch::Receiver<Arc<GenerationSettings>>,
    pub safety: watch::Receiver<Arc<SafetySettings>>,
    pub personas: Arc<Personas>,
    pub metrics: Arc<Metrics>,
}

/// The runner of one daemon.
pub struct Runner {
    store: JobStore,
    settings: JobSettings,
    collect_dir: PathBuf,
    base: BaseModel,
    pool: Option<PoolHandle>,
    generation: watch::Receiver<Arc<GenerationSettings>>,
    safety: watch::Receiver<Arc<SafetySettings>>,
    personas: Arc<Personas>,
    /// This daemon's name in locks and records.
    owner: String,
    /// The promoted base version served here (`None`: the original).
    served_base: tokio::sync::Mutex<Option<u64>>,
    metrics: Arc<Metrics>,
}

/// The files in a job's folder.
struct JobFiles {
    /// The data snapshot the job trains on.
    data: PathBuf,
    /// The trainer's `--out` (`JobSettings::output_dir`): checkpoints
    /// while it runs, then the model.
    output: PathBuf,
    /// The trainer's output and errors, every attempt.
    log: PathBuf,
    /// The trainer's `--progress-file`.
    progress: PathBuf,
}

impl JobFiles {
    /// The files in `dir`, the trainer's output in `output`.
    fn of(dir: &Path, output: PathBuf) -> Self {
        Self {
            data: dir.join("data.jsonl"),
            output,
            log: dir.join("train.log"),
            progress: dir.join("progress.json"),
        }
    }
}

/// How a trainer run ended.
enum Ended {
    Exited(std::process::ExitStatus),
    Cancelled,
    ShuttingDown,
}

impl Runner {
    pub fn new(parts: RunnerParts) -> Self {
        let RunnerParts { store, settings, collect_dir, base, pool, generation, safety, personas, metrics } = parts;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let owner = format!("{host}:{}:{}", std::process::id(), now_secs());
        Self {
            store,
            settings,
            collect_dir,
            base,
            pool,
            generation,
            safety,
            personas,
            owner,
            served_base: tokio::sync::Mutex::new(None),
            metrics,
        }
    }

    fn lock_ttl(&self) -> Duration {
        (self.settings.poll * 5).max(Duration::from_secs(2))
    }

    /// Runs until `shutdown`; a running job is stopped and queued again
    /// (it resumes at the next start).
    pub async fn run(self, shutdown: Shutdown) {
        tracing::info!(owner = %self.owner, device = %self.settings.device, "job runner started");
        let mut last_cron = now_secs();
        let mut tick = tokio::time::interval(self.settings.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.clone().wait() => break,
            }
            if let Err(e) = self.sync_served().await {
                tracing::warn!(error = %e, "could not bring the served versions up to date");
            }
            let now = now_secs();
            if let Err(e) = fire_schedules(&self.store, &self.settings.schedules, last_cron, now).await {
                tracing::warn!(error = %e, "could not queue scheduled jobs");
            }
            last_cron = now;
            if let Err(e) = self.recover_orphans().await {
                tracing::warn!(error = %e, "could not check for orphaned jobs");
            }
            match self.store.claim(&self.settings.device, &self.owner, self.lock_ttl()).await {
                Ok(Some(id)) => {
                    self.run_job(id, &shutdown).await;
                    if let Err(e) = self.store.release_lock(&self.settings.device, &self.owner).await {
                        tracing::warn!(error = %e, "could not release the device lock");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "could not look for queued jobs"),
            }
        }
        tracing::info!("job runner stopped");
    }

    /// Puts back jobs recorded as running whose device lock has lapsed (the
    /// daemon running them died, or Redis was away when this one finished
    /// and could not record the end; this runner runs nothing while it
    /// looks): they resume from their last checkpoint.
    async fn recover_orphans(&self) -> Result<()> {
        for record in self.store.list(50).await? {
            if record.state != JobState::Running {
                continue;
            }
            if self.store.lock_holder(&self.settings.device).await?.is_some() {
                continue;
            }
            let mut record = record;
            tracing::warn!(job = record.id, owner = record.owner.as_deref(), "job's daemon is gone: queueing it to resume");
            record.state = JobState::Queued;
            record.pid = None;
            record.owner = None;
            self.store.put(&record).await?;
            self.store.requeue_front(record.id).await?;
        }
        Ok(())
    }

    /// Runs one claimed job to its end (or to shutdown).
    async fn run_job(&self, id: u64, shutdown: &Shutdown) {
        let mut record = match self.store.get(id).await {
            Ok(Some(record)) => record,
            Ok(None) => return tracing::warn!(job = id, "queued job has no record; dropped"),
            Err(e) => {
                tracing::warn!(job = id, error = %e, "cannot read a claimed job; queueing it again");
                let _ = self.store.requeue_front(id).await;
                return;
            }
        };
        if record.state != JobState::Queued {
            return;
        }
        let result = self.attempt(&mut record, shutdown).await;
        if let Err(why) = result {
            record.state = JobState::Failed;
            record.reason = Some(why.to_string());
        }
        if record.state.is_final() {
            record.finished = Some(now_secs());
            record.pid = None;
        }
        tracing::info!(job = record.id, state = record.state.as_str(), reason = record.reason.as_deref(), "job ended");
        if record.state.is_final() {
            self.metrics.job_ended(record.state.as_str());
        }
        if record.state == JobState::Promoted {
            return; // recorded at promotion
        }
        if let Err(e) = self.store.put(&record).await {
            tracing::error!(job = record.id, error = %e, "could not record the job's end");
        }
        if record.state == JobState::Queued {
            let _ = self.store.requeue_front(record.id).await;
        }
    }

    /// One try: snapshot, train, gate, promote. Leaves the record in its
    /// new state; `Err` is a failure with its reason.
    async fn attempt(&self, record: &mut JobRecord, shutdown: &Shutdown) -> Result<()> {
        let dir = self.settings.dir.join(format!("job-{}", record.id));
        // The output goes under jobs.artifacts_dir, where every serving host finds it.
        let files = JobFiles::of(&dir, self.settings.output_dir(record.id));
        let JobFiles { data, output, log, progress } = &files;
        std::fs::create_dir_all(output).map_err(io_error(output))?;
        let base_dir = self.served_base_dir().await?;
        if !data.exists() {
            self.snapshot(record, data).await?;
        }
        let resume = crate::training::checkpoint::latest_state(output).ok().flatten().is_some();
        record.state = JobState::Running;
        record.attempts += 1;
        record.started.get_or_insert(now_secs());
        record.dir = Some(dir.clone());
        record.log = Some(log.clone());
        record.owner = Some(self.owner.clone());
        let mut child = self.spawn_trainer(record, &base_dir, &files, resume)?;
        record.pid = child.id();
        self.store.put(record).await?;
        tracing::info!(job = record.id, target = %record.target, attempt = record.attempts, resume, pid = record.pid, "training job started");

        self.metrics.jobs_started.inc();
        self.metrics.job_running.set(1);
        let ended = self.watch(record, progress, &mut child, shutdown).await;
        self.take_progress(record, progress);
        self.metrics.job_progress_ended(record.id, &record.target.key());
        self.metrics.job_running.set(0);
        record.pid = None;
        match ended {
            Ended::ShuttingDown => {
                record.state = JobState::Queued;
                record.owner = None;
                record.reason = Some("the daemon stopped; resumes at its next start".into());
                Ok(())
            }
            Ended::Cancelled => {
                record.state = JobState::Cancelled;
                record.reason = Some("cancelled while training".into());
                Ok(())
            }
            Ended::Exited(status) if status.success() => self.gate_and_promote(record, &base_dir, output).await,
            Ended::Exited(status) => {
                use std::os::unix::process::ExitStatusExt as _;
                let Some(signal) = status.signal() else {
                    return Err(RunnerError::Trainer(format!("trainer failed ({status}): {}", last_error_line(log))));
                };
                if record.attempts < self.settings.max_attempts {
                    tracing::warn!(job = record.id, signal, "trainer was killed; the job resumes from its last checkpoint");
                    record.state = JobState::Queued;
                    record.reason = Some(format!("trainer killed by signal {signal}; resuming"));
                    return Ok(());
                }
                Err(RunnerError::Trainer(format!(
                    "trainer killed by signal {signal} on each of {} tries (see {})",
                    record.attempts,
                    log.display()
                )))
            }
        }
    }

    /// Writes the job's data snapshot (the collected exchanges of its
    /// channels, opted-out authors left out) to `data`; too few is an error.
    async fn snapshot(&self, record: &mut JobRecord, data: &Path) -> Result<()> {
        let opted_out = self.opted_out();
        let (collect_dir, channels, path) = (self.collect_dir.clone(), record.channels.clone(), data.to_path_buf());
        let snap = tokio::task::spawn_blocking(move || super::dataset::snapshot(&collect_dir, &channels, &opted_out, &path))
            .await?
            .map_err(|e| RunnerError::Refused(format!("taking the data snapshot: {e}")))?;
        record.examples = Some(snap.exchanges);
        if snap.exchanges < self.settings.min_examples {
            let _ = std::fs::remove_file(data);
            let whose = if record.channels.is_empty() { "collected".to_string() } else { format!("collected in {}", record.channels.join(", ")) };
            return Err(RunnerError::Refused(format!(
                "only {} exchange(s) {whose}; a job needs at least {} (jobs.min_examples)",
                snap.exchanges, self.settings.min_examples
            )));
        }
        Ok(())
    }

    /// The gate on a finished trainer's output ([`super::gate`]); promotes
    /// (the atomic switch in Redis, then serving here) or rejects.
    async fn gate_and_promote(&self, record: &mut JobRecord, base_dir: &Path, output: &Path) -> Result<()> {
        record.reason = None;
        record.output = Some(output.to_path_buf());
        let metrics_path = output.join("metrics.json");
        let metrics = std::fs::read_to_string(&metrics_path)
            .map_err(|e| RunnerError::Refused(format!("the trainer wrote no metrics.json: {e}")))?;
        let metrics: serde_json::Value =
            serde_json::from_str(&metrics).map_err(|e| RunnerError::Refused(format!("metrics.json: {e}")))?;
        let (gate_passed, gate_reason) = trainer_decision(&metrics);
        record.metrics = Some(metrics);
        if !gate_passed {
            record.state = JobState::Rejected;
            record.reason = Some(gate_reason);
            return Ok(());
        }
        let (model, probes) = self.probe(&record.target, base_dir, output).await?;
        let failed = probes.iter().filter(|p| p.failed.is_some()).count();
        record.probes = probes;
        if failed > 0 {
            record.state = JobState::Rejected;
            record.reason = Some(format!("{failed} of {} probe prompts failed ({gate_reason})", record.probes.len()));
            return Ok(());
        }
        // The record is final from here (a rollback may change it later).
        self.store.push_version(&record.target, record.id).await?;
        record.state = JobState::Promoted;
        record.reason = Some(gate_reason);
        record.finished = Some(now_secs());
        self.store.put(record).await?;
        match &record.target {
            Target::Base => {
                if let Err(e) = self.serve_base(Some(record.id), model).await {
                    tracing::error!(job = record.id, error = %e, "promoted, but not served here yet; retrying at the next poll");
                }
            }
            Target::Persona(name) => self.personas.set_served(name, Some(record.id), Some(output.to_path_buf())),
        }
        Ok(())
    }

    fn spawn_trainer(
        &self,
        record: &JobRecord,
        base_dir: &Path,
        files: &JobFiles,
        resume: bool,
    ) -> Result<tokio::process::Child> {
        let JobFiles { data, output, log, progress } = files;
        let s = &self.settings;
        let trainer = match &s.trainer {
            Some(path) => path.clone(),
            None => std::env::current_exe().map_err(|e| RunnerError::Trainer(format!("cannot find this executable: {e}")))?,
        };
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_error(log))?;
        {
            use std::io::Write as _;
            let how = if resume { ", resuming from its last checkpoint" } else { "" };
            let header = format!("--- job #{} attempt {}{how}: {} train (unix time {})\n", record.id, record.attempts, trainer.display(), now_secs());
            (&log_file).write_all(header.as_bytes()).map_err(io_error(log))?;
        }
        let stderr = log_file.try_clone().map_err(io_error(log))?;
        let mut command = tokio::process::Command::new(&trainer);
        command
            .arg("train")
            .arg("--base")
            .arg(base_dir)
            .arg("--data")
            .arg(data)
            .arg("--out")
            .arg(output)
            .args(["--steps", &s.steps.to_string()])
            .args(["--lr", &s.lr.to_string()])
            .args(["--batch-size", &s.batch_size.to_string()])
            .args(["--grad-accum", &s.grad_accum.to_string()])
            .args(["--max-seq-len", &s.max_seq_len.to_string()])
            .args(["--eval-fraction", &s.eval_fraction.to_string()])
            .args(["--checkpoint-every", &s.checkpoint_every.to_string()])
            .args(["--max-ppl-regression", &s.max_ppl_regression.to_string()])
            .args(["--device", &s.device])
            .arg("--progress-file")
            .arg(progress)
            .arg("--json");
        if let Target::Persona(_) = record.target {
            command.args(["--lora-rank", &s.lora_rank.to_string()]);
        }
        let opt_out = self.collect_dir.join(crate::collect::OPTED_OUT_FILE);
        if opt_out.exists() {
            command.arg("--opt-out").arg(opt_out);
        }
        if resume {
            command.arg("--resume");
        }
        command.stdin(Stdio::null()).stdout(Stdio::from(log_file)).stderr(Stdio::from(stderr)).kill_on_drop(true);
        command.spawn().map_err(|e| RunnerError::Trainer(format!("cannot start the trainer {}: {e}", trainer.display())))
    }

    /// Waits for the trainer, keeping the device lock, copying its progress
    /// into the record (and the metrics) and watching for a cancel or
    /// shutdown.
    async fn watch(&self, record: &mut JobRecord, progress: &Path, child: &mut tokio::process::Child, shutdown: &Shutdown) -> Ended {
        let id = record.id;
        let mut tick = tokio::time::interval(self.settings.poll);
        loop {
            tokio::select! {
                status = child.wait() => {
                    return match status {
                        Ok(status) => Ended::Exited(status),
                        Err(e) => {
                            tracing::error!(job = id, error = %e, "lost the trainer process");
                            let _ = child.start_kill();
                            Ended::Cancelled
                        }
                    };
                }
                _ = shutdown.clone().wait() => {
                    let _ = child.kill().await;
                    return Ended::ShuttingDown;
                }
                _ = tick.tick() => {
                    if let Err(e) = self.store.refresh_lock(&self.settings.device, &self.owner, self.lock_ttl()).await {
                        tracing::warn!(job = id, error = %e, "could not refresh the device lock");
                    }
                    if self.store.cancel_requested(id).await.unwrap_or(false) {
                        tracing::info!(job = id, "cancel asked for: stopping the trainer");
                        let _ = child.kill().await;
                        return Ended::Cancelled;
                    }
                    if self.take_progress(record, progress) {
                        if let Err(e) = self.store.put(record).await {
                            tracing::warn!(job = id, error = %e, "could not record the job's progress");
                        }
                    }
                }
            }
        }
    }

    /// Reads the trainer's progress file into the record and the metrics;
    /// true when it changed. An unreadable file is logged and skipped (the
    /// next look may find it whole).
    fn take_progress(&self, record: &mut JobRecord, path: &Path) -> bool {
        let progress = match crate::training::Progress::read(path) {
            Ok(Some(progress)) => progress,
            Ok(None) => return false,
            Err(e) => {
                tracing::debug!(job = record.id, error = %e, "progress file not readable");
                return false;
            }
        };
        if record.progress.as_ref() == Some(&progress) {
            return false;
        }
        self.metrics.job_progress(record.id, &record.target.key(), &progress);
        record.progress = Some(progress);
        true
    }

    /// Loads the job's model and answers the probe prompts with it (greedy,
    /// on a blocking thread; see [`Probe`]). Returns the model when it is a
    /// new base, so promotion need not load it twice.
    async fn probe(&self, target: &Target, base_dir: &Path, output: &Path) -> Result<(Option<Gpt2>, Vec<ProbeResult>)> {
        let seed = match target {
            Target::Persona(name) => self.personas.get(name).await?.map(|p| p.seed).unwrap_or_default(),
            Target::Base => Vec::new(),
        };
        let params = self.generation.borrow().sampling();
        let safety = self.safety.borrow().clone();
        let (spec, prompts) = (self.base.spec.clone(), self.settings.probes.clone());
        let (target, base_dir, output) = (target.clone(), base_dir.to_path_buf(), output.to_path_buf());
        let probed = tokio::task::spawn_blocking(move || {
            Probe { spec: &spec, base_dir: &base_dir, output: &output, target: &target, seed: &seed, prompts: &prompts, params, safety: &safety }
                .run()
        })
        .await??;
        Ok(probed)
    }

    /// The base checkpoint served now (what jobs train from).
    async fn served_base_dir(&self) -> Result<PathBuf> {
        let served = *self.served_base.lock().await;
        self.base_dir_of(served).await
    }

    async fn base_dir_of(&self, version: Option<u64>) -> Result<PathBuf> {
        let Some(id) = version else { return Ok(self.base.dir.clone()) };
        let record = self.store.get(id).await?.ok_or_else(|| RunnerError::Refused(format!("promoted job #{id} has no record")))?;
        record.output.ok_or_else(|| RunnerError::Refused(format!("promoted job #{id} has no output folder")))
    }

    /// Serves `version` of the base model in the pool (loading it unless
    /// `model` is given).
    async fn serve_base(&self, version: Option<u64>, model: Option<Gpt2>) -> Result<()> {
        let mut served = self.served_base.lock().await;
        let Some(pool) = &self.pool else {
            *served = version;
            return Ok(());
        };
        let model = match model {
            Some(model) => model,
            None => {
                let (spec, dir) = (self.base.spec.clone(), self.base_dir_of(version).await?);
                tokio::task::spawn_blocking(move || crate::serving::load_weights(&spec, &dir))
                    .await?
                    .map_err(|e| RunnerError::Serve(e.to_string()))?
            }
        };
        let pool_version = pool.swap_model(model).await.map_err(|e| RunnerError::Serve(e.to_string()))?;
        tracing::info!(job = version, pool_version, "the pool now serves base model version {}", version.map_or("original".into(), |v| format!("#{v}")));
        *served = version;
        Ok(())
    }

    /// Applies promotions and rollbacks made anywhere.
    pub async fn sync_served(&self) -> Result<()> {
        let personas = self.personas.all().await?;
        let mut targets = vec![Target::Base];
        targets.extend(personas.iter().map(|p| Target::Persona(p.name.clone())));
        let served = self.store.served(&targets).await?;
        for (target, version) in targets.iter().zip(served) {
            match target {
                Target::Base => {
                    if *self.served_base.lock().await != version {
                        self.serve_base(version, None).await?;
                    }
                }
                Target::Persona(name) => {
                    if self.personas.served_version(name) != version {
                        let dir = match version {
                            Some(id) => Some(self.base_dir_of(Some(id)).await?),
                            None => None,
                        };
                        tracing::info!(persona = %name, version = version, "persona now serves version {}", version.map_or("original".into(), |v| format!("#{v}")));
                        self.personas.set_served(name, version, dir);
                    }
                }
            }
        }
        Ok(())
    }

    fn opted_out(&self) -> std::collections::HashSet<String> {
        crate::collect::read_opted_out(&self.collect_dir).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the opted-out authors; taking none");
            Default::default()
        })
    }
}

/// Queues a job for every schedule that came due in `(after, now]` (Unix
/// seconds). Each firing is taken once across every daemon sharing Redis.
/// Returns the ids queued.
pub async fn fire_schedules(store: &JobStore, schedules: &[Schedule], after: u64, now: u64) -> Result<Vec<u64>> {
    let mut queued = Vec::new();
    for schedule in schedules {
        let Some(due) = schedule.cron.next_after(after) else { continue };
        if due > now || !store.take_firing(&schedule.name, due).await? {
            continue;
        }
        let target = if schedule.persona.is_empty() { Target::Base } else { Target::Persona(schedule.persona.clone()) };
        let record = store
            .create(target, format!("schedule:{}", schedule.name), schedule.channels.clone())
            .await?;
        tracing::info!(job = record.id, schedule = %schedule.name, "scheduled job queued");
        queued.push(record.id);
    }
    Ok(queued)
}

/// The last line of a trainer log that says what went wrong.
fn last_error_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.chars().take(500).collect())
        .unwrap_or_else(|| format!("no output (see {})", log.display()))
}
