//! The daemon in-process over real HTTP on loopback, with a real
//! redis-server and the pico model: the HTTP API, commands, duplicates,
//! per-channel order, Redis outages and a load run.

use std::collections::HashSet;
use std::time::Duration;

use dialogd_adapters::{Answer, ChannelKey, Core, Inbound, Platform};
use serde_json::Value;

use crate::support::{self, daemon_toml, parse_exposition, RedisServer, TestDaemon};

/// `/metrics` is valid Prometheus text with every documented family, the
/// pool's included (a parser would refuse the whole scrape over one bad
/// line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_exposition_parses() {
    let d = TestDaemon::start(&daemon_toml(None, &[])).await;
    let (status, body) = d.say("metrics", "ann", "Hello there", None).await;
    assert_eq!(status, 200, "{body}");
    let text = d.http.get(&d.metrics_url).send().await.unwrap().text().await.unwrap();
    let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    for wanted in [
        "dialogd_messages_in_total{platform=\"http\"}",
        "dialogd_messages_out_total{platform=\"telegram\"}",
        "dialogd_replies_total{platform=\"http\"}",
        "dialogd_refusals_total{reason=\"invalid\"}",
        "dialogd_generation_seconds_bucket{le=\"+Inf\"}",
        "dialogd_pool_tokens_total",
        "dialogd_time_to_first_token_seconds_count",
        "dialogd_store_up",
    ] {
        assert!(samples.iter().any(|s| s == wanted), "{wanted} missing from\n{text}");
    }
    assert!(samples.iter().any(|s| s.starts_with("dialogd_build_info{")), "no build info in\n{text}");
    if cfg!(target_os = "linux") {
        assert!(samples.iter().any(|s| s == "process_cpu_seconds_total"), "no process metrics in\n{text}");
    }
    assert_eq!(d.metric("dialogd_messages_in_total").await, 1.0);
    assert_eq!(d.metric("dialogd_messages_in_total{platform=\"http\"}").await, 1.0);
    assert_eq!(d.metric("dialogd_messages_in_total{platform=\"discord\"}").await, 0.0);

    // Prometheus asks for OpenMetrics and gets it: counters described
    // without `_total`, the same samples, and the closing `# EOF`.
    let open = d.http.get(&d.metrics_url).header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5").send().await.unwrap();
    assert_eq!(open.headers()["content-type"], "application/openmetrics-text; version=1.0.0; charset=utf-8");
    let open = open.text().await.unwrap();
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(open.contains("# TYPE dialogd_messages_in counter\ndialogd_messages_in_total{"), "{open}");
    assert!(text.contains("# TYPE dialogd_messages_in_total counter\n"), "{text}");

    // promtool's linter, where it is installed (.ci/run installs it).
    support::promtool_check(&text);
    for bad in ["dialogd_x 1 2", "dialogd_y{a=\"1\" 3", "# TYPE dialogd_z counter\ndialogd_z{a=1} 1", "dialogd_w 1"] {
        assert!(parse_exposition(bad).is_err(), "{bad:?} must not parse");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_round_trips_through_the_context() {
    let redis = RedisServer::start();
    let d = TestDaemon::start(&daemon_toml(Some(&redis), &[])).await;
    let health = d.health().await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["health"]["store"], "redis");
    assert_eq!(health["health"]["store_up"], true);

    let (status, first) = d.say("kitchen", "ann", "Does money buy happiness?", Some("1")).await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = d.say("kitchen", "bob", "What about love?", None).await;
    assert_eq!(status, 200, "{second}");
    let turns = d.turns("kitchen").await;
    let authors: Vec<(&str, bool)> = turns.iter().map(|(a, _, b)| (a.as_str(), *b)).collect();
    assert_eq!(authors, [("ann", false), ("bot", true), ("bob", false), ("bot", true)]);
    assert_eq!(turns[0].1, "Does money buy happiness?");
    assert_eq!(turns[1].1, first["reply"].as_str().unwrap());
    assert_eq!(turns[3].1, second["reply"].as_str().unwrap());
    // Another channel has its own context.
    assert!(d.turns("hall").await.is_empty());

    let response = d.http.delete(d.url("/v1/channels/kitchen/context")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(d.turns("kitchen").await.is_empty());
    assert_eq!(d.metric("dialogd_replies_total").await, 2.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_twice_is_answered_once() {
    let redis = RedisServer::start();
    let d = TestDaemon::start(&daemon_toml(Some(&redis), &[])).await;
    let (_, first) = d.say("c", "ann", "hello there", Some("msg-42")).await;
    assert!(first["reply"].is_string(), "{first}");
    let (status, again) = d.say("c", "ann", "hello there", Some("msg-42")).await;
    assert_eq!(status, 200);
    assert_eq!(again, serde_json::json!({ "reply": null, "reason": "duplicate" }));
    assert_eq!(d.turns("c").await.len(), 2);
    assert_eq!(d.metric("dialogd_refusals_total{reason=\"duplicate\"}").await, 1.0);
    d.stop().await;
}

/// A command delivered twice runs once, like a message (a re-delivered
/// `/train` would queue a second job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_runs_once() {
    let redis = RedisServer::start();
    let d = TestDaemon::start(&daemon_toml(Some(&redis), &[])).await;
    d.say("cmd", "ann", "hello there", Some("m-1")).await;
    let (_, first) = d.say("cmd", "ann", "/reset", Some("m-2")).await;
    assert!(first["reply"].as_str().unwrap_or_default().contains("forgotten"), "{first}");
    d.say("cmd", "ann", "hello again", Some("m-3")).await;
    let (status, again) = d.say("cmd", "ann", "/reset", Some("m-2")).await;
    assert_eq!(status, 200);
    assert_eq!(again, serde_json::json!({ "reply": null, "reason": "duplicate" }));
    // The second delivery did not reset: the later turn is still there.
    assert_eq!(d.turns("cmd").await.first().map(|t| t.1.clone()).as_deref(), Some("hello again"));
    // Without an id a command runs each time.
    let (_, help) = d.say("cmd", "ann", "/help", None).await;
    let (_, help_again) = d.say("cmd", "ann", "/help", None).await;
    assert!(help["reply"].is_string() && help == help_again, "{help} {help_again}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reset_forget_and_help() {
    let redis = RedisServer::start();
    let d = TestDaemon::start(&daemon_toml(Some(&redis), &[])).await;
    d.say("a", "ann", "hi from ann", None).await;
    d.say("a", "bob", "hi from bob", None).await;
    d.say("b", "ann", "ann elsewhere", None).await;
    let (_, help) = d.say("a", "ann", "/help", None).await;
    assert!(help["reply"].as_str().unwrap().contains("/reset"), "{help}");
    let (_, forget) = d.say("a", "ann", "/forget", None).await;
    assert!(forget["reply"].as_str().unwrap().contains("deleted 4"), "{forget}");
    let left: Vec<String> = d.turns("a").await.into_iter().map(|(a, _, _)| a).collect();
    assert_eq!(left, ["bob", "bot"]);
    assert!(d.turns("b").await.is_empty());
    d.say("a", "bob", "/reset", None).await;
    assert!(d.turns("a").await.is_empty());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors() {
    let extra = [("adapters.http", "token = \"s3cret-token\""), ("adapters.http", "max_body_bytes = 2048")];
    let d = TestDaemon::start(&daemon_toml(None, &extra)).await;
    let post = |body: String, auth: Option<&str>| {
        let mut request = d
            .http
            .post(d.url("/v1/channels/c1/messages"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    let good = r#"{"author":"ann","text":"hi"}"#.to_string();
    let bearer = Some("Bearer s3cret-token");
    let cases: Vec<(String, Option<&str>, u16)> = vec![
        (good.clone(), None, 401),
        (good.clone(), Some("Bearer wrong"), 401),
        (good.clone(), Some("s3cret-token"), 401),
        ("{\"author\":".into(), bearer, 400),
        ("not json".into(), bearer, 400),
        (r#"{"author":"ann"}"#.into(), bearer, 422),
        (r#"{"author":"ann","text":"  "}"#.into(), bearer, 400),
        (format!(r#"{{"author":"ann","text":"{}"}}"#, "x".repeat(4096)), bearer, 413),
        (good.clone(), bearer, 200),
    ];
    for (body, auth, want) in cases {
        let response = post(body.clone(), auth).await.unwrap();
        let status = response.status().as_u16();
        let json: Value = response.json().await.unwrap_or_else(|e| panic!("{want}: body not JSON: {e}"));
        assert_eq!(status, want, "{auth:?} {}: {json}", &body[..body.len().min(40)]);
        if want != 200 {
            assert!(json["error"].is_string(), "{json}");
        }
    }
    let response = d.http.get(d.url("/v1/channels/bad%20name/context")).header("authorization", "Bearer s3cret-token").send().await.unwrap();
    assert_eq!(response.status(), 400);
    let response = d.http.get(d.url("/v1/channels/c1/context")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    // Health needs no token.
    assert_eq!(d.health().await["status"], "ok");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_channel_keeps_its_order_under_concurrency() {
    let redis = RedisServer::start();
    let d = TestDaemon::start(&daemon_toml(Some(&redis), &[("context", "max_turns = 200")])).await;
    // Every message of every channel is handed over at once, without
    // waiting for answers: per channel they must be answered in order.
    let (channels, per_channel) = (6, 8);
    let mut pending = Vec::new();
    for m in 0..per_channel {
        for c in 0..channels {
            let inbound = Inbound {
                channel: ChannelKey::new(Platform::Http, format!("order-{c}")),
                author: format!("user-{c}"),
                text: format!("message {m} of channel {c}"),
                msg_id: Some(format!("{c}-{m}")),
                addressed_to_bot: true,
                moderator: false,
                operator: false,
                group: None,
                edit: None,
            };
            pending.push(d.pipeline.handle(inbound));
        }
    }
    for answer in futures_join(pending).await {
        assert!(matches!(answer, Ok(Answer::Reply(_))), "{answer:?}");
    }
    for c in 0..channels {
        let turns = d.turns(&format!("order-{c}")).await;
        let asked: Vec<String> = turns.iter().filter(|t| !t.2).map(|t| t.1.clone()).collect();
        let want: Vec<String> = (0..per_channel).map(|m| format!("message {m} of channel {c}")).collect();
        assert_eq!(asked, want);
        // Each bot turn follows the message it answers (an empty reply stores none).
        assert!(!turns[0].2 && turns.windows(2).all(|w| !(w[0].2 && w[1].2)), "{turns:?}");
    }
    d.stop().await;
}

/// Awaits every future, concurrently, keeping their order.
async fn futures_join<T: Send + 'static>(futures: Vec<dialogd_adapters::BoxFuture<'static, T>>) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_keeps_serving_while_redis_is_down_and_recovers() {
    let mut redis = RedisServer::start();
    let d = TestDaemon::start(&daemon_toml(Some(&redis), &[])).await;
    let (status, _) = d.say("r", "ann", "before the outage", None).await;
    assert_eq!(status, 200);

    redis.kill();
    for i in 0..3 {
        let (status, body) = d.say("r", "ann", &format!("during the outage {i}"), Some(&format!("down-{i}"))).await;
        assert_eq!(status, 200, "{body}");
        assert!(body["reply"].is_string() || body["reason"] == "no_safe_candidate", "{body}");
    }
    let health = d.health().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["health"]["store_up"], false, "{health}");
    assert!(d.metric("dialogd_context_degraded_total").await >= 3.0);
    assert!(d.metric("dialogd_redis_errors_total").await >= 1.0);
    assert_eq!(d.metric("dialogd_store_up").await, 0.0);
    // Reading the context while Redis is down is a 503, not a hang or a crash.
    let response = d.http.get(d.url("/v1/channels/r/context")).send().await.unwrap();
    assert_eq!(response.status(), 503);

    redis.restart();
    let restarted = std::time::Instant::now();
    let mut back = false;
    while restarted.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if d.health().await["health"]["store_up"] == true {
            back = true;
            break;
        }
    }
    assert!(back, "the daemon did not see Redis back within 5 s");
    let (status, _) = d.say("r", "ann", "after the outage", Some("up-1")).await;
    assert_eq!(status, 200);
    let turns = d.turns("r").await;
    assert_eq!(turns.first().map(|t| t.1.as_str()), Some("after the outage"), "{turns:?}");
    d.stop().await;
}

/// Redis out of memory: messages are still answered, and the fault is
/// not silent: `/healthz` and `dialogd_store_up` say the store is down and
/// the error is counted; with memory back, turns are stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_shows_in_healthz_and_metrics() {
    let redis = RedisServer::start();
    let d = TestDaemon::start(&daemon_toml(Some(&redis), &[])).await;
    assert_eq!(d.say("oom", "ann", "before", None).await.0, 200);
    let mut admin = redis.client();
    redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query::<()>(&mut admin).unwrap();
    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1").query::<()>(&mut admin).unwrap();
    let (status, body) = d.say("oom", "ann", "while full", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(d.health().await["health"]["store_up"], false);
    assert_eq!(d.metric("dialogd_store_up").await, 0.0);
    assert!(d.metric("dialogd_redis_errors_total").await >= 1.0);
    assert!(d.metric("dialogd_context_degraded_total").await >= 1.0);
    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0").query::<()>(&mut admin).unwrap();
    let started = std::time::Instant::now();
    while d.health().await["health"]["store_up"] != true {
        assert!(started.elapsed() < Duration::from_secs(5), "store not back within 5 s of memory");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(d.metric("dialogd_store_up").await, 1.0);
    assert_eq!(d.say("oom", "ann", "after", None).await.0, 200);
    let asked: Vec<String> = d.turns("oom").await.into_iter().filter(|t| !t.2).map(|t| t.1).collect();
    assert_eq!(asked, ["before", "after"]);
    d.stop().await;
}

/// What one message of the Redis-restart load run saw.
struct Sent {
    channel: usize,
    m: usize,
    sent_at: std::time::Instant,
    answered_at: std::time::Instant,
    status: u16,
}

/// A load run with Redis (append-only file, fsync always) killed and
/// restarted in the middle. Every message is answered; every turn stored
/// before the kill survives it, none is stored twice; messages sent while
/// Redis is away are answered without context and not stored (as
/// documented); the daemon sees Redis back within 5 s and stores every
/// message sent after that. Size with DIALOGD_LOAD_CHANNELS; prints the
/// figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_run_with_redis_killed_and_restarted() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let channels = std::env::var("DIALOGD_LOAD_CHANNELS").ok().and_then(|v| v.parse().ok()).unwrap_or(8usize).min(1000);
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let queue = format!("queue_depth = {}", channels * 2);
    let d = TestDaemon::start(&daemon_toml(Some(&redis), &[("generation", &queue), ("context", "max_turns = 10000")])).await;
    let (answered, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..channels {
        let (http, base, answered, stop) = (d.http.clone(), d.base.clone(), answered.clone(), stop.clone());
        tasks.spawn(async move {
            let mut sent = Vec::new();
            let mut m = 0;
            while !stop.load(Ordering::Relaxed) && m < 2000 {
                let body = serde_json::json!({ "author": format!("u{c}"), "text": format!("c{c} m{m}"), "message_id": format!("{c}/{m}") });
                let sent_at = std::time::Instant::now();
                let response = http.post(format!("{base}/v1/channels/rr-{c}/messages")).json(&body).send().await.unwrap();
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                sent.push(Sent { channel: c, m, sent_at, answered_at: std::time::Instant::now(), status });
                answered.fetch_add(1, Ordering::Relaxed);
                m += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            sent
        });
    }
    let wait_for = |n: usize| {
        let answered = answered.clone();
        async move {
            while answered.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(channels * 10).await;
    let killed_at = std::time::Instant::now();
    redis.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart();
    let restarted_at = std::time::Instant::now();
    while d.health().await["health"]["store_up"] != true {
        assert!(restarted_at.elapsed() < Duration::from_secs(5), "the daemon did not see Redis back within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered_at = std::time::Instant::now();
    let recovery = recovered_at - restarted_at;
    let at_recovery = answered.load(Ordering::Relaxed);
    wait_for(at_recovery + channels * 10).await;
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<Sent> = Vec::new();
    while let Some(sent) = tasks.join_next().await {
        all.extend(sent.unwrap());
    }
    let took = started.elapsed();

    let (mut stored, mut duplicated, mut lost, mut during, mut during_stored) = (0, 0, 0, 0, 0);
    for c in 0..channels {
        let turns = d.turns(&format!("rr-{c}")).await;
        let asked: Vec<usize> = turns
            .iter()
            .filter(|t| !t.2)
            .map(|t| t.1.rsplit_once(" m").and_then(|(_, m)| m.parse().ok()).unwrap_or_else(|| panic!("{t:?}")))
            .collect();
        assert!(asked.windows(2).all(|w| w[0] <= w[1]), "channel {c} out of order: {asked:?}");
        let unique: HashSet<usize> = asked.iter().copied().collect();
        duplicated += asked.len() - unique.len();
        stored += unique.len();
        for s in all.iter().filter(|s| s.channel == c) {
            let is_stored = unique.contains(&s.m);
            if s.answered_at < killed_at || s.sent_at > recovered_at {
                lost += usize::from(!is_stored);
            } else {
                during += 1;
                during_stored += usize::from(is_stored);
            }
        }
    }
    let not_ok = all.iter().filter(|s| s.status != 200).count();
    println!(
        "redis-restart load run: {channels} channels, {} messages in {:.1}s; answered {}/{}; stored {stored} \
         ({during} sent while Redis was away or coming back, {during_stored} of them stored); lost 0 of those \
         answered before the kill or sent after recovery: {lost}; duplicated {duplicated}; Redis down {:.1}s, \
         seen back {:.2}s after its restart",
        all.len(),
        took.as_secs_f64(),
        all.len() - not_ok,
        all.len(),
        (restarted_at - killed_at).as_secs_f64(),
        recovery.as_secs_f64()
    );
    assert_eq!(not_ok, 0, "messages not answered with 200");
    assert_eq!(lost, 0, "turns lost");
    assert_eq!(duplicated, 0, "turns stored twice");
    d.stop().await;
}

/// A bounded load run over loopback: many channels at once, each sending
/// its messages in sequence (some twice). Afterwards every channel's
/// context holds each message exactly once, in order, each followed by
/// its reply. Size with DIALOGD_LOAD_CHANNELS / DIALOGD_LOAD_MESSAGES.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_run_loses_and_duplicates_no_turn() {
    let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default).min(1000);
    let (channels, messages) = (env("DIALOGD_LOAD_CHANNELS", 16), env("DIALOGD_LOAD_MESSAGES", 6));
    let redis = RedisServer::start();
    let (queue, window) = (format!("queue_depth = {}", channels * 2), format!("max_turns = {}", messages * 2));
    let d = TestDaemon::start(&daemon_toml(Some(&redis), &[("generation", &queue), ("context", &window)])).await;
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..channels {
        let (http, base) = (d.http.clone(), d.base.clone());
        tasks.spawn(async move {
            let mut counts = (0usize, 0usize, 0usize); // replies, duplicates, other
            for m in 0..messages {
                // Every third message is delivered twice.
                for _ in 0..(1 + usize::from(m % 3 == 0)) {
                    let body = serde_json::json!({ "author": format!("u{c}"), "text": format!("c{c} m{m}"), "message_id": format!("{c}/{m}") });
                    let response = http.post(format!("{base}/v1/channels/load-{c}/messages")).json(&body).send().await.unwrap();
                    assert_eq!(response.status(), 200);
                    let json: Value = response.json().await.unwrap();
                    match json["reason"].as_str() {
                        None => counts.0 += 1,
                        Some("duplicate") => counts.1 += 1,
                        Some(_) => counts.2 += 1,
                    }
                }
            }
            counts
        });
    }
    let (mut replies, mut duplicates, mut other) = (0, 0, 0);
    while let Some(counts) = tasks.join_next().await {
        let (r, dup, o) = counts.unwrap();
        (replies, duplicates, other) = (replies + r, duplicates + dup, other + o);
    }
    let took = started.elapsed();
    let mut turns_total = 0;
    for c in 0..channels {
        let turns = d.turns(&format!("load-{c}")).await;
        let asked: Vec<&str> = turns.iter().filter(|t| !t.2).map(|t| t.1.as_str()).collect();
        let want: Vec<String> = (0..messages).map(|m| format!("c{c} m{m}")).collect();
        assert_eq!(asked, want, "channel {c}");
        assert_eq!(asked.iter().collect::<HashSet<_>>().len(), messages);
        turns_total += turns.len();
    }
    let sent = channels * messages;
    let redelivered = (0..messages).filter(|m| m % 3 == 0).count() * channels;
    assert_eq!(duplicates, redelivered);
    assert_eq!(replies + other, sent);
    println!(
        "load run: {channels} channels x {messages} messages ({sent} messages + {redelivered} redeliveries) in {:.2}s: \
         {replies} replies, {other} empty, {duplicates} duplicates refused, {turns_total} turns stored, 0 lost, 0 duplicated",
        took.as_secs_f64()
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_give_one_notice_then_drop_quietly() {
    let extra = [("rate_limit", "per_user = 2"), ("rate_limit", "per_channel = 0"), ("rate_limit", "window_secs = 600")];
    let d = TestDaemon::start(&crate::support::daemon_toml(None, &extra)).await;
    for text in ["one", "two"] {
        let (_, answer) = d.say("busy", "ann", text, None).await;
        assert!(answer["reply"].is_string(), "{answer}");
    }
    // Over the limit: 429 with Retry-After (the window's rest, in seconds);
    // the first time the body's error is the notice the platforms send.
    let over = |text: &'static str| d.http.post(d.url("/v1/channels/busy/messages")).json(&serde_json::json!({ "author": "ann", "text": text })).send();
    let notice = over("three").await.unwrap();
    assert_eq!(notice.status(), 429);
    let retry_after: u64 = notice.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((590..=600).contains(&retry_after), "{retry_after}");
    let notice: serde_json::Value = notice.json().await.unwrap();
    assert!(notice["error"].as_str().unwrap().contains("faster than I can answer"), "{notice}");
    assert_eq!(notice["reason"], "rate_limited");
    let dropped = over("four").await.unwrap();
    assert_eq!(dropped.status(), 429);
    assert!(dropped.headers().contains_key("retry-after"));
    let dropped: serde_json::Value = dropped.json().await.unwrap();
    assert_eq!(dropped["reason"], "rate_limited", "{dropped}");
    // A method a path does not take: 405 with a JSON body.
    let wrong = d.http.put(d.url("/v1/channels/busy/messages")).send().await.unwrap();
    assert_eq!(wrong.status(), 405);
    let wrong: serde_json::Value = wrong.json().await.unwrap();
    assert!(wrong["error"].as_str().unwrap().contains("method"), "{wrong}");
    // Commands are not counted, and other users are not limited.
    let (_, help) = d.say("busy", "ann", "/help", None).await;
    assert!(help["reply"].as_str().unwrap().contains("/reset"));
    let (_, other) = d.say("busy", "bob", "hello", None).await;
    assert!(other["reply"].is_string(), "{other}");
    assert_eq!(d.turns("busy").await.len(), 6, "limited messages are not stored");
    assert_eq!(d.metric("dialogd_refusals_total{reason=\"rate_limited\"}").await, 2.0);
    d.stop().await;
}

/// `model.quantize = "q8"` and `model.kv_cache` are taken by the daemon,
/// which answers; the loader it shares with the CLI applies them (and
/// names a bad value's flag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_8_bit_weights_when_configured() {
    let tiny = crate::support::model_dir("tiny");
    let path = format!("path = \"{}\"", tiny.display());
    let extra = [
        ("model", path.as_str()),
        ("model", "quantize = \"q8\""),
        ("model", "kv_cache = \"f16\""),
        ("generation", "temperature = 0.0"),
    ];
    let d = TestDaemon::start(&daemon_toml(None, &extra)).await;
    let (status, body) = d.say("q", "ann", "Does money buy happiness?", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["reply"].is_string(), "{body}");
    d.stop().await;

    let args = |quantize: &str| dialogd::cli::ModelArgs {
        model: tiny.display().to_string(),
        device: "cpu".into(),
        dtype: "auto".into(),
        quantize: quantize.into(),
        kv_cache: "f16".into(),
    };
    let served = dialogd::cli::load(&args("q8"), false).unwrap().model;
    assert!(served.is_quantized());
    assert_eq!(served.kv_precision(), dialogd::model::KvPrecision::F16);
    assert!(!dialogd::cli::load(&args("none"), false).unwrap().model.is_quantized());
    let err = dialogd::cli::load(&args("q4"), false).err().unwrap();
    assert!(format!("{err:#}").contains("--quantize"), "{err:#}");
}

/// Reads until the server closes the connection; `Err` if it is still open
/// after `within`. Whatever the server sent before closing is returned.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Result<String, String> {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    match tokio::time::timeout(within, read_all).await {
        Ok(()) => Ok(String::from_utf8_lossy(&got).into_owned()),
        Err(_) => Err(format!("still open after {within:?}; got {:?}", String::from_utf8_lossy(&got))),
    }
}

/// Clients that open connections and never finish a request cannot take
/// the API down: with twice `max_connections` idle sockets open, `/healthz`
/// still answers (once the header timeout frees slots), every idle socket
/// is closed by the server, and so are a half-sent header, a body that
/// stops coming (408) and a kept-alive connection left idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_capped_and_closed_and_healthz_answers() {
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpStream;
    let extra = [
        ("adapters.http", "max_connections = 4"),
        ("adapters.http", "header_timeout_secs = 1"),
        ("adapters.http", "body_timeout_secs = 1"),
    ];
    let d = TestDaemon::start(&daemon_toml(None, &extra)).await;
    let addr = d.base.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    // A fresh client without pooling: every request on its own connection.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let started = std::time::Instant::now();
    let health = tokio::time::timeout(Duration::from_secs(6), async {
        client.get(d.url("/healthz")).send().await.unwrap().json::<Value>().await.unwrap()
    })
    .await
    .expect("/healthz did not answer with the connection cap full of idle sockets");
    assert_eq!(health["status"], "ok", "{health}");
    // It waited for slots: the first four idle sockets held them for the
    // header timeout.
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}: the cap did not hold", started.elapsed());
    for (i, stream) in idle.iter_mut().enumerate() {
        let sent = closed_within(stream, Duration::from_secs(4)).await.unwrap_or_else(|e| panic!("idle socket {i}: {e}"));
        assert!(sent.is_empty() || sent.starts_with("HTTP/1.1 408"), "idle socket {i} got {sent:?}");
    }

    // Half a header, then nothing.
    let mut slow_header = TcpStream::connect(&addr).await.unwrap();
    slow_header.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    closed_within(&mut slow_header, Duration::from_secs(3)).await.unwrap();

    // A body that stops after 10 of its 100 bytes: 408, then closed.
    let mut slow_body = TcpStream::connect(&addr).await.unwrap();
    slow_body
        .write_all(b"POST /v1/channels/c/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"author\":")
        .await
        .unwrap();
    let answer = closed_within(&mut slow_body, Duration::from_secs(3)).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // A kept-alive connection: answered, then closed once idle.
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let answer = closed_within(&mut kept, Duration::from_secs(3)).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A body over the limit is refused, not buffered.
    let big = serde_json::json!({ "author": "ann", "text": "x".repeat(70_000) });
    let response = client.post(d.url("/v1/channels/c/messages")).json(&big).send().await.unwrap();
    assert_eq!(response.status(), 413);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persona_choice_survives_a_restart_with_jobs_off() {
    let redis = RedisServer::start();
    let toml = daemon_toml(Some(&redis), &[]);
    assert!(!toml.contains("[jobs]\nenabled = true"), "[jobs] stays off");
    let moderator = |text: &str| crate::support::moderator_inbound("deck", "captain", text);
    let say = |d: &TestDaemon, text: &str| {
        let answer = d.pipeline.handle(moderator(text));
        async move {
            match answer.await.unwrap() {
                Answer::Reply(out) => out.text,
                other => format!("{other:?}"),
            }
        }
    };
    let d = TestDaemon::start(&toml).await;
    assert!(say(&d, "/persona create pirate Ahoy! | What be yer business?").await.starts_with("Created persona pirate"));
    assert!(say(&d, "/persona use pirate").await.contains("speak as pirate"));
    d.stop().await;

    let d = TestDaemon::start(&toml).await;
    let shown = say(&d, "/persona").await;
    assert!(shown.contains("I speak as pirate here (2 seed turn(s)"), "{shown}");
    d.stop().await;
}

/// The collected exchanges in `dir`, as (channel, turn texts), oldest first.
fn collected(dir: &std::path::Path) -> Vec<(String, Vec<String>)> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "jsonl")).collect())
        .unwrap_or_default();
    paths.sort();
    paths
        .iter()
        .flat_map(|p| std::fs::read_to_string(p).unwrap().lines().map(str::to_string).collect::<Vec<_>>())
        .map(|line| {
            let record: dialogd::collect::Record = serde_json::from_str(&line).unwrap();
            (record.channel, record.turns.into_iter().map(|t| t.text).collect())
        })
        .collect()
}

/// `collect.consent = "user"` through the HTTP API with Redis: only people
/// who sent `/optin` are collected; an exchange whose context holds a turn
/// of someone who did not is skipped; `/optout` withdraws the opt-in (and
/// deletes what was collected), `/optin` gives it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_consent_per_user_only_opted_in_people_are_collected() {
    let redis = RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("collected");
    let dir_line = format!("dir = \"{}\"", dir.display());
    let toml = daemon_toml(
        Some(&redis),
        &[
            ("collect", "enabled = true"),
            ("collect", &dir_line),
            ("collect", "channels = [\"http:c1\", \"http:c2\"]"),
            ("collect", "author_key = \"a-test-key-of-16-chars\""),
            ("collect", "consent = \"user\""),
        ],
    );
    let d = TestDaemon::start(&toml).await;
    let say = |channel: &'static str, author: &'static str, text: &'static str| {
        let d = &d;
        async move {
            let (status, body) = d.say(channel, author, text, None).await;
            assert_eq!(status, 200, "{body}");
            assert!(body["reply"].is_string(), "{body}");
            body["reply"].as_str().unwrap().to_string()
        }
    };

    say("c1", "ann", "hello there").await;
    assert!(collected(&dir).is_empty(), "ann has not opted in");
    assert!(say("c1", "ann", "/optin").await.contains("from now on"));
    assert!(say("c1", "ann", "/optin").await.contains("already opted in"));
    say("c1", "ann", "how are you today").await;
    let got = collected(&dir);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "http:c1");
    assert!(got[0].1.contains(&"how are you today".to_string()) && got[0].1.contains(&"hello there".to_string()), "{got:?}");

    // bob never opted in: neither his exchange nor ann's next one, whose
    // context holds his turn, is collected.
    say("c1", "bob", "I am bob").await;
    say("c1", "ann", "nice to meet you").await;
    assert_eq!(collected(&dir).len(), 1, "{:?}", collected(&dir));
    // In a channel of her own, ann is collected.
    say("c2", "ann", "a quiet room").await;
    assert_eq!(collected(&dir).len(), 2);

    // /optout deletes what was collected and withdraws the opt-in.
    assert!(say("c2", "ann", "/optout").await.contains("deleted 2"));
    assert!(collected(&dir).is_empty());
    say("c2", "ann", "still here").await;
    assert!(collected(&dir).is_empty(), "an opt-out withdraws the opt-in");
    assert!(say("c2", "ann", "/optin").await.contains("from now on"));
    say("c2", "ann", "back again").await;
    let got = collected(&dir);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].1.contains(&"back again".to_string()) && !got[0].1.iter().any(|t| t == "I am bob"), "{got:?}");
    d.stop().await;
}
