//! The `dialogd` binary as operators run it: `check-config`, `run` with a
//! real redis-server, restarts, SIGHUP, SIGTERM, and its logs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{assert_fails_with, dialogd, dialogd_with_env, free_port, metric_value, model_dir, stdout, RedisServer};

/// A `dialogd run` child with its stderr in a file.
struct Running {
    child: Child,
    log: PathBuf,
    base: String,
    metrics_url: String,
    http: reqwest::Client,
}

impl Running {
    async fn start(config: &Path, env: &[(&str, &str)], http_port: u16, metrics_port: u16) -> Self {
        let mut running = Self::spawn(config, env, http_port, metrics_port);
        running.wait_ready().await;
        running
    }

    /// Starts the process without waiting for it to serve.
    fn spawn(config: &Path, env: &[(&str, &str)], http_port: u16, metrics_port: u16) -> Self {
        let log = config.with_extension(format!("{http_port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dialogd"));
        cmd.args(["run", "--config"]).arg(config).env_remove("RUST_LOG").stdin(Stdio::null()).stdout(Stdio::null());
        cmd.stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let running = Self {
            child: cmd.spawn().unwrap(),
            log,
            base: format!("http://127.0.0.1:{http_port}"),
            metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics"),
            http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap(),
        };
        running
    }

    /// Waits (up to 30 s) for `/healthz` to answer 200.
    async fn wait_ready(&mut self) {
        let running = self;
        for _ in 0..300 {
            if let Some(status) = running.child.try_wait().unwrap() {
                panic!("dialogd exited early ({status}): {}", running.log_text());
            }
            if let Ok(r) = running.http.get(format!("{}/healthz", running.base)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        running.signal("KILL");
        panic!("dialogd not ready within 30 s: {}", running.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
    }

    async fn say(&self, channel: &str, text: &str, auth: Option<&str>) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}/v1/channels/{channel}/messages", self.base))
            .json(&serde_json::json!({ "author": "ann", "text": text }));
        if let Some(token) = auth {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.http.get(&self.metrics_url).send().await.unwrap().text().await.unwrap(), name)
    }

    /// Waits (boundedly) for the process to exit; returns its exit code.
    async fn wait_exit(&mut self) -> i32 {
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.signal("KILL");
        panic!("dialogd did not exit within 30 s: {}", self.log_text());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, model: &Path, redis: &RedisServer, http_port: u16, metrics_port: u16, extra: &str) -> PathBuf {
    let path = dir.join("dialogd.toml");
    let text = format!(
        "[model]\npath = \"{}\"\n[generation]\nmax_new_tokens = 16\n{extra}\n[context]\nredis_url = \"{}\"\nmax_tokens = 40\n\
         [adapters.http]\nlisten = \"127.0.0.1:{http_port}\"\n[telemetry]\nlog_format = \"json\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n",
        model.display(),
        redis.url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_config_redacts_secrets_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[context]\nredis_url = \"redis://:pa55word@db:6379/0\"\nmax_turns = 8\n").unwrap();
    let config = path.to_str().unwrap();
    let out = dialogd_with_env(&["check-config", "--config", config], &[("DIALOGD__ADAPTERS__HTTP__TOKEN", "tok-abcdef")]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let text = stdout(&out);
    let shown: toml::Table = text.parse().unwrap();
    assert_eq!(shown["context"]["max_turns"].as_integer(), Some(8));
    assert_eq!(shown["context"]["redis_url"].as_str(), Some("redis://:[redacted]@db:6379/0"));
    assert_eq!(shown["adapters"]["http"]["token"].as_str(), Some("[redacted]"));
    assert!(!text.contains("pa55word") && !text.contains("tok-abcdef"), "{text}");

    // Every URL form: a unix socket's password is a query parameter.
    std::fs::write(&path, "[context]\nredis_url = \"unix:///run/redis.sock?db=1&pass=unix-pa55\"\n").unwrap();
    let out = dialogd(&["check-config", "--config", config]);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let shown: toml::Table = stdout(&out).parse().unwrap();
    assert_eq!(shown["context"]["redis_url"].as_str(), Some("unix:///run/redis.sock?db=1&pass=[redacted]"));
    assert!(!stdout(&out).contains("unix-pa55"));
    // A URL `run` would refuse is refused here, redacted.
    std::fs::write(&path, "[context]\nredis_url = \"redis://:pw-x1@db:6379/notadb\"\n").unwrap();
    let out = dialogd(&["check-config", "--config", config]);
    assert_fails_with(&out, "context.redis_url");
    assert!(!crate::support::stderr(&out).contains("pw-x1"), "{}", crate::support::stderr(&out));

    // A misspelled override (one underscore) is named, not silently dropped.
    std::fs::write(&path, "").unwrap();
    let out = dialogd_with_env(&["check-config", "--config", config], &[("DIALOGD_ADAPTERS__HTTP__TOKEN", "tok-lost-1")]);
    assert!(out.status.success());
    let err = crate::support::stderr(&out);
    assert!(err.contains("DIALOGD_ADAPTERS__HTTP__TOKEN is ignored") && !err.contains("tok-lost-1"), "{err}");

    std::fs::write(&path, "[generation]\ntop_p = 3.0\n").unwrap();
    assert_fails_with(&dialogd(&["check-config", "--config", config]), "generation.top_p");
    // A ranker group whose weights sum to zero: `run` refuses it, and so
    // does `check-config`, before any model is read.
    std::fs::write(&path, "[ranking]\nrankers = [\"prior=/a:0.5\", \"prior=/b:-0.5\"]\n").unwrap();
    assert_fails_with(&dialogd(&["check-config", "--config", config]), "weights sum to 0");
    std::fs::write(&path, "[context]\nsotre = \"redis\"\n").unwrap();
    assert_fails_with(&dialogd(&["check-config", "--config", config]), "sotre");
    std::fs::write(&path, "").unwrap();
    let out = dialogd_with_env(&["check-config", "--config", config], &[("DIALOGD__CONTEXT__MAX_TURNS", "zero")]);
    assert_fails_with(&out, "max_turns");
    assert_fails_with(&dialogd(&["check-config", "--config", "/nonexistent/dialogd.toml"]), "/nonexistent/dialogd.toml");
    // Lenient readings are errors: a float in an integer key (not rounded),
    // a Discord id written as a float, bytes that are not UTF-8, a folder.
    std::fs::write(&path, "[daemon]\ndrain_secs = 1.5\n").unwrap();
    assert_fails_with(&dialogd(&["check-config", "--config", config]), "daemon.drain_secs: expected an integer");
    std::fs::write(&path, "[adapters.discord]\nallowed_guilds = [123456789012345678.0]\n").unwrap();
    assert_fails_with(&dialogd(&["check-config", "--config", config]), "adapters.discord.allowed_guilds[0]");
    std::fs::write(&path, b"[telemetry]\nlog_filter = \"\xc3\"\n").unwrap();
    assert_fails_with(&dialogd(&["check-config", "--config", config]), &format!("{config}: not UTF-8 text (line 2"));
    let folder = dir.path().to_str().unwrap();
    assert_fails_with(&dialogd(&["check-config", "--config", folder]), &format!("{folder}: is a directory"));
}

/// `run` refuses a Redis URL the redis crate cannot use, as `check-config`
/// does, and says why once (not once per error layer), without the password.
#[test]
fn run_refuses_a_bad_redis_url_and_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad-url.toml");
    let text = format!(
        "[model]\npath = \"{}\"\n[context]\nredis_url = \"redis://:pw-z9@127.0.0.1:1/notadb\"\n\
         [adapters.http]\nlisten = \"127.0.0.1:0\"\n[telemetry]\nmetrics_listen = \"\"\n",
        model_dir("pico-bin").display()
    );
    std::fs::write(&config, text).unwrap();
    for command in ["check-config", "run"] {
        let out = dialogd(&[command, "--config", config.to_str().unwrap()]);
        assert_fails_with(&out, "context.redis_url");
        let err = crate::support::stderr(&out);
        let error_line = err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{command}: {err}"));
        assert_eq!(error_line.matches("Invalid database number").count(), 1, "{command}: {error_line}");
        assert!(!err.contains("pw-z9"), "{command}: {err}");
    }
}

/// Stop the daemon, start it again: each channel's context is still in
/// Redis. Along the way: SIGHUP reloads, logs are JSON lines, and no
/// secret reaches them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_context_and_logs_hold_no_secret() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (http_port, metrics_port) = (free_port(), free_port());
    let config = write_config(dir.path(), &model_dir("pico-bin"), &redis, http_port, metrics_port, "");
    let token = "http-token-5f2b9c";
    let env = [
        ("DIALOGD__ADAPTERS__HTTP__TOKEN", token),
        ("DIALOGD__ADAPTERS__TELEGRAM__TOKEN", "telegram-token-77e1"),
        ("RUST_LOG", "debug"),
    ];
    let mut first = Running::start(&config, &env, http_port, metrics_port).await;
    assert_eq!(first.say("den", "hello", None).await.0, 401);
    let (status, a) = first.say("den", "Does money buy happiness?", Some(token)).await;
    assert_eq!(status, 200, "{a}");
    first.say("attic", "Is anyone up here?", Some(token)).await;

    // SIGHUP: a changed [generation] section applies without a restart.
    // A key that needs a restart changes too: the log names it.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("max_new_tokens = 16", "max_new_tokens = 8")
        .replace("max_tokens = 40", "max_tokens = 41");
    std::fs::write(&config, text).unwrap();
    first.signal("HUP");
    let mut reloaded = false;
    for _ in 0..100 {
        if first.metric("dialogd_reloads_total").await == 1.0 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "no reload: {}", first.log_text());
    assert_eq!(first.say("den", "Still there?", Some(token)).await.0, 200);

    first.signal("TERM");
    assert_eq!(first.wait_exit().await, 0, "{}", first.log_text());
    let log = first.log_text();
    assert!(log.contains("reloaded generation settings"), "{log}");
    let restart = log.lines().find(|l| l.contains("applied only at restart")).unwrap_or_else(|| panic!("{log}"));
    assert_eq!(serde_json::from_str::<Value>(restart).unwrap()["key"], "context.max_tokens", "{restart}");
    // The log says how the model is served.
    let loading = log.lines().find(|l| l.contains("loading model")).unwrap_or_else(|| panic!("no loading line: {log}"));
    let loading: Value = serde_json::from_str(loading).unwrap();
    assert_eq!((&loading["quantize"], &loading["kv_cache"]), (&Value::from("auto"), &Value::from("auto")), "{loading}");
    // And what `auto` came to: pico's n_embd of 8 does not fit 8-bit
    // blocks of 32, so its weights are served as loaded; f16 caches.
    let ready = log.lines().find(|l| l.contains("model ready to serve")).unwrap_or_else(|| panic!("no ready line: {log}"));
    let ready: Value = serde_json::from_str(ready).unwrap();
    assert_eq!((&ready["weights"], &ready["kv_cache"]), (&Value::from("as loaded"), &Value::from("f16")), "{ready}");
    for line in log.lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    assert!(!log.contains(token) && !log.contains("telegram-token-77e1"), "a token reached the log:\n{log}");

    let second = Running::start(&config, &env, http_port, metrics_port).await;
    let context: Value = second
        .http
        .get(format!("{}/v1/channels/den/context", second.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let turns = context["turns"].as_array().unwrap();
    let user: Vec<&str> = turns.iter().filter(|t| t["bot"] == false).map(|t| t["text"].as_str().unwrap()).collect();
    assert_eq!(user, ["Does money buy happiness?", "Still there?"], "{context}");
    assert_eq!(turns[1]["text"], a["reply"], "{context}");
    let (_, attic) = second.say("attic", "Hello?", Some(token)).await;
    assert!(attic.get("reply").is_some());
}

/// SIGTERM while replies are being generated: every accepted message is
/// still answered, systemd hears READY=1 and STOPPING=1, the exit code
/// is 0 and nothing listens afterwards.
/// A config whose replies are long (100 tokens from a near-uniform model),
/// so messages stay in flight or queued; `drain_secs` as given.
fn long_replies_config(dir: &Path, redis: &RedisServer, http_port: u16, metrics_port: u16, drain_secs: u64) -> PathBuf {
    let config = write_config(dir, &model_dir("tiny"), redis, http_port, metrics_port, "temperature = 1.5\ntop_k = 0\ntop_p = 1.0\nno_repeat_ngram = 0\n");
    let text = std::fs::read_to_string(&config).unwrap().replace("max_new_tokens = 16", "max_new_tokens = 100").replace("max_tokens = 40", "max_tokens = 24")
        + &format!("[daemon]\ndrain_secs = {drain_secs}\n");
    std::fs::write(&config, text).unwrap();
    config
}

/// Sends `n` "tell me a long story" messages, one author each (rate
/// limits), to the channel `channel(i)`; waits until the daemon has taken
/// them all. Each task gives the status, `Retry-After` and body.
async fn send_long_stories(d: &Running, n: usize, channel: impl Fn(usize) -> String) -> Vec<tokio::task::JoinHandle<(u16, Option<String>, Value)>> {
    let mut requests = Vec::new();
    for c in 0..n {
        let (http, url) = (d.http.clone(), format!("{}/v1/channels/{}/messages", d.base, channel(c)));
        requests.push(tokio::spawn(async move {
            let body = serde_json::json!({ "author": format!("ann{c}"), "text": format!("tell me a long story, {c}") });
            let response = http.post(url).json(&body).send().await.unwrap();
            let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            (response.status().as_u16(), retry_after, response.json::<Value>().await.unwrap())
        }));
    }
    let mut accepted = false;
    for _ in 0..400 {
        if d.metric("dialogd_messages_in_total").await == n as f64 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(accepted, "messages were not all accepted: {}", d.log_text());
    requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_replies() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (http_port, metrics_port) = (free_port(), free_port());
    // Long replies from a near-uniform model keep the one model thread busy.
    // The drain bound is generous: the claim is that every accepted message
    // is answered, and on a loaded 2-core machine the replies took ~29 s
    // against the 30 s default (their bodies were cut at the bound).
    let config = long_replies_config(dir.path(), &redis, http_port, metrics_port, 300);
    // Readiness and stopping reach systemd's notify socket.
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut d = Running::start(&config, &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())], http_port, metrics_port).await;
    let mut buf = [0u8; 64];
    let n_read = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n_read], b"READY=1");
    let n = 8;
    let requests = send_long_stories(&d, n, |c| format!("drain-{c}")).await;
    let answered_before = d.metric("dialogd_messages_out_total").await;
    d.signal("TERM");
    assert!(answered_before < n as f64, "every reply finished before SIGTERM; the test proves nothing");
    for request in requests {
        let (status, _, body) = request.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.get("reply").is_some(), "{body}");
    }
    assert_eq!(d.wait_exit().await, 0, "{}", d.log_text());
    let n_read = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n_read], b"STOPPING=1");
    let log = d.log_text();
    assert!(log.contains("drained: every accepted message was answered"), "{log}");
    // Gone: nothing listens any more.
    assert!(d.http.get(format!("{}/healthz", d.base)).send().await.is_err());
}

/// The console adapter: stdin lines in, `bot>` lines out, one channel with
/// its own context; end of input stops the daemon cleanly.
#[test]
fn the_console_adapter_talks_on_stdin_and_stdout() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("console.toml");
    let text = format!(
        "[model]\npath = \"{}\"\n[generation]\nmax_new_tokens = 8\n[context]\nstore = \"memory\"\n\
         [adapters.http]\nenabled = false\n[adapters.console]\nenabled = true\n[telemetry]\nmetrics_listen = \"\"\n",
        model_dir("pico-bin").display()
    );
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dialogd"))
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello bot\n\n/help\n/reset\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("bot> ") || lines[0] == "(no reply: no_safe_candidate)", "{text}");
    assert!(lines[1].contains("/forget"), "{text}");
    assert!(lines[2].contains("forgotten"), "{text}");
}

/// Makes a throwaway CA and a server certificate for 127.0.0.1 in `dir`
/// with the `openssl` command: (ca.crt, server.crt, server.key).
fn throwaway_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl command");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run(&[&["req", "-x509"][..], &ec, &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=dialogd test CA"]].concat());
    run(&[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]].concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "2",
        "-extfile", "server.ext",
    ]);
    // redis-server runs as this user and reads the key itself.
    (dir.join("ca.crt"), dir.join("server.crt"), dir.join("server.key"))
}

/// `rediss://` URLs work: the daemon stores and reads a conversation in a
/// redis-server that it reaches only over TLS (rustls), trusting a private
/// CA given with `SSL_CERT_FILE`. Skipped, saying so, where redis-server
/// was built without TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_reach_redis_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = throwaway_certificates(dir.path());
    let tls_port = free_port().to_string();
    let tls_args = [
        "--tls-port", &tls_port, "--tls-cert-file", cert.to_str().unwrap(), "--tls-key-file", key.to_str().unwrap(),
        "--tls-ca-cert-file", ca.to_str().unwrap(), "--tls-auth-clients", "no",
    ];
    // A redis-server without TLS refuses the tls-* options at once.
    let mut probe = Command::new("redis-server")
        .args(["--port", "0", "--save", ""])
        .args(tls_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    if let Some(status) = probe.try_wait().unwrap() {
        let out = probe.wait_with_output().unwrap();
        eprintln!(
            "SKIPPED rediss_urls_reach_redis_over_tls: redis-server exited ({status}) with TLS options, so it lacks TLS support: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        return;
    }
    let _ = probe.kill();
    let _ = probe.wait();

    let redis = RedisServer::start_with(&tls_args);
    let (http_port, metrics_port) = (free_port(), free_port());
    let config = write_config(dir.path(), &model_dir("pico-bin"), &redis, http_port, metrics_port, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(&redis.url(), &format!("rediss://127.0.0.1:{tls_port}/0"));
    std::fs::write(&config, text).unwrap();
    let d = Running::start(&config, &[("SSL_CERT_FILE", ca.to_str().unwrap())], http_port, metrics_port).await;
    let health: Value = d.http.get(format!("{}/healthz", d.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["health"]["store_up"], true, "{health}: {}", d.log_text());
    let (status, body) = d.say("tls", "Hello over TLS", None).await;
    assert_eq!(status, 200, "{body}");
    let context: Value =
        d.http.get(format!("{}/v1/channels/tls/context", d.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(context["turns"][0]["text"], "Hello over TLS", "{context}");
    // It is in that Redis (read here on the server's plain port).
    use redis::Commands as _;
    assert_eq!(redis.client().llen::<_, usize>("dialogd:ctx:http:tls").unwrap(), context["turns"].as_array().unwrap().len());
    assert_eq!(d.metric("dialogd_redis_errors_total").await, 0.0);
}

/// SIGHUP while the model loads (systemd's `ExecReload` can send it at any
/// time) neither kills the daemon nor is lost: the reload is applied once
/// the daemon serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_model_loading_is_applied_after_it() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (http_port, metrics_port) = (free_port(), free_port());
    let config = write_config(dir.path(), &model_dir("tiny"), &redis, http_port, metrics_port, "");
    let mut d = Running::spawn(&config, &[], http_port, metrics_port);
    let mut loading = false;
    for _ in 0..600 {
        if d.log_text().contains("loading model") {
            loading = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(loading, "no 'loading model' line: {}", d.log_text());
    let text = std::fs::read_to_string(&config).unwrap().replace("max_new_tokens = 16", "max_new_tokens = 8");
    std::fs::write(&config, text).unwrap();
    d.signal("HUP");
    d.wait_ready().await;
    let mut reloaded = false;
    for _ in 0..100 {
        if d.metric("dialogd_reloads_total").await == 1.0 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the SIGHUP sent during loading was not applied: {}", d.log_text());
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon died");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failures_keep_the_error_behind_them() {
    use std::error::Error as _;

    use dialogd::collect::CollectError;
    use dialogd::daemon::DaemonError;
    use dialogd::model::ModelError;
    use dialogd::pipeline::rank::RankerError;

    use crate::support::{daemon_toml, TestDaemon};

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ranker");
    let ranker = format!("rankers = [\"{}\"]", missing.display());
    let Err(err) = TestDaemon::try_start(&daemon_toml(None, &[("ranking", &ranker)])).await else {
        panic!("a missing ranker folder must stop the start");
    };
    assert!(matches!(&err, DaemonError::Ranking(RankerError::Model(ModelError::MissingFolder(p))) if *p == missing), "{err:?}");
    assert!(err.to_string().starts_with("ranking: "), "{err}");
    assert!(err.source().is_some_and(|s| s.is::<RankerError>()));

    // A file where the collection folder should be.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let collect = [
        ("collect", "enabled = true".to_string()),
        ("collect", format!("dir = \"{}\"", file.display())),
        ("collect", "author_key = \"0123456789abcdef\"".to_string()),
    ];
    let extra: Vec<(&str, &str)> = collect.iter().map(|(s, l)| (*s, l.as_str())).collect();
    let Err(err) = TestDaemon::try_start(&daemon_toml(None, &extra)).await else {
        panic!("an unusable collect.dir must stop the start");
    };
    assert!(matches!(&err, DaemonError::Collect(CollectError::Io { path, .. }) if *path == file), "{err:?}");
    assert!(err.to_string().starts_with("collect.dir: "), "{err}");
    let io = err.source().and_then(|s| s.source()).and_then(|s| s.downcast_ref::<std::io::Error>());
    assert!(io.is_some(), "the io::Error is at the end of the chain: {err:?}");
}

/// Issue #16 point 2: a Telegram token the Bot API refuses (401) ends
/// `dialogd run` non-zero with the reason (so systemd's
/// Restart=on-failure sees it), in the JSON log format asked for, without
/// the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_non_zero_when_an_adapter_cannot_start() {
    let fake = crate::fakes::telegram::FakeTelegram::start("123456:the-right-token").await;
    let dir = tempfile::tempdir().unwrap();
    // Ports the system picks (nothing is asked of them here).
    let config = dir.path().join("dialogd.toml");
    let text = format!(
        "[model]\npath = \"{}\"\n[context]\nstore = \"memory\"\n[adapters.http]\nlisten = \"127.0.0.1:0\"\n\
         [adapters.telegram]\nenabled = true\napi_url = \"{}\"\n[telemetry]\nlog_format = \"json\"\nmetrics_listen = \"127.0.0.1:0\"\n",
        model_dir("pico-bin").display(),
        fake.url
    );
    std::fs::write(&config, text).unwrap();
    let wrong = "123456:wrong-token-3f9a";
    let mut d = Running::spawn(&config, &[("DIALOGD__ADAPTERS__TELEGRAM__TOKEN", wrong)], 0, 0);
    let code = d.wait_exit().await;
    let log = d.log_text();
    assert_ne!(code, 0, "{log}");
    assert!(!log.contains(wrong) && !log.contains("wrong-token"), "the token reached the log:\n{log}");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    let last = lines.last().expect("a log line");
    assert_eq!(last["level"], "ERROR", "{log}");
    let reason = last["error"].as_str().unwrap_or_default();
    assert!(reason.contains("telegram") && reason.contains("getMe"), "{log}");
}

/// The JSON log lines written so far (a line cut off mid-write is skipped).
fn json_lines(log: &str) -> Vec<Value> {
    log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Issue #16 point 3: a first run that downloads the model from the hub
/// (a loopback fake through `HF_ENDPOINT`, whose weights stall halfway)
/// logs the download's progress (file, bytes, percent) every few seconds,
/// serves `/healthz` (503 "loading"), `/metrics` and 503 refusals while it
/// loads, and SIGTERM ends it promptly, with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_download_logs_progress_answers_loading_and_stops_on_sigterm() {
    let model = model_dir("tiny");
    let weights = std::fs::metadata(model.join("model.safetensors")).unwrap().len();
    let hub = crate::fakes::hub::FakeHub::start("fake-org/tiny", &model, Some("model.safetensors")).await;
    let dir = tempfile::tempdir().unwrap();
    let (http_port, metrics_port) = (free_port(), free_port());
    let config = dir.path().join("dialogd.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = \"fake-org/tiny\"\n[context]\nstore = \"memory\"\n[adapters.http]\nlisten = \"127.0.0.1:{http_port}\"\n\
             [telemetry]\nlog_format = \"json\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n"
        ),
    )
    .unwrap();
    let hf_home = dir.path().join("hf");
    // A stall limit far beyond the test, so that the download stays
    // stalled until SIGTERM.
    let env = [
        ("HF_ENDPOINT", hub.url.as_str()),
        ("HF_HOME", hf_home.to_str().unwrap()),
        ("HF_HUB_OFFLINE", "0"),
        ("HF_HUB_DOWNLOAD_TIMEOUT", "600"),
    ];
    let mut d = Running::spawn(&config, &env, http_port, metrics_port);
    // /healthz answers from the start, 503 "loading".
    let mut health = None;
    for _ in 0..300 {
        assert!(d.child.try_wait().unwrap().is_none(), "dialogd exited: {}", d.log_text());
        if let Ok(r) = d.http.get(format!("{}/healthz", d.base)).send().await {
            health = Some((r.status().as_u16(), r.json::<Value>().await.unwrap()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = health.unwrap_or_else(|| panic!("no /healthz while loading: {}", d.log_text()));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "loading", "{body}");
    assert_eq!(body["health"]["ready"], false, "{body}");
    let response = d.http.post(format!("{}/v1/channels/c1/messages", d.base)).json(&serde_json::json!({"author": "ann", "text": "hi"})).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let text = d.http.get(&d.metrics_url).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("dialogd_messages_in_total"), "{text}");
    // Progress lines for the stalled file, by a timer: the bytes stop
    // arriving, the lines do not.
    let mut progress = Vec::new();
    for _ in 0..200 {
        progress = json_lines(&d.log_text())
            .into_iter()
            .filter(|l| l["message"] == "downloading" && l["file"] == "model.safetensors")
            .collect();
        if progress.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(progress.len() >= 2, "two progress lines within 10 s: {}", d.log_text());
    let last = progress.last().unwrap();
    assert_eq!(last["level"], "INFO", "{last}");
    // hf-hub asks for 10 MB ranges; the fake stalls halfway through the first.
    let bytes = last["bytes"].as_u64().unwrap();
    assert_eq!(bytes, weights.min(10_000_000) / 2, "{last}");
    assert_eq!(last["total_bytes"].as_u64(), Some(weights), "{last}");
    let percent = last["percent"].as_f64().unwrap();
    assert!((percent - bytes as f64 * 100.0 / weights as f64).abs() <= 0.05, "{last}");
    assert_eq!(progress[progress.len() - 2]["bytes"], last["bytes"], "stalled: the same count, told again");
    assert_eq!(last["model"], "fake-org/tiny", "{last}");
    // The files before it were downloaded whole.
    let log = d.log_text();
    assert!(json_lines(&log).iter().any(|l| l["message"] == "downloaded" && l["file"] == "config.json"), "{log}");
    // Still loading; SIGTERM ends it promptly.
    assert_eq!(d.http.get(format!("{}/healthz", d.base)).send().await.unwrap().status(), 503);
    let asked = std::time::Instant::now();
    d.signal("TERM");
    let code = d.wait_exit().await;
    let took = asked.elapsed();
    assert_eq!(code, 0, "{}", d.log_text());
    assert!(took < Duration::from_secs(3), "SIGTERM took {took:?} to end the load");
    let log = d.log_text();
    assert!(json_lines(&log).iter().any(|l| l["message"] == "stopped while loading: nothing was served"), "{log}");
}

/// Issue #16 point 8: one info line per handled message (channel,
/// platform, latency_ms, candidates drawn and kept; the reason when there
/// is no reply), no Rust Debug formatting in any field, no colour codes in
/// piped stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_handled_message_is_one_json_log_line_without_debug_or_colour() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (http_port, metrics_port) = (free_port(), free_port());
    let config = write_config(dir.path(), &model_dir("tiny"), &redis, http_port, metrics_port, "candidates = 3\n");
    let d = Running::start(&config, &[], http_port, metrics_port).await;
    let body = serde_json::json!({ "author": "ann", "text": "Does money buy happiness?", "message_id": "m-1" });
    let url = format!("{}/v1/channels/logs-1/messages", d.base);
    let first = d.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    // The same id again: no reply, reason "duplicate".
    let again: Value = d.http.post(&url).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(again["reason"], "duplicate", "{again}");
    let mut handled = Vec::new();
    for _ in 0..100 {
        handled = json_lines(&d.log_text()).into_iter().filter(|l| l["message"] == "message handled").collect();
        if handled.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(handled.len(), 2, "{}", d.log_text());
    let (one, two) = (&handled[0], &handled[1]);
    assert_eq!(one["level"], "INFO", "{one}");
    assert_eq!(one["channel"], "logs-1", "{one}");
    assert_eq!(one["platform"], "http", "{one}");
    assert!(one["latency_ms"].as_u64().is_some(), "{one}");
    assert_eq!(one["candidates_drawn"].as_u64(), Some(3), "{one}");
    let kept = one["candidates_kept"].as_u64().unwrap();
    assert!((1..=3).contains(&kept), "{one}");
    if first["reply"].is_string() {
        assert_eq!(one["replied"], true, "{one}");
        assert!(one.get("reason").is_none(), "no reason with a reply: {one}");
    }
    assert_eq!(two["replied"], false, "{two}");
    assert_eq!(two["reason"], "duplicate", "{two}");
    assert_eq!(two["candidates_drawn"].as_u64(), Some(0), "{two}");
    let log = d.log_text();
    assert!(!log.contains('\x1b'), "ANSI escapes in piped stderr");
    for line in json_lines(&log) {
        for (key, value) in line.as_object().unwrap() {
            let text = value.as_str().unwrap_or_default();
            assert!(!text.starts_with("Some(") && !text.contains(" { ") && !text.starts_with('['), "Debug formatting in {key}: {line}");
        }
    }
}

/// Issue #16 point 9: requests still queued when the drain bound passes
/// get a 503 with `Retry-After`, through real HTTP, and the daemon exits 0
/// soon after the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_queued_at_the_drain_bound_get_503() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (http_port, metrics_port) = (free_port(), free_port());
    // Long replies: one channel's queue stays full past a 1 s drain.
    let config = long_replies_config(dir.path(), &redis, http_port, metrics_port, 1);
    let mut d = Running::start(&config, &[], http_port, metrics_port).await;
    let requests = send_long_stories(&d, 6, |_| "drain-bound".to_string()).await;
    let asked = std::time::Instant::now();
    d.signal("TERM");
    let mut refused = 0;
    for request in requests {
        let (status, retry_after, body) = request.await.unwrap();
        match status {
            200 => assert!(body.get("reply").is_some(), "{body}"),
            503 => {
                refused += 1;
                assert_eq!(retry_after.as_deref(), Some("1"), "{body}");
                assert_eq!(body["error"], "shutting down", "{body}");
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(refused >= 1, "every queued message finished within the 1 s drain; the test proves nothing: {}", d.log_text());
    assert_eq!(d.wait_exit().await, 0, "{}", d.log_text());
    assert!(asked.elapsed() < Duration::from_secs(10), "exit {:?} after SIGTERM with drain_secs = 1", asked.elapsed());
    let log = d.log_text();
    assert!(log.contains("drain took too long"), "{log}");
}

/// Issue #13 point 7: one Telegram poller per bot token. A daemon polling
/// holds the token's lease in Redis (its key a hash, never the token); a
/// second `dialogd run` on the same Redis and token refuses to start the
/// Telegram adapter, says why, and exits non-zero, while the first keeps
/// answering; the first gives the lease back when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_telegram_poller_on_one_token_is_refused() {
    let token = "123456:poller-secret-token-77";
    let fake = crate::fakes::telegram::FakeTelegram::start(token).await;
    let redis = RedisServer::start();
    let telegram = [
        ("adapters.telegram", "enabled = true".to_string()),
        ("adapters.telegram", format!("token = \"{token}\"")),
        ("adapters.telegram", format!("api_url = \"{}\"", fake.url)),
        ("adapters.telegram", "poll_timeout_secs = 1".to_string()),
    ];
    let extra: Vec<(&str, &str)> = telegram.iter().map(|(s, l)| (*s, l.as_str())).collect();
    let first = crate::support::TestDaemon::start(&crate::support::daemon_toml(Some(&redis), &extra)).await;
    let wait = Duration::from_secs(20);
    crate::fakes::wait_for(wait, || fake.calls("setMyCommands").pop()).await.expect("the first daemon's adapter runs");
    let leases: Vec<String> = redis::cmd("KEYS").arg("*lease:telegram:poller-*").query(&mut redis.client()).unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert!(!leases[0].contains("secret") && !leases[0].contains("123456"), "the token is in the key: {leases:?}");

    // The second instance: same Redis, same token, as operators run it.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dialogd.toml");
    let text = format!(
        "[model]\npath = \"{}\"\n[context]\nstore = \"redis\"\nredis_url = \"{}\"\n[adapters.http]\nlisten = \"127.0.0.1:0\"\n\
         [adapters.telegram]\nenabled = true\napi_url = \"{}\"\npoll_timeout_secs = 1\n[telemetry]\nlog_format = \"json\"\nmetrics_listen = \"127.0.0.1:0\"\n",
        model_dir("pico-bin").display(),
        redis.url(),
        fake.url
    );
    std::fs::write(&config, text).unwrap();
    let mut second = Running::spawn(&config, &[("DIALOGD__ADAPTERS__TELEGRAM__TOKEN", token)], 0, 0);
    let code = second.wait_exit().await;
    let log = second.log_text();
    assert_ne!(code, 0, "{log}");
    assert!(!log.contains(token) && !log.contains("poller-secret"), "the token reached the log:\n{log}");
    let last = json_lines(&log).pop().expect("a log line");
    let reason = last["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("another dialogd instance already runs the telegram adapter for this bot token")
            && reason.contains("disable adapters.telegram here")
            && reason.contains(&leases[0].split_once(":lease:").unwrap().1.to_string()),
        "{log}"
    );

    // The first keeps polling and answering, alone on the token.
    let asked = fake.say(5, 5, "Are you still there?", None);
    let reply = crate::fakes::wait_for(wait, || fake.sent_to(5).first().cloned()).await.expect("the first daemon answers");
    assert_eq!(reply["reply_parameters"]["message_id"].as_i64(), Some(asked));
    first.stop().await;
    let leases: Vec<String> = redis::cmd("KEYS").arg("*lease:telegram:poller-*").query(&mut redis.client()).unwrap();
    assert!(leases.is_empty(), "a clean stop gives the lease back: {leases:?}");
}
