//! `dialogd jobs list|show|run|cancel|rollback`: fine-tuning jobs, through
//! the records in Redis that every daemon sharing it acts on.
//!
//! These commands only read and write records: the daemons' runners run
//! the jobs (one at a time per device) and apply promotions and rollbacks
//! within one `jobs.poll`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::personas::{redis::RedisPersonaStore, Personas};
use crate::jobs::{JobRecord, JobState, JobStore, Target};
use crate::settings::{self, Settings, TrainMode};
use crate::training::progress::{duration_text, ProgressView};

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Settings file (its [context] names the Redis that holds the jobs).
    #[arg(long, value_name = "FILE", global = true, env = "DIALOGD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// The newest jobs, newest first.
    List {
        /// How many jobs to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// One JSON array of job records.
        #[arg(long)]
        json: bool,
    },
    /// One job, whole: metrics, probe replies, log path.
    Show {
        /// The job's id (`jobs list` shows them).
        id: u64,
        /// The job record as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Queues a job (a daemon runs it).
    Run {
        /// Train this persona's LoRA adapter.
        #[arg(long, value_name = "NAME", conflicts_with = "base")]
        persona: Option<String>,
        /// Fine-tune the base model (every weight).
        #[arg(long)]
        base: bool,
        /// Train on this channel's collected exchanges (repeatable; default: all).
        #[arg(long = "channel", value_name = "PLATFORM:ID")]
        channels: Vec<String>,
        /// Wait for the job to end; exit 0 only if it was promoted.
        #[arg(long)]
        wait: bool,
        /// The queued (or, with --wait, finished) job record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancels a queued or running job.
    Cancel {
        /// The job's id.
        id: u64,
    },
    /// Returns a target to the version before its newest promotion.
    Rollback {
        /// Roll this persona's adapter back.
        #[arg(long, value_name = "NAME", conflicts_with = "base")]
        persona: Option<String>,
        /// Roll the base model back.
        #[arg(long)]
        base: bool,
    },
}

pub fn run(args: JobsArgs) -> anyhow::Result<ExitCode> {
    // Without the collection key or platform tokens: only the daemon needs them.
    let settings = settings::load_for_jobs(args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run_async(settings, args.command))
}

async fn run_async(settings: Settings, command: JobsCommand) -> anyhow::Result<ExitCode> {
    let c = &settings.context;
    let store = JobStore::connect(c.redis_url.expose(), &c.key_prefix, c.redis_timeout)
        .await
        .with_context(|| format!("connecting to {}", settings::redact_url(c.redis_url.expose())))?;
    match command {
        JobsCommand::List { limit, json } => {
            let records = store.list(limit).await?;
            if json {
                println!("{}", serde_json::to_string(&records)?);
            } else if records.is_empty() {
                println!("no jobs yet");
            } else {
                let queued = store.queued().await?;
                for r in &records {
                    let place = queued.iter().position(|&id| id == r.id).map(|p| format!(" (queue position {})", p + 1));
                    println!("{}  [{}]{}", r.summary(), r.trigger, place.unwrap_or_default());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Show { id, json } => {
            let record = store.get(id).await?.with_context(|| format!("there is no job #{id}"))?;
            if json {
                println!("{}", serde_json::to_string(&record)?);
            } else {
                print_record(&record);
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Run { persona, base, channels, wait, json } => {
            if let Some(bad) = channels.iter().find(|c| dialogd_adapters::ChannelKey::parse(c).is_none()) {
                anyhow::bail!("--channel {bad:?} is not platform:channel_id");
            }
            let target = target_of(&settings, persona, base).await?;
            let record = store.create(target, "cli".into(), channels).await?;
            if !wait {
                if json {
                    println!("{}", serde_json::to_string(&record)?);
                } else {
                    println!("queued job #{} for {}", record.id, record.target);
                }
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("queued job #{} for {}; waiting for a daemon to run it…", record.id, record.target);
            let mut last = record.state;
            // A bar on a terminal, a line every few seconds otherwise.
            let mut view = ProgressView::new(format!("job #{}", record.id));
            let record = loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(record) = store.get(record.id).await? else { anyhow::bail!("job #{} disappeared", record.id) };
                if record.state != last {
                    if last == JobState::Running {
                        view.finish();
                    }
                    view.println(&format!("job #{}: {}", record.id, record.state.as_str()));
                    last = record.state;
                }
                match (&record.progress, record.state) {
                    (Some(progress), JobState::Running) => view.show(progress),
                    _ if record.state.is_final() => break record,
                    _ => {}
                }
            };
            view.finish();
            if json {
                println!("{}", serde_json::to_string(&record)?);
            } else {
                print_record(&record);
            }
            Ok(if record.state == JobState::Promoted { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        JobsCommand::Cancel { id } => {
            let record = store.cancel(id).await?;
            if record.state == JobState::Cancelled {
                println!("cancelled job #{id}");
            } else {
                println!("job #{id} is running: its daemon stops it within one poll");
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Rollback { persona, base } => {
            let target = target_of(&settings, persona, base).await?;
            println!("{}", crate::jobs::gate::rollback_text(&store, &target).await?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--persona NAME` / `--base`, or what `jobs.mode` implies.
async fn target_of(settings: &Settings, persona: Option<String>, base: bool) -> anyhow::Result<Target> {
    match (persona, base) {
        (_, true) => Ok(Target::Base),
        (Some(name), false) => {
            let c = &settings.context;
            let store = RedisPersonaStore::connect(c.redis_url.expose(), &c.key_prefix, c.redis_timeout).await?;
            let personas = Personas::new(settings.personas.clone(), std::sync::Arc::new(store));
            if personas.get(&name).await?.is_none() {
                anyhow::bail!("there is no persona {name:?} (define it in [personas] or with /persona create)");
            }
            Ok(Target::Persona(name))
        }
        (None, false) if settings.jobs.mode == TrainMode::Full => Ok(Target::Base),
        (None, false) => anyhow::bail!("jobs.mode is \"lora\": name the persona to train with --persona NAME (or --base)"),
    }
}

fn print_record(r: &JobRecord) {
    println!("{}", r.summary());
    println!("  trigger: {}", r.trigger);
    if !r.channels.is_empty() {
        println!("  channels: {}", r.channels.join(", "));
    }
    if let Some(n) = r.examples {
        println!("  exchanges: {n}");
    }
    println!("  attempts: {}", r.attempts);
    for (label, path) in [("folder", &r.dir), ("log", &r.log), ("output", &r.output)] {
        if let Some(path) = path {
            println!("  {label}: {}", path.display());
        }
    }
    if let Some(progress) = &r.progress {
        println!("  progress: {} (updated {})", progress.describe(), ago(progress.updated));
    }
    if let Some(tps) = r.metrics.as_ref().and_then(|m| m.get("tokens_per_s")).and_then(|v| v.as_f64()) {
        println!("  training: {tps:.0} tokens/s");
    }
    for p in &r.probes {
        let verdict = p.failed.as_deref().map_or("ok".to_string(), |why| format!("FAILED: {why}"));
        println!("  probe {:?} → {:?} ({verdict})", p.prompt, p.reply);
    }
}

/// `12s ago` for a Unix time (`just now` when it is not in the past).
fn ago(unix_secs: u64) -> String {
    match crate::jobs::now_secs().saturating_sub(unix_secs) {
        0 => "just now".to_string(),
        secs => format!("{} ago", duration_text(secs)),
    }
}
