//! Telegram's webhook mode: Telegram POSTs each update to the bot's public
//! HTTPS URL (`webhook_url`, usually a reverse proxy that terminates TLS)
//! and the proxy passes it to this server on `webhook_listen`.
//!
//! A request must carry the secret given to `setWebhook` in the
//! `X-Telegram-Bot-Api-Secret-Token` header (compared in constant time);
//! anything else is refused with 401 and logged without the header. An
//! accepted update is queued for the adapter's loop before the answer, so
//! updates are handled in the order they arrive; `setWebhook` asks for one
//! connection at a time, so that order is Telegram's. A full queue answers
//! 503, which Telegram retries. An update that does not parse is answered
//! 200 and logged (Telegram would otherwise retry it forever).
//!
//! teloxide's own webhook listener is not used: its `setWebhook` call
//! cannot ask for `edited_message` updates (no `allowed_updates`), and it
//! feeds teloxide's dispatcher rather than this adapter's loop.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use teloxide::types::Update;
use tokio::sync::mpsc;

use crate::{AdapterError, Shutdown};

/// The header Telegram puts the secret in.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

/// What the route needs.
#[derive(Clone)]
struct Route {
    secret: String,
    updates: mpsc::Sender<Update>,
}

/// Binds `listen` now (so a bad address fails the adapter's start).
pub(super) async fn bind(listen: &str) -> Result<tokio::net::TcpListener, AdapterError> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| AdapterError::Bind { adapter: "telegram webhook", addr: listen.to_string(), source })
}

/// Serves POSTs to `path` until `shutdown`, queueing accepted updates.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    path: String,
    secret: String,
    updates: mpsc::Sender<Update>,
    shutdown: Shutdown,
) -> Result<(), AdapterError> {
    let app = axum::Router::new().route(&path, axum::routing::post(receive)).with_state(Route { secret, updates });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.wait())
        .await
        .map_err(|source| AdapterError::Io { adapter: "telegram webhook", source })
}

async fn receive(State(route): State<Route>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let given = headers.get(SECRET_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if !same_secret(given, route.secret.as_bytes()) {
        tracing::warn!(has_header = headers.contains_key(SECRET_HEADER), "telegram webhook: a request without the right secret was refused");
        return StatusCode::UNAUTHORIZED;
    }
    let update: Update = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(e) => {
            tracing::warn!(error = %e, bytes = body.len(), "telegram webhook: an update that does not parse was dropped");
            return StatusCode::OK;
        }
    };
    match route.updates.try_send(update) {
        Ok(()) => StatusCode::OK,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!("telegram webhook: the update queue is full; Telegram will retry");
            StatusCode::SERVICE_UNAVAILABLE
        }
        Err(mpsc::error::TrySendError::Closed(_)) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Constant-time comparison (the length is not secret).
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

/// The secret Telegram accepts: 1 to 256 of `A-Z a-z 0-9 _ -`.
pub fn valid_secret(secret: &str) -> bool {
    (1..=256).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret(b"abc-123", b"abc-123"));
        assert!(!same_secret(b"abc-124", b"abc-123"));
        assert!(!same_secret(b"abc", b"abc-123"));
        assert!(!same_secret(b"", b"abc"));
        assert!(valid_secret("S3cret_-x"));
        assert!(!valid_secret("has space") && !valid_secret("") && !valid_secret(&"a".repeat(257)));
    }
}
