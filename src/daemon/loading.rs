//! The sockets a daemon binds before its model loads: the HTTP adapter and
//! `/metrics` serve from the first second, `/healthz` answering 503
//! `{"status":"loading"}` (and messages 503 with `Retry-After`) until
//! [`super::Daemon::serve`] hands them the pipeline.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use dialogd_adapters::http::HttpAdapter;
use dialogd_adapters::{
    Adapter, AdapterError, Answer, BoxFuture, ChannelKey, ContextTurn, Core, CoreError, Health, Inbound, Shutdown,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::DaemonError;
use crate::settings::{Settings, StoreKind};
use crate::telemetry::{serve_metrics, Metrics, MetricsServer};

/// A [`Core`] that refuses while the model loads and is the pipeline
/// once it is [`LateCore::set`].
pub struct LateCore {
    inner: OnceLock<Arc<dyn Core>>,
    store: &'static str,
}

impl LateCore {
    pub fn new(store: StoreKind) -> Self {
        Self { inner: OnceLock::new(), store: if store == StoreKind::Redis { "redis" } else { "memory" } }
    }

    /// From now on every call goes to `core` (only the first call counts).
    pub fn set(&self, core: Arc<dyn Core>) {
        let _ = self.inner.set(core);
    }

    fn loading<T: Send + 'static>() -> BoxFuture<'static, Result<T, CoreError>> {
        Box::pin(async { Err(CoreError::Unavailable("the model is loading".into())) })
    }
}

impl Core for LateCore {
    fn handle(&self, inbound: Inbound) -> BoxFuture<'static, Result<Answer, CoreError>> {
        self.inner.get().map_or_else(Self::loading, |core| core.handle(inbound))
    }

    fn turns(&self, channel: ChannelKey) -> BoxFuture<'static, Result<Vec<ContextTurn>, CoreError>> {
        self.inner.get().map_or_else(Self::loading, |core| core.turns(channel))
    }

    fn clear(&self, channel: ChannelKey) -> BoxFuture<'static, Result<(), CoreError>> {
        self.inner.get().map_or_else(Self::loading, |core| core.clear(channel))
    }

    fn health(&self) -> Health {
        match self.inner.get() {
            Some(core) => core.health(),
            None => Health { ready: false, store: self.store.into(), store_up: false },
        }
    }
}

/// Binds `/metrics` on `telemetry.metrics_listen` (nothing when it is
/// off) and serves it until `stop`: where it listens (the real port when 0
/// was asked for) and the serving task. The daemon and `dialogd worker`
/// both bind it before their model loads.
///
/// # Errors
/// An address that cannot be bound ([`DaemonError::Metrics`]).
pub async fn serve_metrics_on(
    settings: &Settings,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Option<(SocketAddr, JoinHandle<std::io::Result<()>>)>, DaemonError> {
    let Some(addr) = settings.telemetry.metrics_listen else { return Ok(None) };
    let server = MetricsServer::bind(addr).await.map_err(|source| DaemonError::Metrics { addr, source })?;
    let bound = server.local_addr().unwrap_or(addr);
    Ok(Some((bound, tokio::spawn(serve_metrics(server, metrics, stop)))))
}

/// The HTTP adapter's task: its name and how it ended.
pub(super) type AdapterTask = JoinHandle<(&'static str, Result<(), AdapterError>)>;

/// The HTTP adapter (when enabled) and `/metrics` (when
/// `telemetry.metrics_listen` is set), bound and serving before the model
/// loads; [`super::Daemon::start_on`] takes them over.
pub struct Listening {
    pub(super) trigger: watch::Sender<bool>,
    pub(super) listener: Shutdown,
    pub(super) core: Arc<LateCore>,
    pub(super) http: Option<(SocketAddr, AdapterTask)>,
    pub(super) metrics: Option<(SocketAddr, JoinHandle<std::io::Result<()>>)>,
}

impl Listening {
    /// Binds and starts serving.
    ///
    /// # Errors
    /// An address that cannot be bound ([`DaemonError::Adapter`],
    /// [`DaemonError::Metrics`]).
    pub async fn bind(settings: &Settings, metrics: Arc<Metrics>) -> Result<Self, DaemonError> {
        let (trigger, listener) = Shutdown::new();
        let core = Arc::new(LateCore::new(settings.context.store));
        let http = if settings.adapters.http.enabled {
            let adapter = HttpAdapter::bind(settings.adapters.http.clone()).await?;
            let addr = adapter.local_addr();
            let name = adapter.name();
            let run = Box::new(adapter).run(core.clone(), listener.clone());
            Some((addr, tokio::spawn(async move { (name, run.await) })))
        } else {
            None
        };
        let metrics = serve_metrics_on(settings, metrics, listener.clone().wait()).await?;
        Ok(Self { trigger, listener, core, http, metrics })
    }

    /// Where the HTTP adapter listens (the real port when 0 was asked for).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(addr, _)| *addr)
    }

    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(addr, _)| *addr)
    }
}
