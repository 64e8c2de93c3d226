//! Toxicity filtering, on the way in (user turns) and on the way out
//! (candidate replies).
//!
//! One call, [`Filter::check`], answers a [`Verdict`] for a text under a
//! channel's [`Policy`] and its moderators' [`WordList`]. The same filter
//! serves both directions: the pipeline drops flagged input before it is
//! stored or collected, and flagged candidates before ranking.
//!
//! - [`rules`]: the fast offline default, the `rustrict` crate (it sees
//!   through "f*ck", spacing, repeated letters and look-alike characters and
//!   knows "Scunthorpe" and "assassin" are fine), mapped to our categories.
//! - [`words`]: moderator word lists per guild/chat, matched through the
//!   same kinds of obfuscation; [`store`] keeps them (Redis or memory) for
//!   the daemon's `/block`, `/allow` and kin.
//! - [`classifier`]: the optional neural classifier (`[safety] classifier`:
//!   BERT, RoBERTa, XLM-R or DistilBERT sequence classifiers in the Hugging
//!   Face layout, run with candle-transformers), its trait and per-label
//!   thresholds. It reads what the word filter let through.

pub mod classifier;
pub mod markup;
pub mod rules;
pub mod store;
pub mod words;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use classifier::hf::HfClassifier;
pub use classifier::{LabelThresholds, ToxicityClassifier};
pub use rules::RuleFilter;
pub use store::{WordChange, WordOutcome, WordStore};
pub use words::{WordList, WordLists};

/// Safety failures.
#[derive(Debug, thiserror::Error)]
pub enum SafetyError {
    #[error("`{0}` is not a policy: use strict, standard or off")]
    UnknownPolicy(String),
    #[error("word list: {0}")]
    WordList(String),
    #[error("classifier: {0}")]
    Classifier(String),
    #[error("text of {len} bytes is longer than the {max} the filter reads")]
    TooLong { len: usize, max: usize },
}

/// How much a channel tolerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Anything inappropriate, mild profanity included.
    Strict,
    /// Slurs, sexual content, insults and profanity from moderate up;
    /// "damn" and "crap" pass.
    #[default]
    Standard,
    /// Nothing is checked (moderator words included).
    Off,
}

impl Policy {
    /// The name settings use, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Strict => "strict",
            Policy::Standard => "standard",
            Policy::Off => "off",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = SafetyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "strict" => Ok(Policy::Strict),
            "standard" => Ok(Policy::Standard),
            "off" => Ok(Policy::Off),
            other => Err(SafetyError::UnknownPolicy(other.to_string())),
        }
    }
}

/// What kind of harm a detection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Swearing.
    Profanity,
    /// Slurs and hate against groups.
    Hate,
    /// Sexual content.
    Sexual,
    /// Insults and abuse aimed at someone.
    Insult,
    /// Deliberate disguise of the above.
    Evasion,
    /// A word the channel's moderators blocked.
    Blocked,
    /// A neural classifier's label over its threshold.
    Toxicity,
}

impl Category {
    /// The snake_case name (as serialized), for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Profanity => "profanity",
            Self::Hate => "hate",
            Self::Sexual => "sexual",
            Self::Insult => "insult",
            Self::Evasion => "evasion",
            Self::Blocked => "blocked",
            Self::Toxicity => "toxicity",
        }
    }

    /// Categories as one comma-separated field, for logs.
    pub fn joined(categories: &[Category]) -> String {
        categories.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(",")
    }
}

/// How bad a detection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Mild,
    Moderate,
    Severe,
}

/// One detection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub category: Category,
    pub severity: Severity,
    /// `rules`, `moderator` or `classifier`.
    pub source: &'static str,
    /// The blocked word, or the classifier label and probability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The filter's answer for one text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Whether the policy says to block the text.
    pub flagged: bool,
    /// The categories that made it flagged (sorted, distinct).
    pub categories: Vec<Category>,
    /// Every detection, including those the policy tolerates.
    pub hits: Vec<Hit>,
    /// The classifier's probability per label, when it read the text
    /// (labels without a threshold included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classifier: Option<std::collections::BTreeMap<String, f32>>,
}

impl Verdict {
    /// The classifier's labels over their thresholds: one per `classifier`
    /// hit, read from its detail (`LABEL P`, [`LabelThresholds::hits`]).
    pub fn classifier_labels(&self) -> impl Iterator<Item = &str> {
        self.hits
            .iter()
            .filter(|h| h.source == "classifier")
            .filter_map(|h| h.detail.as_deref()?.rsplit_once(' ').map(|(label, _)| label))
    }

    fn from_hits(policy: Policy, hits: Vec<Hit>) -> Self {
        let mut categories: Vec<Category> = hits.iter().filter(|h| policy.blocks(h)).map(|h| h.category).collect();
        categories.sort();
        categories.dedup();
        Self { flagged: !categories.is_empty(), categories, hits, classifier: None }
    }
}

impl Policy {
    /// Whether a detection is enough to block under this policy.
    pub fn blocks(self, hit: &Hit) -> bool {
        let least = match (self, hit.category) {
            (Policy::Off, _) => return false,
            // Moderators and the classifier's thresholds already decided.
            (_, Category::Blocked | Category::Toxicity) => Severity::Mild,
            (Policy::Strict, _) => Severity::Mild,
            (Policy::Standard, Category::Hate) => Severity::Mild,
            (Policy::Standard, Category::Evasion) => Severity::Severe,
            (Policy::Standard, _) => Severity::Moderate,
        };
        hit.severity >= least
    }
}

/// A word list that blocks each of `words` (the operator's
/// `safety.blocked_words`); a word the list refuses is skipped (the
/// settings validate them first).
pub fn blocked_list<'a>(words: impl IntoIterator<Item = &'a str>) -> WordList {
    let mut lists = WordLists::default();
    for word in words {
        let _ = lists.block("global", word);
    }
    lists.get("global").cloned().unwrap_or_default()
}

/// The longest text the filter reads; platform messages are far shorter.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// The rule filter, moderator words and an optional classifier together.
/// Cheap to clone (the classifier is shared).
#[derive(Clone, Default)]
pub struct Filter {
    rules: RuleFilter,
    classifier: Option<(Arc<dyn ToxicityClassifier>, LabelThresholds)>,
    /// Whether the classifier also reads texts the words already flagged
    /// (`dialogd moderate` reports everything; the daemon saves the work).
    classify_flagged: bool,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter").field("classifier", &self.classifier.as_ref().map(|(c, _)| c.labels().to_vec())).finish()
    }
}

impl Filter {
    /// The offline rule filter alone.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a neural classifier; a label flags when its probability reaches
    /// its threshold (labels without one are reported, never acted on). It
    /// reads only the texts the words and rules let through, unless
    /// [`Filter::classifying_flagged`].
    pub fn with_classifier(mut self, classifier: Arc<dyn ToxicityClassifier>, thresholds: LabelThresholds) -> Self {
        self.classifier = Some((classifier, thresholds));
        self
    }

    /// The classifier also reads texts the words already flagged.
    pub fn classifying_flagged(mut self) -> Self {
        self.classify_flagged = true;
        self
    }

    /// Whether a classifier is attached (its forward passes are heavy: the
    /// daemon runs such a filter off the async workers).
    pub fn has_classifier(&self) -> bool {
        self.classifier.is_some()
    }

    /// Checks one text.
    pub fn check(&self, text: &str, policy: Policy, words: Option<&WordList>) -> Result<Verdict, SafetyError> {
        Ok(self.check_batch(&[text], policy, words)?.pop().unwrap_or_else(|| Verdict::from_hits(policy, vec![])))
    }

    /// Checks several texts (a message's candidates); the classifier, if
    /// any, sees them in one batch.
    pub fn check_batch(&self, texts: &[&str], policy: Policy, words: Option<&WordList>) -> Result<Vec<Verdict>, SafetyError> {
        if policy == Policy::Off {
            return Ok(texts.iter().map(|_| Verdict::from_hits(policy, vec![])).collect());
        }
        if let Some(text) = texts.iter().find(|t| t.len() > MAX_TEXT_BYTES) {
            return Err(SafetyError::TooLong { len: text.len(), max: MAX_TEXT_BYTES });
        }
        // Mentions, emoji ids, URLs and code fences are not words.
        let texts: Vec<std::borrow::Cow<'_, str>> = texts.iter().map(|t| markup::neutralise(t)).collect();
        let texts: Vec<&str> = texts.iter().map(|t| t.as_ref()).collect();
        let mut all_hits: Vec<Vec<Hit>> = texts
            .iter()
            .map(|text| {
                let mut hits = Vec::new();
                if let Some(list) = words {
                    hits.extend(list.blocked_in(text));
                }
                let masked = words.map(|l| l.mask_allowed(text));
                hits.extend(self.rules.analyze(masked.as_deref().unwrap_or(text)));
                hits
            })
            .collect();
        let mut probabilities: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        if let Some((classifier, thresholds)) = &self.classifier {
            // After the words: a text they flagged needs no second opinion.
            let unread: Vec<usize> = (0..texts.len())
                .filter(|&i| self.classify_flagged || !all_hits[i].iter().any(|h| policy.blocks(h)))
                .collect();
            if !unread.is_empty() {
                let batch: Vec<&str> = unread.iter().map(|&i| texts[i]).collect();
                let rows = classifier.probabilities(&batch)?;
                if rows.len() != batch.len() {
                    return Err(SafetyError::Classifier(format!("{} answers for {} texts", rows.len(), batch.len())));
                }
                for (&i, row) in unread.iter().zip(rows) {
                    all_hits[i].extend(thresholds.hits(classifier.labels(), &row)?);
                    probabilities[i] = Some(row);
                }
            }
        }
        let labels = self.classifier.as_ref().map(|(c, _)| c.labels());
        Ok(all_hits
            .into_iter()
            .zip(probabilities)
            .map(|(hits, row)| {
                let mut verdict = Verdict::from_hits(policy, hits);
                if let (Some(labels), Some(row)) = (labels, row) {
                    verdict.classifier = Some(labels.iter().cloned().zip(row).collect());
                }
                verdict
            })
            .collect())
    }
}

/// Loads `[safety] classifier`: a folder, or a hub id fetched like the
/// models (config.json, tokenizer.json and the weights), onto `device`.
///
/// Errors: the folder or hub id cannot be resolved, or the checkpoint is
/// not a classifier this reads (see [`classifier::hf`]).
pub fn load_classifier(spec: &str, device: &candle_core::Device) -> Result<HfClassifier, SafetyError> {
    let dir = crate::model::hub::resolve_checkpoint(spec, &[&["tokenizer.json"]])
        .map_err(|e| SafetyError::Classifier(format!("{spec}: {e}")))?;
    HfClassifier::load(&dir, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(category: Category, severity: Severity) -> Hit {
        Hit { category, severity, source: "rules", detail: None }
    }

    #[test]
    fn policies_order_by_tolerance() {
        let mild_swear = hit(Category::Profanity, Severity::Mild);
        let slur = hit(Category::Hate, Severity::Mild);
        let insult = hit(Category::Insult, Severity::Moderate);
        assert!(Policy::Strict.blocks(&mild_swear));
        assert!(!Policy::Standard.blocks(&mild_swear));
        assert!(Policy::Standard.blocks(&slur) && Policy::Standard.blocks(&insult));
        assert!(!Policy::Off.blocks(&slur));
        assert_eq!("STRICT".parse::<Policy>().unwrap(), Policy::Strict);
        assert!("lenient".parse::<Policy>().is_err());
    }
}
