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
    /// Print {"flagged":…,"categories":[…],"hits":[…],"policy":…} on one line.
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
    let verdict = Filter::new().check(&args.text, policy, words)?;
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
