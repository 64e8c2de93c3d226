//! `dialogd generate`: one reply to turns given on the command line.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{encode_turn, load, prompt_budget, ModelArgs, SamplingArgs};
use crate::generate::generate_with_adapter;
use crate::prompt::build_prompt;
use crate::training::lora::LoraAdapter;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print {"prompt_ids":[…],"output_ids":[…],"text":"…"} on one line.
    #[arg(long)]
    pub json: bool,
    /// Reply as a persona: a LoRA adapter folder (`dialogd train
    /// --lora-rank`), applied at run time over the base model.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The conversation, oldest turn first; the last is the user's message.
    #[arg(value_name = "TURN", required = true, allow_hyphen_values = false)]
    pub turns: Vec<String>,
}

/// The `--json` output.
#[derive(Debug, serde::Serialize)]
struct JsonOutput<'a> {
    prompt_ids: &'a [u32],
    output_ids: &'a [u32],
    text: &'a str,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let params = args.sampling.params()?;
    // Check the turns before the (slow) model load.
    if let Some(idx) = args.turns.iter().position(|t| t.trim().is_empty()) {
        anyhow::bail!("turn {} is empty", idx + 1);
    }
    // Read the adapter before the (slow) model load; its shapes are
    // checked against the model once that is loaded.
    let adapter = args.adapter.as_deref().map(LoraAdapter::load).transpose()?;
    let loaded = load(&args.model, false)?;
    let adapter = match adapter {
        Some(adapter) => Some(adapter.runtime(loaded.model.config())?.to_device(loaded.model.device())?),
        None => None,
    };
    let turns = args
        .turns
        .iter()
        .enumerate()
        .map(|(i, text)| encode_turn(&loaded.tokenizer, i + 1, text))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let prompt = build_prompt(&turns, loaded.tokenizer.eos_id(), prompt_budget(&loaded.model, &params)?)?;
    if prompt.truncated || prompt.turns_kept < turns.len() {
        tracing::warn!(kept = prompt.turns_kept, given = turns.len(), truncated = prompt.truncated, "prompt cut to fit the context");
    }
    let generation = generate_with_adapter(&loaded.model, adapter.as_ref(), &prompt.ids, &params, |_| true)?;
    let text = loaded.tokenizer.decode(&generation.output_ids)?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let out = JsonOutput { prompt_ids: &prompt.ids, output_ids: &generation.output_ids, text: &text };
        writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
    } else {
        writeln!(stdout, "{text}")?;
    }
    Ok(ExitCode::SUCCESS)
}
