//! A fake Telegram Bot API on loopback: `getMe`, `setMyCommands`,
//! `getUpdates` (long polling over a queue the test fills),
//! `sendMessage`, `sendChatAction`, `getChatMember`, `setWebhook` and
//! `deleteWebhook`. Method names are matched case-insensitively (teloxide
//! writes them in PascalCase). A test can script failures (429 with
//! `retry_after`, 5xx) for the next calls of a method, or make a method
//! hang (never answer).
//!
//! While a webhook is set, `getUpdates` is refused with 409 (as Telegram
//! does) and updates are POSTed, one at a time and in order, to the
//! address the test routes the webhook's URL to (the reverse proxy's
//! part), with the `X-Telegram-Bot-Api-Secret-Token` header; a delivery
//! answered with anything but 200 is retried, as Telegram retries.

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
    /// (chat, user): administrators of one group.
    chat_admins: Mutex<HashSet<(i64, i64)>>,
    /// Methods (lower case) that never answer while listed.
    hanging: Mutex<HashSet<String>>,
    new_update: tokio::sync::Notify,
    /// The `setWebhook` body while a webhook is set.
    webhook: Mutex<Option<Value>>,
    /// Where the webhook URL's path is served (`127.0.0.1:port`).
    webhook_route: Mutex<Option<String>>,
    /// Updates waiting for webhook delivery.
    outgoing: Mutex<VecDeque<Value>>,
    /// Every webhook delivery: (update_id, HTTP status).
    deliveries: Mutex<Vec<(i64, u16)>>,
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
        tokio::spawn(deliver_webhooks(Arc::downgrade(&inner)));
        Self { url, inner }
    }

    /// Serves the webhook URL's path at `addr` (what the reverse proxy in
    /// front of the bot does).
    pub fn route_webhook_to(&self, addr: &str) {
        *self.inner.webhook_route.lock().unwrap() = Some(addr.to_string());
    }

    /// The webhook set now (`setWebhook`'s body), if any.
    pub fn webhook(&self) -> Option<Value> {
        self.inner.webhook.lock().unwrap().clone()
    }

    /// Every webhook delivery so far: (update_id, status).
    pub fn deliveries(&self) -> Vec<(i64, u16)> {
        self.inner.deliveries.lock().unwrap().clone()
    }

    /// POSTs `update` to the webhook route at once, with `secret` as the
    /// secret header (none: no header); the status the bot answered.
    pub async fn post_update(&self, update: &Value, secret: Option<&str>) -> u16 {
        let (url, _) = self.webhook_target().expect("a webhook set and routed");
        post(&url, update, secret).await
    }

    fn webhook_target(&self) -> Option<(String, Option<String>)> {
        webhook_target(&self.inner)
    }

    /// A whole update for a text message (for [`FakeTelegram::post_update`]);
    /// it is not queued.
    pub fn update_for(&self, chat: i64, user: i64, text: &str) -> Value {
        let id = self.inner.next_message.fetch_add(1, Ordering::SeqCst);
        let update = self.inner.next_update.fetch_add(1, Ordering::SeqCst);
        json!({ "update_id": update, "message": message_json(id, chat, user, text) })
    }

    pub fn add_admin(&self, user: i64) {
        self.inner.admins.lock().unwrap().insert(user);
    }

    /// Makes `user` an administrator of `chat` alone.
    pub fn add_admin_of(&self, chat: i64, user: i64) {
        self.inner.chat_admins.lock().unwrap().insert((chat, user));
    }

    /// Queues a text message from another bot (`is_bot`), user id `bot`.
    pub fn say_as_bot(&self, chat: i64, bot: i64, text: &str) -> i64 {
        let id = self.inner.next_message.fetch_add(1, Ordering::SeqCst);
        let mut message = message_json(id, chat, bot, text);
        message["from"] = json!({ "id": bot, "is_bot": true, "first_name": format!("bot{bot}"), "username": format!("bot{bot}_bot") });
        self.push("message", message);
        id
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
        let mut message = message_json(id, chat, user, text);
        if let Some(original) = reply_to {
            message["reply_to_message"] = original;
        }
        self.push("message", message);
        id
    }

    /// Queues a message in forum topic `thread` of supergroup `chat`.
    pub fn say_in_topic(&self, chat: i64, thread: i64, user: i64, text: &str) -> i64 {
        let id = self.inner.next_message.fetch_add(1, Ordering::SeqCst);
        let mut message = message_json(id, chat, user, text);
        message["chat"] = json!({ "id": chat, "type": "supergroup", "title": "A forum", "is_forum": true });
        message["message_thread_id"] = json!(thread);
        message["is_topic_message"] = json!(true);
        self.push("message", message);
        id
    }

    /// Queues an `edited_message` update: message `id` of `user` in
    /// `chat` now reads `text`.
    pub fn edit(&self, chat: i64, user: i64, id: i64, text: &str) {
        let mut message = message_json(id, chat, user, text);
        message["edit_date"] = json!(1_700_000_100);
        self.push("edited_message", message);
    }

    /// Queues an update of `kind` (`message`, `edited_message`), for
    /// getUpdates or, while a webhook is set, for delivery.
    fn push(&self, kind: &str, message: Value) {
        let update = self.inner.next_update.fetch_add(1, Ordering::SeqCst);
        let update = json!({ "update_id": update, kind: message });
        if self.inner.webhook.lock().unwrap().is_some() {
            self.inner.outgoing.lock().unwrap().push_back(update);
        } else {
            self.inner.updates.lock().unwrap().push_back(update);
        }
        self.inner.new_update.notify_waiters();
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

fn message_json(id: i64, chat: i64, user: i64, text: &str) -> Value {
    json!({
        "message_id": id,
        "date": 1_700_000_000,
        "chat": chat_json(chat),
        "from": { "id": user, "is_bot": false, "first_name": format!("user{user}") },
        "text": text,
    })
}

/// The local URL the webhook's path is served at, and its secret.
fn webhook_target(inner: &Inner) -> Option<(String, Option<String>)> {
    let hook = inner.webhook.lock().unwrap().clone()?;
    let route = inner.webhook_route.lock().unwrap().clone()?;
    let public = reqwest::Url::parse(hook["url"].as_str()?).ok()?;
    let secret = hook["secret_token"].as_str().map(str::to_string);
    Some((format!("http://{route}{}", public.path()), secret))
}

async fn post(url: &str, update: &Value, secret: Option<&str>) -> u16 {
    let mut request = reqwest::Client::new().post(url).json(update);
    if let Some(secret) = secret {
        request = request.header("X-Telegram-Bot-Api-Secret-Token", secret);
    }
    match request.send().await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

/// Telegram's side of a webhook: each update in turn until it is taken
/// with 200 (retried every 100 ms otherwise).
async fn deliver_webhooks(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let next = strong.outgoing.lock().unwrap().front().cloned();
        let target = webhook_target(&strong);
        let (Some(update), Some((url, secret))) = (next, target) else {
            drop(strong);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let status = post(&url, &update, secret.as_deref()).await;
        strong.deliveries.lock().unwrap().push((update["update_id"].as_i64().unwrap_or(0), status));
        if status == 200 {
            strong.outgoing.lock().unwrap().pop_front();
        } else {
            drop(strong);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The fields of a multipart form, each value as JSON when it parses
/// (`allowed_updates`, numbers) and as a string otherwise.
fn form_fields(body: &str) -> Value {
    let mut fields = serde_json::Map::new();
    for part in body.split("Content-Disposition: form-data; name=\"").skip(1) {
        let Some((name, rest)) = part.split_once('"') else { continue };
        let Some((_, value)) = rest.split_once("\r\n\r\n") else { continue };
        let value = value.split("\r\n--").next().unwrap_or("").to_string();
        let parsed = serde_json::from_str(&value).unwrap_or(Value::String(value));
        fields.insert(name.to_string(), parsed);
    }
    Value::Object(fields)
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
    // teloxide sends JSON, or multipart forms for methods that may carry
    // files (setWebhook).
    let mut body: Value = serde_json::from_str(&body).unwrap_or_else(|_| form_fields(&body));
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
        "setwebhook" => {
            *inner.webhook.lock().unwrap() = Some(body);
            ok(json!(true))
        }
        "deletewebhook" => {
            *inner.webhook.lock().unwrap() = None;
            // What was waiting for the webhook is left for getUpdates.
            let waiting: Vec<Value> = inner.outgoing.lock().unwrap().drain(..).collect();
            inner.updates.lock().unwrap().extend(waiting);
            ok(json!(true))
        }
        "getupdates" if inner.webhook.lock().unwrap().is_some() => (
            StatusCode::CONFLICT,
            Json(json!({ "ok": false, "error_code": 409, "description": "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first" })),
        )
            .into_response(),
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
            let chat = body["chat_id"].as_i64().unwrap_or(0);
            let who = json!({ "id": user, "is_bot": false, "first_name": format!("user{user}") });
            if inner.admins.lock().unwrap().contains(&user) || inner.chat_admins.lock().unwrap().contains(&(chat, user)) {
                ok(json!({ "status": "creator", "user": who, "is_anonymous": false }))
            } else {
                ok(json!({ "status": "member", "user": who }))
            }
        }
        _ => (StatusCode::NOT_FOUND, Json(json!({ "ok": false, "error_code": 404, "description": "Not Found: method not found" })))
            .into_response(),
    }
}
