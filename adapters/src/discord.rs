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
//! `@everyone` pings nobody). serenity's rate limiter honours Discord's
//! buckets and 429s; with a REST proxy (`proxy_url`, which does its own
//! limiting) it is off. Failed sends (429, 5xx, network) are retried within
//! a [`RetryPolicy`].
//!
//! Moderators: the allowlist of user ids, members holding a configured
//! role, and members with the Manage Server (or Administrator) permission.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use serenity::all::{
    ChannelId, Command, CommandInteraction, CommandOptionType, Context, CreateAllowedMentions, CreateCommand,
    CreateCommandOption, CreateInteractionResponseFollowup, CreateMessage, EventHandler, GatewayIntents, GuildId,
    HttpBuilder, Interaction, Message, MessageId, MessageReference, Permissions, Ready, ResumedEvent, RoleId,
    UserId,
};
use serenity::http::{Http, HttpError};

use crate::outbox::Outbox;
use crate::retry::{with_retries, Failure, RetryPolicy};
use crate::text::{chars, is_moderator_command, scrub, split_message, COMMANDS};
use crate::{Adapter, AdapterError, Answer, BoxFuture, ChannelKey, Core, CoreError, Inbound, Platform, Shutdown};

/// Discord's longest message, in characters.
pub const MESSAGE_LIMIT: usize = 2000;

/// What the adapter needs.
#[derive(Clone, Default)]
pub struct DiscordConfig {
    /// The bot token from the developer portal. Never logged.
    pub token: String,
    /// A REST proxy (`http://host:port`) that every API call goes through;
    /// serenity's own rate limiter is then off (the proxy limits).
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
    /// Retries of sends.
    pub retry: RetryPolicy,
}

impl std::fmt::Debug for DiscordConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscordConfig")
            .field("token", &"[redacted]")
            .field("proxy_url", &self.proxy_url)
            .field("allowed_guilds", &self.allowed_guilds)
            .field("allowed_channels", &self.allowed_channels)
            .field("open_channels", &self.open_channels)
            .field("command_guilds", &self.command_guilds)
            .field("moderator_roles", &self.moderator_roles)
            .field("moderators", &self.moderators)
            .finish()
    }
}

/// The Discord bot.
pub struct DiscordAdapter {
    config: DiscordConfig,
}

impl DiscordAdapter {
    pub fn new(config: DiscordConfig) -> Result<Self, AdapterError> {
        if config.token.trim().is_empty() {
            return Err(AdapterError::Platform { adapter: "discord", message: "no bot token".into() });
        }
        Ok(Self { config })
    }
}

/// The gateway intents the bot asks for. `MESSAGE_CONTENT` is privileged.
pub fn intents() -> GatewayIntents {
    GatewayIntents::GUILD_MESSAGES | GatewayIntents::DIRECT_MESSAGES | GatewayIntents::MESSAGE_CONTENT
}

/// What the event handlers share.
struct State {
    core: Arc<dyn Core>,
    config: DiscordConfig,
    /// Set from the Ready event.
    bot_id: OnceLock<UserId>,
    outbox: Outbox,
}

struct Handler(Arc<State>);

impl Adapter for DiscordAdapter {
    fn name(&self) -> &'static str {
        "discord"
    }

    fn run(self: Box<Self>, core: Arc<dyn Core>, shutdown: Shutdown) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            let config = self.config;
            let token = config.token.clone();
            let mut http = HttpBuilder::new(&token);
            if let Some(proxy) = &config.proxy_url {
                http = http.proxy(proxy.clone()).ratelimiter_disabled(true);
            }
            let state = Arc::new(State { core, config, bot_id: OnceLock::new(), outbox: Outbox::new() });
            let client = serenity::client::ClientBuilder::new_with_http(http.build(), intents())
                .event_handler(Handler(state.clone()))
                .await;
            let mut client = client.map_err(|e| AdapterError::Platform { adapter: "discord", message: scrub(&e.to_string(), &token) })?;
            let shards = client.shard_manager.clone();
            let stop = shutdown.wait();
            let outcome = tokio::select! {
                _ = stop => {
                    shards.shutdown_all().await;
                    Ok(())
                }
                ended = client.start() => ended,
            };
            state.outbox.flush().await;
            match outcome {
                Ok(()) => {
                    tracing::info!("discord adapter stopped");
                    Ok(())
                }
                Err(e) => Err(AdapterError::Platform { adapter: "discord", message: scrub(&e.to_string(), &token) }),
            }
        })
    }
}

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        let state = &self.0;
        let _ = state.bot_id.set(ready.user.id);
        tracing::info!(bot = %ready.user.name, guilds = ready.guilds.len(), "discord: gateway ready");
        register_commands(state, &ctx.http).await;
    }

    async fn resume(&self, _ctx: Context, _event: ResumedEvent) {
        tracing::info!("discord: gateway session resumed");
    }

    async fn message(&self, ctx: Context, message: Message) {
        on_message(&self.0, ctx, message).await;
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        if let Interaction::Command(command) = interaction {
            on_command(&self.0, ctx, command).await;
        }
    }
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
                _ => command,
            }
        })
        .collect()
}

async fn register_commands(state: &State, http: &Arc<Http>) {
    let token = &state.config.token;
    let commands = command_builders();
    if state.config.command_guilds.is_empty() {
        let done = with_retries(
            state.config.retry,
            "register global commands",
            || Command::set_global_commands(http, commands.clone()),
            classify,
            |e| scrub(&e.to_string(), token),
        )
        .await;
        if let Err(e) = done {
            tracing::warn!(error = %scrub(&e.to_string(), token), "discord: cannot register slash commands");
        }
        return;
    }
    for guild in &state.config.command_guilds {
        let guild = GuildId::new(*guild);
        let done = with_retries(
            state.config.retry,
            "register guild commands",
            || guild.set_commands(http, commands.clone()),
            classify,
            |e| scrub(&e.to_string(), token),
        )
        .await;
        if let Err(e) = done {
            tracing::warn!(guild = guild.get(), error = %scrub(&e.to_string(), token), "discord: cannot register slash commands");
        }
    }
}

/// Whether the bot works in this place at all.
fn allowed(config: &DiscordConfig, guild: Option<GuildId>, channel: ChannelId) -> bool {
    let Some(guild) = guild else { return true };
    (config.allowed_guilds.is_empty() || config.allowed_guilds.contains(&guild.get()))
        && (config.allowed_channels.is_empty()
            || config.allowed_channels.contains(&channel.get())
            || config.open_channels.contains(&channel.get()))
}

async fn on_message(state: &Arc<State>, ctx: Context, message: Message) {
    if message.author.bot || !allowed(&state.config, message.guild_id, message.channel_id) {
        return;
    }
    let Some(&bot_id) = state.bot_id.get() else { return };
    let direct = message.guild_id.is_none();
    let mention = [format!("<@{bot_id}>"), format!("<@!{bot_id}>")];
    let mentioned =
        message.mentions.iter().any(|user| user.id == bot_id) || mention.iter().any(|m| message.content.contains(m));
    let replied_to_bot = message.referenced_message.as_ref().is_some_and(|m| m.author.id == bot_id);
    let open = state.config.open_channels.contains(&message.channel_id.get());
    if !(direct || mentioned || replied_to_bot || open) {
        return;
    }
    let mut text = message.content.clone();
    for m in &mention {
        text = text.replace(m.as_str(), " ");
    }
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let text = text.trim_start_matches([',', ':']).trim().to_string();
    if text.is_empty() {
        return;
    }
    let moderator = is_moderator_command(&text) && message_author_is_moderator(state, &ctx, &message).await;
    let inbound = Inbound {
        channel: ChannelKey::new(Platform::Discord, message.channel_id.get().to_string()),
        author: message.author.id.get().to_string(),
        text,
        msg_id: Some(message.id.get().to_string()),
        addressed_to_bot: true,
        moderator,
        group: message.guild_id.map(|g| g.get().to_string()),
        edit: None,
    };
    let answer = state.core.handle(inbound);
    let (channel, id) = (message.channel_id, message.id);
    let http = ctx.http.clone();
    let task = deliver(state.clone(), http, channel, Reply::Message(id), answer);
    state.outbox.push(&channel.get().to_string(), Box::pin(task));
}

async fn on_command(state: &Arc<State>, ctx: Context, command: CommandInteraction) {
    if !allowed(&state.config, command.guild_id, command.channel_id) {
        return;
    }
    let name = command.data.name.clone();
    let argument = command.data.options.first().and_then(|o| o.value.as_str()).unwrap_or("").trim().to_string();
    let text = if argument.is_empty() { format!("/{name}") } else { format!("/{name} {argument}") };
    let moderator = is_moderator_command(&text) && interaction_user_is_moderator(state, &command);
    let inbound = Inbound {
        channel: ChannelKey::new(Platform::Discord, command.channel_id.get().to_string()),
        author: command.user.id.get().to_string(),
        text,
        msg_id: Some(command.id.get().to_string()),
        addressed_to_bot: true,
        moderator,
        group: command.guild_id.map(|g| g.get().to_string()),
        edit: None,
    };
    let answer = state.core.handle(inbound);
    let token = &state.config.token;
    // Discord wants an answer within 3 s: say "thinking…" first.
    let deferred = with_retries(
        state.config.retry,
        "defer interaction",
        || command.defer(&ctx.http),
        classify,
        |e| scrub(&e.to_string(), token),
    )
    .await;
    if let Err(e) = deferred {
        tracing::warn!(command = %name, error = %scrub(&e.to_string(), token), "discord: cannot acknowledge a command");
        return;
    }
    let channel = command.channel_id;
    let task = deliver(state.clone(), ctx.http.clone(), channel, Reply::Interaction(Box::new(command)), answer);
    state.outbox.push(&channel.get().to_string(), Box::pin(task));
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
    let token = &state.config.token;
    let pieces = split_message(&text, MESSAGE_LIMIT, chars);
    for (n, piece) in pieces.iter().enumerate() {
        let sent = match &reply {
            Reply::Message(id) => {
                with_retries(
                    state.config.retry,
                    "send message",
                    || {
                        let mut message = CreateMessage::new()
                            .content(piece.clone())
                            .allowed_mentions(CreateAllowedMentions::new());
                        if n == 0 {
                            message = message.reference_message(MessageReference::from((channel, *id)));
                        }
                        channel.send_message(&http, message)
                    },
                    classify,
                    |e| scrub(&e.to_string(), token),
                )
                .await
                .map(|_| ())
            }
            Reply::Interaction(command) => with_retries(
                state.config.retry,
                "send follow-up",
                || {
                    let followup = CreateInteractionResponseFollowup::new()
                        .content(piece.clone())
                        .allowed_mentions(CreateAllowedMentions::new());
                    command.create_followup(&http, followup)
                },
                classify,
                |e| scrub(&e.to_string(), token),
            )
            .await
            .map(|_| ()),
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

async fn message_author_is_moderator(state: &State, ctx: &Context, message: &Message) -> bool {
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
    let token = &config.token;
    let roles = with_retries(config.retry, "guild roles", || guild.roles(&ctx.http), classify, |e| scrub(&e.to_string(), token)).await;
    match roles {
        Ok(roles) => {
            let mine: HashSet<RoleId> = member.roles.iter().copied().chain([RoleId::new(guild.get())]).collect();
            roles.values().filter(|role| mine.contains(&role.id)).any(|role| is_moderator_permission(role.permissions))
        }
        Err(e) => {
            tracing::warn!(guild = guild.get(), error = %scrub(&e.to_string(), token), "discord: cannot read guild roles");
            false
        }
    }
}

/// How a REST failure is retried.
fn classify(error: &serenity::Error) -> Failure {
    match error {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(response)) => match response.status_code.as_u16() {
            429 => Failure::RetryAfter(None),
            500..=599 => Failure::Transient,
            _ => Failure::Permanent,
        },
        serenity::Error::Http(HttpError::Request(_)) => Failure::Transient,
        _ => Failure::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_outside_the_allowlists_are_ignored() {
        let config = DiscordConfig {
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
