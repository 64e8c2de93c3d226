//! A job's training data: a snapshot of the collected exchanges.
//!
//! The snapshot is taken once, when the job first starts, and kept in the
//! job's folder, so a resumed job trains on exactly the data it began with
//! and later `/forget`s or retention cannot change a run halfway. Only the
//! job's channels are taken, and no exchange with a turn by an opted-out
//! author (the trainer is given the opt-out list too).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::collect::Record;

/// What went into a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub path: PathBuf,
    /// Exchanges written.
    pub exchanges: usize,
    /// Exchanges left out because an opted-out author took part.
    pub opted_out: usize,
}

/// Writes the exchanges of `channels` (all, when empty) found in the
/// segments under `collect_dir` to `out`, leaving out any with a turn by an
/// author in `opted_out`. Lines that do not parse are skipped.
pub fn snapshot(collect_dir: &Path, channels: &[String], opted_out: &HashSet<String>, out: &Path) -> std::io::Result<Snapshot> {
    let mut segments: Vec<PathBuf> = match std::fs::read_dir(collect_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    segments.sort();
    let tmp = out.with_extension("jsonl.tmp");
    let mut writer = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    let (mut exchanges, mut skipped) = (0, 0);
    for segment in segments {
        for line in BufReader::new(std::fs::File::open(&segment)?).lines() {
            let line = line?;
            let Ok(record) = serde_json::from_str::<Record>(&line) else { continue };
            if !channels.is_empty() && !channels.contains(&record.channel) {
                continue;
            }
            if record.turns.iter().any(|t| opted_out.contains(&t.author)) {
                skipped += 1;
                continue;
            }
            writer.write_all(line.as_bytes())?;
            writer.write_all(b"\n")?;
            exchanges += 1;
        }
    }
    writer.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(Snapshot { path: out.to_path_buf(), exchanges, opted_out: skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_takes_the_channels_and_leaves_out_opted_out_authors() {
        let dir = tempfile::tempdir().unwrap();
        let collected = dir.path().join("collected");
        std::fs::create_dir(&collected).unwrap();
        let line = |channel: &str, author: &str| {
            format!(r#"{{"channel":"{channel}","time":1,"turns":[{{"author":"{author}","text":"hi"}},{{"author":"bot","text":"hello"}}]}}"#)
        };
        let body = [line("discord:1", "aaa"), line("discord:2", "aaa"), line("discord:1", "bbb"), "not json".into()].join("\n");
        std::fs::write(collected.join("exchanges-1.jsonl"), body).unwrap();
        std::fs::write(collected.join("notes.txt"), line("discord:1", "ccc")).unwrap();
        let out = dir.path().join("data.jsonl");
        let opted_out: HashSet<String> = ["bbb".to_string()].into();
        let snap = snapshot(&collected, &["discord:1".into()], &opted_out, &out).unwrap();
        assert_eq!((snap.exchanges, snap.opted_out), (1, 1));
        let written = std::fs::read_to_string(&out).unwrap();
        assert!(written.contains("aaa") && !written.contains("bbb") && !written.contains("discord:2"), "{written}");
        let all = snapshot(&collected, &[], &HashSet::new(), &out).unwrap();
        assert_eq!(all.exchanges, 3);
        let missing = snapshot(&dir.path().join("none"), &[], &HashSet::new(), &out).unwrap();
        assert_eq!(missing.exchanges, 0);
    }
}
