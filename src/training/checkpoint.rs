//! What a training job writes: the Hugging Face checkpoint folder (or PEFT
//! adapter), and the resumable state under `OUT/checkpoints/`.
//!
//! A full checkpoint is what `GPT2LMHeadModel.save_pretrained` writes:
//! `config.json`, `model.safetensors` with `transformer.`-prefixed names
//! (the tied head is not stored), `generation_config.json`, and the
//! tokenizer as `vocab.json` + `merges.txt` (taken from the base, or
//! extracted from its `tokenizer.json`; that file is copied too when the
//! base has one).
//!
//! Resumable state: `OUT/checkpoints/step-NNNNNNNN/` holds `state.json`
//! (step, the run's fingerprint) and `state.safetensors` (trainable
//! parameters as `param.NAME`, AdamW moments as `m.NAME` / `v.NAME`). A
//! folder is written as `….partial` and renamed when complete, so a run
//! killed mid-write leaves the previous checkpoint usable; older ones are
//! removed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::model::TrainableGpt2;
use super::optim::AdamW;
use super::{file_error, Result, TrainingError};

/// Writes a full checkpoint folder for `weights` (canonical naming), with
/// the config, generation config and tokenizer of `base_dir`.
pub fn save_hf_checkpoint(out: &Path, weights: &BTreeMap<String, Tensor>, base_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| file_error(out, e))?;
    let tensors: HashMap<String, Tensor> = weights
        .iter()
        .map(|(name, t)| Ok((format!("transformer.{name}"), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let path = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| file_error(&path, e))?;
    // The metadata save_pretrained writes ({"format": "pt"}) is optional for
    // transformers; candle writes none.
    write_config(out, base_dir)?;
    write_generation_config(out, base_dir)?;
    copy_tokenizer(out, base_dir)?;
    Ok(())
}

fn write_config(out: &Path, base_dir: &Path) -> Result<()> {
    let from = base_dir.join("config.json");
    let text = std::fs::read_to_string(&from).map_err(|e| file_error(&from, e))?;
    let mut config: serde_json::Value = serde_json::from_str(&text).map_err(|e| file_error(&from, e))?;
    if let Some(obj) = config.as_object_mut() {
        obj.insert("architectures".into(), serde_json::json!(["GPT2LMHeadModel"]));
        obj.insert("model_type".into(), serde_json::json!("gpt2"));
        obj.entry("tie_word_embeddings").or_insert(serde_json::json!(true));
    }
    let path = out.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap_or_default()).map_err(|e| file_error(&path, e))
}

fn write_generation_config(out: &Path, base_dir: &Path) -> Result<()> {
    let from = base_dir.join("generation_config.json");
    let path = out.join("generation_config.json");
    if from.is_file() {
        std::fs::copy(&from, &path).map_err(|e| file_error(&from, e))?;
        return Ok(());
    }
    let config = crate::model::gpt2::read_config(base_dir)?;
    let json = serde_json::json!({
        "_from_model_config": true,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap_or_default()).map_err(|e| file_error(&path, e))
}

fn copy_tokenizer(out: &Path, base_dir: &Path) -> Result<()> {
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        let from = base_dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, out.join(name)).map_err(|e| file_error(&from, e))?;
        }
    }
    let (vocab, merges) = (base_dir.join("vocab.json"), base_dir.join("merges.txt"));
    if vocab.is_file() && merges.is_file() {
        std::fs::copy(&vocab, out.join("vocab.json")).map_err(|e| file_error(&vocab, e))?;
        std::fs::copy(&merges, out.join("merges.txt")).map_err(|e| file_error(&merges, e))?;
        return Ok(());
    }
    let json_path = base_dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&json_path).map_err(|e| file_error(&json_path, e))?;
    let (vocab_json, merges_txt) = vocab_and_merges(&text).map_err(|m| file_error(&json_path, m))?;
    std::fs::write(out.join("vocab.json"), vocab_json).map_err(|e| file_error(&out.join("vocab.json"), e))?;
    std::fs::write(out.join("merges.txt"), merges_txt).map_err(|e| file_error(&out.join("merges.txt"), e))?;
    Ok(())
}

/// `vocab.json` and `merges.txt` contents from a BPE `tokenizer.json`
/// (merges as `"a b"` strings or `["a", "b"]` pairs).
fn vocab_and_merges(tokenizer_json: &str) -> std::result::Result<(String, String), String> {
    let json: serde_json::Value = serde_json::from_str(tokenizer_json).map_err(|e| format!("not JSON: {e}"))?;
    let model = &json["model"];
    let vocab = model["vocab"].as_object().ok_or("no BPE `model.vocab`")?;
    let merges = model["merges"].as_array().ok_or("no BPE `model.merges`")?;
    let mut text = String::from("#version: 0.2\n");
    for merge in merges {
        match merge {
            serde_json::Value::String(s) => text.push_str(s),
            serde_json::Value::Array(pair) if pair.len() == 2 => {
                text.push_str(pair[0].as_str().unwrap_or_default());
                text.push(' ');
                text.push_str(pair[1].as_str().unwrap_or_default());
            }
            _ => return Err("a merge is neither a string nor a pair".into()),
        }
        text.push('\n');
    }
    Ok((serde_json::to_string(vocab).map_err(|e| e.to_string())?, text))
}

/// `state.json` of a resumable checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeState {
    /// Optimizer steps taken.
    pub step: usize,
    /// What the run was (base, data, settings); resuming a different run is
    /// refused.
    pub fingerprint: String,
    /// Training loss of the last step, for the log.
    pub last_loss: f64,
    /// Input tokens trained on so far.
    pub tokens_seen: u64,
}

/// Writes the trainable parameters and optimizer state after `state.step`
/// steps, then removes older checkpoints.
pub fn save_state(out: &Path, model: &TrainableGpt2, optimizer: &AdamW, state: &ResumeState) -> Result<PathBuf> {
    let root = out.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(|e| file_error(&root, e))?;
    let name = format!("step-{:08}", state.step);
    let partial = root.join(format!("{name}.partial"));
    let final_dir = root.join(&name);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| file_error(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| file_error(&partial, e))?;
    let mut tensors = optimizer.state_tensors()?;
    for param in model.trainable() {
        tensors.insert(format!("param.{}", param.name), param.var.as_tensor().detach().to_device(&Device::Cpu)?);
    }
    let tensors: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    let path = partial.join("state.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| file_error(&path, e))?;
    let path = partial.join("state.json");
    std::fs::write(&path, serde_json::to_string_pretty(state).unwrap_or_default()).map_err(|e| file_error(&path, e))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| file_error(&final_dir, e))?;
    }
    std::fs::rename(&partial, &final_dir).map_err(|e| file_error(&final_dir, e))?;
    for old in checkpoint_dirs(&root)? {
        if old != final_dir {
            let _ = std::fs::remove_dir_all(&old);
        }
    }
    Ok(final_dir)
}

/// Completed checkpoint folders under `root`, oldest first.
fn checkpoint_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    if !root.is_dir() {
        return Ok(dirs);
    }
    for entry in std::fs::read_dir(root).map_err(|e| file_error(root, e))? {
        let path = entry.map_err(|e| file_error(root, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("step-") && !name.ends_with(".partial") && path.join("state.json").is_file() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// The newest completed checkpoint of a run writing to `out`, if any.
pub fn latest_state(out: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoint_dirs(&out.join("checkpoints"))?.pop())
}

/// Reads a checkpoint folder: its state and tensors.
pub fn load_state(dir: &Path) -> Result<(ResumeState, HashMap<String, Tensor>)> {
    let bad = |message: String| TrainingError::Resume { path: dir.to_path_buf(), message };
    let text = std::fs::read_to_string(dir.join("state.json")).map_err(|e| bad(format!("state.json: {e}")))?;
    let state: ResumeState = serde_json::from_str(&text).map_err(|e| bad(format!("state.json: {e}")))?;
    let tensors = candle_core::safetensors::load(dir.join("state.safetensors"), &Device::Cpu)
        .map_err(|e| bad(format!("state.safetensors: {e}")))?;
    Ok((state, tensors))
}

/// Sets the model's trainable parameters from a checkpoint's tensors.
pub fn restore_params(model: &TrainableGpt2, tensors: &HashMap<String, Tensor>) -> Result<()> {
    for param in model.trainable() {
        let key = format!("param.{}", param.name);
        let t = tensors.get(&key).ok_or_else(|| TrainingError::Settings(format!("checkpoint lacks `{key}`")))?;
        if t.dims() != param.var.dims() {
            return Err(TrainingError::Settings(format!("checkpoint `{key}` has shape {:?}, expected {:?}", t.dims(), param.var.dims())));
        }
        param.var.set(&t.to_device(param.var.device())?)?;
    }
    Ok(())
}
