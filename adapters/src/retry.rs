//! Bounded retries for platform calls.
//!
//! Platforms answer "slow down" (HTTP 429 with a retry-after) and
//! sometimes fail (5xx, a dropped connection). A reply must survive both
//! without a loop that never ends: [`with_retries`] tries a call up to
//! [`RetryPolicy::attempts`] times, waiting what the platform asked (capped)
//! or an exponential backoff, and gives up with the last error.

use std::future::Future;
use std::time::Duration;

/// How a failed call should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Rate limited: wait this long (the platform's retry-after), or the
    /// backoff when the platform did not say.
    RetryAfter(Option<Duration>),
    /// A server error or a network failure: retry after the backoff.
    Transient,
    /// Retrying cannot help (bad request, forbidden).
    Permanent,
}

/// Attempts and waits.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Calls at most, the first included.
    pub attempts: u32,
    /// The first backoff; it doubles after each failure.
    pub backoff: Duration,
    /// No single wait is longer (a platform asking for more is capped).
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 5, backoff: Duration::from_millis(250), max_wait: Duration::from_secs(30) }
    }
}

/// Runs `call` until it succeeds, fails permanently or runs out of
/// attempts. `classify` says what a failure is; `what` names the call in
/// log lines (never the token).
pub async fn with_retries<T, E, F, Fut>(
    policy: RetryPolicy,
    what: &str,
    mut call: F,
    classify: impl Fn(&E) -> Failure,
    describe: impl Fn(&E) -> String,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = policy.backoff;
    let mut attempt = 1;
    loop {
        let error = match call().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let wait = match classify(&error) {
            Failure::Permanent => return Err(error),
            Failure::RetryAfter(after) => after.unwrap_or(backoff).max(backoff / 2),
            Failure::Transient => backoff,
        }
        .min(policy.max_wait);
        if attempt >= policy.attempts {
            tracing::warn!(call = what, attempts = attempt, error = %describe(&error), "giving up");
            return Err(error);
        }
        tracing::info!(call = what, attempt, wait_ms = wait.as_millis() as u64, error = %describe(&error), "retrying");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(policy.max_wait);
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn retries_are_bounded_and_honour_retry_after() {
        let calls = AtomicU32::new(0);
        let policy = RetryPolicy::default();
        let started = tokio::time::Instant::now();
        let result: Result<u32, Failure> = with_retries(
            policy,
            "test",
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => Err(Failure::RetryAfter(Some(Duration::from_secs(3)))),
                        1 => Err(Failure::Transient),
                        _ => Ok(n),
                    }
                }
            },
            |e| *e,
            |e| format!("{e:?}"),
        )
        .await;
        assert_eq!(result, Ok(2));
        assert!(started.elapsed() >= Duration::from_secs(3));

        calls.store(0, Ordering::SeqCst);
        let result: Result<(), Failure> = with_retries(
            policy,
            "test",
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(Failure::Transient) }
            },
            |e| *e,
            |e| format!("{e:?}"),
        )
        .await;
        assert_eq!(result, Err(Failure::Transient));
        assert_eq!(calls.load(Ordering::SeqCst), policy.attempts);

        calls.store(0, Ordering::SeqCst);
        let _ = with_retries::<(), _, _, _>(
            policy,
            "test",
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(Failure::Permanent) }
            },
            |e| *e,
            |e| format!("{e:?}"),
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
