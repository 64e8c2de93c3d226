//! Each channel's recent turns: the [`ContextStore`] trait and its stores.
//!
//! - [`redis`]: production; the only code in the daemon that knows Redis.
//! - [`memory`]: one process, lost at exit; for `dialogd chat`-like use and tests.
//!
//! A store keeps at most `max_turns` turns per channel (oldest dropped),
//! forgets a channel after `ttl` idle, and remembers recent message ids so a
//! message delivered twice is handled once. Appends are atomic per channel:
//! a user turn and the bot's reply land together or not at all. The token
//! budget is not the store's business; the pipeline applies it when it
//! builds the prompt.
//!
//! The store also holds the moderation state every daemon sharing it must
//! agree on, kept across restarts: muted channels, rate-limit windows and
//! the per-channel leases of [`lease`].

pub mod lease;
pub mod memory;
pub mod redis;

use std::time::Duration;

use dialogd_adapters::{BoxFuture, ChannelKey, Platform};
use serde::{Deserialize, Serialize};

/// One turn of a channel's conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// The platform's id for the author; the bot's turns carry `bot: true`.
    pub author: String,
    pub text: String,
    /// Unix time in seconds.
    pub time: u64,
    /// The platform's message id, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    #[serde(default)]
    pub bot: bool,
    /// For a bot turn: the author it answered (so `/forget` can take it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

impl Turn {
    pub fn user(author: impl Into<String>, text: impl Into<String>, msg_id: Option<String>) -> Self {
        Self { author: author.into(), text: text.into(), time: unix_now(), msg_id, bot: false, reply_to: None }
    }

    pub fn bot(text: impl Into<String>, reply_to: impl Into<String>) -> Self {
        Self {
            author: "bot".into(),
            text: text.into(),
            time: unix_now(),
            msg_id: None,
            bot: true,
            reply_to: Some(reply_to.into()),
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored,
    /// The message id was already seen: nothing was written.
    Duplicate,
}

/// A change an edited message makes to its stored turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditChange<'a> {
    /// The turn's text becomes this.
    Replace(&'a str),
    /// The turn goes, with the bot turns stored right after it that answer
    /// its author (the reply it got): the edit failed the input filter, or
    /// the message is answered again.
    Remove,
}

/// What [`ContextStore::edit_turn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edited {
    Replaced,
    /// The turn and this many bot turns after it were removed.
    Removed { replies: usize },
    /// The message is not its author's latest stored turn in the channel
    /// (an older message, a command, or one never stored): nothing changed.
    Ignored,
}

/// Whether a stored turn is the message `msg_id`: its own id, or the id a
/// re-answered edit stored it under (`msg_id` + `#` + a suffix).
pub fn is_message(turn: &Turn, msg_id: &str) -> bool {
    turn.msg_id.as_deref().is_some_and(|id| id == msg_id || id.strip_prefix(msg_id).is_some_and(|rest| rest.starts_with('#')))
}

/// What to do after [`apply_edit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditOutcome {
    /// Nothing to send; the reason is a short snake_case word
    /// (`edit_ignored`, `edited`, `edit_flagged`).
    Done(&'static str),
    /// Answer the edited text as a new message stored under this id
    /// (`msg_id#…`, one per text, so a repeated delivery of the same edit
    /// is still a duplicate and a later edit still finds the turn).
    AnswerAs(String),
}

/// An edited message's effect on the context, for the pipeline (which
/// runs the input filter and passes its verdict as `flagged`). A flagged
/// edit removes the turn and its reply (toxic text is never stored); with
/// `answer` the turn and its reply make way for a new exchange; otherwise
/// the turn's text is replaced. Only the author's latest turn is touched.
pub async fn apply_edit(
    store: &dyn ContextStore,
    channel: &ChannelKey,
    author: &str,
    msg_id: &str,
    text: &str,
    flagged: bool,
    answer: bool,
) -> Result<EditOutcome, ContextError> {
    // FNV-1a of the text: the same id for the same edit on every daemon.
    let digest = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    let answer_as = format!("{msg_id}#{digest:016x}");
    if answer && !flagged && store.seen(channel, &answer_as).await? {
        // This edit was answered already (a repeated delivery).
        return Ok(EditOutcome::Done("duplicate"));
    }
    let change = if flagged || answer { EditChange::Remove } else { EditChange::Replace(text) };
    Ok(match store.edit_turn(channel, author, msg_id, change).await? {
        Edited::Ignored => EditOutcome::Done("edit_ignored"),
        Edited::Replaced => EditOutcome::Done("edited"),
        Edited::Removed { .. } if flagged => EditOutcome::Done("edit_flagged"),
        Edited::Removed { .. } => EditOutcome::AnswerAs(answer_as),
    })
}

/// Context store failures. The pipeline answers without context on any of
/// them; none stops the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The store cannot be reached (down, timed out, reconnecting).
    #[error("context store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something unexpected.
    #[error("context store: {0}")]
    Corrupt(String),
}

/// How a store is bounded.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Turns kept per channel.
    pub max_turns: usize,
    /// Idle time after which a channel is forgotten; `None`: never.
    pub ttl: Option<Duration>,
    /// Message ids remembered per channel for duplicate detection.
    pub seen_ids: usize,
}

impl Limits {
    pub fn new(max_turns: usize, ttl: Option<Duration>) -> Self {
        Self { max_turns, ttl, seen_ids: (max_turns * 4).max(256) }
    }
}

/// Where channels' turns live. Futures borrow the store and arguments.
pub trait ContextStore: Send + Sync + 'static {
    /// The channel's turns, oldest first.
    fn turns<'a>(&'a self, channel: &'a ChannelKey) -> BoxFuture<'a, Result<Vec<Turn>, ContextError>>;
    /// Whether a message id was already stored for the channel.
    fn seen<'a>(&'a self, channel: &'a ChannelKey, msg_id: &'a str) -> BoxFuture<'a, Result<bool, ContextError>>;
    /// Appends turns atomically, trimming to `max_turns` and refreshing the
    /// TTL; with a `msg_id` already seen it writes nothing.
    fn append<'a>(
        &'a self,
        channel: &'a ChannelKey,
        turns: &'a [Turn],
        msg_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Appended, ContextError>>;
    /// Applies an edit of message `msg_id` by `author`, atomically: only
    /// when that message is the author's latest user turn in the channel
    /// ([`is_message`]); an edit of anything older is [`Edited::Ignored`].
    /// The TTL is left as it was.
    fn edit_turn<'a>(
        &'a self,
        channel: &'a ChannelKey,
        author: &'a str,
        msg_id: &'a str,
        change: EditChange<'a>,
    ) -> BoxFuture<'a, Result<Edited, ContextError>>;
    /// Forgets the channel's turns (its message ids stay, so a late
    /// duplicate is still recognised).
    fn clear<'a>(&'a self, channel: &'a ChannelKey) -> BoxFuture<'a, Result<(), ContextError>>;
    /// Deletes every stored turn by `author` on `platform`, in any channel,
    /// and the bot's replies to them. Returns how many turns went.
    fn forget_author<'a>(&'a self, platform: Platform, author: &'a str) -> BoxFuture<'a, Result<usize, ContextError>>;
    /// Whether a moderator muted the channel (`/mute`); a mute lasts until
    /// `/unmute`, for every daemon sharing the store.
    fn muted<'a>(&'a self, channel: &'a ChannelKey) -> BoxFuture<'a, Result<bool, ContextError>>;
    /// Mutes (`true`) or unmutes the channel.
    fn set_muted<'a>(&'a self, channel: &'a ChannelKey, muted: bool) -> BoxFuture<'a, Result<(), ContextError>>;
    /// Counts one hit in each of `keys`' fixed windows of `window` (a window
    /// starts at its key's first hit and ends `window` later). Returns, per
    /// key in order, the hits in its window including this one and the time
    /// left in the window. Atomic per key across daemons.
    fn count_hits<'a>(
        &'a self,
        keys: &'a [String],
        window: Duration,
    ) -> BoxFuture<'a, Result<Vec<(u64, Duration)>, ContextError>>;
    /// Takes the channel's lease for `holder` for `ttl`, or renews it when
    /// `holder` has it. `false`: another holder has it.
    fn take_lease<'a>(
        &'a self,
        channel: &'a ChannelKey,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, ContextError>>;
    /// Gives the channel's lease back, if `holder` has it.
    fn drop_lease<'a>(&'a self, channel: &'a ChannelKey, holder: &'a str) -> BoxFuture<'a, Result<(), ContextError>>;
    /// `redis` or `memory`.
    fn kind(&self) -> &'static str;
    /// Whether the store answered last time.
    fn is_up(&self) -> bool;
}
