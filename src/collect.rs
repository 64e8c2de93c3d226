//! Consented log collection: exchanges from opted-in channels, written to
//! disk as append-only JSONL segments for fine-tuning (`dialogd train`
//! reads them as they are).
//!
//! Only channels listed in `[collect] channels` are collected. Authors are
//! stored as a keyed hash (HMAC-SHA256 with `collect.author_key`, truncated),
//! never as platform ids. Toxic turns never get here (the pipeline refuses
//! them before storage), and `/forget` removes every collected line an
//! author took part in. Each line is written whole with one `write` and
//! synced, so a crash loses at most the line being written. Segments rotate
//! by size and age; segments older than the retention are deleted.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::settings::CollectSettings;

/// Collection failures.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Moderators' channel choices, beside the segments.
const CHOICES_FILE: &str = "channels.json";
/// Opted-out authors' hashes, beside the segments.
pub const OPTED_OUT_FILE: &str = "opted-out.txt";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CollectError + '_ {
    move |source| CollectError::Io { path: path.to_path_buf(), source }
}

/// One turn of a collected exchange.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CollectedTurn {
    /// The author's keyed hash, or `bot`.
    pub author: String,
    pub text: String,
}

/// One line of a segment: what `dialogd train` reads as a dialogue.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub channel: String,
    /// Unix time in seconds.
    pub time: u64,
    pub turns: Vec<CollectedTurn>,
}

struct Segment {
    file: File,
    path: PathBuf,
    bytes: u64,
    opened: SystemTime,
}

/// Channel choices moderators made (`/collect on|off`), kept beside the
/// segments in `channels.json`; they override `[collect] channels`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct ChannelChoices {
    on: Vec<String>,
    off: Vec<String>,
}

/// The collector: one open segment at a time.
pub struct Collector {
    dir: PathBuf,
    /// `[collect] channels`.
    configured: HashSet<String>,
    /// Moderators' choices; a std mutex held only to look up or change.
    choices: Mutex<ChannelChoices>,
    /// Keyed hashes of authors who opted out (`opted-out.txt`, one per
    /// line): their exchanges are never collected or trained on.
    opted_out: Mutex<HashSet<String>>,
    key: Vec<u8>,
    max_bytes: u64,
    max_age: Duration,
    retention: Option<Duration>,
    /// The segment being appended to. A std mutex: held only for a write.
    current: Mutex<Option<Segment>>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector").field("dir", &self.dir).field("channels", &self.configured).finish_non_exhaustive()
    }
}

impl Collector {
    /// Opens (creating) the segment folder.
    pub fn open(settings: &CollectSettings) -> Result<Self, CollectError> {
        std::fs::create_dir_all(&settings.dir).map_err(io_err(&settings.dir))?;
        let choices_path = settings.dir.join(CHOICES_FILE);
        let choices = match std::fs::read_to_string(&choices_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| CollectError::Io {
                path: choices_path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ChannelChoices::default(),
            Err(e) => return Err(io_err(&choices_path)(e)),
        };
        let opted_out = read_opted_out(&settings.dir)?;
        Ok(Self {
            dir: settings.dir.clone(),
            configured: settings.channels.iter().cloned().collect(),
            choices: Mutex::new(choices),
            opted_out: Mutex::new(opted_out),
            key: settings.author_key.expose().as_bytes().to_vec(),
            max_bytes: settings.segment_max_bytes,
            max_age: Duration::from_secs(settings.segment_max_secs),
            retention: (settings.retention_days > 0).then(|| Duration::from_secs(settings.retention_days * 86_400)),
            current: Mutex::new(None),
        })
    }

    /// Whether this channel (`platform:channel_id`) opted in.
    pub fn wants(&self, channel: &str) -> bool {
        let choices = self.choices.lock().unwrap_or_else(|e| e.into_inner());
        let channel = channel.to_string();
        choices.on.contains(&channel) || (self.configured.contains(&channel) && !choices.off.contains(&channel))
    }

    /// A moderator's choice for a channel (`/collect on|off`), kept across
    /// restarts.
    pub fn set_channel(&self, channel: &str, on: bool) -> Result<(), CollectError> {
        let mut choices = self.choices.lock().unwrap_or_else(|e| e.into_inner());
        let channel = channel.to_string();
        choices.on.retain(|c| *c != channel);
        choices.off.retain(|c| *c != channel);
        if on {
            choices.on.push(channel);
        } else {
            choices.off.push(channel);
        }
        let path = self.dir.join(CHOICES_FILE);
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_string_pretty(&*choices).unwrap_or_default();
        std::fs::write(&tmp, body).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// The folder of the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opts an author out: nothing of theirs is collected from now on, and
    /// what was collected is deleted. Returns the exchanges deleted.
    pub fn opt_out(&self, author: &str) -> Result<usize, CollectError> {
        let hash = self.author_hash(author);
        {
            let mut opted_out = self.opted_out.lock().unwrap_or_else(|e| e.into_inner());
            if opted_out.insert(hash.clone()) {
                let path = self.dir.join(OPTED_OUT_FILE);
                let mut file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
                file.write_all(format!("{hash}\n").as_bytes()).map_err(io_err(&path))?;
                file.sync_data().map_err(io_err(&path))?;
            }
        }
        self.forget(author)
    }

    /// Takes an author's opt-out back (later exchanges are collected).
    pub fn opt_in(&self, author: &str) -> Result<bool, CollectError> {
        let hash = self.author_hash(author);
        let mut opted_out = self.opted_out.lock().unwrap_or_else(|e| e.into_inner());
        if !opted_out.remove(&hash) {
            return Ok(false);
        }
        let path = self.dir.join(OPTED_OUT_FILE);
        let tmp = path.with_extension("txt.tmp");
        let mut body: Vec<&str> = opted_out.iter().map(String::as_str).collect();
        body.sort_unstable();
        std::fs::write(&tmp, body.iter().map(|h| format!("{h}\n")).collect::<String>()).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(true)
    }

    /// The opted-out authors' keyed hashes.
    pub fn opted_out(&self) -> HashSet<String> {
        self.opted_out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The keyed hash stored in place of an author id.
    pub fn author_hash(&self, author: &str) -> String {
        hmac_sha256(&self.key, author.as_bytes())[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Appends one exchange. `turns` are `(author id, text, is_bot)`.
    pub fn record(&self, channel: &str, turns: &[(&str, &str, bool)]) -> Result<bool, CollectError> {
        {
            let opted_out = self.opted_out.lock().unwrap_or_else(|e| e.into_inner());
            if turns.iter().any(|(author, _, bot)| !bot && opted_out.contains(&self.author_hash(author))) {
                return Ok(false);
            }
        }
        let record = Record {
            channel: channel.to_string(),
            time: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            turns: turns
                .iter()
                .map(|(author, text, bot)| CollectedTurn {
                    author: if *bot { "bot".to_string() } else { self.author_hash(author) },
                    text: text.to_string(),
                })
                .collect(),
        };
        let mut line = serde_json::to_string(&record).unwrap_or_default();
        line.push('\n');
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let rotate = current.as_ref().is_none_or(|s| {
            s.bytes + line.len() as u64 > self.max_bytes && s.bytes > 0
                || s.opened.elapsed().unwrap_or_default() >= self.max_age
        });
        if rotate {
            *current = Some(self.new_segment()?);
        }
        let segment = current.as_mut().unwrap_or_else(|| unreachable!());
        segment.file.write_all(line.as_bytes()).map_err(io_err(&segment.path))?;
        segment.file.sync_data().map_err(io_err(&segment.path))?;
        segment.bytes += line.len() as u64;
        Ok(true)
    }

    fn new_segment(&self) -> Result<Segment, CollectError> {
        let now = SystemTime::now();
        let stamp = now.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = self.dir.join(format!("exchanges-{stamp}.jsonl"));
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
        Ok(Segment { file, path, bytes: 0, opened: now })
    }

    /// Every segment, oldest first.
    pub fn segments(&self) -> Result<Vec<PathBuf>, CollectError> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(io_err(&self.dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        paths.sort();
        Ok(paths)
    }

    /// Removes every collected line the author took part in; returns how
    /// many. Each segment is rewritten aside and renamed over the old one.
    pub fn forget(&self, author: &str) -> Result<usize, CollectError> {
        let hash = self.author_hash(author);
        // Hold the lock so no line is appended to a file being rewritten.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        for path in self.segments()? {
            let reader = BufReader::new(File::open(&path).map_err(io_err(&path))?);
            let mut kept = Vec::new();
            let mut dropped = 0;
            for line in reader.lines() {
                let line = line.map_err(io_err(&path))?;
                let by_author = serde_json::from_str::<Record>(&line)
                    .map(|r| r.turns.iter().any(|t| t.author == hash))
                    .unwrap_or(false);
                if by_author {
                    dropped += 1;
                } else {
                    kept.push(line);
                }
            }
            if dropped > 0 {
                let tmp = path.with_extension("jsonl.tmp");
                let mut body = kept.join("\n");
                if !body.is_empty() {
                    body.push('\n');
                }
                std::fs::write(&tmp, body).map_err(io_err(&tmp))?;
                std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
                removed += dropped;
                if current.as_ref().is_some_and(|s| s.path == path) {
                    // The open handle points at the replaced file: reopen.
                    *current = None;
                }
            }
        }
        Ok(removed)
    }

    /// Deletes segments last written longer ago than the retention.
    pub fn enforce_retention(&self) -> Result<usize, CollectError> {
        let Some(retention) = self.retention else { return Ok(0) };
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut deleted = 0;
        for path in self.segments()? {
            if current.as_ref().is_some_and(|s| s.path == path) {
                continue;
            }
            let modified = std::fs::metadata(&path).and_then(|m| m.modified()).map_err(io_err(&path))?;
            if modified.elapsed().unwrap_or_default() > retention {
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

/// HMAC-SHA256 (RFC 2104).
/// The opted-out authors' hashes kept in a collection folder (none when
/// the file is missing).
pub fn read_opted_out(dir: &Path) -> Result<HashSet<String>, CollectError> {
    let path = dir.join(OPTED_OUT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length (a long one is hashed first).
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Secret;

    fn settings(dir: &Path, max_bytes: u64) -> CollectSettings {
        CollectSettings {
            enabled: true,
            dir: dir.to_path_buf(),
            channels: vec!["http:c".into()],
            segment_max_bytes: max_bytes,
            segment_max_secs: 3600,
            retention_days: 30,
            author_key: Secret::new("k3y"),
        }
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    /// Hashes already in collected data and opt-out lists: the keyed hash
    /// must never change for a key and an author. Computed with the
    /// hand-written HMAC this module had before the `hmac` crate (and equal
    /// to Python's `hmac.new(key, author, sha256).hexdigest()[:32]`).
    #[test]
    fn author_hashes_stay_what_collected_data_holds() {
        let long_key = "long-key-".repeat(12);
        let cases = [
            ("k3y", "ann", "a28a4f76284d6d9bbf480fddd7693b76"),
            ("0123456789abcdef", "123456789012345678", "667a3d7cfeb1730f0d69bcdc8f93b711"),
            ("0123456789abcdef", "", "496dc93fa2d26eae500ec0bc37a12270"),
            (&"x".repeat(64), "telegram user 42", "c4e4b7a51174a921bb375d3e1fe3c78a"),
            (&long_key, "Ünïcödé 😀", "bc91ad551ec44045541b7a4c944d0676"),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (key, author, expected) in cases {
            let mut s = settings(dir.path(), 1 << 20);
            s.author_key = Secret::new(key);
            assert_eq!(Collector::open(&s).unwrap().author_hash(author), expected, "key {key:?}, author {author:?}");
        }
    }

    #[test]
    fn records_rotate_and_forget_removes_an_authors_lines() {
        let dir = tempfile::tempdir().unwrap();
        let c = Collector::open(&settings(dir.path(), 200)).unwrap();
        assert!(c.wants("http:c") && !c.wants("http:d"));
        let ann = c.author_hash("ann");
        assert_ne!(ann, "ann");
        assert_eq!(ann, c.author_hash("ann"));
        assert_ne!(ann, c.author_hash("bob"));
        for i in 0..4 {
            let who = if i % 2 == 0 { "ann" } else { "bob" };
            c.record("http:c", &[(who, &format!("hello {i}"), false), ("bot", "hi", true)]).unwrap();
        }
        // 200-byte segments: each line is ~150 bytes, so every line rotates.
        assert_eq!(c.segments().unwrap().len(), 4);
        let all: Vec<Record> = c
            .segments()
            .unwrap()
            .iter()
            .flat_map(|p| std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<_>>())
            .collect();
        assert_eq!(all.len(), 4);
        assert!(all.iter().all(|r| r.turns[1].author == "bot" && !r.turns[0].author.contains("ann")));
        assert_eq!(c.forget("ann").unwrap(), 2);
        let left: usize = c.segments().unwrap().iter().map(|p| std::fs::read_to_string(p).unwrap().lines().count()).sum();
        assert_eq!(left, 2);
        assert_eq!(c.forget("ann").unwrap(), 0);
        // Appending after a rewrite still works.
        c.record("http:c", &[("bob", "again", false)]).unwrap();
        assert_eq!(c.retention, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(c.enforce_retention().unwrap(), 0);
    }

    #[test]
    fn opted_out_authors_are_not_collected_and_choices_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let c = Collector::open(&settings(dir.path(), 1 << 20)).unwrap();
        assert!(c.record("http:c", &[("ann", "one", false), ("bot", "hi", true)]).unwrap());
        assert_eq!(c.opt_out("ann").unwrap(), 1, "opting out deletes what was collected");
        assert!(!c.record("http:c", &[("ann", "two", false), ("bot", "hi", true)]).unwrap());
        assert!(!c.record("http:c", &[("bob", "hey", false), ("ann", "three", false)]).unwrap());
        assert!(c.record("http:c", &[("bob", "four", false), ("bot", "hi", true)]).unwrap());
        c.set_channel("http:d", true).unwrap();
        c.set_channel("http:c", false).unwrap();
        assert!(c.wants("http:d") && !c.wants("http:c"));

        let c = Collector::open(&settings(dir.path(), 1 << 20)).unwrap();
        assert!(c.opted_out().contains(&c.author_hash("ann")));
        assert!(c.wants("http:d") && !c.wants("http:c"));
        let text: String = c.segments().unwrap().iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
        assert!(!text.contains("one") && !text.contains("two") && !text.contains("three") && text.contains("four"), "{text}");
        assert!(c.opt_in("ann").unwrap());
        assert!(!c.opt_in("ann").unwrap());
        assert!(c.record("http:d", &[("ann", "five", false), ("bot", "hi", true)]).unwrap());
        let c = Collector::open(&settings(dir.path(), 1 << 20)).unwrap();
        assert!(c.opted_out().is_empty());
    }
}
