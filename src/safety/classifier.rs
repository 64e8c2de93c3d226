//! The optional neural toxicity classifier: the trait it implements,
//! per-label thresholds, and the models behind it.
//!
//! - [`hf`]: BERT, RoBERTa, XLM-R and DistilBERT sequence classifiers in
//!   the Hugging Face layout (the Detoxify checkpoints, `unitary/toxic-bert`
//!   and kin, and single-label ones), run with candle-transformers.
//! - [`synthetic`]: deterministic random weights for those layouts, the
//!   formula `scripts/make_golden_toxic.py` shares (tests and benchmarks).
//!
//! `[safety] classifier` names a folder or hub id; `classifier_thresholds`
//! gives a probability per label at which it flags. Labels without a
//! threshold are reported (`dialogd moderate --json`, counters), never
//! acted on.

pub mod hf;
pub mod synthetic;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Category, Hit, SafetyError, Severity};

/// A toxicity classifier over a fixed set of labels.
pub trait ToxicityClassifier: Send + Sync {
    /// The label names, in the order of each probability row.
    fn labels(&self) -> &[String];

    /// One row of per-label probabilities (each in [0, 1]: sigmoids for a
    /// multi-label model, a softmax for a single-label one) per text, for
    /// all texts in one batch.
    fn probabilities(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, SafetyError>;
}

/// Per-label thresholds (`[safety] classifier_thresholds`); a label not
/// named is reported, never flagged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LabelThresholds {
    pub labels: BTreeMap<String, f32>,
}

impl LabelThresholds {
    /// The threshold of `label`, if it has one.
    pub fn threshold(&self, label: &str) -> Option<f32> {
        self.labels.get(label).copied()
    }

    /// Refuses a threshold for a label the classifier does not have
    /// (naming it and the labels it has).
    pub fn check_labels(&self, labels: &[String]) -> Result<(), SafetyError> {
        match self.labels.keys().find(|l| !labels.contains(l)) {
            Some(unknown) => Err(SafetyError::Classifier(format!(
                "classifier_thresholds names `{unknown}`, which the classifier does not have (its labels: {})",
                labels.join(", ")
            ))),
            None => Ok(()),
        }
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
            let Some(t) = self.threshold(label) else { continue };
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
        t.labels.insert("insult".into(), 0.5);
        // `toxic` has no threshold: 0.49 or 0.99, it is not acted on.
        let hits = t.hits(&labels, &[0.49, 0.25, 0.999]).unwrap();
        let details: Vec<_> = hits.iter().map(|h| (h.detail.clone().unwrap(), h.severity)).collect();
        assert_eq!(details, vec![("threat 0.250".into(), Severity::Mild), ("insult 0.999".into(), Severity::Severe)]);
        let verdict = crate::safety::Verdict { flagged: true, categories: vec![Category::Toxicity], hits, classifier: None };
        assert_eq!(verdict.classifier_labels().collect::<Vec<_>>(), ["threat", "insult"]);
        assert!(t.hits(&labels, &[0.1, 0.2]).is_err());
        assert!(t.hits(&labels, &[0.1, f32::NAN, 0.3]).is_err());
        assert!(t.hits(&labels, &[0.99, 0.1, 0.1]).unwrap().is_empty());
        assert!(t.check_labels(&labels).is_ok());
        t.labels.insert("toxicity".into(), 0.5);
        assert!(t.check_labels(&labels).unwrap_err().to_string().contains("`toxicity`"));
    }
}
