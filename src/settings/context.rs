//! `[context]`: where each channel's recent turns are kept.

use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use super::{invalid, serialize_millis, Secret, SettingsError};

/// `[context]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawContext {
    pub store: String,
    pub redis_url: String,
    pub key_prefix: String,
    pub max_turns: usize,
    pub max_tokens: usize,
    pub ttl_secs: u64,
    pub redis_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Redis,
    Memory,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContextSettings {
    pub store: StoreKind,
    /// May hold a password, so it is a secret; [`redact_url`] shows it.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub redis_url: Secret,
    pub key_prefix: String,
    pub max_turns: usize,
    pub max_tokens: usize,
    /// `None`: contexts never expire.
    #[serde(rename = "ttl_secs", serialize_with = "serialize_opt_secs")]
    pub ttl: Option<Duration>,
    #[serde(rename = "redis_timeout_ms", serialize_with = "serialize_millis")]
    pub redis_timeout: Duration,
}

fn serialize_redacted_url<S: Serializer>(url: &Secret, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url.expose()))
}

fn serialize_opt_secs<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.map_or(0, |d| d.as_secs()))
}

/// A URL with any password (`redis://user:PASSWORD@host`) replaced.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            let user = if userinfo.contains(':') { user } else { "" };
            format!("{scheme}://{user}:[redacted]@{host}{tail}")
        }
        None => url.to_string(),
    }
}

fn redis_url_ok(url: &str) -> Result<(), String> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
        return Err(format!("{:?} is not a redis://, rediss:// or unix:// URL", redact_url(url)));
    }
    Ok(())
}

impl RawContext {
    pub(super) fn validate(self) -> Result<ContextSettings, SettingsError> {
        let c = self;
        let store = match c.store.as_str() {
            "redis" => StoreKind::Redis,
            "memory" => StoreKind::Memory,
            other => return Err(invalid("context.store", format!("{other:?} is not \"redis\" or \"memory\""))),
        };
        if store == StoreKind::Redis {
            redis_url_ok(&c.redis_url).map_err(|m| invalid("context.redis_url", m))?;
        }
        if c.key_prefix.is_empty() || c.key_prefix.contains(char::is_whitespace) {
            return Err(invalid("context.key_prefix", "must be a non-empty word without spaces"));
        }
        if c.max_turns == 0 || c.max_turns > 10_000 {
            return Err(invalid("context.max_turns", format!("{} is not in 1..=10000", c.max_turns)));
        }
        if c.max_tokens < 2 {
            return Err(invalid("context.max_tokens", "must be at least 2 (a turn and its separator)"));
        }
        if c.redis_timeout_ms == 0 {
            return Err(invalid("context.redis_timeout_ms", "must be at least 1"));
        }
        Ok(ContextSettings {
            store,
            redis_url: Secret::new(c.redis_url),
            key_prefix: c.key_prefix,
            max_turns: c.max_turns,
            max_tokens: c.max_tokens,
            ttl: (c.ttl_secs > 0).then(|| Duration::from_secs(c.ttl_secs)),
            redis_timeout: Duration::from_millis(c.redis_timeout_ms),
        })
    }
}
