//! Platform adapters for dialogd, behind one neutral message type.
//!
//! Only this crate knows platforms (Discord, Telegram, HTTP, the console);
//! the daemon's core knows dialogue. They meet at [`ChannelKey`],
//! [`Inbound`] and [`Outbound`], and at two traits: an [`Adapter`] is run by
//! the daemon and hands every message to the [`Core`]. Adding a platform
//! touches only this crate (its module, its settings, and a field of
//! [`settings::AdapterSettings`]) and the one line that starts it.
//!
//! - [`http`]: a JSON API for web widgets, other bots and integration, and
//!   the OpenAI-compatible `/v1/models` and `/v1/chat/completions`.
//! - [`completion`]: the neutral shape of a stateless completion (a
//!   conversation in, ranked replies out) that the OpenAI API speaks.
//! - [`console`]: stdin/stdout, one channel.
//! - [`telegram`]: a Telegram bot (teloxide, long polling).
//! - [`discord`]: a Discord bot (serenity, gateway and slash commands).
//! - [`text`]: what the chat platforms share: command words, splitting long
//!   replies, keeping secrets out of log lines.
//! - [`outbox`]: sends each channel's answers in order, one at a time.
//! - [`retry`]: bounded retries of platform calls (rate limits, 5xx).
//! - [`settings`]: the `[adapters]` settings section; each adapter module
//!   owns its platform's raw and validated settings.

pub mod completion;
pub mod console;
pub mod discord;
pub mod http;
pub mod outbox;
pub mod retry;
pub mod settings;
pub mod telegram;
pub mod text;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use completion::{ChatTurn, Completion, CompletionChoice, CompletionError, CompletionRequest, FinishReason, ModelCard};

/// The platforms dialogd speaks on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Platform {
    Discord,
    Telegram,
    Http,
    Console,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Discord => "discord",
            Platform::Telegram => "telegram",
            Platform::Http => "http",
            Platform::Console => "console",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Platform::Discord, Platform::Telegram, Platform::Http, Platform::Console]
            .into_iter()
            .find(|p| p.as_str() == text)
    }
}

/// One channel: a platform and that platform's id for the channel (a
/// Discord channel or DM, a Telegram chat, an HTTP path segment).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelKey {
    pub platform: Platform,
    pub channel_id: String,
}

impl ChannelKey {
    pub fn new(platform: Platform, channel_id: impl Into<String>) -> Self {
        Self { platform, channel_id: channel_id.into() }
    }

    /// Parses the `platform:channel_id` form that [`fmt::Display`] writes.
    pub fn parse(text: &str) -> Option<Self> {
        let (platform, id) = text.split_once(':')?;
        if id.is_empty() {
            return None;
        }
        Some(Self::new(Platform::parse(platform)?, id))
    }
}

impl fmt::Display for ChannelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.platform.as_str(), self.channel_id)
    }
}

/// A message that reached the bot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub channel: ChannelKey,
    /// The platform's id for the author.
    pub author: String,
    pub text: String,
    /// The platform's id for the message, used to drop duplicate deliveries.
    pub msg_id: Option<String>,
    /// Whether the bot was addressed (DM, mention, reply to the bot, command).
    pub addressed_to_bot: bool,
    /// Whether the author is a moderator of this channel (the platform's
    /// word, or the adapter's allowlist). Adapters may leave it false for
    /// anything but a moderator command ([`text::is_moderator_command`]).
    pub moderator: bool,
    /// Whether the author is an operator: on the adapter's `moderators`
    /// allowlist (a moderator everywhere), or at the console. Only an
    /// operator may train or roll back the base model from a chat.
    /// Adapters may leave it false for anything but a moderator command.
    pub operator: bool,
    /// The server the channel belongs to (a Discord guild), when the
    /// platform has one: moderators choose personas per server or channel.
    pub group: Option<String>,
    /// Set when this is an edit of a message handed over before (the same
    /// `msg_id`, the new text), not a new message.
    pub edit: Option<Edit>,
}

/// What the core does with an edited message. An edit of the author's
/// latest turn in the channel replaces that turn's text in the stored
/// context (the new text passes the input filter first, or the turn is
/// dropped); an edit of anything older changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edit {
    /// Answer the edited message again (`adapters.*.answer_edits`): its
    /// old reply leaves the context and a new one is drawn. Otherwise the
    /// edit is silent.
    pub answer: bool,
}

/// A reply for an adapter to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub channel: ChannelKey,
    pub text: String,
    /// The message this answers, when the platform can thread replies.
    pub reply_to: Option<String>,
}

/// A boxed future, the shape trait methods here return so that the traits
/// stay usable as `dyn` objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the core did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A reply to send.
    Reply(Outbound),
    /// The bot chose not to answer; `reason` is a short snake_case word
    /// (`duplicate`, `empty_reply`, `not_addressed`).
    Silent { reason: String },
}

/// Why the core could not take a message. Adapters turn these into their
/// platform's way of saying "not now" or "bad request".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// Generation is at capacity; try again later.
    #[error("busy: generation is at capacity, try again later")]
    Busy,
    /// The daemon is shutting down and takes no new messages (or, for
    /// one still queued when the drain ended, never answered it).
    #[error("shutting down")]
    ShuttingDown,
    /// The author or channel is over its rate limit until `retry_after`
    /// has passed. `notice`: what to tell them (the first time in a
    /// window); `None`: drop the message quietly.
    #[error("rate limited: try again in {} s", retry_after.as_secs().max(1))]
    RateLimited { notice: Option<String>, retry_after: std::time::Duration },
    /// A part the request needs (the context store) cannot be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The message itself is unacceptable (empty, too long).
    #[error("{0}")]
    Invalid(String),
    /// Anything else; the message is dropped, the daemon goes on.
    #[error("internal error: {0}")]
    Internal(String),
}

/// One turn of a channel's stored context, as adapters show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ContextTurn {
    pub author: String,
    pub text: String,
    /// Whether the bot wrote this turn.
    pub bot: bool,
}

/// What `GET /healthz` and friends report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// The model is loaded and generation is running.
    pub ready: bool,
    /// `redis` or `memory`.
    pub store: String,
    /// Whether the context store answers (always true for memory).
    pub store_up: bool,
}

/// The daemon's core as adapters see it: dialogue in, answers out.
pub trait Core: Send + Sync + 'static {
    /// Handles one message. Messages of one channel are answered in the
    /// order this is called; the future may be dropped (the work goes on).
    fn handle(&self, inbound: Inbound) -> BoxFuture<'static, Result<Answer, CoreError>>;
    /// The channel's stored turns, oldest first.
    fn turns(&self, channel: ChannelKey) -> BoxFuture<'static, Result<Vec<ContextTurn>, CoreError>>;
    /// Forgets the channel's stored turns.
    fn clear(&self, channel: ChannelKey) -> BoxFuture<'static, Result<(), CoreError>>;
    fn health(&self) -> Health;
    /// The models a completion may name: the base model, then personas.
    /// The default: none (a core that serves no completions).
    fn models(&self) -> BoxFuture<'static, Result<Vec<ModelCard>, CoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// Answers a whole conversation sent by the client, touching no
    /// channel's context. The default refuses (503).
    fn complete(&self, request: CompletionRequest) -> BoxFuture<'static, Result<Completion, CompletionError>> {
        drop(request);
        Box::pin(async { Err(CompletionError::Core(CoreError::Unavailable("completions are not served here".into()))) })
    }
}

/// Tells adapters to stop taking messages. Cloned into every adapter; the
/// daemon flips it once.
#[derive(Debug, Clone)]
pub struct Shutdown(tokio::sync::watch::Receiver<bool>);

impl Shutdown {
    /// A pair: the trigger (send `true` to stop) and the listener.
    pub fn new() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Self(rx))
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is asked for (or the trigger is gone).
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// Adapter failures that end an adapter (binding its socket, reading its
/// input); failures on single messages are handled inside the adapter.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{adapter}: cannot listen on {addr}: {source}")]
    Bind { adapter: &'static str, addr: String, source: std::io::Error },
    #[error("{adapter}: {source}")]
    Io { adapter: &'static str, source: std::io::Error },
    /// The platform refused to start (a bad token, an unreachable API);
    /// the message never holds the token.
    #[error("{adapter}: {message}")]
    Platform { adapter: &'static str, message: String },
}

/// A platform connection. The daemon runs each enabled adapter until it
/// returns or `shutdown` fires; after `shutdown` an adapter takes no new
/// messages but lets the ones in flight finish.
pub trait Adapter: Send + 'static {
    fn name(&self) -> &'static str;
    fn run(self: Box<Self>, core: Arc<dyn Core>, shutdown: Shutdown) -> BoxFuture<'static, Result<(), AdapterError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_keys_round_trip_through_text() {
        let key = ChannelKey::new(Platform::Telegram, "-100123:45");
        assert_eq!(key.to_string(), "telegram:-100123:45");
        assert_eq!(ChannelKey::parse(&key.to_string()), Some(key));
        assert_eq!(ChannelKey::parse("slack:1"), None);
        assert_eq!(ChannelKey::parse("discord:"), None);
    }
}
