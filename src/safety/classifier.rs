//! The optional neural toxicity classifier: the trait it implements and
//! per-label thresholds.
//!
//! The intended model is a Detoxify-style multi-label classifier
//! (`unitary/toxic-bert`: BERT + a linear head over labels such as `toxic`,
//! `severe_toxic`, `obscene`, `threat`, `insult`, `identity_hate`), run on the
//! pool's device; each label's probability is an independent sigmoid and
//! each has its own threshold in settings. No implementation ships yet (see
//! ARCHITECTURE.md); the filter works without one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Category, Hit, SafetyError, Severity};

/// A multi-label toxicity classifier.
pub trait ToxicityClassifier: Send + Sync {
    /// The label names, in the order of each probability row.
    fn labels(&self) -> &[String];

    /// One row of per-label probabilities (sigmoids, each in [0, 1]) per
    /// text, for all texts in one batch.
    fn probabilities(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, SafetyError>;
}

/// Per-label thresholds; labels not named use `default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelThresholds {
    pub default: f32,
    pub labels: BTreeMap<String, f32>,
}

impl Default for LabelThresholds {
    fn default() -> Self {
        Self { default: 0.5, labels: BTreeMap::new() }
    }
}

impl LabelThresholds {
    pub fn threshold(&self, label: &str) -> f32 {
        self.labels.get(label).copied().unwrap_or(self.default)
    }

    /// The hits of one row of probabilities: every label at or over its
    /// threshold. Severity grows with the margin: moderate from halfway
    /// between the threshold and 1, severe from 0.95 of the way.
    pub fn hits(&self, labels: &[String], probabilities: &[f32]) -> Result<Vec<Hit>, SafetyError> {
        if labels.len() != probabilities.len() {
            return Err(SafetyError::Classifier(format!("{} probabilities for {} labels", probabilities.len(), labels.len())));
        }
        let mut hits = Vec::new();
        for (label, &p) in labels.iter().zip(probabilities) {
            if !(0.0..=1.0).contains(&p) {
                return Err(SafetyError::Classifier(format!("label {label}: {p} is not a probability")));
            }
            let t = self.threshold(label);
            if p < t {
                continue;
            }
            let margin = if t < 1.0 { (p - t) / (1.0 - t) } else { 1.0 };
            let severity = match margin {
                m if m >= 0.95 => Severity::Severe,
                m if m >= 0.5 => Severity::Moderate,
                _ => Severity::Mild,
            };
            hits.push(Hit { category: Category::Toxicity, severity, source: "classifier", detail: Some(format!("{label} {p:.3}")) });
        }
        Ok(hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_per_label() {
        let labels: Vec<String> = ["toxic", "threat", "insult"].iter().map(|s| s.to_string()).collect();
        let mut t = LabelThresholds::default();
        t.labels.insert("threat".into(), 0.2);
        let hits = t.hits(&labels, &[0.49, 0.25, 0.999]).unwrap();
        let details: Vec<_> = hits.iter().map(|h| (h.detail.clone().unwrap(), h.severity)).collect();
        assert_eq!(details, vec![("threat 0.250".into(), Severity::Mild), ("insult 0.999".into(), Severity::Severe)]);
        assert!(t.hits(&labels, &[0.1, 0.2]).is_err());
        assert!(t.hits(&labels, &[0.1, f32::NAN, 0.3]).is_err());
    }
}
