//! Discord shards: which of the bot's gateway shards this instance runs
//! (`shard_count`, `shards`), started with serenity's own sharded starts,
//! and per-shard figures for the daemon's metrics.
//!
//! Discord sends a guild's events to shard `(guild_id >> 22) % shard_count`
//! and direct messages to shard 0, so instances that run disjoint ranges
//! of one shard count split one bot token between them.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serenity::gateway::{ConnectionStage, ShardManager};

use crate::settings::{invalid, SettingsError};

/// This instance's shards: `first` to `last`, both included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardRange {
    pub first: u32,
    pub last: u32,
}

impl Serialize for ShardRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        [self.first, self.last].serialize(s)
    }
}

/// Validates `shard_count` and `shards` (`[first, last]` or empty).
///
/// # Errors
/// `shards` with other than 0 or 2 numbers, a range with `shard_count = 0`
/// (instances that each ask Discord for its count could disagree), `first`
/// after `last`, or `last` not below `shard_count`.
pub(super) fn validate(shard_count: u32, shards: &[u32]) -> Result<Option<ShardRange>, SettingsError> {
    const KEY: &str = "adapters.discord.shards";
    let range = match *shards {
        [] => return Ok(None),
        [first, last] => ShardRange { first, last },
        _ => return Err(invalid(KEY, format!("{shards:?} is not [first, last] (this instance's shards, both included) or [] for all"))),
    };
    if shard_count == 0 {
        return Err(invalid(
            "adapters.discord.shard_count",
            "a shard range (adapters.discord.shards) needs the total written out: every instance must use the same \
             shard_count, and 0 (Discord's recommendation) could differ between instances",
        ));
    }
    if range.first > range.last {
        return Err(invalid(KEY, format!("first shard {} is after last shard {}", range.first, range.last)));
    }
    if range.last >= shard_count {
        return Err(invalid(
            KEY,
            format!("shard {} does not exist: with shard_count = {shard_count} shards are numbered 0 to {}", range.last, shard_count - 1),
        ));
    }
    Ok(Some(range))
}

/// How the client starts its shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Start {
    /// As many shards as Discord recommends (`GET /gateway/bot`), all here.
    Recommended,
    /// Shards `0..total`, all here.
    All { total: u32 },
    /// Only `range` of `total`.
    Range { range: ShardRange, total: u32 },
}

impl Start {
    pub(super) fn new(shard_count: u32, shards: Option<ShardRange>) -> Self {
        match (shard_count, shards) {
            (0, _) => Self::Recommended,
            (total, None) => Self::All { total },
            (total, Some(range)) => Self::Range { range, total },
        }
    }

    /// Runs the client's shards until they end (serenity's own starts).
    pub(super) async fn run(&self, client: &mut serenity::Client) -> serenity::Result<()> {
        match self {
            Self::Recommended => client.start_autosharded().await,
            Self::All { total } => client.start_shards(*total).await,
            // serenity reads the range's end as the last shard, included
            // (its `start_connection(range.start, range.end, total)`).
            Self::Range { range, total } => client.start_shard_range(serenity_range(*range), *total).await,
        }
    }
}

/// The `Range` that serenity's `start_shard_range` takes for `range`.
fn serenity_range(range: ShardRange) -> Range<u32> {
    range.first..range.last
}

/// One shard's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ShardFigures {
    /// Connected and identified (or resumed).
    pub up: bool,
    /// The last heartbeat's round trip, once one was acknowledged.
    pub latency: Option<Duration>,
    /// Guilds in the shard's Ready.
    pub guilds: u64,
    /// Messages, edits and slash commands the shard handed to the core.
    pub messages: u64,
}

/// Per-shard figures of one Discord adapter, shared with whoever reports
/// them (the daemon's `/metrics`). Shards appear once they start.
#[derive(Debug, Default)]
pub struct ShardStats(Mutex<BTreeMap<u32, ShardFigures>>);

impl ShardStats {
    /// Every started shard's figures, by shard id.
    pub fn snapshot(&self) -> Vec<(u32, ShardFigures)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(id, f)| (*id, *f)).collect()
    }

    pub(super) fn update(&self, shard: u32, change: impl FnOnce(&mut ShardFigures)) {
        change(self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(shard).or_default());
    }

    /// Every shard down (the client stopped).
    pub(super) fn all_down(&self) {
        for figures in self.0.lock().unwrap_or_else(|e| e.into_inner()).values_mut() {
            figures.up = false;
        }
    }
}

/// How often [`watch`] reads the shards' heartbeat latency and stage.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Copies each running shard's stage and heartbeat latency from
/// serenity's shard manager into `stats`, every [`WATCH_EVERY`], until
/// dropped.
pub(super) async fn watch(manager: Arc<ShardManager>, stats: Arc<ShardStats>) {
    let mut every = tokio::time::interval(WATCH_EVERY);
    loop {
        every.tick().await;
        let runners = manager.runners.lock().await;
        for (id, info) in runners.iter() {
            stats.update(id.0, |f| {
                f.up = matches!(info.stage, ConnectionStage::Connected);
                f.latency = info.latency.or(f.latency);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_settings_are_checked_with_the_key_at_fault() {
        assert_eq!(validate(0, &[]).unwrap(), None);
        assert_eq!(validate(4, &[2, 3]).unwrap(), Some(ShardRange { first: 2, last: 3 }));
        let cases: [(u32, &[u32], &str); 5] = [
            (2, &[1], "adapters.discord.shards: [1] is not [first, last]"),
            (2, &[0, 1, 1], "adapters.discord.shards: [0, 1, 1] is not"),
            (0, &[0, 0], "adapters.discord.shard_count: a shard range"),
            (4, &[3, 2], "adapters.discord.shards: first shard 3 is after last shard 2"),
            (2, &[1, 2], "adapters.discord.shards: shard 2 does not exist: with shard_count = 2 shards are numbered 0 to 1"),
        ];
        for (count, shards, expected) in cases {
            let err = validate(count, shards).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{err}");
        }
    }

    #[test]
    fn starts_follow_the_settings() {
        let range = ShardRange { first: 1, last: 1 };
        assert_eq!(Start::new(0, None), Start::Recommended);
        assert_eq!(Start::new(3, None), Start::All { total: 3 });
        assert_eq!(Start::new(2, Some(range)), Start::Range { range, total: 2 });
        // serenity's range end is the last shard, included.
        assert_eq!(serenity_range(ShardRange { first: 4, last: 7 }), 4..7);
    }

    #[test]
    fn figures_are_kept_per_shard() {
        let stats = ShardStats::default();
        stats.update(1, |f| f.messages += 1);
        stats.update(0, |f| f.up = true);
        stats.update(1, |f| f.up = true);
        stats.all_down();
        let shown = stats.snapshot();
        assert_eq!(shown.iter().map(|(id, f)| (*id, f.up, f.messages)).collect::<Vec<_>>(), [(0, false, 0), (1, false, 1)]);
    }
}
