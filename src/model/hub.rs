//! Turning a `--model` argument into a local checkpoint folder.
//!
//! A path that exists is used as it is. Anything shaped like a hub id
//! (`microsoft/DialoGPT-medium`) is looked up in the standard Hugging Face
//! cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`) and, when a
//! file is missing there and `HF_HUB_OFFLINE` is not set, downloaded into it
//! with a progress bar. `HF_ENDPOINT` picks another hub server.

use std::path::{Path, PathBuf};

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

async fn download(spec: &str, tokenizers: &[&[&str]]) -> Result<PathBuf, ModelError> {
    let api = hf_hub::api::tokio::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| hub_error(spec, &e.to_string()))?;
    let repo = api.model(spec.to_string());
    let config = repo.get("config.json").await.map_err(|e| hub_error(spec, &e.to_string()))?;
    let mut tokenizer_ok = false;
    let mut last_error = String::new();
    for files in tokenizers {
        let mut all = true;
        for file in *files {
            if let Err(e) = repo.get(file).await {
                last_error = format!("{file}: {e}");
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
        return Err(hub_error(spec, &format!("no tokenizer files ({last_error})")));
    }
    let mut weights_ok = false;
    for file in WEIGHT_CHOICES {
        match repo.get(file).await {
            Ok(_) => {
                weights_ok = true;
                break;
            }
            Err(e) => last_error = format!("{file}: {e}"),
        }
    }
    if !weights_ok {
        return Err(hub_error(spec, &format!("no weights ({last_error})")));
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
