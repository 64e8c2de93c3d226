//! Consented log collection: exchanges from opted-in channels, written to
//! disk as append-only JSONL segments for fine-tuning (`dialogd train`
//! reads them as they are).
//!
//! Only channels listed in `[collect] channels` are collected. Authors are
//! stored as a keyed hash (HMAC-SHA256 with `collect.author_key`, truncated)
//! of `platform:user` (a person: the same user id on Discord and Telegram
//! is two people), never as platform ids. Segments written before that
//! carry the hash of the bare user id ([`Collector::legacy_author_hash`]):
//! `/forget`, `/optout` and `/optin` act on both hashes. Toxic turns never get here (the pipeline refuses
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

use crate::settings::{CollectSettings, Consent};

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
/// Opted-in authors' hashes (`/optin`), beside the segments.
pub const OPTED_IN_FILE: &str = "opted-in.txt";

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
    /// Keyed hashes of authors who sent `/optin` (`opted-in.txt`): with
    /// `collect.consent = "user"` only exchanges all of whose authors are
    /// here are collected. Locked after `opted_out` when both are held.
    opted_in: Mutex<HashSet<String>>,
    consent: Consent,
    key: Vec<u8>,
    max_bytes: u64,
    max_age: Duration,
    retention: Option<Duration>,
    /// The segment being appended to. A std mutex: held only for a write.
    current: Mutex<Option<Segment>>,
    /// `jobs.dir`, whose `job-*/data.jsonl` copies `forget` also cleans.
    jobs_dir: Option<PathBuf>,
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
        let opted_in = read_hashes(&settings.dir.join(OPTED_IN_FILE))?;
        Ok(Self {
            dir: settings.dir.clone(),
            configured: settings.channels.iter().cloned().collect(),
            choices: Mutex::new(choices),
            opted_out: Mutex::new(opted_out),
            opted_in: Mutex::new(opted_in),
            consent: settings.consent,
            key: settings.author_key.expose().as_bytes().to_vec(),
            max_bytes: settings.segment_max_bytes,
            max_age: Duration::from_secs(settings.segment_max_secs),
            retention: (settings.retention_days > 0).then(|| Duration::from_secs(settings.retention_days * 86_400)),
            current: Mutex::new(None),
            jobs_dir: None,
        })
    }

    /// Makes [`Self::forget`] (and so `/optout`) also clean the dataset
    /// copies training jobs took into `jobs_dir` (`job-*/data.jsonl`).
    pub fn with_jobs_dir(mut self, jobs_dir: PathBuf) -> Self {
        self.jobs_dir = Some(jobs_dir);
        self
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

    /// Whose messages collecting channels give (`collect.consent`).
    pub fn consent(&self) -> Consent {
        self.consent
    }

    /// Opts a person (`platform:user`) out: nothing of theirs is collected
    /// from now on, nor trained on (their new and legacy hashes are listed),
    /// an opt-in of theirs is withdrawn, and what was collected is deleted.
    /// Returns the exchanges deleted.
    pub fn opt_out(&self, person: &str) -> Result<usize, CollectError> {
        {
            let mut opted_out = self.opted_out.lock().unwrap_or_else(|e| e.into_inner());
            let path = self.dir.join(OPTED_OUT_FILE);
            for hash in self.hashes(person) {
                if opted_out.insert(hash.clone()) {
                    append_hash(&path, &hash)?;
                }
            }
            let mut opted_in = self.opted_in.lock().unwrap_or_else(|e| e.into_inner());
            let mut was_in = false;
            for hash in self.hashes(person) {
                was_in |= opted_in.remove(&hash);
            }
            if was_in {
                rewrite_hashes(&self.dir.join(OPTED_IN_FILE), &opted_in)?;
            }
        }
        self.forget(person)
    }

    /// A person's `/optin`: takes an opt-out back and records the opt-in
    /// (what `collect.consent = "user"` asks for; kept in either mode, so
    /// changing the mode keeps it). Says what was already so.
    pub fn opt_in(&self, person: &str) -> Result<OptIn, CollectError> {
        let mut opted_out = self.opted_out.lock().unwrap_or_else(|e| e.into_inner());
        let mut was_out = false;
        for hash in self.hashes(person) {
            was_out |= opted_out.remove(&hash);
        }
        if was_out {
            rewrite_hashes(&self.dir.join(OPTED_OUT_FILE), &opted_out)?;
        }
        let mut opted_in = self.opted_in.lock().unwrap_or_else(|e| e.into_inner());
        let hash = self.author_hash(person);
        let was_in = !opted_in.insert(hash.clone());
        if !was_in {
            append_hash(&self.dir.join(OPTED_IN_FILE), &hash)?;
        }
        Ok(OptIn { was_opted_out: was_out, was_opted_in: was_in })
    }

    /// The opted-out authors' keyed hashes.
    pub fn opted_out(&self) -> HashSet<String> {
        self.opted_out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The keyed hash stored in place of a person (`platform:user`).
    pub fn author_hash(&self, person: &str) -> String {
        hmac_sha256(&self.key, person.as_bytes())[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The hash segments written before persons were keyed by platform
    /// carry: that of the bare user id (what follows `platform:`).
    pub fn legacy_author_hash(&self, person: &str) -> String {
        self.author_hash(person.split_once(':').map_or(person, |(_, user)| user))
    }

    /// A person's current and legacy hashes.
    fn hashes(&self, person: &str) -> [String; 2] {
        [self.author_hash(person), self.legacy_author_hash(person)]
    }

    /// Appends one exchange of `channel` (`platform:channel_id`). `turns`
    /// are `(author id, text, is_bot)`, the author ids the platform's.
    /// Returns false, writing nothing, when an author opted out or (with
    /// `collect.consent = "user"`) did not opt in.
    pub fn record(&self, channel: &str, turns: &[(&str, &str, bool)]) -> Result<bool, CollectError> {
        let platform = channel.split_once(':').map_or(channel, |(platform, _)| platform);
        let hash = |author: &str| self.author_hash(&format!("{platform}:{author}"));
        {
            let opted_out = self.opted_out.lock().unwrap_or_else(|e| e.into_inner());
            if turns.iter().any(|(author, _, bot)| !bot && opted_out.contains(&hash(author))) {
                return Ok(false);
            }
        }
        if self.consent == Consent::User {
            let opted_in = self.opted_in.lock().unwrap_or_else(|e| e.into_inner());
            if turns.iter().any(|(author, _, bot)| !bot && !opted_in.contains(&hash(author))) {
                return Ok(false);
            }
        }
        let record = Record {
            channel: channel.to_string(),
            time: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            turns: turns
                .iter()
                .map(|(author, text, bot)| CollectedTurn {
                    author: if *bot { "bot".to_string() } else { hash(author) },
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

    /// Removes every collected line the person (`platform:user`) took part
    /// in, under their current or legacy hash, from the segments and from
    /// the jobs' dataset copies; returns how many segment lines went. Each
    /// file is rewritten aside and renamed over the old one.
    pub fn forget(&self, person: &str) -> Result<usize, CollectError> {
        let hashes = self.hashes(person);
        // Hold the lock so no line is appended to a file being rewritten.
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        for path in self.segments()? {
            let dropped = drop_lines_of(&path, &hashes)?;
            if dropped > 0 {
                removed += dropped;
                if current.as_ref().is_some_and(|s| s.path == path) {
                    // The open handle points at the replaced file: reopen.
                    *current = None;
                }
            }
        }
        drop(current);
        if let Some(jobs_dir) = &self.jobs_dir {
            let copies: Vec<PathBuf> = match std::fs::read_dir(jobs_dir) {
                Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path().join("data.jsonl"))).filter(|p| p.is_file()).collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(io_err(jobs_dir)(e)),
            };
            let mut in_copies = 0;
            for path in copies {
                in_copies += drop_lines_of(&path, &hashes)?;
            }
            if in_copies > 0 {
                tracing::info!(lines = in_copies, "forgotten in the jobs' dataset copies too");
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

/// Rewrites a JSONL file of [`Record`]s without the lines any of `hashes`
/// took part in (aside, then renamed over it); returns how many went.
fn drop_lines_of(path: &Path, hashes: &[String]) -> Result<usize, CollectError> {
    let reader = BufReader::new(File::open(path).map_err(io_err(path))?);
    let mut kept = Vec::new();
    let mut dropped = 0;
    for line in reader.lines() {
        let line = line.map_err(io_err(path))?;
        let by_author =
            serde_json::from_str::<Record>(&line).map(|r| r.turns.iter().any(|t| hashes.contains(&t.author))).unwrap_or(false);
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
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
    }
    Ok(dropped)
}

/// How often a running daemon deletes segments past the retention.
pub const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// Enforces the retention now and then every `every` (on tokio's blocking
/// pool), until the collector is dropped. Deletions are logged at info,
/// failures at warn; neither stops the loop.
pub async fn enforce_retention_every(collector: std::sync::Weak<Collector>, every: Duration) {
    loop {
        let Some(strong) = collector.upgrade() else { return };
        match tokio::task::spawn_blocking(move || strong.enforce_retention()).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(deleted = n, "collected segments past retention deleted"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "retention check failed"),
            Err(e) => tracing::warn!(error = %e, "retention check panicked"),
        }
        tokio::time::sleep(every).await;
    }
}

/// What a person's `/optin` found ([`Collector::opt_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptIn {
    /// They had opted out (now taken back).
    pub was_opted_out: bool,
    /// They had already opted in.
    pub was_opted_in: bool,
}

/// The opted-out authors' hashes kept in a collection folder (none when
/// the file is missing).
pub fn read_opted_out(dir: &Path) -> Result<HashSet<String>, CollectError> {
    read_hashes(&dir.join(OPTED_OUT_FILE))
}

/// A file of hashes, one a line (none when it is missing).
fn read_hashes(path: &Path) -> Result<HashSet<String>, CollectError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Adds one hash to a file of hashes, synced.
fn append_hash(path: &Path, hash: &str) -> Result<(), CollectError> {
    let mut file = OpenOptions::new().create(true).append(true).open(path).map_err(io_err(path))?;
    file.write_all(format!("{hash}\n").as_bytes()).map_err(io_err(path))?;
    file.sync_data().map_err(io_err(path))
}

/// Replaces a file of hashes with `hashes` (sorted; aside, then renamed).
fn rewrite_hashes(path: &Path, hashes: &HashSet<String>) -> Result<(), CollectError> {
    let tmp = path.with_extension("txt.tmp");
    let mut body: Vec<&str> = hashes.iter().map(String::as_str).collect();
    body.sort_unstable();
    std::fs::write(&tmp, body.iter().map(|h| format!("{h}\n")).collect::<String>()).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
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
            consent: Consent::Channel,
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
        let ann = c.author_hash("http:ann");
        assert_ne!(ann, "ann");
        assert_eq!(ann, c.author_hash("http:ann"));
        assert_ne!(ann, c.author_hash("http:bob"));
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
        assert_eq!(c.forget("http:ann").unwrap(), 2);
        let left: usize = c.segments().unwrap().iter().map(|p| std::fs::read_to_string(p).unwrap().lines().count()).sum();
        assert_eq!(left, 2);
        assert_eq!(c.forget("http:ann").unwrap(), 0);
        // Appending after a rewrite still works.
        c.record("http:c", &[("bob", "again", false)]).unwrap();
        assert_eq!(c.retention, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(c.enforce_retention().unwrap(), 0);
    }

    /// The same user id on two platforms is two people; `/forget` also
    /// takes the lines written before (hashed from the bare user id).
    #[test]
    fn authors_are_hashed_with_their_platform_and_forget_takes_legacy_lines() {
        let dir = tempfile::tempdir().unwrap();
        let c = Collector::open(&settings(dir.path(), 1 << 20)).unwrap();
        c.record("discord:1", &[("123", "from discord", false), ("bot", "hi", true)]).unwrap();
        c.record("telegram:5", &[("123", "from telegram", false), ("bot", "hi", true)]).unwrap();
        assert_ne!(c.author_hash("discord:123"), c.author_hash("telegram:123"));
        assert_eq!(c.legacy_author_hash("discord:123"), c.author_hash("123"));
        // A line from before the change, as the old code wrote it.
        let legacy = Record {
            channel: "discord:1".into(),
            time: 1,
            turns: vec![CollectedTurn { author: c.author_hash("123"), text: "old line".into() }],
        };
        std::fs::write(dir.path().join("exchanges-1.jsonl"), format!("{}\n", serde_json::to_string(&legacy).unwrap())).unwrap();
        let text = || -> String { c.segments().unwrap().iter().map(|p| std::fs::read_to_string(p).unwrap()).collect() };
        let all = text();
        assert!(all.contains(&c.author_hash("discord:123")) && all.contains(&c.author_hash("telegram:123")));
        assert_eq!(c.forget("discord:123").unwrap(), 2);
        let left = text();
        assert!(!left.contains("from discord") && !left.contains("old line") && left.contains("from telegram"), "{left}");
        // Opting out lists both hashes, so no job trains on either.
        c.opt_out("telegram:123").unwrap();
        assert!(c.opted_out().contains(&c.author_hash("telegram:123")) && c.opted_out().contains(&c.author_hash("123")));
        assert!(!text().contains("from telegram"));
    }

    /// `/forget` (and `/optout`) reach the dataset copies jobs took.
    #[test]
    fn forget_cleans_the_jobs_dataset_copies() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = tempfile::tempdir().unwrap();
        let c = Collector::open(&settings(dir.path(), 1 << 20)).unwrap().with_jobs_dir(jobs.path().to_path_buf());
        c.record("http:c", &[("ann", "ann's words", false), ("bot", "hi", true)]).unwrap();
        c.record("http:c", &[("bob", "bob's words", false), ("bot", "hi", true)]).unwrap();
        let copy = jobs.path().join("job-3").join("data.jsonl");
        std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
        std::fs::copy(&c.segments().unwrap()[0], &copy).unwrap();
        assert_eq!(c.opt_out("http:ann").unwrap(), 1);
        let left = std::fs::read_to_string(&copy).unwrap();
        assert!(!left.contains("ann's words") && left.contains("bob's words"), "{left}");
        assert_eq!(c.forget("http:bob").unwrap(), 1);
        assert!(std::fs::read_to_string(&copy).unwrap().is_empty());
    }

    /// Backdates a file's modification time by `days`.
    fn age(path: &Path, days: u64) {
        let file = File::options().append(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(days * 86_400)).unwrap();
    }

    /// Segments past the retention go, on the timer a daemon runs, without
    /// a restart; younger ones and the segment being written stay.
    #[tokio::test]
    async fn segments_past_the_retention_are_deleted_on_a_timer() {
        let dir = tempfile::tempdir().unwrap();
        let c = std::sync::Arc::new(Collector::open(&settings(dir.path(), 200)).unwrap());
        for i in 0..3 {
            c.record("http:c", &[("ann", &format!("hello {i}"), false), ("bot", "hi", true)]).unwrap();
        }
        let segments = c.segments().unwrap();
        assert_eq!(segments.len(), 3);
        let timer = tokio::spawn(enforce_retention_every(std::sync::Arc::downgrade(&c), Duration::from_millis(20)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(c.segments().unwrap().len(), 3, "young segments were deleted");
        age(&segments[0], 31);
        age(&segments[1], 29);
        age(&segments[2], 31); // the one being written: kept
        let mut gone = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if !segments[0].exists() {
                gone = true;
                break;
            }
        }
        assert!(gone, "the old segment is still there");
        assert!(segments[1].exists() && segments[2].exists());
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), timer).await.expect("the timer ends with the collector").unwrap();
    }

    #[test]
    fn opted_out_authors_are_not_collected_and_choices_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let c = Collector::open(&settings(dir.path(), 1 << 20)).unwrap();
        assert!(c.record("http:c", &[("ann", "one", false), ("bot", "hi", true)]).unwrap());
        assert_eq!(c.opt_out("http:ann").unwrap(), 1, "opting out deletes what was collected");
        assert!(!c.record("http:c", &[("ann", "two", false), ("bot", "hi", true)]).unwrap());
        assert!(!c.record("http:c", &[("bob", "hey", false), ("ann", "three", false)]).unwrap());
        assert!(c.record("http:c", &[("bob", "four", false), ("bot", "hi", true)]).unwrap());
        c.set_channel("http:d", true).unwrap();
        c.set_channel("http:c", false).unwrap();
        assert!(c.wants("http:d") && !c.wants("http:c"));

        let c = Collector::open(&settings(dir.path(), 1 << 20)).unwrap();
        assert!(c.opted_out().contains(&c.author_hash("http:ann")));
        assert!(c.wants("http:d") && !c.wants("http:c"));
        let text: String = c.segments().unwrap().iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
        assert!(!text.contains("one") && !text.contains("two") && !text.contains("three") && text.contains("four"), "{text}");
        assert_eq!(c.opt_in("http:ann").unwrap(), OptIn { was_opted_out: true, was_opted_in: false });
        assert_eq!(c.opt_in("http:ann").unwrap(), OptIn { was_opted_out: false, was_opted_in: true });
        assert!(c.record("http:d", &[("ann", "five", false), ("bot", "hi", true)]).unwrap());
        let c = Collector::open(&settings(dir.path(), 1 << 20)).unwrap();
        assert!(c.opted_out().is_empty());
    }

    #[test]
    fn with_consent_per_user_only_opted_in_authors_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let settings = CollectSettings { consent: Consent::User, ..settings(dir.path(), 1 << 20) };
        let c = Collector::open(&settings).unwrap();
        assert!(!c.record("http:c", &[("ann", "one", false), ("bot", "hi", true)]).unwrap(), "not opted in");
        c.opt_in("http:ann").unwrap();
        assert!(c.record("http:c", &[("ann", "two", false), ("bot", "hi", true)]).unwrap());
        // Another person's turn in the context, without their consent: skipped.
        assert!(!c.record("http:c", &[("bob", "hey", false), ("bot", "yo", true), ("ann", "three", false)]).unwrap());
        // The same user id on another platform is another person.
        assert!(!c.record("telegram:c", &[("ann", "four", false), ("bot", "hi", true)]).unwrap());
        // Kept across a restart; an opt-out withdraws it.
        let c = Collector::open(&settings).unwrap();
        assert!(c.record("http:c", &[("ann", "five", false), ("bot", "hi", true)]).unwrap());
        assert_eq!(c.opt_out("http:ann").unwrap(), 2);
        let c = Collector::open(&settings).unwrap();
        assert!(!c.record("http:c", &[("ann", "six", false), ("bot", "hi", true)]).unwrap());
        assert_eq!(c.opt_in("http:ann").unwrap(), OptIn { was_opted_out: true, was_opted_in: false });
        assert!(c.record("http:c", &[("ann", "seven", false), ("bot", "hi", true)]).unwrap());
        let text: String = c.segments().unwrap().iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("seven"), "{text}");
    }
}
