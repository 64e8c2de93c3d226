//! Generation over Redis Streams: daemons put requests on one stream, any
//! number of `dialogd worker` processes (on any host) take them through a
//! consumer group and answer on each daemon's own reply stream.
//!
//! The flow, in Redis Streams' terms (<https://redis.io/docs/latest/develop/data-types/streams/>):
//!
//! - [`StreamClient::generate`] (daemon): `XADD {prefix}:gen:requests` an
//!   entry `id`, `reply_to`, `deadline_ms`, `body` (JSON [`WireRequest`]),
//!   then waits for the answer with that `id` until the deadline. The
//!   depth check (`XLEN`) and the `XADD` are one script: one round trip.
//! - [`run_worker`] (worker): `XREADGROUP GROUP generation {consumer}` takes
//!   at most `max_inflight` entries, runs each through the local generation
//!   pool, `XADD {prefix}:gen:replies:{reply_to} MAXLEN ~ 1000` the answer
//!   (JSON [`WireReply`]), then `XACK` and `XDEL` the request. Entries a dead
//!   consumer left pending longer than `claim_idle` are taken over with
//!   `XAUTOCLAIM`, so a killed worker loses no request.
//! - The daemon's reader (`XREAD BLOCK` on its reply stream) hands each
//!   answer to the waiting request. Answers are idempotent by request id: a
//!   second answer to one id (a request claimed from a slow, not dead,
//!   worker) and an answer past its deadline are dropped and counted.
//!
//! Persona adapters go by content: the request carries the id of the
//! adapter's blob in Redis, and the worker fetches, checks and caches it
//! ([`blobs`]). A worker with `jobs.enabled` follows the promoted base
//! model as the daemons do ([`FollowBase`]): `{prefix}:versions:base`'s
//! last id, loaded from `jobs.artifacts_dir`, swapped in between batches.
//!
//! Queue depth is the request stream's length (`XLEN`): answered requests
//! are deleted, so it counts the waiting and the running.

pub mod blobs;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::AsyncConnectionConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Semaphore};

use crate::generate::FinishReason;
use crate::pool::{GenerationRequest, PoolError, PoolHandle};
use crate::sampling::SamplingParams;
use crate::serving::ModelSpec;

use self::blobs::{BlobError, WorkerAdapters};

/// The consumer group every worker joins.
pub const GROUP: &str = "generation";

/// How long one blocking read waits before looking at the stop signal.
const BLOCK: Duration = Duration::from_millis(500);

/// Replies kept per daemon stream (approximate `MAXLEN`); the daemon reads
/// them as they come, so this only bounds a dead daemon's leftovers.
const REPLIES_MAXLEN: usize = 1000;

/// A dead daemon's reply stream is gone this long after its last answer.
const REPLIES_TTL_SECS: u64 = 3600;

/// Adds a request unless the stream already holds `queue_depth`. KEYS:
/// the request stream; ARGV: queue depth, id, reply_to, deadline_ms, body.
/// Returns `{1, length before}` when added, `{0, length}` when full.
const ENQUEUE_LUA: &str = r#"
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return {0, n} end
redis.call('XADD', KEYS[1], '*', 'id', ARGV[2], 'reply_to', ARGV[3], 'deadline_ms', ARGV[4], 'body', ARGV[5])
return {1, n}
"#;

/// Stream failures.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// More requests wait in the stream than `generation.queue_depth`.
    #[error("the generation stream is full ({0} requests waiting)")]
    Busy(u64),
    /// No worker answered before the request's deadline.
    #[error("no generation worker answered within {0} ms")]
    Timeout(u64),
    /// A worker answered that it failed.
    #[error("the worker failed: {0}")]
    Failed(String),
    /// Redis refused or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The worker's adapter cache cannot be set up.
    #[error(transparent)]
    Adapters(#[from] BlobError),
    /// The worker's model device cannot be opened.
    #[error("model.device: {0}")]
    Device(String),
}

/// One generation request as it travels in the stream's `body` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireRequest {
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    pub n_candidates: usize,
    /// The persona's adapter: the id of its blob in Redis ([`blobs`]);
    /// absent: the base model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

/// One drawn candidate: new ids without `<|endoftext|>`, their summed
/// log-probability, and whether it ended with `<|endoftext|>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireCandidate {
    pub ids: Vec<u32>,
    pub logprob: f32,
    pub finished: bool,
}

/// A worker's answer, in the reply stream's `body` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum WireReply {
    Ok { candidates: Vec<WireCandidate> },
    /// The worker's pool was full.
    Busy,
    Failed { error: String },
}

/// `{prefix}:gen:requests`.
pub fn requests_key(prefix: &str) -> String {
    format!("{prefix}:gen:requests")
}

/// `{prefix}:gen:replies:{daemon_id}`.
pub fn replies_key(prefix: &str, daemon_id: &str) -> String {
    format!("{prefix}:gen:replies:{daemon_id}")
}

/// A name unique to this process: host name, process id and start time.
pub fn process_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!("{host}-{}-{}", std::process::id(), now_ms() % 1_000_000)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A client for `url` whose connections set `TCP_NODELAY`. The crate's
/// default leaves Nagle's algorithm on, which holds a small command back
/// until the previous one is acknowledged (up to the peer's delayed-ACK
/// time, ~40 ms on Linux) on a connection with several commands in flight.
/// Every Redis connection in dialogd is made through this.
///
/// Errors: a URL the crate cannot use (scheme, host, database).
pub fn client(url: &str) -> Result<redis::Client, redis::RedisError> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info()?.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    redis::Client::open(info)
}

/// `XGROUP CREATE … $ MKSTREAM`, where the group does not exist yet.
async fn ensure_group(conn: &mut ConnectionManager, requests: &str) -> Result<(), redis::RedisError> {
    let made: Result<(), _> =
        redis::cmd("XGROUP").arg("CREATE").arg(requests).arg(GROUP).arg("$").arg("MKSTREAM").query_async(conn).await;
    match made {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

fn field(entry: &StreamId, name: &str) -> Option<String> {
    entry.get::<String>(name)
}

/// A connection for blocking reads: its own socket (a blocked read would
/// hold up every other command on a shared one), with a response timeout
/// longer than the block.
async fn blocking_connection(client: &redis::Client) -> Result<MultiplexedConnection, redis::RedisError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(BLOCK + Duration::from_secs(5)));
    client.get_multiplexed_async_connection_with_config(&config).await
}

/// Times a request is sent again when the connection to Redis was lost.
const ENQUEUE_RETRIES: u32 = 3;

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
}

/// Counts of answers the daemon did not use.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// A second answer to a request already answered.
    pub duplicate: AtomicU64,
    /// An answer to a request past its deadline (or whose caller left).
    pub late: AtomicU64,
}

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<WireReply>>>>;

/// The daemon's side: sends requests and routes the answers back.
pub struct StreamClient {
    conn: ConnectionManager,
    requests: String,
    daemon_id: String,
    next: AtomicU64,
    waiting: Waiting,
    timeout: Duration,
    queue_depth: u64,
    /// [`ENQUEUE_LUA`].
    enqueue: redis::Script,
    pub stats: Arc<ClientStats>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for StreamClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl StreamClient {
    /// Connects, makes the group if needed, and starts reading this
    /// daemon's reply stream. `timeout`: each request's deadline;
    /// `queue_depth`: most requests in the stream before `Busy`.
    ///
    /// Errors: a bad URL, or Redis unreachable at start.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration, queue_depth: usize) -> Result<Self, RemoteError> {
        let client = client(url)?;
        let mut conn = ConnectionManager::new_with_config(client.clone(), manager_config()).await?;
        let requests = requests_key(prefix);
        ensure_group(&mut conn, &requests).await?;
        // Unique per client, not only per process: the reply stream is read
        // from its start and request ids count from 0 in each client, so
        // two clients of one process made in the same millisecond (which
        // `process_name` would not tell apart) took each other's answers.
        static CLIENTS: AtomicU64 = AtomicU64::new(0);
        let daemon_id = format!("{}-{}", process_name(), CLIENTS.fetch_add(1, Ordering::Relaxed));
        let replies = replies_key(prefix, &daemon_id);
        let waiting: Waiting = Arc::default();
        let stats = Arc::new(ClientStats::default());
        let reader = tokio::spawn(read_replies(client, replies, waiting.clone(), stats.clone()));
        tracing::info!(stream = %requests, daemon_id = %daemon_id, "generation through Redis Streams");
        Ok(Self {
            conn,
            requests,
            daemon_id,
            next: AtomicU64::new(0),
            waiting,
            timeout,
            queue_depth: queue_depth as u64,
            enqueue: redis::Script::new(ENQUEUE_LUA),
            stats,
            reader,
        })
    }

    /// This daemon's id (its reply stream is `{prefix}:gen:replies:{id}`).
    pub fn daemon_id(&self) -> &str {
        &self.daemon_id
    }

    /// Sends `request` and waits for a worker's answer until the deadline.
    /// Dropping the future forgets the request (a later answer is counted
    /// as late).
    pub async fn generate(&self, request: &WireRequest) -> Result<Vec<WireCandidate>, RemoteError> {
        let mut conn = self.conn.clone();
        let id = format!("{}-{}", self.daemon_id, self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), tx);
        // Removes the entry however this future ends.
        let _forget = Forget { waiting: self.waiting.clone(), id: id.clone() };
        let body = serde_json::to_string(request).map_err(|e| RemoteError::Failed(e.to_string()))?;
        let deadline = now_ms() + self.timeout.as_millis() as u64;
        // The depth check and the add in one round trip (and atomic, so
        // daemons sharing the stream cannot overfill it between the two).
        // A connection that broke since the last request (Redis restarted)
        // is made again by the manager: sent again, not failed. Should the
        // first attempt have landed after all, the second answer is dropped
        // as a duplicate.
        let mut attempt = 0;
        let (added, waiting_now): (u8, u64) = loop {
            let sent = self
                .enqueue
                .key(&self.requests)
                .arg(self.queue_depth)
                .arg(&id)
                .arg(&self.daemon_id)
                .arg(deadline)
                .arg(&body)
                .invoke_async(&mut conn)
                .await;
            match sent {
                Err(e) if attempt < ENQUEUE_RETRIES && (e.is_connection_dropped() || e.is_io_error() || e.is_connection_refusal()) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "generation request: Redis connection lost; sending again");
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                }
                sent => break sent?,
            }
        };
        if added == 0 {
            return Err(RemoteError::Busy(waiting_now));
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(WireReply::Ok { candidates })) => Ok(candidates),
            Ok(Ok(WireReply::Busy)) => Err(RemoteError::Busy(waiting_now)),
            Ok(Ok(WireReply::Failed { error })) => Err(RemoteError::Failed(error)),
            Ok(Err(_)) | Err(_) => Err(RemoteError::Timeout(self.timeout.as_millis() as u64)),
        }
    }
}

struct Forget {
    waiting: Waiting,
    id: String,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

/// Reads the daemon's reply stream from its start (it is new: the id is
/// this process's), handing each answer to its waiting request.
async fn read_replies(client: redis::Client, replies: String, waiting: Waiting, stats: Arc<ClientStats>) {
    let mut last = "0-0".to_string();
    let mut answered: std::collections::VecDeque<String> = Default::default();
    let mut seen: std::collections::HashSet<String> = Default::default();
    loop {
        let mut conn = match blocking_connection(&client).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "reply stream: cannot connect; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let read: Result<Option<StreamReadReply>, _> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(256)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&replies)
                .arg(&last)
                .query_async(&mut conn)
                .await;
            let read = match read {
                Ok(read) => read,
                Err(e) => {
                    tracing::warn!(error = %e, "reply stream: read failed; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            };
            for entry in read.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                last = entry.id.clone();
                let (Some(id), Some(body)) = (field(&entry, "id"), field(&entry, "body")) else { continue };
                let Ok(reply) = serde_json::from_str::<WireReply>(&body) else {
                    tracing::warn!(request = %id, "reply stream: an answer that does not parse; dropped");
                    continue;
                };
                let sender = waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                match sender {
                    Some(tx) => {
                        let _ = tx.send(reply);
                        // Remember recent answers, to tell duplicates from late ones.
                        seen.insert(id.clone());
                        answered.push_back(id);
                        if answered.len() > 4096 {
                            if let Some(old) = answered.pop_front() {
                                seen.remove(&old);
                            }
                        }
                    }
                    None if seen.contains(&id) => {
                        stats.duplicate.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        stats.late.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// What a worker did, for its log line at exit and its tests.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub answered: AtomicU64,
    pub claimed: AtomicU64,
    pub expired: AtomicU64,
    pub failed: AtomicU64,
    /// The promoted base version the pool serves (0: the configured model).
    pub base_version: AtomicU64,
    /// Base models swapped in.
    pub swaps: AtomicU64,
    /// Where the worker is: [`WorkerState`] as its number.
    pub state: AtomicU8,
    /// Whether its last read of the request stream worked.
    pub stream_up: AtomicBool,
}

/// A worker's stage, for its `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkerState {
    /// Loading its model or joining the stream: takes nothing yet.
    Loading = 0,
    /// Taking requests.
    Serving = 1,
    /// Stopped taking requests (SIGTERM): finishing what it holds.
    Stopping = 2,
}

/// What a worker's `/healthz` says: `ready` (HTTP 200, else 503) and a
/// status word: `ok`, `loading`, `stopping` or `redis_down` (serving, but
/// its last read of the request stream failed; it retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerHealth {
    pub ready: bool,
    pub status: &'static str,
}

impl WorkerStats {
    pub fn set_state(&self, state: WorkerState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn health(&self) -> WorkerHealth {
        let (ready, status) = match self.state.load(Ordering::Relaxed) {
            s if s == WorkerState::Serving as u8 => match self.stream_up.load(Ordering::Relaxed) {
                true => (true, "ok"),
                false => (false, "redis_down"),
            },
            s if s == WorkerState::Stopping as u8 => (false, "stopping"),
            _ => (false, "loading"),
        };
        WorkerHealth { ready, status }
    }
}

/// How a worker joins the stream.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub redis_url: String,
    pub key_prefix: String,
    /// Its consumer name in the group (unique per worker).
    pub consumer: String,
    pub max_inflight: usize,
    pub claim_idle: Duration,
    /// How the pool's model runs (its device is where adapters go; a
    /// promoted base model is loaded with the same options).
    pub model: ModelSpec,
    /// The worker's own folder (`worker.cache_dir`): fetched adapters.
    pub cache_dir: PathBuf,
    /// Follow the promoted base model (`jobs.enabled`); `None`: serve the
    /// loaded model only.
    pub follow_base: Option<FollowBase>,
}

/// Where a worker finds promoted base models.
#[derive(Debug, Clone)]
pub struct FollowBase {
    /// The configured model's local folder (served when nothing is
    /// promoted, or after a rollback to it).
    pub original: PathBuf,
    /// `jobs.artifacts_dir`: promoted job `N` is
    /// [`crate::serving::job_output`]`(artifacts_dir, N)`.
    pub artifacts_dir: PathBuf,
    /// How often the version pointer is read (`jobs.poll_ms`).
    pub poll: Duration,
}

/// `{prefix}:versions:base`: promoted base job ids, the last one served
/// (the daemons' job store pushes and pops it).
pub fn base_versions_key(prefix: &str) -> String {
    format!("{prefix}:versions:base")
}

/// Serves the base version `{prefix}:versions:base` names, if it is not
/// the one served: loads it from `jobs.artifacts_dir` and swaps it into
/// the pool (between batches; nothing is dropped).
async fn sync_base(
    conn: &mut ConnectionManager,
    options: &WorkerOptions,
    follow: &FollowBase,
    pool: &PoolHandle,
    stats: &WorkerStats,
    served: &mut Option<u64>,
) -> Result<(), String> {
    let version: Option<u64> = redis::cmd("LINDEX")
        .arg(base_versions_key(&options.key_prefix))
        .arg(-1)
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    if version == *served {
        return Ok(());
    }
    let dir = match version {
        Some(id) => crate::serving::job_output(&follow.artifacts_dir, id),
        None => follow.original.clone(),
    };
    let (spec, path) = (options.model.clone(), dir.clone());
    let model = tokio::task::spawn_blocking(move || crate::serving::load_weights(&spec, &path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    pool.swap_model(model).await.map_err(|e| e.to_string())?;
    *served = version;
    stats.base_version.store(version.unwrap_or(0), Ordering::Relaxed);
    stats.swaps.fetch_add(1, Ordering::Relaxed);
    tracing::info!(version, folder = %dir.display(), "worker: the pool now serves base model version {}", version.map_or("original".into(), |v| format!("#{v}")));
    Ok(())
}

/// Every `follow.poll`, [`sync_base`]; a failure is logged and tried
/// again at the next poll (the served model stays).
async fn follow_base(
    mut conn: ConnectionManager,
    options: WorkerOptions,
    follow: FollowBase,
    pool: PoolHandle,
    stats: Arc<WorkerStats>,
    mut served: Option<u64>,
) {
    loop {
        tokio::time::sleep(follow.poll).await;
        if let Err(e) = sync_base(&mut conn, &options, &follow, &pool, &stats, &mut served).await {
            tracing::warn!(error = %e, "worker: cannot serve the promoted base model; keeping the one served");
        }
    }
}

/// Takes requests from the stream and answers them with `pool` until
/// `stop` resolves; then takes nothing new, finishes and acknowledges what
/// it holds, and returns.
///
/// Errors: a bad URL or Redis unreachable at start; later Redis failures
/// are logged and retried.
pub async fn run_worker(
    options: WorkerOptions,
    pool: PoolHandle,
    stats: Arc<WorkerStats>,
    stop: impl Future<Output = ()>,
) -> Result<(), RemoteError> {
    let client = client(&options.redis_url)?;
    let mut conn = ConnectionManager::new_with_config(client.clone(), manager_config()).await?;
    let requests = requests_key(&options.key_prefix);
    ensure_group(&mut conn, &requests).await?;
    let device = options.model.device().map_err(|e| RemoteError::Device(e.to_string()))?;
    let adapters = Arc::new(WorkerAdapters::new(conn.clone(), &options.key_prefix, &options.cache_dir, device, pool.clone())?);
    // The promoted base model from the first request on, then followed.
    let follower = match options.follow_base.clone() {
        Some(follow) => {
            let mut served = None;
            if let Err(e) = sync_base(&mut conn, &options, &follow, &pool, &stats, &mut served).await {
                tracing::error!(error = %e, "worker: cannot serve the promoted base model; serving the configured one until it works");
            }
            let task = follow_base(conn.clone(), options.clone(), follow, pool.clone(), stats.clone(), served);
            Some(AbortOnDrop(tokio::spawn(task)))
        }
        None => None,
    };
    let slots = Arc::new(Semaphore::new(options.max_inflight));
    let mut reader = blocking_connection(&client).await?;
    tracing::info!(stream = %requests, consumer = %options.consumer, max_inflight = options.max_inflight, "worker: taking requests");
    stats.stream_up.store(true, Ordering::Relaxed);
    stats.set_state(WorkerState::Serving);
    let mut last_claim = tokio::time::Instant::now();
    tokio::pin!(stop);
    loop {
        // Wait for a free slot, or the stop.
        let free = tokio::select! {
            _ = &mut stop => break,
            permit = slots.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
        };
        let room = slots.available_permits() + 1;
        drop(free);
        let claim_due = last_claim.elapsed() >= options.claim_idle / 2;
        let taken: Result<Vec<StreamId>, redis::RedisError> = if claim_due {
            last_claim = tokio::time::Instant::now();
            redis::cmd("XAUTOCLAIM")
                .arg(&requests)
                .arg(GROUP)
                .arg(&options.consumer)
                .arg(options.claim_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(room)
                .query_async::<StreamAutoClaimReply>(&mut conn)
                .await
                .map(|r| {
                    if !r.claimed.is_empty() {
                        stats.claimed.fetch_add(r.claimed.len() as u64, Ordering::Relaxed);
                        tracing::info!(claimed = r.claimed.len(), "worker: took over requests a silent worker left");
                    }
                    r.claimed
                })
        } else {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(GROUP)
                .arg(&options.consumer)
                .arg("COUNT")
                .arg(room)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&requests)
                .arg(">");
            let read = tokio::select! {
                _ = &mut stop => break,
                read = cmd.query_async::<Option<StreamReadReply>>(&mut reader) => read,
            };
            read.map(|r| r.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).collect())
        };
        stats.stream_up.store(taken.is_ok(), Ordering::Relaxed);
        let entries = match taken {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "worker: reading the stream failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok(fresh) = blocking_connection(&client).await {
                    reader = fresh;
                }
                // A Redis that came back empty (no persistence) lost the
                // group with the stream: make it again, or no worker would
                // ever read a request.
                if e.code() == Some("NOGROUP") {
                    match ensure_group(&mut conn, &requests).await {
                        Ok(()) => tracing::info!(stream = %requests, "worker: made the consumer group again (Redis had lost it)"),
                        Err(e) => tracing::warn!(error = %e, "worker: cannot make the consumer group yet; retrying"),
                    }
                }
                continue;
            }
        };
        for entry in entries {
            let Ok(permit) = slots.clone().acquire_owned().await else { break };
            let (pool, adapters, mut conn, requests, stats, prefix) =
                (pool.clone(), adapters.clone(), conn.clone(), requests.clone(), stats.clone(), options.key_prefix.clone());
            tokio::spawn(async move {
                answer(entry, &pool, &adapters, &mut conn, &requests, &prefix, &stats).await;
                drop(permit);
            });
        }
    }
    // Stopping: wait until every taken request is answered and acknowledged.
    stats.set_state(WorkerState::Stopping);
    let _all = slots.acquire_many(options.max_inflight as u32).await;
    drop(follower);
    tracing::info!(
        answered = stats.answered.load(Ordering::Relaxed),
        claimed = stats.claimed.load(Ordering::Relaxed),
        "worker: stopped"
    );
    Ok(())
}

/// Runs one request and answers it; acknowledges and deletes it after the
/// answer is written (a worker that dies before leaves it pending, to be
/// claimed).
async fn answer(
    entry: StreamId,
    pool: &PoolHandle,
    adapters: &WorkerAdapters,
    conn: &mut ConnectionManager,
    requests: &str,
    prefix: &str,
    stats: &WorkerStats,
) {
    let (id, reply_to, deadline) = (field(&entry, "id"), field(&entry, "reply_to"), field(&entry, "deadline_ms"));
    let request = field(&entry, "body").and_then(|b| serde_json::from_str::<WireRequest>(&b).ok());
    let reply = match (&id, &reply_to, request) {
        (Some(_), Some(_), Some(_)) if deadline.and_then(|d| d.parse::<u64>().ok()).is_some_and(|d| d < now_ms()) => {
            stats.expired.fetch_add(1, Ordering::Relaxed);
            None
        }
        (Some(_), Some(_), Some(request)) => Some(run(pool, adapters, request).await),
        _ => {
            tracing::warn!(entry = %entry.id, "worker: a request without id, reply_to or a readable body; dropped");
            None
        }
    };
    let mut pipe = redis::pipe();
    pipe.atomic();
    if let (Some(reply), Some(id), Some(reply_to)) = (reply, id, reply_to) {
        if matches!(reply, WireReply::Failed { .. }) {
            stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        let key = replies_key(prefix, &reply_to);
        let body = serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"status":"failed","error":"encoding"}"#.into());
        pipe.cmd("XADD").arg(&key).arg("MAXLEN").arg("~").arg(REPLIES_MAXLEN).arg("*").arg("id").arg(id).arg("body").arg(body).ignore();
        pipe.cmd("EXPIRE").arg(&key).arg(REPLIES_TTL_SECS).ignore();
        stats.answered.fetch_add(1, Ordering::Relaxed);
    }
    pipe.cmd("XACK").arg(requests).arg(GROUP).arg(&entry.id).ignore();
    pipe.cmd("XDEL").arg(requests).arg(&entry.id).ignore();
    // Written with retries: an answer lost here would be generated again
    // by whoever claims the request.
    for attempt in 0..5 {
        match pipe.query_async::<()>(conn).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "worker: writing an answer failed");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run(pool: &PoolHandle, adapters: &WorkerAdapters, request: WireRequest) -> WireReply {
    // A persona's request runs with its adapter or not at all: never the
    // base model under the persona's name.
    let adapter = match &request.adapter {
        Some(id) => match adapters.get(id).await {
            Ok(runtime) => Some(runtime),
            Err(e) => {
                tracing::warn!(adapter = %id, error = %e, "worker: a request's persona adapter cannot be used");
                return WireReply::Failed { error: e.to_string() };
            }
        },
        None => None,
    };
    let generation = GenerationRequest {
        n_candidates: request.n_candidates,
        adapter,
        ..GenerationRequest::new(request.prompt_ids, request.params)
    };
    match pool.generate(generation).await {
        Ok(result) => WireReply::Ok {
            candidates: result
                .candidates
                .into_iter()
                .map(|c| WireCandidate { ids: c.output_ids, logprob: c.logprob, finished: c.finish == FinishReason::EndOfText })
                .collect(),
        },
        Err(PoolError::Busy { .. }) => WireReply::Busy,
        Err(e) => WireReply::Failed { error: e.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_formats_round_trip() {
        let reply = WireReply::Ok { candidates: vec![WireCandidate { ids: vec![1, 2], logprob: -1.5, finished: true }] };
        let text = serde_json::to_string(&reply).unwrap();
        assert!(text.starts_with(r#"{"status":"ok","candidates":["#), "{text}");
        assert_eq!(serde_json::from_str::<WireReply>(&text).unwrap(), reply);
        let failed: WireReply = serde_json::from_str(r#"{"status":"failed","error":"x"}"#).unwrap();
        assert_eq!(failed, WireReply::Failed { error: "x".into() });
        // The adapter goes by id, and only when there is one.
        let mut request = WireRequest { prompt_ids: vec![1], params: SamplingParams::greedy(2), n_candidates: 1, adapter: None };
        assert!(!serde_json::to_string(&request).unwrap().contains("adapter"));
        request.adapter = Some("ab".repeat(32));
        let text = serde_json::to_string(&request).unwrap();
        assert!(text.contains(&format!(r#""adapter":"{}""#, "ab".repeat(32))), "{text}");
        assert_eq!(serde_json::from_str::<WireRequest>(&text).unwrap(), request);
        assert_eq!(base_versions_key("d"), "d:versions:base");
        assert_eq!(requests_key("d"), "d:gen:requests");
        assert_eq!(replies_key("d", "a-1"), "d:gen:replies:a-1");
    }

    #[test]
    fn clients_turn_nagle_off() {
        let made = client("redis://127.0.0.1:6379/2").unwrap();
        assert!(made.get_connection_info().tcp_settings().nodelay());
        assert!(client("nope://x").is_err());
    }
}
