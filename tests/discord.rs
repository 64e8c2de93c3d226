//! The Discord adapter end to end: the real serenity client against a fake
//! Discord (REST + gateway WebSocket) on loopback; the daemon with the pico
//! model behind it, or a scripted core to drive long replies and failures.

use std::sync::Arc;
use std::time::Duration;

use dialogd_adapters::discord::{DiscordAdapter, DiscordSettings};
use dialogd_adapters::settings::Secret;
use dialogd_adapters::retry::RetryPolicy;
use dialogd_adapters::{Adapter, Answer, BoxFuture, ChannelKey, ContextTurn, Core, CoreError, Health, Inbound, Outbound, Shutdown};
use serde_json::{json, Value};

use crate::fakes::discord::{edited, message, slash_command, user, FakeDiscord, Limit, BOT_ID, GUILD};
use crate::fakes::{wait_for, LogCapture};
use crate::support::{section_toml, TestDaemon};

const TOKEN: &str = "MTAwNzAw.fake-discord-secret-token";
const WAIT: Duration = Duration::from_secs(20);

async fn nth_posted(fake: &FakeDiscord, channel: u64, n: usize) -> Value {
    wait_for(WAIT, || fake.posted(channel).get(n - 1).cloned())
        .await
        .unwrap_or_else(|| panic!("no message {n} in channel {channel}; posted: {:?}", fake.posted(channel)))
}

/// A snowflake, written as a string or a number.
fn snowflake(id: &Value) -> Option<u64> {
    id.as_str().and_then(|id| id.parse().ok()).or_else(|| id.as_u64())
}

fn referenced(posted: &Value) -> Option<u64> {
    snowflake(&posted["message_reference"]["message_id"])
}

async fn nth_followup(fake: &FakeDiscord, n: usize) -> String {
    let followup = wait_for(WAIT, || fake.followups().get(n - 1).cloned())
        .await
        .unwrap_or_else(|| panic!("no follow-up {n}: {:?}", fake.followups()));
    followup["content"].as_str().unwrap().to_string()
}

/// A daemon on the memory store with the Discord adapter on `fake`, and
/// `lines` added to `[adapters.discord]`.
fn discord_toml(fake: &FakeDiscord, lines: &[String]) -> String {
    let mut all = vec!["enabled = true".to_string(), format!("token = \"{TOKEN}\""), format!("proxy_url = \"{}\"", fake.rest_url)];
    all.extend_from_slice(lines);
    section_toml("adapters.discord", &all)
}

/// Waits for the `n`th message posted to `thread` and checks that it is a
/// reply to `asked` inside the thread (posted to the thread's own
/// endpoint, referencing the thread), that nothing else was answered there
/// meanwhile, and that nothing was posted to `parent`.
async fn nth_in_thread(fake: &FakeDiscord, thread: u64, parent: u64, n: usize, asked: u64) {
    let posted = nth_posted(fake, thread, n).await;
    assert_eq!(referenced(&posted), Some(asked), "{posted}");
    assert_eq!(snowflake(&posted["message_reference"]["channel_id"]), Some(thread), "{posted}");
    assert_eq!(fake.posted(thread).len(), n, "more answers than messages: {:?}", fake.posted(thread));
    assert!(fake.posted(parent).is_empty(), "a reply went to the parent channel {parent}: {:?}", fake.posted(parent));
}

/// User 2 says `text` in guild channel (or thread) `channel`; the message id.
fn say(fake: &FakeDiscord, channel: u64, text: &str) -> u64 {
    let id = fake.next_id();
    fake.dispatch("MESSAGE_CREATE", message(id, channel, Some(GUILD), 2, text, vec![], None));
    id
}

#[tokio::test]
async fn dms_mentions_slash_commands_moderators_and_resume() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let fake = FakeDiscord::start(TOKEN).await;
    let d = TestDaemon::start(&discord_toml(&fake, &[format!("command_guilds = [{GUILD}]"), "moderators = [55]".into()])).await;

    // Identify with the intents, then slash commands registered in the guild.
    let identify = wait_for(WAIT, || fake.received(2).pop()).await.expect("identify");
    assert_eq!(identify["d"]["intents"], json!((1 << 9) | (1 << 12) | (1 << 15)));
    let registered =
        wait_for(WAIT, || fake.calls("PUT", &format!("/guilds/{GUILD}/commands")).pop()).await.expect("command registration");
    let names: Vec<&str> = registered.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["help", "ask", "reset", "forget", "optout", "optin", "mute", "unmute", "persona", "train", "collect", "block", "unblock", "allow", "disallow", "blocklist"]);

    // A DM is answered, as a reply, with typing and no pings.
    let dm = fake.next_id();
    fake.dispatch("MESSAGE_CREATE", message(dm, 1, None, 1, "Does money buy happiness?", vec![], None));
    let reply = nth_posted(&fake, 1, 1).await;
    assert_eq!(referenced(&reply), Some(dm));
    assert!(!reply["content"].as_str().unwrap().is_empty());
    assert_eq!(reply["allowed_mentions"]["parse"], json!([]));
    assert!(!fake.calls("POST", "/channels/1/typing").is_empty());

    // In a guild channel: silence unless mentioned or replied to.
    fake.dispatch("MESSAGE_CREATE", message(fake.next_id(), 2, Some(GUILD), 2, "just chatting", vec![], None));
    let mention = fake.next_id();
    let bot = user(BOT_ID, "dialogd", true);
    fake.dispatch("MESSAGE_CREATE", message(mention, 2, Some(GUILD), 2, &format!("<@{BOT_ID}> how are you?"), vec![bot], None));
    assert_eq!(referenced(&nth_posted(&fake, 2, 1).await), Some(mention), "{:?}", fake.posted(2));
    let stored = d.pipeline.turns(ChannelKey::new(dialogd_adapters::Platform::Discord, "2")).await.unwrap();
    assert_eq!(stored[0].text, "how are you?", "the mention is stripped");
    // Naming another member is not abuse: the mention's digits are not read
    // as leetspeak (`<@455>` read "ass" and was answered with the notice).
    let naming = fake.next_id();
    let member = user(123456789012345678, "shital", false);
    let text = format!("<@{BOT_ID}> say hi to <@123456789012345678> and <@!455>");
    fake.dispatch("MESSAGE_CREATE", message(naming, 2, Some(GUILD), 2, &text, vec![user(BOT_ID, "dialogd", true), member], None));
    let answer = nth_posted(&fake, 2, 2).await;
    assert_eq!(referenced(&answer), Some(naming));
    assert_ne!(answer["content"], "Let's keep it friendly.", "a mention was taken for abuse");
    let original = message(fake.next_id(), 2, Some(GUILD), BOT_ID, "an earlier reply", vec![], None);
    let replying = fake.next_id();
    fake.dispatch("MESSAGE_CREATE", message(replying, 2, Some(GUILD), 3, "tell me more", vec![], Some(original)));
    assert_eq!(referenced(&nth_posted(&fake, 2, 3).await), Some(replying));

    // Slash commands, moderators from the permission and the allowlist.
    let mut n = 0;
    let mut slash = |who: u64, perms: &'static str, name: &'static str, option: Option<(&'static str, &'static str)>| {
        n += 1;
        let fake = fake.clone();
        async move {
            fake.dispatch("INTERACTION_CREATE", slash_command(fake.next_id(), 2, who, perms, name, option));
            nth_followup(&fake, n).await
        }
    };
    assert!(slash(3, "0", "help", None).await.contains("/reset"));
    assert!(!slash(3, "0", "ask", Some(("text", "what's up?"))).await.is_empty());
    assert!(slash(3, "0", "forget", None).await.contains("deleted"));
    assert!(slash(3, "0", "mute", None).await.contains("only moderators"));
    assert!(slash(4, "32", "mute", None).await.contains("Muted"), "Manage Server makes a moderator");
    let muted = fake.next_id();
    fake.dispatch("MESSAGE_CREATE", message(muted, 2, Some(GUILD), 2, &format!("<@{BOT_ID}> hello?"), vec![user(BOT_ID, "dialogd", true)], None));
    assert!(slash(55, "0", "unmute", None).await.contains("Unmuted"), "the allowlist makes a moderator");
    assert!(slash(3, "0", "persona", Some(("what", "list"))).await.contains("only moderators"));
    assert!(slash(55, "0", "persona", Some(("what", "create pirate Arr, matey!"))).await.contains("Created persona pirate"));
    assert!(slash(55, "0", "persona", Some(("what", "use pirate server"))).await.contains("speak as pirate on this server"));
    assert!(slash(55, "0", "persona", None).await.contains("I speak as pirate here (1 seed turn"));
    assert!(slash(4, "8", "train", None).await.contains("Training is off"));
    assert!(slash(2, "0", "reset", None).await.contains("forgotten"));
    assert_eq!(fake.posted(2).len(), 3, "nothing answered the muted mention");
    assert!(!fake.calls("POST", "/callback").is_empty(), "commands are acknowledged");

    // The gateway drops; serenity resumes the session and gets the
    // message sent meanwhile.
    fake.disconnect();
    let missed = fake.next_id();
    fake.dispatch("MESSAGE_CREATE", message(missed, 1, None, 1, "Are you still there?", vec![], None));
    let resume = wait_for(WAIT, || fake.received(6).pop()).await.expect("resume");
    assert_eq!(resume["d"]["session_id"], "fake-session");
    assert_eq!(referenced(&nth_posted(&fake, 1, 2).await), Some(missed));
    assert_eq!(fake.received(2).len(), 1, "resumed, not identified again");
    assert_eq!(fake.connections(), 2);

    d.stop().await;
    let text = logs.text();
    assert!(text.contains("gateway session resumed"), "resume is logged");
    assert!(text.contains("moderator action") && text.contains("moderator command refused"));
    assert!(!text.contains(TOKEN) && !text.contains("fake-discord-secret-token"), "a log line carries the token");
}

/// A core that echoes, or answers one long text.
struct ScriptedCore {
    long: String,
}

impl Core for ScriptedCore {
    fn handle(&self, inbound: Inbound) -> BoxFuture<'static, Result<Answer, CoreError>> {
        let text = if inbound.text == "long please" { self.long.clone() } else { format!("echo: {}", inbound.text) };
        let out = Outbound { channel: inbound.channel, text, reply_to: inbound.msg_id };
        Box::pin(async move { Ok(Answer::Reply(out)) })
    }
    fn turns(&self, _: ChannelKey) -> BoxFuture<'static, Result<Vec<ContextTurn>, CoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn clear(&self, _: ChannelKey) -> BoxFuture<'static, Result<(), CoreError>> {
        Box::pin(async { Ok(()) })
    }
    fn health(&self) -> Health {
        Health { ready: true, store: "memory".into(), store_up: true }
    }
}

/// The adapter alone against `fake`, over a [`ScriptedCore`]: 4 tries with
/// a 50 ms backoff, no wait over `max_wait`.
fn start_scripted(
    fake: &FakeDiscord,
    long: &str,
    max_wait: Duration,
) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<Result<(), dialogd_adapters::AdapterError>>) {
    start_scripted_shards(fake, long, max_wait, 0)
}

/// [`start_scripted`] with `shard_count` (0: Discord's recommendation).
fn start_scripted_shards(
    fake: &FakeDiscord,
    long: &str,
    max_wait: Duration,
    shard_count: u32,
) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<Result<(), dialogd_adapters::AdapterError>>) {
    let core: Arc<dyn Core> = Arc::new(ScriptedCore { long: long.to_string() });
    let config = DiscordSettings {
        enabled: true,
        token: Some(Secret::new(TOKEN)),
        proxy_url: Some(fake.rest_url.clone()),
        retry: RetryPolicy { attempts: 4, backoff: Duration::from_millis(50), max_wait },
        shard_count,
        ..Default::default()
    };
    let (stop, shutdown) = Shutdown::new();
    (stop, tokio::spawn(Box::new(DiscordAdapter::new(config).unwrap()).run(core, shutdown)))
}

#[tokio::test]
async fn long_replies_split_in_order_and_429_then_5xx_lose_nothing() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let fake = FakeDiscord::start(TOKEN).await;
    let long: String = (0..150).map(|i| format!("Line {i} of a long answer, {}.\n", "more ".repeat(i % 9))).collect();
    let (stop, running) = start_scripted(&fake, long.trim(), Duration::from_secs(2));
    wait_for(WAIT, || fake.received(2).pop()).await.expect("identify");
    wait_for(WAIT, || fake.calls("PUT", "/commands").pop()).await.expect("global command registration");

    let asked = fake.next_id();
    fake.dispatch("MESSAGE_CREATE", message(asked, 1, None, 1, "long please", vec![], None));
    // Wait for the piece that ends the reply: waiting for three pieces
    // raced the later posts on a loaded machine.
    let last_line = long.trim().lines().last().unwrap_or_default().to_string();
    let pieces = wait_for(WAIT, || {
        let posted = fake.posted(1);
        let done = posted.last().and_then(|p| p["content"].as_str()).is_some_and(|t| t.ends_with(&last_line));
        (posted.len() >= 3 && done).then_some(posted)
    })
    .await
    .expect("the long reply");
    assert_eq!(referenced(&pieces[0]), Some(asked));
    assert!(pieces[1..].iter().all(|p| referenced(p).is_none()));
    let texts: Vec<&str> = pieces.iter().map(|p| p["content"].as_str().unwrap()).collect();
    assert!(texts.iter().all(|t| t.chars().count() <= 2000));
    assert!(texts.iter().all(|t| t.ends_with('.')), "cut at line ends");
    assert_eq!(texts.join("\n"), long.trim(), "nothing lost, in order");

    // 429, then 500, then success: the reply goes out once.
    fake.fail_next_posts(&[429, 500]);
    let asked = fake.next_id();
    fake.dispatch("MESSAGE_CREATE", message(asked, 6, None, 6, "are you there", vec![], None));
    let reply = nth_posted(&fake, 6, 1).await;
    assert_eq!(reply["content"], "echo: are you there");
    let statuses: Vec<Value> =
        fake.calls("POST", "/channels/6/messages").iter().map(|b| b.get("_failed").cloned().unwrap_or(json!(200))).collect();
    assert_eq!(statuses, [json!(429), json!(500), json!(200)]);

    // Beyond the bound the reply is dropped; the next one goes out.
    fake.fail_next_posts(&[500, 500, 500, 500]);
    fake.dispatch("MESSAGE_CREATE", message(fake.next_id(), 7, None, 7, "doomed", vec![], None));
    let tries = || fake.calls("POST", "/channels/7/messages").len();
    wait_for(WAIT, || (tries() >= 4).then_some(())).await.expect("four tries");
    fake.dispatch("MESSAGE_CREATE", message(fake.next_id(), 8, None, 8, "after the storm", vec![], None));
    assert_eq!(nth_posted(&fake, 8, 1).await["content"], "echo: after the storm");
    assert_eq!(tries(), 4, "retries are bounded");

    let _ = stop.send(true);
    tokio::time::timeout(WAIT, running).await.expect("the adapter stops").unwrap().unwrap();
    let text = logs.text();
    assert!(text.contains("retrying"));
    assert!(!text.contains(TOKEN) && !text.contains("fake-discord-secret-token"), "a log line carries the token");
}

/// The gap between the rate-limited call (`method` ending in `suffix`) and
/// the next one, once both have arrived at the fake.
async fn gap_after_429(fake: &FakeDiscord, method: &str, suffix: &str) -> Duration {
    let times = wait_for(WAIT, || {
        let times = fake.call_times(method, suffix);
        let at = times.iter().position(|(_, failed)| *failed)?;
        times.get(at + 1).map(|(next, _)| (times[at].0, *next))
    })
    .await
    .unwrap_or_else(|| panic!("no retry of {method} {suffix}: {:?}", fake.call_times(method, suffix)));
    times.1 - times.0
}

#[tokio::test]
async fn rate_limits_wait_what_discord_asks_for_every_call() {
    let fake = FakeDiscord::start(TOKEN).await;
    // Each wait is asked for one way; the adapter's own backoff (50 ms) is
    // far shorter than all of them, so a call that ignored the answer would
    // come back too soon.
    fake.rate_limit_next("PUT", "/commands", Limit { body_retry_after: Some(1.2), ..Default::default() });
    let (stop, running) = start_scripted(&fake, "", Duration::from_secs(5));

    // Registering commands: the body's `retry_after` (no headers).
    assert!(gap_after_429(&fake, "PUT", "/commands").await >= Duration::from_millis(1200));

    // A message: `Retry-After: 2` and a body saying 1.5 — the longer wins
    // (the case from the bug report, which retried after 0.25 s).
    fake.rate_limit_next("POST", "/channels/21/messages", Limit { body_retry_after: Some(1.5), retry_after: Some("2"), ..Default::default() });
    fake.dispatch("MESSAGE_CREATE", message(fake.next_id(), 21, None, 21, "hello", vec![], None));
    assert!(gap_after_429(&fake, "POST", "/channels/21/messages").await >= Duration::from_secs(2));
    assert_eq!(fake.posted(21)[0]["content"], "echo: hello");

    // `X-RateLimit-Reset-After` alone.
    fake.rate_limit_next("POST", "/channels/22/messages", Limit { reset_after: Some("1.1"), ..Default::default() });
    fake.dispatch("MESSAGE_CREATE", message(fake.next_id(), 22, None, 22, "hi", vec![], None));
    assert!(gap_after_429(&fake, "POST", "/channels/22/messages").await >= Duration::from_millis(1100));

    // A global limit on one channel's post holds another channel's post too.
    fake.rate_limit_next("POST", "/channels/23/messages", Limit { body_retry_after: Some(1.0), global: true, ..Default::default() });
    fake.dispatch("MESSAGE_CREATE", message(fake.next_id(), 23, None, 23, "first", vec![], None));
    let limited_at = wait_for(WAIT, || fake.call_times("POST", "/channels/23/messages").first().map(|(t, _)| *t)).await.unwrap();
    fake.dispatch("MESSAGE_CREATE", message(fake.next_id(), 24, None, 24, "second", vec![], None));
    let other = wait_for(WAIT, || fake.call_times("POST", "/channels/24/messages").first().map(|(t, _)| *t)).await.unwrap();
    assert!(other - limited_at >= Duration::from_secs(1), "the global limit did not hold channel 24: {:?}", other - limited_at);
    assert!(gap_after_429(&fake, "POST", "/channels/23/messages").await >= Duration::from_secs(1));

    // A slash command: deferring it (`Retry-After` alone), then its
    // follow-up.
    fake.rate_limit_next("POST", "/callback", Limit { retry_after: Some("1"), ..Default::default() });
    fake.dispatch("INTERACTION_CREATE", slash_command(fake.next_id(), 25, 3, "0", "ask", Some(("text", "ping"))));
    assert!(gap_after_429(&fake, "POST", "/callback").await >= Duration::from_secs(1));
    let followup = wait_for(WAIT, || fake.followups().first().cloned()).await.expect("the follow-up");
    assert_eq!(followup["content"], "echo: /ask ping");

    let _ = stop.send(true);
    tokio::time::timeout(WAIT, running).await.expect("the adapter stops").unwrap().unwrap();
}

/// Issue #16 point 2: a token the gateway refuses (close 4004) and intents
/// it refuses (close 4014) end the adapter with an error that says what to
/// fix, never with the token in it; the daemon then stops non-zero. With
/// `shard_count = 0` the token is refused earlier, by `GET /gateway/bot`.
#[tokio::test]
async fn a_refused_token_or_refused_intents_end_the_adapter_with_the_reason() {
    let fake = FakeDiscord::start("MTAwNzAw.the-right-token").await;
    let (_stop, run) = start_scripted_shards(&fake, "", Duration::from_secs(1), 1);
    let ended = tokio::time::timeout(WAIT, run).await.expect("the adapter ended").unwrap();
    let err = ended.expect_err("a refused token is a failure").to_string();
    assert!(err.contains("4004") && err.contains("DIALOGD__ADAPTERS__DISCORD__TOKEN"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
    let (_stop, run) = start_scripted(&fake, "", Duration::from_secs(1));
    let ended = tokio::time::timeout(WAIT, run).await.expect("the adapter ended").unwrap();
    let err = ended.expect_err("a refused token is a failure").to_string();
    assert!(err.contains("401") && err.contains("DIALOGD__ADAPTERS__DISCORD__TOKEN"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
    assert_eq!(fake.received(2).len(), 1, "no second Identify without a shard count");

    let fake = FakeDiscord::start(TOKEN).await;
    fake.refuse_intents();
    let (_stop, run) = start_scripted(&fake, "", Duration::from_secs(1));
    let ended = tokio::time::timeout(WAIT, run).await.expect("the adapter ended").unwrap();
    let err = ended.expect_err("refused intents are a failure").to_string();
    assert!(err.contains("4014") && err.contains("Message Content Intent"), "{err}");
}

async fn discord_texts(d: &TestDaemon, channel: u64) -> Vec<String> {
    let key = ChannelKey::new(dialogd_adapters::Platform::Discord, channel.to_string());
    d.pipeline.turns(key).await.unwrap().into_iter().map(|t| t.text).collect()
}

#[tokio::test]
async fn threads_follow_their_parent_and_edits_correct_the_context() {
    let fake = FakeDiscord::start(TOKEN).await;
    // Channel 20 is open, 21 allowed, 22 neither; threads 30 (of 20),
    // 31 (of 21) and 32 (of 22).
    for (thread, parent) in [(30, 20), (31, 21), (32, 22)] {
        fake.add_thread(thread, parent);
    }
    let d = TestDaemon::start(&discord_toml(&fake, &["allowed_channels = [21]".into(), "open_channels = [20]".into()])).await;
    wait_for(WAIT, || fake.received(2).pop()).await.expect("identify");
    let bot = || vec![user(BOT_ID, "dialogd", true)];

    // A thread of the open channel is open: no mention needed. The reply
    // goes into the thread, not to its parent.
    let in_open = say(&fake, 30, "Does money buy happiness?");
    nth_in_thread(&fake, 30, 20, 1, in_open).await;
    assert_eq!(discord_texts(&d, 30).await[0], "Does money buy happiness?");
    assert!(discord_texts(&d, 20).await.is_empty(), "the thread's turn went to its parent's context");
    // A thread of an allowed channel: answered when mentioned, in the thread.
    let in_allowed = fake.next_id();
    fake.dispatch("MESSAGE_CREATE", message(in_allowed, 31, Some(GUILD), 2, &format!("<@{BOT_ID}> hello thread"), bot(), None));
    nth_in_thread(&fake, 31, 21, 1, in_allowed).await;
    assert_eq!(discord_texts(&d, 31).await[0], "hello thread");
    // A thread of a channel outside the lists: silent, even mentioned.
    fake.dispatch("MESSAGE_CREATE", message(fake.next_id(), 32, Some(GUILD), 2, &format!("<@{BOT_ID}> anyone?"), bot(), None));
    // A marker: once it is answered, the message to thread 32 was handled.
    let marker = say(&fake, 30, "tell me more");
    nth_in_thread(&fake, 30, 20, 2, marker).await;
    assert!(fake.posted(32).is_empty() && fake.posted(22).is_empty(), "a thread outside the lists was answered");
    assert!(discord_texts(&d, 32).await.is_empty());
    // Each thread's parent was asked once.
    for thread in [30, 31, 32] {
        assert_eq!(fake.calls("GET", &format!("/channels/{thread}")).len(), 1, "thread {thread} looked up once");
    }

    // Edits: the latest turn's text is replaced, silently (the marker's
    // answer is the third: answer_edits is false); an older message's
    // edit changes nothing.
    fake.dispatch("MESSAGE_UPDATE", edited(marker, 30, Some(GUILD), 2, "tell me much more"));
    fake.dispatch("MESSAGE_UPDATE", edited(in_open, 30, Some(GUILD), 2, "Does money buy love?"));
    let last = say(&fake, 30, "and then?");
    nth_in_thread(&fake, 30, 20, 3, last).await;
    let stored = discord_texts(&d, 30).await;
    assert!(stored.contains(&"tell me much more".to_string()) && !stored.contains(&"tell me more".to_string()), "{stored:?}");
    assert!(stored.contains(&"Does money buy happiness?".to_string()) && !stored.iter().any(|t| t.contains("love")), "{stored:?}");

    // The parent has its own context too: what is said there is not the
    // thread's, and the thread's turns are not the parent's.
    let in_parent = say(&fake, 20, "back in the parent");
    assert_eq!(referenced(&nth_posted(&fake, 20, 1).await), Some(in_parent));
    let parent = discord_texts(&d, 20).await;
    assert_eq!((parent.len(), parent[0].as_str()), (2, "back in the parent"), "{parent:?}");
    assert_eq!(discord_texts(&d, 30).await, stored, "the parent's message went into the thread's context");
    d.stop().await;
}

/// With `answer_edits = true` an edit of the latest message is answered
/// again, in the thread, as a reply to the edited message; the old
/// exchange makes way for the new one; a repeated delivery of the same
/// edit, an edit of an older message and an edited command get no answer.
#[tokio::test]
async fn answered_edits_reply_again_in_their_thread() {
    let fake = FakeDiscord::start(TOKEN).await;
    fake.add_thread(40, 20);
    let d = TestDaemon::start(&discord_toml(&fake, &["open_channels = [20]".into(), "answer_edits = true".into()])).await;
    wait_for(WAIT, || fake.received(2).pop()).await.expect("identify");

    let first = say(&fake, 40, "Does money buy happiness?");
    nth_in_thread(&fake, 40, 20, 1, first).await;
    let latest = say(&fake, 40, "tell me more");
    nth_in_thread(&fake, 40, 20, 2, latest).await;
    let before = discord_texts(&d, 40).await;
    assert_eq!(before.len(), 4, "{before:?}");

    // The latest message edited: answered again, as a reply to it.
    let edit = edited(latest, 40, Some(GUILD), 2, "tell me much more");
    fake.dispatch("MESSAGE_UPDATE", edit.clone());
    nth_in_thread(&fake, 40, 20, 3, latest).await;
    let after = discord_texts(&d, 40).await;
    assert_eq!(after.len(), 4, "the old exchange made way: {after:?}");
    assert_eq!(after[..2], before[..2], "the earlier exchange is kept");
    assert_eq!(after[2], "tell me much more");
    assert!(!after.contains(&"tell me more".to_string()), "{after:?}");

    // The same edit delivered again and an older message's edit: neither
    // answered nor stored (checked behind a marker).
    fake.dispatch("MESSAGE_UPDATE", edit);
    fake.dispatch("MESSAGE_UPDATE", edited(first, 40, Some(GUILD), 2, "Does money buy love?"));
    let marker = say(&fake, 40, "and then?");
    nth_in_thread(&fake, 40, 20, 4, marker).await;
    let stored = discord_texts(&d, 40).await;
    assert_eq!(stored[..4], after[..], "{stored:?}");
    assert_eq!((stored.len(), stored[4].as_str()), (6, "and then?"), "{stored:?}");

    // A command acts on the thread's context; its edit is not run again.
    let command = say(&fake, 40, "/reset");
    nth_in_thread(&fake, 40, 20, 5, command).await;
    fake.dispatch("MESSAGE_UPDATE", edited(command, 40, Some(GUILD), 2, "/reset now"));
    let marker = say(&fake, 40, "still there?");
    nth_in_thread(&fake, 40, 20, 6, marker).await;
    let stored = discord_texts(&d, 40).await;
    assert_eq!((stored.len(), stored[0].as_str()), (2, "still there?"), "{stored:?}");
    d.stop().await;
}

/// A guild that Discord's formula `(guild_id >> 22) % 2` puts on shard 1
/// (the fake's own [`GUILD`] is on shard 0 of any count).
const SHARD_1_GUILD: u64 = (1 << 22) | GUILD;

/// A mention of the bot by user 2 in `channel` of `guild`; the message id.
fn mention(fake: &FakeDiscord, guild: Option<u64>, channel: u64, text: &str) -> u64 {
    let id = fake.next_id();
    let content = format!("<@{BOT_ID}> {text}");
    fake.dispatch("MESSAGE_CREATE", message(id, channel, guild, 2, &content, vec![user(BOT_ID, "dialogd", true)], None));
    id
}

/// Issue #13 point 5: two instances with `shards = [0, 0]` and `[1, 1]` of
/// `shard_count = 2` split one bot token. Each identifies as its shard,
/// gets only its shard's guilds (Ready, messages; DMs go to shard 0) and
/// answers only those; slash commands are registered once (shard 0);
/// `/metrics` shows each instance's own shard; log lines carry `shard`.
#[tokio::test]
async fn two_instances_split_the_guilds_by_shard() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let fake = FakeDiscord::start(TOKEN).await;
    fake.add_guild(SHARD_1_GUILD);
    let instance = |first: u32| discord_toml(&fake, &["shard_count = 2".into(), format!("shards = [{first}, {first}]")]);
    let zero = TestDaemon::start(&instance(0)).await;
    let one = TestDaemon::start(&instance(1)).await;
    let both = wait_for(WAIT, || (fake.received(2).len() >= 2).then(|| fake.identified_shards())).await.expect("two identifies");
    assert!(both.contains(&json!([0, 2])) && both.contains(&json!([1, 2])), "{both:?}");

    let in_zero = mention(&fake, Some(GUILD), 21, "hello shard zero");
    let in_one = mention(&fake, Some(SHARD_1_GUILD), 22, "hello shard one");
    let dm = fake.next_id();
    fake.dispatch("MESSAGE_CREATE", message(dm, 23, None, 3, "a direct message", vec![], None));
    assert_eq!(referenced(&nth_posted(&fake, 21, 1).await), Some(in_zero));
    assert_eq!(referenced(&nth_posted(&fake, 22, 1).await), Some(in_one));
    assert_eq!(referenced(&nth_posted(&fake, 23, 1).await), Some(dm));
    // Each message reached one instance only: its shard's.
    let stored = discord_texts(&zero, 21).await;
    assert_eq!((stored.len(), stored[0].as_str()), (2, "hello shard zero"), "{stored:?}");
    assert!(discord_texts(&one, 21).await.is_empty(), "shard 1 got a shard 0 guild's message");
    assert_eq!(discord_texts(&one, 22).await[0], "hello shard one");
    assert!(discord_texts(&zero, 22).await.is_empty(), "shard 0 got a shard 1 guild's message");
    assert_eq!(discord_texts(&zero, 23).await[0], "a direct message");
    assert!(discord_texts(&one, 23).await.is_empty(), "a DM went to shard 1");
    assert_eq!((fake.posted(21).len(), fake.posted(22).len(), fake.posted(23).len()), (1, 1, 1), "answered once each");
    assert_eq!(fake.calls("PUT", "/commands").len(), 1, "slash commands are registered by shard 0 alone");

    // Per-shard metrics: each instance shows its own shard only.
    for (d, shard, messages) in [(&zero, 0, 2.0), (&one, 1, 1.0)] {
        let labels = format!("{{shard=\"{shard}\"}}");
        assert_eq!(d.metric(&format!("dialogd_discord_shard_up{labels}")).await, 1.0);
        assert_eq!(d.metric(&format!("dialogd_discord_shard_guilds{labels}")).await, 1.0, "Ready lists the shard's guild");
        assert_eq!(d.metric(&format!("dialogd_discord_shard_messages_total{labels}")).await, messages);
        let text = d.http.get(&d.metrics_url).send().await.unwrap().text().await.unwrap();
        assert!(!text.contains(&format!("shard=\"{}\"", 1 - shard)), "{text}");
        crate::support::parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }
    let text = logs.text();
    for shard in [0, 1] {
        assert!(text.lines().any(|l| l.contains(&format!("discord{{shard={shard}}}")) && l.contains("gateway ready")), "{text}");
    }
    zero.stop().await;
    one.stop().await;
}

/// `shard_count = 0` asks Discord (`GET /gateway/bot`) and runs every
/// recommended shard here: a guild on shard 1 of 2 is answered.
#[tokio::test]
async fn the_recommended_shard_count_runs_every_shard_here() {
    let fake = FakeDiscord::start(TOKEN).await;
    fake.recommend_shards(2);
    let (stop, running) = start_scripted(&fake, "", Duration::from_secs(1));
    // serenity starts shards 5 s apart.
    let both = wait_for(Duration::from_secs(30), || (fake.received(2).len() >= 2).then(|| fake.identified_shards())).await.expect("two identifies");
    assert_eq!(both, [json!([0, 2]), json!([1, 2])]);
    mention(&fake, Some(SHARD_1_GUILD), 22, "over here");
    assert_eq!(nth_posted(&fake, 22, 1).await["content"], "echo: over here");
    let _ = stop.send(true);
    running.await.unwrap().unwrap();
}
