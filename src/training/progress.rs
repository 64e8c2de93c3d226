//! A running trainer's progress: the `progress.json` it keeps up to date
//! for whoever watches (the daemon's job runner), and how people see it
//! (one line of text, or a bar on a terminal).
//!
//! The file is replaced whole (written beside it, then renamed over it), so
//! a reader sees the previous state or the next, never half of one.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{file_error, Result};

/// How often a trainer rewrites its progress file (and the first and last
/// step always).
pub const WRITE_EVERY: Duration = Duration::from_secs(1);

/// How often [`ProgressView`] prints a plain line when stderr is not a
/// terminal (a new step is needed too; the first one shows at once).
pub const LINE_EVERY: Duration = Duration::from_secs(5);

/// Where a training run stands, as `progress.json` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps done, those before a resume included.
    pub step: usize,
    /// Steps the run takes in all.
    pub total_steps: usize,
    /// Mean training loss of the last step; `None` before this run's first.
    pub loss: Option<f64>,
    /// Input tokens per second over this run's steps (0 before the first).
    pub tokens_per_s: f64,
    /// Seconds left at this run's pace; `None` before its first step.
    pub eta_s: Option<u64>,
    /// When this was written, Unix seconds.
    pub updated: u64,
}

impl Progress {
    /// Reads a progress file; `Ok(None)` when there is none yet.
    ///
    /// Errors: the file cannot be read or is not a progress record.
    pub fn read(path: &Path) -> Result<Option<Progress>> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| file_error(path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(file_error(path, e)),
        }
    }

    /// Replaces `path` with this progress (written to `PATH.tmp`, then
    /// renamed over it).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let text = serde_json::to_string(self).map_err(|e| file_error(path, e))?;
        std::fs::write(&tmp, text).map_err(|e| file_error(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| file_error(path, e))
    }

    /// For people: `step 12/100, loss 3.2104, 1520 tokens/s, ETA 1m 20s`
    /// (the parts not known yet left out).
    pub fn describe(&self) -> String {
        let mut text = format!("step {}/{}", self.step, self.total_steps);
        if let Some(loss) = self.loss {
            text.push_str(&format!(", loss {loss:.4}"));
        }
        if self.tokens_per_s > 0.0 {
            text.push_str(&format!(", {:.0} tokens/s", self.tokens_per_s));
        }
        if let Some(eta) = self.eta_s.filter(|_| self.step < self.total_steps) {
            text.push_str(&format!(", ETA {}", duration_text(eta)));
        }
        text
    }
}

/// `45s`, `1m 20s`, `2h 05m`.
pub fn duration_text(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// The trainer's side: keeps the progress file (if any) current, at most
/// every [`WRITE_EVERY`] but always at the first and last step.
pub(crate) struct ProgressFile {
    path: Option<PathBuf>,
    start_step: usize,
    total_steps: usize,
    started: Instant,
    last_write: Option<Instant>,
    /// [`WRITE_EVERY`] (tests wait longer).
    every: Duration,
}

impl ProgressFile {
    /// Writes the starting point (`start_step`, no loss yet); an error
    /// here (a folder that is not there) stops the run before it trains.
    pub(crate) fn start(path: Option<PathBuf>, start_step: usize, total_steps: usize) -> Result<Self> {
        let mut file = Self { path, start_step, total_steps, started: Instant::now(), last_write: None, every: WRITE_EVERY };
        file.write(start_step, None, 0.0, true)?;
        Ok(file)
    }

    /// After step `step` (1-based): writes when due, or when `last`. A
    /// failed write is logged, and training goes on.
    pub(crate) fn step(&mut self, step: usize, loss: f64, tokens_per_s: f64, last: bool) {
        let due = last
            || step == self.start_step + 1
            || step >= self.total_steps
            || self.last_write.is_none_or(|at| at.elapsed() >= self.every);
        if let Err(error) = self.write(step, Some(loss), tokens_per_s, due) {
            tracing::warn!(%error, step, "could not write the progress file");
        }
    }

    /// Seconds left after `step` at this run's pace so far; `None` before
    /// its first step.
    pub(crate) fn eta_s(&self, step: usize) -> Option<u64> {
        let done = step.saturating_sub(self.start_step);
        (done > 0).then(|| {
            let per_step = self.started.elapsed().as_secs_f64() / done as f64;
            (per_step * self.total_steps.saturating_sub(step) as f64).round() as u64
        })
    }

    fn write(&mut self, step: usize, loss: Option<f64>, tokens_per_s: f64, due: bool) -> Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        if !due {
            return Ok(());
        }
        let progress = Progress {
            step,
            total_steps: self.total_steps,
            loss: loss.filter(|l| l.is_finite()),
            tokens_per_s,
            eta_s: self.eta_s(step),
            updated: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        progress.write(path)?;
        self.last_write = Some(Instant::now());
        Ok(())
    }
}

/// The bar `dialogd train` and `dialogd jobs run --wait` draw on a
/// terminal: elapsed time, the bar, `step N/TOTAL`, a message.
pub fn bar(total: u64, position: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(position);
    bar
}

/// Someone watching a job's progress on stderr: a bar when stderr is a
/// terminal, otherwise a plain line (`LABEL: step 12/100, …`) for the first
/// progress seen and then at most every [`LINE_EVERY`] (logs and pipes get
/// no control codes).
pub struct ProgressView {
    label: String,
    bar: Option<indicatif::ProgressBar>,
    terminal: bool,
    last_line: Option<(Instant, usize)>,
}

impl ProgressView {
    /// A view whose lines start with `label` (e.g. `job #7`).
    pub fn new(label: impl Into<String>) -> Self {
        Self { label: label.into(), bar: None, terminal: std::io::stderr().is_terminal(), last_line: None }
    }

    /// Shows `progress` (a bar update, or a line when one is due).
    pub fn show(&mut self, progress: &Progress) {
        if self.terminal {
            let bar = self.bar.get_or_insert_with(|| bar(progress.total_steps as u64, progress.step as u64));
            bar.set_length(progress.total_steps as u64);
            bar.set_position(progress.step as u64);
            let mut message = Vec::new();
            if let Some(loss) = progress.loss {
                message.push(format!("loss {loss:.4}"));
            }
            if progress.tokens_per_s > 0.0 {
                message.push(format!("{:.0} tokens/s", progress.tokens_per_s));
            }
            if let Some(eta) = progress.eta_s {
                message.push(format!("ETA {}", duration_text(eta)));
            }
            bar.set_message(message.join(" · "));
            return;
        }
        let due = match self.last_line {
            None => true,
            Some((at, step)) => progress.step != step && (at.elapsed() >= LINE_EVERY || progress.step >= progress.total_steps),
        };
        if due {
            eprintln!("{}: {}", self.label, progress.describe());
            self.last_line = Some((Instant::now(), progress.step));
        }
    }

    /// Prints a line of its own (above the bar, when there is one).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Takes the bar away (the job stopped training).
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_round_trips_through_its_file_and_reads_for_people() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.json");
        assert_eq!(Progress::read(&path).unwrap(), None);
        let mut file = ProgressFile::start(Some(path.clone()), 0, 10).unwrap();
        file.every = Duration::from_secs(3600);
        let first = Progress::read(&path).unwrap().unwrap();
        assert_eq!((first.step, first.total_steps, first.loss, first.eta_s), (0, 10, None, None));
        assert_eq!(first.describe(), "step 0/10");
        file.step(1, 3.25, 1520.4, false);
        let one = Progress::read(&path).unwrap().unwrap();
        assert_eq!((one.step, one.loss, one.tokens_per_s), (1, Some(3.25), 1520.4));
        assert!(one.eta_s.is_some());
        // Not due (written less than `every` ago): the file keeps step 1.
        file.step(2, 3.0, 1500.0, false);
        assert_eq!(Progress::read(&path).unwrap().unwrap().step, 1);
        file.step(3, 2.5, 1500.0, true);
        assert_eq!(Progress::read(&path).unwrap().unwrap().step, 3);
        assert!(!dir.path().join("progress.json.tmp").exists());
        let shown = Progress { step: 12, total_steps: 100, loss: Some(3.21044), tokens_per_s: 1520.4, eta_s: Some(80), updated: 0 };
        assert_eq!(shown.describe(), "step 12/100, loss 3.2104, 1520 tokens/s, ETA 1m 20s");
        std::fs::write(&path, "{\"step\": 1").unwrap();
        assert!(Progress::read(&path).unwrap_err().to_string().contains("progress.json"));
        assert_eq!(duration_text(45), "45s");
        assert_eq!(duration_text(7500), "2h 05m");
    }
}
