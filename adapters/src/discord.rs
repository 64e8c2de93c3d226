//! The Discord adapter: a bot on the gateway through serenity, with slash
//! commands.
//!
//! Gateway intents: `GUILD_MESSAGES`, `DIRECT_MESSAGES` and
//! `MESSAGE_CONTENT` (privileged: enable "Message Content Intent" in the
//! developer portal, or guild messages arrive without their text).
//! serenity keeps the gateway alive: heartbeats, reconnects, and resumes
//! the session (missed events are replayed) when the connection drops.
//!
//! Who is answered: direct messages; in guilds, messages that mention the
//! bot, reply to one of its messages, or are posted in an open channel
//! (`open_channels`). `allowed_guilds` / `allowed_channels` (when not
//! empty) confine the bot; elsewhere it is silent. Slash commands (`/ask`,
//! `/reset`, `/forget`, `/help`, `/mute`, `/unmute`, `/persona`, `/train`)
//! are registered per guild (`command_guilds`) or globally.
//!
//! Answers go through the [`Outbox`] (one channel's answers in order),
//! with the typing indicator while the core works, the first piece as a
//! reply, split at 2000 characters, with mentions disabled (a generated
//! `@everyone` pings nobody). Every REST call the adapter makes goes
//! through [`rest::Rest`], which honours the waits Discord asks for (a
//! 429's `retry_after`, `Retry-After`, `X-RateLimit-Reset-After`, global
//! limits, exhausted buckets), also behind a REST proxy (`proxy_url`);
//! failed calls (429, 5xx, network) are retried within a [`RetryPolicy`].
//! Messages are split at 2000 characters as Discord counts them: Unicode
//! code points (its API is Python 3; discord/discord-api-docs#1315), so an
//! emoji is one character, not two UTF-16 units.
//!
//! Threads: a thread is its own channel (its own context) and belongs to
//! its parent for `allowed_channels` and `open_channels`. Edited messages
//! go to the core as edits ([`crate::Edit`]), answered again only with
//! `answer_edits`.
//!
//! Moderators: the allowlist of user ids, members holding a configured
//! role, and members with the Manage Server (or Administrator) permission.
//!
//! Shards ([`shards`]): `shard_count` (0: Discord's recommendation) and
//! this instance's `shards` range; every log line of an event carries its
//! `shard` (a span), and [`ShardStats`] keeps per-shard figures for
//! metrics. Slash commands are registered by shard 0 only.

mod rest;
pub mod shards;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use serenity::all::{
    ChannelId, CommandInteraction, CommandOptionType, Context, CreateAllowedMentions, CreateCommand, CreateCommandOption,
    CreateInteractionResponseFollowup, CreateMessage, EventHandler, GatewayIntents, GuildId, HttpBuilder, Interaction,
    Message, MessageId, MessageReference, MessageUpdateEvent, Permissions, Ready, ResumedEvent, RoleId, UserId,
};
use serenity::http::{Http, LightMethod, Route};

use crate::outbox::Outbox;
use crate::retry::RetryPolicy;
use crate::settings::{invalid, serialize_opt_secret, Secret, SettingsError};
use rest::{Rest, RestError};
pub use shards::{ShardFigures, ShardRange, ShardStats};
use tracing::Instrument as _;
use crate::text::{chars, is_moderator_command, scrub, split_message, strip_addressing, COMMANDS};
use crate::{Adapter, AdapterError, Answer, BoxFuture, ChannelKey, Core, CoreError, Edit, Inbound, Platform, Shutdown};

/// Discord's longest message, in characters.
pub const MESSAGE_LIMIT: usize = 2000;

/// `[adapters.discord]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscord {
    pub enabled: bool,
    pub token: String,
    pub proxy_url: String,
    pub allowed_guilds: Vec<u64>,
    pub allowed_channels: Vec<u64>,
    pub open_channels: Vec<u64>,
    pub command_guilds: Vec<u64>,
    pub moderator_roles: Vec<u64>,
    pub moderators: Vec<u64>,
    pub answer_edits: bool,
    pub answer_bots: bool,
    pub shard_count: u32,
    pub shards: Vec<u32>,
}

/// `[adapters.discord]` validated: what the adapter runs with.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiscordSettings {
    pub enabled: bool,
    /// The bot token from the developer portal. Never logged; `None`:
    /// unset (the adapter is then off).
    #[serde(serialize_with = "serialize_opt_secret")]
    pub token: Option<Secret>,
    /// A REST proxy (`http://host:port`) that every API call goes through;
    /// serenity's own rate limiter is then off (the proxy limits). Shown as
    /// `""` when unset.
    #[serde(serialize_with = "serialize_opt_str")]
    pub proxy_url: Option<String>,
    /// Guilds the bot works in (empty: every guild it is in).
    pub allowed_guilds: Vec<u64>,
    /// Guild channels the bot works in (empty: all of them).
    pub allowed_channels: Vec<u64>,
    /// Channels where every message is answered, no mention needed.
    pub open_channels: Vec<u64>,
    /// Guilds to register slash commands in (at once); empty: globally.
    pub command_guilds: Vec<u64>,
    /// Roles whose members are moderators.
    pub moderator_roles: Vec<u64>,
    /// User ids that are moderators everywhere.
    pub moderators: Vec<u64>,
    /// Answer edited messages again.
    pub answer_edits: bool,
    /// Answer messages other bots send (off: bot-to-bot loops). The bot's
    /// own messages are never answered.
    pub answer_bots: bool,
    /// The bot's shards in all (0: as many as Discord recommends, all run
    /// here).
    pub shard_count: u32,
    /// The shards this instance runs (`None`: all of them). Shown as
    /// `[first, last]`, or `[]` for all.
    #[serde(serialize_with = "serialize_shards")]
    pub shards: Option<ShardRange>,
    /// Retries of REST calls (not a settings key: the default, or a test's).
    #[serde(skip)]
    pub retry: RetryPolicy,
}

fn serialize_shards<S: serde::Serializer>(value: &Option<ShardRange>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(range) => range.serialize(s),
        None => s.collect_seq(std::iter::empty::<u32>()),
    }
}

fn serialize_opt_str<S: serde::Serializer>(value: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(value.as_deref().unwrap_or_default())
}

impl RawDiscord {
    /// # Errors
    /// No token while enabled, a `proxy_url` that is neither empty nor
    /// http(s), a bad shard range ([`shards`]).
    pub fn validate(self) -> Result<DiscordSettings, SettingsError> {
        let proxy_url = self.proxy_url.trim();
        let shards = shards::validate(self.shard_count, &self.shards)?;
        let settings = DiscordSettings {
            enabled: self.enabled,
            token: Secret::non_empty(&self.token),
            proxy_url: (!proxy_url.is_empty()).then(|| proxy_url.to_string()),
            allowed_guilds: self.allowed_guilds,
            allowed_channels: self.allowed_channels,
            open_channels: self.open_channels,
            command_guilds: self.command_guilds,
            moderator_roles: self.moderator_roles,
            moderators: self.moderators,
            answer_edits: self.answer_edits,
            answer_bots: self.answer_bots,
            shard_count: self.shard_count,
            shards,
            retry: RetryPolicy::default(),
        };
        if settings.enabled && settings.token.is_none() {
            return Err(invalid(
                "adapters.discord.token",
                "the Discord adapter is enabled but has no token (set DIALOGD__ADAPTERS__DISCORD__TOKEN)",
            ));
        }
        if !(proxy_url.is_empty() || proxy_url.starts_with("http://") || proxy_url.starts_with("https://")) {
            return Err(invalid("adapters.discord.proxy_url", "must be empty or an http(s) URL"));
        }
        Ok(settings)
    }
}

impl DiscordSettings {
    /// The token, or `""` when unset (for scrubbing error text).
    fn bot_token(&self) -> &str {
        self.token.as_ref().map_or("", Secret::expose)
    }
}

/// The Discord bot.
pub struct DiscordAdapter {
    config: DiscordSettings,
    shards: Arc<ShardStats>,
}

impl DiscordAdapter {
    pub fn new(config: DiscordSettings) -> Result<Self, AdapterError> {
        if config.bot_token().trim().is_empty() {
            return Err(AdapterError::Platform { adapter: "discord", message: "no bot token".into() });
        }
        Ok(Self { config, shards: Arc::default() })
    }

    /// The per-shard figures this adapter keeps while it runs.
    pub fn shard_stats(&self) -> Arc<ShardStats> {
        self.shards.clone()
    }
}

/// The gateway intents the bot asks for. `MESSAGE_CONTENT` is privileged.
pub fn intents() -> GatewayIntents {
    GatewayIntents::GUILD_MESSAGES | GatewayIntents::DIRECT_MESSAGES | GatewayIntents::MESSAGE_CONTENT
}

/// What the event handlers share.
struct State {
    core: Arc<dyn Core>,
    config: DiscordSettings,
    /// Set from the Ready event.
    bot_id: OnceLock<UserId>,
    outbox: Outbox,
    /// Every REST call goes through it (rate limits honoured).
    rest: Rest,
    /// Threads' parents (`None`: not a thread), looked up once each.
    parents: Mutex<HashMap<ChannelId, Option<ChannelId>>>,
    shards: Arc<ShardStats>,
}

struct Handler(Arc<State>);

impl Adapter for DiscordAdapter {
    fn name(&self) -> &'static str {
        "discord"
    }

    fn run(self: Box<Self>, core: Arc<dyn Core>, shutdown: Shutdown) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            let Self { config, shards: stats } = *self;
            let token = config.bot_token().to_string();
            let mut http = HttpBuilder::new(&token);
            if let Some(proxy) = &config.proxy_url {
                http = http.proxy(proxy.clone()).ratelimiter_disabled(true);
            }
            let rest = Rest::new(&token, config.proxy_url.clone(), config.retry);
            let parents = Mutex::new(HashMap::new());
            let start = shards::Start::new(config.shard_count, config.shards);
            let shards = stats.clone();
            let state = Arc::new(State { core, config, bot_id: OnceLock::new(), outbox: Outbox::new(), rest, parents, shards });
            let client = serenity::client::ClientBuilder::new_with_http(http.build(), intents())
                .event_handler(Handler(state.clone()))
                .await;
            let mut client = client.map_err(|e| AdapterError::Platform { adapter: "discord", message: scrub(&e.to_string(), &token) })?;
            let manager = client.shard_manager.clone();
            let watching = tokio::spawn(shards::watch(manager.clone(), stats.clone()));
            tracing::info!(?start, "discord: starting the gateway shards");
            let stop = shutdown.wait();
            let outcome = tokio::select! {
                _ = stop => {
                    manager.shutdown_all().await;
                    Ok(())
                }
                ended = start.run(&mut client) => ended,
            };
            watching.abort();
            stats.all_down();
            state.outbox.flush().await;
            match outcome {
                Ok(()) => {
                    tracing::info!("discord adapter stopped");
                    Ok(())
                }
                Err(e) => Err(AdapterError::Platform { adapter: "discord", message: scrub(&refusal(&e), &token) }),
            }
        })
    }
}

/// Why the gateway ended the client, with what to do about the refusals
/// that only the operator can fix.
fn refusal(error: &serenity::Error) -> String {
    use serenity::gateway::GatewayError;
    match error {
        serenity::Error::Gateway(GatewayError::InvalidAuthentication) => {
            "the gateway refused the bot token (close 4004): check DIALOGD__ADAPTERS__DISCORD__TOKEN".into()
        }
        serenity::Error::Gateway(GatewayError::DisallowedGatewayIntents) => "the gateway refused the intents (close 4014): \
             enable the Message Content Intent for the bot in the Discord developer portal (Bot → Privileged Gateway Intents)"
            .into(),
        serenity::Error::Gateway(GatewayError::InvalidGatewayIntents) => {
            "the gateway refused the intents as invalid (close 4013)".into()
        }
        serenity::Error::Http(serenity::http::HttpError::UnsuccessfulRequest(answer)) if answer.status_code.as_u16() == 401 => {
            "Discord refused the bot token (HTTP 401 asking for the recommended shard count): check DIALOGD__ADAPTERS__DISCORD__TOKEN".into()
        }
        other => format!("the gateway connection ended: {other}"),
    }
}

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        let state = &self.0;
        let shard = ctx.shard_id.0;
        let _ = state.bot_id.set(ready.user.id);
        state.shards.update(shard, |f| {
            f.up = true;
            f.guilds = ready.guilds.len() as u64;
        });
        let span = shard_span(&ctx);
        async {
            tracing::info!(bot = %ready.user.name, guilds = ready.guilds.len(), "discord: gateway ready");
            // One registration per bot, not one per shard or instance.
            if shard == 0 {
                register_commands(state, &ctx.http).await;
            }
        }
        .instrument(span)
        .await;
    }

    async fn resume(&self, ctx: Context, _event: ResumedEvent) {
        self.0.shards.update(ctx.shard_id.0, |f| f.up = true);
        shard_span(&ctx).in_scope(|| tracing::info!("discord: gateway session resumed"));
    }

    async fn shard_stage_update(&self, _ctx: Context, event: serenity::gateway::ShardStageUpdateEvent) {
        let up = matches!(event.new, serenity::gateway::ConnectionStage::Connected);
        self.0.shards.update(event.shard_id.0, |f| f.up = up);
    }

    async fn message(&self, ctx: Context, message: Message) {
        let span = shard_span(&ctx);
        on_message(&self.0, ctx, message).instrument(span).await;
    }

    async fn message_update(&self, ctx: Context, _old: Option<Message>, _new: Option<Message>, event: MessageUpdateEvent) {
        let span = shard_span(&ctx);
        on_edit(&self.0, ctx, event).instrument(span).await;
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        if let Interaction::Command(command) = interaction {
            let span = shard_span(&ctx);
            on_command(&self.0, ctx, command).instrument(span).await;
        }
    }
}

/// The span an event's log lines are written in: its `shard`.
fn shard_span(ctx: &Context) -> tracing::Span {
    tracing::info_span!("discord", shard = ctx.shard_id.0)
}

/// Counts a message, edit or command handed to the core on `ctx`'s shard.
fn count_handed(state: &State, ctx: &Context) {
    state.shards.update(ctx.shard_id.0, |f| f.messages += 1);
}

/// The slash commands, with their text options.
fn command_builders() -> Vec<CreateCommand> {
    COMMANDS
        .iter()
        .filter(|(name, _)| *name != "start")
        .map(|(name, about)| {
            let command = CreateCommand::new(*name).description(*about);
            match *name {
                "ask" => command.add_option(
                    CreateCommandOption::new(CommandOptionType::String, "text", "What to say to me").required(true),
                ),
                "persona" => command.add_option(CreateCommandOption::new(
                    CommandOptionType::String,
                    "what",
                    "list | show | use NAME [server] | create NAME SEED TURN | off",
                )),
                "train" => command.add_option(CreateCommandOption::new(
                    CommandOptionType::String,
                    "what",
                    "(empty: start) | status | cancel | rollback",
                )),
                "collect" => command.add_option(CreateCommandOption::new(CommandOptionType::String, "what", "on | off | status")),
                "block" | "unblock" | "allow" | "disallow" => command.add_option(
                    CreateCommandOption::new(CommandOptionType::String, "words", "One or more words, separated by spaces").required(true),
                ),
                _ => command,
            }
        })
        .collect()
}

async fn register_commands(state: &State, http: &Arc<Http>) {
    let token = state.config.bot_token();
    let Some(application_id) = http.application_id() else {
        tracing::warn!("discord: no application id after Ready; slash commands not registered");
        return;
    };
    let commands = json_body(&command_builders());
    if state.config.command_guilds.is_empty() {
        let route = Route::Commands { application_id };
        let done = state.rest.call("register global commands", route, LightMethod::Put, commands).await;
        if let Err(e) = done {
            tracing::warn!(error = %scrub(&e.to_string(), token), "discord: cannot register slash commands");
        }
        return;
    }
    for guild in &state.config.command_guilds {
        let guild_id = GuildId::new(*guild);
        let route = Route::GuildCommands { application_id, guild_id };
        let done = state.rest.call("register guild commands", route, LightMethod::Put, commands.clone()).await;
        if let Err(e) = done {
            tracing::warn!(guild = guild_id.get(), error = %scrub(&e.to_string(), token), "discord: cannot register slash commands");
        }
    }
}

/// A request body as JSON.
fn json_body(value: &impl Serialize) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(value).unwrap_or_default())
}

/// The channel whose `allowed_channels`/`open_channels` membership
/// `channel` has: itself, or for a thread not listed itself, its parent
/// (asked once per thread with `GET /channels/{id}`, then remembered).
async fn listed_as(state: &State, guild: Option<GuildId>, channel: ChannelId) -> ChannelId {
    let config = &state.config;
    let listed = |c: ChannelId| config.allowed_channels.contains(&c.get()) || config.open_channels.contains(&c.get());
    if guild.is_none() || (config.allowed_channels.is_empty() && config.open_channels.is_empty()) || listed(channel) {
        return channel;
    }
    if let Some(known) = state.parents.lock().unwrap_or_else(|e| e.into_inner()).get(&channel) {
        return known.unwrap_or(channel);
    }
    let found = state.rest.call("get channel", Route::Channel { channel_id: channel }, LightMethod::Get, None).await;
    let parent = match found {
        Ok(body) => {
            let found: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            // 10, 11, 12: announcement, public and private threads.
            let thread = matches!(found["type"].as_u64(), Some(10..=12));
            let parent = found["parent_id"].as_str().and_then(|id| id.parse::<u64>().ok()).filter(|&id| id != 0);
            if thread { parent.map(ChannelId::new) } else { None }
        }
        Err(e) => {
            // Not remembered: asked again with the next message.
            tracing::warn!(channel = channel.get(), error = %scrub(&e.to_string(), config.bot_token()), "discord: cannot look up a channel's parent");
            return channel;
        }
    };
    state.parents.lock().unwrap_or_else(|e| e.into_inner()).insert(channel, parent);
    parent.unwrap_or(channel)
}

/// Whether the bot works in this place at all (`channel` as [`listed_as`]
/// gives it).
fn allowed(config: &DiscordSettings, guild: Option<GuildId>, channel: ChannelId) -> bool {
    let Some(guild) = guild else { return true };
    (config.allowed_guilds.is_empty() || config.allowed_guilds.contains(&guild.get()))
        && (config.allowed_channels.is_empty()
            || config.allowed_channels.contains(&channel.get())
            || config.open_channels.contains(&channel.get()))
}

/// Whether a message (or its edit) is addressed to the bot: its text
/// without the bot's mention, or `None`.
fn addressed_text(state: &State, listed: ChannelId, guild: Option<GuildId>, content: &str, mentions: &[serenity::all::User], replied_to_bot: bool) -> Option<String> {
    let &bot_id = state.bot_id.get()?;
    let direct = guild.is_none();
    let mention = [format!("<@{bot_id}>"), format!("<@!{bot_id}>")];
    let mentioned = mentions.iter().any(|user| user.id == bot_id) || mention.iter().any(|m| content.contains(m));
    let open = state.config.open_channels.contains(&listed.get());
    if !(direct || mentioned || replied_to_bot || open) {
        return None;
    }
    let text = strip_addressing(content, &[mention[0].as_str(), mention[1].as_str()]);
    (!text.is_empty()).then_some(text)
}

/// The channel `channel` is listed as ([`listed_as`]), if the bot works
/// there at all ([`allowed`]).
async fn admitted(state: &State, guild: Option<GuildId>, channel: ChannelId) -> Option<ChannelId> {
    let listed = listed_as(state, guild, channel).await;
    allowed(&state.config, guild, listed).then_some(listed)
}

/// A message for the core in `channel` (a thread is its own channel), not
/// from a moderator, not an edit.
fn inbound(channel: ChannelId, guild: Option<GuildId>, author: UserId, msg_id: u64, text: String) -> Inbound {
    Inbound {
        channel: ChannelKey::new(Platform::Discord, channel.get().to_string()),
        author: author.get().to_string(),
        text,
        msg_id: Some(msg_id.to_string()),
        addressed_to_bot: true,
        moderator: false,
        operator: false,
        group: guild.map(|g| g.get().to_string()),
        edit: None,
    }
}

/// Queues the delivery of `answer` in `channel`'s outbox (its answers in
/// order, one at a time).
fn queue_answer(state: &Arc<State>, http: Arc<Http>, channel: ChannelId, reply: Reply, answer: BoxFuture<'static, Result<Answer, CoreError>>) {
    // Its log lines keep the shard span of the event that asked for it.
    let task = deliver(state.clone(), http, channel, reply, answer).instrument(tracing::Span::current());
    state.outbox.push(&channel.get().to_string(), Box::pin(task));
}

async fn on_message(state: &Arc<State>, ctx: Context, message: Message) {
    if message.author.bot && !(state.config.answer_bots && Some(&message.author.id) != state.bot_id.get()) {
        return;
    }
    let Some(listed) = admitted(state, message.guild_id, message.channel_id).await else { return };
    let replied_to_bot = message.referenced_message.as_ref().is_some_and(|m| Some(&m.author.id) == state.bot_id.get());
    let Some(text) = addressed_text(state, listed, message.guild_id, &message.content, &message.mentions, replied_to_bot) else {
        return;
    };
    let moderator = is_moderator_command(&text) && message_author_is_moderator(state, &message).await;
    let operator = moderator && state.config.moderators.contains(&message.author.id.get());
    let inbound = Inbound { moderator, operator, ..inbound(message.channel_id, message.guild_id, message.author.id, message.id.get(), text) };
    // Handing it over now fixes its place in the channel's order.
    count_handed(state, &ctx);
    let answer = state.core.handle(inbound);
    queue_answer(state, ctx.http.clone(), message.channel_id, Reply::Message(message.id), answer);
}

/// An edited message: to the core as an edit of the same message id (a
/// thread's or channel's own context), answered only with `answer_edits`.
async fn on_edit(state: &Arc<State>, ctx: Context, event: MessageUpdateEvent) {
    let (Some(author), Some(content)) = (event.author.as_ref(), event.content.as_deref()) else { return };
    if author.bot && !(state.config.answer_bots && Some(&author.id) != state.bot_id.get()) {
        return;
    }
    let Some(listed) = admitted(state, event.guild_id, event.channel_id).await else { return };
    let replied_to_bot = event
        .referenced_message
        .as_ref()
        .and_then(|m| m.as_ref())
        .is_some_and(|m| Some(&m.author.id) == state.bot_id.get());
    let mentions = event.mentions.clone().unwrap_or_default();
    let Some(text) = addressed_text(state, listed, event.guild_id, content, &mentions, replied_to_bot) else { return };
    if crate::text::command_word(&text).is_some() {
        return; // An edited command is not run again, and was never a turn.
    }
    let edit = Some(Edit { answer: state.config.answer_edits });
    let inbound = Inbound { edit, ..inbound(event.channel_id, event.guild_id, author.id, event.id.get(), text) };
    count_handed(state, &ctx);
    let answer = state.core.handle(inbound);
    queue_answer(state, ctx.http.clone(), event.channel_id, Reply::Message(event.id), answer);
}

async fn on_command(state: &Arc<State>, ctx: Context, command: CommandInteraction) {
    if admitted(state, command.guild_id, command.channel_id).await.is_none() {
        return;
    }
    let name = command.data.name.clone();
    let argument = command.data.options.first().and_then(|o| o.value.as_str()).unwrap_or("").trim().to_string();
    let text = if argument.is_empty() { format!("/{name}") } else { format!("/{name} {argument}") };
    let moderator = is_moderator_command(&text) && interaction_user_is_moderator(state, &command);
    let operator = moderator && state.config.moderators.contains(&command.user.id.get());
    let inbound = Inbound { moderator, operator, ..inbound(command.channel_id, command.guild_id, command.user.id, command.id.get(), text) };
    count_handed(state, &ctx);
    let answer = state.core.handle(inbound);
    let token = state.config.bot_token();
    // Discord wants an answer within 3 s: say "thinking…" first (type 5,
    // a deferred channel message).
    let route = Route::InteractionResponse { interaction_id: command.id, token: &command.token };
    let defer = json_body(&serde_json::json!({ "type": 5 }));
    let deferred = state.rest.call("defer interaction", route, LightMethod::Post, defer).await;
    if let Err(e) = deferred {
        tracing::warn!(command = %name, error = %scrub(&e.to_string(), token), "discord: cannot acknowledge a command");
        return;
    }
    let channel = command.channel_id;
    queue_answer(state, ctx.http.clone(), channel, Reply::Interaction(Box::new(command)), answer);
}

/// Where an answer goes.
enum Reply {
    /// A channel message replying to this one.
    Message(MessageId),
    /// Follow-ups of a deferred slash command.
    Interaction(Box<CommandInteraction>),
}

async fn deliver(
    state: Arc<State>,
    http: Arc<Http>,
    channel: ChannelId,
    reply: Reply,
    answer: BoxFuture<'static, Result<Answer, CoreError>>,
) {
    let typing = matches!(reply, Reply::Message(_)).then(|| channel.start_typing(&http));
    let answer = answer.await;
    drop(typing);
    let text = match answer {
        Ok(Answer::Reply(out)) => out.text,
        Ok(Answer::Silent { reason }) => {
            tracing::debug!(channel = channel.get(), reason, "discord: no reply");
            match reply {
                // A deferred command must be answered.
                Reply::Interaction(_) => "(no reply)".to_string(),
                Reply::Message(_) => return,
            }
        }
        Err(CoreError::ShuttingDown) => return,
        Err(CoreError::RateLimited { notice: Some(notice), .. }) => notice,
        Err(CoreError::RateLimited { notice: None, .. }) => match reply {
            // A deferred command must be answered.
            Reply::Interaction(_) => "(no reply: rate limited)".to_string(),
            Reply::Message(_) => return,
        },
        Err(e @ (CoreError::Busy | CoreError::Unavailable(_))) => {
            tracing::info!(channel = channel.get(), error = %e, "discord: message not answered");
            "I'm busy right now; please try again in a minute.".to_string()
        }
        Err(CoreError::Invalid(why)) => format!("I can't answer that: {why}."),
        Err(e) => {
            tracing::warn!(channel = channel.get(), error = %e, "discord: message failed");
            "Sorry, something went wrong with that message.".to_string()
        }
    };
    let token = state.config.bot_token();
    let pieces = split_message(&text, MESSAGE_LIMIT, chars);
    for (n, piece) in pieces.iter().enumerate() {
        let sent: Result<Vec<u8>, RestError> = match &reply {
            Reply::Message(id) => {
                let mut message =
                    CreateMessage::new().content(piece.clone()).allowed_mentions(CreateAllowedMentions::new());
                if n == 0 {
                    message = message.reference_message(MessageReference::from((channel, *id)));
                }
                let route = Route::ChannelMessages { channel_id: channel };
                state.rest.call("send message", route, LightMethod::Post, json_body(&message)).await
            }
            Reply::Interaction(command) => {
                let followup = CreateInteractionResponseFollowup::new()
                    .content(piece.clone())
                    .allowed_mentions(CreateAllowedMentions::new());
                let route = Route::WebhookFollowupMessages { application_id: command.application_id, token: &command.token };
                state.rest.call("send follow-up", route, LightMethod::Post, json_body(&followup)).await
            }
        };
        if let Err(e) = sent {
            tracing::warn!(channel = channel.get(), piece = n, of = pieces.len(), error = %scrub(&e.to_string(), token), "discord: reply lost");
            return;
        }
    }
}

fn is_moderator_permission(permissions: Permissions) -> bool {
    permissions.contains(Permissions::MANAGE_GUILD) || permissions.contains(Permissions::ADMINISTRATOR)
}

fn interaction_user_is_moderator(state: &State, command: &CommandInteraction) -> bool {
    let config = &state.config;
    if config.moderators.contains(&command.user.id.get()) {
        return true;
    }
    let Some(member) = &command.member else { return false };
    // Discord computes the member's permissions for interactions.
    member.roles.iter().any(|role| config.moderator_roles.contains(&role.get()))
        || member.permissions.is_some_and(is_moderator_permission)
}

async fn message_author_is_moderator(state: &State, message: &Message) -> bool {
    let config = &state.config;
    if config.moderators.contains(&message.author.id.get()) {
        return true;
    }
    let (Some(guild), Some(member)) = (message.guild_id, message.member.as_ref()) else { return false };
    if member.roles.iter().any(|role| config.moderator_roles.contains(&role.get())) {
        return true;
    }
    // Manage Server comes from the member's roles (and @everyone, whose id
    // is the guild's).
    let token = config.bot_token();
    /// The part of a role this needs.
    #[derive(serde::Deserialize)]
    struct RoleEntry {
        id: RoleId,
        permissions: Permissions,
    }
    let roles = state.rest.call("guild roles", Route::GuildRoles { guild_id: guild }, LightMethod::Get, None).await.and_then(|body| {
        serde_json::from_slice::<Vec<RoleEntry>>(&body).map_err(|e| RestError::Invalid(format!("guild roles: {e}")))
    });
    match roles {
        Ok(roles) => {
            let mine: HashSet<RoleId> = member.roles.iter().copied().chain([RoleId::new(guild.get())]).collect();
            roles.iter().filter(|role| mine.contains(&role.id)).any(|role| is_moderator_permission(role.permissions))
        }
        Err(e) => {
            tracing::warn!(guild = guild.get(), error = %scrub(&e.to_string(), token), "discord: cannot read guild roles");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_outside_the_allowlists_are_ignored() {
        let config = DiscordSettings {
            allowed_guilds: vec![1],
            allowed_channels: vec![10],
            open_channels: vec![11],
            ..Default::default()
        };
        assert!(allowed(&config, None, ChannelId::new(99)), "DMs are always allowed");
        assert!(allowed(&config, Some(GuildId::new(1)), ChannelId::new(10)));
        assert!(allowed(&config, Some(GuildId::new(1)), ChannelId::new(11)));
        assert!(!allowed(&config, Some(GuildId::new(1)), ChannelId::new(12)));
        assert!(!allowed(&config, Some(GuildId::new(2)), ChannelId::new(10)));
    }

    #[test]
    fn slash_commands_cover_the_command_list() {
        assert_eq!(command_builders().len(), COMMANDS.len() - 1);
    }
}
