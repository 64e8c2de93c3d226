//! The `[adapters]` settings section: every platform's settings, raw and
//! validated, and [`Secret`].
//!
//! Each adapter module owns its settings: a raw struct as the settings
//! files spell it (serde, unknown keys refused) and a validated one that
//! its constructor takes as is (`http::RawHttp` → `http::HttpSettings` →
//! `HttpAdapter::bind`). This module gathers them into the section the
//! daemon's settings embed; errors name the key at fault
//! (`adapters.telegram.poll_timeout_secs: 60 is not in 1..=15`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::console::{ConsoleSettings, RawConsole};
use crate::discord::{DiscordSettings, RawDiscord};
use crate::http::{HttpSettings, RawHttp};
use crate::telegram::{RawTelegram, TelegramSettings};

/// A bad value in `[adapters]`.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// `key` is the full dotted key (`adapters.http.listen`).
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

pub(crate) fn invalid(key: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid { key, message: message.into() }
}

/// A secret value (a token, a password): never printed. Its `Debug` and
/// its serialized form are `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A trimmed settings value as a secret; `None` when it is empty (unset).
    pub fn non_empty(value: &str) -> Option<Self> {
        let value = value.trim();
        (!value.is_empty()).then(|| Self::new(value))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// An unset secret shows as `""`, a set one as `[redacted]`.
pub(crate) fn serialize_opt_secret<S: Serializer>(secret: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(secret) => secret.serialize(s),
        None => s.serialize_str(""),
    }
}

pub(crate) fn serialize_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// `[adapters]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdapters {
    pub http: RawHttp,
    pub console: RawConsole,
    pub discord: RawDiscord,
    pub telegram: RawTelegram,
}

/// `[adapters]` validated: what each adapter is started with.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterSettings {
    pub http: HttpSettings,
    pub console: ConsoleSettings,
    pub discord: DiscordSettings,
    pub telegram: TelegramSettings,
}

impl RawAdapters {
    /// Validates every platform's settings, then that one at least is on.
    ///
    /// # Errors
    /// The first bad value, with its key.
    pub fn validate(self) -> Result<AdapterSettings, SettingsError> {
        let http = self.http.validate()?;
        let discord = self.discord.validate()?;
        let mut telegram = self.telegram.validate()?;
        // The webhook server is bounded as the JSON API is.
        telegram.webhook_limits = http.limits();
        let console = self.console.validate();
        if !(http.enabled || console.enabled || discord.enabled || telegram.enabled) {
            return Err(invalid(
                "adapters",
                "no adapter is enabled (adapters.http, adapters.console, adapters.discord, adapters.telegram)",
            ));
        }
        Ok(AdapterSettings { http, console, discord, telegram })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_print_redacted_and_unset_ones_are_none() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"[redacted]\"");
        assert_eq!(Secret::non_empty("  "), None);
        assert_eq!(Secret::non_empty(" t0k ").unwrap().expose(), "t0k");
    }

    fn raw(change: impl FnOnce(&mut serde_json::Value)) -> Result<AdapterSettings, SettingsError> {
        let mut value = serde_json::json!({
            "http": {
                "enabled": true, "listen": "127.0.0.1:0", "token": "", "max_body_bytes": 4096,
                "header_timeout_secs": 10, "body_timeout_secs": 10, "max_connections": 512
            },
            "console": { "enabled": false },
            "discord": {
                "enabled": false, "token": "", "proxy_url": "", "allowed_guilds": [], "allowed_channels": [],
                "open_channels": [], "command_guilds": [], "moderator_roles": [], "moderators": [], "answer_edits": false,
                "answer_bots": false, "shard_count": 0, "shards": []
            },
            "telegram": {
                "enabled": false, "token": "", "api_url": "https://api.telegram.org/", "moderators": [],
                "allowed_chats": [], "allowed_users": [],
                "poll_timeout_secs": 10, "mode": "polling", "webhook_url": "", "webhook_listen": "127.0.0.1:8443",
                "webhook_secret": "", "answer_edits": false, "answer_bots": false
            }
        });
        change(&mut value);
        serde_json::from_value::<RawAdapters>(value).unwrap().validate()
    }

    /// An enabled Telegram adapter in webhook mode.
    fn webhook(v: &mut serde_json::Value, url: &str, listen: &str, secret: &str) {
        let t = &mut v["telegram"];
        t["enabled"] = true.into();
        t["token"] = "tg-1".into();
        t["mode"] = "webhook".into();
        t["webhook_url"] = url.into();
        t["webhook_listen"] = listen.into();
        t["webhook_secret"] = secret.into();
    }

    #[test]
    fn a_good_webhook_validates_and_its_secret_is_redacted() {
        let ok = raw(|v| webhook(v, "https://bot.example/telegram/hook", "127.0.0.1:8443", "Se_cr-3t")).unwrap();
        assert_eq!(ok.telegram.mode, crate::telegram::TelegramMode::Webhook);
        assert_eq!(ok.telegram.webhook_secret.as_ref().map(Secret::expose), Some("Se_cr-3t"));
        let shown = serde_json::to_string(&ok).unwrap();
        assert!(!shown.contains("Se_cr-3t") && shown.contains("\"mode\":\"webhook\""), "{shown}");
        // A disabled adapter's webhook keys are not checked.
        assert!(raw(|v| v["telegram"]["mode"] = "webhook".into()).is_ok());
    }

    #[test]
    fn each_platform_validates_its_own_keys() {
        let ok = raw(|_| {}).unwrap();
        assert_eq!(ok.telegram.api_url, "https://api.telegram.org", "trailing slash dropped");
        assert!(ok.http.token.is_none() && ok.discord.proxy_url.is_none());
        type Change = fn(&mut serde_json::Value);
        let cases: [(Change, &str); 15] = [
            (|v| v["telegram"]["mode"] = "push".into(), "adapters.telegram.mode: \"push\" is not"),
            (|v| webhook(v, "http://bot.example/hook", "127.0.0.1:8443", "s3cret"), "adapters.telegram.webhook_url: must be the bot's public https"),
            (|v| webhook(v, "https://bot.example/hook", "localhost", "s3cret"), "adapters.telegram.webhook_listen: \"localhost\" is not an address"),
            (|v| webhook(v, "https://bot.example/hook", "127.0.0.1:8443", ""), "adapters.telegram.webhook_secret: webhook mode needs a secret"),
            (|v| webhook(v, "https://bot.example/hook", "127.0.0.1:8443", "no spaces"), "adapters.telegram.webhook_secret: must be"),
            (|v| v["http"]["listen"] = "nowhere".into(), "adapters.http.listen: \"nowhere\" is not an address"),
            (|v| v["http"]["header_timeout_secs"] = 0.into(), "adapters.http.header_timeout_secs: 0 is not in 1-3600"),
            (|v| v["http"]["body_timeout_secs"] = 7200.into(), "adapters.http.body_timeout_secs: 7200 is not in 1-3600"),
            (|v| v["http"]["max_connections"] = 0.into(), "adapters.http.max_connections: must be at least 1"),
            (|v| v["http"]["max_body_bytes"] = 10.into(), "adapters.http.max_body_bytes: must be at least 1024"),
            (|v| v["telegram"]["poll_timeout_secs"] = 60.into(), "adapters.telegram.poll_timeout_secs: 60 is not in 1..=15"),
            (|v| v["telegram"]["enabled"] = true.into(), "adapters.telegram.token: "),
            (|v| v["discord"]["proxy_url"] = "ftp://x".into(), "adapters.discord.proxy_url: "),
            (|v| v["discord"]["shards"] = serde_json::json!([1, 1]), "adapters.discord.shard_count: a shard range"),
            (|v| v["http"]["enabled"] = false.into(), "adapters: no adapter is enabled"),
        ];
        for (change, expected) in cases {
            let err = raw(change).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{err}");
        }
        let with_tokens = raw(|v| {
            v["telegram"]["enabled"] = true.into();
            v["telegram"]["token"] = " tg-1 ".into();
            v["discord"]["proxy_url"] = " http://127.0.0.1:9 ".into();
        })
        .unwrap();
        assert_eq!(with_tokens.telegram.token.as_ref().map(Secret::expose), Some("tg-1"));
        assert_eq!(with_tokens.discord.proxy_url.as_deref(), Some("http://127.0.0.1:9"));
        let shown = serde_json::to_string(&with_tokens).unwrap();
        assert!(!shown.contains("tg-1") && shown.contains("\"token\":\"[redacted]\"") && shown.contains("\"token\":\"\""), "{shown}");
    }
}
