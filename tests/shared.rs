//! Moderation state shared through Redis: two daemons on one Redis agree
//! on `/mute` and rate limits, a restart keeps a mute, and a channel's
//! lease lets one daemon at a time handle its messages.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dialogd::context::redis::RedisStore;
use dialogd::context::{lease, ContextStore, Limits};
use dialogd_adapters::{Answer, ChannelKey, Core, Platform};

use crate::support::{daemon_toml, RedisServer, TestDaemon};

/// A moderator's command straight to a daemon's core (the HTTP adapter
/// has no moderators).
async fn moderate(d: &TestDaemon, channel: &str, text: &str) -> String {
    match d.pipeline.handle(crate::support::moderator_inbound(channel, "mod", text)).await.unwrap() {
        Answer::Reply(out) => out.text,
        other => panic!("{text}: {other:?}"),
    }
}

/// POSTs a message; returns the status and the JSON body.
async fn post(d: &TestDaemon, channel: &str, author: &str, text: &str) -> (u16, serde_json::Value) {
    let url = d.url(&format!("/v1/channels/{channel}/messages"));
    let response = d.http.post(url).json(&serde_json::json!({ "author": author, "text": text })).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_agree_on_mute_and_rate_limits_and_a_restart_keeps_a_mute() {
    let redis = RedisServer::start();
    let extra = [("rate_limit", "per_user = 3"), ("rate_limit", "per_channel = 0"), ("rate_limit", "window_secs = 600")];
    let toml = daemon_toml(Some(&redis), &extra);
    let (a, b) = (TestDaemon::start(&toml).await, TestDaemon::start(&toml).await);

    // Rate limits: ann's three messages, spread over both daemons, fill one
    // window; the fourth (on either) gets the one notice, the fifth is dropped.
    for (d, text) in [(&a, "one"), (&b, "two"), (&a, "three")] {
        let (status, body) = post(d, "busy", "ann", text).await;
        assert_eq!(status, 200, "{text}: {body}");
    }
    let (status, notice) = post(&b, "busy", "ann", "four").await;
    assert_eq!(status, 429, "{notice}");
    assert!(notice["error"].as_str().unwrap_or("").contains("faster than I can answer"), "{notice}");
    let (status, dropped) = post(&a, "busy", "ann", "five").await;
    assert_eq!(status, 429, "{dropped}");
    assert!(!dropped["error"].as_str().unwrap_or("").contains("faster than I can answer"), "one notice only: {dropped}");
    let (status, _) = post(&a, "busy", "bob", "hi").await;
    assert_eq!(status, 200, "another user is not limited");

    // A mute on one daemon silences the channel on the other.
    assert!(moderate(&a, "room", "/mute").await.starts_with("Muted"));
    let (status, muted) = post(&b, "room", "bob", "hello?").await;
    assert_eq!((status, muted["reason"].as_str()), (200, Some("muted")), "{muted}");
    let (_, other) = post(&b, "elsewhere", "bob", "hello?").await;
    assert!(other["reply"].is_string(), "only that channel is muted: {other}");

    // Both restart (well, stop; a new one starts): the mute holds.
    a.stop().await;
    b.stop().await;
    let c = TestDaemon::start(&toml).await;
    let (_, still) = post(&c, "room", "bob", "hello again?").await;
    assert_eq!(still["reason"], "muted", "{still}");
    assert!(moderate(&c, "room", "/unmute").await.starts_with("Unmuted"));
    let (_, back) = post(&c, "room", "bob", "there?").await;
    assert!(back["reply"].is_string(), "{back}");
    c.stop().await;
}

async fn store(redis: &RedisServer) -> Arc<RedisStore> {
    let metrics = dialogd::telemetry::Metrics::new();
    Arc::new(RedisStore::connect(&redis.url(), "dialogd", Limits::new(10, None), Duration::from_millis(500), metrics).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_lease_lets_one_daemon_at_a_time() {
    let redis = RedisServer::start();
    let (one, two) = (store(&redis).await, store(&redis).await);
    let channel = ChannelKey::new(Platform::Http, "ordered");
    // Two "daemons", each with five messages of one channel (one at a time,
    // as a daemon's queue runs them), at once; each message is 30 ms of
    // work renewing a 60 ms lease: their times never overlap.
    let spans: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let tasks: Vec<_> = [(one.clone(), "daemon-a"), (two.clone(), "daemon-b")]
        .into_iter()
        .map(|(s, holder)| {
            let (channel, spans) = (channel.clone(), spans.clone());
            tokio::spawn(async move {
                for _ in 0..5 {
                    let work = async {
                        let start = Instant::now();
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        spans.lock().unwrap().push((start, Instant::now()));
                    };
                    lease::exclusive(&*s, &channel, holder, Duration::from_millis(60), Duration::from_secs(20), work).await
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut spans = spans.lock().unwrap().clone();
    spans.sort();
    assert_eq!(spans.len(), 10);
    for pair in spans.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "two holders at once: {pair:?}");
    }
    let mut conn = redis.client();
    let left: i64 = redis::cmd("EXISTS").arg("dialogd:lease:http:ordered").query(&mut conn).unwrap();
    assert_eq!(left, 0, "the lease is given back");

    // A holder that died (never gives it back): the lease is free after its TTL.
    assert!(one.take_lease(&channel, "dead", Duration::from_millis(400)).await.unwrap());
    assert!(!two.take_lease(&channel, "daemon-b", Duration::from_millis(400)).await.unwrap());
    let waited = Instant::now();
    lease::exclusive(&*two, &channel, "daemon-b", Duration::from_secs(5), Duration::from_secs(20), async {}).await;
    assert!(waited.elapsed() >= Duration::from_millis(300), "ran under a dead holder's lease: {:?}", waited.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_waits_for_a_channel_another_daemon_holds() {
    let redis = RedisServer::start();
    let d = TestDaemon::start(&daemon_toml(Some(&redis), &[])).await;
    let (_, warm) = post(&d, "held", "ann", "hello").await;
    assert!(warm["reply"].is_string(), "{warm}");
    // Another daemon holds the channel for 800 ms: this one's message waits.
    let mut conn = redis.client();
    let _: () = redis::cmd("SET").arg("dialogd:lease:http:held").arg("other-daemon").arg("PX").arg(800).query(&mut conn).unwrap();
    let started = Instant::now();
    let (status, answer) = post(&d, "held", "ann", "and now?").await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["reply"].is_string(), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(600), "did not wait for the lease: {:?}", started.elapsed());
    // Another channel is not held up.
    let _: () = redis::cmd("SET").arg("dialogd:lease:http:held").arg("other-daemon").arg("PX").arg(5000).query(&mut conn).unwrap();
    let started = Instant::now();
    let (_, free) = post(&d, "free", "ann", "hi").await;
    assert!(free["reply"].is_string(), "{free}");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    d.stop().await;
}
