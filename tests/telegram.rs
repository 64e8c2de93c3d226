//! The Telegram adapter end to end: the daemon (pico model, memory store)
//! with the real teloxide client polling a fake Bot API on loopback.

use std::sync::Arc;
use std::time::Duration;

use dialogd_adapters::retry::RetryPolicy;
use dialogd_adapters::settings::Secret;
use dialogd_adapters::telegram::{TelegramAdapter, TelegramSettings};
use dialogd_adapters::{Adapter, Answer, BoxFuture, ChannelKey, ContextTurn, Core, CoreError, Health, Inbound, Outbound, Shutdown};
use serde_json::{json, Value};

use crate::fakes::telegram::{FakeTelegram, BOT_ID};
use crate::fakes::{wait_for, LogCapture};
use crate::support::{daemon_toml, section_toml, TestDaemon};

const TOKEN: &str = "123456:TEST-secret-token-abcdef";
const WAIT: Duration = Duration::from_secs(20);

/// Waits for the `n`th message sent to `chat` (1-based).
async fn nth_sent(fake: &FakeTelegram, chat: i64, n: usize) -> Value {
    wait_for(WAIT, || fake.sent_to(chat).get(n - 1).cloned())
        .await
        .unwrap_or_else(|| panic!("no message {n} to chat {chat}; sent: {:?}", fake.sent_to(chat)))
}

fn replied_to(sent: &Value) -> Option<i64> {
    sent["reply_parameters"]["message_id"].as_i64()
}

#[tokio::test]
async fn private_chats_groups_commands_and_moderators() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let fake = FakeTelegram::start(TOKEN).await;
    let d = TestDaemon::start(&telegram_toml(&fake, &["moderators = [9]".into()])).await;
    fake.add_admin(8);

    // The command menu is registered.
    let menu = wait_for(WAIT, || fake.calls("setMyCommands").pop()).await.expect("setMyCommands");
    let names: Vec<&str> = menu["commands"].as_array().unwrap().iter().map(|c| c["command"].as_str().unwrap()).collect();
    assert_eq!(names, ["start", "help", "ask", "reset", "forget", "optout", "optin", "mute", "unmute", "persona", "train", "collect", "block", "unblock", "allow", "disallow", "blocklist"]);

    // A private chat is always answered, as a reply, with typing first.
    let asked = fake.say(1, 1, "Does money buy happiness?", None);
    let reply = nth_sent(&fake, 1, 1).await;
    assert_eq!(replied_to(&reply), Some(asked));
    assert!(!reply["text"].as_str().unwrap().is_empty());
    assert!(fake.calls("sendChatAction").iter().any(|b| b["chat_id"] == 1 && b["action"] == "typing"));
    let turns = d.pipeline.turns(ChannelKey::new(dialogd_adapters::Platform::Telegram, "1")).await.unwrap();
    assert_eq!(turns[0].text, "Does money buy happiness?");
    assert_eq!(turns[0].author, "1");

    // In a group: silence unless addressed. The unaddressed message comes
    // first; the group's answers are sent in order, so had it been
    // answered, that answer would be the first.
    let group = -100;
    fake.say(group, 2, "just chatting among ourselves", None);
    fake.say(group, 2, "/help@some_other_bot", None);
    let mention = fake.say(group, 2, "@dialogd_bot how are you?", None);
    let first = nth_sent(&fake, group, 1).await;
    assert_eq!(replied_to(&first), Some(mention), "{:?}", fake.sent_to(group));
    let stored = d.pipeline.turns(ChannelKey::new(dialogd_adapters::Platform::Telegram, "-100")).await.unwrap();
    assert_eq!(stored[0].text, "how are you?", "the mention is stripped");

    // A reply to the bot's message, and /ask, are answered.
    let bot_message = json!({ "message_id": 1, "date": 0, "chat": { "id": group, "type": "group", "title": "g" },
        "from": { "id": BOT_ID, "is_bot": true, "first_name": "Dialogd", "username": "dialogd_bot" }, "text": "hi" });
    let replying = fake.say(group, 3, "tell me more", Some(bot_message));
    assert_eq!(replied_to(&nth_sent(&fake, group, 2).await), Some(replying));
    let ask = fake.say(group, 3, "/ask what's up?", None);
    assert_eq!(replied_to(&nth_sent(&fake, group, 3).await), Some(ask));

    // Each command.
    let mut n = 3;
    let mut command = |text: &'static str, user: i64| {
        n += 1;
        let fake = fake.clone();
        async move {
            fake.say(group, user, text, None);
            nth_sent(&fake, group, n).await["text"].as_str().unwrap().to_string()
        }
    };
    assert!(command("/start", 2).await.contains("Hello"));
    assert!(command("/help@dialogd_bot", 2).await.contains("/reset"));
    assert!(command("/forget", 3).await.contains("deleted 4"), "user 3 had two messages and two replies");
    assert!(command("/reset", 2).await.contains("forgotten"));
    // Moderator commands: refused for members, allowed for the group's
    // administrator (getChatMember) and the allowlist.
    assert!(command("/mute", 7).await.contains("only moderators"));
    assert!(command("/persona a pirate", 7).await.contains("only moderators"));
    assert!(command("/mute", 8).await.contains("Muted"));
    fake.say(group, 2, "@dialogd_bot are you there?", None);
    assert!(command("/unmute", 9).await.contains("Unmuted"), "the muted mention got no answer");
    assert!(command("/persona create pirate Arr, matey! | Where be the treasure?", 8).await.contains("Created persona pirate with 2 seed turn(s)"));
    assert!(command("/persona use pirate", 8).await.contains("speak as pirate in this channel"));
    assert!(command("/persona use pirate server", 8).await.contains("belongs to no server"));
    assert!(command("/train", 9).await.contains("Training is off"));
    assert!(fake.calls("getChatMember").iter().any(|b| b["user_id"] == 8));

    d.stop().await;
    let text = logs.text();
    assert!(text.contains("moderator action"), "moderator actions are logged");
    assert!(text.contains("moderator command refused"));
    assert!(text.lines().count() > 20, "the capture works: {text}");
    for secret in [TOKEN, "TEST-secret-token-abcdef"] {
        assert!(!text.contains(secret), "a log line carries the token");
    }
}

/// A core that answers from a script, to drive the adapter's sending.
struct ScriptedCore {
    long: String,
    /// Add whether the adapter took the author for a moderator.
    show_moderator: bool,
}

impl Core for ScriptedCore {
    fn handle(&self, inbound: Inbound) -> BoxFuture<'static, Result<Answer, CoreError>> {
        let text = if inbound.text == "long please" {
            self.long.clone()
        } else if self.show_moderator {
            format!("echo: {} (moderator: {})", inbound.text, inbound.moderator)
        } else {
            format!("echo: {}", inbound.text)
        };
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

/// The Telegram adapter alone, polling `fake` every second, in front of
/// `core`; stopped by sending `true`.
fn start_scripted(
    fake: &FakeTelegram,
    core: ScriptedCore,
    retry: RetryPolicy,
) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<Result<(), dialogd_adapters::AdapterError>>) {
    let config = TelegramSettings {
        enabled: true,
        token: Some(Secret::new(TOKEN)),
        api_url: fake.url.clone(),
        poll_timeout: Duration::from_secs(1),
        retry,
        ..Default::default()
    };
    let (stop, shutdown) = Shutdown::new();
    (stop, tokio::spawn(Box::new(TelegramAdapter::new(config).unwrap()).run(Arc::new(core), shutdown)))
}

#[tokio::test]
async fn long_replies_split_in_order_and_429_then_5xx_lose_nothing() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let fake = FakeTelegram::start(TOKEN).await;
    // Sentences of varied length, some non-BMP characters (two UTF-16
    // units each): about 10 000 units, three pieces.
    let long: String = (0..260).map(|i| format!("Sentence {i} says {} 😀. ", "la ".repeat(i % 7))).collect();
    let core = ScriptedCore { long: long.trim().to_string(), show_moderator: false };
    let retry = RetryPolicy { attempts: 4, backoff: Duration::from_millis(50), max_wait: Duration::from_secs(2) };
    let (stop, running) = start_scripted(&fake, core, retry);

    let asked = fake.say(5, 5, "long please", None);
    // Wait for the piece that ends the reply: waiting for three pieces
    // raced the later sends on a loaded machine.
    let pieces: Vec<Value> = wait_for(WAIT, || {
        let sent = fake.sent_to(5);
        let done = sent.last().and_then(|p| p["text"].as_str()).is_some_and(|t| long.trim().ends_with(t));
        (sent.len() >= 3 && done).then_some(sent)
    })
    .await
    .expect("the long reply");
    assert_eq!(replied_to(&pieces[0]), Some(asked));
    assert!(pieces[1..].iter().all(|p| replied_to(p).is_none()));
    let texts: Vec<&str> = pieces.iter().map(|p| p["text"].as_str().unwrap()).collect();
    assert!(texts.iter().all(|t| t.encode_utf16().count() <= 4096));
    assert!(texts.iter().all(|t| t.ends_with('.')), "cut at sentence ends");
    assert_eq!(texts.join(" "), long.trim(), "nothing lost, in order");
    // In a forum topic, every piece goes to the topic (not to General).
    let in_topic = fake.say_in_topic(-1009, 4, 9, "@dialogd_bot long please");
    let pieces: Vec<Value> = wait_for(WAIT, || {
        let sent = fake.sent_to(-1009);
        let done = sent.last().and_then(|p| p["text"].as_str()).is_some_and(|t| long.trim().ends_with(t));
        (sent.len() >= 3 && done).then_some(sent)
    })
    .await
    .expect("the long reply in the topic");
    assert_eq!(replied_to(&pieces[0]), Some(in_topic));
    assert!(pieces.iter().all(|p| p["message_thread_id"] == 4), "{pieces:?}");

    // The platform says 429 (retry after 1 s), then 500; the reply goes
    // out on the third try, once.
    fake.fail_next(
        "sendMessage",
        vec![
            (429, json!({ "ok": false, "error_code": 429, "description": "Too Many Requests: retry after 1", "parameters": { "retry_after": 1 } })),
            (500, json!({ "ok": false, "error_code": 500, "description": "Internal Server Error" })),
        ],
    );
    let asked = fake.say(6, 6, "are you there", None);
    let reply = nth_sent(&fake, 6, 1).await;
    assert_eq!(reply["text"], "echo: are you there");
    assert_eq!(replied_to(&reply), Some(asked));
    let attempts: Vec<Value> = fake.calls("sendMessage").into_iter().filter(|b| b["chat_id"] == 6).collect();
    let statuses: Vec<Value> = attempts.iter().map(|b| b.get("_failed").cloned().unwrap_or(json!(200))).collect();
    assert_eq!(statuses, [json!(429), json!(500), json!(200)]);
    // And the adapter carries on.
    fake.say(6, 6, "still fine?", None);
    assert_eq!(nth_sent(&fake, 6, 2).await["text"], "echo: still fine?");

    // Failures beyond the bound: the reply is dropped after 4 tries, the
    // adapter lives and answers the next message.
    let busy = json!({ "ok": false, "error_code": 429, "description": "Too Many Requests: retry after 0", "parameters": { "retry_after": 0 } });
    fake.fail_next("sendMessage", vec![(429, busy); 4]);
    fake.say(7, 7, "doomed", None);
    let tries = || fake.calls("sendMessage").into_iter().filter(|b| b["chat_id"] == 7).count();
    wait_for(WAIT, || (tries() >= 4).then_some(())).await.expect("four tries");
    fake.say(8, 8, "after the storm", None);
    assert_eq!(nth_sent(&fake, 8, 1).await["text"], "echo: after the storm");
    assert_eq!(tries(), 4, "retries are bounded");
    assert!(fake.sent_to(7).is_empty());

    let _ = stop.send(true);
    tokio::time::timeout(WAIT, running).await.expect("the adapter stops").unwrap().unwrap();
    let text = logs.text();
    assert!(text.contains("retrying"), "{text}");
    assert!(!text.contains(TOKEN) && !text.contains("TEST-secret-token-abcdef"), "a log line carries the token");
}

/// The stored turns' texts of a Telegram channel (`chat` or `chat:topic`).
async fn texts(d: &TestDaemon, channel: &str) -> Vec<String> {
    let key = ChannelKey::new(dialogd_adapters::Platform::Telegram, channel);
    d.pipeline.turns(key).await.unwrap().into_iter().map(|t| t.text).collect()
}

/// `[adapters.telegram]` on `fake`, polling every second, and `lines`.
fn telegram_lines(fake: &FakeTelegram, lines: &[String]) -> Vec<String> {
    let mut all = vec!["enabled = true".to_string(), format!("token = \"{TOKEN}\""), format!("api_url = \"{}\"", fake.url), "poll_timeout_secs = 1".to_string()];
    all.extend_from_slice(lines);
    all
}

/// A daemon on the memory store with the Telegram adapter on `fake`
/// ([`telegram_lines`]).
fn telegram_toml(fake: &FakeTelegram, lines: &[String]) -> String {
    section_toml("adapters.telegram", &telegram_lines(fake, lines))
}

const SECRET: &str = "Se_cr-3t-hook";

#[tokio::test]
async fn webhook_mode_edits_topics_and_back_to_polling() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let fake = FakeTelegram::start(TOKEN).await;
    let listen = format!("127.0.0.1:{}", crate::support::free_port());
    fake.route_webhook_to(&listen);
    let toml = telegram_toml(
        &fake,
        &[
            "mode = \"webhook\"".into(),
            "webhook_url = \"https://bot.example.org/telegram/hook\"".into(),
            format!("webhook_listen = \"{listen}\""),
            format!("webhook_secret = \"{SECRET}\""),
        ],
    );
    let d = TestDaemon::start(&toml).await;

    // setWebhook: the URL, the secret, the updates we handle, one
    // connection at a time (Telegram's order is the order we answer in).
    let hook = wait_for(WAIT, || fake.webhook()).await.expect("setWebhook");
    assert_eq!(hook["url"], "https://bot.example.org/telegram/hook");
    assert_eq!(hook["secret_token"], SECRET);
    assert_eq!(hook["allowed_updates"], json!(["message", "edited_message"]));
    assert_eq!(hook["max_connections"], 1);

    // Updates arrive by POST (getUpdates is refused meanwhile) and are answered.
    let asked = fake.say(1, 1, "Does money buy happiness?", None);
    let reply = nth_sent(&fake, 1, 1).await;
    assert_eq!(replied_to(&reply), Some(asked));
    assert!(fake.deliveries().iter().any(|&(_, status)| status == 200));
    assert_eq!(texts(&d, "1").await[0], "Does money buy happiness?");

    // Without the secret, or with a wrong one: 401, nothing handed over.
    let forged = fake.update_for(1, 66, "forged message");
    assert_eq!(fake.post_update(&forged, None).await, 401);
    assert_eq!(fake.post_update(&forged, Some("wrong-secret")).await, 401);
    // The same update delivered twice is answered once.
    let twice = fake.update_for(1, 1, "tell me more");
    assert_eq!(fake.post_update(&twice, Some(SECRET)).await, 200);
    assert_eq!(fake.post_update(&twice, Some(SECRET)).await, 200);
    nth_sent(&fake, 1, 2).await;
    // A marker message: once it is answered, everything before was handled.
    let marker = fake.say(1, 1, "and now?", None);
    assert_eq!(replied_to(&nth_sent(&fake, 1, 3).await), Some(marker));
    let stored = texts(&d, "1").await;
    assert_eq!(stored.iter().filter(|t| *t == "tell me more").count(), 1, "{stored:?}");
    assert!(!stored.iter().any(|t| t == "forged message"), "{stored:?}");
    assert_eq!(fake.sent_to(1).len(), 3, "one answer per distinct update");

    // Edits: the latest turn's text is replaced, silently; an edit of an
    // older message changes nothing; a toxic edit takes the exchange out.
    fake.edit(1, 1, marker, "and now, what?");
    wait_for(WAIT, || texts_now(&d, "1").filter(|t| t.contains(&"and now, what?".to_string()))).await.expect("the edit is stored");
    fake.edit(1, 1, asked, "Does money buy love?");
    let marker2 = fake.say(1, 1, "one more", None);
    assert_eq!(replied_to(&nth_sent(&fake, 1, 4).await), Some(marker2));
    let stored = texts(&d, "1").await;
    assert!(stored.contains(&"Does money buy happiness?".to_string()) && !stored.iter().any(|t| t.contains("love")), "{stored:?}");
    assert_eq!(fake.sent_to(1).len(), 4, "edits are not answered (answer_edits = false)");
    let before = stored.len();
    fake.edit(1, 1, marker2, "you are a f*cking idiot");
    let after = wait_for(WAIT, || texts_now(&d, "1").filter(|t| !t.contains(&"one more".to_string()))).await.expect("the flagged edit's turn is gone");
    assert_eq!(after.len(), before - 2, "the turn and its reply: {after:?}");
    assert!(!after.iter().any(|t| t.contains("idiot")));

    // Forum topics: each topic its own channel, the answer in the topic,
    // /reset acting on its topic only.
    let forum = -1005;
    let in_seven = fake.say_in_topic(forum, 7, 2, "@dialogd_bot hello from topic seven");
    let reply = nth_sent(&fake, forum, 1).await;
    assert_eq!((replied_to(&reply), reply["message_thread_id"].as_i64()), (Some(in_seven), Some(7)));
    fake.say_in_topic(forum, 8, 2, "@dialogd_bot hello from topic eight");
    assert_eq!(nth_sent(&fake, forum, 2).await["message_thread_id"], 8);
    assert_eq!(texts(&d, "-1005:7").await[0], "hello from topic seven");
    assert_eq!(texts(&d, "-1005:8").await[0], "hello from topic eight");
    assert!(texts(&d, "-1005").await.is_empty(), "nothing in the chat's own channel");
    fake.say_in_topic(forum, 7, 2, "/reset");
    assert_eq!(nth_sent(&fake, forum, 3).await["message_thread_id"], 7);
    assert!(texts(&d, "-1005:7").await.is_empty());
    assert_eq!(texts(&d, "-1005:8").await.len(), 2, "the other topic keeps its context");
    assert!(fake.calls("sendChatAction").iter().any(|b| b["message_thread_id"] == 7), "typing in the topic");
    d.stop().await;

    // Back to polling (answering edits this time): the webhook is deleted
    // and what was sent meanwhile is polled.
    let waiting = fake.say(3, 3, "are you still there?", None);
    let d = TestDaemon::start(&telegram_toml(&fake, &["answer_edits = true".into()])).await;
    wait_for(WAIT, || fake.webhook().is_none().then_some(())).await.expect("deleteWebhook");
    assert!(!fake.calls("deleteWebhook").is_empty());
    assert_eq!(replied_to(&nth_sent(&fake, 3, 1).await), Some(waiting));
    // An edit answered again: a new reply to the edited message, and the
    // old exchange replaced in the context.
    fake.edit(3, 3, waiting, "are you still awake?");
    assert_eq!(replied_to(&nth_sent(&fake, 3, 2).await), Some(waiting));
    let stored = texts(&d, "3").await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0], "are you still awake?");
    d.stop().await;

    let text = logs.text();
    assert!(text.contains("without the right secret"), "the forged requests are logged");
    for secret in [TOKEN, "TEST-secret-token-abcdef", SECRET] {
        assert!(!text.contains(secret), "a log line carries a secret");
    }
}

/// The stored texts now, for polling with `wait_for` (a blocking read of
/// the memory store through a fresh runtime would deadlock; this peeks).
fn texts_now(d: &TestDaemon, channel: &str) -> Option<Vec<String>> {
    let key = ChannelKey::new(dialogd_adapters::Platform::Telegram, channel);
    let turns = d.pipeline.turns(key);
    futures_util::FutureExt::now_or_never(turns).and_then(Result::ok).map(|t| t.into_iter().map(|t| t.text).collect())
}

/// While `getChatMember` hangs (or fails), a moderator command waits in
/// its own chat only: other chats are answered at once, the command is
/// answered (as not from a moderator) after the check's timeout, the
/// chat's later message after it, in order; the answer is cached per
/// (chat, user), so a second command does not ask again.
#[tokio::test]
async fn a_hanging_or_failing_moderator_check_stalls_no_other_chat() {
    use dialogd_adapters::telegram::MODERATOR_CHECK_TIMEOUT;
    let logs = LogCapture::default();
    let _guard = logs.install();
    let fake = FakeTelegram::start(TOKEN).await;
    let retry = RetryPolicy { attempts: 3, backoff: Duration::from_millis(50), max_wait: Duration::from_secs(1) };
    let (stop, running) = start_scripted(&fake, ScriptedCore { long: String::new(), show_moderator: true }, retry);
    wait_for(WAIT, || fake.calls("setMyCommands").pop()).await.expect("the adapter polls");

    fake.hang("getChatMember", true);
    let started = std::time::Instant::now();
    fake.say(-100, 7, "/mute", None);
    fake.say(-100, 7, "/ask and then?", None);
    fake.say(3, 3, "hello", None);
    fake.say(-200, 4, "/ask anyone?", None);
    assert_eq!(nth_sent(&fake, 3, 1).await["text"], "echo: hello (moderator: false)");
    assert_eq!(nth_sent(&fake, -200, 1).await["text"], "echo: /ask anyone? (moderator: false)");
    assert!(started.elapsed() < MODERATOR_CHECK_TIMEOUT / 2, "{:?}: other chats waited for the check", started.elapsed());
    assert!(fake.sent_to(-100).is_empty(), "the command did not wait for its check");

    let muted = nth_sent(&fake, -100, 1).await;
    assert_eq!(muted["text"], "echo: /mute (moderator: false)");
    assert!(started.elapsed() >= MODERATOR_CHECK_TIMEOUT, "answered before the check timed out");
    assert!(started.elapsed() < MODERATOR_CHECK_TIMEOUT * 2, "{:?}: the check is not bounded", started.elapsed());
    assert_eq!(nth_sent(&fake, -100, 2).await["text"], "echo: /ask and then? (moderator: false)");

    // The answer is cached: another command by the same user in the same
    // chat does not ask again.
    fake.hang("getChatMember", false);
    let asked = fake.calls("getChatMember").len();
    fake.say(-100, 7, "/unmute", None);
    assert_eq!(nth_sent(&fake, -100, 3).await["text"], "echo: /unmute (moderator: false)");
    assert_eq!(fake.calls("getChatMember").len(), asked);

    // Failing (a 5xx; teloxide itself waits 10 s after one, so this ends
    // at the timeout): not a moderator, and no other chat waits; a working
    // check then finds an administrator.
    let error = json!({ "ok": false, "error_code": 500, "description": "Internal Server Error" });
    fake.fail_next("getChatMember", vec![(500, error)]);
    fake.say(-300, 8, "/mute", None);
    fake.say(5, 5, "still here?", None);
    assert_eq!(nth_sent(&fake, 5, 1).await["text"], "echo: still here? (moderator: false)");
    assert_eq!(nth_sent(&fake, -300, 1).await["text"], "echo: /mute (moderator: false)");
    fake.add_admin(9);
    fake.say(-300, 9, "/mute", None);
    assert_eq!(nth_sent(&fake, -300, 2).await["text"], "echo: /mute (moderator: true)");
    assert!(logs.text().contains("no answer on who is an administrator"), "the timeout is logged");

    let _ = stop.send(true);
    tokio::time::timeout(WAIT, running).await.expect("the adapter stops").unwrap().unwrap();
}

/// Issue #16 point 5: `allowed_chats` and `allowed_users` (empty: all):
/// a message outside either list is never answered nor stored.
#[tokio::test]
async fn allowed_chats_and_users_limit_who_is_answered() {
    let fake = FakeTelegram::start(TOKEN).await;
    let lines = ["allowed_chats = [-100, 5]".to_string(), "allowed_users = [5, 7]".to_string()];
    let d = TestDaemon::start(&telegram_toml(&fake, &lines)).await;
    fake.say(1, 1, "a private chat not allowed", None);
    fake.say(-100, 8, "@dialogd_bot a user not allowed", None);
    fake.say(-200, 7, "@dialogd_bot a group not allowed", None);
    let asked = fake.say(-100, 7, "@dialogd_bot both allowed", None);
    assert_eq!(replied_to(&nth_sent(&fake, -100, 1).await), Some(asked));
    let asked = fake.say(5, 5, "my own private chat", None);
    assert_eq!(replied_to(&nth_sent(&fake, 5, 1).await), Some(asked));
    assert!(fake.sent_to(1).is_empty() && fake.sent_to(-200).is_empty());
    assert_eq!(fake.sent_to(-100).len(), 1, "user 8 was not answered");
    assert!(texts(&d, "1").await.is_empty() && texts(&d, "-200").await.is_empty());
    d.stop().await;
}

/// The webhook server is bounded as the JSON API is (`[adapters.http]`'s
/// limits): with twice the connection cap held open and idle, Telegram's
/// deliveries still get through once the idle ones are closed at the
/// header timeout; a body that never arrives gets 408, one over the limit
/// 413.
#[tokio::test]
async fn the_webhook_server_is_bounded_like_the_http_api() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeTelegram::start(TOKEN).await;
    let listen = format!("127.0.0.1:{}", crate::support::free_port());
    fake.route_webhook_to(&listen);
    let telegram = telegram_lines(&fake, &["mode = \"webhook\"".into(), "webhook_url = \"https://bot.example.org/telegram/hook\"".into(), format!("webhook_listen = \"{listen}\""), format!("webhook_secret = \"{SECRET}\"")]);
    let mut extra: Vec<(&str, &str)> = telegram.iter().map(|l| ("adapters.telegram", l.as_str())).collect();
    let cap = 4;
    extra.extend([("adapters.http", "header_timeout_secs = 2"), ("adapters.http", "body_timeout_secs = 2"), ("adapters.http", "max_connections = 4"), ("adapters.http", "max_body_bytes = 2048")]);
    let d = TestDaemon::start(&daemon_toml(None, &extra)).await;
    wait_for(WAIT, || fake.webhook()).await.expect("setWebhook");

    let mut idle = Vec::new();
    for _ in 0..2 * cap {
        idle.push(tokio::net::TcpStream::connect(&listen).await.unwrap());
    }
    let asked = fake.say(1, 1, "hello through the crowd", None);
    assert_eq!(replied_to(&nth_sent(&fake, 1, 1).await), Some(asked));
    for mut stream in idle {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "an idle connection was kept open: {read:?}");
    }

    // A request whose body never comes, and one over the body limit.
    let respond = |request: Vec<u8>| {
        let listen = listen.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(&listen).await.unwrap();
            stream.write_all(&request).await.unwrap();
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
            assert!(read.is_ok(), "no answer within 10 s");
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    let head = |length: usize| format!("POST /telegram/hook HTTP/1.1\r\nhost: bot\r\ncontent-type: application/json\r\ncontent-length: {length}\r\nx-telegram-bot-api-secret-token: {SECRET}\r\nconnection: close\r\n\r\n");
    let half_sent = respond(format!("{}{{\"update_id\":", head(100)).into_bytes()).await;
    assert!(half_sent.starts_with("HTTP/1.1 408"), "{half_sent}");
    let big = format!("{}{}", head(3000), " ".repeat(3000));
    let too_big = respond(big.into_bytes()).await;
    assert!(too_big.starts_with("HTTP/1.1 413"), "{too_big}");

    // Still serving.
    let again = fake.say(1, 1, "still there?", None);
    assert_eq!(replied_to(&nth_sent(&fake, 1, 2).await), Some(again));
    d.stop().await;
}

/// [`telegram_lines`] on a daemon whose context (and so word lists and
/// personas) is in `redis`.
fn telegram_redis_toml(fake: &FakeTelegram, redis: &crate::support::RedisServer, lines: &[String]) -> String {
    let lines = telegram_lines(fake, lines);
    let extra: Vec<(&str, &str)> = lines.iter().map(|l| ("adapters.telegram", l.as_str())).collect();
    crate::support::daemon_toml(Some(redis), &extra)
}

/// Sends `text` as `user` in `chat` and waits for the chat's `n`th answer.
async fn answer(fake: &FakeTelegram, chat: i64, user: i64, text: &str, n: usize) -> String {
    fake.say(chat, user, text, None);
    nth_sent(fake, chat, n).await["text"].as_str().unwrap().to_string()
}

/// Waits for a message to `chat` containing `needle`.
async fn sent_containing(fake: &FakeTelegram, chat: i64, needle: &str) {
    let found = wait_for(WAIT, || fake.sent_to(chat).into_iter().find(|m| m["text"].as_str().is_some_and(|t| t.contains(needle)))).await;
    assert!(found.is_some(), "nothing containing {needle:?} sent to {chat}: {:?}", fake.sent_to(chat));
}

/// Moderators' word lists through the Telegram adapter, kept in Redis: a
/// word a chat's administrator blocks is refused in that chat and not in
/// another, a member's `/block` (and the administrator's in a chat they do
/// not administer) is refused, and the list survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_words_hold_per_chat_and_survive_a_restart() {
    let redis = crate::support::RedisServer::start();
    let notice = "Let's keep it friendly.";
    let (a, b) = (-100, -200);
    let fake = FakeTelegram::start(TOKEN).await;
    fake.add_admin_of(a, 8);
    let d = TestDaemon::start(&telegram_redis_toml(&fake, &redis, &[])).await;
    assert!(answer(&fake, a, 7, "/block grumble", 1).await.contains("only moderators"));
    let blocked = answer(&fake, a, 8, "/block Grumble moon ?!", 2).await;
    assert!(blocked.starts_with("Blocked here: grumble, moon.") && blocked.contains("Refused: `?!` has no letters or digits"), "{blocked}");
    assert_eq!(answer(&fake, a, 2, "@dialogd_bot you grumble", 3).await, notice);
    assert_eq!(answer(&fake, a, 2, "@dialogd_bot over the m o o n", 4).await, notice);
    assert_eq!(answer(&fake, a, 8, "/blocklist", 5).await, "Blocked here: grumble, moon. Allowed here: none.");
    assert!(answer(&fake, a, 8, "/help", 6).await.contains("/block WORD…"));
    // Another chat: not blocked there, and chat a's administrator is no
    // moderator of it.
    fake.say(b, 2, "@dialogd_bot you grumble", None);
    fake.say(b, 8, "/block grumble", None);
    // The message is answered first (or stays silent), then the command.
    sent_containing(&fake, b, "only moderators").await;
    assert!(fake.sent_to(b).iter().all(|m| m["text"] != notice), "blocked in the wrong chat: {:?}", fake.sent_to(b));
    d.stop().await;

    // A new daemon on the same Redis (and the same Telegram, whose message
    // ids go on): the list holds.
    let d = TestDaemon::start(&telegram_redis_toml(&fake, &redis, &[])).await;
    assert_eq!(answer(&fake, a, 2, "@dialogd_bot GRUMBLE!", 7).await, notice);
    assert_eq!(answer(&fake, a, 8, "/unblock grumble", 8).await, "Unblocked: grumble.");
    fake.say(a, 2, "@dialogd_bot you grumble", None);
    fake.say(a, 2, "/start", None);
    sent_containing(&fake, a, "Hello").await;
    assert_eq!(fake.sent_to(a).iter().filter(|m| m["text"] == notice).count(), 3, "{:?}", fake.sent_to(a));
    d.stop().await;
}

/// Authority stops at the chat, through the Telegram adapter: a persona
/// belongs to the chat that created it; another chat's administrator may
/// not use it until it is shared, and never train it, roll it back,
/// replace it or share it; an operator (the `moderators` allowlist) may.
/// The base model (`jobs.mode = "full"`) needs an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_stops_at_the_chat() {
    let redis = crate::support::RedisServer::start();
    let dir = std::env::temp_dir().join(format!("dialogd-authority-{}", std::process::id()));
    let jobs_dir = format!("dir = \"{}\"", dir.join("jobs").display());
    let (a, b, operator) = (-100, -200, 9);
    let fake = FakeTelegram::start(TOKEN).await;
    fake.add_admin_of(a, 8);
    fake.add_admin_of(b, 18);
    let toml = |mode: &str| {
        let mut toml = telegram_redis_toml(&fake, &redis, &[format!("moderators = [{operator}]")]);
        toml = toml.replace("[jobs]\n", "");
        toml + &format!("[jobs]\nenabled = true\n{jobs_dir}\nmode = \"{mode}\"\n")
    };
    let d = TestDaemon::start(&toml("lora")).await;
    let (mut in_a, mut in_b) = (0, 0);
    let mut say = |chat: i64, user: i64, text: &'static str| {
        let n = if chat == a { &mut in_a } else { &mut in_b };
        *n += 1;
        let (fake, n) = (fake.clone(), *n);
        async move { answer(&fake, chat, user, text, n).await }
    };
    assert!(say(a, 8, "/persona create pirate Arr! | Ahoy").await.contains("Created persona pirate"));
    let refused = say(b, 18, "/persona use pirate").await;
    assert!(refused.contains("belongs to another chat or server and is not shared"), "{refused}");
    assert!(say(b, 18, "/persona create pirate Yo").await.contains("belongs to another chat or server; choose another name"));
    assert!(say(b, 18, "/persona share pirate").await.contains("only its moderators can share it"));
    assert!(say(a, 8, "/persona share pirate").await.contains("pirate is shared"));
    assert!(say(b, 18, "/persona use pirate").await.contains("From now on I speak as pirate"));
    // Shared is not owned: chat b may not train it or roll it back.
    let train = say(b, 18, "/train").await;
    assert!(train.contains("pirate belongs to another chat or server: only its moderators can train it"), "{train}");
    assert!(say(b, 18, "/train rollback").await.contains("only its moderators can train it or roll it back"));
    // Its owners may (collection is off here, so there is nothing to train on).
    assert!(say(a, 8, "/persona use pirate").await.contains("speak as pirate"));
    assert!(say(a, 8, "/train").await.contains("not collected"));
    // An operator may, in any chat.
    assert!(say(b, operator, "/train").await.contains("not collected"));
    // Unshared: chat b can choose it no more.
    assert!(say(a, 8, "/persona unshare").await.contains("pirate is no longer shared"));
    assert!(say(b, 18, "/persona use pirate").await.contains("not shared"));
    d.stop().await;

    // Full fine-tuning: the base model every chat is served by.
    let d = TestDaemon::start(&toml("full")).await;
    assert!(answer(&fake, a, 8, "/train", in_a + 1).await.contains("needs an operator"));
    assert!(answer(&fake, a, 8, "/train rollback", in_a + 2).await.contains("needs an operator"));
    assert!(answer(&fake, a, operator, "/train", in_a + 3).await.contains("not collected"));
    d.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Other bots' messages are ignored (bot-to-bot loops) unless
/// `answer_bots = true`.
#[tokio::test]
async fn other_bots_are_answered_only_with_answer_bots() {
    let fake = FakeTelegram::start(TOKEN).await;
    let d = TestDaemon::start(&telegram_toml(&fake, &[])).await;
    fake.say_as_bot(-100, 77, "/start");
    assert!(answer(&fake, -100, 2, "/help", 1).await.contains("/reset"), "the bot's /start was answered");
    d.stop().await;
    let fake = FakeTelegram::start(TOKEN).await;
    let d = TestDaemon::start(&telegram_toml(&fake, &["answer_bots = true".into()])).await;
    fake.say_as_bot(-100, 77, "/start");
    assert!(nth_sent(&fake, -100, 1).await["text"].as_str().unwrap().contains("Hello"));
    d.stop().await;
}
