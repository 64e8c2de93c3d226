//! GPT-2 hyper-parameters as Hugging Face writes them in `config.json`.

use serde::{Deserialize, Serialize};

use super::ModelError;

/// The id that ends every turn in DialoGPT (and pads batches).
pub const EOS_TOKEN_ID: u32 = 50256;

/// The activation functions that `GPT2Config.activation_function` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The tanh approximation GPT-2 and DialoGPT were trained with.
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    /// The exact (erf) GELU.
    Gelu,
    Relu,
    /// x · sigmoid(x) (transformers' `silu`, also named `swish`).
    #[serde(alias = "swish")]
    Silu,
}

/// A GPT-2 configuration. Field names and defaults follow `GPT2Config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_n_positions")]
    pub n_positions: usize,
    #[serde(default = "default_n_embd")]
    pub n_embd: usize,
    #[serde(default = "default_n_layer")]
    pub n_layer: usize,
    #[serde(default = "default_n_head")]
    pub n_head: usize,
    /// Width of the MLP; `None` means 4 × `n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: Activation,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "default_eos")]
    pub bos_token_id: u32,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_vocab_size() -> usize {
    50257
}
fn default_n_positions() -> usize {
    1024
}
fn default_n_embd() -> usize {
    768
}
fn default_n_layer() -> usize {
    12
}
fn default_n_head() -> usize {
    12
}
fn default_activation() -> Activation {
    Activation::GeluNew
}
fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_eos() -> u32 {
    EOS_TOKEN_ID
}

/// Why a `config.json` asks for something dialogd does not run, naming the
/// field, or `None`.
///
/// - `tie_word_embeddings: false`: a separate `lm_head`; dialogd always
///   ties the head to `wte` (it never reads a stored head), so the numbers
///   would differ.
/// - `model_type` other than `gpt2`: another architecture.
///
/// `add_cross_attention: true` is accepted: without encoder states
/// transformers skips the cross-attention, and so do we (its weights are
/// left unread).
pub fn refused_fields(raw: &serde_json::Value) -> Option<String> {
    if raw.get("tie_word_embeddings").and_then(|v| v.as_bool()) == Some(false) {
        return Some("tie_word_embeddings = false (a separate lm_head) is not supported: dialogd ties the head to wte".into());
    }
    if let Some(kind) = raw.get("model_type").and_then(|v| v.as_str()).filter(|k| *k != "gpt2") {
        return Some(format!("model_type {kind:?} is not supported: dialogd runs GPT-2 (\"gpt2\")"));
    }
    None
}

impl Gpt2Config {
    /// DialoGPT-small: 117M parameters.
    pub fn dialogpt_small() -> Self {
        Self::with_shape(768, 12, 12)
    }

    /// DialoGPT-medium: 345M parameters.
    pub fn dialogpt_medium() -> Self {
        Self::with_shape(1024, 24, 16)
    }

    /// DialoGPT-large: 762M parameters.
    pub fn dialogpt_large() -> Self {
        Self::with_shape(1280, 36, 20)
    }

    /// A GPT-2 of the given width, depth and head count with every other
    /// field at its default.
    pub fn with_shape(n_embd: usize, n_layer: usize, n_head: usize) -> Self {
        Self {
            vocab_size: default_vocab_size(),
            n_positions: default_n_positions(),
            n_embd,
            n_layer,
            n_head,
            n_inner: None,
            activation_function: default_activation(),
            layer_norm_epsilon: default_layer_norm_epsilon(),
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            bos_token_id: EOS_TOKEN_ID,
            eos_token_id: EOS_TOKEN_ID,
        }
    }

    /// Parses and checks a `config.json`. Fields transformers reads that
    /// do not change the numbers at inference (dropouts, `use_cache`,
    /// `summary_*`, `reorder_and_upcast_attn`, which only reorders the same
    /// f32 arithmetic, the legacy `n_ctx`) are accepted and ignored; a value
    /// that would change them and that dialogd does not run is refused by
    /// name (see [`refused_fields`]).
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let raw: serde_json::Value = serde_json::from_str(text).map_err(|e| ModelError::Config(e.to_string()))?;
        if let Some(why) = refused_fields(&raw) {
            return Err(ModelError::Config(why));
        }
        let config: Self = serde_json::from_value(raw).map_err(|e| ModelError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Rejects shapes the model code cannot run.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |msg: String| Err(ModelError::Config(msg));
        if self.n_embd == 0 || self.n_layer == 0 || self.n_head == 0 || self.vocab_size == 0 || self.n_positions == 0 {
            return bad("n_embd, n_layer, n_head, vocab_size and n_positions must all be positive".into());
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!("n_embd ({}) is not a multiple of n_head ({})", self.n_embd, self.n_head));
        }
        if self.eos_token_id as usize >= self.vocab_size {
            return bad(format!("eos_token_id {} is outside the vocabulary of {}", self.eos_token_id, self.vocab_size));
        }
        // Written so that NaN fails too.
        if self.layer_norm_epsilon.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return bad(format!("layer_norm_epsilon must be positive, not {}", self.layer_norm_epsilon));
        }
        Ok(())
    }

    /// Number of parameters (with the tied head counted once).
    pub fn n_params(&self) -> usize {
        let e = self.n_embd;
        let inner = self.inner_dim();
        let block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * inner + inner) + (inner * e + e);
        self.vocab_size * e + self.n_positions * e + self.n_layer * block + 2 * e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hf_config_with_defaults() {
        let cfg = Gpt2Config::from_json(
            r#"{"architectures":["GPT2LMHeadModel"],"n_embd":1024,"n_layer":24,"n_head":16,
                "activation_function":"gelu_new","model_type":"gpt2"}"#,
        )
        .unwrap();
        assert_eq!(cfg, Gpt2Config::dialogpt_medium());
        assert_eq!(cfg.head_dim(), 64);
    }

    #[test]
    fn small_has_the_published_parameter_count() {
        // GPT-2 small / DialoGPT-small: 124,439,808 parameters with the head tied.
        assert_eq!(Gpt2Config::dialogpt_small().n_params(), 124_439_808);
    }

    #[test]
    fn rejects_bad_shapes_and_unknown_activation() {
        let err = Gpt2Config::from_json(r#"{"n_embd":100,"n_head":12}"#).unwrap_err();
        assert!(err.to_string().contains("n_head"), "{err}");
        let err = Gpt2Config::from_json(r#"{"activation_function":"quick_gelu"}"#).unwrap_err();
        assert!(err.to_string().contains("quick_gelu"), "{err}");
        assert!(Gpt2Config::from_json("{not json").is_err());
    }
}
