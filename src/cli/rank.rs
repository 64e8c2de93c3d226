//! `dialogd rank`: score candidate replies to a context with DialogRPT
//! (one ranker or an ensemble) and optionally an MMI reverse model.
//!
//! `--ranker [HEAD=]DIR[:WEIGHT]`, repeatable. HEAD is one of `updown`,
//! `depth`, `width`, `human-vs-rand`, `human-vs-machine` (which sets the
//! ensemble group and the default weight of DialogRPT's `ensemble.yml`), or
//! `prior`/`cond` for a group with weight 1. Without HEAD it is read from
//! the folder name (`DialogRPT-width`), else `cond`. `:WEIGHT` overrides the
//! weight. `--mmi DIR[:WEIGHT]` adds WEIGHT (default 1) × MMI score.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use super::{encode_turn, MAX_TURN_BYTES};
use crate::model::{self, hub};
use crate::ranking::{DialogRpt, Ensemble, Group, Head, Member, MmiScorer, Weights};
use crate::tokenizer::DialogTokenizer;

#[derive(Debug, Args)]
pub struct RankArgs {
    /// A DialogRPT checkpoint, `[HEAD=]DIR[:WEIGHT]`; repeat for an ensemble.
    #[arg(long = "ranker", value_name = "[HEAD=]DIR[:WEIGHT]", required = true)]
    pub rankers: Vec<String>,
    /// A reverse (MMI) model, `DIR[:WEIGHT]`, added as WEIGHT × −mean NLL.
    #[arg(long, value_name = "DIR[:WEIGHT]")]
    pub mmi: Option<String>,
    /// Tokenizer folder (default: the first ranker's folder).
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// A candidate reply; repeat for several.
    #[arg(long = "response", value_name = "R", required = true)]
    pub responses: Vec<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "D")]
    pub device: String,
    /// auto (f32 on CPU, bf16 on GPU), f32, f16 or bf16.
    #[arg(long, default_value = "auto", value_name = "T")]
    pub dtype: String,
    /// Print {"scores":[…]} on one line, one score per response in order.
    #[arg(long)]
    pub json: bool,
    /// The context, oldest turn first; the last is the message answered.
    #[arg(value_name = "TURN", required = true)]
    pub turns: Vec<String>,
}

/// A parsed `--ranker` value.
#[derive(Debug, Clone, PartialEq)]
pub struct RankerSpec {
    pub name: String,
    pub path: String,
    pub group: Group,
    pub weight: f64,
}

/// Splits `X:WEIGHT` when what follows the last colon is a number.
fn split_weight(spec: &str) -> (&str, Option<f64>) {
    match spec.rsplit_once(':') {
        Some((path, w)) => match w.trim().parse::<f64>() {
            Ok(weight) => (path, Some(weight)),
            Err(_) => (spec, None),
        },
        None => (spec, None),
    }
}

/// Parses `[HEAD=]DIR[:WEIGHT]`.
pub fn parse_ranker(spec: &str) -> anyhow::Result<RankerSpec> {
    let (head, rest) = match spec.split_once('=') {
        Some((h, rest)) if !h.contains(['/', '\\']) => (Some(h), rest),
        _ => (None, spec),
    };
    let (path, weight) = split_weight(rest);
    if path.trim().is_empty() {
        anyhow::bail!("--ranker `{spec}` names no folder");
    }
    let folder_name = std::path::Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (name, group, default_weight) = match head {
        Some(h) => match (Head::parse(h), h.trim().to_ascii_lowercase().as_str()) {
            (Some(head), _) => (head.name().to_string(), head.group(), head.default_weight()),
            (None, "prior") => (folder_name, Group::Prior, 1.0),
            (None, "cond") => (folder_name, Group::Cond, 1.0),
            _ => anyhow::bail!(
                "--ranker `{spec}`: `{h}` is not a head (use updown, depth, width, human-vs-rand, human-vs-machine, prior or cond)"
            ),
        },
        None => match Head::from_folder_name(&folder_name) {
            Some(head) => (head.name().to_string(), head.group(), head.default_weight()),
            None => (folder_name, Group::Cond, 1.0),
        },
    };
    let weight = weight.unwrap_or(default_weight);
    if !weight.is_finite() {
        anyhow::bail!("--ranker `{spec}`: the weight is not a number");
    }
    Ok(RankerSpec { name, path: path.to_string(), group, weight })
}

/// The `--json` output.
#[derive(Debug, serde::Serialize)]
struct JsonOutput<'a> {
    scores: &'a [f64],
}

pub fn run(args: RankArgs) -> anyhow::Result<ExitCode> {
    // Check everything cheap before the (slow) model loads.
    let specs = args.rankers.iter().map(|s| parse_ranker(s)).collect::<anyhow::Result<Vec<_>>>()?;
    let mmi_spec = args.mmi.as_deref().map(|s| {
        let (path, weight) = split_weight(s);
        (path.to_string(), weight.unwrap_or(1.0))
    });
    if let Some(idx) = args.turns.iter().position(|t| t.trim().is_empty()) {
        anyhow::bail!("turn {} is empty", idx + 1);
    }
    for (idx, response) in args.responses.iter().enumerate() {
        if response.trim().is_empty() {
            anyhow::bail!("response {} is empty", idx + 1);
        }
        if response.len() > MAX_TURN_BYTES {
            anyhow::bail!("response {} is {} bytes, more than the {MAX_TURN_BYTES} a turn may have", idx + 1, response.len());
        }
    }
    let device = crate::serving::device(&args.device)?;
    let dtype = model::parse_dtype(&args.dtype, &device)?;
    let mut members = Vec::with_capacity(specs.len());
    let mut first_dir = None;
    for spec in specs {
        let dir = hub::resolve_model(&spec.path)?;
        let ranker = DialogRpt::load(&dir, dtype, &device).with_context(|| format!("ranker {}", dir.display()))?;
        first_dir.get_or_insert(dir);
        members.push(Member { name: spec.name, group: spec.group, weight: spec.weight, ranker });
    }
    let tokenizer_dir = args.tokenizer.clone().or(first_dir).context("no ranker given")?;
    let tokenizer = DialogTokenizer::from_dir(&tokenizer_dir)
        .context("tokenizer (pass --tokenizer DIR with vocab.json + merges.txt or tokenizer.json)")?;
    for member in &members {
        let cfg = member.ranker.config();
        if tokenizer.eos_id() != cfg.eos_token_id || tokenizer.vocab_size() > cfg.vocab_size {
            anyhow::bail!("{}: the tokenizer does not fit this ranker ({} ids)", member.ranker.source().display(), cfg.vocab_size);
        }
    }
    let ensemble = Ensemble::new(members)?;
    let mmi = match &mmi_spec {
        Some((path, weight)) => {
            let dir = hub::resolve_model(path)?;
            Some((MmiScorer::load(&dir, dtype, &device).with_context(|| format!("MMI model {}", dir.display()))?, *weight))
        }
        None => None,
    };
    let turns = args
        .turns
        .iter()
        .enumerate()
        .map(|(i, text)| encode_turn(&tokenizer, i + 1, text))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let candidates = args
        .responses
        .iter()
        .enumerate()
        .map(|(i, text)| tokenizer.encode(text).with_context(|| format!("response {}", i + 1)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rpt = ensemble.scores(&turns, &candidates)?;
    let mmi_scores = match &mmi {
        Some((scorer, _)) => Some(scorer.scores(&turns, &candidates)?),
        None => None,
    };
    let weights = Weights { dialogrpt: 1.0, generator: 0.0, mmi: mmi.as_ref().map_or(0.0, |(_, w)| *w) };
    let scores: Vec<f64> = (0..candidates.len())
        .map(|i| weights.mix(Some(rpt.final_scores[i]), None, mmi_scores.as_ref().map(|m| m[i])))
        .collect();
    tracing::debug!(?rpt, ?mmi_scores, "ranked");
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string(&JsonOutput { scores: &scores })?)?;
    } else {
        for (score, response) in scores.iter().zip(&args.responses) {
            writeln!(stdout, "{score:.6}\t{response}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
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
        assert!(parse_ranker("updown=:1").is_err());
        assert!(parse_ranker("./x:NaN").is_err());
    }
}
