//! Rate limits per user and per channel, so one user (or one busy
//! channel) cannot monopolise generation.
//!
//! Fixed windows: each key counts the messages that reached generation in
//! its current window, in the context store ([`ContextStore::count_hits`]),
//! so every daemon sharing the store counts together and a restart
//! changes nothing. The first message over a limit (hit `limit + 1`, which
//! exactly one daemon sees) gets a short notice; later ones are dropped
//! quietly until the window passes. While the store cannot be reached the
//! windows are counted in this process. Times come from tokio's clock (in
//! the memory store), so tests can pause it.

use std::time::Duration;

use dialogd_adapters::ChannelKey;

use crate::context::memory::MemoryStore;
use crate::context::{ContextStore, Limits};
use crate::settings::RateLimitSettings;

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Over a limit for the first time in this window: answer the notice.
    /// `retry_after`: until the limiting window ends.
    Notice { notice: &'static str, retry_after: Duration },
    /// Over a limit again: drop it quietly (until `retry_after` has passed).
    Drop { retry_after: Duration },
}

pub const USER_NOTICE: &str = "You're sending messages faster than I can answer; give me a moment.";
pub const CHANNEL_NOTICE: &str = "This channel is keeping me very busy; I'll answer again in a moment.";

/// The limits. Window keys are `user:platform:author` and `channel:…`.
pub struct RateLimiter {
    settings: RateLimitSettings,
    /// Counts while the shared store cannot be reached.
    local: MemoryStore,
}

impl RateLimiter {
    pub fn new(settings: RateLimitSettings) -> Self {
        Self { settings, local: MemoryStore::new(Limits::new(1, None)) }
    }

    /// Counts a message of `author` in `channel` in `store` and says what
    /// to do.
    pub async fn check(&self, store: &dyn ContextStore, channel: &ChannelKey, author: &str) -> Verdict {
        let s = &self.settings;
        let limits: Vec<(String, u32, &'static str)> = [
            (format!("user:{}:{author}", channel.platform.as_str()), s.per_user, USER_NOTICE),
            (format!("channel:{channel}"), s.per_channel, CHANNEL_NOTICE),
        ]
        .into_iter()
        .filter(|(_, limit, _)| *limit > 0)
        .collect();
        if limits.is_empty() {
            return Verdict::Allow;
        }
        let keys: Vec<String> = limits.iter().map(|(key, _, _)| key.clone()).collect();
        let counts = match store.count_hits(&keys, s.window).await {
            Ok(counts) => counts,
            Err(e) => {
                tracing::debug!(%channel, error = %e, "rate limits counted in this process");
                self.local.count_hits(&keys, s.window).await.unwrap_or_default()
            }
        };
        for ((_, limit, notice), (hits, retry_after)) in limits.iter().zip(counts) {
            let limit = u64::from(*limit);
            if hits == limit + 1 {
                return Verdict::Notice { notice, retry_after };
            }
            if hits > limit {
                return Verdict::Drop { retry_after };
            }
        }
        Verdict::Allow
    }

    pub fn window(&self) -> Duration {
        self.settings.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dialogd_adapters::Platform;

    #[tokio::test(start_paused = true)]
    async fn first_over_limit_gets_a_notice_then_quiet_until_the_window_passes() {
        let limiter =
            RateLimiter::new(RateLimitSettings { per_user: 2, per_channel: 0, window: Duration::from_secs(60) });
        let store = MemoryStore::new(Limits::new(4, None));
        let c = ChannelKey::new(Platform::Telegram, "1");
        assert_eq!(limiter.check(&store, &c, "ann").await, Verdict::Allow);
        assert_eq!(limiter.check(&store, &c, "ann").await, Verdict::Allow);
        let notice = Verdict::Notice { notice: USER_NOTICE, retry_after: Duration::from_secs(60) };
        assert_eq!(limiter.check(&store, &c, "ann").await, notice);
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(limiter.check(&store, &c, "ann").await, Verdict::Drop { retry_after: Duration::from_secs(45) });
        assert_eq!(limiter.check(&store, &c, "bob").await, Verdict::Allow, "another user is not limited");
        tokio::time::advance(Duration::from_secs(45)).await;
        assert_eq!(limiter.check(&store, &c, "ann").await, Verdict::Allow);
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_limit_covers_all_its_users() {
        let limiter =
            RateLimiter::new(RateLimitSettings { per_user: 0, per_channel: 2, window: Duration::from_secs(10) });
        let store = MemoryStore::new(Limits::new(4, None));
        let c = ChannelKey::new(Platform::Discord, "9");
        assert_eq!(limiter.check(&store, &c, "a").await, Verdict::Allow);
        assert_eq!(limiter.check(&store, &c, "b").await, Verdict::Allow);
        let ten = Duration::from_secs(10);
        assert_eq!(limiter.check(&store, &c, "c").await, Verdict::Notice { notice: CHANNEL_NOTICE, retry_after: ten });
        assert_eq!(limiter.check(&store, &c, "d").await, Verdict::Drop { retry_after: ten });
        let other = ChannelKey::new(Platform::Discord, "10");
        assert_eq!(limiter.check(&store, &other, "a").await, Verdict::Allow);
    }
}
