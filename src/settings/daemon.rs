//! `[daemon]`: the daemon's own lifecycle.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, serialize_secs, SettingsError};

/// `[daemon]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    pub drain_secs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DaemonSettings {
    /// How long messages in flight may take to finish at shutdown.
    #[serde(rename = "drain_secs", serialize_with = "serialize_secs")]
    pub drain: Duration,
}

impl RawDaemon {
    pub(super) fn validate(self) -> Result<DaemonSettings, SettingsError> {
        if self.drain_secs == 0 {
            return Err(invalid("daemon.drain_secs", "must be at least 1"));
        }
        Ok(DaemonSettings { drain: Duration::from_secs(self.drain_secs) })
    }
}
