//! The model runtime: GPT-2 (DialoGPT) in candle, its checkpoints, and where
//! they come from.
//!
//! - [`config`]: `config.json` as Hugging Face writes it.
//! - [`weights`]: reading `model.safetensors` / `pytorch_model.bin` into named,
//!   shape-checked tensors, with every naming variant the published
//!   checkpoints use.
//! - [`gpt2`]: the network itself, with a KV cache.
//! - [`lora`]: persona adapters applied per sequence at run time.
//! - [`hub`]: a `--model` argument (local folder or hub id) to a local folder.
//! - [`synthetic`]: deterministic random weights for tests and benchmarks.

pub mod config;
pub mod gpt2;
pub mod hub;
pub mod kernels;
pub mod lora;
pub mod synthetic;
pub mod weights;

use std::path::PathBuf;

use candle_core::{DType, Device};

pub use config::{Gpt2Config, EOS_TOKEN_ID};
pub use gpt2::{Gpt2, KvCache};
pub use lora::LoraRuntime;

/// Everything that can go wrong while finding, reading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model folder {0} does not exist (pass a folder with config.json and model.safetensors or pytorch_model.bin, or a hub id such as microsoft/DialoGPT-medium)")]
    MissingFolder(PathBuf),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid GPT-2 config: {0}")]
    Config(String),
    #[error("{file}: tensor `{tensor}`: {message}")]
    Tensor { file: PathBuf, tensor: String, message: String },
    #[error("no weights in {0}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin")]
    NoWeights(PathBuf),
    #[error("{0}")]
    Hub(String),
    #[error("device: {0}")]
    Device(String),
    #[error("input: {0}")]
    Input(String),
    /// A LoRA adapter that does not fit the model; the message names the
    /// tensor or the shape that differs.
    #[error("LoRA adapter: {0}")]
    Adapter(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = if spec.eq_ignore_ascii_case("cuda") {
        Some(0)
    } else {
        spec.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok())
    };
    let Some(ordinal) = ordinal else {
        return Err(ModelError::Device(format!("`{spec}` is not a device: use cpu, cuda or cuda:N")));
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(ModelError::Device(format!(
            "`{spec}` asked for, but this dialogd was built without CUDA support (rebuild with `--features cuda`)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| ModelError::Device(format!("cannot open {spec}: {e}")))
}

/// Parses `f32`, `f16` or `bf16`; `auto` is f32 on CPU and bf16 on a GPU.
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType, ModelError> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(if device.is_cpu() { DType::F32 } else { DType::BF16 }),
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(ModelError::Device(format!("`{other}` is not a dtype: use auto, f32, f16 or bf16"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("tpu").unwrap_err().to_string().contains("not a device"));
        assert_eq!(parse_dtype("auto", &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(parse_dtype("bf16", &Device::Cpu).unwrap(), DType::BF16);
        assert!(parse_dtype("int3", &Device::Cpu).is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(parse_device("cuda:0").unwrap_err().to_string().contains("--features cuda"));
    }
}
