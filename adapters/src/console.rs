//! The console adapter: one channel on stdin/stdout.
//!
//! Each line read is a message from the operator; each answer is written as
//! `bot> …` (or `(no reply: reason)`). It stops at end of input or at
//! shutdown.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::{Adapter, AdapterError, Answer, BoxFuture, ChannelKey, Core, CoreError, Inbound, Platform, Shutdown};

/// The console's one channel id.
pub const CONSOLE_CHANNEL: &str = "local";

/// `[adapters.console]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsole {
    pub enabled: bool,
}

/// `[adapters.console]` validated.
#[derive(Debug, Clone, Serialize)]
pub struct ConsoleSettings {
    pub enabled: bool,
}

impl Inbound {
    /// A line the operator typed at the console (`dialogd chat` or the
    /// console adapter): the console's one channel, addressed to the bot,
    /// from a moderator and operator (the person at the machine).
    pub fn console(author: impl Into<String>, text: impl Into<String>) -> Self {
        Inbound {
            channel: ChannelKey::new(Platform::Console, CONSOLE_CHANNEL),
            author: author.into(),
            text: text.into(),
            msg_id: None,
            addressed_to_bot: true,
            moderator: true,
            operator: true,
            group: None,
            edit: None,
        }
    }
}

impl RawConsole {
    /// Every value is valid.
    pub fn validate(self) -> ConsoleSettings {
        ConsoleSettings { enabled: self.enabled }
    }
}

/// An answer as the console shows it, one line: `bot> …` for a reply (or
/// a rate limit's notice), `(no reply: reason)`, `(error: …)`. `dialogd
/// chat` shows answers the same way.
pub fn render_answer(answer: &Result<Answer, CoreError>) -> String {
    match answer {
        Ok(Answer::Reply(out)) => format!("bot> {}\n", out.text),
        Ok(Answer::Silent { reason }) => format!("(no reply: {reason})\n"),
        Err(CoreError::RateLimited { notice: Some(notice), .. }) => format!("bot> {notice}\n"),
        Err(err) => format!("(error: {err})\n"),
    }
}

/// Reads messages from `input`, writes answers to `output`.
pub struct ConsoleAdapter<R, W> {
    input: R,
    output: W,
    author: String,
}

impl ConsoleAdapter<tokio::io::BufReader<tokio::io::Stdin>, tokio::io::Stdout> {
    /// The process's stdin and stdout.
    pub fn stdio() -> Self {
        Self::new(tokio::io::BufReader::new(tokio::io::stdin()), tokio::io::stdout())
    }
}

impl<R, W> ConsoleAdapter<R, W> {
    pub fn new(input: R, output: W) -> Self {
        Self { input, output, author: "console".into() }
    }
}

impl<R, W> Adapter for ConsoleAdapter<R, W>
where
    R: AsyncBufRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    fn name(&self) -> &'static str {
        "console"
    }

    fn run(self: Box<Self>, core: Arc<dyn Core>, shutdown: Shutdown) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            let Self { input, mut output, author } = *self;
            let io = |source| AdapterError::Io { adapter: "console", source };
            let mut lines = input.lines();
            let stop = shutdown.clone().wait();
            tokio::pin!(stop);
            loop {
                let line = tokio::select! {
                    _ = &mut stop => break,
                    line = lines.next_line() => line.map_err(io)?,
                };
                let Some(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let text = render_answer(&core.handle(Inbound::console(author.clone(), line)).await);
                output.write_all(text.as_bytes()).await.map_err(io)?;
                output.flush().await.map_err(io)?;
            }
            tracing::info!("console adapter stopped");
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_come_from_the_operator_in_the_one_channel() {
        let inbound = Inbound::console("console", "/train status");
        assert_eq!(inbound.channel, ChannelKey::new(Platform::Console, CONSOLE_CHANNEL));
        assert_eq!((inbound.author.as_str(), inbound.text.as_str()), ("console", "/train status"));
        assert!(inbound.addressed_to_bot && inbound.moderator && inbound.operator);
        assert!(inbound.msg_id.is_none() && inbound.group.is_none() && inbound.edit.is_none());
    }
}
