//! `dialogd run` (the daemon) and `dialogd check-config`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use super::{load, ModelArgs};
use crate::daemon::{self, Daemon};
use crate::pipeline::engine::PoolEngine;
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
        let model_args = ModelArgs {
            model: settings.model.path.clone(),
            device: settings.model.device.clone(),
            dtype: settings.model.dtype.clone(),
            quantize: settings.model.quantize.clone(),
            kv_cache: settings.model.kv_cache.clone(),
        };
        tracing::info!(
            model = %model_args.model,
            device = %model_args.device,
            dtype = %model_args.dtype,
            quantize = %model_args.quantize,
            kv_cache = %model_args.kv_cache,
            "loading model"
        );
        let loaded = tokio::task::spawn_blocking(move || load(&model_args, false)).await??;
        let engine = PoolEngine::start(loaded.model, &settings.generation, metrics.clone())
            .context("starting the generation pool")?;
        let daemon = Daemon::start(settings, Arc::new(engine), loaded.tokenizer, metrics.clone()).await?;
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
