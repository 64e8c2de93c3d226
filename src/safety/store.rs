//! Where moderators' word lists are kept: Redis (whenever the context is,
//! so `/block` survives restarts and every daemon on that Redis agrees) or
//! memory.
//!
//! Redis keys (under `context.key_prefix`, `P` below): `P:words:SCOPE:blocked`
//! and `P:words:SCOPE:allowed`, sets of entries in their stored form
//! ([`super::words::entry`]), with no expiry. A scope is the server (Discord
//! guild), Telegram chat or channel the moderators act for.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::words::{entry, WordList, WordLists, MAX_WORDS};
use super::SafetyError;

/// A change moderators make to a scope's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WordChange {
    Block,
    Unblock,
    Allow,
    Disallow,
}

impl WordChange {
    /// Whether it adds to a list (block, allow) rather than removes.
    pub fn adds(self) -> bool {
        matches!(self, WordChange::Block | WordChange::Allow)
    }

    fn list(self) -> &'static str {
        match self {
            WordChange::Block | WordChange::Unblock => "blocked",
            WordChange::Allow | WordChange::Disallow => "allowed",
        }
    }
}

/// What became of one word of a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WordOutcome {
    /// Added or removed, in its stored form.
    Done(String),
    /// Already so (already blocked, or not blocked to begin with).
    Unchanged(String),
    /// Refused: the reason, for the moderator.
    Refused(String),
}

/// The word lists of every scope. Cheap to share (`Arc`).
pub enum WordStore {
    /// For `context.store = "memory"`: gone when the process ends. A std
    /// lock, never held across an await.
    Memory(Mutex<WordLists>),
    Redis { conn: ConnectionManager, prefix: String },
}

impl std::fmt::Debug for WordStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WordStore::Memory(_) => f.write_str("WordStore::Memory"),
            WordStore::Redis { prefix, .. } => f.debug_struct("WordStore::Redis").field("prefix", prefix).finish_non_exhaustive(),
        }
    }
}

fn redis_error(e: redis::RedisError) -> SafetyError {
    SafetyError::WordList(format!("redis: {e}"))
}

impl WordStore {
    pub fn memory() -> Self {
        WordStore::Memory(Mutex::new(WordLists::default()))
    }

    /// Connects (failing at once if Redis cannot be reached); `timeout`
    /// bounds connecting and each command.
    pub async fn redis(url: &str, prefix: &str, timeout: Duration) -> Result<Self, SafetyError> {
        let client = redis::Client::open(url).map_err(redis_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout.max(Duration::from_secs(2))));
        let conn = ConnectionManager::new_with_config(client, config).await.map_err(redis_error)?;
        Ok(WordStore::Redis { conn, prefix: prefix.to_string() })
    }

    /// A scope's list (empty when its moderators set none).
    ///
    /// Errors: Redis unreachable or failing.
    pub async fn list(&self, scope: &str) -> Result<WordList, SafetyError> {
        match self {
            WordStore::Memory(lists) => Ok(lists.lock().unwrap_or_else(|e| e.into_inner()).get(scope).cloned().unwrap_or_default()),
            WordStore::Redis { conn, prefix } => {
                let (blocked, allowed) = redis::pipe()
                    .smembers(format!("{prefix}:words:{scope}:blocked"))
                    .smembers(format!("{prefix}:words:{scope}:allowed"))
                    .query_async(&mut conn.clone())
                    .await
                    .map_err(redis_error)?;
                Ok(WordList { blocked, allowed })
            }
        }
    }

    /// Applies `change` to each of `words` in `scope`, in order; one
    /// outcome per word. A word that is not an entry (no letters or digits,
    /// over [`super::words::MAX_WORD_CHARS`]) or past [`MAX_WORDS`] is
    /// refused and the others still apply.
    ///
    /// Errors: Redis unreachable or failing (words before the failure may
    /// have applied).
    pub async fn change(&self, scope: &str, change: WordChange, words: &[&str]) -> Result<Vec<WordOutcome>, SafetyError> {
        let mut outcomes = Vec::with_capacity(words.len());
        for word in words {
            let stored = match entry(word) {
                Ok(stored) => stored,
                Err(e) => {
                    outcomes.push(refused(&e));
                    continue;
                }
            };
            outcomes.push(match self {
                WordStore::Memory(lists) => {
                    let mut lists = lists.lock().unwrap_or_else(|e| e.into_inner());
                    match change {
                        WordChange::Block => lists.block(scope, &stored),
                        WordChange::Allow => lists.allow(scope, &stored),
                        WordChange::Unblock => Ok(lists.unblock(scope, &stored)),
                        WordChange::Disallow => Ok(lists.disallow(scope, &stored)),
                    }
                    .map_or_else(|e| refused(&e), |done| outcome(done, stored))
                }
                WordStore::Redis { conn, prefix } => {
                    let key = format!("{prefix}:words:{scope}:{}", change.list());
                    let mut conn = conn.clone();
                    if change.adds() {
                        let (present, size): (bool, usize) =
                            redis::pipe().sismember(&key, &stored).scard(&key).query_async(&mut conn).await.map_err(redis_error)?;
                        if !present && size >= MAX_WORDS {
                            WordOutcome::Refused(format!("a list holds at most {MAX_WORDS} words"))
                        } else {
                            let added: usize = redis::cmd("SADD").arg(&key).arg(&stored).query_async(&mut conn).await.map_err(redis_error)?;
                            outcome(added > 0, stored)
                        }
                    } else {
                        let removed: usize = redis::cmd("SREM").arg(&key).arg(&stored).query_async(&mut conn).await.map_err(redis_error)?;
                        outcome(removed > 0, stored)
                    }
                }
            });
        }
        Ok(outcomes)
    }
}

fn outcome(done: bool, stored: String) -> WordOutcome {
    if done {
        WordOutcome::Done(stored)
    } else {
        WordOutcome::Unchanged(stored)
    }
}

fn refused(e: &SafetyError) -> WordOutcome {
    WordOutcome::Refused(e.to_string().trim_start_matches("word list: ").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_lists_change_per_scope() {
        let store = WordStore::memory();
        let out = store.change("telegram:1", WordChange::Block, &["Grumble", "grumble", "?!"]).await.unwrap();
        assert_eq!(out[0], WordOutcome::Done("grumble".into()));
        assert_eq!(out[1], WordOutcome::Unchanged("grumble".into()));
        assert!(matches!(&out[2], WordOutcome::Refused(why) if why.contains("no letters")), "{out:?}");
        assert!(store.list("telegram:1").await.unwrap().blocked.contains("grumble"));
        assert!(store.list("telegram:2").await.unwrap().blocked.is_empty());
        let out = store.change("telegram:1", WordChange::Unblock, &["GRUMBLE", "moon"]).await.unwrap();
        assert_eq!(out, [WordOutcome::Done("grumble".into()), WordOutcome::Unchanged("moon".into())]);
        assert_eq!(store.list("telegram:1").await.unwrap(), WordList::default());
    }
}
