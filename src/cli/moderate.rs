//! `dialogd moderate`: the safety filter's verdict on one text.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Args;

use crate::safety::{Filter, Policy, WordList, MAX_TEXT_BYTES};

#[derive(Debug, Args)]
pub struct ModerateArgs {
    /// strict, standard or off.
    #[arg(long, default_value = "standard", value_name = "P")]
    pub policy: String,
    /// A word or phrase to block, as a moderator would; repeatable.
    #[arg(long = "block", value_name = "WORD")]
    pub blocked: Vec<String>,
    /// A word to allow, as a moderator would; repeatable.
    #[arg(long = "allow", value_name = "WORD")]
    pub allowed: Vec<String>,
    /// A toxicity classifier (folder or hub id: BERT, RoBERTa, XLM-R or
    /// DistilBERT ...ForSequenceClassification) read after the words.
    #[arg(long, value_name = "DIR")]
    pub classifier: Option<String>,
    /// LABEL=P: the classifier flags LABEL from probability P; repeatable.
    /// Labels without one are reported, not acted on.
    #[arg(long = "threshold", value_name = "LABEL=P", requires = "classifier")]
    pub thresholds: Vec<String>,
    /// Where the classifier runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// Print {"flagged":…,"categories":[…],"hits":[…],"policy":…} on one
    /// line, with "classifier":{"label":p,…} when one is given.
    #[arg(long)]
    pub json: bool,
    /// The text to check.
    #[arg(value_name = "TEXT")]
    pub text: String,
}

#[derive(Debug, serde::Serialize)]
struct JsonOutput<'a> {
    #[serde(flatten)]
    verdict: &'a crate::safety::Verdict,
    policy: Policy,
}

pub fn run(args: ModerateArgs) -> anyhow::Result<ExitCode> {
    let policy: Policy = args.policy.parse()?;
    if args.text.trim().is_empty() {
        anyhow::bail!("the text is empty");
    }
    if args.text.len() > MAX_TEXT_BYTES {
        anyhow::bail!("the text is {} bytes, more than the {MAX_TEXT_BYTES} the filter reads", args.text.len());
    }
    let mut lists = crate::safety::WordLists::default();
    for word in &args.blocked {
        lists.block("cli", word)?;
    }
    for word in &args.allowed {
        lists.allow("cli", word)?;
    }
    let words: Option<&WordList> = lists.get("cli");
    let mut filter = Filter::new();
    if let Some(spec) = &args.classifier {
        let mut thresholds = crate::safety::LabelThresholds::default();
        for item in &args.thresholds {
            let (label, p) = item.split_once('=').ok_or_else(|| anyhow::anyhow!("--threshold {item:?}: use LABEL=P"))?;
            let p: f32 = p.trim().parse().map_err(|_| anyhow::anyhow!("--threshold {item:?}: {p:?} is not a number"))?;
            if !(p > 0.0 && p <= 1.0) {
                anyhow::bail!("--threshold {item:?}: {p} is not a probability in (0, 1]");
            }
            thresholds.labels.insert(label.trim().to_string(), p);
        }
        let device = crate::serving::device(&args.device)?;
        let classifier = crate::safety::load_classifier(spec, &device)?;
        thresholds.check_labels(crate::safety::ToxicityClassifier::labels(&classifier))?;
        filter = filter.with_classifier(std::sync::Arc::new(classifier), thresholds).classifying_flagged();
    }
    let verdict = filter.check(&args.text, policy, words)?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string(&JsonOutput { verdict: &verdict, policy })?)?;
    } else if verdict.flagged {
        let names: Vec<String> = verdict.categories.iter().map(|c| serde_json::to_value(c).unwrap_or_default().as_str().unwrap_or("").to_string()).collect();
        writeln!(stdout, "flagged: {}", names.join(", "))?;
    } else {
        writeln!(stdout, "ok")?;
    }
    Ok(ExitCode::SUCCESS)
}
