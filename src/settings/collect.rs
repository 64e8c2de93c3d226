//! `[collect]`: consented log collection for fine-tuning.

use serde::{Deserialize, Serialize};

use super::{invalid, Secret, SettingsError};

/// `[collect]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCollect {
    pub enabled: bool,
    pub dir: String,
    pub channels: Vec<String>,
    pub segment_max_bytes: u64,
    pub segment_max_secs: u64,
    pub retention_days: u64,
    pub author_key: String,
    pub consent: String,
}

/// Whose messages a collecting channel gives to the training logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Consent {
    /// Everyone's, but those who sent `/optout` (the channel consented).
    Channel,
    /// Only those who sent `/optin` (and no `/optout` since); an exchange
    /// whose context holds anyone else's turn is not collected.
    User,
}

/// `[collect]`: consented log collection for fine-tuning.
#[derive(Debug, Clone, Serialize)]
pub struct CollectSettings {
    pub enabled: bool,
    pub dir: std::path::PathBuf,
    /// Opted-in channels, `platform:channel_id`.
    pub channels: Vec<String>,
    pub segment_max_bytes: u64,
    pub segment_max_secs: u64,
    /// Segments older than this are deleted (0: kept forever).
    pub retention_days: u64,
    /// The key of the authors' keyed hash (a secret).
    pub author_key: Secret,
    pub consent: Consent,
}

impl RawCollect {
    pub(super) fn validate(self) -> Result<CollectSettings, SettingsError> {
        if self.enabled {
            if self.dir.trim().is_empty() {
                return Err(invalid("collect.dir", "must name a folder when collection is enabled"));
            }
            if self.author_key.len() < 16 {
                return Err(invalid(
                    "collect.author_key",
                    "must be at least 16 characters when collection is enabled (set DIALOGD__COLLECT__AUTHOR_KEY)",
                ));
            }
        }
        if let Some(c) = self.channels.iter().find(|c| dialogd_adapters::ChannelKey::parse(c).is_none()) {
            return Err(invalid("collect.channels", format!("{c:?} is not platform:channel_id")));
        }
        let consent = match self.consent.as_str() {
            "channel" => Consent::Channel,
            "user" => Consent::User,
            other => return Err(invalid("collect.consent", format!("{other:?} is not \"channel\" or \"user\""))),
        };
        if self.segment_max_bytes < 1024 || self.segment_max_secs == 0 {
            return Err(invalid("collect.segment_max_bytes", "segments need at least 1024 bytes and 1 second"));
        }
        Ok(CollectSettings {
            enabled: self.enabled,
            dir: self.dir.into(),
            channels: self.channels,
            segment_max_bytes: self.segment_max_bytes,
            segment_max_secs: self.segment_max_secs,
            retention_days: self.retention_days,
            author_key: Secret::new(self.author_key),
            consent,
        })
    }
}
