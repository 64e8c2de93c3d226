//! Held-out evaluation and the promotion gate.
//!
//! Held-out loss is the loss-weighted mean next-token NLL over every trained
//! position of the held-out examples (the same positions and weights as
//! training); perplexity is its exponential. A job writes the numbers
//! before and after training to `OUT/metrics.json`; the daemon promotes the
//! job's output only if [`gate`] says so.

use serde::{Deserialize, Serialize};

use super::data::{Batch, Example};
use super::model::TrainableGpt2;
use super::Result;

/// Loss and perplexity over a held-out set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub perplexity: f64,
    /// Sum of loss weights (trained positions, for weights of 1).
    pub tokens: f64,
    pub examples: usize,
}

/// Evaluates the model on `examples` in batches of `batch_size`; `None` for
/// an empty set.
pub fn evaluate(model: &TrainableGpt2, examples: &[Example], batch_size: usize, pad_id: u32) -> Result<Option<EvalMetrics>> {
    if examples.is_empty() {
        return Ok(None);
    }
    let mut weighted_nll = 0f64;
    let mut total_weight = 0f64;
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = Batch::new(&refs, pad_id, model.device())?;
        let (_, sum) = model.loss(&batch)?;
        weighted_nll += sum;
        total_weight += batch.total_weight as f64;
    }
    let loss = weighted_nll / total_weight;
    Ok(Some(EvalMetrics { loss, perplexity: loss.exp(), tokens: total_weight, examples: examples.len() }))
}

/// The gate's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateDecision {
    pub promote: bool,
    pub reason: String,
}

/// Promote only if held-out perplexity after training is at most
/// `(1 + max_regression)` times what it was before (`max_regression` 0:
/// must not get worse at all; 0.05: may get up to 5% worse). A job without
/// held-out data, or with a non-finite perplexity, is not promoted.
pub fn gate(before: Option<&EvalMetrics>, after: Option<&EvalMetrics>, max_regression: f64) -> GateDecision {
    let (Some(before), Some(after)) = (before, after) else {
        return GateDecision { promote: false, reason: "no held-out evaluation (use --eval-fraction > 0)".into() };
    };
    if !after.perplexity.is_finite() {
        return GateDecision { promote: false, reason: format!("held-out perplexity is {}", after.perplexity) };
    }
    let limit = before.perplexity * (1.0 + max_regression.max(0.0));
    if after.perplexity <= limit {
        GateDecision {
            promote: true,
            reason: format!("held-out perplexity {:.3} → {:.3} (limit {:.3})", before.perplexity, after.perplexity, limit),
        }
    } else {
        GateDecision {
            promote: false,
            reason: format!(
                "held-out perplexity regressed {:.3} → {:.3}, past the limit {:.3}",
                before.perplexity, after.perplexity, limit
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(perplexity: f64) -> EvalMetrics {
        EvalMetrics { loss: perplexity.ln(), perplexity, tokens: 10.0, examples: 2 }
    }

    #[test]
    fn gate_promotes_within_the_threshold_only() {
        assert!(gate(Some(&m(20.0)), Some(&m(15.0)), 0.0).promote);
        assert!(!gate(Some(&m(20.0)), Some(&m(21.0)), 0.0).promote);
        assert!(gate(Some(&m(20.0)), Some(&m(21.0)), 0.1).promote);
        assert!(!gate(Some(&m(20.0)), Some(&m(f64::NAN)), 0.1).promote);
        assert!(!gate(None, Some(&m(1.0)), 0.1).promote);
    }
}
