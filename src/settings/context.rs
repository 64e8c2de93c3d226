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

/// A Redis URL with its secrets replaced by `[redacted]`: the password of
/// any URL form (`redis://user:PASSWORD@host`, `rediss://`, and the `pass`
/// or `password` query parameter of `unix://` and `redis+unix://`); a
/// user without a password stays as written. Text that does not parse as
/// a URL is redacted whole.
pub fn redact_url(url: &str) -> String {
    // `url` percent-encodes brackets; a plain placeholder is put in its
    // place after serialising.
    const PLACEHOLDER: &str = "REDACTEDxSECRETx7f3a";
    let mut parsed = match url::Url::parse(url) {
        Ok(parsed) if !parsed.cannot_be_a_base() => parsed,
        _ => return "[redacted: not a URL]".to_string(),
    };
    if parsed.password().is_some() && parsed.set_password(Some(PLACEHOLDER)).is_err() {
        return "[redacted]".to_string();
    }
    let secret_key = |k: &str| k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password");
    if parsed.query_pairs().any(|(k, _)| secret_key(&k)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret_key(&k) { PLACEHOLDER.to_string() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.as_str().replace(PLACEHOLDER, "[redacted]")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_url_form_loses_its_password_and_only_that() {
        let cases = [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://:pw1@h:1/0", "redis://:[redacted]@h:1/0"),
            ("rediss://user:pw2@h/0", "rediss://user:[redacted]@h/0"),
            ("redis://user@h/0", "redis://user@h/0"),
            ("redis://us%40er:p%40w3@[::1]:6379/2", "redis://us%40er:[redacted]@[::1]:6379/2"),
            ("unix:///run/redis.sock?db=1&pass=pw4", "unix:///run/redis.sock?db=1&pass=[redacted]"),
            ("redis+unix:///run/r.sock?user=bob&password=pw5", "redis+unix:///run/r.sock?user=bob&password=[redacted]"),
            ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
        assert_eq!(redact_url("db:pw6@nowhere"), "[redacted: not a URL]");
        assert!(!redact_url("not a url with pw7").contains("pw7"));
    }

}
