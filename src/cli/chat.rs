//! `dialogd chat`: a console conversation through the daemon's pipeline.
//!
//! The settings load as for `dialogd run` (`--config FILE` over the
//! defaults and `DIALOGD__…` variables; `--model` replaces `model.path`),
//! and the daemon's own pipeline answers: the same input and output
//! filter, candidates, screening, ranking, persona, context store and
//! commands, on the console's channel (`console:local`, as a moderator).
//! Without `--config` the context is kept in memory for the session.
//! No socket is opened and no platform adapter starts; generation runs in
//! this process whatever `generation.backend` says.
//!
//! Lines are read with rustyline: editing, and a history kept in
//! `$XDG_STATE_HOME/dialogd/chat_history` (else
//! `~/.local/state/dialogd/chat_history`). When stdin is not a terminal
//! rustyline reads plain lines and no prompt is shown. `/help` lists the
//! commands, an unknown `/command` is answered here (never sent to the
//! model), `/quit` or Ctrl-D ends the session. Ctrl-C while a reply is
//! drawn stops waiting for it: `(reply stopped)` and the prompt come back
//! at once (the pipeline still finishes that message in the background
//! and stores it in the context, as the daemon does with a message whose
//! sender went away); Ctrl-C at the prompt clears the line.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use dialogd_adapters::console::render_answer;
use dialogd_adapters::{Core, Inbound};
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;

use super::{load, ModelArgs};
use crate::daemon::Daemon;
use crate::pipeline::commands::Command;
use crate::pipeline::engine::PoolEngine;
use crate::settings;
use crate::telemetry::Metrics;

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Settings file (TOML) over the built-in defaults, as for `run`: the
    /// model, [generation], [safety], [ranking], [personas] and the
    /// context store all come from it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A checkpoint folder or hub id in place of the settings' model.path.
    #[arg(long, value_name = "M")]
    pub model: Option<String>,
}

/// What `/help` says before the pipeline's own command list.
const CHAT_HELP: &str = "\
(chat) /help: this list; /quit or Ctrl-D: leave; Ctrl-C: stop waiting for a reply.
(chat) The daemon's commands work here too, as a moderator:";

/// Where the line history is kept: `$XDG_STATE_HOME/dialogd/chat_history`,
/// else `~/.local/state/dialogd/chat_history`; `None` without either.
fn history_path() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("dialogd").join("chat_history"))
}

pub fn run(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let mut settings = settings::load(args.config.as_deref())?;
    if let Some(model) = args.model {
        settings.model.path = model;
    }
    if args.config.is_none() {
        // Nothing to share without a settings file: the session's context
        // stays in memory (the default, Redis, may not be running).
        settings.context.store = settings::StoreKind::Memory;
    }
    // The console is the only way in: no sockets, no platforms.
    let adapters = &mut settings.adapters;
    (adapters.http.enabled, adapters.telegram.enabled, adapters.discord.enabled, adapters.console.enabled) = (false, false, false, false);
    settings.telemetry.metrics_listen = None;
    let m = &settings.model;
    let model_args = ModelArgs {
        model: m.path.clone(),
        device: m.device.clone(),
        dtype: m.dtype.clone(),
        quantize: m.quantize.clone(),
        kv_cache: m.kv_cache.clone(),
    };
    let loaded = load(&model_args, true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let metrics = Metrics::new();
        let engine = PoolEngine::start(loaded.model, &settings.generation, metrics.clone()).context("starting the generation pool")?;
        let pool = engine.handle().clone();
        let daemon = Daemon::start(settings, Arc::new(engine), Some(pool), loaded.tokenizer, metrics).await?;
        session(Arc::new(daemon.pipeline().clone())).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Reads lines until `/quit` or end of input and answers each.
async fn session(core: Arc<dyn Core>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // From here on Ctrl-C (SIGINT) stops a reply instead of the process.
    let mut interrupt = signal(SignalKind::interrupt()).context("catching Ctrl-C")?;
    let interactive = std::io::stdin().is_terminal();
    let mut editor = DefaultEditor::new().context("starting the line editor")?;
    let history = history_path();
    if let Some(path) = &history {
        // No history yet is the usual first run.
        let _ = editor.load_history(path);
    }
    if interactive {
        eprintln!("Type a message and press Enter. /help lists the commands, /quit or Ctrl-D leaves.");
    }
    let prompt = if interactive { "\x1b[1myou>\x1b[0m " } else { "" };
    let mut history_warned = false;
    loop {
        let (returned, read) = tokio::task::spawn_blocking(move || {
            let read = editor.readline(prompt);
            (editor, read)
        })
        .await?;
        editor = returned;
        let line = match read {
            Ok(line) => line,
            // Ctrl-C at the prompt: a fresh line, as shells do.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("reading a line"),
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(text);
        if let Some(path) = &history {
            let saved = path.parent().map_or(Ok(()), std::fs::create_dir_all).map_err(ReadlineError::from).and_then(|()| editor.save_history(path));
            if let Err(e) = saved {
                if !history_warned {
                    eprintln!("warning: cannot keep the line history in {}: {e}", path.display());
                    history_warned = true;
                }
            }
        }
        if matches!(text, "/quit" | "/exit") {
            break;
        }
        match Command::parse(text) {
            Some(Command::Help) => println!("{CHAT_HELP}"),
            Some(Command::Unknown(word)) => {
                println!("(unknown command /{word}: /help lists the commands)");
                continue;
            }
            _ => {}
        }
        // A Ctrl-C pressed while no reply was drawn is not for this one.
        while matches!(tokio::time::timeout(Duration::ZERO, interrupt.recv()).await, Ok(Some(()))) {}
        let inbound = Inbound::console("console", text);
        let answer = tokio::select! {
            answer = core.handle(inbound) => render_answer(&answer),
            _ = interrupt.recv() => "(reply stopped)\n".to_string(),
        };
        print!("{answer}");
        std::io::stdout().flush()?;
    }
    Ok(())
}
