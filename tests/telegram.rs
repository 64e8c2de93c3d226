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
use crate::support::{daemon_toml, TestDaemon};

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
    let extra = [
        ("adapters.telegram", "enabled = true".to_string()),
        ("adapters.telegram", format!("token = \"{TOKEN}\"")),
        ("adapters.telegram", format!("api_url = \"{}\"", fake.url)),
        ("adapters.telegram", "poll_timeout_secs = 1".to_string()),
        ("adapters.telegram", "moderators = [9]".to_string()),
    ];
    let extra: Vec<(&str, &str)> = extra.iter().map(|(s, l)| (*s, l.as_str())).collect();
    let d = TestDaemon::start(&daemon_toml(None, &extra)).await;
    fake.add_admin(8);

    // The command menu is registered.
    let menu = wait_for(WAIT, || fake.calls("setMyCommands").pop()).await.expect("setMyCommands");
    let names: Vec<&str> = menu["commands"].as_array().unwrap().iter().map(|c| c["command"].as_str().unwrap()).collect();
    assert_eq!(names, ["start", "help", "ask", "reset", "forget", "optout", "optin", "mute", "unmute", "persona", "train", "collect"]);

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

#[tokio::test]
async fn long_replies_split_in_order_and_429_then_5xx_lose_nothing() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let fake = FakeTelegram::start(TOKEN).await;
    // Sentences of varied length, some non-BMP characters (two UTF-16
    // units each): about 10 000 units, three pieces.
    let long: String = (0..260).map(|i| format!("Sentence {i} says {} 😀. ", "la ".repeat(i % 7))).collect();
    let core: Arc<dyn Core> = Arc::new(ScriptedCore { long: long.trim().to_string() });
    let config = TelegramSettings {
        enabled: true,
        token: Some(Secret::new(TOKEN)),
        api_url: fake.url.clone(),
        moderators: vec![],
        poll_timeout: Duration::from_secs(1),
        retry: RetryPolicy { attempts: 4, backoff: Duration::from_millis(50), max_wait: Duration::from_secs(2) },
        ..Default::default()
    };
    let (stop, shutdown) = Shutdown::new();
    let adapter = Box::new(TelegramAdapter::new(config).unwrap());
    let running = tokio::spawn(adapter.run(core, shutdown));

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
