//! `[worker]`: how `dialogd worker` takes generation requests from the
//! Redis stream (with `[generation] backend = "redis"` on the daemons).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, serialize_millis, SettingsError};

/// `[worker]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorker {
    pub max_inflight: usize,
    pub claim_idle_ms: u64,
    pub consumer: String,
    pub cache_dir: String,
}

/// A generation worker's share of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerSettings {
    /// Requests this worker holds at once (taken, not yet answered).
    pub max_inflight: usize,
    /// A request another consumer took and left unanswered this long is
    /// taken over (XAUTOCLAIM): its worker is presumed dead.
    #[serde(rename = "claim_idle_ms", serialize_with = "serialize_millis")]
    pub claim_idle: Duration,
    /// This worker's consumer name in the group (empty: host name and
    /// process id).
    pub consumer: String,
    /// This worker's own folder (persona adapters fetched from Redis are
    /// cached under `adapters/`).
    pub cache_dir: std::path::PathBuf,
}

impl RawWorker {
    pub(super) fn validate(self) -> Result<WorkerSettings, SettingsError> {
        if self.max_inflight == 0 || self.max_inflight > 1024 {
            return Err(invalid("worker.max_inflight", format!("{} is not in 1..=1024", self.max_inflight)));
        }
        if self.claim_idle_ms < 100 {
            return Err(invalid("worker.claim_idle_ms", format!("{} is under 100 ms", self.claim_idle_ms)));
        }
        Ok(WorkerSettings {
            max_inflight: self.max_inflight,
            claim_idle: Duration::from_millis(self.claim_idle_ms),
            consumer: self.consumer.trim().to_string(),
            cache_dir: {
                if self.cache_dir.trim().is_empty() {
                    return Err(invalid("worker.cache_dir", "must name a folder"));
                }
                self.cache_dir.trim().into()
            },
        })
    }
}
