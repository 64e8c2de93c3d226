//! The Redis context store, and the only code in dialogd that knows Redis.
//!
//! Keys (all under `key_prefix`, `P` below; `C` is `platform:channel_id`):
//!
//! - `P:ctx:C`: a list of turns as JSON, oldest first, at most `max_turns`.
//! - `P:seen:C`: a sorted set of recent message ids (duplicate detection).
//! - `P:authors:platform:author`: the `ctx` keys an author wrote in (for
//!   `/forget`).
//! - `P:muted:C`: present while the channel is muted (no expiry).
//! - `P:rate:user:platform:author`, `P:rate:channel:C`: a rate-limit
//!   window's hits (`INCR`), expiring when the window ends.
//! - `P:lease:C`: the daemon handling the channel's message now (a short
//!   `PX` lease, see [`super::lease`]); `P:lease:telegram:poller-H`: the
//!   daemon running the Telegram adapter of the token whose hash is `H`
//!   ([`super::lease::Sole`]).
//!
//! Every `ctx`, `seen` and `authors` key expires after `ttl` idle. Appends run as one Lua script, so a
//! channel's duplicate check, append, trim and TTL refresh are atomic, and
//! two daemons sharing Redis cannot interleave half-appends.
//!
//! When Redis cannot be reached, or answers but refuses the store's work
//! (authentication, out of memory, a read-only replica, a failing script,
//! missing permissions, still loading), the store says so at once
//! ([`ContextError::Unavailable`]) instead of making every message wait: a
//! failed call marks it down (a warning, at most one per 30 s; every
//! failure is counted in `redis_errors`), and a watcher probes with a small
//! write (so out-of-memory and read-only count, not only reachability)
//! every 2 s while up and with exponential backoff (250 ms up to 4 s) while
//! down. A failed probe replaces the connection manager, so the next probe
//! makes a fresh connection (never a stale "refused" from while Redis was
//! away, nor an authentication failure the manager would keep for good):
//! the store is back within 5 s of Redis. A wrong-type value under one
//! channel's key is that channel's problem ([`ContextError::Corrupt`],
//! warned and counted), not an outage.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use dialogd_adapters::{BoxFuture, ChannelKey, Platform};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script};

use super::{Appended, ContextError, ContextStore, EditChange, Edited, Limits, Turn};
use crate::telemetry::Metrics;

const APPEND_LUA: &str = r#"
-- KEYS: ctx, seen, author index keys...
-- ARGV: max_turns, ttl_secs, msg_id or '', seen_ids, score, n_turns, turns...
local msg = ARGV[3]
if msg ~= '' then
  if redis.call('ZSCORE', KEYS[2], msg) then return 0 end
  redis.call('ZADD', KEYS[2], ARGV[5], msg)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[4]) + 1))
end
local n = tonumber(ARGV[6])
for i = 1, n do redis.call('RPUSH', KEYS[1], ARGV[6 + i]) end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
for i = 3, #KEYS do redis.call('SADD', KEYS[i], KEYS[1]) end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
end
return 1
"#;

const HITS_LUA: &str = r#"
-- KEYS: window keys; ARGV: window_ms. Returns hits and ms left, per key.
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  local left = redis.call('PTTL', key)
  if n == 1 or left < 0 then
    redis.call('PEXPIRE', key, ARGV[1])
    left = tonumber(ARGV[1])
  end
  out[#out + 1] = n
  out[#out + 1] = left
end
return out
"#;

const LEASE_LUA: &str = r#"
-- KEYS: lease; ARGV: holder, ttl_ms. Takes the lease when free, renews it when the holder's.
local now = redis.call('GET', KEYS[1])
if now == false or now == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

const RELEASE_LUA: &str = r#"
-- KEYS: lease; ARGV: holder. Deletes the lease only if it is the holder's.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

const FORGET_LUA: &str = r#"
-- KEYS: ctx; ARGV: author. Removes the author's turns and the bot's replies to them.
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local keep = {}
local removed = 0
for _, raw in ipairs(items) do
  local ok, t = pcall(cjson.decode, raw)
  local about = false
  if ok and type(t) == 'table' then
    if t.bot == true then about = (t.reply_to == ARGV[1]) else about = (t.author == ARGV[1]) end
  end
  if about then removed = removed + 1 else keep[#keep + 1] = raw end
end
if removed > 0 then
  local ttl = redis.call('PTTL', KEYS[1])
  redis.call('DEL', KEYS[1])
  for _, raw in ipairs(keep) do redis.call('RPUSH', KEYS[1], raw) end
  if #keep > 0 and ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
end
return removed
"#;

const EDIT_LUA: &str = r#"
-- KEYS: ctx; ARGV: author, msg_id, 'replace' or 'remove', new text.
-- Acts only on the author's latest user turn, and only if it is msg_id
-- (or msg_id#suffix, a re-answered edit). Returns -1: ignored,
-- -2: replaced, n >= 0: removed with n bot replies.
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local found = nil
for i = #items, 1, -1 do
  local ok, t = pcall(cjson.decode, items[i])
  if ok and type(t) == 'table' and t.bot ~= true and t.author == ARGV[1] then
    local id = t.msg_id
    if type(id) == 'string' and (id == ARGV[2] or string.sub(id, 1, #ARGV[2] + 1) == ARGV[2] .. '#') then
      found = i
    end
    break
  end
end
if not found then return -1 end
if ARGV[3] == 'replace' then
  local t = cjson.decode(items[found])
  t.text = ARGV[4]
  redis.call('LSET', KEYS[1], found - 1, cjson.encode(t))
  return -2
end
local last = found
while last < #items do
  local ok, t = pcall(cjson.decode, items[last + 1])
  if ok and type(t) == 'table' and t.bot == true and t.reply_to == ARGV[1] then last = last + 1 else break end
end
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
for i, raw in ipairs(items) do
  if i < found or i > last then redis.call('RPUSH', KEYS[1], raw) end
end
if ttl > 0 and redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ttl) end
return last - found
"#;

/// Shared by the store and its watcher.
struct Inner {
    /// Replaced by the watcher after a failed probe (see the module doc);
    /// cloned (cheaply) for every call.
    conn: Mutex<ConnectionManager>,
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The key the watcher's probe writes (with a short expiry).
    probe_key: String,
    /// Whether the last call or probe succeeded. While false, calls fail at
    /// once and only the watcher talks to Redis.
    up: AtomicBool,
    timeout: Duration,
    metrics: Arc<Metrics>,
    /// Warnings about outages and about one channel's data, each limited
    /// on its own (so one kind cannot hide the other).
    outage_log: RateLimitedWarn,
    data_log: RateLimitedWarn,
}

/// A warning logged at most once per [`WARN_EVERY`]; the rest go to debug
/// and are counted into the next one.
#[derive(Default)]
struct RateLimitedWarn {
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl RateLimitedWarn {
    fn warn(&self, what: &str, err: &ContextError) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %err, "{what}");
            return;
        }
        *last = Some(Instant::now());
        let held_back = self.held_back.swap(0, Ordering::Relaxed);
        tracing::warn!(error = %err, held_back, "{what}");
    }
}

pub struct RedisStore {
    inner: Arc<Inner>,
    prefix: String,
    limits: Limits,
    append: Script,
    forget: Script,
    edit: Script,
    hits: Script,
    lease: Script,
    release: Script,
}

/// The watcher's backoff while Redis is down: from `MIN` doubling to `MAX`
/// (so a returning Redis is seen within `MAX` plus one connection).
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(4);
/// At most one warning per this long; the rest go to debug, counted.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Whether `url` is one the daemon can connect with (scheme, host or
/// socket path, database, TLS support), without connecting. The error
/// names the URL redacted and gives the cause once.
pub fn check_url(url: &str) -> Result<(), String> {
    redis::Client::open(url).map(|_| ()).map_err(|e| {
        // The crate's text is "DESCRIPTION - Kind[: detail]"; the
        // description says what is wrong ("Invalid database number"), so
        // it is kept, the kind's debug name is not. Neither holds the URL.
        let text = e.to_string();
        let description = text.split(" - ").next().unwrap_or(e.category());
        let cause = match e.detail() {
            Some(detail) if !description.contains(detail) => format!("{description}: {detail}"),
            _ => description.to_string(),
        };
        format!("{:?} cannot be used: {cause}", crate::settings::redact_url(url))
    })
}

impl RedisStore {
    /// Sets up the connection (lazily: an unreachable Redis is not an error
    /// here, only a bad URL is), probes once and starts the watcher.
    pub async fn connect(
        url: &str,
        prefix: &str,
        limits: Limits,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ContextError> {
        let client = crate::remote::client(url).map_err(|_| ContextError::Unavailable(check_url(url).unwrap_err()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| ContextError::Unavailable(e.to_string()))?;
        let inner = Arc::new(Inner {
            conn: Mutex::new(conn),
            client,
            config,
            probe_key: format!("{prefix}:probe"),
            up: AtomicBool::new(true),
            timeout,
            metrics,
            outage_log: RateLimitedWarn::default(),
            data_log: RateLimitedWarn::default(),
        });
        if let Err(e) = inner.probe().await {
            inner.mark_down(&e);
            inner.renew();
        } else {
            inner.metrics.set_store_up(true);
        }
        tokio::spawn(watch(Arc::downgrade(&inner)));
        Ok(Self {
            inner,
            prefix: prefix.to_string(),
            limits,
            append: Script::new(APPEND_LUA),
            forget: Script::new(FORGET_LUA),
            edit: Script::new(EDIT_LUA),
            hits: Script::new(HITS_LUA),
            lease: Script::new(LEASE_LUA),
            release: Script::new(RELEASE_LUA),
        })
    }

    fn ctx_key(&self, channel: &ChannelKey) -> String {
        format!("{}:ctx:{channel}", self.prefix)
    }

    fn seen_key(&self, channel: &ChannelKey) -> String {
        format!("{}:seen:{channel}", self.prefix)
    }

    fn author_key(&self, platform: Platform, author: &str) -> String {
        format!("{}:authors:{}:{author}", self.prefix, platform.as_str())
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn()
    }

    fn muted_key(&self, channel: &ChannelKey) -> String {
        format!("{}:muted:{channel}", self.prefix)
    }

    fn lease_key(&self, channel: &ChannelKey) -> String {
        format!("{}:lease:{channel}", self.prefix)
    }
}

/// Whether a Redis error means the store cannot do its work (an outage)
/// rather than a problem with one key's data.
fn is_store_fault(e: &RedisError) -> bool {
    !(e.code() == Some("WRONGTYPE") || matches!(e.kind(), ErrorKind::UnexpectedReturnType))
}

impl Inner {
    fn conn(&self) -> ConnectionManager {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A fresh, lazy connection manager in place of the current one.
    fn renew(&self) {
        if let Ok(fresh) = ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        }
    }

    /// A small write with a short expiry: fails on an unreachable Redis,
    /// a wrong password, a full memory (`noeviction`) or a read-only replica.
    async fn probe(&self) -> Result<(), ContextError> {
        let mut conn = self.conn();
        let key = self.probe_key.as_str();
        self.bounded(async move { redis::cmd("SET").arg(key).arg(1).arg("PX").arg(60_000).query_async::<()>(&mut conn).await })
            .await
    }

    /// Runs one Redis call within the timeout and files its failure.
    async fn bounded<T>(&self, call: impl Future<Output = Result<T, RedisError>>) -> Result<T, ContextError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                self.metrics.redis_errors.inc();
                if is_store_fault(&e) {
                    Err(ContextError::Unavailable(e.to_string()))
                } else {
                    let err = ContextError::Corrupt(e.to_string());
                    self.data_log.warn("redis refused a call on one channel's data", &err);
                    Err(err)
                }
            }
            Err(_) => {
                self.metrics.redis_errors.inc();
                Err(ContextError::Unavailable(format!("no answer within {:?}", self.timeout)))
            }
        }
    }

    fn mark_down(&self, err: &ContextError) {
        if matches!(err, ContextError::Unavailable(_)) && self.up.swap(false, Ordering::Relaxed) {
            self.metrics.set_store_up(false);
            self.outage_log.warn("redis unreachable or refusing: answering without context until it is back", err);
        }
    }

    /// A call made on behalf of a message: refused at once while down.
    async fn call<T>(&self, call: impl Future<Output = Result<T, RedisError>>) -> Result<T, ContextError> {
        if !self.up.load(Ordering::Relaxed) {
            return Err(ContextError::Unavailable("redis is down; reconnecting".into()));
        }
        let result = self.bounded(call).await;
        if let Err(e) = &result {
            self.mark_down(e);
        }
        result
    }
}

/// Probes while the store lives: every 2 s while up, with backoff while down.
async fn watch(inner: Weak<Inner>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let up = match inner.upgrade() {
            Some(inner) => inner.up.load(Ordering::Relaxed),
            None => return,
        };
        tokio::time::sleep(if up { Duration::from_secs(2) } else { backoff }).await;
        let Some(inner) = inner.upgrade() else { return };
        match inner.probe().await {
            Ok(()) => {
                backoff = BACKOFF_MIN;
                if !inner.up.swap(true, Ordering::Relaxed) {
                    inner.metrics.set_store_up(true);
                    tracing::info!("redis is reachable again: context is back");
                }
            }
            Err(e) => {
                inner.mark_down(&e);
                if matches!(e, ContextError::Unavailable(_)) {
                    inner.renew();
                }
                if !up {
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                tracing::debug!(error = %e, retry_in_ms = backoff.as_millis() as u64, "redis probe failed");
            }
        }
    }
}

impl ContextStore for RedisStore {
    fn turns<'a>(&'a self, channel: &'a ChannelKey) -> BoxFuture<'a, Result<Vec<Turn>, ContextError>> {
        Box::pin(async move {
            let mut conn = self.conn();
            let key = self.ctx_key(channel);
            let raw: Vec<String> =
                self.inner.call(async { redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).query_async(&mut conn).await }).await?;
            raw.iter()
                .map(|r| serde_json::from_str(r).map_err(|e| ContextError::Corrupt(format!("{key}: {e}"))))
                .collect()
        })
    }

    fn seen<'a>(&'a self, channel: &'a ChannelKey, msg_id: &'a str) -> BoxFuture<'a, Result<bool, ContextError>> {
        Box::pin(async move {
            let mut conn = self.conn();
            let key = self.seen_key(channel);
            let score: Option<f64> =
                self.inner.call(async { redis::cmd("ZSCORE").arg(&key).arg(msg_id).query_async(&mut conn).await }).await?;
            Ok(score.is_some())
        })
    }

    fn append<'a>(
        &'a self,
        channel: &'a ChannelKey,
        turns: &'a [Turn],
        msg_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Appended, ContextError>> {
        Box::pin(async move {
            let mut invocation = self.append.prepare_invoke();
            invocation.key(self.ctx_key(channel)).key(self.seen_key(channel));
            let mut authors: Vec<&str> = turns.iter().filter(|t| !t.bot).map(|t| t.author.as_str()).collect();
            authors.sort_unstable();
            authors.dedup();
            for author in authors {
                invocation.key(self.author_key(channel.platform, author));
            }
            let score = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            invocation
                .arg(self.limits.max_turns)
                .arg(self.limits.ttl.map_or(0, |t| t.as_secs().max(1)))
                .arg(msg_id.unwrap_or(""))
                .arg(self.limits.seen_ids)
                .arg(score)
                .arg(turns.len());
            for turn in turns {
                let json = serde_json::to_string(turn).map_err(|e| ContextError::Corrupt(e.to_string()))?;
                invocation.arg(json);
            }
            let mut conn = self.conn();
            let stored: i64 = self.inner.call(async { invocation.invoke_async(&mut conn).await }).await?;
            Ok(if stored == 1 { Appended::Stored } else { Appended::Duplicate })
        })
    }

    fn edit_turn<'a>(
        &'a self,
        channel: &'a ChannelKey,
        author: &'a str,
        msg_id: &'a str,
        change: EditChange<'a>,
    ) -> BoxFuture<'a, Result<Edited, ContextError>> {
        Box::pin(async move {
            let mut invocation = self.edit.prepare_invoke();
            invocation.key(self.ctx_key(channel)).arg(author).arg(msg_id);
            match change {
                EditChange::Replace(text) => invocation.arg("replace").arg(text),
                EditChange::Remove => invocation.arg("remove").arg(""),
            };
            let mut conn = self.conn();
            let outcome: i64 = self.inner.call(async { invocation.invoke_async(&mut conn).await }).await?;
            Ok(match outcome {
                -1 => Edited::Ignored,
                -2 => Edited::Replaced,
                n => Edited::Removed { replies: n.max(0) as usize },
            })
        })
    }

    fn clear<'a>(&'a self, channel: &'a ChannelKey) -> BoxFuture<'a, Result<(), ContextError>> {
        Box::pin(async move {
            let mut conn = self.conn();
            let key = self.ctx_key(channel);
            self.inner.call(async { redis::cmd("DEL").arg(&key).query_async::<i64>(&mut conn).await }).await?;
            Ok(())
        })
    }

    fn forget_author<'a>(&'a self, platform: Platform, author: &'a str) -> BoxFuture<'a, Result<usize, ContextError>> {
        Box::pin(async move {
            let mut conn = self.conn();
            let index = self.author_key(platform, author);
            let ctx_keys: Vec<String> =
                self.inner.call(async { redis::cmd("SMEMBERS").arg(&index).query_async(&mut conn).await }).await?;
            let mut removed = 0usize;
            for key in &ctx_keys {
                let mut invocation = self.forget.prepare_invoke();
                invocation.key(key).arg(author);
                let n: i64 = self.inner.call(async { invocation.invoke_async(&mut conn).await }).await?;
                removed += n.max(0) as usize;
            }
            self.inner.call(async { redis::cmd("DEL").arg(&index).query_async::<i64>(&mut conn).await }).await?;
            Ok(removed)
        })
    }

    fn muted<'a>(&'a self, channel: &'a ChannelKey) -> BoxFuture<'a, Result<bool, ContextError>> {
        Box::pin(async move {
            let mut conn = self.conn();
            let key = self.muted_key(channel);
            let n: i64 = self.inner.call(async { redis::cmd("EXISTS").arg(&key).query_async(&mut conn).await }).await?;
            Ok(n == 1)
        })
    }

    fn set_muted<'a>(&'a self, channel: &'a ChannelKey, muted: bool) -> BoxFuture<'a, Result<(), ContextError>> {
        Box::pin(async move {
            let mut conn = self.conn();
            let key = self.muted_key(channel);
            let mut cmd = if muted { redis::cmd("SET") } else { redis::cmd("DEL") };
            cmd.arg(&key);
            if muted {
                cmd.arg(1);
            }
            self.inner.call(async { cmd.query_async::<()>(&mut conn).await }).await
        })
    }

    fn count_hits<'a>(
        &'a self,
        keys: &'a [String],
        window: Duration,
    ) -> BoxFuture<'a, Result<Vec<(u64, Duration)>, ContextError>> {
        Box::pin(async move {
            let mut invocation = self.hits.prepare_invoke();
            for key in keys {
                invocation.key(format!("{}:rate:{key}", self.prefix));
            }
            invocation.arg(window.as_millis().max(1) as u64);
            let mut conn = self.conn();
            let flat: Vec<i64> = self.inner.call(async { invocation.invoke_async(&mut conn).await }).await?;
            Ok(flat.chunks(2).map(|pair| (pair[0].max(0) as u64, Duration::from_millis(pair.get(1).copied().unwrap_or(0).max(0) as u64))).collect())
        })
    }

    fn take_lease<'a>(
        &'a self,
        channel: &'a ChannelKey,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, ContextError>> {
        Box::pin(async move {
            let mut invocation = self.lease.prepare_invoke();
            invocation.key(self.lease_key(channel)).arg(holder).arg(ttl.as_millis().max(1) as u64);
            let mut conn = self.conn();
            let taken: i64 = self.inner.call(async { invocation.invoke_async(&mut conn).await }).await?;
            Ok(taken == 1)
        })
    }

    fn drop_lease<'a>(&'a self, channel: &'a ChannelKey, holder: &'a str) -> BoxFuture<'a, Result<(), ContextError>> {
        Box::pin(async move {
            let mut invocation = self.release.prepare_invoke();
            invocation.key(self.lease_key(channel)).arg(holder);
            let mut conn = self.conn();
            self.inner.call(async { invocation.invoke_async::<i64>(&mut conn).await }).await?;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_the_daemon_cannot_use_are_refused_once_and_redacted() {
        assert!(check_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_url("unix:///run/redis.sock?db=1").is_ok());
        let err = check_url("redis://:pw8@h:1/notadb").unwrap_err();
        assert!(err.contains("[redacted]") && !err.contains("pw8"), "{err}");
        let err = check_url("redis://").unwrap_err();
        assert!(!err.is_empty());
    }
}
