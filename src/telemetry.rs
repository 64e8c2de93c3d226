//! Logs and metrics.
//!
//! Logs go to stderr as text or JSON lines, filtered by `RUST_LOG` (or the
//! `telemetry.log_filter` setting). No secret is ever a field or part of a
//! message: settings print their secrets as `[redacted]`, and the HTTP
//! adapter never logs headers.
//!
//! Metrics are plain atomics in [`Metrics`], written out in the Prometheus
//! text format by [`Metrics::render`] and served at `/metrics` on
//! `telemetry.metrics_listen` by [`serve_metrics`].

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::settings::LogFormat;

/// Sets up the global log subscriber. `RUST_LOG`, when set, wins over
/// `default_filter`.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    use std::io::IsTerminal as _;
    // Colours only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Why a message got no generated reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The generation queue was full.
    Busy,
    /// The message id was seen before.
    Duplicate,
    /// Empty or oversized text.
    Invalid,
    /// The daemon is stopping.
    ShuttingDown,
    /// Generation failed.
    Failed,
    /// The message failed the safety filter (never stored or learned from).
    ToxicInput,
    /// Every candidate, after every allowed attempt, failed the safety
    /// filter or the screening: the bot stays silent.
    NoSafeCandidate,
    /// Over a per-user or per-channel rate limit.
    RateLimited,
}

impl Refusal {
    const ALL: [Refusal; 8] = [
        Refusal::Busy,
        Refusal::Duplicate,
        Refusal::Invalid,
        Refusal::ShuttingDown,
        Refusal::Failed,
        Refusal::ToxicInput,
        Refusal::NoSafeCandidate,
        Refusal::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::Duplicate => "duplicate",
            Refusal::Invalid => "invalid",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::Failed => "failed",
            Refusal::ToxicInput => "toxic_input",
            Refusal::NoSafeCandidate => "no_safe_candidate",
            Refusal::RateLimited => "rate_limited",
        }
    }
}

/// How jobs end, as counted in `dialogd_jobs_ended_total{state}`.
const JOB_ENDS: [&str; 4] = ["promoted", "rejected", "failed", "cancelled"];

/// Upper bounds of the generation latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 11] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The daemon's counters and gauges, shared by every part that counts.
#[derive(Debug, Default)]
pub struct Metrics {
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub replies: AtomicU64,
    /// Replies sent although cut off by `max_new_tokens` (no candidate
    /// ended with `<|endoftext|>`).
    pub replies_cut_off: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
    /// Jobs waiting for generation.
    pub queue_depth: AtomicI64,
    latency_buckets: [AtomicU64; 11],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    pub redis_errors: AtomicU64,
    /// Messages answered without their stored context.
    pub context_degraded: AtomicU64,
    /// Whether the context store answered last time it was asked.
    pub store_up: AtomicBool,
    pub reloads: AtomicU64,
    /// Candidates drawn, dropped by the safety filter, dropped by
    /// screening (empty, echo, repeat), and scored by the ranker.
    pub candidates_drawn: AtomicU64,
    pub candidates_flagged: AtomicU64,
    pub candidates_screened: AtomicU64,
    pub candidates_ranked: AtomicU64,
    /// Training job attempts this daemon started, and how its jobs ended
    /// (promoted, rejected, failed, cancelled).
    pub jobs_started: AtomicU64,
    jobs_ended: [AtomicU64; 4],
    /// Whether a trainer runs under this daemon now.
    pub job_running: AtomicBool,
    /// The generation pool's own counters, once it runs.
    pub pool: std::sync::OnceLock<Arc<crate::pool::PoolMetrics>>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let metrics = Self::default();
        metrics.store_up.store(true, Ordering::Relaxed);
        Arc::new(metrics)
    }

    pub fn refused(&self, why: Refusal) {
        let idx = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.refusals[idx].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refusals(&self, why: Refusal) -> u64 {
        let idx = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.refusals[idx].load(Ordering::Relaxed)
    }

    /// Counts a job's end (`promoted`, `rejected`, `failed`, `cancelled`).
    pub fn job_ended(&self, state: &str) {
        if let Some(idx) = JOB_ENDS.iter().position(|s| *s == state) {
            self.jobs_ended[idx].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn observe_generation(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        counter("dialogd_messages_in_total", "Messages received from adapters.", load(&self.messages_in));
        counter("dialogd_messages_out_total", "Answers handed to adapters (replies and command answers).", load(&self.messages_out));
        counter("dialogd_replies_total", "Generated replies.", load(&self.replies));
        counter("dialogd_replies_cut_off_total", "Replies sent cut off by the token limit (no candidate finished).", load(&self.replies_cut_off));
        counter("dialogd_redis_errors_total", "Failed or timed-out Redis calls.", load(&self.redis_errors));
        counter("dialogd_context_degraded_total", "Messages answered without their stored context.", load(&self.context_degraded));
        counter("dialogd_reloads_total", "Successful SIGHUP reloads.", load(&self.reloads));
        counter("dialogd_candidates_drawn_total", "Candidate replies generated.", load(&self.candidates_drawn));
        counter("dialogd_candidates_flagged_total", "Candidates dropped by the safety filter.", load(&self.candidates_flagged));
        counter("dialogd_candidates_screened_total", "Candidates dropped as empty, echoes or repeats.", load(&self.candidates_screened));
        counter("dialogd_candidates_ranked_total", "Candidates scored by the ranker.", load(&self.candidates_ranked));
        let pool = self.pool.get().map(|p| p.snapshot());
        if let Some(p) = &pool {
            counter("dialogd_pool_tokens_total", "Tokens generated by the pool.", p.tokens_generated);
            counter("dialogd_pool_prefill_tokens_total", "Prompt tokens prefilled by the pool.", p.prefill_tokens);
            counter("dialogd_pool_decode_steps_total", "Batched steps (each one's decode rows and the prompts prefilled with them).", p.decode_steps);
            counter("dialogd_pool_refusals_total", "Requests refused because the pool queue was full.", p.refusals);
            counter("dialogd_pool_requests_failed_total", "Pool requests that failed.", p.requests_failed);
            counter("dialogd_pool_requests_cancelled_total", "Pool requests whose caller went away.", p.requests_cancelled);
        }
        let _ = writeln!(out, "# HELP dialogd_jobs_started_total Training job attempts started here.\n# TYPE dialogd_jobs_started_total counter\ndialogd_jobs_started_total {}", load(&self.jobs_started));
        let _ = writeln!(out, "# HELP dialogd_jobs_ended_total Training jobs run here, by how they ended.\n# TYPE dialogd_jobs_ended_total counter");
        for (state, value) in JOB_ENDS.iter().zip(&self.jobs_ended) {
            let _ = writeln!(out, "dialogd_jobs_ended_total{{state=\"{state}\"}} {}", load(value));
        }
        let _ = writeln!(
            out,
            "# HELP dialogd_job_running Whether a trainer runs under this daemon.\n# TYPE dialogd_job_running gauge\ndialogd_job_running {}",
            u8::from(self.job_running.load(Ordering::Relaxed))
        );
        let _ = writeln!(out, "# HELP dialogd_refusals_total Messages not answered, by reason.\n# TYPE dialogd_refusals_total counter");
        for (why, value) in Refusal::ALL.iter().zip(&self.refusals) {
            let _ = writeln!(out, "dialogd_refusals_total{{reason=\"{}\"}} {}", why.as_str(), load(value));
        }
        let _ = writeln!(
            out,
            "# HELP dialogd_generation_queue_depth Jobs waiting for generation.\n# TYPE dialogd_generation_queue_depth gauge\ndialogd_generation_queue_depth {}",
            pool.as_ref().map(|p| p.queue_depth as i64).unwrap_or_else(|| self.queue_depth.load(Ordering::Relaxed)).max(0)
        );
        if let Some(p) = &pool {
            let _ = writeln!(
                out,
                "# HELP dialogd_pool_active_sequences Sequences in the current batch.\n# TYPE dialogd_pool_active_sequences gauge\ndialogd_pool_active_sequences {}",
                p.active_sequences
            );
            let _ = writeln!(
                out,
                "# HELP dialogd_model_version Model version served (0 at start, +1 per swap).\n# TYPE dialogd_model_version gauge\ndialogd_model_version {}",
                p.model_version
            );
            let _ = writeln!(out, "# HELP dialogd_pool_decode_seconds_total Time spent in steps (the prefills in them included).\n# TYPE dialogd_pool_decode_seconds_total counter\ndialogd_pool_decode_seconds_total {}", p.decode_seconds_total);
            let _ = writeln!(out, "# HELP dialogd_time_to_first_token_seconds Submission to first token.\n# TYPE dialogd_time_to_first_token_seconds histogram");
            for (bound, count) in crate::pool::metrics::TTFT_BUCKETS_MS.iter().zip(&p.ttft_buckets) {
                let _ = writeln!(out, "dialogd_time_to_first_token_seconds_bucket{{le=\"{}\"}} {count}", *bound as f64 / 1000.0);
            }
            let total = p.ttft_buckets.last().copied().unwrap_or(0);
            let _ = writeln!(out, "dialogd_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {total}");
            let _ = writeln!(out, "dialogd_time_to_first_token_seconds_sum {}", p.ttft_seconds_sum);
            let _ = writeln!(out, "dialogd_time_to_first_token_seconds_count {total}");
        }
        let _ = writeln!(
            out,
            "# HELP dialogd_store_up Whether the context store answers.\n# TYPE dialogd_store_up gauge\ndialogd_store_up {}",
            u8::from(self.store_up.load(Ordering::Relaxed))
        );
        let _ = writeln!(out, "# HELP dialogd_generation_seconds Time to generate one reply, queueing included.\n# TYPE dialogd_generation_seconds histogram");
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(out, "dialogd_generation_seconds_bucket{{le=\"{bound}\"}} {}", load(bucket));
        }
        let count = load(&self.latency_count);
        let _ = writeln!(out, "dialogd_generation_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "dialogd_generation_seconds_sum {}", load(&self.latency_sum_micros) as f64 / 1e6);
        let _ = writeln!(out, "dialogd_generation_seconds_count {count}");
        out
    }
}

/// A bound metrics endpoint.
pub struct MetricsServer {
    listener: tokio::net::TcpListener,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Self { listener: tokio::net::TcpListener::bind(addr).await? })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }
}

/// Serves `GET /metrics` until `stop` resolves.
pub async fn serve_metrics(
    server: MetricsServer,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render()) }
        }),
    );
    axum::serve(server.listener, app).with_graceful_shutdown(stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_counts_and_histogram() {
        let m = Metrics::new();
        m.messages_in.fetch_add(3, Ordering::Relaxed);
        m.refused(Refusal::Busy);
        m.observe_generation(Duration::from_millis(70));
        let text = m.render();
        assert!(text.contains("dialogd_messages_in_total 3\n"), "{text}");
        assert!(text.contains("dialogd_refusals_total{reason=\"busy\"} 1\n"));
        assert!(text.contains("dialogd_generation_seconds_bucket{le=\"0.05\"} 0\n"));
        assert!(text.contains("dialogd_generation_seconds_bucket{le=\"0.1\"} 1\n"));
        assert!(text.contains("dialogd_generation_seconds_count 1\n"));
    }
}
