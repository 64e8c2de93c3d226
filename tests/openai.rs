//! The OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`) of the
//! daemon in-process over real HTTP on loopback, on the pico model: shapes,
//! `n` choices, seeds, stop strings, the safety filter, errors in OpenAI's
//! shape and server-sent events.

use serde_json::{json, Value};

use crate::support::{daemon_toml, TestDaemon};

const PERSONA: &str = "defined = [{ name = \"pirate\", seed = [\"Ahoy! I sail the seven seas.\"] }]";

async fn post(d: &TestDaemon, body: Value) -> (u16, Value) {
    let response = d.http.post(d.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn hello(extra: Value) -> Value {
    let mut body = json!({ "model": "pirate", "messages": [
        { "role": "system", "content": "You are a helpful assistant." },
        { "role": "user", "content": "Hello, how are you?" },
        { "role": "assistant", "content": "I am fine." },
        { "role": "user", "content": [{ "type": "text", "text": "What do you like?" }] },
    ] });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

/// The OpenAI error shape, with this status, type and code.
fn assert_openai_error(status: u16, body: &Value, want_status: u16, kind: &str, code: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(error["type"], kind, "{body}");
    assert_eq!(error["code"].as_str(), code, "{body}");
    assert!(error.get("param").is_some(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_the_base_model_and_the_personas() {
    let d = TestDaemon::start(&daemon_toml(None, &[("personas", PERSONA)])).await;
    let body: Value = d.http.get(d.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    let base = crate::support::model_dir("pico-bin").display().to_string();
    assert_eq!(ids, [base.as_str(), "pirate"], "{body}");
    assert!(body["data"].as_array().unwrap().iter().all(|m| m["object"] == "model"), "{body}");
    // The base model's id answers too; an unknown model is a 404.
    let (status, answer) = post(&d, json!({ "model": base, "messages": [{ "role": "user", "content": "Hi" }] })).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = post(&d, hello(json!({ "model": "gpt-4o" }))).await;
    assert_openai_error(status, &answer, 404, "invalid_request_error", Some("model_not_found"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_answers_in_openai_shape_and_leaves_the_context_alone() {
    let d = TestDaemon::start(&daemon_toml(None, &[("personas", PERSONA)])).await;
    let (status, body) = post(&d, hello(json!({ "seed": 7, "user": "ann" }))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"), "{body}");
    assert_eq!(body["model"], "pirate");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1, "{body}");
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["role"], "assistant");
    let content = choices[0]["message"]["content"].as_str().unwrap();
    assert!(!content.trim().is_empty(), "{body}");
    assert!(["stop", "length"].contains(&choices[0]["finish_reason"].as_str().unwrap()), "{body}");
    let usage = &body["usage"];
    let (prompt, completion) = (usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap());
    // The persona's seed turn, two user turns and the assistant's.
    assert!(prompt > 12, "{body}");
    assert!((1..=16).contains(&completion), "{body}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);

    // The same seed and conversation give the same reply.
    let (_, again) = post(&d, hello(json!({ "seed": 7, "user": "ann" }))).await;
    assert_eq!(again["choices"][0]["message"]["content"], content, "{again}");
    // The persona is part of the prompt: the base model sees fewer tokens.
    let base = crate::support::model_dir("pico-bin").display().to_string();
    let (_, plain) = post(&d, hello(json!({ "seed": 7, "model": base }))).await;
    assert!(plain["usage"]["prompt_tokens"].as_u64().unwrap() < prompt, "{plain}");
    // max_tokens bounds the reply.
    let (_, short) = post(&d, hello(json!({ "seed": 7, "max_tokens": 2 }))).await;
    assert!(short["usage"]["completion_tokens"].as_u64().unwrap() <= 2, "{short}");

    // Stateless: no channel has turns, and the pipeline's counters moved.
    assert!(d.turns("openai:ann").await.is_empty());
    assert!(d.turns("openai:anonymous").await.is_empty());
    assert!(d.metric("dialogd_replies_total{platform=\"http\"}").await >= 4.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_gives_that_many_ranked_choices_up_to_the_candidates() {
    let d = TestDaemon::start(&daemon_toml(None, &[("generation", "candidates = 4")])).await;
    let base = crate::support::model_dir("pico-bin").display().to_string();
    let (status, body) = post(&d, hello(json!({ "model": base, "n": 2, "seed": 3 }))).await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{body}");
    assert_eq!(choices[1]["index"], 1);
    let texts: Vec<&str> = choices.iter().map(|c| c["message"]["content"].as_str().unwrap()).collect();
    assert_ne!(texts[0], texts[1], "choices are distinct candidates: {body}");
    // More choices than generation.candidates is refused by name.
    let (status, body) = post(&d, hello(json!({ "model": base, "n": 5 }))).await;
    assert_openai_error(status, &body, 400, "invalid_request_error", None);
    assert_eq!(body["error"]["param"], "n");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_reply() {
    let d = TestDaemon::start(&daemon_toml(None, &[])).await;
    let base = crate::support::model_dir("pico-bin").display().to_string();
    let (_, free) = post(&d, hello(json!({ "model": base, "seed": 11, "temperature": 0 }))).await;
    let content = free["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let words: Vec<&str> = content.split_whitespace().collect();
    assert!(words.len() >= 2, "the greedy reply is long enough to cut: {free}");
    let (_, cut) = post(&d, hello(json!({ "model": base, "seed": 11, "temperature": 0, "stop": [words[1]] }))).await;
    let cut_text = cut["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!cut_text.contains(words[1]) || words[0].contains(words[1]), "{cut}");
    assert!(content.starts_with(cut_text), "{cut_text:?} is not the start of {content:?}");
    assert_eq!(cut["choices"][0]["finish_reason"], "stop", "{cut}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toxic_conversation_is_refused_with_the_content_filter_code() {
    let d = TestDaemon::start(&daemon_toml(None, &[("safety", "blocked_words = [\"pineapple\"]")])).await;
    let base = crate::support::model_dir("pico-bin").display().to_string();
    // A blocked word in an earlier turn refuses the request too.
    for messages in [
        json!([{ "role": "user", "content": "I love pineapple" }]),
        json!([{ "role": "user", "content": "pineapple!" }, { "role": "assistant", "content": "ok" }, { "role": "user", "content": "Hi" }]),
    ] {
        let (status, body) = post(&d, json!({ "model": base, "messages": messages })).await;
        assert_openai_error(status, &body, 400, "invalid_request_error", Some("content_filter"));
        assert_eq!(body["error"]["message"], "Let's keep it friendly.", "the operator's notice: {body}");
        assert_eq!(body["error"]["param"], "messages");
    }
    assert_eq!(d.metric("dialogd_refusals_total{reason=\"toxic_input\"}").await, 2.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_missing_tokens_get_openai_errors() {
    let d = TestDaemon::start(&daemon_toml(None, &[("adapters.http", "token = \"s3cret\"")])).await;
    let base = crate::support::model_dir("pico-bin").display().to_string();
    let hi = json!({ "model": base, "messages": [{ "role": "user", "content": "Hi" }] });
    // No token, a wrong one: 401 in OpenAI's shape, on both paths.
    let response = d.http.post(d.url("/v1/chat/completions")).json(&hi).send().await.unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let status = response.status().as_u16();
    assert_openai_error(status, &response.json().await.unwrap(), 401, "invalid_request_error", Some("invalid_api_key"));
    let response = d.http.get(d.url("/v1/models")).bearer_auth("wrong").send().await.unwrap();
    let status = response.status().as_u16();
    assert_openai_error(status, &response.json().await.unwrap(), 401, "invalid_request_error", Some("invalid_api_key"));

    let send = |body: String| {
        d.http.post(d.url("/v1/chat/completions")).bearer_auth("s3cret").header("content-type", "application/json").body(body).send()
    };
    let ok = send(hi.to_string()).await.unwrap();
    assert_eq!(ok.status(), 200);
    let cases: [(String, Option<&str>); 6] = [
        ("{not json".into(), None),
        (json!({ "messages": [] }).to_string(), None),
        (json!({ "model": base, "messages": [] }).to_string(), Some("messages")),
        (json!({ "model": base, "messages": [{ "role": "user", "content": "Hi" }, { "role": "assistant", "content": "Yo" }] }).to_string(), Some("messages")),
        (json!({ "model": base, "messages": [{ "role": "tool", "content": "42" }] }).to_string(), Some("messages")),
        (json!({ "model": base, "temperature": 3, "messages": [{ "role": "user", "content": "Hi" }] }).to_string(), Some("temperature")),
    ];
    for (body, param) in cases {
        let response = send(body.clone()).await.unwrap();
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap();
        assert_openai_error(status, &answer, 400, "invalid_request_error", None);
        assert_eq!(answer["error"]["param"].as_str(), param, "{body} → {answer}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_callers_get_429_with_retry_after() {
    let d = TestDaemon::start(&daemon_toml(None, &[("rate_limit", "per_user = 1")])).await;
    let base = crate::support::model_dir("pico-bin").display().to_string();
    let hi = json!({ "model": base, "user": "bob", "messages": [{ "role": "user", "content": "Hi" }] });
    let (status, _) = post(&d, hi.clone()).await;
    assert_eq!(status, 200);
    let response = d.http.post(d.url("/v1/chat/completions")).json(&hi).send().await.unwrap();
    assert!(response.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let status = response.status().as_u16();
    assert_openai_error(status, &response.json().await.unwrap(), 429, "requests", Some("rate_limit_exceeded"));
    // Another caller is not limited by bob.
    let (status, _) = post(&d, json!({ "model": base, "user": "eve", "messages": [{ "role": "user", "content": "Hi" }] })).await;
    assert_eq!(status, 200);
    d.stop().await;
}

/// The `data:` payloads of a server-sent event stream, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect::<Vec<_>>().join("\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sends_chunks_then_done() {
    let d = TestDaemon::start(&daemon_toml(None, &[("personas", PERSONA)])).await;
    let (_, whole) = post(&d, hello(json!({ "seed": 5, "n": 2 }))).await;
    let response = d
        .http
        .post(d.url("/v1/chat/completions"))
        .json(&hello(json!({ "seed": 5, "n": 2, "stream": true, "stream_options": { "include_usage": true } })))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse_data(&response.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "pirate"), "{chunks:?}");
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]), "one id for the stream");
    // Each choice: the role first, the text in pieces, the finish reason
    // last; together the same replies as without streaming.
    for index in 0..2 {
        let mine: Vec<&Value> =
            chunks.iter().filter_map(|c| c["choices"].as_array()?.iter().find(|ch| ch["index"] == index)).collect();
        assert_eq!(mine[0]["delta"]["role"], "assistant");
        let text: String = mine.iter().filter_map(|ch| ch["delta"]["content"].as_str()).collect();
        assert_eq!(text, whole["choices"][index]["message"]["content"].as_str().unwrap(), "choice {index}");
        let last = mine.last().unwrap();
        assert_eq!(last["finish_reason"], whole["choices"][index]["finish_reason"]);
        assert!(mine[..mine.len() - 1].iter().all(|ch| ch["finish_reason"].is_null()));
    }
    // The usage chunk comes last, with no choices.
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    d.stop().await;
}
