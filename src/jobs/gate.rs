//! The promotion gate: whether a trained job may serve, and the rollback
//! message.
//!
//! A job passes when (1) the trainer's own gate passed (held-out
//! perplexity did not rise past `jobs.max_ppl_regression`; the trainer
//! writes its decision to `metrics.json` as `gate.promote` and
//! `gate.reason`) and (2) the new model answers every `jobs.probes` prompt
//! with a reply that is not empty, not degenerate (an echo of the prompt)
//! and not flagged by the safety filter as configured now. Probe prompts
//! are built with [`persona_prompt`], the function serving uses, so a
//! persona's seed turns are in the probes exactly as users get them.

use std::path::Path;

use crate::model::Gpt2;
use crate::personas::persona_prompt;
use crate::prompt::Prompt;
use crate::safety::{blocked_list, Filter};
use crate::sampling::SamplingParams;
use crate::serving::ModelSpec;
use crate::settings::SafetySettings;
use crate::tokenizer::DialogTokenizer;

use super::store::{JobStore, StoreError};
use super::{ProbeResult, Target};

/// Why the gate could not be run (as opposed to a job it rejects).
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("loading the new model: {0}")]
    Load(String),
    #[error("probing: {0}")]
    Probe(String),
}

/// The trainer's decision in its `metrics.json`: whether it promotes, and
/// why (`no gate decision` when the file has none, which rejects).
pub fn trainer_decision(metrics: &serde_json::Value) -> (bool, String) {
    let promote = metrics.pointer("/gate/promote").and_then(|v| v.as_bool()).unwrap_or(false);
    let reason = metrics.pointer("/gate/reason").and_then(|v| v.as_str()).unwrap_or("no gate decision").to_string();
    (promote, reason)
}

/// Why a new model's reply to a probe prompt fails the gate (empty, an
/// echo of the prompt, flagged by the safety filter under `safety`'s
/// global policy and blocked words), or `None` if it passes.
pub fn judge_probe(prompt: &str, reply: &str, safety: &SafetySettings) -> Option<String> {
    if reply.trim().is_empty() {
        return Some("empty reply".into());
    }
    if let Some(Some(why)) = crate::ranking::degeneration::screen(&[reply.to_string()], prompt, &[]).first() {
        return Some(format!("{why:?}"));
    }
    let blocked = blocked_list(safety.blocked_words.iter().map(String::as_str));
    match Filter::new().check(reply, safety.policy, Some(&blocked)) {
        Ok(verdict) if verdict.flagged => Some(format!("flagged by the safety filter: {:?}", verdict.categories)),
        Ok(_) => None,
        Err(e) => Some(format!("safety filter failed: {e}")),
    }
}

/// The prompt a probe sends: the persona's seed turns, then the probe
/// prompt as the user's turn, within the model's context less the reply's
/// room — the same [`persona_prompt`] serving uses.
pub fn probe_prompt(
    tokenizer: &DialogTokenizer,
    seed: &[String],
    prompt: &str,
    n_positions: usize,
    params: &SamplingParams,
) -> Result<Prompt, GateError> {
    let probe = |e: &dyn std::fmt::Display| GateError::Probe(format!("{prompt:?}: {e}"));
    let turn = tokenizer.encode(&crate::prompt::normalize_turn(prompt)).map_err(|e| probe(&e))?;
    persona_prompt(tokenizer, seed, &[turn], n_positions.saturating_sub(params.max_new_tokens)).map_err(|e| probe(&e))
}

/// What the gate needs to probe a job's model.
pub struct Probe<'a> {
    /// How the base model is served (device, dtype, quantize, kv_cache).
    pub spec: &'a ModelSpec,
    /// The base checkpoint the job trained from (the tokenizer's folder).
    pub base_dir: &'a Path,
    /// The job's output: a checkpoint (base) or an adapter (persona).
    pub output: &'a Path,
    pub target: &'a Target,
    /// The persona's seed turns (empty for the base model).
    pub seed: &'a [String],
    /// `jobs.probes`.
    pub prompts: &'a [String],
    /// The served sampling parameters; probes draw greedily from them.
    pub params: SamplingParams,
    pub safety: &'a SafetySettings,
}

impl Probe<'_> {
    /// Loads the job's model and answers each probe prompt with it
    /// (greedy). Blocking: run it off the async threads. Returns the model
    /// when it is a new base, so promotion need not load it twice.
    pub fn run(&self) -> Result<(Option<Gpt2>, Vec<ProbeResult>), GateError> {
        let load = |e: &dyn std::fmt::Display| GateError::Load(e.to_string());
        let tokenizer = DialogTokenizer::from_dir(self.base_dir).map_err(|e| load(&e))?;
        let model = match self.target {
            Target::Base => crate::serving::load_weights(self.spec, self.output).map_err(|e| load(&e))?,
            Target::Persona(_) => {
                let device = self.spec.device().map_err(|e| load(&e))?;
                let dtype = self.spec.dtype().map_err(|e| load(&e))?;
                crate::training::load_persona(self.base_dir, self.output, dtype, &device).map_err(|e| load(&e))?
            }
        };
        let mut params = self.params.clone();
        params.temperature = 0.0;
        params.seed = Some(0);
        let mut results = Vec::new();
        for prompt in self.prompts {
            let probe = |e: &dyn std::fmt::Display| GateError::Probe(format!("{prompt:?}: {e}"));
            let built = probe_prompt(&tokenizer, self.seed, prompt, model.config().n_positions, &params)?;
            let generated = crate::generate::generate(&model, &built.ids, &params, |_| true).map_err(|e| probe(&e))?;
            let reply = tokenizer.decode(&generated.output_ids).map_err(|e| probe(&e))?.trim().to_string();
            let failed = judge_probe(prompt, &reply, self.safety);
            results.push(ProbeResult { prompt: prompt.clone(), reply, failed });
        }
        Ok((matches!(self.target, Target::Base).then_some(model), results))
    }
}

/// Rolls `target` back one version and says what it serves now.
pub async fn rollback_text(store: &JobStore, target: &Target) -> Result<String, StoreError> {
    Ok(match store.rollback(target).await? {
        None => format!("{target} already serves its original version."),
        Some(id) => {
            let now = store.versions(target).await?.last().map_or("its original version".to_string(), |v| format!("job #{v}"));
            format!("Rolled back job #{id}: {target} serves {now} again (within a few seconds).")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trainer_decision_is_read_and_missing_means_no() {
        let metrics = serde_json::json!({"gate": {"promote": true, "reason": "held-out perplexity 40.1 → 30.2"}});
        assert_eq!(trainer_decision(&metrics), (true, "held-out perplexity 40.1 → 30.2".to_string()));
        assert_eq!(trainer_decision(&serde_json::json!({})), (false, "no gate decision".to_string()));
    }
}
