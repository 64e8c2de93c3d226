//! `[model]`: the checkpoint served and how it runs.

use serde::{Deserialize, Serialize};

use super::{invalid, SettingsError};

/// `[model]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub path: String,
    pub device: String,
    pub dtype: String,
    pub quantize: String,
    pub kv_cache: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSettings {
    pub path: String,
    pub device: String,
    pub dtype: String,
    /// `auto`, `none` or `q8` (see [`crate::model::Quantize`]).
    pub quantize: String,
    /// `auto`, `f32` or `f16`.
    pub kv_cache: String,
}

impl RawModel {
    pub(super) fn validate(self) -> Result<ModelSettings, SettingsError> {
        let m = self;
        if m.path.trim().is_empty() {
            return Err(invalid("model.path", "must name a checkpoint folder or hub id"));
        }
        crate::serving::device(&m.device).map_err(|e| invalid("model.device", e.to_string()))?;
        if !["auto", "f32", "f16", "bf16"].contains(&m.dtype.as_str()) {
            return Err(invalid("model.dtype", format!("{:?} is not one of auto, f32, f16, bf16", m.dtype)));
        }
        if !["auto", "none", "q8"].contains(&m.quantize.as_str()) {
            return Err(invalid("model.quantize", format!("{:?} is not auto, none or q8", m.quantize)));
        }
        if m.quantize == "q8" && (m.device != "cpu" || !["auto", "f32"].contains(&m.dtype.as_str())) {
            return Err(invalid("model.quantize", "q8 (8-bit weights) is a CPU option for f32 models: set model.device = \"cpu\" and model.dtype = \"auto\" or \"f32\""));
        }
        if !["auto", "f32", "f16", "q8"].contains(&m.kv_cache.as_str()) {
            return Err(invalid("model.kv_cache", format!("{:?} is not one of auto, f32, f16, q8", m.kv_cache)));
        }
        Ok(ModelSettings { path: m.path, device: m.device, dtype: m.dtype, quantize: m.quantize, kv_cache: m.kv_cache })
    }
}
