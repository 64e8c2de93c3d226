//! `dialogd run` (the daemon) and `dialogd check-config`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use crate::daemon::{self, Daemon, Listening};
use crate::pipeline::engine::{PoolEngine, RemoteEngine, ReplyEngine};
use crate::remote::{self, StreamClient, WorkerOptions, WorkerStats};
use crate::settings::Backend;
use crate::serving;
use crate::settings;
use crate::telemetry::{self, Metrics};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Settings file (TOML) over the built-in defaults (`dialogd config
    /// defaults` prints them); without it the defaults and DIALOGD__…
    /// variables alone are used.
    #[arg(long, value_name = "FILE", env = "DIALOGD_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `dialogd config`: the settings' documentation.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Print config/default.toml (every key, commented, with its default).
    Defaults,
}

/// `dialogd config defaults`.
pub fn config(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        ConfigCommand::Defaults => print!("{}", settings::DEFAULT_TOML),
    }
    Ok(ExitCode::SUCCESS)
}

/// `dialogd check-config`: validates and prints the effective settings.
pub fn check_config(args: RunArgs) -> anyhow::Result<ExitCode> {
    let settings = settings::load(args.config.as_deref())?;
    // The Redis URLs `run` would refuse (the redis crate's parse) are
    // refused here too.
    if settings.context.store == settings::StoreKind::Redis {
        crate::context::redis::check_url(settings.context.redis_url.expose())
            .map_err(|e| anyhow::anyhow!("context.redis_url: {e}"))?;
    }
    for name in settings::stray_env_vars(std::env::vars_os()) {
        eprintln!("warning: {name} is ignored: settings come from DIALOGD__SECTION__KEY variables (two underscores after DIALOGD)");
    }
    print!("{}", settings.to_redacted_toml());
    Ok(ExitCode::SUCCESS)
}

/// `dialogd run`: the daemon, until SIGTERM or SIGINT.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let settings = settings::load(args.config.as_deref())?;
    telemetry::init_logging(settings.telemetry.log_format, &settings.telemetry.log_filter);
    for name in settings::stray_env_vars(std::env::vars_os()) {
        tracing::warn!(variable = %name, "ignored: settings come from DIALOGD__SECTION__KEY variables (two underscores after DIALOGD)");
    }
    let json_logs = settings.telemetry.log_format == settings::LogFormat::Json;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let served = runtime.block_on(async move {
        // Signals are caught from the start, so one during model loading
        // is not lost (the default action would kill the process).
        let mut stop = tokio::spawn(daemon::stop_signal());
        // SIGHUP too: one during loading is applied once the daemon serves.
        let hup = daemon::sighup_listener();
        let metrics = Metrics::new();
        // /healthz (503 "loading") and /metrics answer while the model
        // loads or downloads.
        let listening = Listening::bind(&settings, metrics.clone()).await?;
        let started = settings.clone();
        let startup = start_daemon(listening, settings, metrics.clone());
        let daemon = tokio::select! {
            daemon = startup => daemon?,
            _ = &mut stop => {
                // The load goes on in a blocking thread; the runtime is
                // left without waiting for it.
                tracing::info!("stopped while loading: nothing was served");
                return anyhow::Ok(Outcome::StoppedLoading);
            }
        };
        let reload = tokio::spawn(daemon::reload_on_sighup(hup, daemon.pipeline().clone(), args.config, started, metrics));
        let served = daemon
            .serve(async move {
                let _ = stop.await;
            })
            .await;
        reload.abort();
        // A failed adapter ends `run` non-zero, so systemd's
        // Restart=on-failure sees it.
        served?;
        tracing::info!("stopped");
        anyhow::Ok(Outcome::Served)
    });
    if matches!(served, Ok(Outcome::StoppedLoading)) {
        runtime.shutdown_background();
    }
    // Under log_format = "json" the reason is a JSON log line, once;
    // otherwise the plain `error: …` line every command prints.
    match served {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) if json_logs => {
            tracing::error!(error = %super::report(&e), "dialogd cannot run");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e),
    }
}

/// How `run` ended without an error.
enum Outcome {
    Served,
    /// SIGTERM or SIGINT came while the model was loading (exit 0).
    StoppedLoading,
}

/// Loads the model (or, for `backend = "redis"`, its tokenizer and
/// config) and starts the daemon on the sockets already bound.
async fn start_daemon(listening: Listening, settings: settings::Settings, metrics: Arc<Metrics>) -> anyhow::Result<Daemon> {
    let spec = daemon::model_spec(&settings.model);
    tracing::info!(
        model = %spec.model,
        device = %spec.device,
        dtype = %spec.dtype,
        quantize = %spec.quantize,
        kv_cache = %spec.kv_cache,
        "loading model"
    );
    let (engine, pool, tokenizer) = match settings.generation.backend {
        Backend::Local => {
            let loaded = tokio::task::spawn_blocking(move || serving::load(&spec)).await??;
            let engine = PoolEngine::start(loaded.model, &settings.generation, metrics.clone())
                .context("starting the generation pool")?;
            let pool = engine.handle().clone();
            (Arc::new(engine) as Arc<dyn ReplyEngine>, Some(pool), loaded.tokenizer)
        }
        Backend::Redis => {
            let (tokenizer, config) = tokio::task::spawn_blocking(move || serving::load_front(&spec)).await??;
            let engine = remote_engine(&settings, config.n_positions, metrics.clone()).await?;
            (Arc::new(engine) as Arc<dyn ReplyEngine>, None, tokenizer)
        }
    };
    Ok(Daemon::start_on(Some(listening), settings, engine, pool, tokenizer, metrics).await?)
}

/// The daemon's engine for `backend = "redis"`: requests go to the stream
/// on `context.redis_url` under `context.key_prefix`.
pub async fn remote_engine(
    settings: &settings::Settings,
    n_positions: usize,
    metrics: Arc<Metrics>,
) -> anyhow::Result<RemoteEngine> {
    let timeout = std::time::Duration::from_millis(settings.generation.timeout_ms);
    let client = StreamClient::connect(
        settings.context.redis_url.expose(),
        &settings.context.key_prefix,
        timeout,
        settings.generation.queue_depth,
    )
    .await
    .context("generation.backend = \"redis\": connecting to context.redis_url")?;
    Ok(RemoteEngine::new(client, n_positions, metrics))
}

/// `dialogd worker`: loads `[model]`, starts a local generation pool and
/// answers requests from the Redis stream until SIGTERM or SIGINT, then
/// finishes what it took.
pub fn worker(args: RunArgs) -> anyhow::Result<ExitCode> {
    let settings = settings::load(args.config.as_deref())?;
    telemetry::init_logging(settings.telemetry.log_format, &settings.telemetry.log_filter);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let stop = tokio::spawn(daemon::stop_signal());
        let spec = daemon::model_spec(&settings.model);
        // Promoted base models come from jobs.artifacts_dir: checked before
        // the model loads, so a missing mount is the first thing said.
        let artifacts = &settings.jobs.artifacts_dir;
        if settings.jobs.enabled {
            serving::check_artifacts_dir(artifacts, false).with_context(|| {
                format!("jobs.artifacts_dir: {}: promoted base models are loaded from there: it must be a folder this host sees (a shared filesystem)", artifacts.display())
            })?;
        }
        let cache_dir = &settings.worker.cache_dir;
        std::fs::create_dir_all(cache_dir).with_context(|| format!("worker.cache_dir: {}", cache_dir.display()))?;
        // `/metrics` from before the model loads (telemetry.metrics_listen;
        // on a host shared with a daemon, give the worker its own port).
        let metrics = Metrics::new();
        let consumer = match settings.worker.consumer.as_str() {
            "" => remote::process_name(),
            name => name.to_string(),
        };
        let stats = Arc::new(WorkerStats::default());
        let _ = metrics.worker.set((consumer.clone(), stats.clone()));
        let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped = async move {
            let _ = metrics_stopped.await;
        };
        let metrics_task = daemon::serve_metrics_on(&settings, metrics.clone(), stopped).await?;
        if let Some((addr, _)) = &metrics_task {
            tracing::info!(metrics = %addr, %consumer, "worker: serving /metrics");
        }
        tracing::info!(model = %spec.model, device = %spec.device, dtype = %spec.dtype, "worker: loading model");
        let loading = spec.clone();
        let loaded = tokio::task::spawn_blocking(move || serving::load(&loading)).await??;
        let engine = PoolEngine::start(loaded.model, &settings.generation, metrics.clone())
            .context("starting the generation pool")?;
        let options = WorkerOptions {
            redis_url: settings.context.redis_url.expose().to_string(),
            key_prefix: settings.context.key_prefix.clone(),
            consumer,
            max_inflight: settings.worker.max_inflight,
            claim_idle: settings.worker.claim_idle,
            model: spec,
            cache_dir: cache_dir.clone(),
            follow_base: settings.jobs.enabled.then(|| remote::FollowBase {
                original: loaded.dir.clone(),
                artifacts_dir: artifacts.clone(),
                poll: settings.jobs.poll,
            }),
        };
        daemon::notify_systemd("READY=1");
        remote::run_worker(options, engine.handle().clone(), stats, async move {
            let _ = stop.await;
        })
        .await
        .context("worker")?;
        let _ = metrics_stop.send(());
        if let Some((_, task)) = metrics_task {
            let _ = task.await;
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })
}
