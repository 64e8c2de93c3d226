//! The daemon's lifecycle: start the parts, serve, drain, stop.
//!
//! [`Daemon::start`] connects the context store, builds the pipeline and
//! binds every listening socket (so a bad address fails before readiness);
//! `dialogd run` binds the HTTP adapter and `/metrics` before the model
//! loads ([`Listening`], `/healthz` 503 "loading" meanwhile) and hands them
//! to [`Daemon::start_on`].
//! [`Daemon::serve`] runs the adapters and the metrics endpoint until the
//! injected `shutdown` future resolves (the binary passes SIGTERM/SIGINT;
//! tests pass their own), then stops taking messages, lets those in flight
//! finish within `daemon.drain_secs` and returns. [`reload`] applies
//! SIGHUP: the generation settings change live, nothing is dropped.
//! Readiness and stopping are told to systemd through `NOTIFY_SOCKET`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dialogd_adapters::console::ConsoleAdapter;
use dialogd_adapters::discord::DiscordAdapter;
use dialogd_adapters::http::HttpAdapter;
use dialogd_adapters::telegram::TelegramAdapter;
use dialogd_adapters::{Adapter, AdapterError, Core, Platform, Shutdown};
use tokio::task::JoinSet;

use crate::collect::{CollectError, Collector};
use crate::context::memory::MemoryStore;
use crate::context::redis::RedisStore;
use crate::context::lease::Sole;
use crate::context::{ContextError, ContextStore, Limits};
use crate::jobs::runner::{BaseModel, Runner, RunnerParts};
use crate::jobs::{JobStore, StoreError};
use crate::personas::memory::MemoryPersonaStore;
use crate::personas::redis::RedisPersonaStore;
use crate::personas::{PersonaError, PersonaStore, Personas};
use crate::model::ModelError;
use crate::pipeline::engine::ReplyEngine;
use crate::pipeline::rank::{Ranker, RankerError};
use crate::pipeline::{Jobs, Parts, Pipeline};
use crate::pool::PoolHandle;
use crate::safety::WordStore;
use crate::serving::ModelSpec;
use crate::settings::live::LiveSettings;
use crate::settings::{self, ModelSettings, Settings, SettingsError, StoreKind};
use crate::telemetry::{serve_metrics, Metrics, MetricsServer};
use crate::tokenizer::DialogTokenizer;

pub mod loading;

pub use loading::{serve_metrics_on, Listening};

/// Why the daemon could not start. Each keeps the error behind it as its
/// `source`.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("telemetry.metrics_listen: cannot listen on {addr}: {source}")]
    Metrics { addr: SocketAddr, source: std::io::Error },
    #[error("context.redis_url: {0}")]
    Store(#[from] ContextError),
    #[error("ranking: {0}")]
    Ranking(#[source] RankerError),
    #[error("ranking: the loader panicked: {0}")]
    RankingPanicked(#[source] tokio::task::JoinError),
    #[error("collect.dir: {0}")]
    Collect(#[source] CollectError),
    #[error("jobs: {0}")]
    JobStore(#[source] StoreError),
    #[error("jobs: {}: {source}", path.display())]
    JobsDir { path: PathBuf, source: std::io::Error },
    /// `jobs.artifacts_dir` cannot be written.
    #[error("jobs.artifacts_dir: {}: {source} (promoted models are written there: it must be a writable folder every serving host sees)", path.display())]
    ArtifactsDir { path: PathBuf, source: std::io::Error },
    /// `backend = "redis"`: persona adapters cannot be stored for workers.
    #[error("generation.backend = \"redis\": persona adapters: {0}")]
    AdapterBlobs(#[source] crate::remote::blobs::BlobError),
    #[error("jobs: {0}")]
    BaseModel(#[source] ModelError),
    #[error("personas: {0}")]
    Personas(#[from] PersonaError),
    #[error("safety.classifier: {0}")]
    Classifier(#[source] crate::safety::SafetyError),
    #[error("safety.classifier: the loader panicked: {0}")]
    ClassifierPanicked(#[source] tokio::task::JoinError),
    #[error("context.redis_url: moderators' word lists: {0}")]
    Words(#[source] crate::safety::SafetyError),
}

/// A started daemon, sockets bound, not yet serving.
pub struct Daemon {
    pipeline: Pipeline,
    adapters: Vec<Box<dyn Adapter>>,
    metrics_server: Option<MetricsServer>,
    http_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// The job runner, when `[jobs]` is enabled.
    runner: Option<Runner>,
    /// The sockets bound before loading, when started with them.
    listening: Option<Listening>,
}

impl Daemon {
    /// Connects the stores, builds the pipeline and the job runner, and
    /// binds the sockets. `pool` is the generation pool behind `engine`,
    /// when there is one: promoted base models are swapped into it.
    pub async fn start(
        settings: Settings,
        engine: Arc<dyn ReplyEngine>,
        pool: Option<PoolHandle>,
        tokenizer: DialogTokenizer,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DaemonError> {
        Self::start_on(None, settings, engine, pool, tokenizer, metrics).await
    }

    /// [`Daemon::start`] on the HTTP adapter and `/metrics` already bound
    /// (and answering "loading") by [`Listening::bind`], when given.
    pub async fn start_on(
        listening: Option<Listening>,
        settings: Settings,
        engine: Arc<dyn ReplyEngine>,
        pool: Option<PoolHandle>,
        tokenizer: DialogTokenizer,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DaemonError> {
        let store = open_context(&settings, &metrics).await?;
        let (ranking, model) = (settings.ranking.clone(), settings.model.clone());
        let ranker = tokio::task::spawn_blocking(move || Ranker::load(&ranking, &model))
            .await
            .map_err(DaemonError::RankingPanicked)?
            .map_err(DaemonError::Ranking)?
            .map(Arc::new);
        let classifier = open_classifier(&settings).await?;
        let collector = open_collector(&settings)?;
        let job_store = open_jobs(&settings).await?;
        let personas = open_personas(&settings).await?;
        let words = open_words(&settings).await?;
        let live = Arc::new(LiveSettings::new(settings.generation.clone(), settings.safety.clone()));
        let c = &settings.context;
        let pipeline = Pipeline::new(Parts {
            engine,
            store: store.clone(),
            tokenizer,
            model_name: settings.model.path.clone(),
            live: live.clone(),
            max_tokens: c.max_tokens,
            rate_limit: settings.rate_limit,
            ranker,
            classifier,
            words,
            collector,
            personas: personas.clone(),
            jobs: job_store.clone().map(|store| Jobs { store, settings: settings.jobs.clone() }),
            metrics: metrics.clone(),
        });
        let runner = match job_store {
            Some(store) => {
                let dir = crate::model::hub::resolve_model(&settings.model.path).map_err(DaemonError::BaseModel)?;
                let runner = Runner::new(RunnerParts {
                    store,
                    settings: settings.jobs.clone(),
                    collect_dir: settings.collect.dir.clone(),
                    base: BaseModel { dir, spec: model_spec(&settings.model) },
                    pool,
                    generation: live.watch_generation(),
                    safety: live.watch_safety(),
                    personas,
                    metrics: metrics.clone(),
                });
                // Serve the promoted versions from the first message on.
                if let Err(e) = runner.sync_served().await {
                    tracing::warn!(error = %e, "could not load the promoted versions; serving the configured model until it works");
                }
                Some(runner)
            }
            None => None,
        };

        // Each adapter is started with its own validated settings.
        let mut adapters: Vec<Box<dyn Adapter>> = Vec::new();
        let mut http_addr = listening.as_ref().and_then(Listening::http_addr);
        let a = &settings.adapters;
        if a.http.enabled && listening.is_none() {
            let adapter = HttpAdapter::bind(a.http.clone()).await?;
            http_addr = Some(adapter.local_addr());
            adapters.push(Box::new(adapter));
        }
        if a.console.enabled {
            adapters.push(Box::new(ConsoleAdapter::stdio()));
        }
        if a.telegram.enabled {
            // One poller per token (#13 point 7): under the store's lease.
            let telegram = Box::new(TelegramAdapter::new(a.telegram.clone())?);
            let token = a.telegram.token.as_ref().map_or("", |t| t.expose());
            let holder = crate::remote::process_name();
            adapters.push(Box::new(Sole::new(telegram, Platform::Telegram, token, store.clone(), holder)));
        }
        if a.discord.enabled {
            let discord = DiscordAdapter::new(a.discord.clone())?;
            let _ = metrics.discord.set(discord.shard_stats());
            adapters.push(Box::new(discord));
        }
        let (metrics_server, metrics_addr) = match settings.telemetry.metrics_listen {
            _ if listening.is_some() => (None, listening.as_ref().and_then(Listening::metrics_addr)),
            Some(addr) => {
                let server =
                    MetricsServer::bind(addr).await.map_err(|source| DaemonError::Metrics { addr, source })?;
                let bound = server.local_addr();
                (Some(server), bound)
            }
            None => (None, None),
        };
        Ok(Self { pipeline, adapters, metrics_server, http_addr, metrics_addr, settings, metrics, runner, listening })
    }

    /// Where the HTTP adapter listens (the real port when 0 was asked for).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Serves until `shutdown` resolves, every adapter has stopped, or one
    /// has failed, then drains. Returns once in-flight messages are
    /// answered or the drain bound has passed.
    ///
    /// # Errors
    /// The first adapter failure (a refused token, refused intents): the
    /// daemon cannot do what it was configured for, so it stops (after the
    /// drain) and `dialogd run` exits non-zero with this reason.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        let Self { pipeline, adapters, metrics_server, settings, metrics, runner, listening, .. } = self;
        let core: Arc<dyn Core> = Arc::new(pipeline.clone());
        let mut tasks = JoinSet::new();
        let (trigger, listener, early_metrics) = match listening {
            Some(early) => {
                // The HTTP adapter and /metrics have served since before
                // loading; from now on they serve the pipeline.
                early.core.set(core.clone());
                if let Some((_, http)) = early.http {
                    tasks.spawn(async move {
                        http.await.unwrap_or_else(|e| {
                            ("http", Err(AdapterError::Platform { adapter: "http", message: format!("the adapter task panicked: {e}") }))
                        })
                    });
                }
                (early.trigger, early.listener, early.metrics.map(|(_, task)| task))
            }
            None => {
                let (trigger, listener) = Shutdown::new();
                (trigger, listener, None)
            }
        };
        for adapter in adapters {
            let name = adapter.name();
            let run = adapter.run(core.clone(), listener.clone());
            tasks.spawn(async move { (name, run.await) });
        }
        let mut runner_task = runner.map(|runner| tokio::spawn(runner.run(listener.clone())));
        let mut metrics_task = early_metrics.or_else(|| {
            metrics_server.map(|server| tokio::spawn(serve_metrics(server, metrics.clone(), listener.clone().wait())))
        });
        notify_systemd("READY=1");
        tracing::info!(
            http = %settings.adapters.http.enabled.then_some(settings.adapters.http.listen).map_or("off".into(), |a| a.to_string()),
            metrics = %settings.telemetry.metrics_listen.map_or("off".into(), |a| a.to_string()),
            "dialogd is serving"
        );

        let mut failure = None;
        let adapters_done = async {
            while let Some(joined) = tasks.join_next().await {
                if let Some(e) = log_adapter_end(joined) {
                    return Some(e);
                }
            }
            None
        };
        tokio::select! {
            _ = shutdown => tracing::info!(in_flight = pipeline.in_flight(), "shutdown asked for: draining"),
            ended = adapters_done => match ended {
                Some(e) => {
                    tracing::error!(error = %e, "an adapter cannot run: shutting down");
                    failure = Some(e);
                }
                None => tracing::info!("every adapter has stopped: shutting down"),
            },
        }
        notify_systemd("STOPPING=1");
        pipeline.stop_accepting();
        let _ = trigger.send(true);
        let drain = async {
            pipeline.drained().await;
            while let Some(joined) = tasks.join_next().await {
                if let Some(e) = log_adapter_end(joined) {
                    failure.get_or_insert(e);
                }
            }
            if let Some(task) = metrics_task.take() {
                let _ = task.await;
            }
            if let Some(task) = runner_task.take() {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(settings.daemon.drain, drain).await.is_err() {
            tracing::warn!(
                in_flight = pipeline.in_flight(),
                drain_secs = settings.daemon.drain.as_secs(),
                "drain took too long: messages still queued are refused (HTTP 503)"
            );
            // Their requests get their refusal before the process ends.
            pipeline.abandon();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                while let Some(joined) = tasks.join_next().await {
                    log_adapter_end(joined);
                }
            })
            .await;
        } else {
            tracing::info!(
                replies = metrics.replies_total(),
                "drained: every accepted message was answered"
            );
        }
        failure.map_or(Ok(()), |e| Err(DaemonError::Adapter(e)))
    }
}

/// The `[model]` settings as a serving spec.
pub fn model_spec(model: &ModelSettings) -> ModelSpec {
    ModelSpec {
        model: model.path.clone(),
        device: model.device.clone(),
        dtype: model.dtype.clone(),
        quantize: model.quantize.clone(),
        kv_cache: model.kv_cache.clone(),
    }
}

/// The context store `[context]` names.
async fn open_context(settings: &Settings, metrics: &Arc<Metrics>) -> Result<Arc<dyn ContextStore>, DaemonError> {
    let c = &settings.context;
    let limits = Limits::new(c.max_turns, c.ttl);
    let store: Arc<dyn ContextStore> = match c.store {
        StoreKind::Memory => Arc::new(MemoryStore::new(limits)),
        StoreKind::Redis => Arc::new(
            RedisStore::connect(c.redis_url.expose(), &c.key_prefix, limits, c.redis_timeout, metrics.clone()).await?,
        ),
    };
    tracing::info!(
        store = store.kind(),
        redis = %if c.store == StoreKind::Redis { settings::redact_url(c.redis_url.expose()) } else { "-".into() },
        up = store.is_up(),
        "context store ready"
    );
    Ok(store)
}

/// The log collector, when `[collect]` is enabled (old segments deleted).
/// `[safety] classifier`, loaded on `classifier_device` (else the model's
/// device) off the async workers; its thresholds must name its labels.
async fn open_classifier(settings: &Settings) -> Result<Option<Arc<dyn crate::safety::ToxicityClassifier>>, DaemonError> {
    let safety = &settings.safety;
    if safety.classifier.is_empty() {
        return Ok(None);
    }
    let spec = safety.classifier.clone();
    let device = if safety.classifier_device.is_empty() { settings.model.device.clone() } else { safety.classifier_device.clone() };
    let loaded = tokio::task::spawn_blocking(move || {
        let device = crate::serving::device(&device).map_err(|e| crate::safety::SafetyError::Classifier(e.to_string()))?;
        crate::safety::load_classifier(&spec, &device)
    })
    .await
    .map_err(DaemonError::ClassifierPanicked)?
    .map_err(DaemonError::Classifier)?;
    let labels = crate::safety::ToxicityClassifier::labels(&loaded).to_vec();
    safety.classifier_thresholds.check_labels(&labels).map_err(DaemonError::Classifier)?;
    tracing::info!(classifier = %safety.classifier, architecture = loaded.architecture().class_name(), labels = %labels.join(","), "safety classifier loaded");
    Ok(Some(Arc::new(loaded)))
}

fn open_collector(settings: &Settings) -> Result<Option<Arc<Collector>>, DaemonError> {
    if !settings.collect.enabled {
        return Ok(None);
    }
    let mut collector = Collector::open(&settings.collect).map_err(DaemonError::Collect)?;
    if settings.jobs.enabled {
        collector = collector.with_jobs_dir(settings.jobs.dir.clone());
    }
    let collector = Arc::new(collector);
    // At start, then hourly while the collector lives.
    tokio::spawn(crate::collect::enforce_retention_every(Arc::downgrade(&collector), crate::collect::RETENTION_EVERY));
    Ok(Some(collector))
}

/// The job store, when `[jobs]` is enabled.
async fn open_jobs(settings: &Settings) -> Result<Option<JobStore>, DaemonError> {
    if !settings.jobs.enabled {
        return Ok(None);
    }
    let c = &settings.context;
    let store = JobStore::connect(c.redis_url.expose(), &c.key_prefix, c.redis_timeout)
        .await
        .map_err(DaemonError::JobStore)?;
    std::fs::create_dir_all(&settings.jobs.dir)
        .map_err(|source| DaemonError::JobsDir { path: settings.jobs.dir.clone(), source })?;
    let artifacts = &settings.jobs.artifacts_dir;
    crate::serving::check_artifacts_dir(artifacts, true)
        .map_err(|source| DaemonError::ArtifactsDir { path: artifacts.clone(), source })?;
    Ok(Some(store))
}

/// The persona registry: its choices in Redis whenever the context is
/// (with `[jobs]` on or off), else in memory; adapters are loaded for the
/// served model's shape and device.
async fn open_personas(settings: &Settings) -> Result<Arc<Personas>, DaemonError> {
    let c = &settings.context;
    let store: Arc<dyn PersonaStore> = match c.store {
        StoreKind::Redis => Arc::new(RedisPersonaStore::connect(c.redis_url.expose(), &c.key_prefix, c.redis_timeout).await?),
        StoreKind::Memory => Arc::new(MemoryPersonaStore::new()),
    };
    let personas = Personas::new(settings.personas.clone(), store);
    let shape = crate::model::hub::resolve_model(&settings.model.path)
        .map_err(|e| e.to_string())
        .and_then(|dir| crate::model::gpt2::read_config(&dir).map_err(|e| e.to_string()));
    match (shape, crate::serving::device(&settings.model.device)) {
        (Ok(config), Ok(device)) => personas.set_model(config, device),
        (Err(e), _) => tracing::warn!(error = %e, "persona adapters disabled"),
        (_, Err(e)) => tracing::warn!(error = %e, "persona adapters disabled"),
    }
    if settings.generation.backend == crate::settings::Backend::Redis {
        // Workers fetch adapters from Redis by content hash.
        let blobs = crate::remote::blobs::AdapterBlobs::connect(c.redis_url.expose(), &c.key_prefix)
            .await
            .map_err(DaemonError::AdapterBlobs)?;
        personas.set_blobs(blobs);
        personas.load_defined().await;
    }
    Ok(personas)
}

/// Moderators' word lists: in Redis with the context (they survive
/// restarts), else in memory.
async fn open_words(settings: &Settings) -> Result<Arc<WordStore>, DaemonError> {
    let c = &settings.context;
    Ok(Arc::new(match c.store {
        StoreKind::Redis => WordStore::redis(c.redis_url.expose(), &c.key_prefix, c.redis_timeout).await.map_err(DaemonError::Words)?,
        StoreKind::Memory => WordStore::memory(),
    }))
}

/// Logs how an adapter ended; its failure, if it failed.
fn log_adapter_end(joined: Result<(&'static str, Result<(), AdapterError>), tokio::task::JoinError>) -> Option<AdapterError> {
    match joined {
        Ok((name, Ok(()))) => {
            tracing::info!(adapter = name, "adapter stopped");
            None
        }
        Ok((name, Err(e))) => {
            tracing::error!(adapter = name, error = %e, "adapter failed");
            Some(e)
        }
        Err(e) => {
            tracing::error!(error = %e, "adapter task panicked");
            Some(AdapterError::Platform { adapter: "adapter", message: format!("the adapter task panicked: {e}") })
        }
    }
}

/// Re-reads the settings (same file, same environment) and applies what can
/// change live: the `[generation]` and `[safety]` sections. Every other key
/// that differs from `started` (the settings the daemon started with) is
/// logged by name as needing a restart; so are `safety.classifier` and
/// `safety.classifier_device`, which keep their values. A bad file (or
/// thresholds naming a label the classifier lacks) keeps the old settings.
/// Returns whether anything was applied.
pub fn reload(pipeline: &Pipeline, config: Option<&Path>, started: &Settings, metrics: &Metrics) -> Result<bool, SettingsError> {
    let mut fresh = settings::load(config)?;
    for key in settings::changed_keys(started, &fresh) {
        if !(key.starts_with("generation.") || key.starts_with("safety.")) {
            tracing::warn!(key = %key, "changed, but applied only at restart");
        }
    }
    let current_safety = pipeline.safety();
    if fresh.safety.classifier != current_safety.classifier || fresh.safety.classifier_device != current_safety.classifier_device {
        tracing::warn!("safety.classifier and safety.classifier_device change only at restart");
        fresh.safety.classifier = current_safety.classifier.clone();
        fresh.safety.classifier_device = current_safety.classifier_device.clone();
    }
    if let Some(labels) = pipeline.classifier_labels() {
        fresh.safety.classifier_thresholds.check_labels(&labels).map_err(|e| SettingsError::Invalid {
            key: "safety.classifier_thresholds",
            message: e.to_string(),
        })?;
    }
    let mut generation = fresh.generation.clone();
    let current = pipeline.generation();
    if generation.queue_depth != current.queue_depth || generation.candidates != current.candidates {
        tracing::warn!("generation.queue_depth and generation.candidates change only at restart");
        generation.queue_depth = current.queue_depth;
        generation.candidates = current.candidates;
    }
    let mut changed = generation != *current;
    if changed {
        tracing::info!(
            temperature = generation.temperature,
            top_k = generation.top_k,
            top_p = generation.top_p,
            repetition_penalty = generation.repetition_penalty,
            no_repeat_ngram = generation.no_repeat_ngram,
            max_new_tokens = generation.max_new_tokens,
            "reloaded generation settings"
        );
        pipeline.set_generation(generation);
    } else {
        tracing::info!("reloaded: generation settings unchanged");
    }
    if fresh.safety != current_safety {
        tracing::info!(policy = fresh.safety.policy.as_str(), blocked_words = fresh.safety.blocked_words.len(), "reloaded safety settings");
        pipeline.set_safety(fresh.safety);
        changed = true;
    }
    metrics.reloads.inc();
    Ok(changed)
}

/// Resolves at SIGTERM or SIGINT.
pub async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// Starts catching SIGHUP. Call it before anything slow (model loading):
/// from then on a SIGHUP no longer kills the process (its default action)
/// and one received before [`reload_on_sighup`] runs is applied then.
/// `None` (logged) when the handler cannot be installed.
pub fn sighup_listener() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(hup) => Some(hup),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: reload disabled");
            None
        }
    }
}

/// Reloads on every SIGHUP caught by `hup` (see [`sighup_listener`]), for
/// as long as the task runs.
pub async fn reload_on_sighup(
    hup: Option<tokio::signal::unix::Signal>,
    pipeline: Pipeline,
    config: Option<PathBuf>,
    started: Settings,
    metrics: Arc<Metrics>,
) {
    let Some(mut hup) = hup else { return };
    while hup.recv().await.is_some() {
        notify_systemd("RELOADING=1");
        if let Err(e) = reload(&pipeline, config.as_deref(), &started, &metrics) {
            tracing::error!(error = %e, "reload failed: keeping the settings in force");
        }
        notify_systemd("READY=1");
    }
}

/// Sends a state line to systemd when run with `Type=notify`; a no-op
/// otherwise.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(socket) => socket,
        Err(e) => return tracing::warn!(error = %e, "sd_notify: no socket"),
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}
