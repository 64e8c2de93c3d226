//! Ranker specs: the `[HEAD=]DIR[:WEIGHT]` strings of `dialogd rank
//! --ranker` and `ranking.rankers`.
//!
//! HEAD is one of `updown`, `depth`, `width`, `human-vs-rand`,
//! `human-vs-machine` (which sets the ensemble group and the default weight
//! of DialogRPT's `ensemble.yml`), or `prior`/`cond` for a group with
//! weight 1. Without HEAD it is read from the folder name
//! (`DialogRPT-width`), else `cond`. `:WEIGHT` overrides the weight.

use super::{Group, Head};

/// A parsed ranker spec.
#[derive(Debug, Clone, PartialEq)]
pub struct RankerSpec {
    /// The member's name: the head's, or the folder's.
    pub name: String,
    /// The checkpoint folder or hub id.
    pub path: String,
    pub group: Group,
    pub weight: f64,
}

/// Why a ranker spec was refused; each names the spec as written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("--ranker `{spec}` names no folder")]
    NoFolder { spec: String },
    #[error(
        "--ranker `{spec}`: `{head}` is not a head (use updown, depth, width, human-vs-rand, human-vs-machine, prior or cond)"
    )]
    NotAHead { spec: String, head: String },
    #[error("--ranker `{spec}`: the weight is not a number")]
    BadWeight { spec: String },
}

/// Splits `X:WEIGHT` when what follows the last colon is a number.
pub fn split_weight(spec: &str) -> (&str, Option<f64>) {
    match spec.rsplit_once(':') {
        Some((path, w)) => match w.trim().parse::<f64>() {
            Ok(weight) => (path, Some(weight)),
            Err(_) => (spec, None),
        },
        None => (spec, None),
    }
}

/// Parses `[HEAD=]DIR[:WEIGHT]`.
pub fn parse_ranker(spec: &str) -> Result<RankerSpec, SpecError> {
    let (head, rest) = match spec.split_once('=') {
        Some((h, rest)) if !h.contains(['/', '\\']) => (Some(h), rest),
        _ => (None, spec),
    };
    let (path, weight) = split_weight(rest);
    if path.trim().is_empty() {
        return Err(SpecError::NoFolder { spec: spec.to_string() });
    }
    let folder_name = std::path::Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (name, group, default_weight) = match head {
        Some(h) => match (Head::parse(h), h.trim().to_ascii_lowercase().as_str()) {
            (Some(head), _) => (head.name().to_string(), head.group(), head.default_weight()),
            (None, "prior") => (folder_name, Group::Prior, 1.0),
            (None, "cond") => (folder_name, Group::Cond, 1.0),
            _ => return Err(SpecError::NotAHead { spec: spec.to_string(), head: h.to_string() }),
        },
        None => match Head::from_folder_name(&folder_name) {
            Some(head) => (head.name().to_string(), head.group(), head.default_weight()),
            None => (folder_name, Group::Cond, 1.0),
        },
    };
    let weight = weight.unwrap_or(default_weight);
    if !weight.is_finite() {
        return Err(SpecError::BadWeight { spec: spec.to_string() });
    }
    Ok(RankerSpec { name, path: path.to_string(), group, weight })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranker_specs_parse() {
        let s = parse_ranker("models/DialogRPT-width").unwrap();
        assert_eq!((s.name.as_str(), s.path.as_str(), s.group, s.weight), ("width", "models/DialogRPT-width", Group::Cond, -0.5));
        let s = parse_ranker("human-vs-rand=./a:0.25").unwrap();
        assert_eq!((s.path.as_str(), s.group, s.weight), ("./a", Group::Prior, 0.25));
        let s = parse_ranker("prior=/x/y").unwrap();
        assert_eq!((s.group, s.weight), (Group::Prior, 1.0));
        let s = parse_ranker("./mine:2").unwrap();
        assert_eq!((s.path.as_str(), s.group, s.weight), ("./mine", Group::Cond, 2.0));
        // A colon not followed by a number belongs to the path.
        assert_eq!(parse_ranker("C:dir").unwrap().path, "C:dir");
        assert!(parse_ranker("karma=./x").unwrap_err().to_string().contains("not a head"));
        assert_eq!(parse_ranker("updown=:1"), Err(SpecError::NoFolder { spec: "updown=:1".into() }));
        assert_eq!(parse_ranker("./x:NaN"), Err(SpecError::BadWeight { spec: "./x:NaN".into() }));
    }
}
