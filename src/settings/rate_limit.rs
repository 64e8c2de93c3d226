//! `[rate_limit]`: per-user and per-channel limits on messages that reach
//! generation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, serialize_secs, SettingsError};

/// `[rate_limit]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_user: u32,
    pub per_channel: u32,
    pub window_secs: u64,
}

/// Per-user and per-channel limits on messages that reach generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimitSettings {
    /// Messages per user per window (0: no limit).
    pub per_user: u32,
    /// Messages per channel per window (0: no limit).
    pub per_channel: u32,
    #[serde(rename = "window_secs", serialize_with = "serialize_secs")]
    pub window: Duration,
}

impl RawRateLimit {
    pub(super) fn validate(self) -> Result<RateLimitSettings, SettingsError> {
        let r = self;
        if r.window_secs == 0 {
            return Err(invalid("rate_limit.window_secs", "must be at least 1"));
        }
        Ok(RateLimitSettings { per_user: r.per_user, per_channel: r.per_channel, window: Duration::from_secs(r.window_secs) })
    }
}
