//! The HTTP adapter: a small JSON API for web widgets, other bots and tests.
//!
//! - `POST /v1/channels/{channel}/messages` `{"author","text","message_id"?}`
//!   answers `{"reply":"…"}`, or `{"reply":null,"reason":"…"}` when the bot
//!   chooses not to answer.
//! - `GET /v1/channels/{channel}/context` answers `{"turns":[…]}`, oldest first.
//! - `DELETE /v1/channels/{channel}/context` forgets the channel's turns.
//! - `GET /v1/models` and `POST /v1/chat/completions`: the OpenAI-compatible
//!   API ([`openai`]), stateless, errors in OpenAI's shape.
//! - `GET /healthz` answers 200 `{"status":"ok",…}` once the model is
//!   loaded (503 `{"status":"loading",…}` before), with the context store's
//!   state. It needs no token.
//!
//! With a token configured every `/v1` request needs `Authorization: Bearer
//! TOKEN` (401 otherwise). Bodies over the limit get 413; malformed JSON or
//! missing fields get 4xx; a method a path does not take gets 405; a
//! message over a rate limit gets 429 with `Retry-After` (seconds until
//! the window ends; the body's `error` is the notice); refusals for load or
//! shutdown (a message still queued when the drain ends included) get 503
//! with `Retry-After`; every error body is `{"error":"…"}`.
//!
//! Hostile or broken clients are bounded: a connection must deliver a
//! request's headers within `header_timeout` of opening or of its previous
//! response (so that is also the idle keep-alive timeout), and the whole
//! body within `body_timeout` (408 otherwise); at most `max_connections`
//! are served at once, and further ones wait in the listen backlog until
//! one closes (logged, at most every 10 s). [`ServeLimits`] carries these
//! four; Telegram's webhook server is bounded by the same ones.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

mod openai;

use crate::settings::{invalid, serialize_opt_secret, Secret, SettingsError};
use crate::{Adapter, AdapterError, Answer, BoxFuture, ChannelKey, Core, CoreError, Inbound, Platform, Shutdown};

/// The longest channel id and author accepted, in bytes.
const MAX_ID_BYTES: usize = 128;

/// `[adapters.http]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub enabled: bool,
    pub listen: String,
    pub token: String,
    pub max_body_bytes: usize,
    pub header_timeout_secs: u64,
    pub body_timeout_secs: u64,
    pub max_connections: usize,
}

/// `[adapters.http]` validated: how the HTTP adapter listens.
#[derive(Debug, Clone, Serialize)]
pub struct HttpSettings {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// The bearer token `/v1` requests must carry; `None` lets anyone in
    /// (keep `listen` on loopback then).
    #[serde(serialize_with = "serialize_opt_secret")]
    pub token: Option<Secret>,
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// How long a connection may take to send a request's headers, counted
    /// from its opening or from the end of its previous response (the idle
    /// keep-alive timeout too).
    #[serde(rename = "header_timeout_secs", serialize_with = "serialize_secs")]
    pub header_timeout: Duration,
    /// How long a request's whole body may take to arrive (408 after).
    #[serde(rename = "body_timeout_secs", serialize_with = "serialize_secs")]
    pub body_timeout: Duration,
    /// Connections served at once; more wait until one closes.
    pub max_connections: usize,
}

fn serialize_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

impl RawHttp {
    /// # Errors
    /// `adapters.http.listen` that is not an address, `max_body_bytes`
    /// under 1024, a timeout outside 1-3600 s, `max_connections` 0.
    pub fn validate(self) -> Result<HttpSettings, SettingsError> {
        let listen = self.listen.parse().map_err(|_| {
            invalid("adapters.http.listen", format!("{:?} is not an address such as 127.0.0.1:8080", self.listen))
        })?;
        if self.max_body_bytes < 1024 {
            return Err(invalid("adapters.http.max_body_bytes", "must be at least 1024"));
        }
        for (key, secs) in [
            ("adapters.http.header_timeout_secs", self.header_timeout_secs),
            ("adapters.http.body_timeout_secs", self.body_timeout_secs),
        ] {
            if !(1..=3600).contains(&secs) {
                return Err(invalid(key, format!("{secs} is not in 1-3600")));
            }
        }
        if self.max_connections == 0 {
            return Err(invalid("adapters.http.max_connections", "must be at least 1"));
        }
        Ok(HttpSettings {
            enabled: self.enabled,
            listen,
            token: Secret::non_empty(&self.token),
            max_body_bytes: self.max_body_bytes,
            header_timeout: Duration::from_secs(self.header_timeout_secs),
            body_timeout: Duration::from_secs(self.body_timeout_secs),
            max_connections: self.max_connections,
        })
    }
}

/// A bound HTTP adapter, ready to run.
pub struct HttpAdapter {
    listener: tokio::net::TcpListener,
    config: HttpSettings,
}

impl HttpAdapter {
    /// Binds the listening socket (so a bad address fails at start, and
    /// port 0 can be asked for and read back with [`Self::local_addr`]).
    pub async fn bind(config: HttpSettings) -> Result<Self, AdapterError> {
        let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|source| AdapterError::Bind {
            adapter: "http",
            addr: config.listen.to_string(),
            source,
        })?;
        Ok(Self { listener, config })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }
}

#[derive(Clone)]
struct AppState {
    core: Arc<dyn Core>,
    /// `Authorization` header value expected, precomputed.
    expected_auth: Option<Arc<str>>,
}

/// What bounds an HTTP server's clients (`[adapters.http]`'s
/// `header_timeout_secs`, `body_timeout_secs`, `max_body_bytes`,
/// `max_connections`): the JSON API's, and Telegram's webhook server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Headers must arrive within this of a connection's opening or of its
    /// previous response (the idle keep-alive timeout too).
    pub header_timeout: Duration,
    /// The whole body must arrive within this (408 after).
    pub body_timeout: Duration,
    /// Larger bodies are refused (413) before they are buffered.
    pub max_body_bytes: usize,
    /// Connections served at once; more wait until one closes.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    /// config/default.toml's values.
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_body_bytes: 65536,
            max_connections: 512,
        }
    }
}

impl HttpSettings {
    /// The limits on clients these settings give.
    pub fn limits(&self) -> ServeLimits {
        ServeLimits {
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            max_body_bytes: self.max_body_bytes,
            max_connections: self.max_connections,
        }
    }
}

impl Adapter for HttpAdapter {
    fn name(&self) -> &'static str {
        "http"
    }

    fn run(self: Box<Self>, core: Arc<dyn Core>, shutdown: Shutdown) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            let addr = self.local_addr();
            let app = router(core, &self.config);
            tracing::info!(
                %addr,
                auth = self.config.token.is_some(),
                max_connections = self.config.max_connections,
                "http adapter listening"
            );
            serve(self.listener, app, self.config.limits(), "http", shutdown).await;
            tracing::info!("http adapter stopped");
            Ok(())
        })
    }
}

/// The accept loop: one task per connection (hyper's HTTP/1 with a header
/// timeout), at most `max_connections` at once, until shutdown; then idle
/// connections close at once and busy ones after their response. `server`
/// names the server in its log lines. `app` should be [`bounded`].
pub(crate) async fn serve(listener: tokio::net::TcpListener, app: Router, limits: ServeLimits, server: &'static str, shutdown: Shutdown) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stop = shutdown.wait();
    tokio::pin!(stop);
    let mut cap_logged: Option<Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if cap_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(
                        server,
                        max_connections = limits.max_connections,
                        "http connection cap reached: new connections wait until one closes"
                    );
                    cap_logged = Some(Instant::now());
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    () = &mut stop => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, mostly: wait instead of spinning.
                    tracing::warn!(server, error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let connection = http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(server, error = %e, "http connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The routes, for tests that serve them on their own listener.
pub fn router(core: Arc<dyn Core>, config: &HttpSettings) -> Router {
    let state = AppState { core, expected_auth: config.token.as_ref().map(|t| Arc::from(format!("Bearer {}", t.expose()))) };
    let v1 = Router::new()
        .route("/v1/channels/{channel}/messages", post(post_message))
        .route("/v1/channels/{channel}/context", get(get_context).delete(delete_context))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let openai = Router::new()
        .route("/v1/models", get(openai::list_models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), openai::require_token));
    let app = Router::new()
        .route("/healthz", get(healthz))
        .merge(v1)
        .merge(openai)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such path") })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this path") })
        .with_state(state);
    bounded(app, config.limits())
}

/// `app` with its request bodies bounded: read whole before the handler,
/// within `body_timeout` (408), at most `max_body_bytes` (413).
pub(crate) fn bounded(app: Router, limits: ServeLimits) -> Router {
    app.layer(middleware::from_fn_with_state(limits, read_body_in_time)).layer(DefaultBodyLimit::max(limits.max_body_bytes))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn core_error(err: CoreError) -> Response {
    match err {
        CoreError::RateLimited { notice, retry_after } => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            let message = notice.unwrap_or_else(|| format!("rate limited: try again in {secs} s"));
            let mut response =
                (StatusCode::TOO_MANY_REQUESTS, Json(json!({ "error": message, "reason": "rate_limited" }))).into_response();
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            response
        }
        CoreError::Busy | CoreError::ShuttingDown | CoreError::Unavailable(_) => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, err.to_string());
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        CoreError::Invalid(message) => error(StatusCode::BAD_REQUEST, message),
        CoreError::Internal(_) => error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
    }
}

/// Compares without stopping at the first difference, so response time
/// does not tell how much of a guessed token (or secret) was right.
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.expected_auth {
        let given = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
        if !same_secret(given, expected.as_bytes()) {
            let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

/// Reads the whole body before the handler runs, within `body_timeout`
/// counted from the end of the headers (408 and a closed connection
/// otherwise). tower-http's body timeout restarts at every chunk, so a
/// client sending a byte at a time would never meet it. Bodies over
/// `max_body_bytes` are refused (413) without being buffered whole.
async fn read_body_in_time(State(limits): State<ServeLimits>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(limits.body_timeout, axum::body::to_bytes(body, limits.max_body_bytes)).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Err(e)) if is_length_limit(&e) => {
            error(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over {} bytes", limits.max_body_bytes))
        }
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")),
        Err(_) => {
            let mut response = error(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {} s", limits.body_timeout.as_secs_f64()),
            );
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

fn is_length_limit(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// The channel named in a path, or the 400 that says why it is no name.
fn channel_key(channel: &str) -> Result<ChannelKey, Box<Response>> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._:@-".contains(c);
    if channel.is_empty() || channel.len() > MAX_ID_BYTES || !channel.chars().all(ok_char) {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("channel must be 1 to {MAX_ID_BYTES} of A-Z a-z 0-9 . _ : @ -"),
        )));
    }
    Ok(ChannelKey::new(Platform::Http, channel))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    author: String,
    text: String,
    #[serde(default)]
    message_id: Option<String>,
}

async fn post_message(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    body: Result<Json<PostMessage>, JsonRejection>,
) -> Response {
    let channel = match channel_key(&channel) {
        Ok(key) => key,
        Err(response) => return *response,
    };
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    if body.author.trim().is_empty() || body.author.len() > MAX_ID_BYTES {
        return error(StatusCode::BAD_REQUEST, format!("author must be 1 to {MAX_ID_BYTES} bytes"));
    }
    if let Some(id) = &body.message_id {
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return error(StatusCode::BAD_REQUEST, format!("message_id must be 1 to {MAX_ID_BYTES} bytes"));
        }
    }
    let inbound = Inbound {
        channel,
        author: body.author,
        text: body.text,
        msg_id: body.message_id,
        addressed_to_bot: true,
        moderator: false,
        operator: false,
        group: None,
        edit: None,
    };
    match state.core.handle(inbound).await {
        Ok(Answer::Reply(out)) => Json(json!({ "reply": out.text })).into_response(),
        Ok(Answer::Silent { reason }) => Json(json!({ "reply": null, "reason": reason })).into_response(),
        Err(err) => core_error(err),
    }
}

async fn get_context(State(state): State<AppState>, Path(channel): Path<String>) -> Response {
    let channel = match channel_key(&channel) {
        Ok(key) => key,
        Err(response) => return *response,
    };
    match state.core.turns(channel).await {
        Ok(turns) => Json(json!({ "turns": turns })).into_response(),
        Err(err) => core_error(err),
    }
}

async fn delete_context(State(state): State<AppState>, Path(channel): Path<String>) -> Response {
    let channel = match channel_key(&channel) {
        Ok(key) => key,
        Err(response) => return *response,
    };
    match state.core.clear(channel).await {
        Ok(()) => Json(json!({ "cleared": true })).into_response(),
        Err(err) => core_error(err),
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    let health = state.core.health();
    let status = if health.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "status": if health.ready { "ok" } else { "loading" }, "health": health }))).into_response()
}
