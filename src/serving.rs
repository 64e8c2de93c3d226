//! Model serving: the one way a checkpoint becomes a model ready to serve.
//!
//! A [`ModelSpec`] names a checkpoint (a folder or a hub id) and how to run
//! it (device, dtype, `quantize`, `kv_cache`, as the `[model]` settings and
//! the `--model/--device/--dtype/--quantize/--kv-cache` flags spell them).
//! [`load`] resolves, loads and checks it with its tokenizer; the command
//! line, the daemon, promotion of a new base model and the jobs' gate all
//! load through it, so a model is served the same way wherever it is
//! loaded. [`device`] hands out one candle [`Device`] per device string for
//! the whole process: every model, ranker and adapter on `cuda:N` shares it
//! (a second `Device::new_cuda` would be a second context, and tensors
//! would travel between them through the host).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use candle_core::Device;

use crate::model::{self, Gpt2, ModelError, ServingOptions};
use crate::tokenizer::{DialogTokenizer, TokenizerError};

/// Why a model could not be loaded for serving.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A `quantize` or `kv_cache` value that is not one (names the key).
    #[error("bad model options: {0}")]
    Options(String),
    /// The tokenizer and the model disagree on the vocabulary.
    #[error(
        "{dir}: tokenizer ({tokenizer_ids} ids, end-of-text {tokenizer_eos}) does not fit the model ({model_ids} ids, end-of-text {model_eos})"
    )]
    Mismatch { dir: PathBuf, tokenizer_ids: usize, tokenizer_eos: u32, model_ids: usize, model_eos: u32 },
}

/// What to serve and how: the `[model]` settings, or the model flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// A checkpoint folder, or a hub id such as `microsoft/DialoGPT-medium`.
    pub model: String,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `auto`, `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// `auto`, `none` or `q8`.
    pub quantize: String,
    /// `auto`, `f32`, `f16` or `q8`.
    pub kv_cache: String,
}

impl ModelSpec {
    /// The same options for another checkpoint (a promoted base model is
    /// served as the original was).
    pub fn with_model(&self, model: impl Into<String>) -> Self {
        Self { model: model.into(), ..self.clone() }
    }

    /// The device, shared process-wide (see [`device`]).
    pub fn device(&self) -> Result<Device, ModelError> {
        device(&self.device)
    }

    /// The dtype on this spec's device.
    pub fn dtype(&self) -> Result<candle_core::DType, ModelError> {
        model::parse_dtype(&self.dtype, &self.device()?)
    }

    /// `quantize` and `kv_cache`, parsed.
    pub fn options(&self) -> Result<ServingOptions, ServingError> {
        ServingOptions::parse(&self.quantize, &self.kv_cache).map_err(ServingError::Options)
    }
}

/// A loaded model, its tokenizer and the local folder they came from.
pub struct Loaded {
    pub model: Gpt2,
    pub tokenizer: DialogTokenizer,
    pub dir: PathBuf,
}

/// The process's device for `spec` (`cpu`, `cuda`, `cuda:N`): opened once,
/// then shared. `cuda` and `cuda:0` are the same device.
///
/// Errors: a spec that is not a device, a build without CUDA, a device
/// that cannot be opened (the message names it).
pub fn device(spec: &str) -> Result<Device, ModelError> {
    static DEVICES: OnceLock<Mutex<HashMap<String, Device>>> = OnceLock::new();
    let key = spec.trim().to_ascii_lowercase();
    let key = if key == "cuda" { "cuda:0".to_string() } else { key };
    if key == "cpu" {
        return Ok(Device::Cpu);
    }
    let devices = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
    // Held while opening, so two threads asking at once get one device.
    let mut devices = devices.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(device) = devices.get(&key) {
        return Ok(device.clone());
    }
    let device = model::parse_device(&key)?;
    devices.insert(key, device.clone());
    Ok(device)
}

/// Resolves `spec.model` (downloading a hub id), loads the weights with
/// the spec's options on its device, loads the tokenizer beside them and
/// checks that the two fit.
pub fn load(spec: &ModelSpec) -> Result<Loaded, ServingError> {
    // Options first: a typo fails before a download.
    let options = spec.options()?;
    let device = spec.device()?;
    let dtype = model::parse_dtype(&spec.dtype, &device)?;
    let dir = model::hub::resolve_model(&spec.model)?;
    let tokenizer = DialogTokenizer::from_dir(&dir)?;
    let model = options.load(&dir, dtype, &device)?;
    check_fit(&dir, &model, &tokenizer)?;
    // What `quantize = "auto"` and `kv_cache = "auto"` came to.
    let weights = if model.is_quantized() { "q8" } else { "as loaded" };
    tracing::info!(quantize = %spec.quantize, weights, kv_cache = model.kv_precision().as_str(), "model ready to serve");
    Ok(Loaded { model, tokenizer, dir })
}

/// What a daemon that generates elsewhere (`backend = "redis"`) needs of
/// the model: its tokenizer and its config (context size), without the
/// weights. Resolves `spec.model` like [`load`] (a hub id downloads only
/// what it finds missing, weights included, as the hub client fetches the
/// whole checkpoint).
pub fn load_front(spec: &ModelSpec) -> Result<(DialogTokenizer, model::Gpt2Config), ServingError> {
    let dir = model::hub::resolve_model(&spec.model)?;
    let dir = if dir.is_file() { dir.parent().map(Path::to_path_buf).unwrap_or_default() } else { dir };
    let tokenizer = DialogTokenizer::from_dir(&dir)?;
    let text = std::fs::read_to_string(dir.join("config.json"))
        .map_err(|e| ModelError::Config(format!("{}: {e}", dir.join("config.json").display())))?;
    let config = model::Gpt2Config::from_json(&text)?;
    if tokenizer.eos_id() != config.eos_token_id || tokenizer.vocab_size() > config.vocab_size {
        return Err(ServingError::Options(format!(
            "{}: the tokenizer does not fit the model's config.json",
            dir.display()
        )));
    }
    Ok((tokenizer, config))
}

/// Loads the checkpoint in `dir` (a local folder, e.g. a job's output)
/// with `spec`'s options, without its tokenizer (the served one stays).
pub fn load_weights(spec: &ModelSpec, dir: &Path) -> Result<Gpt2, ServingError> {
    let options = spec.options()?;
    let device = spec.device()?;
    let dtype = model::parse_dtype(&spec.dtype, &device)?;
    Ok(options.load(dir, dtype, &device)?)
}

/// Where job `id`'s output lives under `artifacts_dir` (`jobs.artifacts_dir`):
/// `{artifacts_dir}/job-{id}/output`. The daemon's job runner writes there
/// and every host serving a promoted base model loads from there.
pub fn job_output(artifacts_dir: &Path, id: u64) -> PathBuf {
    artifacts_dir.join(format!("job-{id}")).join("output")
}

/// Checks that `artifacts_dir` is a folder this process can use: made if
/// missing and written to (a file created and removed) when `write`,
/// else it must exist and be listable.
///
/// Errors: the I/O error (missing, not a folder, permission, read-only).
pub fn check_artifacts_dir(artifacts_dir: &Path, write: bool) -> std::io::Result<()> {
    if write {
        std::fs::create_dir_all(artifacts_dir)?;
        let probe = artifacts_dir.join(format!(".dialogd-write-check-{}", std::process::id()));
        std::fs::write(&probe, b"")?;
        return std::fs::remove_file(&probe);
    }
    std::fs::read_dir(artifacts_dir).map(drop)
}

fn check_fit(dir: &Path, model: &Gpt2, tokenizer: &DialogTokenizer) -> Result<(), ServingError> {
    let cfg = model.config();
    if tokenizer.eos_id() != cfg.eos_token_id || tokenizer.vocab_size() > cfg.vocab_size {
        return Err(ServingError::Mismatch {
            dir: dir.to_path_buf(),
            tokenizer_ids: tokenizer.vocab_size(),
            tokenizer_eos: tokenizer.eos_id(),
            model_ids: cfg.vocab_size,
            model_eos: cfg.eos_token_id,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_shared_and_bad_specs_refused() {
        assert!(device("cpu").unwrap().is_cpu());
        assert!(device(" CPU ").unwrap().is_cpu());
        assert!(device("tpu").unwrap_err().to_string().contains("not a device"));
        #[cfg(not(feature = "cuda"))]
        assert!(device("cuda").unwrap_err().to_string().contains("--features cuda"));
    }

    #[test]
    fn options_fail_before_anything_is_read() {
        let spec = ModelSpec {
            model: "/nonexistent/folder".into(),
            device: "cpu".into(),
            dtype: "auto".into(),
            quantize: "q4".into(),
            kv_cache: "auto".into(),
        };
        let err = load(&spec).err().unwrap();
        assert!(matches!(err, ServingError::Options(_)), "{err}");
        assert!(err.to_string().contains("quantize"), "{err}");
    }
}
