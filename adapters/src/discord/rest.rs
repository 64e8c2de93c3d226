//! Discord REST calls that honour the waits Discord asks for.
//!
//! serenity's error type keeps only a failed response's status and JSON
//! error, not its headers nor the `retry_after` of a 429 body, and its rate
//! limiter is off behind a REST proxy; a 429 then got the adapter's own
//! backoff (0.25 s) where Discord asked for seconds. So every REST call the
//! adapter makes (messages, follow-ups, deferring a command, registering
//! commands, reading guild roles) goes through [`Rest::call`]: serenity's
//! `Request` and `Route` build it (paths, the proxy, the `Authorization`
//! header), reqwest sends it, and the answer is read here:
//!
//! - a 429 waits the longest of the body's `retry_after`, the `Retry-After`
//!   header and `X-RateLimit-Reset-After` (all seconds, fractions allowed),
//!   within the [`RetryPolicy`]'s attempts and `max_wait`;
//! - a global limit (body `"global": true`, `X-RateLimit-Global`, or
//!   `X-RateLimit-Scope: global`) holds every call of the adapter until it
//!   has passed, not only the one that hit it;
//! - a route whose answer says `X-RateLimit-Remaining: 0` waits its
//!   `X-RateLimit-Reset-After` before its next call (a route here is its
//!   full path, so a channel's messages and another channel's are apart,
//!   as Discord's buckets are per channel, guild or webhook).
//!
//! The typing indicator stays with serenity: it is best effort and never
//! retried.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::HeaderMap;
use serenity::http::{LightMethod, Request, Route};
use tokio::time::Instant;

use crate::retry::{with_retries, Failure, RetryPolicy};

/// A failed REST call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RestError {
    /// Discord (or the proxy) answered with an error status.
    #[error("HTTP {status}: {message}")]
    Status {
        status: u16,
        /// For a 429: how long Discord asked to wait.
        retry_after: Option<Duration>,
        /// For a 429: whether the limit is global (every route).
        global: bool,
        message: String,
    },
    /// No answer (connection refused or dropped, timeout).
    #[error("network: {0}")]
    Network(String),
    /// The request could not be built or its answer not read.
    #[error("{0}")]
    Invalid(String),
}

/// How a failed call is retried.
pub fn classify(error: &RestError) -> Failure {
    match error {
        RestError::Status { status: 429, retry_after, .. } => Failure::RetryAfter(*retry_after),
        RestError::Status { status: 500..=599, .. } | RestError::Network(_) => Failure::Transient,
        _ => Failure::Permanent,
    }
}

/// What a 429 asks: the wait and whether it is global.
pub fn rate_limit(headers: &HeaderMap, body: &[u8]) -> (Option<Duration>, bool) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let seconds = |text: Option<&str>| text.and_then(|t| t.parse::<f64>().ok());
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let waits = [json["retry_after"].as_f64(), seconds(header("retry-after")), seconds(header("x-ratelimit-reset-after"))];
    let wait = waits
        .into_iter()
        .flatten()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .fold(None, |most: Option<f64>, s| Some(most.map_or(s, |m| m.max(s))))
        .map(|s| Duration::from_secs_f64(s.min(3600.0)));
    let global = json["global"].as_bool() == Some(true)
        || header("x-ratelimit-global").is_some_and(|v| !v.eq_ignore_ascii_case("false"))
        || header("x-ratelimit-scope").is_some_and(|v| v.eq_ignore_ascii_case("global"));
    (wait, global)
}

/// The adapter's REST client (one per adapter; cheap to share by
/// reference).
pub struct Rest {
    client: reqwest::Client,
    /// `Bot <token>`. Never logged.
    auth: String,
    proxy: Option<String>,
    retry: RetryPolicy,
    /// Until when a global limit holds every call.
    global_until: Mutex<Option<Instant>>,
    /// Per route (full path): until when it must not be called.
    routes_until: Mutex<HashMap<String, Instant>>,
}

impl Rest {
    pub fn new(token: &str, proxy: Option<String>, retry: RetryPolicy) -> Self {
        let auth = format!("Bot {}", token.trim().trim_start_matches("Bot "));
        Self {
            client: reqwest::Client::new(),
            auth,
            proxy,
            retry,
            global_until: Mutex::new(None),
            routes_until: Mutex::new(HashMap::new()),
        }
    }

    /// Calls `route` with a JSON `body`, retried per the policy; the
    /// answer's body on success. `what` names the call in log lines.
    pub async fn call(&self, what: &str, route: Route<'_>, method: LightMethod, body: Option<Vec<u8>>) -> Result<Vec<u8>, RestError> {
        with_retries(self.retry, what, || self.once(route, method, body.clone()), classify, |e| e.to_string()).await
    }

    async fn once(&self, route: Route<'_>, method: LightMethod, body: Option<Vec<u8>>) -> Result<Vec<u8>, RestError> {
        let key = route.path().into_owned();
        self.wait_turn(&key).await;
        let request = Request::new(route, method)
            .body(body)
            .build(&self.client, &self.auth, self.proxy.as_deref())
            .map_err(|e| RestError::Invalid(e.to_string()))?;
        let response = request.send().await.map_err(|e| RestError::Network(e.without_url().to_string()))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(|e| RestError::Network(e.without_url().to_string()))?;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        if header("x-ratelimit-remaining") == Some("0") {
            if let Some(after) = header("x-ratelimit-reset-after").and_then(|v| v.parse::<f64>().ok()).filter(|s| s.is_finite() && *s > 0.0) {
                self.hold(&key, Duration::from_secs_f64(after.min(3600.0)), false);
            }
        }
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        let (retry_after, global) = if status.as_u16() == 429 { rate_limit(&headers, &bytes) } else { (None, false) };
        if let Some(wait) = retry_after {
            self.hold(&key, wait, global);
        }
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let message = json["message"].as_str().map(str::to_string).unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string());
        Err(RestError::Status { status: status.as_u16(), retry_after, global, message })
    }

    /// Nothing is sent on `key` before `wait` has passed (on any route when
    /// `global`).
    fn hold(&self, key: &str, wait: Duration, global: bool) {
        let until = Instant::now() + wait;
        if global {
            let mut global_until = self.global_until.lock().unwrap_or_else(|e| e.into_inner());
            *global_until = Some(global_until.map_or(until, |t| t.max(until)));
        } else {
            let mut routes = self.routes_until.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            routes.retain(|_, t| *t > now);
            let entry = routes.entry(key.to_string()).or_insert(until);
            *entry = (*entry).max(until);
        }
    }

    /// Waits out a global limit and the route's own.
    async fn wait_turn(&self, key: &str) {
        loop {
            let global = *self.global_until.lock().unwrap_or_else(|e| e.into_inner());
            let route = self.routes_until.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied();
            match global.into_iter().chain(route).max() {
                Some(until) if until > Instant::now() => tokio::time::sleep_until(until).await,
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn a_429_waits_the_longest_it_is_told_and_knows_global_limits() {
        let body = br#"{"message":"You are being rate limited.","retry_after":1.5,"global":false}"#;
        assert_eq!(rate_limit(&headers(&[("retry-after", "2")]), body), (Some(Duration::from_secs(2)), false));
        assert_eq!(rate_limit(&headers(&[]), body), (Some(Duration::from_millis(1500)), false));
        assert_eq!(rate_limit(&headers(&[("x-ratelimit-reset-after", "3.25")]), b""), (Some(Duration::from_millis(3250)), false));
        assert!(rate_limit(&headers(&[("x-ratelimit-global", "true")]), br#"{"retry_after":0.5}"#).1);
        assert!(rate_limit(&headers(&[("x-ratelimit-scope", "global")]), b"").1);
        assert_eq!(rate_limit(&headers(&[]), br#"{"retry_after":0.5,"global":true}"#), (Some(Duration::from_millis(500)), true));
        assert_eq!(rate_limit(&headers(&[("retry-after", "soon")]), b"not json"), (None, false));
        let limited = RestError::Status { status: 429, retry_after: Some(Duration::from_secs(2)), global: false, message: String::new() };
        assert_eq!(classify(&limited), Failure::RetryAfter(Some(Duration::from_secs(2))));
        let bad = RestError::Status { status: 400, retry_after: None, global: false, message: String::new() };
        assert_eq!(classify(&bad), Failure::Permanent);
        assert_eq!(classify(&RestError::Network("reset".into())), Failure::Transient);
    }

    #[tokio::test(start_paused = true)]
    async fn a_global_limit_holds_every_route() {
        let rest = Rest::new("t", None, RetryPolicy::default());
        let start = Instant::now();
        rest.hold("a", Duration::from_secs(2), true);
        rest.hold("b", Duration::from_secs(5), false);
        rest.wait_turn("c").await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        rest.wait_turn("b").await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
