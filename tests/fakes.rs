//! Loopback fakes of the chat platforms, for the adapters' end-to-end
//! tests: the real teloxide and serenity clients talk to these on
//! 127.0.0.1.
//!
//! - `telegram`: the Bot API over HTTP (`/bot<token>/<Method>`).
//! - `discord`: REST (through serenity's proxy setting) and the gateway
//!   WebSocket (Hello, Identify, Ready, dispatches, Resume).
//! - `hub`: the Hugging Face hub's file endpoint (`HF_ENDPOINT`), with a
//!   download that can stall.


pub mod discord;
pub mod hub;
pub mod telegram;

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Polls `probe` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn wait_for<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Captures every log line written while it is the thread's default
/// subscriber (the tests run on a current-thread runtime, so every task's
/// lines land here).
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace,hyper=debug,h2=info,rustls=info,tungstenite=debug"))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
