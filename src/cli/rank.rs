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

use super::encode_turn;
use crate::model::{self, hub};
use crate::prompt::MAX_TURN_BYTES;
use crate::ranking::spec::{parse_ranker, split_weight};
use crate::ranking::{DialogRpt, Ensemble, Member, MmiScorer, Weights};
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

/// The `--json` output.
#[derive(Debug, serde::Serialize)]
struct JsonOutput<'a> {
    scores: &'a [f64],
}

pub fn run(args: RankArgs) -> anyhow::Result<ExitCode> {
    // Check everything cheap before the (slow) model loads.
    let specs = args.rankers.iter().map(|s| parse_ranker(s)).collect::<Result<Vec<_>, _>>()?;
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
        .map(|(i, text)| tokenizer.encode(&crate::prompt::normalize_turn(text)).with_context(|| format!("response {}", i + 1)))
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
