//! The model runtime: GPT-2 (DialoGPT) in candle, its checkpoints, and where
//! they come from.
//!
//! - [`config`]: `config.json` as Hugging Face writes it.
//! - [`weights`]: reading `model.safetensors` / `pytorch_model.bin` / the
//!   original legacy `.pkl` files into named, shape-checked tensors, with
//!   every naming variant the published checkpoints use.
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
pub use gpt2::{Gpt2, KvCache, KvPrecision};
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
    #[error("no weights in {0}: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or one .pkl, .pt or .pth file")]
    NoWeights(PathBuf),
    /// A weights file that is a Git LFS pointer (a clone made without
    /// git-lfs): `dir` is the folder to run `git lfs pull` in.
    #[error("{}: a Git LFS pointer ({size} bytes), not the weights: the folder was cloned without git-lfs. \
             Install git-lfs, then run `git lfs install && git lfs pull` in {} (or give the hub id, e.g. \
             microsoft/DialoGPT-small, instead of the folder)", path.display(), dir.display())]
    LfsPointer { path: PathBuf, dir: PathBuf, size: u64 },
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
    Device::new_cuda(ordinal).map_err(|e| ModelError::Device(cuda_open_error(spec, &e.to_string())))
}

/// One line for a CUDA device that would not open: candle's message
/// without the backtrace it may carry, and what the usual driver errors
/// mean.
fn cuda_open_error(spec: &str, error: &str) -> String {
    let first = error.lines().next().unwrap_or("").trim();
    let hint = if first.contains("CUDA_ERROR_STUB_LIBRARY") {
        " (libcuda.so.1 is the build's stand-in, not the NVIDIA driver's: no GPU driver on this machine)"
    } else if first.contains("CUDA_ERROR_NO_DEVICE") || first.contains("CUDA_ERROR_INVALID_DEVICE") {
        " (no such CUDA GPU on this machine)"
    } else {
        ""
    };
    format!("cannot open {spec}: {first}{hint}")
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

/// Which projection and head weights a model is served with (the settings
/// key `model.quantize`, the flag `--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// As loaded: exactly transformers' numbers.
    None,
    /// 8-bit weights (one scale per 32 values); an error where they do not
    /// fit (a GPU, a dtype other than f32, widths not multiples of 32).
    Q8,
    /// 8-bit where they fit, as loaded elsewhere: q8 on the CPU for f32
    /// DialoGPT checkpoints, none on a GPU. The default.
    #[default]
    Auto,
}

impl Quantize {
    /// `none` (or `f32`), `q8` or `auto`; the error lists them.
    pub fn parse(spec: &str) -> Result<Self, String> {
        match spec {
            "none" | "f32" => Ok(Self::None),
            "q8" => Ok(Self::Q8),
            "auto" => Ok(Self::Auto),
            other => Err(format!("quantize: {other:?} is not auto, none or q8")),
        }
    }
}

/// How a loaded model is served: its projection weights and what its
/// per-sequence caches hold. The settings keys `model.quantize` and
/// `model.kv_cache` and the flags `--quantize` and `--kv-cache` name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServingOptions {
    /// 8-bit projection and head weights (CPU, f32 models), always, never
    /// or where they fit.
    pub quantize: Quantize,
    /// The cache's precision; `None` is `auto`: f16 where the model keeps
    /// host caches (CPU, f32 or 8-bit), the model's own dtype on a GPU.
    pub kv_cache: Option<KvPrecision>,
}

impl ServingOptions {
    /// `quantize`: `auto`, `none` or `q8`; `kv_cache`: `auto`, `f32` or
    /// `f16`. The error says which value is wrong.
    pub fn parse(quantize: &str, kv_cache: &str) -> Result<Self, String> {
        let quantize = Quantize::parse(quantize)?;
        let kv_cache = match kv_cache {
            "auto" => None,
            other => Some(KvPrecision::parse(other).map_err(|e| format!("kv_cache: {e} or auto"))?),
        };
        Ok(Self { quantize, kv_cache })
    }

    /// Loads a checkpoint folder served with these options (8-bit weights
    /// are quantised as they are read, see [`Gpt2::load_q8`] and
    /// [`Gpt2::load_auto_q8`]).
    pub fn load(self, dir: &std::path::Path, dtype: DType, device: &Device) -> Result<Gpt2, ModelError> {
        let model = match self.quantize {
            Quantize::None => Gpt2::load(dir, dtype, device)?,
            Quantize::Q8 if dtype != DType::F32 => {
                return Err(ModelError::Input(format!("8-bit weights are made from f32 weights, not {dtype:?}")));
            }
            Quantize::Q8 => Gpt2::load_q8(dir, device)?,
            Quantize::Auto => Gpt2::load_auto_q8(dir, dtype, device)?,
        };
        Self { quantize: Quantize::None, ..self }.apply(model)
    }

    /// Applies the options to a loaded model.
    pub fn apply(self, model: Gpt2) -> Result<Gpt2, ModelError> {
        let model = match self.quantize {
            Quantize::Q8 if !model.is_quantized() => model.quantize_q8()?,
            Quantize::Auto if model.fits_q8() => model.quantize_q8()?,
            _ => model,
        };
        match self.kv_cache {
            Some(kv) => model.with_kv_precision(kv),
            None if model.device().is_cpu() && (model.dtype() == DType::F32 || model.is_quantized()) => model.with_kv_precision(KvPrecision::F16),
            None => Ok(model),
        }
    }
}

#[cfg(test)]
mod serving_tests {
    use super::*;

    #[test]
    fn options_parse_and_apply() {
        assert_eq!(ServingOptions::parse("auto", "auto").unwrap(), ServingOptions::default());
        assert_eq!(ServingOptions::parse("none", "auto").unwrap().quantize, Quantize::None);
        let q8 = ServingOptions::parse("q8", "f32").unwrap();
        assert!(q8.quantize == Quantize::Q8 && q8.kv_cache == Some(KvPrecision::F32));
        assert!(ServingOptions::parse("q4", "auto").unwrap_err().contains("quantize"));
        assert!(ServingOptions::parse("none", "bf16").unwrap_err().contains("kv_cache"));
        assert_eq!(ServingOptions::parse("q8", "q8").unwrap().kv_cache, Some(KvPrecision::Q8));

        let cfg = Gpt2Config::with_shape(64, 2, 4);
        let load = |dtype: DType| {
            let tensors = synthetic::synthetic_tensors(&cfg, 1, &synthetic::default_init()).unwrap();
            let tensors = tensors.into_iter().map(|(n, t)| (n, t.to_dtype(dtype).unwrap())).collect();
            let mut store = weights::TensorStore::from_tensors("synthetic", tensors);
            Gpt2::from_store(cfg.clone(), &mut store, &Device::Cpu).unwrap()
        };
        let model = load(DType::F32);
        let auto = ServingOptions::default().apply(model.clone()).unwrap();
        assert_eq!(auto.kv_precision(), KvPrecision::F16, "auto is f16 on the CPU");
        assert!(auto.is_quantized(), "auto is 8-bit for an f32 model on the CPU");
        let exact = ServingOptions::parse("none", "f32").unwrap().apply(model.clone()).unwrap();
        assert_eq!(exact.kv_precision(), KvPrecision::F32);
        assert!(!exact.is_quantized());
        let both = q8.apply(model).unwrap();
        assert!(both.is_quantized() && both.kv_precision() == KvPrecision::F32);
        // A half-precision model caches in its own dtype.
        let f16_model = load(DType::F16);
        let f16_auto = ServingOptions::default().apply(f16_model.clone()).unwrap();
        assert_eq!(f16_auto.kv_precision(), KvPrecision::F32);
        assert!(!f16_auto.is_quantized(), "auto leaves a model 8-bit weights do not fit as it is");
        assert!(ServingOptions::parse("q8", "auto").unwrap().apply(f16_model.clone()).is_err(), "q8 insists");
        let err = ServingOptions::parse("none", "f16").unwrap().apply(f16_model).unwrap_err().to_string();
        assert!(err.contains("CPU option"), "{err}");
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

    /// What a CUDA build says where there is no driver (the stand-in
    /// libcuda) or no GPU: one line, no backtrace, the cause named.
    #[test]
    fn cuda_open_errors_are_one_line() {
        let stub = "DriverError(CUDA_ERROR_STUB_LIBRARY, \"<Failure when calling cuGetErrorString()>\")\n   0: <unknown>\n   1: <unknown>";
        let msg = cuda_open_error("cuda", stub);
        assert_eq!(msg.lines().count(), 1, "{msg}");
        assert!(msg.starts_with("cannot open cuda: DriverError(CUDA_ERROR_STUB_LIBRARY"), "{msg}");
        assert!(msg.contains("no GPU driver"), "{msg}");
        assert!(cuda_open_error("cuda:3", "DriverError(CUDA_ERROR_INVALID_DEVICE, \"x\")").contains("no such CUDA GPU"));
    }
}
