//! A fake Telegram Bot API on loopback: `getMe`, `setMyCommands`,
//! `getUpdates` (long polling over a queue the test fills),
//! `sendMessage`, `sendChatAction`, `getChatMember`. Method names are
//! matched case-insensitively (teloxide writes them in PascalCase). A test
//! can script failures (429 with `retry_after`, 5xx) for the next calls of
//! a method, or make a method hang (never answer).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

pub const BOT_ID: i64 = 4242;
pub const BOT_USERNAME: &str = "dialogd_bot";

#[derive(Default)]
struct Inner {
    token: String,
    updates: Mutex<VecDeque<Value>>,
    next_update: AtomicI64,
    next_message: AtomicI64,
    /// Every call: (method in lower case, body).
    calls: Mutex<Vec<(String, Value)>>,
    /// Scripted answers for the next calls of a method: (status, body).
    failures: Mutex<HashMap<String, VecDeque<(u16, Value)>>>,
    /// User ids that are administrators of every group.
    admins: Mutex<HashSet<i64>>,
    /// Methods (lower case) that never answer while listed.
    hanging: Mutex<HashSet<String>>,
    new_update: tokio::sync::Notify,
}

/// The fake server; dropped with the test's runtime.
#[derive(Clone)]
pub struct FakeTelegram {
    pub url: String,
    inner: Arc<Inner>,
}

impl FakeTelegram {
    pub async fn start(token: &str) -> Self {
        let inner = Arc::new(Inner {
            token: token.to_string(),
            next_update: AtomicI64::new(1),
            next_message: AtomicI64::new(1000),
            ..Default::default()
        });
        let app = axum::Router::new().route("/{bot}/{method}", axum::routing::post(handle).get(handle)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, inner }
    }

    pub fn add_admin(&self, user: i64) {
        self.inner.admins.lock().unwrap().insert(user);
    }

    /// Makes calls of `method` hang (recorded, never answered) or answer again.
    pub fn hang(&self, method: &str, hang: bool) {
        let method = method.to_ascii_lowercase();
        let mut hanging = self.inner.hanging.lock().unwrap();
        if hang {
            hanging.insert(method);
        } else {
            hanging.remove(&method);
        }
    }

    /// The next calls of `method` get these answers, in order.
    pub fn fail_next(&self, method: &str, answers: Vec<(u16, Value)>) {
        self.inner.failures.lock().unwrap().entry(method.to_ascii_lowercase()).or_default().extend(answers);
    }

    /// Queues a text message from `user` in `chat` (negative ids are
    /// groups); returns its message id.
    pub fn say(&self, chat: i64, user: i64, text: &str, reply_to: Option<Value>) -> i64 {
        let id = self.inner.next_message.fetch_add(1, Ordering::SeqCst);
        let mut message = json!({
            "message_id": id,
            "date": 1_700_000_000,
            "chat": chat_json(chat),
            "from": { "id": user, "is_bot": false, "first_name": format!("user{user}") },
            "text": text,
        });
        if let Some(original) = reply_to {
            message["reply_to_message"] = original;
        }
        let update = self.inner.next_update.fetch_add(1, Ordering::SeqCst);
        self.inner.updates.lock().unwrap().push_back(json!({ "update_id": update, "message": message }));
        self.inner.new_update.notify_waiters();
        id
    }

    /// Every call of `method` so far (bodies), in order.
    pub fn calls(&self, method: &str) -> Vec<Value> {
        let method = method.to_ascii_lowercase();
        self.inner.calls.lock().unwrap().iter().filter(|(m, _)| *m == method).map(|(_, b)| b.clone()).collect()
    }

    /// The messages the bot sent (successful `sendMessage` calls) to `chat`.
    pub fn sent_to(&self, chat: i64) -> Vec<Value> {
        self.calls("sendmessage")
            .into_iter()
            .filter(|b| b["chat_id"].as_i64() == Some(chat) && b.get("_failed").is_none())
            .collect()
    }
}

fn chat_json(chat: i64) -> Value {
    if chat < 0 {
        json!({ "id": chat, "type": "group", "title": "A group" })
    } else {
        json!({ "id": chat, "type": "private", "first_name": "someone" })
    }
}

fn bot_user() -> Value {
    json!({ "id": BOT_ID, "is_bot": true, "first_name": "Dialogd", "username": BOT_USERNAME })
}

fn ok(result: Value) -> Response {
    Json(json!({ "ok": true, "result": result })).into_response()
}

async fn handle(State(inner): State<Arc<Inner>>, Path((bot, method)): Path<(String, String)>, body: String) -> Response {
    if bot != format!("bot{}", inner.token) {
        return (StatusCode::UNAUTHORIZED, Json(json!({ "ok": false, "error_code": 401, "description": "Unauthorized" })))
            .into_response();
    }
    let method = method.to_ascii_lowercase();
    let mut body: Value = serde_json::from_str(&body).unwrap_or(json!({}));
    let failure = inner.failures.lock().unwrap().get_mut(&method).and_then(|q| q.pop_front());
    if let Some((status, answer)) = failure {
        body["_failed"] = json!(status);
        inner.calls.lock().unwrap().push((method, body));
        return (StatusCode::from_u16(status).unwrap(), Json(answer)).into_response();
    }
    if method != "getupdates" {
        inner.calls.lock().unwrap().push((method.clone(), body.clone()));
    }
    if inner.hanging.lock().unwrap().contains(&method) {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    match method.as_str() {
        "getme" => {
            let mut me = bot_user();
            for (k, v) in [
                ("can_join_groups", true),
                ("can_read_all_group_messages", false),
                ("supports_inline_queries", false),
                ("has_main_web_app", false),
            ] {
                me[k] = json!(v);
            }
            ok(me)
        }
        "setmycommands" | "sendchataction" => ok(json!(true)),
        "getupdates" => {
            let offset = body["offset"].as_i64().unwrap_or(0);
            let wait = Duration::from_secs(body["timeout"].as_u64().unwrap_or(0)).min(Duration::from_millis(300));
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let notified = inner.new_update.notified();
                let batch: Vec<Value> = {
                    let mut updates = inner.updates.lock().unwrap();
                    updates.retain(|u| u["update_id"].as_i64().unwrap() >= offset);
                    updates.iter().cloned().collect()
                };
                if !batch.is_empty() || tokio::time::Instant::now() >= deadline {
                    return ok(Value::Array(batch));
                }
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
        }
        "sendmessage" => {
            let chat = body["chat_id"].as_i64().unwrap_or(0);
            let id = inner.next_message.fetch_add(1, Ordering::SeqCst);
            ok(json!({
                "message_id": id,
                "date": 1_700_000_000,
                "chat": chat_json(chat),
                "from": bot_user(),
                "text": body["text"],
            }))
        }
        "getchatmember" => {
            let user = body["user_id"].as_i64().unwrap_or(0);
            let who = json!({ "id": user, "is_bot": false, "first_name": format!("user{user}") });
            if inner.admins.lock().unwrap().contains(&user) {
                ok(json!({ "status": "creator", "user": who, "is_anonymous": false }))
            } else {
                ok(json!({ "status": "member", "user": who }))
            }
        }
        _ => (StatusCode::NOT_FOUND, Json(json!({ "ok": false, "error_code": 404, "description": "Not Found: method not found" })))
            .into_response(),
    }
}
