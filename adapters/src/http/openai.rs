//! The OpenAI-compatible API: `GET /v1/models` and `POST
//! /v1/chat/completions`, in OpenAI's JSON shapes, over [`Core::complete`].
//!
//! - Messages become turns, oldest first: `user` and `assistant` messages
//!   are the conversation's turns (DialoGPT does not tell speakers apart:
//!   turns simply alternate); `system` and `developer` messages are left
//!   out of the prompt (DialoGPT takes no instructions; the persona named
//!   by `model` sets the bot's character); any other role is refused. The
//!   last message must be the user's. Content is a string or a list of
//!   `text` parts (joined with spaces).
//! - `model` is the base model's id or a persona's name (`/v1/models`).
//! - `max_tokens` (or `max_completion_tokens`), `temperature` (0-2),
//!   `top_p` (0-1], `n`, `seed`, `stop` (a string or up to 4) and `user`
//!   are honoured; other fields are ignored, except `tools`, `functions`
//!   and `logprobs: true`, which are refused.
//! - `stream: true` answers with server-sent events: `chat.completion.chunk`
//!   objects and `data: [DONE]`. The generation pool gives back whole
//!   candidates (they must be screened and ranked before one is chosen),
//!   so the chunks are sent once the replies are chosen: the stream has
//!   OpenAI's shape, not token-by-token timing.
//! - Errors are `{"error": {"message", "type", "param", "code"}}`: 401
//!   (`invalid_api_key`), 400 (`invalid_request_error`; a conversation
//!   that fails the safety filter has `code: "content_filter"`), 404
//!   (`model_not_found`), 429 with `Retry-After` (`rate_limit_exceeded`),
//!   503 with `Retry-After` (busy, shutting down, unavailable).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{same_secret, AppState};
use crate::{ChatTurn, Completion, CompletionError, CompletionRequest, CoreError};

/// The most stop strings a request may give (OpenAI's limit).
const MAX_STOP: usize = 4;

/// An error in OpenAI's shape.
fn error(status: StatusCode, kind: &str, param: Option<&str>, code: Option<&str>, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "message": message.into(), "type": kind, "param": param, "code": code } });
    (status, Json(body)).into_response()
}

fn invalid(param: Option<&str>, message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", param, None, message)
}

fn with_retry_after(mut response: Response, secs: u64) -> Response {
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

fn core_error(err: CoreError) -> Response {
    match err {
        CoreError::RateLimited { notice, retry_after } => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            let message = notice.unwrap_or_else(|| format!("rate limited: try again in {secs} s"));
            with_retry_after(error(StatusCode::TOO_MANY_REQUESTS, "requests", None, Some("rate_limit_exceeded"), message), secs)
        }
        CoreError::Busy => {
            with_retry_after(error(StatusCode::SERVICE_UNAVAILABLE, "server_error", None, Some("overloaded"), err.to_string()), 1)
        }
        CoreError::ShuttingDown => {
            with_retry_after(error(StatusCode::SERVICE_UNAVAILABLE, "server_error", None, Some("shutting_down"), err.to_string()), 1)
        }
        CoreError::Unavailable(_) => {
            with_retry_after(error(StatusCode::SERVICE_UNAVAILABLE, "server_error", None, Some("unavailable"), err.to_string()), 1)
        }
        CoreError::Invalid(message) => invalid(None, message),
        CoreError::Internal(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None, err.to_string()),
    }
}

fn completion_error(err: CompletionError) -> Response {
    match err {
        CompletionError::Core(err) => core_error(err),
        CompletionError::UnknownModel(_) => {
            error(StatusCode::NOT_FOUND, "invalid_request_error", Some("model"), Some("model_not_found"), err.to_string())
        }
        CompletionError::ContentFilter(notice) => {
            error(StatusCode::BAD_REQUEST, "invalid_request_error", Some("messages"), Some("content_filter"), notice)
        }
        CompletionError::Invalid { param, message } => invalid(Some(param), message),
    }
}

/// The bearer token check of the OpenAI routes, answering in their shape.
pub(super) async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.expected_auth {
        let given = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
        if !same_secret(given, expected.as_bytes()) {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
                "missing or wrong API key: send Authorization: Bearer TOKEN",
            );
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `GET /v1/models`: the base model, then the personas.
pub(super) async fn list_models(State(state): State<AppState>) -> Response {
    match state.core.models().await {
        Ok(models) => {
            let data: Vec<Value> = models
                .iter()
                .map(|m| json!({ "id": m.id, "object": "model", "created": 0, "owned_by": if m.persona { "dialogd-persona" } else { "dialogd" } }))
                .collect();
            Json(json!({ "object": "list", "data": data })).into_response()
        }
        Err(err) => core_error(err),
    }
}

/// A message's `content`: a string, text parts, or nothing.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields of a chat completion request that dialogd reads; others are
/// ignored, as OpenAI-compatible servers do.
#[derive(Deserialize)]
pub(super) struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    logprobs: Option<bool>,
}

/// The request's conversation and options, checked; or the 400 that says
/// which field is wrong.
fn to_completion(body: ChatRequest) -> Result<CompletionRequest, Box<Response>> {
    let bad = |param: &str, message: String| Box::new(invalid(Some(param), message));
    for (param, given) in [("tools", body.tools.is_some()), ("functions", body.functions.is_some()), ("logprobs", body.logprobs == Some(true))] {
        if given {
            return Err(bad(param, format!("{param} is not supported by dialogd")));
        }
    }
    let mut turns = Vec::new();
    let mut last_role = "";
    for (i, message) in body.messages.into_iter().enumerate() {
        let text = match message.content {
            None => String::new(),
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut texts = Vec::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(text)) => texts.push(text),
                        (kind, _) => {
                            return Err(bad("messages", format!("messages[{i}]: content part {kind:?} is not supported (text only)")))
                        }
                    }
                }
                texts.join(" ")
            }
        };
        match message.role.as_str() {
            // DialoGPT takes no instructions: the persona (`model`) is the
            // way to give the bot a character.
            "system" | "developer" => continue,
            "user" | "assistant" => {}
            role => return Err(bad("messages", format!("messages[{i}]: role {role:?} is not supported (user, assistant, system)"))),
        }
        if text.trim().is_empty() {
            return Err(bad("messages", format!("messages[{i}]: content is empty")));
        }
        let bot = message.role == "assistant";
        last_role = if bot { "assistant" } else { "user" };
        turns.push(ChatTurn { text, bot });
    }
    if turns.is_empty() {
        return Err(bad("messages", "messages must hold at least one user message".into()));
    }
    if last_role != "user" {
        return Err(bad("messages", "the last message must be the user's: the bot answers it".into()));
    }
    let max_tokens = body.max_completion_tokens.or(body.max_tokens);
    if max_tokens == Some(0) {
        return Err(bad("max_tokens", "max_tokens must be at least 1".into()));
    }
    if let Some(t) = body.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(bad("temperature", format!("{t} is not in 0-2")));
        }
    }
    if let Some(p) = body.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(bad("top_p", format!("{p} is not in (0, 1]")));
        }
    }
    let n = body.n.unwrap_or(1);
    if n == 0 {
        return Err(bad("n", "n must be at least 1".into()));
    }
    let stop = match body.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(bad("stop", format!("stop takes up to {MAX_STOP} non-empty strings")));
    }
    if body.user.as_ref().is_some_and(|u| u.len() > super::MAX_ID_BYTES) {
        return Err(bad("user", format!("user must be at most {} bytes", super::MAX_ID_BYTES)));
    }
    Ok(CompletionRequest {
        model: body.model,
        turns,
        max_new_tokens: max_tokens.map(|t| usize::try_from(t).unwrap_or(usize::MAX)),
        temperature: body.temperature,
        top_p: body.top_p,
        n: usize::try_from(n).unwrap_or(usize::MAX),
        seed: body.seed,
        stop,
        user: body.user.filter(|u| !u.is_empty()),
    })
}

/// A fresh `chatcmpl-…` id.
fn completion_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("chatcmpl-{nanos:x}{:04x}", NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

fn usage(completion: &Completion) -> Value {
    json!({
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    })
}

/// `POST /v1/chat/completions`.
pub(super) async fn chat_completions(State(state): State<AppState>, body: Result<Json<ChatRequest>, JsonRejection>) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        // OpenAI answers 400 for every malformed body (axum: 415/422 too).
        Err(rejection) => return invalid(None, rejection.body_text()),
    };
    let (stream, include_usage) = (body.stream, body.stream_options.as_ref().is_some_and(|o| o.include_usage));
    let model = body.model.clone();
    let request = match to_completion(body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let completion = match state.core.complete(request).await {
        Ok(completion) => completion,
        Err(err) => return completion_error(err),
    };
    let (id, created) = (completion_id(), unix_now());
    if stream {
        return stream_response(id, created, model, completion, include_usage);
    }
    let choices: Vec<Value> = completion
        .choices
        .iter()
        .enumerate()
        .map(|(index, choice)| {
            json!({
                "index": index,
                "message": { "role": "assistant", "content": choice.text },
                "logprobs": null,
                "finish_reason": choice.finish.as_str(),
            })
        })
        .collect();
    Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(&completion),
        "system_fingerprint": null,
    }))
    .into_response()
}

/// The chosen replies as `chat.completion.chunk` events: per choice a role
/// chunk, its text a word at a time, a chunk with the finish reason; the
/// usage chunk when asked for; `[DONE]`.
fn stream_response(id: String, created: u64, model: String, completion: Completion, include_usage: bool) -> Response {
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut chunk = json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices });
        if include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        Event::default().data(chunk.to_string())
    };
    let mut events = Vec::new();
    for (index, choice) in completion.choices.iter().enumerate() {
        let delta = |delta: Value, finish: Option<&str>| json!([{ "index": index, "delta": delta, "logprobs": null, "finish_reason": finish }]);
        events.push(chunk(delta(json!({ "role": "assistant", "content": "" }), None), None));
        for piece in choice.text.split_inclusive(' ') {
            events.push(chunk(delta(json!({ "content": piece }), None), None));
        }
        events.push(chunk(delta(json!({}), Some(choice.finish.as_str())), None));
    }
    if include_usage {
        events.push(chunk(json!([]), Some(usage(&completion))));
    }
    events.push(Event::default().data("[DONE]"));
    let stream = futures_util::stream::iter(events.into_iter().map(Ok::<_, Infallible>));
    Sse::new(stream).into_response()
}
