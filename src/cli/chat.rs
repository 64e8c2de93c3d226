//! `dialogd chat`: a console conversation that keeps its history.
//!
//! Commands: `/reset` forgets the conversation, `/quit` (or Ctrl-D) ends it.
//! Replies are printed as they are generated.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::process::ExitCode;

use clap::Args;

use super::{encode_turn, load, prompt_budget, ModelArgs, SamplingArgs};
use crate::generate::generate;
use crate::prompt::build_prompt;

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let params = args.sampling.params()?;
    let loaded = load(&args.model, true)?;
    let budget = prompt_budget(&loaded.model, &params)?;
    let interactive = std::io::stdin().is_terminal();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut stdout = std::io::stdout();
    // Encoded turns, oldest first: user and bot alternate.
    let mut history: Vec<Vec<u32>> = Vec::new();
    if interactive {
        eprintln!("Type a message and press Enter. /reset forgets the conversation, /quit or Ctrl-D leaves.");
    }
    loop {
        if interactive {
            write!(stdout, "\x1b[1myou>\x1b[0m ")?;
            stdout.flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        match text {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history.clear();
                writeln!(stdout, "(conversation forgotten)")?;
                continue;
            }
            _ => {}
        }
        let turn = match encode_turn(&loaded.tokenizer, history.len() + 1, text) {
            Ok(turn) => turn,
            Err(e) => {
                writeln!(stdout, "(not sent: {e})")?;
                continue;
            }
        };
        history.push(turn);
        let prompt = build_prompt(&history, loaded.tokenizer.eos_id(), budget)?;
        // Turns that no longer fit are gone for good.
        history.drain(..history.len() - prompt.turns_kept);
        write!(stdout, "{}", if interactive { "\x1b[1mbot>\x1b[0m " } else { "bot> " })?;
        stdout.flush()?;
        let mut stream = loaded.tokenizer.stream();
        let mut write_error = None;
        let generation = generate(&loaded.model, &prompt.ids, &params, |id| {
            if let Ok(Some(piece)) = stream.push(id) {
                if let Err(e) = write!(stdout, "{piece}").and_then(|_| stdout.flush()) {
                    write_error = Some(e);
                    return false;
                }
            }
            true
        })?;
        if let Some(e) = write_error {
            return Err(e.into());
        }
        if generation.output_ids.is_empty() {
            // Nothing to remember: an empty turn cannot be part of a prompt.
            write!(stdout, "…")?;
        } else {
            history.push(generation.output_ids);
        }
        writeln!(stdout)?;
    }
    if interactive {
        writeln!(stdout)?;
    }
    Ok(ExitCode::SUCCESS)
}
