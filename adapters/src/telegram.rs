//! The Telegram adapter: a bot on the Bot API through teloxide, by long
//! polling or by webhook ([`webhook`]).
//!
//! Who is answered: everyone in a private chat; in groups, a message that
//! mentions the bot (`@botname`), replies to one of its messages, or is a
//! command (`/ask …`, `/reset`; `/cmd@otherbot` is left alone). Other group
//! messages are not handed to the core at all.
//!
//! How: `getMe` once (the bot's id and username), `setMyCommands`, then
//! either `deleteWebhook` and a `getUpdates` loop, or `setWebhook` and the
//! updates Telegram POSTs (each update once, by update id). Each message is
//! handed to the core in update order;
//! its answer is sent through the [`Outbox`] (one chat's answers in order)
//! with a typing action while the core works, as a reply to the
//! triggering message, split at 4096 UTF-16 units. Requests go through
//! teloxide's `Throttle` (Telegram's per-chat and global limits); a 429's
//! `retry_after` and server errors are retried within a [`RetryPolicy`].
//!
//! Forum topics: a message in a topic is in channel `chat:topic` (its own
//! context; commands act on the topic) and every piece of its answer goes
//! to that topic. Edited messages go to the core as edits
//! ([`crate::Edit`]), answered again only with `answer_edits`.
//!
//! Moderators: the allowlist of user ids, and in groups the chat's
//! administrators and owner (`getChatMember`), asked only for moderator
//! commands, never on the polling loop: the question runs in the chat's
//! outbox queue (so that chat keeps its order while every other chat goes
//! on), within [`MODERATOR_CHECK_TIMEOUT`] (no answer: not a moderator),
//! and answers are kept for [`MODERATOR_CACHE_TTL`] per (chat, user).
//!
//! The token is part of every Bot API URL; errors are scrubbed of it
//! before they are logged.

pub mod webhook;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use teloxide::adaptors::throttle::{Limits, Settings as ThrottleSettings};
use teloxide::adaptors::Throttle;
use teloxide::prelude::*;
use teloxide::types::{AllowedUpdate, BotCommand, ChatAction, Me, Message, MessageId, ReplyParameters, ThreadId, Update, UpdateKind};
use teloxide::{ApiError, RequestError};

use crate::outbox::Outbox;
use crate::retry::{with_retries, Failure, RetryPolicy};
use crate::settings::{invalid, serialize_opt_secret, serialize_secs, Secret, SettingsError};
use crate::text::{command_word, is_moderator_command, scrub, split_message, strip_addressing, utf16_units, COMMANDS};
use crate::{Adapter, AdapterError, Answer, BoxFuture, ChannelKey, Core, CoreError, Edit, Inbound, Platform, Shutdown};

/// Telegram's longest message, in UTF-16 code units.
pub const MESSAGE_LIMIT: usize = 4096;

/// How often the typing action is repeated (Telegram shows it for ~5 s).
const TYPING_EVERY: Duration = Duration::from_secs(4);

/// The longest a moderator check (`getChatMember` with its retries) may
/// take; past it the user is not taken for a moderator this time.
pub const MODERATOR_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an answer about a (chat, user) is reused; a failed check is
/// kept for a fifth of it, so a failing API is not asked on every command.
pub const MODERATOR_CACHE_TTL: Duration = Duration::from_secs(60);

/// `[adapters.telegram]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelegram {
    pub enabled: bool,
    pub token: String,
    pub api_url: String,
    pub moderators: Vec<u64>,
    pub allowed_chats: Vec<i64>,
    pub allowed_users: Vec<u64>,
    pub poll_timeout_secs: u64,
    pub mode: String,
    pub webhook_url: String,
    pub webhook_listen: String,
    pub webhook_secret: String,
    pub answer_edits: bool,
    pub answer_bots: bool,
}

/// `[adapters.telegram]` validated: what the adapter runs with.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TelegramSettings {
    pub enabled: bool,
    /// The bot token from BotFather. Never logged; `None`: unset (the
    /// adapter is then off).
    #[serde(serialize_with = "serialize_opt_secret")]
    pub token: Option<Secret>,
    /// The Bot API server (`https://api.telegram.org`, or a self-hosted
    /// one), without a trailing `/`.
    pub api_url: String,
    /// User ids that are moderators in every chat.
    pub moderators: Vec<u64>,
    /// Chat ids the bot works in (groups are negative); empty: every chat.
    pub allowed_chats: Vec<i64>,
    /// User ids the bot answers; empty: everyone.
    pub allowed_users: Vec<u64>,
    /// How long one `getUpdates` waits for news (long polling), 1-15 s.
    #[serde(rename = "poll_timeout_secs", serialize_with = "serialize_secs")]
    pub poll_timeout: Duration,
    /// Retries of every Bot API call (not a settings key: the default, or
    /// a test's).
    #[serde(skip)]
    pub retry: RetryPolicy,
    /// Long polling, or a webhook.
    pub mode: TelegramMode,
    /// Webhook mode: the public HTTPS URL given to `setWebhook` (its path
    /// is the path served).
    pub webhook_url: String,
    /// Webhook mode: the local address the server listens on.
    pub webhook_listen: String,
    /// Webhook mode: checked against `X-Telegram-Bot-Api-Secret-Token`
    /// (required there). Never logged.
    #[serde(serialize_with = "serialize_opt_secret")]
    pub webhook_secret: Option<Secret>,
    /// Answer edited messages again.
    pub answer_edits: bool,
    /// Answer messages other bots send (off: bot-to-bot loops). The bot's
    /// own messages are never answered.
    pub answer_bots: bool,
    /// Webhook mode: what bounds the server's clients (not settings keys
    /// of this section: `[adapters.http]`'s, set when `[adapters]` is
    /// validated).
    #[serde(skip)]
    pub webhook_limits: crate::http::ServeLimits,
}

/// How updates reach the bot (`adapters.telegram.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TelegramMode {
    /// `getUpdates` (any webhook is deleted first).
    #[default]
    Polling,
    /// Telegram POSTs updates to `webhook_url`.
    Webhook,
}

/// The updates the bot asks Telegram for.
fn allowed_updates() -> Vec<AllowedUpdate> {
    vec![AllowedUpdate::Message, AllowedUpdate::EditedMessage]
}

impl RawTelegram {
    /// # Errors
    /// No token while enabled, an `api_url` that is not http(s), a
    /// `poll_timeout_secs` outside 1..=15.
    pub fn validate(self) -> Result<TelegramSettings, SettingsError> {
        let settings = TelegramSettings {
            enabled: self.enabled,
            token: Secret::non_empty(&self.token),
            api_url: self.api_url.trim().trim_end_matches('/').to_string(),
            moderators: self.moderators,
            allowed_chats: self.allowed_chats,
            allowed_users: self.allowed_users,
            poll_timeout: Duration::from_secs(self.poll_timeout_secs),
            retry: RetryPolicy::default(),
            mode: match self.mode.trim() {
                "polling" => TelegramMode::Polling,
                "webhook" => TelegramMode::Webhook,
                other => return Err(invalid("adapters.telegram.mode", format!("{other:?} is not \"polling\" or \"webhook\""))),
            },
            webhook_url: self.webhook_url.trim().to_string(),
            webhook_listen: self.webhook_listen.trim().to_string(),
            webhook_secret: Secret::non_empty(&self.webhook_secret),
            answer_edits: self.answer_edits,
            answer_bots: self.answer_bots,
            webhook_limits: crate::http::ServeLimits::default(),
        };
        if settings.enabled && settings.mode == TelegramMode::Webhook {
            settings.check_webhook()?;
        }
        if settings.enabled && settings.token.is_none() {
            return Err(invalid(
                "adapters.telegram.token",
                "the Telegram adapter is enabled but has no token (set DIALOGD__ADAPTERS__TELEGRAM__TOKEN)",
            ));
        }
        if !(settings.api_url.starts_with("https://") || settings.api_url.starts_with("http://")) {
            return Err(invalid("adapters.telegram.api_url", "must be an http(s) URL"));
        }
        // teloxide's HTTP client gives up on a request after 17 s.
        if !(1..=15).contains(&self.poll_timeout_secs) {
            return Err(invalid(
                "adapters.telegram.poll_timeout_secs",
                format!("{} is not in 1..=15", self.poll_timeout_secs),
            ));
        }
        Ok(settings)
    }
}

impl TelegramSettings {
    /// Whether a message of `user` in `chat` is for the bot at all: both
    /// in their allowed list, an empty list allowing everyone (as
    /// Discord's `allowed_guilds` and `allowed_channels`).
    pub fn admits(&self, chat: i64, user: u64) -> bool {
        (self.allowed_chats.is_empty() || self.allowed_chats.contains(&chat))
            && (self.allowed_users.is_empty() || self.allowed_users.contains(&user))
    }

    /// Webhook mode's keys: an https URL (Telegram posts only there), a
    /// socket address, a secret Telegram accepts.
    fn check_webhook(&self) -> Result<(), SettingsError> {
        match url::Url::parse(&self.webhook_url) {
            Ok(url) if url.scheme() == "https" && url.host().is_some() => {}
            Ok(_) => return Err(invalid("adapters.telegram.webhook_url", "must be the bot's public https:// URL")),
            Err(e) => return Err(invalid("adapters.telegram.webhook_url", format!("{e} (the bot's public https:// URL)"))),
        }
        if self.webhook_listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid("adapters.telegram.webhook_listen", format!("{:?} is not an address such as 127.0.0.1:8443", self.webhook_listen)));
        }
        match &self.webhook_secret {
            None => Err(invalid(
                "adapters.telegram.webhook_secret",
                "webhook mode needs a secret (set DIALOGD__ADAPTERS__TELEGRAM__WEBHOOK_SECRET)",
            )),
            Some(secret) if !webhook::valid_secret(secret.expose()) => {
                Err(invalid("adapters.telegram.webhook_secret", "must be 1-256 of A-Z a-z 0-9 _ -"))
            }
            Some(_) => Ok(()),
        }
    }

    /// The token, or `""` when unset (for scrubbing error text).
    fn bot_token(&self) -> &str {
        self.token.as_ref().map_or("", Secret::expose)
    }
}

/// The Telegram bot.
pub struct TelegramAdapter {
    config: TelegramSettings,
}

impl TelegramAdapter {
    pub fn new(config: TelegramSettings) -> Result<Self, AdapterError> {
        url::Url::parse(&config.api_url)
            .map_err(|e| AdapterError::Platform { adapter: "telegram", message: format!("api_url: {e}") })?;
        if config.bot_token().trim().is_empty() {
            return Err(AdapterError::Platform { adapter: "telegram", message: "no bot token".into() });
        }
        Ok(Self { config })
    }
}

type TgBot = Throttle<Bot>;

/// What every message handler shares.
struct Context {
    bot: TgBot,
    me: Me,
    core: Arc<dyn Core>,
    config: TelegramSettings,
    outbox: Outbox,
    /// Answers of `getChatMember` per (chat, user): privileged, and until when.
    moderators: Mutex<HashMap<(i64, u64), (bool, Instant)>>,
    /// Per channel (chat, or `chat:topic`), messages queued behind a
    /// moderator check and not yet handed to the core: while any is, that
    /// channel's later messages queue too, so the core sees them in order.
    waiting: Mutex<HashMap<String, usize>>,
}

impl Adapter for TelegramAdapter {
    fn name(&self) -> &'static str {
        "telegram"
    }

    fn run(self: Box<Self>, core: Arc<dyn Core>, shutdown: Shutdown) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            let config = self.config;
            let url = url::Url::parse(&config.api_url)
                .map_err(|e| AdapterError::Platform { adapter: "telegram", message: format!("api_url: {e}") })?;
            let plain = Bot::new(config.bot_token()).set_api_url(url);
            let stop = shutdown.clone().wait();
            tokio::pin!(stop);
            let me = tokio::select! {
                _ = &mut stop => return Ok(()),
                me = with_retries(config.retry, "getMe", || plain.get_me().send(), classify, |e| describe(e, config.bot_token())) => me,
            };
            let me = me.map_err(|e| AdapterError::Platform {
                adapter: "telegram",
                message: format!("getMe failed (is the token right?): {}", describe(&e, config.bot_token())),
            })?;
            // Our own bounded retries replace Throttle's unbounded ones.
            let bot = Throttle::spawn_with_settings(plain, ThrottleSettings::default().limits(Limits::default()).no_retry());
            let commands: Vec<BotCommand> =
                COMMANDS.iter().map(|(name, about)| BotCommand::new(*name, *about)).collect();
            let registered = with_retries(
                config.retry,
                "setMyCommands",
                || bot.set_my_commands(commands.clone()).send(),
                classify,
                |e| describe(e, config.bot_token()),
            )
            .await;
            if let Err(e) = registered {
                tracing::warn!(error = %describe(&e, config.bot_token()), "telegram: cannot register the command menu");
            }
            let context = Arc::new(Context {
                bot,
                me,
                core,
                config,
                outbox: Outbox::new(),
                moderators: Mutex::new(HashMap::new()),
                waiting: Mutex::new(HashMap::new()),
            });
            if context.config.mode == TelegramMode::Webhook {
                let outcome = run_webhook(&context, shutdown, &mut stop).await;
                context.outbox.flush().await;
                tracing::info!("telegram adapter stopped");
                return outcome;
            }
            // A webhook left set (webhook mode before) blocks getUpdates.
            let token = context.config.bot_token();
            let deleted = with_retries(context.config.retry, "deleteWebhook", || context.bot.inner().delete_webhook().send(), classify, |e| describe(e, token)).await;
            if let Err(e) = deleted {
                tracing::warn!(error = %describe(&e, token), "telegram: cannot delete the webhook; polling may be refused");
            }
            tracing::info!(bot = %context.me.username(), "telegram adapter polling");
            let mut offset: i32 = 0;
            let mut backoff = context.config.retry.backoff;
            loop {
                let poll = context
                    .bot
                    .inner()
                    .get_updates()
                    .offset(offset)
                    .timeout(context.config.poll_timeout.as_secs() as u32)
                    .allowed_updates(allowed_updates())
                    .send();
                let updates = tokio::select! {
                    _ = &mut stop => break,
                    updates = poll => updates,
                };
                let updates = match updates {
                    Ok(updates) => {
                        backoff = context.config.retry.backoff;
                        updates
                    }
                    Err(e) => {
                        let wait = match &e {
                            RequestError::RetryAfter(after) => after.duration(),
                            _ => backoff,
                        }
                        .min(context.config.retry.max_wait);
                        tracing::warn!(error = %describe(&e, context.config.bot_token()), wait_ms = wait.as_millis() as u64, "telegram: getUpdates failed");
                        backoff = (backoff * 2).min(context.config.retry.max_wait);
                        tokio::select! {
                            _ = &mut stop => break,
                            _ = tokio::time::sleep(wait) => continue,
                        }
                    }
                };
                for update in updates {
                    offset = offset.max(update.id.0 as i32 + 1);
                    on_update(&context, update).await;
                }
            }
            // Let the answers already accepted go out (the daemon bounds this).
            context.outbox.flush().await;
            tracing::info!("telegram adapter stopped");
            Ok(())
        })
    }
}

/// Webhook mode: `setWebhook`, then the updates Telegram POSTs, each
/// once, in arrival order, until shutdown.
async fn run_webhook(
    context: &Arc<Context>,
    shutdown: Shutdown,
    stop: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<(), AdapterError> {
    let config = &context.config;
    let secret = config.webhook_secret.as_ref().map(Secret::expose).unwrap_or_default().to_string();
    let (hook_url, listen) = (&config.webhook_url, &config.webhook_listen);
    let path = url::Url::parse(hook_url)
        .map_err(|e| AdapterError::Platform { adapter: "telegram", message: format!("webhook_url: {e}") })?
        .path()
        .to_string();
    // Listen before Telegram is told where to send.
    let listener = webhook::bind(listen).await?;
    let (queue, mut updates) = tokio::sync::mpsc::channel::<Update>(1024);
    let server = tokio::spawn(webhook::serve(listener, path, secret.clone(), queue, config.webhook_limits, shutdown));
    let token = context.config.bot_token();
    let set = with_retries(
        context.config.retry,
        "setWebhook",
        || {
            let url = url::Url::parse(hook_url).expect("checked above");
            context
                .bot
                .inner()
                .set_webhook(url)
                .secret_token(secret.clone())
                .allowed_updates(allowed_updates())
                .max_connections(1)
                .send()
        },
        classify,
        |e| scrub(&describe(e, token), &secret),
    )
    .await;
    if let Err(e) = set {
        server.abort();
        return Err(AdapterError::Platform {
            adapter: "telegram",
            message: format!("setWebhook failed: {}", scrub(&describe(&e, token), &secret)),
        });
    }
    tracing::info!(bot = %context.me.username(), url = %hook_url, %listen, "telegram adapter on its webhook");
    // Telegram redelivers an update whose answer it did not see: each
    // update id is handled once (they arrive in increasing order).
    let mut last: Option<u32> = None;
    loop {
        let update = tokio::select! {
            _ = &mut *stop => break,
            update = updates.recv() => match update {
                Some(update) => update,
                None => break,
            },
        };
        if last.is_some_and(|last| update.id.0 <= last) {
            tracing::debug!(update = update.id.0, "telegram: a repeated update was dropped");
            continue;
        }
        last = Some(update.id.0);
        on_update(context, update).await;
    }
    match server.await {
        Ok(outcome) => outcome,
        Err(e) => Err(AdapterError::Platform { adapter: "telegram", message: format!("webhook server: {e}") }),
    }
}

/// A message, or an edit of one, to the core.
async fn on_update(context: &Arc<Context>, update: Update) {
    match update.kind {
        UpdateKind::Message(message) => on_message(context, message, None).await,
        UpdateKind::EditedMessage(message) => {
            let edit = Edit { answer: context.config.answer_edits };
            on_message(context, message, Some(edit)).await
        }
        _ => {}
    }
}

/// The channel of a message: the chat, or `chat:topic` for a forum topic.
fn channel_of(message: &Message) -> (String, Option<ThreadId>) {
    let topic = message.thread_id.filter(|_| message.is_topic_message);
    match topic {
        Some(thread) => (format!("{}:{}", message.chat.id.0, thread.0 .0), Some(thread)),
        None => (message.chat.id.0.to_string(), None),
    }
}

/// Decides whether a message is for the bot and hands it to the core.
async fn on_message(context: &Arc<Context>, message: Message, edit: Option<Edit>) {
    let (Some(text), Some(from)) = (message.text(), message.from.as_ref()) else { return };
    if from.is_bot && !(context.config.answer_bots && from.id != context.me.user.id) {
        return;
    }
    if !context.config.admits(message.chat.id.0, from.id.0) {
        return tracing::debug!(chat = message.chat.id.0, "telegram: chat or user not in the allowed lists");
    }
    let me = &context.me;
    let username = me.username();
    let private = message.chat.is_private();
    let command = command_word(text);
    if let Some((_, Some(target))) = command {
        if !target.eq_ignore_ascii_case(username) {
            return; // A command for another bot in this group.
        }
    }
    if edit.is_some() && command.is_some() {
        return; // An edited command is not run again, and was never a turn.
    }
    let mention = format!("@{username}");
    let mentioned = text.to_ascii_lowercase().contains(&mention.to_ascii_lowercase());
    let replied_to_bot =
        message.reply_to_message().and_then(|m| m.from.as_ref()).is_some_and(|author| author.id == me.user.id);
    if !(private || command.is_some() || mentioned || replied_to_bot) {
        return;
    }
    let text = if command.is_none() && mentioned { strip_mention(text, &mention) } else { text.to_string() };
    // Known at once (no platform call), or to be asked off the polling loop.
    let moderator = if is_moderator_command(&text) { known_moderator(context, &message) } else { Some(false) };
    let (key, thread) = channel_of(&message);
    let mut inbound = Inbound {
        channel: ChannelKey::new(Platform::Telegram, key.clone()),
        author: from.id.0.to_string(),
        text,
        msg_id: Some(message.id.0.to_string()),
        addressed_to_bot: true,
        moderator: moderator.unwrap_or(false),
        operator: context.config.moderators.contains(&from.id.0),
        group: None,
        edit,
    };
    let (user, reply_to) = (from.id, message.id);
    let to = Target { chat: message.chat.id, thread };
    let queued = {
        let mut waiting = context.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let behind = waiting.get(&key).copied().unwrap_or(0);
        if moderator.is_none() || behind > 0 {
            *waiting.entry(key.clone()).or_default() += 1;
        }
        moderator.is_none() || behind > 0
    };
    let context = context.clone();
    if !queued {
        // Handing it over now fixes its place in the channel's order.
        let answer = context.core.handle(inbound);
        context.outbox.clone().push(&key, Box::pin(deliver(context, to, reply_to, answer)));
        return;
    }
    // Behind the channel's earlier work: ask (if need be), hand over, answer.
    let queue = key.clone();
    context.outbox.clone().push(
        &queue,
        Box::pin(async move {
            if moderator.is_none() {
                inbound.moderator = ask_moderator(&context, to.chat, user).await;
            }
            let answer = context.core.handle(inbound);
            {
                let mut waiting = context.waiting.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(n) = waiting.get_mut(&key) {
                    *n -= 1;
                    if *n == 0 {
                        waiting.remove(&key);
                    }
                }
            }
            deliver(context, to, reply_to, answer).await;
        }),
    );
}

/// Where an answer goes: a chat, and a forum topic in it.
#[derive(Debug, Clone, Copy)]
struct Target {
    chat: ChatId,
    thread: Option<ThreadId>,
}

/// Waits for the core (typing meanwhile) and sends what it answered.
async fn deliver(
    context: Arc<Context>,
    to: Target,
    reply_to: MessageId,
    answer: BoxFuture<'static, Result<Answer, CoreError>>,
) {
    let chat = to.chat;
    let typing = async {
        loop {
            let mut action = context.bot.send_chat_action(chat, ChatAction::Typing);
            if let Some(thread) = to.thread {
                action = action.message_thread_id(thread);
            }
            if let Err(e) = action.send().await {
                tracing::debug!(error = %describe(&e, context.config.bot_token()), "telegram: typing action failed");
            }
            tokio::time::sleep(TYPING_EVERY).await;
        }
    };
    let answer = tokio::select! {
        answer = answer => answer,
        _ = typing => unreachable!("the typing loop never ends"),
    };
    let text = match answer {
        Ok(Answer::Reply(out)) => out.text,
        Ok(Answer::Silent { reason }) => return tracing::debug!(chat = chat.0, reason, "telegram: no reply"),
        Err(CoreError::ShuttingDown | CoreError::RateLimited { notice: None, .. }) => return,
        Err(CoreError::RateLimited { notice: Some(notice), .. }) => notice,
        Err(e @ (CoreError::Busy | CoreError::Unavailable(_))) => {
            tracing::info!(chat = chat.0, error = %e, "telegram: message not answered");
            "I'm busy right now; please try again in a minute.".to_string()
        }
        Err(CoreError::Invalid(why)) => format!("I can't answer that: {why}."),
        Err(e) => {
            tracing::warn!(chat = chat.0, error = %e, "telegram: message failed");
            "Sorry, something went wrong with that message.".to_string()
        }
    };
    send_text(&context, to, &text, Some(reply_to)).await;
}

/// Sends `text` in pieces within Telegram's limit, the first as a reply.
/// A piece that still fails after the retries is logged and the rest are
/// not sent (they would read out of context).
async fn send_text(context: &Context, to: Target, text: &str, reply_to: Option<MessageId>) {
    let chat = to.chat;
    let pieces = split_message(text, MESSAGE_LIMIT, utf16_units);
    for (n, piece) in pieces.iter().enumerate() {
        let token = context.config.bot_token();
        let sent = with_retries(
            context.config.retry,
            "sendMessage",
            || {
                let mut request = context.bot.send_message(chat, piece.clone());
                // Every piece to the topic: without it Telegram posts to General.
                if let Some(thread) = to.thread {
                    request = request.message_thread_id(thread);
                }
                if let (0, Some(id)) = (n, reply_to) {
                    request = request.reply_parameters(ReplyParameters::new(id).allow_sending_without_reply());
                }
                request.send()
            },
            classify,
            |e| describe(e, token),
        )
        .await;
        if let Err(e) = sent {
            tracing::warn!(chat = chat.0, piece = n, of = pieces.len(), error = %describe(&e, token), "telegram: reply lost");
            return;
        }
    }
}

/// Whether the sender is a moderator, when that is known without asking
/// Telegram: the allowlist, a private chat (no), or a cached answer.
fn known_moderator(context: &Context, message: &Message) -> Option<bool> {
    let Some(user) = message.from.as_ref() else { return Some(false) };
    if context.config.moderators.contains(&user.id.0) {
        return Some(true);
    }
    if message.chat.is_private() {
        return Some(false);
    }
    let cache = context.moderators.lock().unwrap_or_else(|e| e.into_inner());
    cache.get(&(message.chat.id.0, user.id.0)).filter(|(_, until)| Instant::now() < *until).map(|(yes, _)| *yes)
}

/// Asks Telegram whether the user is an administrator or owner of the
/// chat, within [`MODERATOR_CHECK_TIMEOUT`], and caches the answer.
async fn ask_moderator(context: &Context, chat: ChatId, user: UserId) -> bool {
    let token = context.config.bot_token();
    let asked = tokio::time::timeout(
        MODERATOR_CHECK_TIMEOUT,
        with_retries(
            context.config.retry,
            "getChatMember",
            || context.bot.get_chat_member(chat, user).send(),
            classify,
            |e| describe(e, token),
        ),
    )
    .await;
    let (privileged, keep) = match asked {
        Ok(Ok(member)) => (member.is_privileged(), MODERATOR_CACHE_TTL),
        Ok(Err(e)) => {
            tracing::warn!(chat = chat.0, error = %describe(&e, token), "telegram: cannot ask who is an administrator");
            (false, MODERATOR_CACHE_TTL / 5)
        }
        Err(_) => {
            tracing::warn!(chat = chat.0, timeout = ?MODERATOR_CHECK_TIMEOUT, "telegram: no answer on who is an administrator");
            (false, MODERATOR_CACHE_TTL / 5)
        }
    };
    let mut cache = context.moderators.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if cache.len() >= 4096 {
        cache.retain(|_, (_, until)| now < *until);
    }
    cache.insert((chat.0, user.0), (privileged, now + keep));
    privileged
}

/// How a Bot API failure is retried.
fn classify(error: &RequestError) -> Failure {
    match error {
        RequestError::RetryAfter(after) => Failure::RetryAfter(Some(after.duration())),
        RequestError::Network(_) | RequestError::Io(_) | RequestError::InvalidJson { .. } => Failure::Transient,
        RequestError::Api(ApiError::Unknown(description)) if is_server_error(description) => Failure::Transient,
        _ => Failure::Permanent,
    }
}

/// Telegram's descriptions of its own failures (the error code is not
/// kept by teloxide).
fn is_server_error(description: &str) -> bool {
    let lower = description.to_ascii_lowercase();
    ["internal server error", "bad gateway", "service unavailable", "gateway timeout", "too many requests"]
        .iter()
        .any(|needle| lower.contains(needle))
}

/// An error as a log line, without the token.
fn describe(error: &RequestError, token: &str) -> String {
    scrub(&error.to_string(), token)
}

/// The text without the bot's `@mention` (ASCII case-insensitive); the
/// text itself when nothing else is left.
fn strip_mention(text: &str, mention: &str) -> String {
    let cleaned = strip_addressing(text, &[mention]);
    if cleaned.is_empty() {
        text.to_string()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_stripped() {
        assert_eq!(strip_mention("@Dialogd_Bot, how are you?", "@dialogd_bot"), "how are you?");
        assert_eq!(strip_mention("hey @dialogd_bot what's up", "@dialogd_bot"), "hey what's up");
        assert_eq!(strip_mention("@dialogd_bot", "@dialogd_bot"), "@dialogd_bot");
    }

    #[test]
    fn server_errors_are_retried_and_bad_requests_are_not() {
        assert_eq!(classify(&RequestError::RetryAfter(teloxide::types::Seconds::from_seconds(2))), Failure::RetryAfter(Some(Duration::from_secs(2))));
        assert_eq!(classify(&RequestError::Api(ApiError::Unknown("Internal Server Error".into()))), Failure::Transient);
        assert_eq!(classify(&RequestError::Api(ApiError::BotBlocked)), Failure::Permanent);
    }
}
