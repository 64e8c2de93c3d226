//! `dialogd run` (the daemon) and `dialogd check-config`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use crate::daemon::{self, Daemon};
use crate::pipeline::engine::PoolEngine;
use crate::serving;
use crate::settings;
use crate::telemetry::{self, Metrics};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Settings file (TOML); every key and its default is in config/default.toml.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// `dialogd check-config`: validates and prints the effective settings.
pub fn check_config(args: RunArgs) -> anyhow::Result<ExitCode> {
    let settings = settings::load(Some(&args.config))?;
    print!("{}", settings.to_redacted_toml());
    Ok(ExitCode::SUCCESS)
}

/// `dialogd run`: the daemon, until SIGTERM or SIGINT.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let settings = settings::load(Some(&args.config))?;
    telemetry::init_logging(settings.telemetry.log_format, &settings.telemetry.log_filter);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        // Signals are caught from the start, so one during model loading
        // is not lost (the default action would kill the process).
        let stop = tokio::spawn(daemon::stop_signal());
        let metrics = Metrics::new();
        let spec = daemon::model_spec(&settings.model);
        tracing::info!(
            model = %spec.model,
            device = %spec.device,
            dtype = %spec.dtype,
            quantize = %spec.quantize,
            kv_cache = %spec.kv_cache,
            "loading model"
        );
        let loaded = tokio::task::spawn_blocking(move || serving::load(&spec)).await??;
        let engine = PoolEngine::start(loaded.model, &settings.generation, metrics.clone())
            .context("starting the generation pool")?;
        let pool = engine.handle().clone();
        let daemon = Daemon::start(settings, Arc::new(engine), Some(pool), loaded.tokenizer, metrics.clone()).await?;
        let reload = tokio::spawn(daemon::reload_on_sighup(daemon.pipeline().clone(), Some(args.config), metrics));
        daemon
            .serve(async move {
                let _ = stop.await;
            })
            .await;
        reload.abort();
        tracing::info!("stopped");
        anyhow::Ok(ExitCode::SUCCESS)
    })
}
