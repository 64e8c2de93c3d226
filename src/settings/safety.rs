//! `[safety]`: the toxicity filter on the way in and out; SIGHUP changes
//! it live.

use serde::{Deserialize, Serialize};

use super::{invalid, SettingsError};

/// `[safety]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSafety {
    pub policy: String,
    pub channels: std::collections::BTreeMap<String, String>,
    pub toxic_input: String,
    pub notice: String,
    pub blocked_words: Vec<String>,
    pub max_attempts: usize,
    pub classifier: String,
    pub classifier_device: String,
    pub classifier_thresholds: std::collections::BTreeMap<String, f32>,
}

/// What happens to a message that fails the input filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ToxicInput {
    /// Answer with `safety.notice`.
    Notice,
    /// Say nothing.
    Silent,
}

/// `[safety]`: the toxicity filter on the way in and out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SafetySettings {
    pub policy: crate::safety::Policy,
    /// Per-channel policies, keyed `platform:channel_id`.
    pub channels: std::collections::BTreeMap<String, crate::safety::Policy>,
    pub toxic_input: ToxicInput,
    pub notice: String,
    /// Words blocked everywhere (moderators' lists add to these).
    pub blocked_words: Vec<String>,
    /// Rounds of candidates drawn before the bot gives up and stays silent.
    pub max_attempts: usize,
    /// The neural classifier: a folder or hub id; empty = none. Read at
    /// start (a reload that changes it is reported, not applied).
    pub classifier: String,
    /// Where it runs (`cpu`, `cuda`, `cuda:N`); empty = `model.device`.
    pub classifier_device: String,
    /// Label → probability at which it flags; other labels are reported,
    /// not acted on. Applied live.
    pub classifier_thresholds: crate::safety::LabelThresholds,
}

impl SafetySettings {
    pub fn policy_for(&self, channel: &str) -> crate::safety::Policy {
        self.channels.get(channel).copied().unwrap_or(self.policy)
    }
}

impl RawSafety {
    pub(super) fn validate(self) -> Result<SafetySettings, SettingsError> {
        let policy = self.policy.parse().map_err(|e: crate::safety::SafetyError| invalid("safety.policy", e.to_string()))?;
        let mut channels = std::collections::BTreeMap::new();
        for (channel, p) in self.channels {
            if dialogd_adapters::ChannelKey::parse(&channel).is_none() {
                return Err(invalid("safety.channels", format!("{channel:?} is not platform:channel_id")));
            }
            let p = p.parse().map_err(|e: crate::safety::SafetyError| invalid("safety.channels", format!("{channel}: {e}")))?;
            channels.insert(channel, p);
        }
        let toxic_input = match self.toxic_input.as_str() {
            "notice" => ToxicInput::Notice,
            "silent" => ToxicInput::Silent,
            other => return Err(invalid("safety.toxic_input", format!("{other:?} is not \"notice\" or \"silent\""))),
        };
        if toxic_input == ToxicInput::Notice && self.notice.trim().is_empty() {
            return Err(invalid("safety.notice", "must not be empty when toxic_input = \"notice\""));
        }
        if self.max_attempts == 0 || self.max_attempts > 5 {
            return Err(invalid("safety.max_attempts", format!("{} is not in 1..=5", self.max_attempts)));
        }
        if let Some(w) = self.blocked_words.iter().find(|w| w.trim().is_empty()) {
            return Err(invalid("safety.blocked_words", format!("{w:?} is empty")));
        }
        if !self.classifier_device.trim().is_empty() {
            crate::serving::device(&self.classifier_device)
                .map_err(|e| invalid("safety.classifier_device", e.to_string()))?;
        }
        for (label, &p) in &self.classifier_thresholds {
            if !(p > 0.0 && p <= 1.0) {
                return Err(invalid("safety.classifier_thresholds", format!("{label} = {p} is not a probability in (0, 1]")));
            }
        }
        if self.classifier.trim().is_empty() && !self.classifier_thresholds.is_empty() {
            return Err(invalid("safety.classifier_thresholds", "set, but safety.classifier names no classifier"));
        }
        Ok(SafetySettings {
            classifier: self.classifier.trim().to_string(),
            classifier_device: self.classifier_device.trim().to_string(),
            classifier_thresholds: crate::safety::LabelThresholds { labels: self.classifier_thresholds },
            policy,
            channels,
            toxic_input,
            notice: self.notice,
            blocked_words: self.blocked_words,
            max_attempts: self.max_attempts,
        })
    }
}
