//! One reply from one prompt: prefill, then decode with the KV cache.
//!
//! This is the single-sequence loop behind `dialogd generate` and
//! `dialogd chat`; the generation pool batches many of these.

use crate::model::{Gpt2, LoraRuntime, ModelError};
use crate::sampling::{Sampler, SamplingParams};

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model wrote `<|endoftext|>`.
    EndOfText,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The model's context (n_positions) is full.
    ContextFull,
    /// The caller asked to stop.
    Cancelled,
}

/// A finished reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// New ids, up to and excluding the first `<|endoftext|>`.
    pub output_ids: Vec<u32>,
    pub finish: FinishReason,
}

/// Generates a reply to `prompt_ids`. `on_token` sees each new id (never the
/// end-of-text id) and returns `false` to stop early.
pub fn generate(
    model: &Gpt2,
    prompt_ids: &[u32],
    params: &SamplingParams,
    on_token: impl FnMut(u32) -> bool,
) -> Result<Generation, ModelError> {
    generate_with_adapter(model, None, prompt_ids, params, on_token)
}

/// [`generate`] through a persona's LoRA adapter applied at run time (see
/// [`LoraRuntime`]); `None` is the base model.
pub fn generate_with_adapter(
    model: &Gpt2,
    adapter: Option<&LoraRuntime>,
    prompt_ids: &[u32],
    params: &SamplingParams,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation, ModelError> {
    params.validate().map_err(|e| ModelError::Input(e.to_string()))?;
    let eos = model.config().eos_token_id;
    let n_positions = model.config().n_positions;
    if prompt_ids.is_empty() {
        return Err(ModelError::Input("empty prompt".into()));
    }
    if prompt_ids.len() >= n_positions {
        return Err(ModelError::Input(format!(
            "prompt of {} tokens leaves no room to reply in a context of {n_positions}",
            prompt_ids.len()
        )));
    }
    let mut sampler = Sampler::new(params.clone(), eos);
    let mut cache = model.new_seq_cache((prompt_ids.len() + params.max_new_tokens).min(n_positions))?;
    let mut history = prompt_ids.to_vec();
    let mut output_ids = Vec::new();
    let mut logits = model.forward_seqs_with(&[prompt_ids], &mut [&mut cache], &[adapter])?;
    loop {
        let mut row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let next = sampler.next_token(&mut row, &history, output_ids.len());
        if next == eos {
            return Ok(Generation { output_ids, finish: FinishReason::EndOfText });
        }
        output_ids.push(next);
        history.push(next);
        if !on_token(next) {
            return Ok(Generation { output_ids, finish: FinishReason::Cancelled });
        }
        if output_ids.len() >= params.max_new_tokens {
            return Ok(Generation { output_ids, finish: FinishReason::MaxTokens });
        }
        if history.len() >= n_positions {
            return Ok(Generation { output_ids, finish: FinishReason::ContextFull });
        }
        logits = model.forward_seqs_with(&[&[next]], &mut [&mut cache], &[adapter])?;
    }
}
