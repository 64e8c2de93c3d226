//! `[ranking]`: DialogRPT ensemble and MMI reranking of candidates.

use serde::{Deserialize, Serialize};

use super::{invalid, SettingsError};

/// `[ranking]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRanking {
    pub rankers: Vec<String>,
    pub mmi: String,
    pub device: String,
    pub dialogrpt_weight: f64,
    pub generator_weight: f64,
    pub mmi_weight: f64,
}

/// `[ranking]`: DialogRPT ensemble and MMI reranking of candidates.
#[derive(Debug, Clone, Serialize)]
pub struct RankingSettings {
    /// `[HEAD=]DIR[:WEIGHT]` per ranker; empty: no DialogRPT.
    pub rankers: Vec<String>,
    /// Reverse model folder for MMI; empty: off.
    pub mmi: String,
    /// Where the rankers and the MMI model run (`cpu`, `cuda`, `cuda:N`);
    /// empty = `model.device`.
    pub device: String,
    pub dialogrpt_weight: f64,
    pub generator_weight: f64,
    pub mmi_weight: f64,
}

impl RankingSettings {
    pub fn weights(&self) -> crate::ranking::Weights {
        crate::ranking::Weights { dialogrpt: self.dialogrpt_weight, generator: self.generator_weight, mmi: self.mmi_weight }
    }
}

impl RawRanking {
    pub(super) fn validate(self) -> Result<RankingSettings, SettingsError> {
        let mut specs = Vec::new();
        for spec in &self.rankers {
            specs.push(crate::ranking::parse_ranker(spec).map_err(|e| invalid("ranking.rankers", e.to_string()))?);
        }
        // What `run` would refuse when it builds the ensemble.
        crate::ranking::ensemble::check_weights(specs.iter().map(|s| (s.name.as_str(), s.group, s.weight)))
            .map_err(|e| invalid("ranking.rankers", e.to_string()))?;
        if !self.device.trim().is_empty() {
            crate::serving::device(&self.device).map_err(|e| invalid("ranking.device", e.to_string()))?;
        }
        let weights = crate::ranking::Weights {
            dialogrpt: self.dialogrpt_weight,
            generator: self.generator_weight,
            mmi: self.mmi_weight,
        };
        for (key, w) in [
            ("ranking.dialogrpt_weight", weights.dialogrpt),
            ("ranking.generator_weight", weights.generator),
            ("ranking.mmi_weight", weights.mmi),
        ] {
            if !w.is_finite() {
                return Err(invalid(key, "must be a number"));
            }
        }
        Ok(RankingSettings {
            rankers: self.rankers,
            mmi: self.mmi,
            device: self.device.trim().to_string(),
            dialogrpt_weight: weights.dialogrpt,
            generator_weight: weights.generator,
            mmi_weight: weights.mmi,
        })
    }
}
