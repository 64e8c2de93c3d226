//! Turning a `--model` argument into a local checkpoint folder.
//!
//! A path that exists is used as it is. Anything shaped like a hub id
//! (`microsoft/DialoGPT-medium`) is looked up in the standard Hugging Face
//! cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`) and, when a
//! file is missing there and `HF_HUB_OFFLINE` is not set, downloaded into it,
//! the progress logged at info (file, bytes, percent) every
//! [`PROGRESS_EVERY`] ([`DownloadProgress`]), stalled or not. `HF_ENDPOINT` picks another hub
//! server. A download that gets no bytes for `HF_HUB_DOWNLOAD_TIMEOUT`
//! seconds (huggingface_hub's variable and default, 10) fails, naming the
//! file, instead of waiting forever.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ModelError;

/// Tokenizer layouts a checkpoint may have, preferred first.
const TOKENIZER_CHOICES: &[&[&str]] = &[&["tokenizer.json"], &["vocab.json", "merges.txt"]];
/// Weight files a checkpoint may have, preferred first.
const WEIGHT_CHOICES: &[&str] = &["model.safetensors", "pytorch_model.bin"];

/// Whether `spec` looks like `owner/name` on the hub rather than a path.
pub fn is_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(owner) && ok(name)
}

/// Resolves `--model` to a folder, downloading from the hub if needed. An
/// existing weights file (`.safetensors`, `.bin`, `.pkl`, `.pt`, `.pth`) is
/// taken as it is: `Gpt2::load` reads a file, and its tokenizer is looked
/// for beside it (or given apart, as `dialogd rank --tokenizer`).
pub fn resolve_model(spec: &str) -> Result<PathBuf, ModelError> {
    resolve_checkpoint(spec, TOKENIZER_CHOICES)
}

/// [`resolve_model`] for checkpoints whose tokenizer comes only in one of
/// `tokenizers` (each a set of files that must all be there): the safety
/// classifier takes `&[&["tokenizer.json"]]`.
pub fn resolve_checkpoint(spec: &str, tokenizers: &[&[&str]]) -> Result<PathBuf, ModelError> {
    let path = Path::new(spec);
    if path.exists() {
        let weights_file = path.is_file() && super::weights::is_weights_file(path);
        if !path.is_dir() && !weights_file {
            return Err(ModelError::File {
                path: path.to_path_buf(),
                message: "is a file; --model takes the checkpoint folder that contains it (or the weights file itself)".into(),
            });
        }
        return Ok(path.to_path_buf());
    }
    if !is_hub_id(spec) {
        return Err(ModelError::MissingFolder(path.to_path_buf()));
    }
    if let Some(dir) = cached_checkpoint(spec, tokenizers) {
        return Ok(dir);
    }
    if offline_asked(std::env::var("HF_HUB_OFFLINE").ok().as_deref()) {
        return Err(hub_error(spec, "HF_HUB_OFFLINE is set and the model is not in the cache"));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| hub_error(spec, &e.to_string()))?;
    runtime.block_on(download(spec, tokenizers))
}

/// Whether `HF_HUB_OFFLINE`'s value asks for offline mode, as
/// huggingface_hub reads it: `1`, `true`, `yes` or `on` (any case); unset,
/// empty, `0`, `false`, `no` or `off` mean online.
pub fn offline_asked(value: Option<&str>) -> bool {
    value.is_some_and(|v| ["1", "true", "yes", "on"].iter().any(|on| v.trim().eq_ignore_ascii_case(on)))
}

fn hub_error(spec: &str, why: &str) -> ModelError {
    let cache = hf_hub::Cache::from_env();
    ModelError::Hub(format!(
        "cannot get `{spec}` from the Hugging Face hub ({why}); nothing usable is cached under {}. \
         Download it where the hub is reachable (e.g. `git lfs install && git clone https://huggingface.co/{spec}`) and pass the folder: \
         --model /path/to/folder (config.json, model.safetensors or pytorch_model.bin, vocab.json + merges.txt or tokenizer.json)",
        cache.path().display()
    ))
}

/// The cached snapshot folder when every needed file is already there.
fn cached_checkpoint(spec: &str, tokenizers: &[&[&str]]) -> Option<PathBuf> {
    let repo = hf_hub::Cache::from_env().model(spec.to_string());
    let config = repo.get("config.json")?;
    let have_tokenizer = tokenizers.iter().any(|files| files.iter().all(|f| repo.get(f).is_some()));
    let have_weights = WEIGHT_CHOICES.iter().any(|f| repo.get(f).is_some());
    (have_tokenizer && have_weights).then(|| config.parent().map(Path::to_path_buf)).flatten()
}

/// How often a download in progress is logged.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// The variable that sets how long a download may go without bytes, in
/// seconds (huggingface_hub's name and meaning).
pub const DOWNLOAD_TIMEOUT_ENV: &str = "HF_HUB_DOWNLOAD_TIMEOUT";
/// Its default, huggingface_hub's.
const DEFAULT_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The stall limit for `value` (the variable's text, if set): positive
/// seconds, fractions allowed; unset means the default; anything else is an
/// error naming the variable.
pub fn download_timeout(value: Option<&str>) -> Result<Duration, String> {
    let Some(text) = value else { return Ok(DEFAULT_DOWNLOAD_TIMEOUT) };
    match text.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => Ok(Duration::from_secs_f64(secs)),
        _ => Err(format!("{DOWNLOAD_TIMEOUT_ENV}={text:?} is not a positive number of seconds")),
    }
}

/// One file's download, as logged: bytes so far of `total` (bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressLine {
    pub bytes: u64,
    pub total: u64,
    /// 0 to 100, one decimal.
    pub percent: f64,
    /// Average since the file's start, in MiB/s.
    pub mib_per_s: f64,
}

/// A file's download progress: bytes counted against the file's size.
#[derive(Debug, Clone)]
pub struct DownloadProgress {
    total: u64,
    bytes: u64,
    started: Instant,
}

impl DownloadProgress {
    pub fn new(total: u64, now: Instant) -> Self {
        Self { total, bytes: 0, started: now }
    }

    /// Counts `n` more bytes.
    pub fn advance(&mut self, n: u64) {
        self.bytes += n;
    }

    /// Where the download stands at `now`.
    pub fn line(&self, now: Instant) -> ProgressLine {
        let percent = if self.total == 0 { 100.0 } else { (self.bytes as f64 * 1000.0 / self.total as f64).round() / 10.0 };
        let secs = now.duration_since(self.started).as_secs_f64().max(1e-3);
        ProgressLine { bytes: self.bytes, total: self.total, percent, mib_per_s: self.bytes as f64 / secs / (1024.0 * 1024.0) }
    }
}

/// The file being downloaded.
struct Current {
    file: String,
    progress: DownloadProgress,
    done: bool,
}

/// When a fetch last heard from the hub: its start, then each chunk.
type LastHeard = Arc<Mutex<Instant>>;

/// hf-hub's progress callbacks, logged: a line when a file starts, one
/// every [`PROGRESS_EVERY`] while it downloads (stalled or not: a timer
/// tells, not the arriving bytes), one when it is done. Clones share one
/// count (hf-hub clones it per chunk).
#[derive(Clone)]
struct LogProgress {
    model: Arc<str>,
    current: Arc<Mutex<Option<Current>>>,
    heard: LastHeard,
}

impl LogProgress {
    fn new(model: &str, heard: LastHeard) -> Self {
        Self { model: model.into(), current: Arc::new(Mutex::new(None)), heard }
    }

    fn heard_now(&self) {
        *self.heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl hf_hub::api::tokio::Progress for LogProgress {
    async fn init(&mut self, size: usize, filename: &str) {
        self.heard_now();
        tracing::info!(model = %self.model, file = %filename, total_bytes = size, "downloading from the hub");
        *self.lock() = Some(Current {
            file: filename.to_string(),
            progress: DownloadProgress::new(size as u64, Instant::now()),
            done: false,
        });
        let this = self.clone();
        // Ends with the file, or with the download's runtime.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (file, line) = match &*this.lock() {
                    Some(c) if !c.done => (c.file.clone(), c.progress.line(Instant::now())),
                    _ => break,
                };
                tracing::info!(
                    model = %this.model,
                    file = %file,
                    bytes = line.bytes,
                    total_bytes = line.total,
                    percent = line.percent,
                    mib_per_s = (line.mib_per_s * 10.0).round() / 10.0,
                    "downloading"
                );
            }
        });
    }

    async fn update(&mut self, size: usize) {
        self.heard_now();
        if let Some(c) = self.lock().as_mut() {
            c.progress.advance(size as u64);
        }
    }

    async fn finish(&mut self) {
        if let Some(c) = self.lock().as_mut() {
            c.done = true;
            let line = c.progress.line(Instant::now());
            tracing::info!(model = %self.model, file = %c.file, bytes = line.bytes, "downloaded");
        }
    }
}

/// One file from the cache, or else downloaded (its progress logged),
/// given up when no bytes come for `stall` (see [`download_timeout`]).
async fn fetch(repo: &hf_hub::api::tokio::ApiRepo, spec: &str, file: &str, stall: Duration) -> Result<PathBuf, String> {
    if let Some(path) = hf_hub::Cache::from_env().model(spec.to_string()).get(file) {
        return Ok(path);
    }
    let heard: LastHeard = Arc::new(Mutex::new(Instant::now()));
    let watch = heard.clone();
    let stalled = async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if watch.lock().unwrap_or_else(|e| e.into_inner()).elapsed() >= stall {
                return;
            }
        }
    };
    tokio::select! {
        done = repo.download_with_progress(file, LogProgress::new(spec, heard)) => done.map_err(|e| format!("{file}: {e}")),
        () = stalled => {
            tracing::warn!(model = %spec, file = %file, stall_secs = stall.as_secs_f64(), "download stalled");
            Err(format!("{file}: the download stalled (no bytes for {} s; {DOWNLOAD_TIMEOUT_ENV} sets the limit)", stall.as_secs_f64()))
        }
    }
}

async fn download(spec: &str, tokenizers: &[&[&str]]) -> Result<PathBuf, ModelError> {
    let stall = download_timeout(std::env::var(DOWNLOAD_TIMEOUT_ENV).ok().as_deref()).map_err(|e| hub_error(spec, &e))?;
    let api = hf_hub::api::tokio::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| hub_error(spec, &e.to_string()))?;
    let repo = api.model(spec.to_string());
    let config = fetch(&repo, spec, "config.json", stall).await.map_err(|e| hub_error(spec, &e))?;
    // Every failed choice is told: a stall must not hide behind the next
    // layout's 404.
    let mut errors = Vec::new();
    let mut tokenizer_ok = false;
    for files in tokenizers {
        let mut all = true;
        for file in *files {
            if let Err(e) = fetch(&repo, spec, file, stall).await {
                errors.push(e);
                all = false;
                break;
            }
        }
        if all {
            tokenizer_ok = true;
            break;
        }
    }
    if !tokenizer_ok {
        return Err(hub_error(spec, &format!("no tokenizer files ({})", errors.join("; "))));
    }
    errors.clear();
    let mut weights_ok = false;
    for file in WEIGHT_CHOICES {
        match fetch(&repo, spec, file, stall).await {
            Ok(_) => {
                weights_ok = true;
                break;
            }
            Err(e) => errors.push(e),
        }
    }
    if !weights_ok {
        return Err(hub_error(spec, &format!("no weights ({})", errors.join("; "))));
    }
    config.parent().map(Path::to_path_buf).ok_or_else(|| hub_error(spec, "bad cache path"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_hub_offline_zero_and_false_mean_online() {
        for on in ["1", "true", "TRUE", "yes", "on"] {
            assert!(offline_asked(Some(on)), "{on}");
        }
        for off in ["0", "false", "False", "no", "off", ""] {
            assert!(!offline_asked(Some(off)), "{off}");
        }
        assert!(!offline_asked(None));
    }

    /// Issue #16 point 3: the logged numbers (the timer that logs them
    /// is covered end to end by
    /// `daemon::a_first_run_download_logs_progress_answers_loading_and_stops_on_sigterm`).
    #[test]
    fn download_progress_tells_bytes_percent_and_speed() {
        let t0 = Instant::now();
        let mut p = DownloadProgress::new(1000, t0);
        p.advance(200);
        p.advance(133);
        let line = p.line(t0 + Duration::from_secs(2));
        assert_eq!((line.bytes, line.total, line.percent), (333, 1000, 33.3));
        assert!((line.mib_per_s - 333.0 / 2.0 / 1048576.0).abs() < 1e-9, "{line:?}");
        p.advance(667);
        assert_eq!(p.line(t0 + Duration::from_secs(4)).percent, 100.0);
        // An empty file is done.
        assert_eq!(DownloadProgress::new(0, t0).line(t0).percent, 100.0);
    }

    #[test]
    fn the_download_timeout_reads_like_huggingface_hubs() {
        assert_eq!(download_timeout(None), Ok(Duration::from_secs(10)));
        assert_eq!(download_timeout(Some("2.5")), Ok(Duration::from_millis(2500)));
        assert_eq!(download_timeout(Some(" 600 ")), Ok(Duration::from_secs(600)));
        for bad in ["0", "-1", "ten", "", "inf", "NaN"] {
            let e = download_timeout(Some(bad)).unwrap_err();
            assert!(e.contains("HF_HUB_DOWNLOAD_TIMEOUT"), "{bad}: {e}");
        }
    }

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(is_hub_id("microsoft/DialoGPT-medium"));
        assert!(is_hub_id("some_user/my.model-v2"));
        assert!(!is_hub_id("./models/x"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("../x"));
        assert!(!is_hub_id("plainname"));
    }
}
