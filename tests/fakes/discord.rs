//! A fake Discord on loopback: the REST API (reached through serenity's
//! proxy setting, rate limiter off) and the gateway WebSocket.
//!
//! REST: `GET /api/v10/gateway` (points at the fake gateway), command
//! registration, typing, `POST …/messages`, interaction callbacks and
//! follow-ups, `GET /channels/{id}` (a text channel, or a thread of a
//! parent the test named); a test can script failures (429, 5xx) of
//! message posts, and
//! 429s of any call with the waits Discord's answers carry (body
//! `retry_after`, `Retry-After`, `X-RateLimit-Reset-After`, the global
//! flag). Every call is recorded with the time it arrived.
//! Gateway: Hello, Identify → Ready (session `fake-session`; a wrong token
//! is closed with 4004, refused intents with 4014), heartbeats,
//! Resume → Resumed with the events missed meanwhile replayed; a test
//! queues dispatches and can close the connection (code 4000) to force a
//! resume.
//! Shards: Identify's `shard` array ([0, 1] when absent) is honoured: Ready
//! lists the shard's guilds and carries its `shard`, and each dispatch goes
//! only to the connection of the shard that owns it, by Discord's formula
//! `(guild_id >> 22) % num_shards` (no guild: shard 0, as DMs are), also
//! when missed events are replayed after a resume. `GET /gateway/bot`
//! asks for the bot token and recommends [`FakeDiscord::recommend_shards`]
//! shards (1 unless a test says otherwise).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as Frame;

pub const BOT_ID: u64 = 700;
pub const APP_ID: u64 = 701;
pub const GUILD: u64 = 900;

/// What a scripted 429 answer says (each part optional, as Discord's
/// answers vary).
#[derive(Debug, Clone, Default)]
pub struct Limit {
    /// The JSON body's `retry_after`, in seconds.
    pub body_retry_after: Option<f64>,
    /// The `Retry-After` header.
    pub retry_after: Option<&'static str>,
    /// The `X-RateLimit-Reset-After` header.
    pub reset_after: Option<&'static str>,
    /// A global limit (body `global` and `X-RateLimit-Global`).
    pub global: bool,
}

/// What the gateway connection task is told to do.
enum Command {
    Send(Value),
    Close,
}

#[derive(Default)]
struct Inner {
    token: String,
    /// Refuse the intents Identify asks for (close 4014, as Discord does
    /// when the Message Content intent is not enabled for the bot).
    refuse_intents: std::sync::atomic::AtomicBool,
    ws_url: Mutex<String>,
    /// Every REST call: (method, path, body, when it arrived).
    calls: Mutex<Vec<(String, String, Value, Instant)>>,
    /// Scripted statuses for the next message posts.
    failures: Mutex<VecDeque<u16>>,
    /// Scripted 429s: (method, path suffix, what the answer says).
    limits: Mutex<Vec<(String, String, Limit)>>,
    /// Every gateway payload the client sent (op, d).
    received: Mutex<Vec<Value>>,
    /// Dispatches sent so far, with their sequence numbers (for replay).
    dispatched: Mutex<Vec<Value>>,
    seq: AtomicU64,
    next_id: AtomicU64,
    /// The live connections' command channels, with their shard
    /// ([id, total]) once identified or resumed.
    connection: Mutex<Vec<Connection>>,
    connections: AtomicU64,
    /// The bot's guilds (the shard that owns each is computed).
    guilds: Mutex<Vec<u64>>,
    /// What `GET /gateway/bot` recommends.
    recommended: AtomicU64,
    /// Threads: thread id → parent channel id.
    threads: Mutex<std::collections::HashMap<u64, u64>>,
}

struct Connection {
    id: u64,
    shard: Option<(u64, u64)>,
    commands: mpsc::UnboundedSender<Command>,
}

/// Whether shard `(id, total)` receives an event of `guild` (none: a DM).
fn owns((id, total): (u64, u64), guild: Option<u64>) -> bool {
    guild.map_or(id == 0, |guild| (guild >> 22) % total.max(1) == id)
}

/// The guild a dispatch belongs to: its `guild_id`, or a guild's own id.
fn guild_of(kind: &str, data: &Value) -> Option<u64> {
    let id = if kind == "GUILD_CREATE" { &data["id"] } else { &data["guild_id"] };
    id.as_str().and_then(|id| id.parse().ok())
}

/// A shard's session id (resumes find their shard by it).
fn session_of((id, total): (u64, u64)) -> String {
    if total == 1 { "fake-session".into() } else { format!("fake-session-{id}-{total}") }
}

fn shard_of_session(session: &str) -> (u64, u64) {
    let parts: Vec<u64> = session.strip_prefix("fake-session-").unwrap_or("").split('-').filter_map(|n| n.parse().ok()).collect();
    match parts[..] {
        [id, total] => (id, total),
        _ => (0, 1),
    }
}

#[derive(Clone)]
pub struct FakeDiscord {
    /// What serenity's `proxy` setting should be.
    pub rest_url: String,
    inner: Arc<Inner>,
}

impl FakeDiscord {
    pub async fn start(token: &str) -> Self {
        let inner = Arc::new(Inner {
            token: token.into(),
            next_id: AtomicU64::new(10_000),
            guilds: Mutex::new(vec![GUILD]),
            recommended: AtomicU64::new(1),
            ..Default::default()
        });
        let gateway = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        *inner.ws_url.lock().unwrap() = format!("ws://{}", gateway.local_addr().unwrap());
        tokio::spawn(accept_gateway(gateway, inner.clone()));
        let app = axum::Router::new().fallback(rest).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rest_url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { rest_url, inner }
    }

    /// Identify is answered with close 4014 (disallowed intents) from now on.
    pub fn refuse_intents(&self) {
        self.inner.refuse_intents.store(true, Ordering::SeqCst);
    }

    pub fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::SeqCst)
    }

    /// Sends a dispatch event on the gateway connection of the shard that
    /// owns it (and keeps it for the replay after a resume when that shard
    /// is not connected).
    pub fn dispatch(&self, kind: &str, data: Value) {
        let seq = self.inner.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let guild = guild_of(kind, &data);
        let event = json!({ "op": 0, "t": kind, "s": seq, "d": data });
        self.inner.dispatched.lock().unwrap().push(event.clone());
        for connection in self.inner.connection.lock().unwrap().iter() {
            if connection.shard.is_some_and(|shard| owns(shard, guild)) {
                let _ = connection.commands.send(Command::Send(event.clone()));
            }
        }
    }

    /// Closes every gateway connection with code 4000 (a resumable close).
    pub fn disconnect(&self) {
        for connection in self.inner.connection.lock().unwrap().drain(..) {
            let _ = connection.commands.send(Command::Close);
        }
    }

    /// Adds a guild the bot is in (listed in its shard's Ready).
    pub fn add_guild(&self, guild: u64) {
        self.inner.guilds.lock().unwrap().push(guild);
    }

    /// What `GET /gateway/bot` recommends from now on.
    pub fn recommend_shards(&self, shards: u64) {
        self.inner.recommended.store(shards, Ordering::SeqCst);
    }

    /// The `shard` arrays the Identify payloads carried, in order.
    pub fn identified_shards(&self) -> Vec<Value> {
        self.received(2).iter().map(|p| p["d"]["shard"].clone()).collect()
    }

    /// Makes `thread` a public thread of `parent` (for `GET /channels`).
    pub fn add_thread(&self, thread: u64, parent: u64) {
        self.inner.threads.lock().unwrap().insert(thread, parent);
    }

    pub fn fail_next_posts(&self, statuses: &[u16]) {
        self.inner.failures.lock().unwrap().extend(statuses);
    }

    /// Answers the next `method` call whose path ends with `suffix` with a
    /// 429 saying `limit`.
    pub fn rate_limit_next(&self, method: &str, suffix: &str, limit: Limit) {
        self.inner.limits.lock().unwrap().push((method.into(), suffix.into(), limit));
    }

    /// When each `method` call whose path ends with `suffix` arrived, and
    /// whether it was answered with a scripted failure.
    pub fn call_times(&self, method: &str, suffix: &str) -> Vec<(Instant, bool)> {
        let calls = self.inner.calls.lock().unwrap();
        calls.iter().filter(|(m, p, _, _)| m == method && p.ends_with(suffix)).map(|(_, _, b, t)| (*t, b.get("_failed").is_some())).collect()
    }

    /// Gateway payloads with this op code the client sent.
    pub fn received(&self, op: u64) -> Vec<Value> {
        self.inner.received.lock().unwrap().iter().filter(|p| p["op"] == op).cloned().collect()
    }

    pub fn connections(&self) -> u64 {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// REST calls whose path ends with `suffix` (method, body).
    pub fn calls(&self, method: &str, suffix: &str) -> Vec<Value> {
        self.inner
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p, _, _)| m == method && p.ends_with(suffix))
            .map(|(_, _, b, _)| b.clone())
            .collect()
    }

    /// Messages the bot posted to `channel` successfully.
    pub fn posted(&self, channel: u64) -> Vec<Value> {
        self.calls("POST", &format!("/channels/{channel}/messages")).into_iter().filter(|b| b.get("_failed").is_none()).collect()
    }

    /// Follow-ups of interactions (slash command answers).
    pub fn followups(&self) -> Vec<Value> {
        self.calls("POST", &format!("/webhooks/{APP_ID}/itoken"))
    }
}

pub fn user(id: u64, name: &str, bot: bool) -> Value {
    json!({ "id": id.to_string(), "username": name, "discriminator": "0", "global_name": null, "avatar": null, "bot": bot, "public_flags": 0 })
}

/// A MESSAGE_CREATE payload: `guild` None is a DM.
pub fn message(id: u64, channel: u64, guild: Option<u64>, author: u64, content: &str, mentions: Vec<Value>, referenced: Option<Value>) -> Value {
    let mut m = json!({
        "id": id.to_string(),
        "channel_id": channel.to_string(),
        "author": user(author, &format!("user{author}"), author == BOT_ID),
        "content": content,
        "timestamp": "2024-01-01T00:00:00.000000+00:00",
        "edited_timestamp": null,
        "tts": false,
        "mention_everyone": false,
        "mentions": mentions,
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": false,
        "type": if referenced.is_some() { 19 } else { 0 },
        "flags": 0,
        "components": [],
    });
    if let Some(guild) = guild {
        m["guild_id"] = json!(guild.to_string());
        m["member"] = json!({ "roles": [], "joined_at": "2024-01-01T00:00:00+00:00", "deaf": false, "mute": false, "flags": 0 });
    }
    if let Some(original) = referenced {
        m["message_reference"] = json!({ "message_id": original["id"], "channel_id": original["channel_id"] });
        m["referenced_message"] = original;
    }
    m
}

/// A MESSAGE_UPDATE payload: message `id` now reads `content`.
pub fn edited(id: u64, channel: u64, guild: Option<u64>, author: u64, content: &str) -> Value {
    let mut m = message(id, channel, guild, author, content, vec![], None);
    m["edited_timestamp"] = json!("2024-01-01T00:01:00.000000+00:00");
    m
}

/// An INTERACTION_CREATE payload for a slash command in the guild.
pub fn slash_command(id: u64, channel: u64, author: u64, permissions: &str, name: &str, option: Option<(&str, &str)>) -> Value {
    let options: Vec<Value> = option.map(|(k, v)| json!({ "name": k, "type": 3, "value": v })).into_iter().collect();
    json!({
        "id": id.to_string(),
        "application_id": APP_ID.to_string(),
        "type": 2,
        "data": { "id": "5000", "name": name, "type": 1, "options": options },
        "guild_id": GUILD.to_string(),
        "channel_id": channel.to_string(),
        "member": {
            "user": user(author, &format!("user{author}"), false),
            "roles": [], "permissions": permissions, "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": false, "mute": false, "flags": 0
        },
        "token": "itoken",
        "version": 1,
        "app_permissions": "0",
        "locale": "en-US",
        "guild_locale": "en-US",
        "entitlements": [],
        "attachment_size_limit": 10485760,
    })
}

async fn rest(State(inner): State<Arc<Inner>>, method: Method, uri: Uri, headers: HeaderMap, body: String) -> Response {
    let path = uri.path().to_string();
    let mut body: Value = serde_json::from_str(&body).unwrap_or(json!({}));
    let method = method.as_str().to_string();
    if path == "/api/v10/gateway" || path == "/api/v10/gateway/bot" {
        // `/gateway/bot` wants the bot's token, as Discord's does.
        let authorized = headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bot {}", inner.token));
        if path.ends_with("/bot") && !authorized {
            return (StatusCode::UNAUTHORIZED, Json(json!({ "message": "401: Unauthorized", "code": 0 }))).into_response();
        }
        let url = inner.ws_url.lock().unwrap().clone();
        let shards = inner.recommended.load(Ordering::SeqCst);
        return Json(json!({ "url": url, "shards": shards, "session_start_limit": { "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1 } })).into_response();
    }
    let now = Instant::now();
    let limit = {
        let mut limits = inner.limits.lock().unwrap();
        let at = limits.iter().position(|(m, suffix, _)| *m == method && path.ends_with(suffix.as_str()));
        at.map(|at| limits.remove(at).2)
    };
    if let Some(limit) = limit {
        // Command registrations send an array: keep it under `_body`.
        if !body.is_object() {
            body = json!({ "_body": body });
        }
        body["_failed"] = json!(429);
        inner.calls.lock().unwrap().push((method, path, body, now));
        let mut answer = json!({ "message": "You are being rate limited.", "global": limit.global });
        if let Some(after) = limit.body_retry_after {
            answer["retry_after"] = json!(after);
        }
        let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(answer)).into_response();
        let headers = response.headers_mut();
        if let Some(after) = limit.retry_after {
            headers.insert("retry-after", after.parse().unwrap());
        }
        if let Some(after) = limit.reset_after {
            headers.insert("x-ratelimit-reset-after", after.parse().unwrap());
        }
        if limit.global {
            headers.insert("x-ratelimit-global", "true".parse().unwrap());
        }
        return response;
    }
    let posting = method == "POST" && (path.ends_with("/messages") || path.contains("/webhooks/"));
    if posting {
        if let Some(status) = inner.failures.lock().unwrap().pop_front() {
            body["_failed"] = json!(status);
            inner.calls.lock().unwrap().push((method, path, body, now));
            let answer = if status == 429 {
                json!({ "message": "You are being rate limited.", "retry_after": 0.2, "global": false })
            } else {
                json!({ "message": "Internal Server Error", "code": 0 })
            };
            return (StatusCode::from_u16(status).unwrap(), [("retry-after", "1")], Json(answer)).into_response();
        }
    }
    inner.calls.lock().unwrap().push((method.clone(), path.clone(), body.clone(), now));
    if method == "PUT" && path.ends_with("/commands") {
        return Json(json!([])).into_response();
    }
    if method == "GET" && path.starts_with("/api/v10/channels/") && path.matches('/').count() == 4 {
        let id: u64 = path.rsplit('/').next().and_then(|c| c.parse().ok()).unwrap_or(0);
        let parent = inner.threads.lock().unwrap().get(&id).copied();
        let mut channel = json!({
            "id": id.to_string(), "type": 0, "guild_id": GUILD.to_string(), "name": format!("channel{id}"),
            "position": 0, "permission_overwrites": [], "nsfw": false,
        });
        if let Some(parent) = parent {
            channel["type"] = json!(11);
            channel["parent_id"] = json!(parent.to_string());
            channel["owner_id"] = json!("1");
            channel["thread_metadata"] = json!({ "archived": false, "auto_archive_duration": 1440, "archive_timestamp": "2024-01-01T00:00:00+00:00", "locked": false });
            channel["message_count"] = json!(1);
            channel["member_count"] = json!(1);
        }
        return Json(channel).into_response();
    }
    if path.ends_with("/typing") || path.ends_with("/callback") {
        return StatusCode::NO_CONTENT.into_response();
    }
    if posting {
        let channel = path.split('/').nth(4).and_then(|c| c.parse::<u64>().ok()).unwrap_or(1);
        let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
        let mut posted = message(id, channel, None, BOT_ID, body["content"].as_str().unwrap_or(""), vec![], None);
        posted["author"] = user(BOT_ID, "dialogd", true);
        return Json(posted).into_response();
    }
    (StatusCode::NOT_FOUND, Json(json!({ "message": "404: Not Found", "code": 0 }))).into_response()
}

async fn accept_gateway(listener: tokio::net::TcpListener, inner: Arc<Inner>) {
    while let Ok((stream, _)) = listener.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let Ok(socket) = tokio_tungstenite::accept_async(stream).await else { return };
            let id = inner.connections.fetch_add(1, Ordering::SeqCst);
            serve_gateway(socket, inner.clone(), id).await;
            inner.connection.lock().unwrap().retain(|c| c.id != id);
        });
    }
}

/// Sets the shard of connection `id`.
fn identify_as(inner: &Inner, id: u64, shard: (u64, u64)) {
    for connection in inner.connection.lock().unwrap().iter_mut().filter(|c| c.id == id) {
        connection.shard = Some(shard);
    }
}

async fn serve_gateway(socket: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, inner: Arc<Inner>, id: u64) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    inner.connection.lock().unwrap().push(Connection { id, shard: None, commands: tx });
    let hello = json!({ "op": 10, "d": { "heartbeat_interval": 41250 } });
    if sink.send(Frame::Text(hello.to_string())).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            command = rx.recv() => match command {
                Some(Command::Send(event)) => {
                    if sink.send(Frame::Text(event.to_string())).await.is_err() { return; }
                }
                Some(Command::Close) | None => {
                    let frame = CloseFrame { code: CloseCode::Library(4000), reason: "fake disconnect".into() };
                    let _ = sink.send(Frame::Close(Some(frame))).await;
                    return;
                }
            },
            frame = stream.next() => {
                let Some(Ok(frame)) = frame else { return };
                let Frame::Text(text) = frame else { continue };
                let Ok(payload) = serde_json::from_str::<Value>(&text) else { continue };
                // The connection's shard is known before the test sees the
                // Identify (or Resume) and dispatches.
                let shard = match payload["op"].as_u64() {
                    Some(2) => {
                        let pair = payload["d"]["shard"].as_array().and_then(|s| Some((s.first()?.as_u64()?, s.get(1)?.as_u64()?)));
                        Some(pair.unwrap_or((0, 1)))
                    }
                    Some(6) => Some(shard_of_session(payload["d"]["session_id"].as_str().unwrap_or(""))),
                    _ => None,
                };
                if let Some(shard) = shard {
                    identify_as(&inner, id, shard);
                }
                inner.received.lock().unwrap().push(payload.clone());
                let replies: Vec<Value> = match payload["op"].as_u64() {
                    Some(1) => vec![json!({ "op": 11 })],
                    Some(2) => {
                        let token = payload["d"]["token"].as_str().unwrap_or("");
                        // Discord's closes for a bad token and for intents
                        // the bot may not have.
                        let refusal = if token.trim_start_matches("Bot ") != inner.token {
                            Some((4004, "Authentication failed."))
                        } else if inner.refuse_intents.load(Ordering::SeqCst) {
                            Some((4014, "Disallowed intent(s)."))
                        } else {
                            None
                        };
                        if let Some((code, reason)) = refusal {
                            let frame = CloseFrame { code: CloseCode::Library(code), reason: reason.into() };
                            let _ = sink.send(Frame::Close(Some(frame))).await;
                            return;
                        }
                        let shard = shard.unwrap_or((0, 1));
                        let guilds: Vec<Value> = inner.guilds.lock().unwrap().iter().filter(|g| owns(shard, Some(**g)))
                            .map(|g| json!({ "id": g.to_string(), "unavailable": true })).collect();
                        let seq = inner.seq.fetch_add(1, Ordering::SeqCst) + 1;
                        let url = inner.ws_url.lock().unwrap().clone();
                        vec![json!({ "op": 0, "t": "READY", "s": seq, "d": {
                            "v": 10,
                            "user": { "id": BOT_ID.to_string(), "username": "dialogd", "discriminator": "0", "global_name": null,
                                      "avatar": null, "bot": true, "verified": true, "mfa_enabled": false, "flags": 0 },
                            "guilds": guilds,
                            "session_id": session_of(shard),
                            "resume_gateway_url": url,
                            "shard": [shard.0, shard.1],
                            "application": { "id": APP_ID.to_string(), "flags": 0 },
                            "private_channels": [], "relationships": [], "presences": [], "geo_ordered_rtc_regions": []
                        }})]
                    }
                    Some(6) => {
                        // Replay what the client missed, then RESUMED.
                        let since = payload["d"]["seq"].as_u64().unwrap_or(0);
                        let shard = shard.unwrap_or((0, 1));
                        let mut missed: Vec<Value> = inner.dispatched.lock().unwrap().iter()
                            .filter(|e| e["s"].as_u64().unwrap() > since && owns(shard, guild_of(e["t"].as_str().unwrap_or(""), &e["d"])))
                            .cloned().collect();
                        let seq = inner.seq.fetch_add(1, Ordering::SeqCst) + 1;
                        missed.push(json!({ "op": 0, "t": "RESUMED", "s": seq, "d": {} }));
                        missed
                    }
                    _ => vec![],
                };
                for reply in replies {
                    if sink.send(Frame::Text(reply.to_string())).await.is_err() { return; }
                }
            }
        }
    }
}
