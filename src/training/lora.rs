//! LoRA persona adapters: settings, PEFT's layout on disk, and serving an
//! adapter, at run time over a shared base model ([`LoraAdapter::runtime`],
//! [`load_runtime`]: a [`LoraRuntime`] for the pool) or merged into a copy of
//! the base weights ([`load_persona`]).
//!
//! On disk an adapter is what PEFT's `save_pretrained` writes for a GPT-2:
//! `adapter_config.json` (`peft_type: LORA`, `r`, `lora_alpha`,
//! `target_modules: [c_attn, c_proj, c_fc]`, `fan_in_fan_out: true` because
//! GPT-2's projections are `Conv1D`s with `[in, out]` weights) and
//! `adapter_model.safetensors` with keys such as
//! `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight` (`[r, in]`)
//! and `…lora_B.weight` (`[out, r]`). The update to a `Conv1D` weight is
//! `(B·A)ᵀ · alpha / r`.
//!
//! Reading an adapter, every `adapter_config.json` field PEFT reads is
//! either honoured with PEFT's numbers or refused by name:
//!
//! - honoured: `r`, `lora_alpha`, `use_rslora` (`alpha / √r`),
//!   `rank_pattern` / `alpha_pattern` (per projection, PEFT's
//!   `(.*\.)?(key)$` match on the module name, first key in file order);
//! - no effect on the numbers, accepted: `target_modules` (a list, a regex
//!   string or `all-linear`), `layers_to_transform`, `layers_pattern`,
//!   `exclude_modules` (the saved tensors say what was adapted, and PEFT
//!   loads exactly those), `lora_dropout` (off at inference),
//!   `fan_in_fan_out` (PEFT sets it to true for GPT-2's `Conv1D`s whatever
//!   the file says), `init_lora_weights` `true`, `false`, `"gaussian"`,
//!   `"orthogonal"` (how training started);
//! - refused: `use_dora`, `bias` other than `"none"`, `modules_to_save`,
//!   `lora_bias`, `layer_replication`, `trainable_token_indices`, and
//!   `init_lora_weights` that rewrites the base model (`pissa…`, `olora`,
//!   `corda`, `eva`, `loftq`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::model::{load_weights, lora_delta, lora_prefixes, TrainableGpt2};
pub use super::model::LoraSettings;
use super::{file_error, Result, TrainingError};
use crate::model::gpt2::Gpt2;
use crate::model::lora::LoraRuntime;
use crate::model::weights::TensorStore;
use crate::model::{Gpt2Config, ModelError};

pub use crate::model::lora::LORA_TARGETS;

/// PEFT's key prefix for a causal LM's weights.
const PEFT_PREFIX: &str = "base_model.model.transformer.";

/// `adapter_config.json`, with the fields PEFT needs to load it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AdapterConfig {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: serde_json::Value,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default = "default_bias")]
    bias: String,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default = "default_true")]
    init_lora_weights: serde_json::Value,
    /// Per-projection rank and alpha, keys in file order.
    #[serde(default, skip_serializing_if = "Pattern::is_empty")]
    rank_pattern: Pattern,
    #[serde(default, skip_serializing_if = "Pattern::is_empty")]
    alpha_pattern: Pattern,
    #[serde(default, skip_serializing)]
    lora_bias: bool,
    #[serde(default, skip_serializing)]
    layer_replication: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    trainable_token_indices: Option<serde_json::Value>,
}

/// PEFT's `rank_pattern` / `alpha_pattern`: regex keys (matched as
/// `(.*\.)?(key)$` against the module name) and numbers, in file order (the
/// first key that matches wins, as in PEFT).
#[derive(Debug, Clone, Default, PartialEq)]
struct Pattern(Vec<(String, f64)>);

impl Pattern {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value for module `name` (`transformer.h.0.mlp.c_fc`), if a key
    /// matches; a key that is not a regex is an error naming `field`.
    fn lookup(&self, field: &str, name: &str) -> std::result::Result<Option<f64>, String> {
        for (key, value) in &self.0 {
            let re = regex::Regex::new(&format!("^(?:.*\\.)?(?:{key})$")).map_err(|e| format!("{field} key {key:?}: {e}"))?;
            if re.is_match(name) {
                return Ok(Some(*value));
            }
        }
        Ok(None)
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Pattern;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map from module-name patterns to numbers")
            }
            fn visit_unit<E>(self) -> std::result::Result<Pattern, E> {
                Ok(Pattern::default())
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> std::result::Result<Pattern, M::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, f64>()? {
                    entries.push((k, v));
                }
                Ok(Pattern(entries))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

impl AdapterConfig {
    /// Why PEFT would load this adapter with numbers dialogd does not
    /// produce, naming the field; `None` when it can be served.
    fn refused(&self) -> Option<String> {
        if self.peft_type != "LORA" {
            return Some(format!("peft_type is {:?}, only LORA is supported", self.peft_type));
        }
        if self.use_dora {
            return Some("use_dora = true (DoRA's magnitude vectors) is not supported".into());
        }
        if self.bias != "none" {
            return Some(format!("bias = {:?} (trained base-layer biases) is not supported; only \"none\"", self.bias));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty())) {
            return Some("modules_to_save (whole trained modules) is not supported".into());
        }
        if self.lora_bias {
            return Some("lora_bias = true (a bias on lora_B) is not supported".into());
        }
        if self.layer_replication.as_ref().is_some_and(|v| !v.is_null()) {
            return Some("layer_replication is not supported".into());
        }
        if self.trainable_token_indices.as_ref().is_some_and(|v| !v.is_null()) {
            return Some("trainable_token_indices (trained token embeddings) is not supported".into());
        }
        let rewrites_base = |k: &&str| ["pissa", "olora", "corda", "eva", "loftq"].iter().any(|p| k.starts_with(p));
        if let Some(kind) = self.init_lora_weights.as_str().filter(rewrites_base) {
            return Some(format!("init_lora_weights = {kind:?} rewrites the base model; only LoRA over the unchanged base is supported"));
        }
        None
    }

    /// Rank and scaling of the projection `prefix` (`h.0.mlp.c_fc`).
    fn rank_and_scaling(&self, prefix: &str) -> std::result::Result<(usize, f64), String> {
        let name = format!("transformer.{prefix}");
        let rank = match self.rank_pattern.lookup("rank_pattern", &name)? {
            Some(r) if r >= 1.0 && r.fract() == 0.0 => r as usize,
            Some(r) => return Err(format!("rank_pattern gives `{prefix}` rank {r}, not a positive whole number")),
            None => self.r,
        };
        let alpha = self.alpha_pattern.lookup("alpha_pattern", &name)?.unwrap_or(self.lora_alpha);
        if rank == 0 || !(alpha.is_finite() && alpha > 0.0) {
            return Err(format!("`{prefix}`: LoRA needs a positive rank and alpha (have rank {rank}, alpha {alpha})"));
        }
        let scaling = if self.use_rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
        Ok((rank, scaling))
    }
}

fn default_bias() -> String {
    "none".into()
}

fn default_true() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

/// Writes the model's LoRA pairs as a PEFT adapter folder.
pub fn save_adapter(dir: &Path, model: &TrainableGpt2, base_model: &str) -> Result<()> {
    let settings = model
        .lora_settings()
        .ok_or_else(|| TrainingError::Settings("the model has no LoRA adapter to save".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    let config = AdapterConfig {
        peft_type: "LORA".into(),
        task_type: Some("CAUSAL_LM".into()),
        r: settings.rank,
        lora_alpha: settings.alpha,
        lora_dropout: 0.0,
        target_modules: serde_json::json!(["c_attn", "c_proj", "c_fc"]),
        fan_in_fan_out: true,
        bias: "none".into(),
        base_model_name_or_path: Some(base_model.to_string()),
        inference_mode: true,
        use_rslora: false,
        use_dora: false,
        modules_to_save: None,
        init_lora_weights: serde_json::Value::Bool(true),
        rank_pattern: Pattern::default(),
        alpha_pattern: Pattern::default(),
        lora_bias: false,
        layer_replication: None,
        trainable_token_indices: None,
    };
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).map_err(|e| file_error(&path, e))?;
    std::fs::write(&path, text).map_err(|e| file_error(&path, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (prefix, pair) in model.lora_pairs() {
        tensors.insert(format!("{PEFT_PREFIX}{prefix}.lora_A.weight"), pair.a.as_tensor().detach().copy()?);
        tensors.insert(format!("{PEFT_PREFIX}{prefix}.lora_B.weight"), pair.b.as_tensor().detach().copy()?);
    }
    let path = dir.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| file_error(&path, e))?;
    Ok(())
}

/// An adapter read from disk: settings and `(A, B)` per projection prefix.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `r` and `lora_alpha` as the file gives them.
    pub settings: LoraSettings,
    pub pairs: BTreeMap<String, (Tensor, Tensor)>,
    /// Each pair's scaling (`alpha / r`, per `rank_pattern`,
    /// `alpha_pattern` and `use_rslora`).
    pub scalings: BTreeMap<String, f64>,
    pub dir: PathBuf,
}

impl LoraAdapter {
    /// Reads a PEFT LoRA adapter folder (ours or PEFT's), on the CPU in f32.
    pub fn load(dir: &Path) -> Result<Self> {
        let bad = |message: String| TrainingError::Adapter { path: dir.to_path_buf(), message };
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| file_error(&config_path, e))?;
        let config: AdapterConfig =
            serde_json::from_str(&text).map_err(|e| bad(format!("adapter_config.json is not a PEFT LoRA config: {e}")))?;
        if let Some(why) = config.refused() {
            return Err(bad(format!("adapter_config.json: {why}")));
        }
        let settings = LoraSettings { rank: config.r, alpha: config.lora_alpha };
        settings.validate().map_err(|e| bad(e.to_string()))?;
        let weights_path = dir.join("adapter_model.safetensors");
        let raw = candle_core::safetensors::load(&weights_path, &Device::Cpu)
            .map_err(|e| file_error(&weights_path, format!("not a readable safetensors file: {e}")))?;
        let mut a_parts: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut b_parts: BTreeMap<String, Tensor> = BTreeMap::new();
        for (key, tensor) in raw {
            let name = key.strip_prefix(PEFT_PREFIX).unwrap_or(&key);
            let name = name.replace(".default.", ".");
            let (prefix, is_a) = if let Some(p) = name.strip_suffix(".lora_A.weight") {
                (p.to_string(), true)
            } else if let Some(p) = name.strip_suffix(".lora_B.weight") {
                (p.to_string(), false)
            } else {
                return Err(bad(format!("unexpected tensor `{key}` in adapter_model.safetensors")));
            };
            let tensor = tensor.to_dtype(DType::F32)?;
            if is_a { a_parts.insert(prefix, tensor) } else { b_parts.insert(prefix, tensor) };
        }
        let mut pairs = BTreeMap::new();
        let mut scalings = BTreeMap::new();
        for (prefix, a) in a_parts {
            let b = b_parts.remove(&prefix).ok_or_else(|| bad(format!("`{prefix}` has lora_A but no lora_B")))?;
            let (r_a, _) = a.dims2().map_err(|e| bad(format!("`{prefix}.lora_A`: {e}")))?;
            let (_, r_b) = b.dims2().map_err(|e| bad(format!("`{prefix}.lora_B`: {e}")))?;
            let (rank, scaling) = config.rank_and_scaling(&prefix).map_err(&bad)?;
            if r_a != rank || r_b != rank {
                return Err(bad(format!("`{prefix}`: rank {r_a}/{r_b} does not match r = {rank} (r and rank_pattern)")));
            }
            scalings.insert(prefix.clone(), scaling);
            pairs.insert(prefix, (a, b));
        }
        if let Some(prefix) = b_parts.keys().next() {
            return Err(bad(format!("`{prefix}` has lora_B but no lora_A")));
        }
        if pairs.is_empty() {
            return Err(bad("adapter_model.safetensors holds no LoRA pairs".into()));
        }
        Ok(Self { settings, pairs, scalings, dir: dir.to_path_buf() })
    }

    /// The adapter ready to serve at run time over a base model of
    /// `config`'s shape (see [`LoraRuntime`]); a pair that does not fit is
    /// refused, the error naming the folder and the tensor.
    pub fn runtime(&self, config: &Gpt2Config) -> Result<LoraRuntime> {
        let pairs = self.pairs.iter().map(|(prefix, (a, b))| (prefix.as_str(), a, b, self.scaling(prefix)));
        LoraRuntime::from_peft_pairs(config, pairs).map_err(|e| {
            let message = match e {
                ModelError::Adapter(message) => message,
                other => other.to_string(),
            };
            TrainingError::Adapter { path: self.dir.clone(), message }
        })
    }

    /// The scaling of the pair `prefix` (the file's `alpha / r` for a pair
    /// it does not know).
    pub fn scaling(&self, prefix: &str) -> f64 {
        self.scalings.get(prefix).copied().unwrap_or_else(|| self.settings.scaling())
    }

    /// Adds the adapter's updates to weights in canonical naming, checking
    /// that each target exists and fits.
    pub fn merge_into(&self, weights: &mut BTreeMap<String, Tensor>) -> Result<()> {
        let bad = |message: String| TrainingError::Adapter { path: self.dir.clone(), message };
        for (prefix, (a, b)) in &self.pairs {
            let name = format!("{prefix}.weight");
            let w = weights.get(&name).ok_or_else(|| bad(format!("targets `{prefix}`, which the base model does not have")))?;
            let (n_in, n_out) = w.dims2()?;
            let rank = a.dims().first().copied().unwrap_or(0);
            if rank == 0 || a.dims() != [rank, n_in] || b.dims() != [n_out, rank] {
                return Err(bad(format!(
                    "`{prefix}`: lora_A {:?} / lora_B {:?} do not fit a [{n_in}, {n_out}] weight",
                    a.dims(),
                    b.dims()
                )));
            }
            let delta = lora_delta(&a.to_device(w.device())?, &b.to_device(w.device())?, self.scaling(prefix))?;
            let merged = (w + delta)?;
            weights.insert(name, merged);
        }
        Ok(())
    }
}

/// Reads a persona's adapter folder and readies it for a base model of
/// `config`'s shape: what the pool serves per request, next to requests of
/// other personas, over one copy of the base weights.
pub fn load_runtime(adapter_dir: &Path, config: &Gpt2Config) -> Result<LoraRuntime> {
    LoraAdapter::load(adapter_dir)?.runtime(config)
}

/// [`load_runtime`], then moved to `device` (where the served model is).
pub fn load_runtime_on(adapter_dir: &Path, config: &Gpt2Config, device: &Device) -> Result<LoraRuntime> {
    let runtime = load_runtime(adapter_dir, config)?;
    if device.is_cpu() {
        return Ok(runtime);
    }
    Ok(runtime.to_device(device)?)
}

/// Loads a base checkpoint with a persona's LoRA adapter merged into its
/// weights: the model the pool serves for that persona.
pub fn load_persona(base_dir: &Path, adapter_dir: &Path, dtype: DType, device: &Device) -> Result<Gpt2> {
    let adapter = LoraAdapter::load(adapter_dir)?;
    let (config, mut weights) = load_weights(base_dir, device)?;
    let expected = lora_prefixes(&config);
    if let Some(unknown) = adapter.pairs.keys().find(|p| !expected.contains(p)) {
        return Err(TrainingError::Adapter {
            path: adapter_dir.to_path_buf(),
            message: format!("targets `{unknown}`, which is not a c_attn/c_proj/c_fc of this base model"),
        });
    }
    adapter.merge_into(&mut weights)?;
    gpt2_from_weights(config, weights, dtype, device, &adapter_dir.join("adapter_model.safetensors"))
}

/// A [`Gpt2`] over weights in canonical naming.
pub fn gpt2_from_weights(
    config: Gpt2Config,
    weights: BTreeMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    origin: &Path,
) -> Result<Gpt2> {
    let tensors = weights
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(dtype)?.to_device(device)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let mut store = TensorStore::from_tensors(origin, tensors);
    Ok(Gpt2::from_store(config, &mut store, device)?)
}
