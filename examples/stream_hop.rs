//! The cost of generating through Redis Streams (`backend = "redis"`)
//! against the local pool, on one machine, in one run: the same requests
//! (fixed prompt and reply lengths) sent straight to a pool, then through
//! the stream to one worker on that same pool (so the difference is the
//! hop: XADD, XREADGROUP, the reply's XADD and XREAD, JSON both ways), then
//! to two workers with a pool each.
//!
//! ```text
//! cargo run --release --example stream_hop -- [--model DIR] [--redis-url URL]
//!     [--requests N] [--concurrency 1,8] [--prompt-tokens 16] [--new-tokens 8]
//! ```
//!
//! Without `--redis-url` it starts a `redis-server` on a free loopback port
//! (it must be on the PATH). The default model is the tiny test checkpoint,
//! which makes the hop visible next to generation. Prints one line per
//! backend and level: request latency p50/p99 (ms) and aggregate tokens/s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dialogd::pool::{GenerationPool, GenerationRequest, PoolConfig, PoolHandle};
use dialogd::remote::{self, StreamClient, WireRequest, WorkerOptions, WorkerStats};
use dialogd::sampling::SamplingParams;

struct Args {
    model: String,
    redis_url: Option<String>,
    requests: usize,
    concurrency: Vec<usize>,
    prompt_tokens: usize,
    new_tokens: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pico-bin").into(),
        redis_url: None,
        requests: 200,
        concurrency: vec![1, 8],
        prompt_tokens: 16,
        new_tokens: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || value.parse::<usize>().map_err(|_| format!("{flag}: {value:?} is not a number"));
        match flag.as_str() {
            "--model" => args.model = value.clone(),
            "--redis-url" => args.redis_url = Some(value.clone()),
            "--requests" => args.requests = number()?,
            "--prompt-tokens" => args.prompt_tokens = number()?,
            "--new-tokens" => args.new_tokens = number()?,
            "--concurrency" => {
                args.concurrency =
                    value.split(',').map(|v| v.trim().parse().map_err(|_| format!("--concurrency: {v:?}"))).collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

fn params(new_tokens: usize) -> SamplingParams {
    // Exactly `new_tokens` each: end-of-text is held back until then.
    SamplingParams { min_new_tokens: new_tokens, ..SamplingParams::greedy(new_tokens) }
}

fn prompt(seed: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| ((seed * 7919 + i * 104_729) % 50_000) as u32 + 1).collect()
}

fn start_pool(model: &str, max_batch: usize) -> Result<GenerationPool, Box<dyn std::error::Error>> {
    let spec = dialogd::serving::ModelSpec {
        model: model.into(),
        device: "cpu".into(),
        dtype: "auto".into(),
        quantize: "none".into(),
        kv_cache: "auto".into(),
    };
    let loaded = dialogd::serving::load(&spec)?;
    let config = PoolConfig { max_batch, queue_capacity: 4096, max_candidates: 1, ..PoolConfig::default() };
    Ok(GenerationPool::start(loaded.model, config)?)
}

/// Latencies of `requests` requests, `concurrency` at a time, and the wall time.
async fn drive<F, Fut>(requests: usize, concurrency: usize, one: F) -> (Vec<Duration>, Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let one = Arc::new(one);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (one, next) = (one.clone(), next.clone());
            tokio::spawn(async move {
                let mut took = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= requests {
                        return took;
                    }
                    let t = Instant::now();
                    one(i).await;
                    took.push(t.elapsed());
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all, started.elapsed())
}

fn pct(values: &mut [Duration], q: f64) -> f64 {
    values.sort();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1].as_secs_f64() * 1e3
}

fn report(backend: &str, level: usize, mut took: Vec<Duration>, wall: Duration, tokens: usize) -> f64 {
    let p50 = pct(&mut took, 0.5);
    println!(
        "{backend:<18} {level:>11} {p50:>12.2} {:>12.2} {:>16.1}",
        pct(&mut took, 0.99),
        tokens as f64 / wall.as_secs_f64()
    );
    p50
}

fn spawn_worker(url: &str, name: &str, handle: PoolHandle) -> tokio::sync::oneshot::Sender<()> {
    let options = WorkerOptions {
        redis_url: url.into(),
        key_prefix: "hop".into(),
        consumer: name.into(),
        max_inflight: 64,
        claim_idle: Duration::from_secs(600),
        // Only the device is read (no adapters, no promoted models here).
        model: dialogd::serving::ModelSpec {
            model: String::new(),
            device: "cpu".into(),
            dtype: "auto".into(),
            quantize: "none".into(),
            kv_cache: "auto".into(),
        },
        cache_dir: std::env::temp_dir().join("dialogd-stream-hop"),
        follow_base: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let stats = Arc::new(WorkerStats::default());
        remote::run_worker(options, handle, stats, async move {
            let _ = stopped.await;
        })
        .await
        .expect("worker");
    });
    stop
}

/// The `redis-server` this run started, stopped however the run ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let mut _server = None;
    let url = match &args.redis_url {
        Some(url) => url.clone(),
        None => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            _server = Some(Server(
                std::process::Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                    .stdout(std::process::Stdio::null())
                    .spawn()?,
            ));
            std::thread::sleep(Duration::from_millis(300));
            format!("redis://127.0.0.1:{port}/0")
        }
    };
    let max_level = args.concurrency.iter().copied().max().unwrap_or(1);
    let pool_a = start_pool(&args.model, max_level)?;
    let pool_b = start_pool(&args.model, max_level)?;
    let (a, b) = (pool_a.handle(), pool_b.handle());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (n, pt, nt) = (args.requests, args.prompt_tokens, args.new_tokens);
    runtime.block_on(async {
        // Warm-up: weights paged in, caches sized.
        for h in [&a, &b] {
            h.generate(GenerationRequest::new(prompt(0, pt), params(nt))).await.expect("warm-up");
        }
        let client = Arc::new(StreamClient::connect(&url, "hop", Duration::from_secs(120), 1_000_000).await.expect("redis"));
        println!("backend            concurrency  p50 ms/req   p99 ms/req  aggregate tok/s");
        for &level in &args.concurrency {
            let h = a.clone();
            let (took, wall) = drive(n, level, move |i| {
                let h = h.clone();
                async move {
                    h.generate(GenerationRequest::new(prompt(i, pt), params(nt))).await.expect("local");
                }
            })
            .await;
            let local = report("local pool", level, took, wall, n * nt);
            let mut stops = vec![spawn_worker(&url, "w1", a.clone())];
            let c = client.clone();
            let stream_one = move |i| {
                let c = c.clone();
                async move {
                    let request = WireRequest { prompt_ids: prompt(i, pt), params: params(nt), n_candidates: 1, adapter: None };
                    c.generate(&request).await.expect("stream");
                }
            };
            let (took, wall) = drive(n, level, stream_one.clone()).await;
            let one = report("stream, 1 worker", level, took, wall, n * nt);
            stops.push(spawn_worker(&url, "w2", b.clone()));
            let (took, wall) = drive(n, level, stream_one).await;
            report("stream, 2 workers", level, took, wall, n * nt);
            println!("{:<18} {level:>11} {:>12.2}", "hop (p50 diff)", one - local);
            for stop in stops {
                let _ = stop.send(());
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    });
    drop((a, b));
    pool_a.shutdown();
    pool_b.shutdown();
    Ok(())
}
