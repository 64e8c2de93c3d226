//! `dialogd completions bash|zsh|fish` and `dialogd man`: shell completion
//! scripts (clap_complete) and manual pages (clap_mangen), both generated
//! from [`super::command`], the definition the parser uses, so they cannot
//! drift from the flags.
//!
//! Where a packager installs them:
//! - `dialogd completions bash > /usr/share/bash-completion/completions/dialogd`
//! - `dialogd completions zsh > /usr/share/zsh/site-functions/_dialogd`
//! - `dialogd completions fish > /usr/share/fish/vendor_completions.d/dialogd.fish`
//! - `dialogd man --dir /usr/share/man/man1` (dialogd.1 and one
//!   dialogd-COMMAND.1 per command), or `dialogd man > dialogd.1`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

/// The shells `dialogd completions` writes for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write dialogd.1 and one dialogd-COMMAND.1 per command into this
    /// folder instead of printing dialogd.1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `dialogd completions SHELL`: the script on stdout.
pub fn completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut command = super::command();
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut command, "dialogd", &mut out);
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `dialogd man [--dir DIR]`: dialogd.1 on stdout, or every page into DIR.
pub fn man(args: ManArgs) -> anyhow::Result<ExitCode> {
    let command = super::command();
    match args.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(command, &dir).with_context(|| format!("writing manual pages into {}", dir.display()))?;
        }
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(command).render(&mut out)?;
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
