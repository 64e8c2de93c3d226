//! Persona adapters across hosts: a LoRA adapter travels through Redis as
//! one blob named by the SHA-256 of its bytes, and each worker keeps the
//! adapters it fetched on disk and the ones it serves in memory.
//!
//! - A blob is an adapter folder packed: the 8 bytes `DLGDLORA`, the
//!   length of `adapter_config.json` (u32, little-endian), that file, then
//!   `adapter_model.safetensors`. Its id is the SHA-256 of the whole blob,
//!   in lowercase hex (the config's `lora_alpha` and patterns change what
//!   the weights do, so both are hashed). At most [`MAX_ADAPTER_BYTES`].
//! - The key is `{prefix}:adapter:{id}`, with no expiry: the same content
//!   is the same key, whoever stores it (each store writes it again, so a
//!   damaged copy is repaired by the next daemon that loads the persona).
//! - Daemon ([`AdapterBlobs::publish`]): packs a persona's folder, stores
//!   it, and sends the id with each request ([`super::WireRequest`]'s
//!   `adapter`); a path never crosses hosts.
//! - Worker ([`WorkerAdapters::get`]): memory (the last
//!   [`MEMORY_SLOTS`] used), else its disk cache
//!   `{worker.cache_dir}/adapters/{id}/` (a PEFT folder, checked against
//!   the id again), else Redis: length checked before the read, hash
//!   checked after, written to a temporary folder and renamed into place.
//!   An unknown id, a corrupt blob or an adapter that does not fit the
//!   served model is an error for that request, never the base model
//!   answering under a persona's name.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Device;
use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};

use crate::model::LoraRuntime;
use crate::pool::PoolHandle;

/// The largest adapter blob stored or fetched, in bytes (64 MiB: a rank-8
/// adapter of DialoGPT-medium is about 3 MiB).
pub const MAX_ADAPTER_BYTES: usize = 64 << 20;

/// Adapters a worker keeps loaded.
pub const MEMORY_SLOTS: usize = 16;

const MAGIC: &[u8; 8] = b"DLGDLORA";
const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Why an adapter could not be stored, fetched or loaded.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The daemon's adapter folder cannot be packed (a file missing or
    /// unreadable, too large).
    #[error("{path}: {message}")]
    Folder { path: PathBuf, message: String },
    /// A request named an adapter Redis does not hold.
    #[error("adapter {0} is not in Redis (a daemon stores it when it serves the persona; was Redis emptied?)")]
    Unknown(String),
    /// The blob is not what its id says, or not a packed adapter.
    #[error("adapter {id}: the blob in Redis is corrupt ({why}); not used")]
    Corrupt { id: String, why: String },
    /// A well-formed adapter that cannot serve the worker's model.
    #[error("adapter {id}: {message}")]
    Load { id: String, message: String },
    /// The worker's cache folder cannot be written.
    #[error("adapter cache {path}: {source}")]
    Cache { path: PathBuf, source: std::io::Error },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// `{prefix}:adapter:{id}`.
pub fn adapter_key(prefix: &str, id: &str) -> String {
    format!("{prefix}:adapter:{id}")
}

/// The id of a blob: its SHA-256 in lowercase hex.
pub fn blob_id(blob: &[u8]) -> String {
    Sha256::digest(blob).iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `id` has the form of a blob id (64 lowercase hex digits); it
/// names a folder, so nothing else is accepted.
pub fn is_blob_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Packs the PEFT folder `dir` into a blob (see the module docs).
///
/// Errors: a file missing or unreadable, or a blob over
/// [`MAX_ADAPTER_BYTES`].
pub fn pack(dir: &Path) -> Result<Vec<u8>, BlobError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|e| BlobError::Folder { path, message: e.to_string() })
    };
    let weights_size = std::fs::metadata(dir.join(WEIGHTS_FILE)).map(|m| m.len()).unwrap_or(0);
    if weights_size > MAX_ADAPTER_BYTES as u64 {
        return Err(too_large(dir, weights_size as usize));
    }
    let (config, weights) = (read(CONFIG_FILE)?, read(WEIGHTS_FILE)?);
    let size = MAGIC.len() + 4 + config.len() + weights.len();
    if size > MAX_ADAPTER_BYTES {
        return Err(too_large(dir, size));
    }
    let mut blob = Vec::with_capacity(size);
    blob.extend_from_slice(MAGIC);
    blob.extend_from_slice(&(config.len() as u32).to_le_bytes());
    blob.extend_from_slice(&config);
    blob.extend_from_slice(&weights);
    Ok(blob)
}

fn too_large(dir: &Path, size: usize) -> BlobError {
    BlobError::Folder {
        path: dir.to_path_buf(),
        message: format!("the adapter is {size} bytes; adapters sent to workers may have at most {MAX_ADAPTER_BYTES}"),
    }
}

/// The config and weights of a blob; `None` when it is not a packed
/// adapter.
fn unpack(blob: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = blob.strip_prefix(MAGIC.as_slice())?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// The daemon's side: stores adapters for the workers.
#[derive(Clone)]
pub struct AdapterBlobs {
    conn: ConnectionManager,
    prefix: String,
}

impl AdapterBlobs {
    /// Connects to the Redis at `url` (keys under `prefix`).
    ///
    /// Errors: a bad URL, or Redis unreachable at start.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, BlobError> {
        let conn = ConnectionManager::new_with_config(super::client(url)?, super::manager_config()).await?;
        Ok(Self { conn, prefix: prefix.to_string() })
    }

    /// Packs the adapter folder `dir`, stores it and returns its id.
    ///
    /// Errors: [`pack`]'s, or Redis refusing the write.
    pub async fn publish(&self, dir: &Path) -> Result<String, BlobError> {
        let path = dir.to_path_buf();
        let blob = tokio::task::spawn_blocking(move || pack(&path))
            .await
            .map_err(|e| BlobError::Folder { path: dir.to_path_buf(), message: e.to_string() })??;
        let id = blob_id(&blob);
        // Written even when present: the same id is the same content, and
        // a copy damaged in Redis is repaired.
        redis::cmd("SET").arg(adapter_key(&self.prefix, &id)).arg(blob.as_slice()).query_async::<()>(&mut self.conn.clone()).await?;
        tracing::info!(adapter = %dir.display(), id = %id, bytes = blob.len(), "persona adapter stored in Redis for the workers");
        Ok(id)
    }
}

/// A worker's adapters: fetched from Redis once, kept on disk under its
/// cache folder and loaded for the model its pool serves.
pub struct WorkerAdapters {
    conn: ConnectionManager,
    prefix: String,
    /// `{worker.cache_dir}/adapters`.
    dir: PathBuf,
    device: Device,
    /// The served model's shape comes from here (it changes on a swap).
    pool: PoolHandle,
    /// Most recently used first; a std lock, never held across an await.
    memory: Mutex<VecDeque<(String, Arc<LoraRuntime>)>>,
    /// Blobs fetched from Redis (for the tests and the exit log).
    pub fetched: AtomicU64,
}

impl WorkerAdapters {
    /// The adapters of a worker whose cache folder is `cache_dir` (made if
    /// missing) and whose model runs on `device` in `pool`.
    ///
    /// Errors: the folder cannot be made.
    pub fn new(conn: ConnectionManager, prefix: &str, cache_dir: &Path, device: Device, pool: PoolHandle) -> Result<Self, BlobError> {
        let dir = cache_dir.join("adapters");
        std::fs::create_dir_all(&dir).map_err(|source| BlobError::Cache { path: dir.clone(), source })?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
            dir,
            device,
            pool,
            memory: Mutex::new(VecDeque::new()),
            fetched: AtomicU64::new(0),
        })
    }

    /// The folder a fetched adapter is kept in.
    pub fn folder(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The adapter `id`, loaded for the served model.
    ///
    /// Errors: not an id, not in Redis, a corrupt blob, one that does not
    /// fit the model, the cache folder unwritable, Redis unreachable.
    pub async fn get(&self, id: &str) -> Result<Arc<LoraRuntime>, BlobError> {
        if !is_blob_id(id) {
            return Err(BlobError::Corrupt { id: id.chars().take(80).collect(), why: "not a SHA-256 id".into() });
        }
        {
            let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = memory.iter().position(|(known, _)| known == id) {
                let entry = memory.remove(at).expect("position is in range");
                let runtime = entry.1.clone();
                memory.push_front(entry);
                return Ok(runtime);
            }
        }
        let folder = self.folder(id);
        if !self.on_disk(id, &folder).await {
            self.fetch(id, &folder).await?;
        }
        let (config, device, path) = (self.pool.served_config(), self.device.clone(), folder.clone());
        let loaded = tokio::task::spawn_blocking(move || crate::training::lora::load_runtime_on(&path, &config, &device))
            .await
            .map_err(|e| BlobError::Load { id: id.to_string(), message: e.to_string() })?
            .map_err(|e| BlobError::Load { id: id.to_string(), message: e.to_string() })?;
        let runtime = Arc::new(loaded);
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        memory.retain(|(known, _)| known != id);
        memory.push_front((id.to_string(), runtime.clone()));
        memory.truncate(MEMORY_SLOTS);
        Ok(runtime)
    }

    /// Whether `folder` holds the adapter `id` (packed again, it hashes to
    /// the id); a folder that does not is removed, to be fetched again.
    async fn on_disk(&self, id: &str, folder: &Path) -> bool {
        if !folder.is_dir() {
            return false;
        }
        let path = folder.to_path_buf();
        let matches = tokio::task::spawn_blocking(move || pack(&path).map(|blob| blob_id(&blob)))
            .await
            .ok()
            .and_then(Result::ok)
            .is_some_and(|found| found == id);
        if !matches {
            tracing::warn!(adapter = %id, folder = %folder.display(), "a cached adapter does not match its id; fetching it again");
            let _ = std::fs::remove_dir_all(folder);
        }
        matches
    }

    /// Reads the blob from Redis, checks it and writes it to `folder`
    /// (a temporary folder renamed into place).
    async fn fetch(&self, id: &str, folder: &Path) -> Result<(), BlobError> {
        let key = adapter_key(&self.prefix, id);
        let mut conn = self.conn.clone();
        let size: usize = redis::cmd("STRLEN").arg(&key).query_async(&mut conn).await?;
        if size == 0 {
            return Err(BlobError::Unknown(id.to_string()));
        }
        let corrupt = |why: String| BlobError::Corrupt { id: id.to_string(), why };
        if size > MAX_ADAPTER_BYTES {
            return Err(corrupt(format!("{size} bytes, over the limit of {MAX_ADAPTER_BYTES}")));
        }
        let blob: Vec<u8> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        let found = blob_id(&blob);
        if found != id {
            return Err(corrupt(format!("its SHA-256 is {found}")));
        }
        let (config, weights) = unpack(&blob).ok_or_else(|| corrupt("not a packed adapter".into()))?;
        let cache = |source| BlobError::Cache { path: folder.to_path_buf(), source };
        let temp = self.dir.join(format!(".{id}.{}.{}", std::process::id(), self.fetched.fetch_add(1, Ordering::Relaxed)));
        let written = std::fs::create_dir_all(&temp)
            .and_then(|()| std::fs::write(temp.join(CONFIG_FILE), config))
            .and_then(|()| std::fs::write(temp.join(WEIGHTS_FILE), weights));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&temp);
            return Err(cache(e));
        }
        if let Err(e) = std::fs::rename(&temp, folder) {
            let _ = std::fs::remove_dir_all(&temp);
            // Another worker sharing the folder put it there first.
            if !folder.is_dir() {
                return Err(cache(e));
            }
        }
        tracing::info!(adapter = %id, bytes = blob.len(), folder = %folder.display(), "persona adapter fetched from Redis");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_pack_and_unpack_and_ids_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), b"{\"r\": 4}").unwrap();
        std::fs::write(dir.path().join(WEIGHTS_FILE), b"weights").unwrap();
        let blob = pack(dir.path()).unwrap();
        assert_eq!(unpack(&blob), Some((b"{\"r\": 4}".as_slice(), b"weights".as_slice())));
        let id = blob_id(&blob);
        assert!(is_blob_id(&id), "{id}");
        assert!(!is_blob_id("../../etc/passwd"));
        assert!(!is_blob_id(&id.to_uppercase()));
        assert_eq!(unpack(b"DLGDLORA\xff\xff\xff\xffx"), None);
        assert_eq!(unpack(b"not an adapter"), None);
        std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).unwrap();
        assert!(pack(dir.path()).unwrap_err().to_string().contains(WEIGHTS_FILE));
    }
}
