//! Generation over Redis Streams (`[generation] backend = "redis"`): a
//! daemon without a pool, `dialogd worker`s in the test process and as
//! real processes, a real redis-server and the pico model.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dialogd::remote::{self, WorkerOptions, WorkerStats};

use crate::support::{self, daemon_toml, RedisServer, TestDaemon};

fn redis_backend_toml(redis: &RedisServer, claim_idle_ms: u64) -> String {
    daemon_toml(
        Some(redis),
        &[
            ("generation", "backend = \"redis\""),
            ("generation", "timeout_ms = 60000"),
            ("generation", "candidates = 2"),
            ("jobs", "enabled = false"),
        ],
    ) + &format!("[worker]\nclaim_idle_ms = {claim_idle_ms}\nmax_inflight = 4\n")
}

/// Requests taken by a worker and not yet acknowledged (`XPENDING`'s count).
fn pending(conn: &mut redis::Connection) -> i64 {
    let summary: redis::Value =
        redis::cmd("XPENDING").arg("dialogd:gen:requests").arg("generation").query(conn).unwrap();
    match &summary {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => panic!("XPENDING without a count: {summary:?}"),
        },
        _ => panic!("XPENDING answered {summary:?}"),
    }
}

/// Waits (up to 12 s) until a worker holds requests; returns how many.
async fn wait_until_held(conn: &mut redis::Connection) -> i64 {
    for _ in 0..1200 {
        let held = pending(conn);
        if held > 0 {
            return held;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    0
}

/// A worker inside the test process: its own pool on the pico model.
struct InProcessWorker {
    stats: Arc<WorkerStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessWorker {
    fn start(redis: &RedisServer, name: &str, claim_idle: Duration) -> Self {
        let settings = support::settings_from(&daemon_toml(Some(redis), &[]));
        let args = dialogd::cli::ModelArgs {
            model: settings.model.path.clone(),
            device: "cpu".into(),
            dtype: "auto".into(),
            quantize: "none".into(),
            kv_cache: "auto".into(),
        };
        let loaded = dialogd::cli::load(&args, false).unwrap();
        let engine =
            dialogd::pipeline::engine::PoolEngine::start(loaded.model, &settings.generation, dialogd::telemetry::Metrics::new())
                .unwrap();
        let options = WorkerOptions {
            redis_url: redis.url(),
            key_prefix: settings.context.key_prefix.clone(),
            consumer: name.into(),
            max_inflight: 4,
            claim_idle,
        };
        let stats = Arc::new(WorkerStats::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = engine.handle().clone();
        let task = tokio::spawn({
            let stats = stats.clone();
            async move {
                let _engine = engine;
                remote::run_worker(options, handle, stats, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            }
        });
        Self { stats, stop: Some(stop), task }
    }

    fn answered(&self) -> u64 {
        self.stats.answered.load(Ordering::Relaxed)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(60), self.task).await.expect("worker did not stop").unwrap();
    }
}

/// 8 channels x 10 messages through one daemon and two workers: every
/// message answered once, each channel's context in order, both workers
/// used, the stream empty after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_answer_every_message_once_in_order() {
    let redis = RedisServer::start();
    let a = InProcessWorker::start(&redis, "worker-a", Duration::from_secs(30));
    let b = InProcessWorker::start(&redis, "worker-b", Duration::from_secs(30));
    let d = TestDaemon::start(&redis_backend_toml(&redis, 30_000)).await;
    let mut channels = Vec::new();
    for c in 0..8 {
        let (http, base) = (d.http.clone(), d.base.clone());
        channels.push(tokio::spawn(async move {
            for m in 0..10 {
                let body = serde_json::json!({ "author": "ann", "text": format!("message {m} in room {c}") });
                let r = http.post(format!("{base}/v1/channels/room{c}/messages")).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap();
                assert_eq!(status, 200, "room{c} message {m}: {body}");
                assert!(body["reply"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
            }
        }));
    }
    for c in channels {
        c.await.unwrap();
    }
    for c in 0..8 {
        let turns = d.turns(&format!("room{c}")).await;
        let users: Vec<&str> = turns.iter().filter(|t| !t.2).map(|t| t.1.as_str()).collect();
        let wanted: Vec<String> = (0..10).map(|m| format!("message {m} in room {c}")).collect();
        // The context window may have dropped the oldest turns; what is
        // kept is the newest, in order.
        assert!(!users.is_empty());
        assert_eq!(users, wanted[wanted.len() - users.len()..], "room{c}");
        let start = usize::from(turns.first().is_some_and(|t| t.2));
        let alternating = turns[start..].chunks(2).all(|pair| pair.len() == 2 && !pair[0].2 && pair[1].2);
        assert!(alternating, "room{c}: each message answered once: {turns:?}");
    }
    let (answered_a, answered_b) = (a.answered(), b.answered());
    // At least one request per message (a message whose candidates were
    // all screened out is drawn again: a second request).
    assert!(answered_a + answered_b >= 80, "a {answered_a}, b {answered_b}");
    assert!(answered_a > 0 && answered_b > 0, "one worker took everything: a {answered_a}, b {answered_b}");
    let mut conn = redis.client();
    let left: u64 = redis::cmd("XLEN").arg("dialogd:gen:requests").query(&mut conn).unwrap();
    assert_eq!(left, 0, "answered requests stay in the stream");
    assert_eq!(d.metric("dialogd_replies_total").await, 80.0);
    assert_eq!(d.metric("dialogd_generation_answers_dropped_total{reason=\"late\"}").await, 0.0);
    d.stop().await;
    a.stop().await;
    b.stop().await;
}

/// A `dialogd worker` process killed with SIGKILL while it holds requests:
/// another worker takes them over (XAUTOCLAIM) and every message is
/// answered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_loses_no_request() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(&config, redis_backend_toml(&redis, 1000)).unwrap();
    let mut doomed = std::process::Command::new(env!("CARGO_BIN_EXE_dialogd"))
        .arg("worker")
        .arg("--config")
        .arg(&config)
        .env("DIALOGD__WORKER__CONSUMER", "doomed")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let d = TestDaemon::start(&redis_backend_toml(&redis, 1000)).await;
    let mut sent = Vec::new();
    for c in 0..6 {
        let (http, base) = (d.http.clone(), d.base.clone());
        sent.push(tokio::spawn(async move {
            let mut replies = Vec::new();
            for m in 0..3 {
                let body = serde_json::json!({ "author": "bob", "text": format!("hello {m} from {c}") });
                let r = http.post(format!("{base}/v1/channels/k{c}/messages")).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap();
                assert_eq!(status, 200, "k{c} message {m}: {body}");
                replies.push(body["reply"].as_str().unwrap().to_string());
            }
            replies
        }));
    }
    // Wait until the doomed worker holds requests (pending, unacknowledged),
    // then kill it without warning.
    let mut conn = redis.client();
    let held = wait_until_held(&mut conn).await;
    assert!(held > 0, "the worker process never took a request");
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let rescuer = InProcessWorker::start(&redis, "rescuer", Duration::from_millis(1000));
    let mut answered = 0;
    for s in sent {
        answered += s.await.unwrap().len();
    }
    assert_eq!(answered, 18);
    assert!(rescuer.stats.claimed.load(Ordering::Relaxed) > 0, "nothing was taken over from the dead worker");
    for c in 0..6 {
        let turns = d.turns(&format!("k{c}")).await;
        let bots = turns.iter().filter(|t| t.2).count();
        let users = turns.iter().filter(|t| !t.2).count();
        assert_eq!(bots, users, "k{c}: every message answered once: {turns:?}");
    }
    assert_eq!(d.metric("dialogd_replies_total").await, 18.0);
    d.stop().await;
    rescuer.stop().await;
}

/// SIGTERM: the worker process takes nothing new, answers and acknowledges
/// what it holds, and exits 0; nobody needs to take anything over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_stopped_with_sigterm_finishes_what_it_took() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    // No takeover within the test: what gets answered, the worker answered.
    std::fs::write(&config, redis_backend_toml(&redis, 600_000)).unwrap();
    let worker = std::process::Command::new(env!("CARGO_BIN_EXE_dialogd"))
        .args(["worker", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let d = TestDaemon::start(&redis_backend_toml(&redis, 600_000)).await;
    let mut sent = Vec::new();
    for c in 0..4 {
        let (http, base) = (d.http.clone(), d.base.clone());
        sent.push(tokio::spawn(async move {
            let body = serde_json::json!({ "author": "cy", "text": format!("one question from {c}") });
            let r = http.post(format!("{base}/v1/channels/t{c}/messages")).json(&body).send().await.unwrap();
            r.status().as_u16()
        }));
    }
    let mut conn = redis.client();
    // Best effort: SIGTERM while it holds requests, if it has taken any yet.
    let _ = wait_until_held(&mut conn).await;
    let killed = std::process::Command::new("kill").args(["-TERM", &worker.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let out = tokio::task::spawn_blocking(move || worker.wait_with_output()).await.unwrap().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "worker exit {:?}:\n{log}", out.status);
    assert!(log.contains("worker: stopped"), "{log}");
    let mut conn = redis.client();
    assert_eq!(pending(&mut conn), 0, "the worker left requests unacknowledged");
    // Messages it had not taken wait for another worker.
    let rescuer = InProcessWorker::start(&redis, "after", Duration::from_secs(600));
    for s in sent {
        assert_eq!(s.await.unwrap(), 200);
    }
    d.stop().await;
    rescuer.stop().await;
}

/// With no worker, a message is refused after `generation.timeout_ms`
/// (an error, not a hang), and a full stream is "busy".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_workers_messages_fail_at_the_deadline_and_a_full_stream_is_busy() {
    let redis = RedisServer::start();
    let toml = daemon_toml(
        Some(&redis),
        &[("generation", "backend = \"redis\""), ("generation", "timeout_ms = 300"), ("generation", "queue_depth = 2")],
    );
    let d = TestDaemon::start(&toml).await;
    let (status, body) = d.say("lonely", "ann", "anyone there?", None).await;
    assert_ne!(status, 200, "{body}");
    assert_eq!(d.metric("dialogd_refusals_total{reason=\"failed\"}").await, 1.0);
    // Two stale requests fill the stream (nobody takes them).
    let mut conn = redis.client();
    let left: u64 = redis::cmd("XLEN").arg("dialogd:gen:requests").query(&mut conn).unwrap();
    assert_eq!(left, 1);
    let _: String = redis::cmd("XADD").arg("dialogd:gen:requests").arg("*").arg("id").arg("x").query(&mut conn).unwrap();
    let (status, body) = d.say("lonely", "ann", "still there?", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(d.metric("dialogd_refusals_total{reason=\"busy\"}").await, 1.0);
    d.stop().await;
}
