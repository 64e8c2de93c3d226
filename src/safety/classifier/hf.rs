//! Sequence-classification checkpoints in the Hugging Face layout, run with
//! `candle-transformers`: the shapes of the Detoxify models
//! (`unitary/toxic-bert`, `unitary/unbiased-toxic-roberta`,
//! `unitary/multilingual-toxic-xlm-roberta`) and of single-label
//! classifiers (`s-nlp/roberta_toxicity_classifier`).
//!
//! A folder holds `config.json`, `tokenizer.json` and `model.safetensors`
//! (or `pytorch_model.bin`). `architectures[0]` (or `model_type`) picks one
//! of four models:
//!
//! | architecture | encoder | head (ours where candle-transformers has none) |
//! |---|---|---|
//! | `BertForSequenceClassification` | `bert::BertModel` | pooler (`bert.pooler.dense`, tanh) + `classifier` |
//! | `RobertaForSequenceClassification`, `XLMRobertaForSequenceClassification` | `xlm_roberta::XLMRobertaForSequenceClassification` (RoBERTa's graph is XLM-R's) | theirs: `classifier.dense`, tanh, `classifier.out_proj` |
//! | `DistilBertForSequenceClassification` | `bert::BertModel` on DistilBERT's tensors, renamed | `pre_classifier`, ReLU, `classifier` |
//!
//! DistilBERT runs on candle-transformers' BERT encoder, not on its
//! `distilbert` module: that module computes GELU with the tanh
//! approximation where transformers uses erf (on the tiny parity model
//! `distilbert-multi` it is 1.5e-4 off transformers' probabilities, this
//! path 7e-7); the two graphs are otherwise
//! the same (post-norm blocks, eps 1e-12), and DistilBERT has no token
//! types (a zero `[1, dim]` table stands in).
//!
//! Labels come from `id2label`, in id order. Probabilities are a sigmoid
//! per label when `problem_type = "multi_label_classification"` (or there
//! is one label), a softmax over the labels otherwise, as transformers'
//! text-classification pipeline does.
//!
//! **Long texts.** A model reads at most `max_position_embeddings` tokens
//! (less `pad_token_id + 1` for RoBERTa and XLM-R, whose positions start
//! after the pad): 512 for the public checkpoints. A longer text is not cut
//! there: it is split into windows (the tokenizers library's own cut, as
//! transformers' `return_overflowing_tokens`)
//! of that many tokens (special tokens included) overlapping by an eighth
//! of a window, every window is classified, and each label takes its
//! highest probability over the windows, so toxicity anywhere counts.
//! All windows of all texts of one call run as one padded batch (in slices
//! of [`MAX_BATCH`] windows, which bounds memory on a 64 KiB text).

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{linear, Linear, Module, VarBuilder};
use candle_transformers::models::{bert, xlm_roberta};
use serde_json::Value;
use tokenizers::{PostProcessor, Tokenizer, TruncationDirection};

use super::super::SafetyError;
use super::ToxicityClassifier;

/// Windows per forward pass at most.
pub const MAX_BATCH: usize = 16;

/// The four layouts read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Bert,
    Roberta,
    XlmRoberta,
    DistilBert,
}

impl Architecture {
    /// From `architectures[0]`, else `model_type`.
    fn of(config: &Value) -> Result<Self, SafetyError> {
        let named = config.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str);
        let from_name = match named {
            Some("BertForSequenceClassification") => Some(Self::Bert),
            Some("RobertaForSequenceClassification") => Some(Self::Roberta),
            Some("XLMRobertaForSequenceClassification") => Some(Self::XlmRoberta),
            Some("DistilBertForSequenceClassification") => Some(Self::DistilBert),
            Some(other) => {
                return Err(SafetyError::Classifier(format!(
                    "config.json: architecture `{other}` is not read (use a BERT, RoBERTa, XLM-R or DistilBERT ...ForSequenceClassification checkpoint)"
                )))
            }
            None => None,
        };
        if let Some(a) = from_name {
            return Ok(a);
        }
        match config.get("model_type").and_then(Value::as_str) {
            Some("bert") => Ok(Self::Bert),
            Some("roberta") => Ok(Self::Roberta),
            Some("xlm-roberta") => Ok(Self::XlmRoberta),
            Some("distilbert") => Ok(Self::DistilBert),
            other => Err(SafetyError::Classifier(format!(
                "config.json: neither `architectures` nor `model_type` names a classifier this reads (model_type {other:?})"
            ))),
        }
    }

    /// The transformers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Bert => "BertForSequenceClassification",
            Self::Roberta => "RobertaForSequenceClassification",
            Self::XlmRoberta => "XLMRobertaForSequenceClassification",
            Self::DistilBert => "DistilBertForSequenceClassification",
        }
    }
}

/// How logits become probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Independent per label (multi-label, or one label).
    Sigmoid,
    /// Over the labels (single-label).
    Softmax,
}

enum Net {
    Bert { encoder: bert::BertModel, pooler: Linear, classifier: Linear },
    DistilBert { encoder: bert::BertModel, pre_classifier: Linear, classifier: Linear },
    Roberta(xlm_roberta::XLMRobertaForSequenceClassification),
}

/// A loaded sequence classifier: tokenizer, encoder and head.
pub struct HfClassifier {
    architecture: Architecture,
    labels: Vec<String>,
    activation: Activation,
    tokenizer: Tokenizer,
    net: Net,
    /// Tokens a window holds, special tokens included.
    window: usize,
    /// Tokens a window shares with the one before.
    stride: usize,
    /// Special tokens the tokenizer adds to a window.
    added: usize,
    pad_id: u32,
    vocab_size: usize,
    device: Device,
}

impl std::fmt::Debug for HfClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfClassifier")
            .field("architecture", &self.architecture)
            .field("labels", &self.labels)
            .field("activation", &self.activation)
            .field("window", &self.window)
            .finish()
    }
}

fn err(context: &str, e: impl std::fmt::Display) -> SafetyError {
    SafetyError::Classifier(format!("{context}: {e}"))
}

/// Reads a number field, or `default` when absent.
fn number(config: &Value, key: &str, default: f64) -> Result<f64, SafetyError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| err("config.json", format!("`{key}` is not a number"))),
    }
}

fn count(config: &Value, key: &str) -> Result<usize, SafetyError> {
    config
        .get(key)
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| err("config.json", format!("`{key}` is missing or not a whole number")))
}

/// `id2label` in id order (transformers' `LABEL_i` where a config has
/// only `num_labels`).
fn labels_of(config: &Value) -> Result<Vec<String>, SafetyError> {
    if let Some(map) = config.get("id2label").and_then(Value::as_object) {
        let mut pairs = Vec::new();
        for (id, label) in map {
            let id: usize = id.parse().map_err(|_| err("config.json", format!("id2label key `{id}` is not an id")))?;
            let label = label.as_str().ok_or_else(|| err("config.json", format!("id2label[{id}] is not a string")))?;
            pairs.push((id, label.to_string()));
        }
        pairs.sort();
        if pairs.iter().enumerate().any(|(i, (id, _))| i != *id) {
            return Err(err("config.json", "id2label ids are not 0..n"));
        }
        if !pairs.is_empty() {
            return Ok(pairs.into_iter().map(|(_, l)| l).collect());
        }
    }
    let n = config.get("num_labels").and_then(Value::as_u64).unwrap_or(2) as usize;
    Ok((0..n).map(|i| format!("LABEL_{i}")).collect())
}

/// candle-transformers' BERT config from a BERT or DistilBERT config.json,
/// with transformers' defaults for keys older checkpoints leave out.
fn bert_config(architecture: Architecture, config: &Value) -> Result<bert::Config, SafetyError> {
    let distil = architecture == Architecture::DistilBert;
    let key = |bert_key: &'static str, distil_key: &'static str| if distil { distil_key } else { bert_key };
    let act_name = config
        .get(key("hidden_act", "activation"))
        .and_then(Value::as_str)
        .unwrap_or("gelu");
    let hidden_act = match act_name {
        "gelu" => bert::HiddenAct::Gelu,
        "relu" => bert::HiddenAct::Relu,
        "gelu_new" | "gelu_pytorch_tanh" => bert::HiddenAct::GeluApproximate,
        other => return Err(err("config.json", format!("activation `{other}` is not read (gelu, relu, gelu_new)"))),
    };
    if let Some(kind) = config.get("position_embedding_type").and_then(Value::as_str) {
        if kind != "absolute" {
            return Err(err("config.json", format!("position_embedding_type `{kind}` is not read (absolute only)")));
        }
    }
    Ok(bert::Config {
        vocab_size: count(config, "vocab_size")?,
        hidden_size: count(config, key("hidden_size", "dim"))?,
        num_hidden_layers: count(config, key("num_hidden_layers", "n_layers"))?,
        num_attention_heads: count(config, key("num_attention_heads", "n_heads"))?,
        intermediate_size: count(config, key("intermediate_size", "hidden_dim"))?,
        hidden_act,
        hidden_dropout_prob: 0.0,
        max_position_embeddings: number(config, "max_position_embeddings", 512.0)? as usize,
        type_vocab_size: if distil { 1 } else { number(config, "type_vocab_size", 2.0)? as usize },
        initializer_range: 0.02,
        layer_norm_eps: if distil { 1e-12 } else { number(config, "layer_norm_eps", 1e-12)? },
        pad_token_id: number(config, "pad_token_id", 0.0)? as usize,
        position_embedding_type: bert::PositionEmbeddingType::Absolute,
        use_cache: false,
        classifier_dropout: None,
        model_type: Some("bert".into()),
    })
}

/// candle-transformers' XLM-R config from a RoBERTa or XLM-R config.json.
fn roberta_config(config: &Value) -> Result<xlm_roberta::Config, SafetyError> {
    let mut filled = config.clone();
    let object = filled.as_object_mut().ok_or_else(|| err("config.json", "not a JSON object"))?;
    let defaults = [
        ("layer_norm_eps", serde_json::json!(1e-12)),
        ("attention_probs_dropout_prob", serde_json::json!(0.1)),
        ("hidden_dropout_prob", serde_json::json!(0.1)),
        ("position_embedding_type", serde_json::json!("absolute")),
        ("hidden_act", serde_json::json!("gelu")),
        ("max_position_embeddings", serde_json::json!(514)),
        ("type_vocab_size", serde_json::json!(1)),
        ("pad_token_id", serde_json::json!(1)),
    ];
    for (key, value) in defaults {
        if object.get(key).is_none_or(Value::is_null) {
            object.insert(key.to_string(), value);
        }
    }
    let kind = object.get("position_embedding_type").and_then(Value::as_str).unwrap_or("absolute");
    if kind != "absolute" {
        return Err(err("config.json", format!("position_embedding_type `{kind}` is not read (absolute only)")));
    }
    serde_json::from_value(filled).map_err(|e| err("config.json", e))
}

/// The DistilBERT tensor behind a BERT name that candle-transformers'
/// encoder asks for (`bert.encoder.layer.0.attention.self.query.weight` →
/// `distilbert.transformer.layer.0.attention.q_lin.weight`); heads keep
/// their names.
fn bert_as_distilbert(name: &str) -> String {
    let Some(rest) = name.strip_prefix("bert.") else { return name.to_string() };
    if let Some(rest) = rest.strip_prefix("embeddings.") {
        return format!("distilbert.embeddings.{rest}");
    }
    let Some(rest) = rest.strip_prefix("encoder.layer.") else { return name.to_string() };
    let Some((index, part)) = rest.split_once('.') else { return name.to_string() };
    const PARTS: &[(&str, &str)] = &[
        ("attention.self.query.", "attention.q_lin."),
        ("attention.self.key.", "attention.k_lin."),
        ("attention.self.value.", "attention.v_lin."),
        ("attention.output.dense.", "attention.out_lin."),
        ("attention.output.LayerNorm.", "sa_layer_norm."),
        ("intermediate.dense.", "ffn.lin1."),
        ("output.dense.", "ffn.lin2."),
        ("output.LayerNorm.", "output_layer_norm."),
    ];
    for (from, to) in PARTS {
        if let Some(tail) = part.strip_prefix(from) {
            return format!("distilbert.transformer.layer.{index}.{to}{tail}");
        }
    }
    name.to_string()
}

/// DistilBERT has no token types; BERT's encoder adds a token-type row,
/// so a zero `[1, dim]` table under this name leaves the sum unchanged.
const DISTILBERT_TYPES: &str = "distilbert.embeddings.token_type_embeddings.weight";

impl HfClassifier {
    /// Loads a classifier folder (see the module docs) onto `device`, in f32.
    ///
    /// Errors: a missing or unreadable file, an architecture or setting
    /// this does not read, a tensor missing or of the wrong shape, each
    /// named.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, SafetyError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| err(&dir.join(name).display().to_string(), e))
        };
        let config: Value = serde_json::from_str(&read("config.json")?).map_err(|e| err("config.json", e))?;
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(err(
                &dir.display().to_string(),
                "no tokenizer.json (save the tokenizer with transformers' fast tokenizer: `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)",
            ));
        }
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| err(&tokenizer_path.display().to_string(), e))?;
        let weights = crate::model::weights::WeightsFile::find(dir).map_err(|e| SafetyError::Classifier(e.to_string()))?;
        let mut tensors = crate::model::weights::read_all(&weights, DType::F32, device)
            .map_err(|e| SafetyError::Classifier(e.to_string()))?;
        // Checkpoints from older BERT code name LayerNorm gains gamma/beta.
        let renamed: Vec<(String, String)> = tensors
            .keys()
            .filter_map(|k| {
                let new = k.strip_suffix(".gamma").map(|s| format!("{s}.weight")).or_else(|| k.strip_suffix(".beta").map(|s| format!("{s}.bias")));
                new.map(|n| (k.clone(), n))
            })
            .collect();
        for (old, new) in renamed {
            if let Some(t) = tensors.remove(&old) {
                tensors.insert(new, t);
            }
        }
        if Architecture::of(&config)? == Architecture::DistilBert {
            if let Some(table) = tensors.get("distilbert.embeddings.word_embeddings.weight") {
                let dim = table.dim(1).map_err(|e| err("weights", e))?;
                let zeros = Tensor::zeros((1, dim), DType::F32, device).map_err(|e| err("weights", e))?;
                tensors.insert(DISTILBERT_TYPES.to_string(), zeros);
            }
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::from_parts(&config, tokenizer, vb)
    }

    /// Builds a classifier from a parsed config.json, a tokenizer and
    /// weights under transformers' names (a `VarBuilder` over a file, or
    /// over a `VarMap` for random weights in benchmarks). A DistilBERT
    /// builder also needs `distilbert.embeddings.token_type_embeddings.weight`,
    /// `[1, dim]` zeros ([`HfClassifier::load`] adds it).
    pub fn from_parts(config: &Value, mut tokenizer: Tokenizer, vb: VarBuilder) -> Result<Self, SafetyError> {
        let architecture = Architecture::of(config)?;
        let labels = labels_of(config)?;
        let n_labels = labels.len();
        let multi = config.get("problem_type").and_then(Value::as_str) == Some("multi_label_classification");
        let activation = if multi || n_labels == 1 { Activation::Sigmoid } else { Activation::Softmax };
        let device = vb.device().clone();
        let tensor = |e: candle_core::Error| err("weights", e);
        let (net, window, pad_id, vocab_size) = match architecture {
            Architecture::Bert => {
                let cfg = bert_config(architecture, config)?;
                let encoder = bert::BertModel::load(vb.pp("bert"), &cfg).map_err(tensor)?;
                let pooler = linear(cfg.hidden_size, cfg.hidden_size, vb.pp("bert.pooler.dense")).map_err(tensor)?;
                let classifier = linear(cfg.hidden_size, n_labels, vb.pp("classifier")).map_err(tensor)?;
                (Net::Bert { encoder, pooler, classifier }, cfg.max_position_embeddings, cfg.pad_token_id, cfg.vocab_size)
            }
            Architecture::DistilBert => {
                let cfg = bert_config(architecture, config)?;
                let vb = vb.rename_f(bert_as_distilbert);
                let encoder = bert::BertModel::load(vb.pp("bert"), &cfg).map_err(tensor)?;
                let pre_classifier = linear(cfg.hidden_size, cfg.hidden_size, vb.pp("pre_classifier")).map_err(tensor)?;
                let classifier = linear(cfg.hidden_size, n_labels, vb.pp("classifier")).map_err(tensor)?;
                (Net::DistilBert { encoder, pre_classifier, classifier }, cfg.max_position_embeddings, cfg.pad_token_id, cfg.vocab_size)
            }
            Architecture::Roberta | Architecture::XlmRoberta => {
                let cfg = roberta_config(config)?;
                let model = xlm_roberta::XLMRobertaForSequenceClassification::new(n_labels, &cfg, vb).map_err(tensor)?;
                let window = cfg.max_position_embeddings.checked_sub(cfg.pad_token_id as usize + 1).filter(|w| *w >= 8).ok_or_else(|| {
                    err("config.json", format!("max_position_embeddings {} leaves no window after the pad", cfg.max_position_embeddings))
                })?;
                (Net::Roberta(model), window, cfg.pad_token_id as usize, cfg.vocab_size)
            }
        };
        let added = tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(false));
        if window <= added + 1 {
            return Err(err("config.json", format!("a window of {window} tokens is too short")));
        }
        let stride = (window / 8).max(1).min(window - added - 1);
        // Windows are cut here, not by the tokenizer's truncation: tokenizers
        // 0.23.2 stops tokenizing at `max_length` when truncation is set, so
        // its overflowing windows lose the rest of the text.
        tokenizer.with_truncation(None).map_err(|e| err("tokenizer.json", e))?;
        tokenizer.with_padding(None);
        Ok(Self { architecture, labels, activation, tokenizer, net, window, stride, added, pad_id: pad_id as u32, vocab_size, device })
    }

    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Tokens per window (special tokens included).
    pub fn window(&self) -> usize {
        self.window
    }

    /// The token ids of each window of `text` (one for a text that fits).
    pub fn windows(&self, text: &str) -> Result<Vec<Vec<u32>>, SafetyError> {
        let mut encoding = self.tokenizer.encode(text, false).map_err(|e| err("tokenizer", e))?;
        // The library's own cut (as transformers' `return_overflowing_tokens`).
        encoding.truncate(self.window - self.added, self.stride, TruncationDirection::Right);
        let overflowing = encoding.take_overflowing();
        let mut out = Vec::with_capacity(1 + overflowing.len());
        for part in std::iter::once(encoding).chain(overflowing) {
            let part = self.tokenizer.post_process(part, None, true).map_err(|e| err("tokenizer", e))?;
            out.push(part.get_ids().to_vec());
        }
        if let Some(id) = out.iter().flatten().find(|&&id| id as usize >= self.vocab_size) {
            return Err(err("tokenizer", format!("token id {id} is outside the model's vocabulary of {}", self.vocab_size)));
        }
        Ok(out)
    }

    /// Probabilities of each window, as one right-padded batch.
    fn forward(&self, windows: &[&[u32]]) -> Result<Vec<Vec<f32>>, SafetyError> {
        let tensor = |e: candle_core::Error| err("forward", e);
        let longest = windows.iter().map(|w| w.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(windows.len() * longest);
        let mut mask = Vec::with_capacity(windows.len() * longest);
        for w in windows {
            ids.extend_from_slice(w);
            ids.extend(std::iter::repeat_n(self.pad_id, longest - w.len()));
            mask.extend(std::iter::repeat_n(1u32, w.len()));
            mask.extend(std::iter::repeat_n(0u32, longest - w.len()));
        }
        let shape = (windows.len(), longest);
        let ids = Tensor::from_vec(ids, shape, &self.device).map_err(tensor)?;
        let mask = Tensor::from_vec(mask, shape, &self.device).map_err(tensor)?;
        let types = ids.zeros_like().map_err(tensor)?;
        let logits = match &self.net {
            Net::Bert { encoder, pooler, classifier } => {
                let hidden = encoder.forward(&ids, &types, Some(&mask)).map_err(tensor)?;
                let cls = hidden.i((.., 0)).map_err(tensor)?;
                let pooled = pooler.forward(&cls).and_then(|p| p.tanh()).map_err(tensor)?;
                classifier.forward(&pooled).map_err(tensor)?
            }
            Net::DistilBert { encoder, pre_classifier, classifier } => {
                let hidden = encoder.forward(&ids, &types, Some(&mask)).map_err(tensor)?;
                let cls = hidden.i((.., 0)).map_err(tensor)?;
                let pooled = pre_classifier.forward(&cls).and_then(|p| p.relu()).map_err(tensor)?;
                classifier.forward(&pooled).map_err(tensor)?
            }
            Net::Roberta(model) => model.forward(&ids, &mask, &types).map_err(tensor)?,
        };
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32).and_then(|l| l.to_vec2()).map_err(tensor)?;
        Ok(rows.into_iter().map(|row| self.probabilities_of(&row)).collect())
    }

    fn probabilities_of(&self, logits: &[f32]) -> Vec<f32> {
        match self.activation {
            Activation::Sigmoid => logits.iter().map(|&x| (1.0 / (1.0 + (-(x as f64)).exp())) as f32).collect(),
            Activation::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let exps: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                exps.iter().map(|e| (e / sum) as f32).collect()
            }
        }
    }
}

impl ToxicityClassifier for HfClassifier {
    fn labels(&self) -> &[String] {
        &self.labels
    }

    fn probabilities(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, SafetyError> {
        let mut windows: Vec<Vec<u32>> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            for w in self.windows(text)? {
                windows.push(w);
                owner.push(i);
            }
        }
        let mut out = vec![vec![0f32; self.labels.len()]; texts.len()];
        let mut seen = vec![false; texts.len()];
        for (slice_index, slice) in windows.chunks(MAX_BATCH).enumerate() {
            let refs: Vec<&[u32]> = slice.iter().map(Vec::as_slice).collect();
            for (j, row) in self.forward(&refs)?.into_iter().enumerate() {
                let text = owner[slice_index * MAX_BATCH + j];
                let best = &mut out[text];
                if !seen[text] {
                    best.copy_from_slice(&row);
                    seen[text] = true;
                } else {
                    for (b, p) in best.iter_mut().zip(row) {
                        *b = b.max(p);
                    }
                }
            }
        }
        Ok(out)
    }
}
