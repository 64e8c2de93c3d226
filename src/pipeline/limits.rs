//! Rate limits per user and per channel, so one user (or one busy
//! channel) cannot monopolise generation.
//!
//! Fixed windows: each key counts the messages that reached generation in
//! its current window. The first message over a limit gets a short notice;
//! later ones are dropped quietly until the window passes. Times come from
//! tokio's clock, so tests can pause it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use dialogd_adapters::ChannelKey;
use tokio::time::Instant;

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

/// One key's window.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    count: u32,
    /// Whether this window's notice was given.
    noticed: bool,
}

/// The counters. Keys are `user:platform:author` and `channel:…`.
pub struct RateLimiter {
    settings: RateLimitSettings,
    /// A std mutex: held for a lookup and an update, never across an await.
    windows: Mutex<HashMap<String, Window>>,
}

impl RateLimiter {
    pub fn new(settings: RateLimitSettings) -> Self {
        Self { settings, windows: Mutex::new(HashMap::new()) }
    }

    /// Counts a message of `author` in `channel` and says what to do.
    pub fn check(&self, channel: &ChannelKey, author: &str) -> Verdict {
        let s = &self.settings;
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() > 10_000 {
            windows.retain(|_, w| now.duration_since(w.started) < s.window);
        }
        let user_key = format!("user:{}:{author}", channel.platform.as_str());
        let channel_key = format!("channel:{channel}");
        let mut verdict = Verdict::Allow;
        for (key, limit, notice) in
            [(user_key, s.per_user, USER_NOTICE), (channel_key, s.per_channel, CHANNEL_NOTICE)]
        {
            if limit == 0 {
                continue;
            }
            let window = windows.entry(key).or_insert(Window { started: now, count: 0, noticed: false });
            if now.duration_since(window.started) >= s.window {
                *window = Window { started: now, count: 0, noticed: false };
            }
            window.count = window.count.saturating_add(1);
            if window.count > limit && verdict == Verdict::Allow {
                let retry_after = s.window.saturating_sub(now.duration_since(window.started));
                verdict = if window.noticed {
                    Verdict::Drop { retry_after }
                } else {
                    window.noticed = true;
                    Verdict::Notice { notice, retry_after }
                };
            }
        }
        verdict
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
        let c = ChannelKey::new(Platform::Telegram, "1");
        assert_eq!(limiter.check(&c, "ann"), Verdict::Allow);
        assert_eq!(limiter.check(&c, "ann"), Verdict::Allow);
        assert_eq!(limiter.check(&c, "ann"), Verdict::Notice { notice: USER_NOTICE, retry_after: Duration::from_secs(60) });
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(limiter.check(&c, "ann"), Verdict::Drop { retry_after: Duration::from_secs(45) });
        assert_eq!(limiter.check(&c, "bob"), Verdict::Allow, "another user is not limited");
        tokio::time::advance(Duration::from_secs(45)).await;
        assert_eq!(limiter.check(&c, "ann"), Verdict::Allow);
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_limit_covers_all_its_users() {
        let limiter =
            RateLimiter::new(RateLimitSettings { per_user: 0, per_channel: 2, window: Duration::from_secs(10) });
        let c = ChannelKey::new(Platform::Discord, "9");
        assert_eq!(limiter.check(&c, "a"), Verdict::Allow);
        assert_eq!(limiter.check(&c, "b"), Verdict::Allow);
        let ten = Duration::from_secs(10);
        assert_eq!(limiter.check(&c, "c"), Verdict::Notice { notice: CHANNEL_NOTICE, retry_after: ten });
        assert_eq!(limiter.check(&c, "d"), Verdict::Drop { retry_after: ten });
        let other = ChannelKey::new(Platform::Discord, "10");
        assert_eq!(limiter.check(&other, "a"), Verdict::Allow);
    }
}
