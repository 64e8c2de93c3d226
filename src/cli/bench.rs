//! `dialogd bench`: throughput and latency of the generation pool.
//!
//! For each concurrency level, after a warm-up, it submits that many
//! simultaneous requests (distinct prompts of the given length, end-of-text
//! ignored so each makes exactly `--new-tokens`) and prints one JSON line:
//! time to first token (p50, p99), one sequence's decode speed after its first
//! token (median over the requests), aggregate tokens per second over the
//! wall time including prefill, the longest wait between two tokens of a
//! request (median and worst over the requests), and the process's peak RSS
//! so far. With `--long-prompt-tokens N`, once every request of a level has
//! its first token, one more request with an N-token prompt arrives while
//! they decode: a mixed load, whose cost shows as the others' longest token
//! gap and whose own time to first token is reported beside it (compare
//! `--max-prefill-tokens` values to see what chunked prefill buys). With
//! `--adapter`, every request runs through that LoRA adapter at run time
//! (the cost of serving a persona without merging it).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::{load, ModelArgs};
use crate::pool::{GenerationPool, GenerationRequest, PoolConfig};
use crate::sampling::{Rng, SamplingParams};
use crate::training::lora::LoraAdapter;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length of every request, in tokens.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Comma-separated numbers of simultaneous requests.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Most prompt tokens the pool prefills in one step (the pool's
    /// default when not given).
    #[arg(long, value_name = "TOKENS")]
    pub max_prefill_tokens: Option<usize>,
    /// Once every request of a level has its first token, submit one more
    /// with a prompt of this many tokens (a mixed load: a long prompt
    /// prefilled beside decoding sequences). 0: none.
    #[arg(long, default_value_t = 0, value_name = "TOKENS")]
    pub long_prompt_tokens: usize,
    /// One JSON object per level on its own line (otherwise a table).
    #[arg(long)]
    pub json: bool,
    /// Run every request through this LoRA adapter folder, applied at run
    /// time over the base model (not merged).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
}

/// One level's measurements.
#[derive(Debug, serde::Serialize)]
pub struct LevelReport {
    pub concurrency: usize,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p99: f64,
    pub decode_tokens_per_s: f64,
    pub aggregate_tokens_per_s: f64,
    /// Each request's longest wait between two of its tokens: the median
    /// and the worst over the level's requests (the long prompt's excluded).
    pub token_gap_ms_p50: f64,
    pub token_gap_ms_max: f64,
    /// With `--long-prompt-tokens`: that request's time to first token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub long_prompt_ttft_ms: Option<f64>,
    pub peak_rss_mb: f64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        anyhow::bail!("--concurrency takes positive numbers, such as 1,8,32");
    }
    if args.prompt_tokens == 0 || args.new_tokens < 2 {
        anyhow::bail!("--prompt-tokens must be at least 1 and --new-tokens at least 2");
    }
    let adapter = args.adapter.as_deref().map(LoraAdapter::load).transpose()?;
    let loaded = load(&args.model, !args.json)?;
    let adapter = match adapter {
        Some(adapter) => {
            let runtime = adapter.runtime(loaded.model.config())?.to_device(loaded.model.device())?;
            if !args.json {
                eprintln!("serving through the LoRA adapter {} (rank {})", adapter.dir.display(), runtime.rank());
            }
            Some(Arc::new(runtime))
        }
        None => None,
    };
    let model = loaded.model;
    let n_positions = model.config().n_positions;
    if args.prompt_tokens + args.new_tokens > n_positions {
        anyhow::bail!("{} + {} tokens do not fit the model's context of {n_positions}", args.prompt_tokens, args.new_tokens);
    }
    // The long request draws two tokens: only its first one is measured.
    if args.long_prompt_tokens + 2 > n_positions {
        anyhow::bail!("--long-prompt-tokens {} (+ 2 new) does not fit the model's context of {n_positions}", args.long_prompt_tokens);
    }
    let eos = model.config().eos_token_id;
    let max_level = *args.concurrency.iter().max().unwrap_or(&1);
    let long = usize::from(args.long_prompt_tokens > 0);
    let mut config =
        PoolConfig { max_batch: max_level + long, queue_capacity: max_level + long, max_candidates: 1, ..PoolConfig::default() };
    if let Some(tokens) = args.max_prefill_tokens {
        config.max_prefill_tokens = tokens;
    }
    let pool = GenerationPool::start(model, config)?;
    let handle = pool.handle();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let prompt = |seed: u64, len: usize| -> Vec<u32> {
        // Distinct, deterministic prompts of ordinary token ids.
        let mut rng = Rng::new(seed);
        let mut ids: Vec<u32> = (1..len).map(|_| (rng.next_u64() % 50000) as u32).collect();
        ids.push(eos);
        ids
    };
    let request_of = |seed: u64, len: usize, new_tokens: usize| GenerationRequest {
        ignore_eos: true,
        adapter: adapter.clone(),
        ..GenerationRequest::new(prompt(seed, len), SamplingParams::greedy(new_tokens))
    };
    let request = |seed: u64, new_tokens: usize| request_of(seed, args.prompt_tokens, new_tokens);
    // Warm-up: page the weights in, size the caches and thread pools.
    handle.generate_blocking(request(u64::MAX, 4))?;
    let mut stdout = std::io::stdout().lock();
    if !args.json {
        writeln!(
            stdout,
            "concurrency  ttft p50 ms  ttft p99 ms  decode tok/s  aggregate tok/s  gap p50 ms  gap max ms  long ttft ms  peak RSS MB"
        )?;
    }
    for (level_idx, &concurrency) in args.concurrency.iter().enumerate() {
        let past_first_before = requests_past_first_token(&handle);
        let started = Instant::now();
        let (results, long_result) = runtime.block_on(async {
            let tasks: Vec<_> = (0..concurrency)
                .map(|i| {
                    let handle = handle.clone();
                    let req = request((level_idx * 10_000 + i) as u64, args.new_tokens);
                    tokio::spawn(async move { handle.generate(req).await })
                })
                .collect();
            let long_task = (args.long_prompt_tokens > 0).then(|| {
                let handle = handle.clone();
                let req = request_of((level_idx * 10_000 + 9_999) as u64, args.long_prompt_tokens, 2);
                tokio::spawn(async move {
                    // Arrive once every other request is decoding.
                    while requests_past_first_token(&handle) < past_first_before + concurrency as u64 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    handle.generate(req).await
                })
            });
            let mut out = Vec::with_capacity(tasks.len());
            for task in tasks {
                out.push(task.await);
            }
            let long = match long_task {
                Some(task) => Some(task.await),
                None => None,
            };
            (out, long)
        });
        let wall = started.elapsed();
        let long_prompt_ttft_ms = long_result.map(|r| anyhow::Ok(r??.time_to_first_token.as_secs_f64() * 1e3)).transpose()?;
        let mut ttfts = Vec::new();
        let mut gaps = Vec::new();
        let mut decode_rates = Vec::new();
        let mut generated = 0;
        for result in results {
            let result = result??;
            let n = result.candidates[0].output_ids.len();
            generated += n;
            ttfts.push(result.time_to_first_token);
            gaps.push(result.longest_token_gap);
            let decode = result.total.saturating_sub(result.time_to_first_token);
            if n > 1 && decode > Duration::ZERO {
                decode_rates.push((n - 1) as f64 / decode.as_secs_f64());
            }
        }
        let report = LevelReport {
            concurrency,
            ttft_ms_p50: percentile_ms(&mut ttfts, 0.50),
            ttft_ms_p99: percentile_ms(&mut ttfts, 0.99),
            decode_tokens_per_s: median(&mut decode_rates),
            aggregate_tokens_per_s: generated as f64 / wall.as_secs_f64(),
            token_gap_ms_p50: percentile_ms(&mut gaps, 0.50),
            token_gap_ms_max: percentile_ms(&mut gaps, 1.0),
            long_prompt_ttft_ms,
            peak_rss_mb: peak_rss_mb(),
        };
        if args.json {
            writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
        } else {
            writeln!(
                stdout,
                "{:>11}  {:>11.1}  {:>11.1}  {:>12.1}  {:>15.1}  {:>10.1}  {:>10.1}  {:>12}  {:>11.0}",
                report.concurrency,
                report.ttft_ms_p50,
                report.ttft_ms_p99,
                report.decode_tokens_per_s,
                report.aggregate_tokens_per_s,
                report.token_gap_ms_p50,
                report.token_gap_ms_max,
                report.long_prompt_ttft_ms.map_or("-".to_string(), |ms| format!("{ms:.1}")),
                report.peak_rss_mb
            )?;
        }
        stdout.flush()?;
    }
    drop(handle);
    pool.shutdown();
    Ok(ExitCode::SUCCESS)
}

/// Requests past their first token so far: those that got it (counted once
/// each), plus those that failed or were cancelled (so that a request
/// failing before its first token cannot keep the long prompt waiting
/// forever).
fn requests_past_first_token(handle: &crate::pool::PoolHandle) -> u64 {
    let m = handle.metrics().snapshot();
    m.ttft_buckets.last().copied().unwrap_or(0) + m.requests_failed + m.requests_cancelled
}

/// Nearest-rank percentile in milliseconds.
fn percentile_ms(values: &mut [Duration], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1].as_secs_f64() * 1e3
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The process's peak resident set (VmHWM), in MB; 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&mut v, 0.5), 50.0);
        assert_eq!(percentile_ms(&mut v, 0.99), 99.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    }
}
