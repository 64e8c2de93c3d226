//! Personas in Redis, shared by every daemon on the same Redis and kept
//! across restarts.
//!
//! Keys (under `context.key_prefix`, `P` below; the same keys the jobs used
//! before personas had a store of their own, so existing data stays):
//!
//! - `P:personas`: a hash of persona name → [`PersonaSpec`] JSON (those
//!   moderators created);
//! - `P:persona:use:SCOPE`: the persona chosen for a channel
//!   (`platform:channel_id`) or a server (`platform:group:id`).

use std::time::Duration;

use dialogd_adapters::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use super::{PersonaError, PersonaStore};
use crate::settings::PersonaSpec;

/// The personas' keys in Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisPersonaStore {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisPersonaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPersonaStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl From<redis::RedisError> for PersonaError {
    fn from(e: redis::RedisError) -> Self {
        PersonaError::Store(format!("redis: {e}"))
    }
}

impl RedisPersonaStore {
    /// Connects (failing at once if Redis cannot be reached); `timeout`
    /// bounds connecting and each command.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, PersonaError> {
        let client = crate::remote::client(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout.max(Duration::from_secs(2))));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self { conn, prefix: prefix.to_string() })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }
}

impl PersonaStore for RedisPersonaStore {
    fn created(&self) -> BoxFuture<'_, Result<Vec<PersonaSpec>, PersonaError>> {
        Box::pin(async move {
            let key = self.key("personas");
            let raw: std::collections::BTreeMap<String, String> = self.conn.clone().hgetall(&key).await?;
            raw.values()
                .map(|v| serde_json::from_str(v).map_err(|e| PersonaError::Store(format!("{key} holds a corrupt persona: {e}"))))
                .collect()
        })
    }

    fn put(&self, spec: PersonaSpec) -> BoxFuture<'_, Result<(), PersonaError>> {
        Box::pin(async move {
            let json = serde_json::to_string(&spec).map_err(|e| PersonaError::Store(e.to_string()))?;
            self.conn.clone().hset::<_, _, _, ()>(self.key("personas"), &spec.name, json).await?;
            Ok(())
        })
    }

    fn choose(&self, scope: &str, name: Option<&str>) -> BoxFuture<'_, Result<(), PersonaError>> {
        let key = self.key(&format!("persona:use:{scope}"));
        let name = name.map(str::to_string);
        Box::pin(async move {
            match name {
                Some(name) => self.conn.clone().set::<_, _, ()>(key, name).await?,
                None => self.conn.clone().del::<_, ()>(key).await?,
            }
            Ok(())
        })
    }

    fn chosen(&self, scopes: &[String]) -> BoxFuture<'_, Result<Vec<Option<String>>, PersonaError>> {
        let keys: Vec<String> = scopes.iter().map(|s| self.key(&format!("persona:use:{s}"))).collect();
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            Ok(redis::cmd("MGET").arg(&keys).query_async(&mut self.conn.clone()).await?)
        })
    }
}
