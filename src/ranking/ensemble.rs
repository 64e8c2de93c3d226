//! The DialogRPT ensemble: human-likeness prior times engagement.
//!
//! As in DialogRPT's `restore/ensemble.yml` (and gpt2bot):
//! prior = weighted mean of `human-vs-rand` and `human-vs-machine`;
//! cond = weighted mean of `updown`, `depth` and `width` (width's weight is
//! negative: wide threads are many replies to a post, not one good one);
//! final = prior × cond. A group with no member counts as 1, so a single
//! `updown` ranker yields its own score. On top, [`Weights`] can mix in the
//! generator's mean token log-probability and an MMI score linearly.

use serde::{Deserialize, Serialize};

use super::dialogrpt::DialogRpt;
use super::RankingError;

/// The two halves of the ensemble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// Is this a human-like reply at all (context-free prior)?
    Prior,
    /// How will it be received (conditioned on the context)?
    Cond,
}

/// The published DialogRPT heads, with their group and `ensemble.yml` weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Head {
    Updown,
    Depth,
    Width,
    HumanVsRand,
    HumanVsMachine,
}

impl Head {
    pub const ALL: [Head; 5] = [Head::Updown, Head::Depth, Head::Width, Head::HumanVsRand, Head::HumanVsMachine];

    pub fn name(self) -> &'static str {
        match self {
            Head::Updown => "updown",
            Head::Depth => "depth",
            Head::Width => "width",
            Head::HumanVsRand => "human-vs-rand",
            Head::HumanVsMachine => "human-vs-machine",
        }
    }

    pub fn group(self) -> Group {
        match self {
            Head::HumanVsRand | Head::HumanVsMachine => Group::Prior,
            _ => Group::Cond,
        }
    }

    /// The weight DialogRPT's `ensemble.yml` gives this head.
    pub fn default_weight(self) -> f64 {
        match self {
            Head::Updown => 1.0,
            Head::Depth => 0.48,
            Head::Width => -0.5,
            Head::HumanVsRand | Head::HumanVsMachine => 0.5,
        }
    }

    /// `updown`, `human_vs_rand`, `human-vs-rand`, … (any case).
    pub fn parse(text: &str) -> Option<Head> {
        let norm = text.trim().to_ascii_lowercase().replace('_', "-");
        Head::ALL.into_iter().find(|h| h.name() == norm)
    }

    /// The head a checkpoint folder's name suggests (`DialogRPT-updown`,
    /// `dialogrpt_human_vs_rand`, …), if exactly one matches.
    pub fn from_folder_name(name: &str) -> Option<Head> {
        let norm = name.to_ascii_lowercase().replace('_', "-");
        // "human-vs-rand" contains neither "updown" nor "depth"/"width", so
        // plain substring tests are unambiguous.
        let found: Vec<Head> = Head::ALL.into_iter().filter(|h| norm.contains(h.name())).collect();
        (found.len() == 1).then(|| found[0])
    }
}

/// One ranker of the ensemble.
#[derive(Debug, Clone)]
pub struct Member {
    /// Shown in logs and per-ranker scores.
    pub name: String,
    pub group: Group,
    pub weight: f64,
    pub ranker: DialogRpt,
}

/// Weighted means per group, multiplied.
#[derive(Debug, Clone)]
pub struct Ensemble {
    members: Vec<Member>,
}

/// Every number behind an ensemble ranking, one entry per candidate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnsembleScores {
    pub prior: Vec<f32>,
    pub cond: Vec<f32>,
    /// prior × cond.
    pub final_scores: Vec<f32>,
    /// Each member's own scores, in member order.
    pub members: Vec<(String, Vec<f32>)>,
}

/// Checks `(name, group, weight)` of an ensemble's members before any is
/// loaded: every weight is a number and every non-empty group's weights do
/// not sum to 0 (a weighted mean divides by the sum). `dialogd rank`,
/// `dialogd check-config` and `dialogd run` all ask this.
pub fn check_weights<'a>(members: impl IntoIterator<Item = (&'a str, Group, f64)>) -> Result<(), RankingError> {
    let members: Vec<(&str, Group, f64)> = members.into_iter().collect();
    for group in [Group::Prior, Group::Cond] {
        let in_group: Vec<&(&str, Group, f64)> = members.iter().filter(|m| m.1 == group).collect();
        if let Some(m) = in_group.iter().find(|m| !m.2.is_finite()) {
            return Err(RankingError::Ensemble(format!("ranker {} has a weight that is not a number", m.0)));
        }
        let sum: f64 = in_group.iter().map(|m| m.2).sum();
        if !in_group.is_empty() && sum.abs() < 1e-9 {
            return Err(RankingError::Ensemble(format!("the {group:?} weights sum to 0; a weighted mean needs a non-zero sum")));
        }
    }
    Ok(())
}

impl Ensemble {
    /// Checks that every non-empty group has weights that do not sum to 0.
    pub fn new(members: Vec<Member>) -> Result<Self, RankingError> {
        if members.is_empty() {
            return Err(RankingError::Ensemble("no rankers".into()));
        }
        check_weights(members.iter().map(|m| (m.name.as_str(), m.group, m.weight)))?;
        Ok(Self { members })
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Scores every candidate with every member (one batched forward pass
    /// per member) and combines them.
    pub fn scores(&self, turns: &[Vec<u32>], candidates: &[Vec<u32>]) -> Result<EnsembleScores, RankingError> {
        let mut members = Vec::with_capacity(self.members.len());
        for member in &self.members {
            members.push((member.name.clone(), member.ranker.scores(turns, candidates)?));
        }
        let mut out = {
            let weighted: Vec<(Group, f64, &[f32])> =
                self.members.iter().zip(&members).map(|(m, (_, s))| (m.group, m.weight, s.as_slice())).collect();
            combine(&weighted, candidates.len(), Vec::new())
        };
        out.members = members;
        Ok(out)
    }
}

/// The ensemble arithmetic on given member scores.
pub fn combine(weighted: &[(Group, f64, &[f32])], n: usize, members: Vec<(String, Vec<f32>)>) -> EnsembleScores {
    let mean = |group: Group| -> Vec<f32> {
        let in_group: Vec<_> = weighted.iter().filter(|(g, _, _)| *g == group).collect();
        if in_group.is_empty() {
            return vec![1.0; n];
        }
        let total: f64 = in_group.iter().map(|(_, w, _)| w).sum();
        (0..n).map(|i| (in_group.iter().map(|(_, w, s)| w * s[i] as f64).sum::<f64>() / total) as f32).collect()
    };
    let (prior, cond) = (mean(Group::Prior), mean(Group::Cond));
    let final_scores = prior.iter().zip(&cond).map(|(p, c)| p * c).collect();
    EnsembleScores { prior, cond, final_scores, members }
}

/// How the final ranking mixes its signals (settings `[ranking]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Weights {
    /// Weight of the DialogRPT ensemble's final score (in (0, 1)).
    pub dialogrpt: f64,
    /// Weight of the generator's mean token log-probability (≤ 0).
    pub generator: f64,
    /// Weight of the MMI score (−mean NLL of the source, ≤ 0).
    pub mmi: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self { dialogrpt: 1.0, generator: 0.0, mmi: 0.0 }
    }
}

impl Weights {
    /// `dialogrpt · rpt + generator · logprob + mmi · mmi`; a signal that is
    /// absent counts as 0.
    pub fn mix(&self, rpt: Option<f32>, generator_logprob: Option<f32>, mmi: Option<f32>) -> f64 {
        self.dialogrpt * rpt.unwrap_or(0.0) as f64
            + self.generator * generator_logprob.unwrap_or(0.0) as f64
            + self.mmi * mmi.unwrap_or(0.0) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_and_have_ensemble_yml_weights() {
        assert_eq!(Head::parse("Human_vs_Rand"), Some(Head::HumanVsRand));
        assert_eq!(Head::parse("updown"), Some(Head::Updown));
        assert_eq!(Head::parse("karma"), None);
        assert_eq!(Head::from_folder_name("DialogRPT-width"), Some(Head::Width));
        assert_eq!(Head::from_folder_name("dialogrpt_human_vs_machine"), Some(Head::HumanVsMachine));
        assert_eq!(Head::from_folder_name("my-ranker"), None);
        assert_eq!(Head::Width.default_weight(), -0.5);
        assert_eq!(Head::Depth.group(), Group::Cond);
        assert_eq!(Head::HumanVsMachine.group(), Group::Prior);
    }

    #[test]
    fn combine_is_weighted_means_times() {
        let (a, b, c) = ([0.2f32, 0.8], [0.6f32, 0.4], [0.5f32, 0.1]);
        let weighted = [(Group::Prior, 0.5, &a[..]), (Group::Cond, 1.0, &b[..]), (Group::Cond, -0.5, &c[..])];
        let out = combine(&weighted, 2, vec![]);
        // prior = a; cond = (b - 0.5c) / 0.5.
        assert_eq!(out.prior, vec![0.2, 0.8]);
        let cond = [(0.6 - 0.25) / 0.5, (0.4 - 0.05) / 0.5];
        for i in 0..2 {
            assert!((out.cond[i] - cond[i]).abs() < 1e-6);
            assert!((out.final_scores[i] - a[i] * cond[i]).abs() < 1e-6);
        }
        // No prior: the cond mean alone.
        let out = combine(&[(Group::Cond, 2.0, &b[..])], 2, vec![]);
        assert_eq!(out.final_scores, b.to_vec());
    }

    #[test]
    fn weights_mix_linearly() {
        let w = Weights { dialogrpt: 1.0, generator: 0.1, mmi: 0.2 };
        assert!((w.mix(Some(0.5), Some(-2.0), Some(-3.0)) - (0.5 - 0.2 - 0.6)).abs() < 1e-9);
        assert_eq!(Weights::default().mix(Some(0.25), Some(-9.0), None), 0.25);
    }
}
