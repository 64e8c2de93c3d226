//! Commands, platform-neutral: parsed once into a [`Command`], then run by
//! one handler each.
//!
//! Everyone has `/start`, `/help`, `/ask TEXT`, `/reset` (forget the
//! channel's context), `/forget` (delete what is stored about the author),
//! `/optout` and `/optin`. Moderators (the adapter says who is one) also
//! have `/mute` and `/unmute` (the bot stops or resumes answering in the
//! channel; commands still work), `/persona`, `/train`, `/collect`, and the
//! word lists of their server or chat: `/block WORD…`, `/unblock WORD…`,
//! `/allow WORD…`, `/disallow WORD…`, `/blocklist`.
//! Everyone else gets a clear refusal; every moderator action and refusal
//! is logged. An unknown command is answered with the help text.

use dialogd_adapters::text::{command_argument, command_word, MODERATOR_COMMANDS};
use dialogd_adapters::{Answer, ChannelKey, CoreError, Inbound};

use super::{internal, say, Shared};
use crate::context::ContextError;
use crate::jobs::{JobState, StoreError, Target};
use crate::personas::{group_scope, moderation_scope, PersonaError};
use crate::safety::{WordChange, WordOutcome};
use crate::settings::Consent;

const HELP: &str = "I'm a DialoGPT chat bot. Commands: /ask TEXT asks me something (in groups you can \
also mention me or reply to me); /reset forgets this channel's conversation; /forget deletes everything \
stored about you; /optout stops me learning from your messages, /optin allows it; /help shows this. \
Moderators: /mute, /unmute, /persona (list, show, use NAME [server], create NAME SEED | SEED…, off, \
share [NAME], unshare [NAME]), \
/train (status, cancel, rollback), /collect (on, off, status), /block WORD… and /unblock WORD… (words \
I refuse here, on the way in and out), /allow WORD… and /disallow WORD… (words the filter lets pass \
here), /blocklist shows both.";

const BASE_NEEDS_OPERATOR: &str = "Training or rolling back the base model (every chat's) needs an operator: a user on the \
bot's moderators allowlist, or `dialogd jobs` on the server. Chat moderators can train their own personas.";

const START: &str = "Hello! I'm a DialoGPT chat bot: talk to me and I'll answer. /help lists the commands.";

const PERSONA_USAGE: &str =
    "Usage: /persona [show | list | use NAME [server] | create NAME SEED | SEED… | off [server] | share [NAME] | unshare [NAME]]";

/// A command, parsed from a message's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Start,
    Help,
    /// `/ask TEXT`: the text (empty when nothing followed).
    Ask(&'a str),
    Reset,
    Forget,
    OptOut,
    OptIn,
    Mute,
    Unmute,
    Persona(PersonaCommand),
    Train(TrainCommand),
    Collect(CollectCommand),
    /// `/block`, `/unblock`, `/allow`, `/disallow` and their words
    /// (whitespace-separated; none: the usage).
    Words(WordChange, Vec<&'a str>),
    /// `/blocklist`: the scope's blocked and allowed words.
    Blocklist,
    /// Any other `/word`: answered with the help text.
    Unknown(String),
}

/// `/persona …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PersonaCommand {
    Show,
    List,
    /// `use NAME [server]`; `name` `None` when missing. `scope` is the word
    /// after the name, if any (only `server`/`guild` is accepted).
    Use { name: Option<String>, scope: Option<String> },
    /// `off [server]`.
    Off { scope: Option<String> },
    /// `create NAME SEED | SEED…`; `name` `None` when missing.
    Create { name: Option<String>, seed: Vec<String> },
    /// `share [NAME]` (`shared`) or `unshare [NAME]`; `None`: the persona
    /// chosen here.
    Share { name: Option<String>, shared: bool },
    Usage,
}

/// `/train …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainCommand {
    Start,
    Status,
    Cancel,
    Rollback,
    Usage,
}

/// `/collect …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectCommand {
    On,
    Off,
    Status,
}

impl<'a> Command<'a> {
    /// The command in `text` (`/reset`, `/reset@botname`, `/ask hi`), or
    /// `None` when the text is not a command.
    pub fn parse(text: &'a str) -> Option<Self> {
        let (word, _bot) = command_word(text)?;
        let word = word.to_ascii_lowercase();
        let argument = command_argument(text).trim();
        Some(match word.as_str() {
            "start" => Command::Start,
            "help" => Command::Help,
            "ask" => Command::Ask(argument),
            "reset" => Command::Reset,
            "forget" => Command::Forget,
            "optout" => Command::OptOut,
            "optin" => Command::OptIn,
            "mute" => Command::Mute,
            "unmute" => Command::Unmute,
            "persona" => Command::Persona(PersonaCommand::parse(argument)),
            "train" => Command::Train(match argument.to_ascii_lowercase().as_str() {
                "" | "start" => TrainCommand::Start,
                "status" => TrainCommand::Status,
                "cancel" => TrainCommand::Cancel,
                "rollback" => TrainCommand::Rollback,
                _ => TrainCommand::Usage,
            }),
            "collect" => Command::Collect(match argument {
                "on" => CollectCommand::On,
                "off" => CollectCommand::Off,
                _ => CollectCommand::Status,
            }),
            "block" => Command::Words(WordChange::Block, argument.split_whitespace().collect()),
            "unblock" => Command::Words(WordChange::Unblock, argument.split_whitespace().collect()),
            "allow" => Command::Words(WordChange::Allow, argument.split_whitespace().collect()),
            "disallow" => Command::Words(WordChange::Disallow, argument.split_whitespace().collect()),
            "blocklist" => Command::Blocklist,
            _ => Command::Unknown(word),
        })
    }

    /// The command's word, as typed after `/` (lower-cased).
    pub fn word(&self) -> &str {
        match self {
            Command::Start => "start",
            Command::Help => "help",
            Command::Ask(_) => "ask",
            Command::Reset => "reset",
            Command::Forget => "forget",
            Command::OptOut => "optout",
            Command::OptIn => "optin",
            Command::Mute => "mute",
            Command::Unmute => "unmute",
            Command::Persona(_) => "persona",
            Command::Train(_) => "train",
            Command::Collect(_) => "collect",
            Command::Words(WordChange::Block, _) => "block",
            Command::Words(WordChange::Unblock, _) => "unblock",
            Command::Words(WordChange::Allow, _) => "allow",
            Command::Words(WordChange::Disallow, _) => "disallow",
            Command::Blocklist => "blocklist",
            Command::Unknown(word) => word,
        }
    }

    /// Whether only moderators may use it.
    pub fn moderators_only(&self) -> bool {
        MODERATOR_COMMANDS.contains(&self.word())
    }
}

impl PersonaCommand {
    fn parse(argument: &str) -> Self {
        let mut words = argument.split_whitespace();
        let verb = words.next().unwrap_or("show").to_ascii_lowercase();
        match verb.as_str() {
            "show" => PersonaCommand::Show,
            "list" => PersonaCommand::List,
            "use" => PersonaCommand::Use {
                name: words.next().map(str::to_ascii_lowercase),
                scope: words.next().map(str::to_string),
            },
            "off" => PersonaCommand::Off { scope: words.next().map(str::to_string) },
            "share" | "unshare" => PersonaCommand::Share { name: words.next().map(str::to_ascii_lowercase), shared: verb == "share" },
            "create" => {
                let name = words.next().map(str::to_ascii_lowercase);
                let rest = words.collect::<Vec<_>>().join(" ");
                let seed = rest.split('|').map(str::trim).filter(|t| !t.is_empty()).map(str::to_string).collect();
                PersonaCommand::Create { name, seed }
            }
            _ => PersonaCommand::Usage,
        }
    }
}

/// Runs a command for `inbound`'s author in its channel.
pub(super) async fn run(shared: &Shared, inbound: &Inbound, command: Command<'_>) -> Result<Answer, CoreError> {
    let channel = &inbound.channel;
    let word = command.word().to_string();
    if command.moderators_only() {
        if !inbound.moderator {
            tracing::info!(%channel, author = %inbound.author, command = %word, "moderator command refused");
            return Ok(say(inbound, format!("Sorry, only moderators can use /{word}.")));
        }
        tracing::info!(%channel, moderator = %inbound.author, command = %word, "moderator action");
    }
    let text = match command {
        Command::Start => START.to_string(),
        Command::Help | Command::Unknown(_) | Command::Ask(_) => HELP.to_string(),
        Command::Reset => {
            shared.store.clear(channel).await.map_err(unavailable)?;
            "Done: I've forgotten this channel's conversation.".to_string()
        }
        Command::Forget => forget(shared, inbound).await?,
        Command::OptOut | Command::OptIn => opt(shared, inbound, command == Command::OptOut).await?,
        Command::Mute | Command::Unmute => {
            let mute = command == Command::Mute;
            shared.store.set_muted(channel, mute).await.map_err(unavailable)?;
            remember_mute(shared, channel, mute);
            if mute {
                "Muted: I won't answer in this channel until a moderator says /unmute.".to_string()
            } else {
                "Unmuted: I'm listening again.".to_string()
            }
        }
        Command::Persona(persona) => persona_command(shared, inbound, persona).await?,
        Command::Train(train) => train_command(shared, inbound, train).await?,
        Command::Collect(collect) => collect_command(shared, inbound, collect).await?,
        Command::Words(change, words) => words_command(shared, inbound, change, &words).await?,
        Command::Blocklist => blocklist(shared, inbound).await?,
    };
    Ok(say(inbound, text))
}

/// Whether the channel is muted: the store's word (shared by every
/// daemon, kept across restarts), or this daemon's last known state while
/// the store cannot be reached.
pub(super) async fn is_muted(shared: &Shared, channel: &ChannelKey) -> bool {
    match shared.store.muted(channel).await {
        Ok(muted) => {
            remember_mute(shared, channel, muted);
            muted
        }
        Err(e) => {
            tracing::debug!(%channel, error = %e, "mute state from this daemon's memory");
            shared.muted.lock().unwrap_or_else(|e| e.into_inner()).contains(channel)
        }
    }
}

fn remember_mute(shared: &Shared, channel: &ChannelKey, muted: bool) {
    let mut known = shared.muted.lock().unwrap_or_else(|e| e.into_inner());
    if muted {
        known.insert(channel.clone());
    } else {
        known.remove(channel);
    }
}

fn unavailable(e: ContextError) -> CoreError {
    CoreError::Unavailable(e.to_string())
}

/// A persona refusal is told to the user; a store failure is unavailable.
fn persona_text(result: Result<String, PersonaError>) -> Result<String, CoreError> {
    match result {
        Ok(text) => Ok(text),
        Err(PersonaError::Refused(why)) => Ok(why),
        Err(e @ PersonaError::Store(_)) => Err(CoreError::Unavailable(e.to_string())),
    }
}

/// `/forget`: the author's stored turns (and the bot's replies to them)
/// and collected exchanges.
async fn forget(shared: &Shared, inbound: &Inbound) -> Result<String, CoreError> {
    let n = shared.store.forget_author(inbound.channel.platform, &inbound.author).await.map_err(unavailable)?;
    let mut collected = 0;
    if let Some(collector) = shared.collector.clone() {
        // The collector keys people by `platform:user`.
        let author = format!("{}:{}", inbound.channel.platform.as_str(), inbound.author);
        collected = tokio::task::spawn_blocking(move || collector.forget(&author)).await.map_err(internal)?.map_err(internal)?;
    }
    Ok(if collected > 0 {
        format!("Done: I've deleted {n} stored turns of yours and my replies to them, and {collected} collected exchanges.")
    } else {
        format!("Done: I've deleted {n} stored turns of yours and my replies to them.")
    })
}

/// `/optout` (`out`) or `/optin`.
async fn opt(shared: &Shared, inbound: &Inbound, out: bool) -> Result<String, CoreError> {
    let Some(collector) = shared.collector.clone() else {
        return Ok("Nothing is collected for training on this bot.".to_string());
    };
    let author = format!("{}:{}", inbound.channel.platform.as_str(), inbound.author);
    if out {
        let n = tokio::task::spawn_blocking(move || collector.opt_out(&author)).await.map_err(internal)?.map_err(internal)?;
        Ok(format!(
            "Done: I won't learn from your messages, and I've deleted {n} collected exchanges you were part of. Models already trained keep what they learned (weights cannot forget); no later training uses your messages. /optin undoes this."
        ))
    } else {
        let consent = collector.consent();
        let found = tokio::task::spawn_blocking(move || collector.opt_in(&author)).await.map_err(internal)?.map_err(internal)?;
        Ok(match (consent, found.was_opted_out, found.was_opted_in) {
            (Consent::User, _, true) => "You had already opted in: your messages in collecting channels may be used for training.",
            (Consent::User, _, false) => {
                "Done: your messages in collecting channels may be used for training from now on (/optout withdraws this)."
            }
            (Consent::Channel, true, _) => "Done: your messages in collecting channels may be used for training again.",
            (Consent::Channel, false, _) => "You had not opted out: your messages in collecting channels may be used for training.",
        }
        .to_string())
    }
}

/// `/collect on|off|status`.
async fn collect_command(shared: &Shared, inbound: &Inbound, command: CollectCommand) -> Result<String, CoreError> {
    let Some(collector) = shared.collector.clone() else {
        return Ok("Collection is off on this bot ([collect] enabled = false).".to_string());
    };
    let key = inbound.channel.to_string();
    let text = match command {
        CollectCommand::On | CollectCommand::Off => {
            let (on, c, k) = (command == CollectCommand::On, collector.clone(), key.clone());
            tokio::task::spawn_blocking(move || c.set_channel(&k, on)).await.map_err(internal)?.map_err(internal)?;
            if on {
                "Collecting: this channel's conversations may now be used to train me (members can /optout)."
            } else {
                "Not collecting: nothing more from this channel will be used for training."
            }
        }
        CollectCommand::Status if collector.wants(&key) => "This channel's conversations are collected for training (/collect off stops it).",
        CollectCommand::Status => "This channel's conversations are not collected (/collect on starts it).",
    };
    Ok(text.to_string())
}

/// `/block`, `/unblock`, `/allow`, `/disallow WORD…` in the moderators'
/// scope ([`moderation_scope`]): what changed, what already was so, and
/// what was refused, with why.
async fn words_command(shared: &Shared, inbound: &Inbound, change: WordChange, words: &[&str]) -> Result<String, CoreError> {
    let (verb, done, unchanged) = match change {
        WordChange::Block => ("block", "Blocked here", "already blocked"),
        WordChange::Unblock => ("unblock", "Unblocked", "not blocked"),
        WordChange::Allow => ("allow", "Allowed here", "already allowed"),
        WordChange::Disallow => ("disallow", "No longer allowed", "not allowed"),
    };
    if words.is_empty() {
        return Ok(format!("Usage: /{verb} WORD… (one or more words, separated by spaces)"));
    }
    let scope = moderation_scope(&inbound.channel, inbound.group.as_deref());
    let outcomes = shared.words.change(&scope, change, words).await.map_err(|e| CoreError::Unavailable(e.to_string()))?;
    let mut parts = Vec::new();
    let pick = |want: fn(&WordOutcome) -> Option<&String>| outcomes.iter().filter_map(want).map(String::as_str).collect::<Vec<_>>();
    let changed = pick(|o| if let WordOutcome::Done(w) = o { Some(w) } else { None });
    let same = pick(|o| if let WordOutcome::Unchanged(w) = o { Some(w) } else { None });
    let refused = pick(|o| if let WordOutcome::Refused(w) = o { Some(w) } else { None });
    tracing::info!(
        channel = %inbound.channel, %scope, moderator = %inbound.author, command = verb,
        changed = changed.len(), unchanged = same.len(), refused = refused.len(), "word list changed"
    );
    if !changed.is_empty() {
        parts.push(format!("{done}: {}.", changed.join(", ")));
    }
    if !same.is_empty() {
        parts.push(format!("{} {unchanged}.", same.join(", ")));
    }
    if !refused.is_empty() {
        parts.push(format!("Refused: {}.", refused.join("; ")));
    }
    Ok(parts.join(" "))
}

/// `/blocklist`: the words blocked and allowed in the moderators' scope.
async fn blocklist(shared: &Shared, inbound: &Inbound) -> Result<String, CoreError> {
    let scope = moderation_scope(&inbound.channel, inbound.group.as_deref());
    let list = shared.words.list(&scope).await.map_err(|e| CoreError::Unavailable(e.to_string()))?;
    let show = |set: &std::collections::BTreeSet<String>| if set.is_empty() { "none".to_string() } else { set.iter().cloned().collect::<Vec<_>>().join(", ") };
    Ok(format!("Blocked here: {}. Allowed here: {}.", show(&list.blocked), show(&list.allowed)))
}

/// The scope a persona choice applies to: the channel, or with
/// `server`/`guild` its server. `Err` is the refusal to tell the user.
fn persona_scope(inbound: &Inbound, word: Option<&str>) -> Result<String, String> {
    match (word, inbound.group.as_deref()) {
        (None, _) => Ok(inbound.channel.to_string()),
        (Some("server" | "guild"), Some(group)) => Ok(group_scope(&inbound.channel, group)),
        (Some("server" | "guild"), None) => Err("this channel belongs to no server: choose for the channel".into()),
        (Some(other), _) => Err(format!("{other:?}: say `server` to choose for the whole server, or nothing for this channel")),
    }
}

/// `/persona [show | list | use NAME [server] | create NAME SEED | SEED… | off [server]]`.
async fn persona_command(shared: &Shared, inbound: &Inbound, command: PersonaCommand) -> Result<String, CoreError> {
    let (personas, channel, group) = (&shared.personas, &inbound.channel, inbound.group.as_deref());
    persona_text(match command {
        PersonaCommand::Show => match personas.chosen(channel, group).await {
            Ok(None) => Ok("I speak as myself here (no persona). /persona list shows the personas.".to_string()),
            Ok(Some(name)) => personas.for_channel(channel, group).await.map(|active| match active {
                Some(p) => format!(
                    "I speak as {} here ({} seed turn(s); adapter: {}).",
                    p.name,
                    p.seed.len(),
                    match (p.version, &p.adapter_dir) {
                        (Some(v), _) => format!("trained by job #{v}"),
                        (None, Some(_)) => "configured".into(),
                        (None, None) => "none yet".into(),
                    }
                ),
                None => format!("The persona chosen here, {name}, no longer exists; I speak as myself."),
            }),
            Err(e) => Err(e),
        },
        PersonaCommand::List => personas.all().await.map(|all| {
            if all.is_empty() {
                "There are no personas yet: /persona create NAME first turn | second turn".to_string()
            } else {
                format!("Personas: {}.", all.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "))
            }
        }),
        PersonaCommand::Use { name: None, .. } => Ok("Which one? /persona use NAME".to_string()),
        PersonaCommand::Use { name: Some(name), scope } => match persona_scope(inbound, scope.as_deref()) {
            Err(why) => Ok(why),
            Ok(scope) => personas.choose(&scope, Some(&name), &moderation_scope(channel, group)).await.map(|()| {
                format!("From now on I speak as {name} {}.", if scope.contains(":group:") { "on this server" } else { "in this channel" })
            }),
        },
        PersonaCommand::Off { scope } => match persona_scope(inbound, scope.as_deref()) {
            Err(why) => Ok(why),
            Ok(scope) => personas
                .choose(&scope, None, &moderation_scope(channel, group))
                .await
                .map(|()| "Persona cleared: I speak as myself (or the server's persona).".to_string()),
        },
        PersonaCommand::Create { name: None, .. } => Ok("/persona create NAME first seed turn | second seed turn".to_string()),
        PersonaCommand::Create { name: Some(name), seed } => {
            // Whoever moderates this server (or Telegram chat, or else this
            // channel) owns what they create.
            let owner = moderation_scope(channel, group);
            personas.create(&name, seed, &owner).await.map(|spec| {
                format!(
                    "Created persona {} with {} seed turn(s). /persona use {} to speak as it here; /train teaches it this channel's ways.",
                    spec.name,
                    spec.seed.len(),
                    spec.name
                )
            })
        }
        PersonaCommand::Share { name, shared } => {
            let name = match name {
                Some(name) => Some(name),
                None => personas.chosen(channel, group).await.map_err(|e| CoreError::Unavailable(e.to_string()))?,
            };
            match name {
                None => Ok(format!("Which one? /persona {} NAME", if shared { "share" } else { "unshare" })),
                Some(name) => personas.share(&name, shared, &moderation_scope(channel, group), inbound.operator).await.map(|spec| {
                    if shared {
                        format!("{} is shared: other chats and servers may /persona use {} (they cannot train it).", spec.name, spec.name)
                    } else {
                        format!("{} is no longer shared: only this chat or server speaks as it.", spec.name)
                    }
                }),
            }
        }
        PersonaCommand::Usage => Ok(PERSONA_USAGE.to_string()),
    })
}

/// `/train [status | cancel | rollback]`.
async fn train_command(shared: &Shared, inbound: &Inbound, command: TrainCommand) -> Result<String, CoreError> {
    let Some(jobs) = &shared.jobs else {
        return Ok("Training is off on this bot ([jobs] enabled = false).".to_string());
    };
    let channel = inbound.channel.to_string();
    let unavailable = |e: StoreError| CoreError::Unavailable(e.to_string());
    let persona = persona_text(shared.personas.chosen(&inbound.channel, inbound.group.as_deref()).await.map(|p| p.unwrap_or_default()))?;
    let target = jobs.settings.mode.target_for((!persona.is_empty()).then_some(persona.as_str()));
    let trigger = format!("moderator:{channel}");
    // Authority stops at the chat: the base model is everyone's (an
    // operator's call), a persona its owners'.
    if matches!(command, TrainCommand::Start | TrainCommand::Rollback) {
        let by = moderation_scope(&inbound.channel, inbound.group.as_deref());
        match &target {
            Ok(Target::Base) if !inbound.operator => {
                tracing::info!(%channel, moderator = %inbound.author, "base model training or rollback refused: not an operator");
                return Ok(BASE_NEEDS_OPERATOR.to_string());
            }
            Ok(Target::Persona(name)) => {
                if let Err(why) = shared.personas.may_manage(name, &by, inbound.operator).await {
                    tracing::info!(%channel, moderator = %inbound.author, persona = %name, "persona training or rollback refused: not its owner");
                    return persona_text(Err(why));
                }
            }
            _ => {}
        }
    }
    Ok(match command {
        TrainCommand::Start => {
            let target = match target {
                Ok(target) => target,
                Err(why) => return Ok(why.to_string()),
            };
            if !shared.collector.as_ref().is_some_and(|c| c.wants(&channel)) {
                return Ok("This channel's conversations are not collected, so there is nothing to train on: /collect on first.".to_string());
            }
            let record = jobs.store.create(target, trigger, vec![channel.clone()]).await.map_err(unavailable)?;
            tracing::info!(job = record.id, target = %record.target, %channel, "training job queued by a moderator");
            format!(
                "Training job #{} queued for {} on this channel's collected conversations. /train status shows how it goes; /train cancel stops it.",
                record.id, record.target
            )
        }
        TrainCommand::Status => {
            let records = jobs.store.list(50).await.map_err(unavailable)?;
            let mine: Vec<_> = records
                .into_iter()
                .filter(|r| r.trigger == trigger || target.as_ref().is_ok_and(|t| *t == r.target))
                .take(3)
                .collect();
            if mine.is_empty() {
                "No training jobs for this channel yet: /train starts one.".to_string()
            } else {
                let mut lines: Vec<String> = mine.iter().map(|r| r.summary()).collect();
                if let Some(probe) = mine[0].probes.first() {
                    lines.push(format!("Probe: \"{}\" → \"{}\"", probe.prompt, probe.reply));
                }
                lines.join("\n")
            }
        }
        TrainCommand::Cancel => {
            let records = jobs.store.list(50).await.map_err(unavailable)?;
            match records.into_iter().find(|r| r.trigger == trigger && !r.state.is_final()) {
                None => "No queued or running job from this channel.".to_string(),
                Some(r) => match jobs.store.cancel(r.id).await {
                    Ok(r) if r.state == JobState::Cancelled => format!("Cancelled job #{}.", r.id),
                    Ok(r) => format!("Stopping job #{}…", r.id),
                    Err(e) => e.to_string(),
                },
            }
        }
        TrainCommand::Rollback => match target {
            Ok(target) => crate::jobs::gate::rollback_text(&jobs.store, &target).await.map_err(unavailable)?,
            Err(why) => why.to_string(),
        },
        TrainCommand::Usage => "Usage: /train [status | cancel | rollback]".to_string(),
    })
}
