//! Job records, the job queue and promoted versions, in Redis.
//!
//! Keys (under `context.key_prefix`, `P` below):
//!
//! - `P:jobs:next`: the last job id handed out (INCR).
//! - `P:job:ID`: a [`JobRecord`] as JSON; `P:jobs`: a sorted set of every
//!   job id (for listing); `P:jobs:queue`: ids waiting to run, oldest first.
//! - `P:job:ID:cancel`: set when someone asked to cancel a running job.
//! - `P:jobs:lock:DEVICE`: the daemon running a job on that device; it
//!   expires unless refreshed, so a dead daemon's lock frees itself.
//! - `P:versions:TARGET`: promoted job ids of a target (`base`,
//!   `persona:NAME`), oldest first; the last one is served. Promotion is an
//!   RPUSH, rollback an RPOP: one atomic pointer switch each.
//! - Personas have their own keys (`crate::personas::redis`).
//! - `P:cron:NAME:TIME`: a schedule's firing, taken once across daemons.
//!
//! Records are written whole by the daemon that owns the job; other
//! writers (cancel, rollback) only touch their own keys or records that
//! nobody is running, so read-modify-write races do not lose updates.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::{JobRecord, JobState, Target};

/// Redis failures (and records that do not parse).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("job record {key} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error("{0}")]
    Refused(String),
}

type Result<T> = std::result::Result<T, StoreError>;

const CLAIM_LUA: &str = r#"
-- KEYS: lock, queue; ARGV: owner, ttl_ms. Takes the device and the oldest queued id.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) == false then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
end
local id = redis.call('LPOP', KEYS[2])
if not id then redis.call('DEL', KEYS[1]) return false end
return id
"#;

const REFRESH_LUA: &str = r#"
-- KEYS: lock; ARGV: owner, ttl_ms (0: release). Only the owner may.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"#;

/// The jobs' state in Redis. Cheap to clone.
#[derive(Clone)]
pub struct JobStore {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl JobStore {
    /// Connects (failing at once if Redis cannot be reached).
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self> {
        let client = crate::remote::client(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout.max(Duration::from_secs(2))))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self { conn, prefix: prefix.to_string() })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    /// Creates a queued job and puts it at the back of the queue.
    pub async fn create(&self, target: Target, trigger: String, channels: Vec<String>) -> Result<JobRecord> {
        let mut conn = self.conn.clone();
        let id: u64 = conn.incr(self.key("jobs:next"), 1).await?;
        let record = JobRecord::new(id, target, trigger, channels);
        redis::pipe()
            .atomic()
            .set(self.key(&format!("job:{id}")), to_json(&record))
            .zadd(self.key("jobs"), id, id)
            .rpush(self.key("jobs:queue"), id)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(record)
    }

    pub async fn get(&self, id: u64) -> Result<Option<JobRecord>> {
        let key = self.key(&format!("job:{id}"));
        let raw: Option<String> = self.conn.clone().get(&key).await?;
        raw.map(|raw| from_json(&key, &raw)).transpose()
    }

    /// Writes a record whole.
    pub async fn put(&self, record: &JobRecord) -> Result<()> {
        let key = self.key(&format!("job:{}", record.id));
        self.conn.clone().set::<_, _, ()>(key, to_json(record)).await?;
        Ok(())
    }

    /// The newest `limit` jobs, newest first.
    pub async fn list(&self, limit: usize) -> Result<Vec<JobRecord>> {
        let mut conn = self.conn.clone();
        let ids: Vec<u64> = conn.zrevrange(self.key("jobs"), 0, limit.max(1) as isize - 1).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key(&format!("job:{id}"))).collect();
        let raws: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        keys.iter().zip(raws).filter_map(|(key, raw)| raw.map(|raw| from_json(key, &raw))).collect()
    }

    /// Takes the device's lock (or keeps it, when `owner` holds it) and the
    /// oldest queued id. `None`: another daemon runs a job on the device, or
    /// nothing is queued.
    pub async fn claim(&self, device: &str, owner: &str, ttl: Duration) -> Result<Option<u64>> {
        let id: Option<u64> = Script::new(CLAIM_LUA)
            .key(self.key(&format!("jobs:lock:{device}")))
            .key(self.key("jobs:queue"))
            .arg(owner)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(id)
    }

    /// Extends the device lock; false if `owner` no longer holds it.
    pub async fn refresh_lock(&self, device: &str, owner: &str, ttl: Duration) -> Result<bool> {
        let ms = (ttl.as_millis() as u64).max(1);
        self.lock_call(device, owner, ms).await
    }

    pub async fn release_lock(&self, device: &str, owner: &str) -> Result<bool> {
        self.lock_call(device, owner, 0).await
    }

    async fn lock_call(&self, device: &str, owner: &str, ms: u64) -> Result<bool> {
        let done: i64 = Script::new(REFRESH_LUA)
            .key(self.key(&format!("jobs:lock:{device}")))
            .arg(owner)
            .arg(ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(done == 1)
    }

    /// Who holds the device's lock, if anyone.
    pub async fn lock_holder(&self, device: &str) -> Result<Option<String>> {
        Ok(self.conn.clone().get(self.key(&format!("jobs:lock:{device}"))).await?)
    }

    /// Puts a job back at the front of the queue (it resumes next).
    pub async fn requeue_front(&self, id: u64) -> Result<()> {
        self.conn.clone().lpush::<_, _, ()>(self.key("jobs:queue"), id).await?;
        Ok(())
    }

    /// Ids waiting to run, oldest first.
    pub async fn queued(&self) -> Result<Vec<u64>> {
        Ok(self.conn.clone().lrange(self.key("jobs:queue"), 0, -1).await?)
    }

    /// Asks for a job to stop. A queued job is cancelled at once (it leaves
    /// the queue); a running one is stopped by the daemon that runs it, at
    /// its next look. Returns the record as it now stands.
    pub async fn cancel(&self, id: u64) -> Result<JobRecord> {
        let mut record = self.get(id).await?.ok_or_else(|| StoreError::Refused(format!("there is no job #{id}")))?;
        match record.state {
            JobState::Queued => {
                let removed: i64 = self.conn.clone().lrem(self.key("jobs:queue"), 0, id).await?;
                if removed > 0 {
                    record.state = JobState::Cancelled;
                    record.finished = Some(super::now_secs());
                    record.reason = Some("cancelled before it started".into());
                    self.put(&record).await?;
                    return Ok(record);
                }
                // A daemon took it meanwhile: stop it as a running job.
                self.flag_cancel(id).await?;
                Ok(record)
            }
            JobState::Running => {
                self.flag_cancel(id).await?;
                Ok(record)
            }
            state => Err(StoreError::Refused(format!("job #{id} is already {}", state.as_str()))),
        }
    }

    async fn flag_cancel(&self, id: u64) -> Result<()> {
        self.conn.clone().set_ex::<_, _, ()>(self.key(&format!("job:{id}:cancel")), 1, 7 * 86_400).await?;
        Ok(())
    }

    pub async fn cancel_requested(&self, id: u64) -> Result<bool> {
        Ok(self.conn.clone().exists(self.key(&format!("job:{id}:cancel"))).await?)
    }

    /// Makes `id` the served version of `target` (the atomic switch).
    pub async fn push_version(&self, target: &Target, id: u64) -> Result<()> {
        self.conn.clone().rpush::<_, _, ()>(self.key(&format!("versions:{target}")), id).await?;
        Ok(())
    }

    /// Promoted job ids of a target, oldest first; the last is served.
    pub async fn versions(&self, target: &Target) -> Result<Vec<u64>> {
        Ok(self.conn.clone().lrange(self.key(&format!("versions:{target}")), 0, -1).await?)
    }

    /// The served versions of every target at once (one round trip), in
    /// the order given; `None`: the original.
    pub async fn served(&self, targets: &[Target]) -> Result<Vec<Option<u64>>> {
        let mut pipe = redis::pipe();
        for target in targets {
            pipe.lindex(self.key(&format!("versions:{target}")), -1);
        }
        Ok(pipe.query_async(&mut self.conn.clone()).await?)
    }

    /// Returns `target` to the version before its newest: marks that job
    /// rolled back and gives its id, or `None` if the target serves its
    /// original.
    pub async fn rollback(&self, target: &Target) -> Result<Option<u64>> {
        let id: Option<u64> = self.conn.clone().rpop(self.key(&format!("versions:{target}")), None).await?;
        if let Some(id) = id {
            if let Some(mut record) = self.get(id).await? {
                record.state = JobState::RolledBack;
                self.put(&record).await?;
            }
        }
        Ok(id)
    }

    /// True once per (schedule, firing time) across every daemon.
    pub async fn take_firing(&self, schedule: &str, time: u64) -> Result<bool> {
        let taken: Option<String> = redis::cmd("SET")
            .arg(self.key(&format!("cron:{schedule}:{time}")))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(7 * 86_400)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(taken.is_some())
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(key: &str, raw: &str) -> Result<T> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt { key: key.to_string(), message: e.to_string() })
}
