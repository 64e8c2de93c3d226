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
    /// Its own folder (`worker.cache_dir`), as on a host of its own.
    home: tempfile::TempDir,
}

impl InProcessWorker {
    fn start(redis: &RedisServer, name: &str, claim_idle: Duration) -> Self {
        Self::start_with(redis, name, claim_idle, None)
    }

    /// A worker that follows the promoted base model when `follow_base`.
    fn start_with(redis: &RedisServer, name: &str, claim_idle: Duration, follow_base: Option<remote::FollowBase>) -> Self {
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
        let home = tempfile::tempdir().unwrap();
        let options = WorkerOptions {
            redis_url: redis.url(),
            key_prefix: settings.context.key_prefix.clone(),
            consumer: name.into(),
            max_inflight: 4,
            claim_idle,
            model: dialogd::daemon::model_spec(&settings.model),
            cache_dir: home.path().to_path_buf(),
            follow_base,
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
        Self { stats, stop: Some(stop), task, home }
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
    let metrics_port = support::free_port();
    let worker = std::process::Command::new(env!("CARGO_BIN_EXE_dialogd"))
        .args(["worker", "--config"])
        .arg(&config)
        .env("DIALOGD__TELEMETRY__METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .env("DIALOGD__WORKER__CONSUMER", "graceful")
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
    // Meanwhile its own /metrics shows its figures under its consumer name,
    // beside its pool's.
    let text = d.http.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().await.unwrap().text().await.unwrap();
    for series in [
        "dialogd_worker_requests_total{consumer=\"graceful\",outcome=\"answered\"}",
        "dialogd_worker_claimed_total{consumer=\"graceful\"} 0",
        "dialogd_worker_base_version{consumer=\"graceful\"} 0",
        "dialogd_pool_prefill_tokens_total",
    ] {
        assert!(text.contains(series), "no {series} in the worker's /metrics:\n{text}");
    }
    support::parse_exposition(&text).unwrap();
    support::promtool_check(&text);
    // And its /healthz says it serves, under its name.
    let health = d.http.get(format!("http://127.0.0.1:{metrics_port}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!((body["status"].as_str(), body["consumer"].as_str(), body["base_version"].as_u64()), (Some("ok"), Some("graceful"), Some(0)), "{body}");
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

/// The adapter cache folder of a worker whose home is `home`.
fn cached_adapter(home: &std::path::Path, id: &str) -> std::path::PathBuf {
    home.join("adapters").join(id)
}

/// Greedy ids of `text` as a one-turn prompt, through the stream.
async fn through_stream(redis: &RedisServer, prompt: &[u32], adapter: Option<&str>) -> Result<Vec<u32>, remote::RemoteError> {
    let client = remote::StreamClient::connect(&redis.url(), "dialogd", Duration::from_secs(60), 64).await.unwrap();
    let request = remote::WireRequest {
        prompt_ids: prompt.to_vec(),
        params: dialogd::sampling::SamplingParams::greedy(8),
        n_candidates: 1,
        adapter: adapter.map(String::from),
    };
    let mut drawn = client.generate(&request).await?;
    Ok(drawn.remove(0).ids)
}

/// The pico model as the workers serve it, with its tokenizer.
fn served_pico() -> dialogd::serving::Loaded {
    let settings = support::settings_from(&daemon_toml(None, &[]));
    dialogd::serving::load(&dialogd::daemon::model_spec(&settings.model)).unwrap()
}

/// Greedy ids of `prompt` on `model` (with `adapter`), without a pool.
fn locally(model: &dialogd::model::Gpt2, adapter: Option<&dialogd::model::LoraRuntime>, prompt: &[u32]) -> Vec<u32> {
    let params = dialogd::sampling::SamplingParams::greedy(8);
    dialogd::generate::generate_with_adapter(model, adapter, prompt, &params, |_| true).unwrap().output_ids
}

fn one_turn(tokenizer: &dialogd::tokenizer::DialogTokenizer, text: &str) -> Vec<u32> {
    let mut ids = tokenizer.encode(text).unwrap();
    ids.push(tokenizer.eos_id());
    ids
}

/// A daemon with `backend = "redis"` whose every channel speaks as the
/// persona `pirate`, its adapter (drawn from `seed`) written under
/// `host_a`; the adapter's folder.
async fn pirate_daemon(redis: &RedisServer, host_a: &std::path::Path, seed: u64) -> (TestDaemon, std::path::PathBuf) {
    let adapter_dir = support::write_adapter(&support::model_dir("pico-bin"), &host_a.join("pirate"), seed);
    let persona = format!("defined = [{{ name = \"pirate\", adapter = \"{}\" }}]", adapter_dir.display());
    let toml = redis_backend_toml(redis, 30_000) + &format!("[personas]\ndefault = \"pirate\"\n{persona}\n");
    (TestDaemon::start(&toml).await, adapter_dir)
}

/// Host A (the daemon's working folder) holds a persona's adapter; the
/// daemon stores it in Redis at start. A worker whose own folder has never
/// seen it (host B; A's folder is gone by then) fetches it by its hash,
/// keeps it under its cache folder, and answers with it: what the adapter
/// computes locally, not what the base model does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_persona_adapter_from_the_daemons_folder_is_served_by_a_worker_on_another() {
    let redis = RedisServer::start();
    let host_a = tempfile::tempdir().unwrap();
    let (d, adapter_dir) = pirate_daemon(&redis, host_a.path(), 5).await;
    let id = remote::blobs::blob_id(&remote::blobs::pack(&adapter_dir).unwrap());
    let mut conn = redis.client();
    let stored: bool = redis::cmd("EXISTS").arg(format!("dialogd:adapter:{id}")).query(&mut conn).unwrap();
    assert!(stored, "the daemon did not store the persona's adapter at start");
    // Nothing of host A is left for a worker to read.
    drop(host_a);
    let worker = InProcessWorker::start(&redis, "host-b", Duration::from_secs(30));
    let cached = cached_adapter(worker.home.path(), &id);
    assert!(!cached.exists());

    // Through the daemon: the persona's channel is answered by the worker.
    let (status, body) = d.say("deck", "ann", "Ahoy! How are you?", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["reply"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert!(cached.join("adapter_model.safetensors").is_file(), "the worker kept no copy in its own folder");
    let again = remote::blobs::blob_id(&remote::blobs::pack(&cached).unwrap());
    assert_eq!(again, id, "the cached copy is not the adapter the daemon stored");

    // Straight through the stream: with the adapter, the worker computes
    // what the adapter does locally; that is not the base model's answer.
    let loaded = served_pico();
    let runtime = dialogd::training::lora::load_runtime(&cached, loaded.model.config()).unwrap();
    let mut changed = 0;
    for text in ["Ahoy! How are you?", "Where is the treasure?", "ok"] {
        let prompt = one_turn(&loaded.tokenizer, text);
        let with = through_stream(&redis, &prompt, Some(&id)).await.unwrap();
        assert_eq!(with, locally(&loaded.model, Some(&runtime), &prompt), "{text}");
        let without = through_stream(&redis, &prompt, None).await.unwrap();
        assert_eq!(without, locally(&loaded.model, None, &prompt), "{text}");
        changed += usize::from(with != without);
    }
    assert!(changed > 0, "the adapter changed no reply: the worker may be answering with the base model");
    d.stop().await;
    worker.stop().await;
}

/// A blob that is not what its hash says, an id Redis does not hold and a
/// malformed id are each refused with an error saying so; nothing is
/// cached, and the persona's message fails rather than being answered by
/// the base model. Stored again intact, the same adapter serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_or_unknown_adapter_is_refused_with_a_clear_error() {
    let redis = RedisServer::start();
    let host_a = tempfile::tempdir().unwrap();
    let (d, adapter_dir) = pirate_daemon(&redis, host_a.path(), 6).await;
    let blobs = remote::blobs::AdapterBlobs::connect(&redis.url(), "dialogd").await.unwrap();
    let id = blobs.publish(&adapter_dir).await.unwrap();
    let key = format!("dialogd:adapter:{id}");
    let mut conn = redis.client();
    let intact: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
    let _: i64 = redis::cmd("SETRANGE").arg(&key).arg(intact.len() / 2).arg(&b"\x00garbage\x00"[..]).query(&mut conn).unwrap();
    let worker = InProcessWorker::start(&redis, "careful", Duration::from_secs(30));

    let (status, body) = d.say("deck", "ann", "Ahoy! How are you?", None).await;
    assert_ne!(status, 200, "a persona's message was answered without its adapter: {body}");
    assert!(d.turns("deck").await.is_empty(), "a failed message was stored");
    let loaded = served_pico();
    let prompt = one_turn(&loaded.tokenizer, "Where is the treasure?");
    let corrupt = through_stream(&redis, &prompt, Some(&id)).await.unwrap_err().to_string();
    assert!(corrupt.contains(&id) && corrupt.contains("corrupt"), "{corrupt}");
    assert!(!cached_adapter(worker.home.path(), &id).exists(), "a corrupt blob was cached");
    let unknown = "0".repeat(64);
    let missing = through_stream(&redis, &prompt, Some(&unknown)).await.unwrap_err().to_string();
    assert!(missing.contains(&unknown) && missing.contains("not in Redis"), "{missing}");
    let bad = through_stream(&redis, &prompt, Some("../../etc")).await.unwrap_err().to_string();
    assert!(bad.contains("not a SHA-256 id"), "{bad}");

    // Stored again (as a daemon does whenever it loads the persona), the
    // same id serves.
    assert_eq!(blobs.publish(&adapter_dir).await.unwrap(), id);
    through_stream(&redis, &prompt, Some(&id)).await.unwrap();
    assert!(cached_adapter(worker.home.path(), &id).is_dir());
    let (status, body) = d.say("deck", "ann", "Ahoy again!", None).await;
    assert_eq!(status, 200, "{body}");
    d.stop().await;
    worker.stop().await;
}

/// `jobs.artifacts_dir` is checked at start: a worker (with `[jobs]` on)
/// refuses a folder it cannot see, naming the key, before loading a
/// model; a daemon running jobs refuses one it cannot write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_artifacts_dir_is_checked_at_start() {
    let redis = RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("not-mounted");
    let config = tmp.path().join("worker.toml");
    let jobs = [
        ("jobs", "enabled = true".to_string()),
        ("jobs", format!("dir = \"{}\"", tmp.path().join("jobs").display())),
        ("jobs", format!("artifacts_dir = \"{}\"", missing.display())),
    ];
    let extra: Vec<(&str, &str)> = jobs.iter().map(|(s, l)| (*s, l.as_str())).collect();
    std::fs::write(&config, daemon_toml(Some(&redis), &extra) + &format!("[worker]\ncache_dir = \"{}\"\n", tmp.path().join("cache").display())).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dialogd"))
        .args(["worker", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("jobs.artifacts_dir") && err.contains("not-mounted"), "{err}");

    // A file where the folder should be: the daemon cannot write there.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let jobs = [
        ("jobs", "enabled = true".to_string()),
        ("jobs", format!("dir = \"{}\"", tmp.path().join("jobs").display())),
        ("jobs", format!("artifacts_dir = \"{}\"", file.join("artifacts").display())),
    ];
    let extra: Vec<(&str, &str)> = jobs.iter().map(|(s, l)| (*s, l.as_str())).collect();
    let refused = TestDaemon::try_start(&daemon_toml(Some(&redis), &extra)).await.err().expect("the daemon started").to_string();
    assert!(refused.contains("jobs.artifacts_dir") && refused.contains("a-file"), "{refused}");
}

/// A copy of the pico checkpoint with other weights (same shape), as a
/// promoted job's output under `artifacts_dir`.
fn promoted_pico(artifacts_dir: &std::path::Path, id: u64) -> std::path::PathBuf {
    let out = dialogd::serving::job_output(artifacts_dir, id);
    std::fs::create_dir_all(&out).unwrap();
    let src = support::model_dir("pico-safetensors");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, out.join(path.file_name().unwrap())).unwrap();
    }
    let weights = out.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let bent: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            let t = if name.contains("mlp.c_fc.weight") { (t * 8.0).unwrap() } else { t };
            (name, t)
        })
        .collect();
    candle_core::safetensors::save(&bent, &weights).unwrap();
    out
}

/// A worker follows the promoted base model: a job id pushed on
/// `versions:base` (as a daemon's promotion does) is loaded from
/// `jobs.artifacts_dir` and swapped in; popped (a rollback), the
/// configured model is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_swaps_its_base_model_when_the_promoted_version_changes() {
    let redis = RedisServer::start();
    let artifacts = tempfile::tempdir().unwrap();
    let promoted_dir = promoted_pico(artifacts.path(), 7);
    let loaded = served_pico();
    let settings = support::settings_from(&daemon_toml(None, &[]));
    let promoted = dialogd::serving::load_weights(&dialogd::daemon::model_spec(&settings.model), &promoted_dir).unwrap();
    let prompts: Vec<Vec<u32>> =
        ["Hello, how are you?", "What do you do on weekends?"].iter().map(|t| one_turn(&loaded.tokenizer, t)).collect();
    assert!(
        prompts.iter().any(|p| locally(&promoted, None, p) != locally(&loaded.model, None, p)),
        "the promoted copy answers as the original: the test could not tell them apart"
    );
    let follow = remote::FollowBase {
        original: loaded.dir.clone(),
        artifacts_dir: artifacts.path().to_path_buf(),
        poll: Duration::from_millis(50),
    };
    let worker = InProcessWorker::start_with(&redis, "follower", Duration::from_secs(30), Some(follow));
    for p in &prompts {
        assert_eq!(through_stream(&redis, p, None).await.unwrap(), locally(&loaded.model, None, p));
    }
    let store = dialogd::jobs::JobStore::connect(&redis.url(), "dialogd", Duration::from_secs(2)).await.unwrap();
    store.push_version(&dialogd::jobs::Target::Base, 7).await.unwrap();
    let swapped = async {
        while worker.stats.base_version.load(Ordering::Relaxed) != 7 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), swapped).await.expect("the worker did not swap in version 7");
    for p in &prompts {
        assert_eq!(through_stream(&redis, p, None).await.unwrap(), locally(&promoted, None, p));
    }
    // A rollback: the configured model again.
    store.rollback(&dialogd::jobs::Target::Base).await.unwrap();
    let back = async {
        while worker.stats.swaps.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), back).await.expect("the worker did not go back to the configured model");
    assert_eq!(worker.stats.base_version.load(Ordering::Relaxed), 0);
    for p in &prompts {
        assert_eq!(through_stream(&redis, p, None).await.unwrap(), locally(&loaded.model, None, p));
    }
    worker.stop().await;
}

/// Every client has its own reply stream, even clients of one process
/// connecting in the same millisecond: each reads its stream from the
/// start and numbers its requests from 0, so a shared stream would hand
/// one client another's answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_one_process_have_their_own_reply_streams() {
    let redis = RedisServer::start();
    let url = redis.url();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = remote::StreamClient::connect(&url, "dialogd", Duration::from_secs(5), 8).await.unwrap();
                client.daemon_id().to_string()
            })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for task in tasks {
        ids.insert(task.await.unwrap());
    }
    assert_eq!(ids.len(), 16, "{ids:?}");
}

/// Redis going away under a worker and a daemon: the worker's health
/// turns `redis_down` while the stream cannot be read, and once Redis is
/// back (empty: no persistence, so the consumer group is gone too) the
/// worker makes the group again, says `ok`, and the daemon's next message
/// is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_comes_back_after_redis_restarts_empty() {
    let mut redis = RedisServer::start();
    let worker = InProcessWorker::start(&redis, "steady", Duration::from_secs(600));
    let status = |w: &InProcessWorker| w.stats.health().status;
    let wait_for = |want: &'static str, w: &InProcessWorker| {
        let stats = w.stats.clone();
        async move {
            for _ in 0..600 {
                if stats.health().status == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("worker health never became {want}: {:?}", stats.health());
        }
    };
    wait_for("ok", &worker).await;
    let d = TestDaemon::start(&redis_backend_toml(&redis, 600_000)).await;
    let (code, body) = d.say("before", "ann", "hello?", None).await;
    assert_eq!(code, 200, "{body}");
    redis.kill();
    wait_for("redis_down", &worker).await;
    redis.restart();
    wait_for("ok", &worker).await;
    let (code, body) = d.say("after", "ann", "are you there?", None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(worker.answered(), 2);
    assert_eq!(status(&worker), "ok");
    d.stop().await;
    worker.stop().await;
}
