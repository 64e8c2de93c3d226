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

use super::personas::Personas;
use super::store::JobStore;
use super::{now_secs, JobRecord, JobState, ProbeResult, Target};
use crate::cli::ModelArgs;
use crate::model::Gpt2;
use crate::pipeline::Pipeline;
use crate::pool::PoolHandle;
use crate::settings::{JobSettings, Schedule, TrainMode};
use crate::telemetry::Metrics;

/// What the runner needs to know about the model it trains and serves.
#[derive(Debug, Clone)]
pub struct BaseModel {
    /// The original base checkpoint (a resolved local folder).
    pub dir: PathBuf,
    pub device: String,
    pub dtype: String,
    /// `model.quantize` and `model.kv_cache`: a promoted base model is
    /// served as the original was.
    pub quantize: String,
    pub kv_cache: String,
}

/// The runner of one daemon.
pub struct Runner {
    store: JobStore,
    settings: JobSettings,
    /// Where the collected exchanges are (`collect.dir`).
    collect_dir: PathBuf,
    base: BaseModel,
    /// The pool whose base model promotions replace; `None`: base
    /// promotions are recorded but not served here.
    pool: Option<PoolHandle>,
    pipeline: Pipeline,
    personas: Arc<Personas>,
    /// This daemon's name in locks and records.
    owner: String,
    /// The promoted base version served here (`None`: the original).
    served_base: tokio::sync::Mutex<Option<u64>>,
    metrics: Arc<Metrics>,
}

/// How a trainer run ended.
enum Ended {
    Exited(std::process::ExitStatus),
    Cancelled,
    ShuttingDown,
}

impl Runner {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: JobStore,
        settings: JobSettings,
        collect_dir: PathBuf,
        base: BaseModel,
        pool: Option<PoolHandle>,
        pipeline: Pipeline,
        personas: Arc<Personas>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let owner = format!("{host}:{}:{}", std::process::id(), now_secs());
        Self { store, settings, collect_dir, base, pool, pipeline, personas, owner, served_base: tokio::sync::Mutex::new(None), metrics }
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
    async fn recover_orphans(&self) -> Result<(), String> {
        let err = |e: super::StoreError| e.to_string();
        for record in self.store.list(50).await.map_err(err)? {
            if record.state != JobState::Running {
                continue;
            }
            if self.store.lock_holder(&self.settings.device).await.map_err(err)?.is_some() {
                continue;
            }
            let mut record = record;
            tracing::warn!(job = record.id, owner = ?record.owner, "job's daemon is gone: queueing it to resume");
            record.state = JobState::Queued;
            record.pid = None;
            record.owner = None;
            self.store.put(&record).await.map_err(err)?;
            self.store.requeue_front(record.id).await.map_err(err)?;
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
            record.reason = Some(why);
        }
        if record.state.is_final() {
            record.finished = Some(now_secs());
            record.pid = None;
        }
        tracing::info!(job = record.id, state = record.state.as_str(), reason = ?record.reason, "job ended");
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
    async fn attempt(&self, record: &mut JobRecord, shutdown: &Shutdown) -> Result<(), String> {
        let dir = self.settings.dir.join(format!("job-{}", record.id));
        let output = dir.join("output");
        let log = dir.join("train.log");
        std::fs::create_dir_all(&output).map_err(|e| format!("{}: {e}", output.display()))?;
        let data = dir.join("data.jsonl");
        let base_dir = self.served_base_dir().await?;
        if !data.exists() {
            let opted_out = self.opted_out();
            let (collect_dir, channels, path) = (self.collect_dir.clone(), record.channels.clone(), data.clone());
            let snap = tokio::task::spawn_blocking(move || super::dataset::snapshot(&collect_dir, &channels, &opted_out, &path))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("taking the data snapshot: {e}"))?;
            record.examples = Some(snap.exchanges);
            if snap.exchanges < self.settings.min_examples {
                let _ = std::fs::remove_file(&data);
                let whose = if record.channels.is_empty() { "collected".to_string() } else { format!("collected in {}", record.channels.join(", ")) };
                return Err(format!(
                    "only {} exchange(s) {whose}; a job needs at least {} (jobs.min_examples)",
                    snap.exchanges, self.settings.min_examples
                ));
            }
        }
        let resume = crate::training::checkpoint::latest_state(&output).ok().flatten().is_some();
        record.state = JobState::Running;
        record.attempts += 1;
        record.started.get_or_insert(now_secs());
        record.dir = Some(dir.clone());
        record.log = Some(log.clone());
        record.owner = Some(self.owner.clone());
        let mut child = self.spawn_trainer(record, &base_dir, &data, &output, &log, resume)?;
        record.pid = child.id();
        self.store.put(record).await.map_err(|e| e.to_string())?;
        tracing::info!(job = record.id, target = %record.target, attempt = record.attempts, resume, pid = ?record.pid, "training job started");

        self.metrics.jobs_started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.job_running.store(true, std::sync::atomic::Ordering::Relaxed);
        let ended = self.watch(record.id, &mut child, shutdown).await;
        self.metrics.job_running.store(false, std::sync::atomic::Ordering::Relaxed);
        record.pid = None;
        match ended {
            Ended::ShuttingDown => {
                record.state = JobState::Queued;
                record.owner = None;
                record.reason = Some("the daemon stopped; resumes at its next start".into());
                return Ok(());
            }
            Ended::Cancelled => {
                record.state = JobState::Cancelled;
                record.reason = Some("cancelled while training".into());
                return Ok(());
            }
            Ended::Exited(status) if status.success() => {}
            Ended::Exited(status) => {
                use std::os::unix::process::ExitStatusExt as _;
                if let Some(signal) = status.signal() {
                    if record.attempts < self.settings.max_attempts {
                        tracing::warn!(job = record.id, signal, "trainer was killed; the job resumes from its last checkpoint");
                        record.state = JobState::Queued;
                        record.reason = Some(format!("trainer killed by signal {signal}; resuming"));
                        return Ok(());
                    }
                    return Err(format!("trainer killed by signal {signal} on each of {} tries (see {})", record.attempts, log.display()));
                }
                return Err(format!("trainer failed ({status}): {}", last_error_line(&log)));
            }
        }
        record.reason = None;
        record.output = Some(output.clone());
        let metrics = std::fs::read_to_string(output.join("metrics.json"))
            .map_err(|e| format!("the trainer wrote no metrics.json: {e}"))?;
        let metrics: serde_json::Value = serde_json::from_str(&metrics).map_err(|e| format!("metrics.json: {e}"))?;
        let gate_passed = metrics.pointer("/gate/promote").and_then(|v| v.as_bool()).unwrap_or(false);
        let gate_reason = metrics.pointer("/gate/reason").and_then(|v| v.as_str()).unwrap_or("no gate decision").to_string();
        record.metrics = Some(metrics);
        if !gate_passed {
            record.state = JobState::Rejected;
            record.reason = Some(gate_reason);
            return Ok(());
        }
        let (model, probes) = self.probe(&record.target, &base_dir, &output).await?;
        let failed = probes.iter().filter(|p| p.failed.is_some()).count();
        record.probes = probes;
        if failed > 0 {
            record.state = JobState::Rejected;
            record.reason = Some(format!("{failed} of {} probe prompts failed ({gate_reason})", record.probes.len()));
            return Ok(());
        }
        // Promotion: the atomic switch in Redis, then serving here. The
        // record is final from here (a rollback may change it later).
        self.store.push_version(&record.target, record.id).await.map_err(|e| e.to_string())?;
        record.state = JobState::Promoted;
        record.reason = Some(gate_reason);
        record.finished = Some(now_secs());
        self.store.put(record).await.map_err(|e| e.to_string())?;
        match &record.target {
            Target::Base => {
                if let Err(e) = self.serve_base(Some(record.id), model).await {
                    tracing::error!(job = record.id, error = %e, "promoted, but not served here yet; retrying at the next poll");
                }
            }
            Target::Persona(name) => self.personas.set_served(name, Some(record.id), Some(output)),
        }
        Ok(())
    }

    fn spawn_trainer(
        &self,
        record: &JobRecord,
        base_dir: &Path,
        data: &Path,
        output: &Path,
        log: &Path,
        resume: bool,
    ) -> Result<tokio::process::Child, String> {
        let s = &self.settings;
        let trainer = match &s.trainer {
            Some(path) => path.clone(),
            None => std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?,
        };
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        {
            use std::io::Write as _;
            let how = if resume { ", resuming from its last checkpoint" } else { "" };
            let header = format!("--- job #{} attempt {}{how}: {} train (unix time {})\n", record.id, record.attempts, trainer.display(), now_secs());
            (&log_file).write_all(header.as_bytes()).map_err(|e| format!("{}: {e}", log.display()))?;
        }
        let stderr = log_file.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
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
        command.spawn().map_err(|e| format!("cannot start the trainer {}: {e}", trainer.display()))
    }

    /// Waits for the trainer, keeping the device lock and watching for a
    /// cancel or shutdown.
    async fn watch(&self, id: u64, child: &mut tokio::process::Child, shutdown: &Shutdown) -> Ended {
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
                }
            }
        }
    }

    /// Loads the job's model and answers the probe prompts with it (greedy,
    /// on a blocking thread). Returns the model when it is a new base, so
    /// promotion need not load it twice.
    async fn probe(&self, target: &Target, base_dir: &Path, output: &Path) -> Result<(Option<Gpt2>, Vec<ProbeResult>), String> {
        let (base, target, base_dir, output) = (self.base.clone(), target.clone(), base_dir.to_path_buf(), output.to_path_buf());
        let probes = self.settings.probes.clone();
        let seed = match &target {
            Target::Persona(name) => self.personas.get(name).await?.map(|p| p.seed).unwrap_or_default(),
            Target::Base => Vec::new(),
        };
        let mut params = self.pipeline.generation().sampling();
        params.temperature = 0.0;
        params.seed = Some(0);
        let pipeline = self.pipeline.clone();
        tokio::task::spawn_blocking(move || -> Result<(Option<Gpt2>, Vec<ProbeResult>), String> {
            let device = crate::model::parse_device(&base.device).map_err(|e| e.to_string())?;
            let dtype = crate::model::parse_dtype(&base.dtype, &device).map_err(|e| e.to_string())?;
            let tokenizer = crate::tokenizer::DialogTokenizer::from_dir(&base_dir).map_err(|e| e.to_string())?;
            let model = match &target {
                Target::Base => {
                    let serving = crate::model::ServingOptions::parse(&base.quantize, &base.kv_cache)?;
                    serving.load(&output, dtype, &device).map_err(|e| format!("loading the new model: {e}"))?
                }
                Target::Persona(_) => crate::training::load_persona(&base_dir, &output, dtype, &device)
                    .map_err(|e| format!("loading the new adapter: {e}"))?,
            };
            let mut results = Vec::new();
            for prompt in probes {
                let mut turns: Vec<Vec<u32>> = Vec::new();
                for text in seed.iter().chain(std::iter::once(&prompt)) {
                    turns.push(tokenizer.encode(text).map_err(|e| e.to_string())?);
                }
                let budget = model.config().n_positions.saturating_sub(params.max_new_tokens);
                let built = crate::prompt::build_prompt(&turns, tokenizer.eos_id(), budget).map_err(|e| e.to_string())?;
                let generated = crate::generate::generate(&model, &built.ids, &params, |_| true).map_err(|e| e.to_string())?;
                let reply = tokenizer.decode(&generated.output_ids).map_err(|e| e.to_string())?.trim().to_string();
                let failed = pipeline.judge_probe(&prompt, &reply);
                results.push(ProbeResult { prompt, reply, failed });
            }
            Ok((matches!(target, Target::Base).then_some(model), results))
        })
        .await
        .map_err(|e| format!("probing panicked: {e}"))?
    }

    /// The base checkpoint served now (what jobs train from).
    async fn served_base_dir(&self) -> Result<PathBuf, String> {
        let served = *self.served_base.lock().await;
        self.base_dir_of(served).await
    }

    async fn base_dir_of(&self, version: Option<u64>) -> Result<PathBuf, String> {
        let Some(id) = version else { return Ok(self.base.dir.clone()) };
        let record = self.store.get(id).await.map_err(|e| e.to_string())?.ok_or_else(|| format!("promoted job #{id} has no record"))?;
        record.output.ok_or_else(|| format!("promoted job #{id} has no output folder"))
    }

    /// Serves `version` of the base model in the pool (loading it unless
    /// `model` is given).
    async fn serve_base(&self, version: Option<u64>, model: Option<Gpt2>) -> Result<(), String> {
        let mut served = self.served_base.lock().await;
        let Some(pool) = &self.pool else {
            *served = version;
            return Ok(());
        };
        let model = match model {
            Some(model) => model,
            None => {
                let args = ModelArgs {
                    model: self.base_dir_of(version).await?.display().to_string(),
                    device: self.base.device.clone(),
                    dtype: self.base.dtype.clone(),
                    quantize: self.base.quantize.clone(),
                    kv_cache: self.base.kv_cache.clone(),
                };
                tokio::task::spawn_blocking(move || crate::cli::load(&args, false))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("{e:#}"))?
                    .model
            }
        };
        let pool_version = pool.swap_model(model).await.map_err(|e| e.to_string())?;
        tracing::info!(job = ?version, pool_version, "the pool now serves base model version {}", version.map_or("original".into(), |v| format!("#{v}")));
        *served = version;
        Ok(())
    }

    /// Applies promotions and rollbacks made anywhere.
    pub async fn sync_served(&self) -> Result<(), String> {
        let personas = self.personas.all().await?;
        let mut targets = vec![Target::Base];
        targets.extend(personas.iter().map(|p| Target::Persona(p.name.clone())));
        let served = self.store.served(&targets).await.map_err(|e| e.to_string())?;
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
                        tracing::info!(persona = %name, version = ?version, "persona now serves version {}", version.map_or("original".into(), |v| format!("#{v}")));
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
pub async fn fire_schedules(store: &JobStore, schedules: &[Schedule], after: u64, now: u64) -> Result<Vec<u64>, String> {
    let mut queued = Vec::new();
    for schedule in schedules {
        let Some(due) = schedule.cron.next_after(after) else { continue };
        if due > now || !store.take_firing(&schedule.name, due).await.map_err(|e| e.to_string())? {
            continue;
        }
        let target = if schedule.persona.is_empty() { Target::Base } else { Target::Persona(schedule.persona.clone()) };
        let record = store
            .create(target, format!("schedule:{}", schedule.name), schedule.channels.clone())
            .await
            .map_err(|e| e.to_string())?;
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

impl TrainMode {
    /// The target a moderator's `/train` trains in this mode.
    pub fn target_for(self, persona: Option<&str>) -> Result<Target, String> {
        match (self, persona) {
            (TrainMode::Full, _) => Ok(Target::Base),
            (TrainMode::Lora, Some(name)) => Ok(Target::Persona(name.to_string())),
            (TrainMode::Lora, None) => Err(
                "jobs train a persona's adapter here, and this channel has none: /persona create NAME, then /persona use NAME".into(),
            ),
        }
    }
}
