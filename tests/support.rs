//! Shared test fixtures.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use dialogd::model::synthetic::{write_checkpoint, InitSpec};
use dialogd::model::Gpt2Config;
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// A golden file written by scripts/make_golden.py.
pub fn golden(name: &str) -> Value {
    let path = fixtures().join("golden").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

/// The config, seed and init rules of a golden model.
pub fn golden_model_spec(golden: &Value) -> (Gpt2Config, u64, InitSpec) {
    let config: Gpt2Config = serde_json::from_value(golden["config"].clone()).unwrap();
    let init: InitSpec = serde_json::from_value(golden["init"].clone()).unwrap();
    (config, golden["seed"].as_u64().unwrap(), init)
}

/// A checkpoint folder for a golden model. The committed `pico` model comes
/// in three file formats (safetensors, zip `pytorch_model.bin`, a legacy
/// DialoGPT-style `.pkl`); the others are written once per test run from the
/// deterministic formula into a temporary folder.
pub fn model_dir(name: &str) -> PathBuf {
    match name {
        "pico-safetensors" | "pico-bin" | "pico-pkl" => fixtures().join(name),
        _ => synthetic_dir(name),
    }
}

fn synthetic_dir(name: &str) -> PathBuf {
    let g = golden(name);
    let key = format!("{}{}{}", g["config"], g["seed"], g["init"]);
    cached_checkpoint(&key, name, |dir| {
        let (config, seed, init) = golden_model_spec(&g);
        write_checkpoint(dir, &config, seed, &init, &fixtures().join("gpt2")).unwrap();
    })
}

/// A synthetic checkpoint folder kept under cargo's per-target temporary
/// folder, keyed by the spec it was written from: written once, reused by
/// later runs (nothing left in /tmp), rewritten when the spec changes.
pub fn cached_checkpoint(spec_key: &str, folder: &str, write: impl FnOnce(&Path)) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let hash = spec_key.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("synthetic").join(format!("{hash:016x}")).join(folder);
    let done = dir.join(".complete");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        write(&dir);
        std::fs::write(&done, spec_key).unwrap();
    }
    dir
}

/// Writes a PEFT adapter for `base` whose A (PEFT's initialisation from
/// `seed`) and B (uniform in ±0.2 from `seed`) are both non-zero, so that it
/// really changes the model (a fresh adapter has B = 0 and changes nothing).
pub fn write_adapter(base: &Path, dir: &Path, seed: u64) -> PathBuf {
    let model = dialogd::training::TrainableGpt2::load(base, Some(dialogd::training::LoraSettings { rank: 4, alpha: 16.0 }), seed, &candle_core::Device::Cpu).unwrap();
    let mut rng = dialogd::sampling::Rng::new(seed);
    for pair in model.lora_pairs().values() {
        let shape = pair.b.as_tensor().shape().clone();
        let values: Vec<f32> = (0..shape.elem_count()).map(|_| ((rng.next_f64() * 2.0 - 1.0) * 0.2) as f32).collect();
        pair.b.set(&candle_core::Tensor::from_vec(values, shape, &candle_core::Device::Cpu).unwrap()).unwrap();
    }
    dialogd::training::lora::save_adapter(dir, &model, "tiny").unwrap();
    dir.to_path_buf()
}

/// Runs the dialogd binary with a clean hub environment.
pub fn dialogd(args: &[&str]) -> Output {
    dialogd_with_env(args, &[])
}

pub fn dialogd_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dialogd"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HUB_DOWNLOAD_TIMEOUT")
        .env_remove("DIALOGD_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run dialogd")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a clean failure: non-zero exit, a message containing `needle`,
/// and no panic.
pub fn assert_fails_with(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, got success; stdout: {}", stdout(out));
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
}

/// The DialogRPT/MMI golden file (scripts/make_golden_rpt.py).
pub fn rpt_golden() -> &'static Value {
    static GOLDEN: OnceLock<Value> = OnceLock::new();
    GOLDEN.get_or_init(|| golden("rpt"))
}

/// A synthetic DialogRPT checkpoint (`rpt-updown`, `rpt-depth`, …) or the
/// MMI reverse model (`rpt-mmi`) of the golden file, written once per run.
pub fn ranker_dir(name: &str) -> PathBuf {
    let g = rpt_golden();
    let spec = if name == "mmi" { &g["mmi"] } else { &g["rankers"][name] };
    let key = format!("{name}{}{}{}", spec["config"], spec["seed"], g["init"]);
    // Folder names like the published ones, so heads can be inferred.
    cached_checkpoint(&key, &format!("DialogRPT-{name}"), |dir| {
        let init: InitSpec = serde_json::from_value(g["init"].clone()).unwrap();
        let config: Gpt2Config = serde_json::from_value(spec["config"].clone()).unwrap();
        let seed = spec["seed"].as_u64().unwrap();
        if name == "mmi" {
            write_checkpoint(dir, &config, seed, &init, &fixtures().join("gpt2")).unwrap();
        } else {
            dialogd::model::synthetic::write_ranker_checkpoint(dir, &config, seed, &init, &fixtures().join("gpt2")).unwrap();
        }
    })
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("number array").iter().map(|x| x.as_f64().unwrap()).collect()
}

// ---- the daemon's test harness: a real redis-server, the daemon in-process ----

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real `redis-server` on a free loopback port, with no persistence,
/// killed on drop. `.ci/run` installs redis-server when it is missing.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// More `redis-server` arguments (`--requirepass …`, `--replicaof …`).
    args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server started with more arguments, kept for restarts.
    pub fn start_with(args: &[&str]) -> Self {
        let args = args.iter().map(|a| a.to_string()).collect();
        let mut server = Self { child: None, port: free_port(), dir: tempfile::tempdir().unwrap(), args };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server not found: apt-get install redis-server (.ci/run does)");
        self.child = Some(child);
        for _ in 0..200 {
            if self.ping() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("redis-server on port {port} did not come up");
    }

    /// Whether the server answers PING (a refusal for want of a password
    /// counts: it is up).
    pub fn ping(&self) -> bool {
        use std::io::{Read as _, Write as _};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(1)));
        let mut buf = [0u8; 16];
        stream.write_all(b"PING\r\n").is_ok() && stream.read(&mut buf).map(|n| buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH")).unwrap_or(false)
    }

    /// Kills the server (its data is gone: no persistence).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A client connection for inspecting what the daemon wrote.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url()).unwrap().get_connection().unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Settings from defaults plus `toml` (no environment layer).
pub fn settings_from(toml: &str) -> dialogd::settings::Settings {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dialogd.toml");
    std::fs::write(&path, toml).unwrap();
    dialogd::settings::load_raw_with_env(Some(&path), Vec::new()).unwrap().validate().unwrap()
}

/// Validates settings from TOML text, returning the error if any.
pub fn settings_result(toml: &str) -> Result<dialogd::settings::Settings, dialogd::settings::SettingsError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dialogd.toml");
    std::fs::write(&path, toml).unwrap();
    dialogd::settings::load_raw_with_env(Some(&path), Vec::new())?.validate()
}

/// Settings for an in-process daemon on the pico model: HTTP and metrics on
/// free loopback ports, context in `redis` (or memory when `None`).
/// `extra` adds `(section, "key = value")` lines.
pub fn daemon_toml(redis: Option<&RedisServer>, extra: &[(&str, &str)]) -> String {
    let store = match redis {
        Some(r) => format!("store = \"redis\"\nredis_url = \"{}\"", r.url()),
        None => "store = \"memory\"".to_string(),
    };
    let model = format!("path = \"{}\"", model_dir("pico-bin").display());
    let mut sections: Vec<(&str, Vec<String>)> = vec![
        ("model", vec![model]),
        ("generation", vec!["max_new_tokens = 16".into()]),
        ("context", vec![store, "max_tokens = 40".into(), "redis_timeout_ms = 500".into()]),
        ("adapters.http", vec!["listen = \"127.0.0.1:0\"".into()]),
        ("adapters.telegram", vec![]),
        ("adapters.discord", vec![]),
        // Off unless a test asks: the load run sends many messages.
        ("rate_limit", vec!["per_user = 0".into(), "per_channel = 0".into()]),
        ("telemetry", vec!["metrics_listen = \"127.0.0.1:0\"".into()]),
        ("safety", vec![]),
        ("ranking", vec![]),
        ("collect", vec![]),
        ("jobs", vec![]),
        ("personas", vec![]),
    ];
    for (section, line) in extra {
        let key = line.split('=').next().unwrap().trim();
        let Some((_, lines)) = sections.iter_mut().find(|(s, _)| s == section) else { panic!("no section {section}") };
        lines.retain(|l| l.split('=').next().unwrap().trim() != key);
        lines.push(line.to_string());
    }
    sections
        .iter()
        .filter(|(_, lines)| !lines.is_empty())
        .map(|(s, lines)| format!("[{s}]\n{}\n", lines.join("\n")))
        .collect()
}

/// [`daemon_toml`] on the memory store with `lines` (`key = value`) in one
/// `section`, for the platform tests.
pub fn section_toml(section: &str, lines: &[String]) -> String {
    let extra: Vec<(&str, &str)> = lines.iter().map(|l| (section, l.as_str())).collect();
    daemon_toml(None, &extra)
}

/// A moderator's message in an HTTP channel, for a daemon's core (the
/// HTTP adapter has no moderators).
pub fn moderator_inbound(channel: &str, author: &str, text: &str) -> dialogd_adapters::Inbound {
    dialogd_adapters::Inbound {
        channel: dialogd_adapters::ChannelKey::new(dialogd_adapters::Platform::Http, channel),
        author: author.into(),
        text: text.into(),
        msg_id: None,
        addressed_to_bot: true,
        moderator: true,
        operator: false,
        group: None,
        edit: None,
    }
}

/// A daemon running inside the test process.
pub struct TestDaemon {
    pub base: String,
    pub metrics_url: String,
    pub pipeline: dialogd::pipeline::Pipeline,
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), dialogd::daemon::DaemonError>>>,
}

impl TestDaemon {
    /// Loads the model named in `toml`'s settings and serves.
    pub async fn start(toml: &str) -> Self {
        Self::try_start(toml).await.unwrap()
    }

    /// [`Self::start`], handing back why the daemon did not start.
    pub async fn try_start(toml: &str) -> Result<Self, dialogd::daemon::DaemonError> {
        use dialogd::pipeline::engine::PoolEngine;
        let settings = settings_from(toml);
        let args = dialogd::cli::ModelArgs {
            model: settings.model.path.clone(),
            device: "cpu".into(),
            dtype: "auto".into(),
            quantize: settings.model.quantize.clone(),
            kv_cache: settings.model.kv_cache.clone(),
        };
        let loaded = dialogd::cli::load(&args, false).unwrap();
        let metrics = dialogd::telemetry::Metrics::new();
        let (engine, pool): (std::sync::Arc<dyn dialogd::pipeline::engine::ReplyEngine>, _) =
            if settings.generation.backend == dialogd::settings::Backend::Redis {
                // Generation by workers: this daemon's model is not used.
                let n_positions = loaded.model.config().n_positions;
                let engine = dialogd::cli::run::remote_engine(&settings, n_positions, metrics.clone()).await.unwrap();
                (std::sync::Arc::new(engine), None)
            } else {
                let engine = PoolEngine::start(loaded.model, &settings.generation, metrics.clone()).unwrap();
                let pool = Some(engine.handle().clone());
                (std::sync::Arc::new(engine), pool)
            };
        let daemon = dialogd::daemon::Daemon::start(settings, engine, pool, loaded.tokenizer, metrics).await?;
        let base = format!("http://{}", daemon.http_addr().unwrap());
        let metrics_url = format!("http://{}/metrics", daemon.metrics_addr().unwrap());
        let pipeline = daemon.pipeline().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(daemon.serve(async move {
            let _ = stopped.await;
        }));
        Ok(Self { base, metrics_url, pipeline, http: reqwest::Client::new(), stop: Some(stop), served: Some(served) })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs a message; returns the status and JSON body.
    pub async fn say(&self, channel: &str, author: &str, text: &str, message_id: Option<&str>) -> (u16, Value) {
        let mut body = serde_json::json!({ "author": author, "text": text });
        if let Some(id) = message_id {
            body["message_id"] = id.into();
        }
        let response = self.http.post(self.url(&format!("/v1/channels/{channel}/messages"))).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// The channel's turns as (author, text, bot) via the HTTP API.
    pub async fn turns(&self, channel: &str) -> Vec<(String, String, bool)> {
        let body: Value =
            self.http.get(self.url(&format!("/v1/channels/{channel}/context"))).send().await.unwrap().json().await.unwrap();
        body["turns"]
            .as_array()
            .unwrap_or_else(|| panic!("no turns in {body}"))
            .iter()
            .map(|t| (t["author"].as_str().unwrap().into(), t["text"].as_str().unwrap().into(), t["bot"].as_bool().unwrap()))
            .collect()
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.http.get(&self.metrics_url).send().await.unwrap().text().await.unwrap();
        metric_value(&text, name)
    }

    pub async fn health(&self) -> Value {
        self.http.get(self.url("/healthz")).send().await.unwrap().json().await.unwrap()
    }

    /// Shuts down and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.unwrap().unwrap();
        }
    }
}

/// A sample's value from Prometheus text. `name` with labels
/// (`x{a="b"}`) is one series; a bare name sums every series of that name,
/// as PromQL's `sum(x)` would (e.g. all platforms of
/// `dialogd_messages_in_total`). Panics when no series matches.
pub fn metric_value(text: &str, name: &str) -> f64 {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = if name.contains('{') { rest } else { rest.split_once('}').map_or(rest, |(labels, after)| if labels.starts_with('{') { after } else { rest }) };
            rest.strip_prefix(' ')
        })
        .map(|v| v.trim().parse().unwrap())
        .collect();
    assert!(!values.is_empty(), "no metric {name} in:\n{text}");
    values.iter().sum()
}

/// `promtool` from `$DIALOGD_PROMTOOL` or the `PATH`; `None` when it is not
/// installed, except under CI (`CI` set), where its absence is a failure.
pub fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("DIALOGD_PROMTOOL").map(PathBuf::from).or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join("promtool")).find(|p| p.is_file())
    });
    assert!(found.is_some() || std::env::var_os("CI").is_none(), "CI must install promtool (see .ci/run)");
    found
}

/// Lints Prometheus text with `promtool check metrics` (see [`promtool`];
/// skipped, saying so, where it is not installed); panics with what it said.
pub fn promtool_check(text: &str) {
    let Some(promtool) = promtool() else {
        eprintln!("promtool not installed: the lint step was skipped");
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check metrics:\n{said}\n{text}");
}

/// Checks Prometheus text (format 0.0.4): every line is `# HELP name …`,
/// `# TYPE name counter|gauge|histogram|…`, or a sample `name{k="v",…}
/// value` of a family whose TYPE came first (histograms' `_bucket`, `_sum`
/// and `_count` included); no family is described twice. Returns the
/// samples' names with labels.
pub fn parse_exposition(text: &str) -> Result<Vec<String>, String> {
    fn name_ok(name: &str) -> bool {
        let mut chars = name.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    fn labels_ok(labels: &str) -> bool {
        // k="v" pairs, comma separated; values without raw quotes or newlines.
        let mut rest = labels;
        while !rest.is_empty() {
            let Some((key, after)) = rest.split_once("=\"") else { return false };
            let Some(end) = after.find('"') else { return false };
            if !name_ok(key) || after[..end].contains('\n') {
                return false;
            }
            rest = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
        }
        true
    }
    let mut typed: HashSet<String> = HashSet::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| Err(format!("line {}: {why}: {line:?}", n + 1));
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (kind, name, tail) = (words.next().unwrap_or(""), words.next().unwrap_or(""), words.next().unwrap_or(""));
            if !name_ok(name) {
                return bad("bad metric name");
            }
            let fresh = match kind {
                "HELP" => helped.insert(name.to_string()),
                "TYPE" if ["counter", "gauge", "histogram", "summary", "untyped"].contains(&tail) => typed.insert(name.to_string()),
                _ => return bad("not HELP or TYPE"),
            };
            if !fresh {
                return bad("family described twice");
            }
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(parts) => parts,
            None => return bad("no value"),
        };
        if value.parse::<f64>().is_err() && !["+Inf", "-Inf", "NaN"].contains(&value) {
            return bad("value is not a number");
        }
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => match labels.strip_suffix('}') {
                Some(labels) => (name, labels),
                None => return bad("labels not closed"),
            },
            None => (series, ""),
        };
        if !name_ok(name) || !labels_ok(labels) {
            return bad("bad name or labels");
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        if !typed.contains(family) {
            return bad("sample before its TYPE");
        }
        samples.push(series.to_string());
    }
    Ok(samples)
}
