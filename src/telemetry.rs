//! Logs and metrics.
//!
//! Logs go to stderr as text or JSON lines, filtered by `RUST_LOG` (or the
//! `telemetry.log_filter` setting). No secret is ever a field or part of a
//! message: settings print their secrets as `[redacted]`, and the HTTP
//! adapter never logs headers.
//!
//! Metrics are `prometheus-client` counters, gauges and histograms in
//! [`Metrics`], written out in the OpenMetrics 1.0 text format (which
//! Prometheus scrapes natively; <https://openmetrics.io>) by
//! [`Metrics::render`] and served at `/metrics` on
//! `telemetry.metrics_listen` by [`serve_metrics`]. The pool's own lock-free
//! counters are read at scrape time by a collector.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dialogd_adapters::discord::{ShardFigures, ShardStats};
use dialogd_adapters::Platform;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

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

/// Every platform, so each labelled family shows all of them from the start
/// (a series that appears only after its first event breaks `rate()`).
const PLATFORMS: [Platform; 4] = [Platform::Discord, Platform::Telegram, Platform::Http, Platform::Console];

/// Upper bounds of the generation latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 11] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The OpenMetrics text format that [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlatformLabels {
    platform: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// A training job's series: its id and target (`base`, `persona:NAME`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job_id: String,
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassifierLabels {
    /// The classifier's label (its `id2label` name).
    label: String,
    /// `in` (a user's message) or `out` (a candidate reply).
    direction: &'static str,
}

/// Which way a text was going when the safety filter read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A user's message (or its edit).
    In,
    /// A candidate reply.
    Out,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    features: &'static str,
}

/// The daemon's counters, gauges and histograms, shared by every part that
/// counts, and the [`Registry`] that writes them out. Counter fields are
/// `prometheus_client` handles: `inc()`, `inc_by(n)`, `get()`; gauges also
/// `set(v)`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    messages_in: Family<PlatformLabels, Counter>,
    messages_out: Family<PlatformLabels, Counter>,
    replies: Family<PlatformLabels, Counter>,
    /// Replies sent although cut off by `max_new_tokens` (no candidate
    /// ended with `<|endoftext|>`).
    pub replies_cut_off: Counter,
    refusals: Family<ReasonLabels, Counter>,
    generation_seconds: Histogram,
    pub redis_errors: Counter,
    /// Messages answered without their stored context.
    pub context_degraded: Counter,
    /// Whether the context store answered last time it was asked (1 or 0).
    pub store_up: Gauge,
    pub reloads: Counter,
    /// Candidates drawn, dropped by the safety filter, dropped by
    /// screening (empty, echo, repeat), and scored by the ranker.
    pub candidates_drawn: Counter,
    pub candidates_flagged: Counter,
    pub candidates_screened: Counter,
    pub candidates_ranked: Counter,
    /// Texts the classifier flagged, per label over its threshold and
    /// direction (a text over two thresholds counts under both labels).
    classifier_flagged: Family<ClassifierLabels, Counter>,
    /// Training job attempts this daemon started, and how its jobs ended
    /// (promoted, rejected, failed, cancelled).
    pub jobs_started: Counter,
    jobs_ended: Family<StateLabels, Counter>,
    /// Whether a trainer runs under this daemon now (1 or 0).
    pub job_running: Gauge,
    /// The running job's step and last training loss, one series per job
    /// while it trains here (removed when its trainer ends).
    job_step: Family<JobLabels, Gauge>,
    job_loss: Family<JobLabels, Gauge<f64, AtomicU64>>,
    /// The generation pool's own counters, once it runs.
    pub pool: Arc<OnceLock<Arc<crate::pool::PoolMetrics>>>,
    /// The Redis Streams client's counters, with `backend = "redis"`.
    pub remote: Arc<OnceLock<Arc<crate::remote::ClientStats>>>,
    /// The Discord adapter's per-shard figures, once it runs.
    pub discord: Arc<OnceLock<Arc<ShardStats>>>,
    /// A `dialogd worker`'s consumer name and counters, in that process.
    pub worker: Arc<OnceLock<(String, Arc<crate::remote::WorkerStats>)>>,
}

impl Metrics {
    /// Every family registered, all at zero, plus `dialogd_build_info` and
    /// the standard `process_*` metrics (on Linux).
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let by_platform = || {
            let family = Family::<PlatformLabels, Counter>::default();
            for p in PLATFORMS {
                let _ = family.get_or_create(&PlatformLabels { platform: p.as_str() });
            }
            family
        };
        let metrics = Metrics {
            messages_in: by_platform(),
            messages_out: by_platform(),
            replies: by_platform(),
            replies_cut_off: Counter::default(),
            refusals: Family::default(),
            generation_seconds: Histogram::new(LATENCY_BUCKETS),
            redis_errors: Counter::default(),
            context_degraded: Counter::default(),
            store_up: Gauge::default(),
            reloads: Counter::default(),
            candidates_drawn: Counter::default(),
            candidates_flagged: Counter::default(),
            candidates_screened: Counter::default(),
            candidates_ranked: Counter::default(),
            classifier_flagged: Family::default(),
            jobs_started: Counter::default(),
            jobs_ended: Family::default(),
            job_running: Gauge::default(),
            job_step: Family::default(),
            job_loss: Family::default(),
            pool: Arc::default(),
            remote: Arc::default(),
            discord: Arc::default(),
            worker: Arc::default(),
            registry: Registry::default(),
        };
        metrics.store_up.set(1);
        for why in Refusal::ALL {
            let _ = metrics.refusals.get_or_create(&ReasonLabels { reason: why.as_str() });
        }
        for state in JOB_ENDS {
            let _ = metrics.jobs_ended.get_or_create(&StateLabels { state });
        }
        // Counters are registered without their `_total` (the encoder adds
        // it), and help texts without their full stop (the registry adds it).
        let r = &mut registry;
        r.register("dialogd_messages_in", "Messages received from adapters", metrics.messages_in.clone());
        r.register("dialogd_messages_out", "Answers handed to adapters (replies and command answers)", metrics.messages_out.clone());
        r.register("dialogd_replies", "Generated replies", metrics.replies.clone());
        r.register("dialogd_replies_cut_off", "Replies sent cut off by the token limit (no candidate finished)", metrics.replies_cut_off.clone());
        r.register("dialogd_redis_errors", "Failed or timed-out Redis calls", metrics.redis_errors.clone());
        r.register("dialogd_context_degraded", "Messages answered without their stored context", metrics.context_degraded.clone());
        r.register("dialogd_reloads", "Successful SIGHUP reloads", metrics.reloads.clone());
        r.register("dialogd_candidates_drawn", "Candidate replies generated", metrics.candidates_drawn.clone());
        r.register("dialogd_candidates_flagged", "Candidates dropped by the safety filter", metrics.candidates_flagged.clone());
        r.register("dialogd_candidates_screened", "Candidates dropped as empty, echoes or repeats", metrics.candidates_screened.clone());
        r.register("dialogd_candidates_ranked", "Candidates scored by the ranker", metrics.candidates_ranked.clone());
        r.register(
            "dialogd_classifier_flagged",
            "Texts the safety classifier flagged, by label and direction (in: messages, out: candidates)",
            metrics.classifier_flagged.clone(),
        );
        r.register("dialogd_jobs_started", "Training job attempts started here", metrics.jobs_started.clone());
        r.register("dialogd_jobs_ended", "Training jobs run here, by how they ended", metrics.jobs_ended.clone());
        r.register("dialogd_job_running", "Whether a trainer runs under this daemon", metrics.job_running.clone());
        r.register("dialogd_job_step", "Optimizer steps done by the job training here", metrics.job_step.clone());
        r.register("dialogd_job_loss", "Training loss of the last step of the job training here", metrics.job_loss.clone());
        r.register("dialogd_refusals", "Messages not answered, by reason", metrics.refusals.clone());
        r.register("dialogd_store_up", "Whether the context store answers", metrics.store_up.clone());
        r.register("dialogd_generation_seconds", "Time to generate one reply, queueing included", metrics.generation_seconds.clone());
        // The conventional build_info gauge (value 1, facts in the labels).
        let build = Family::<BuildLabels, Gauge>::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION"), features: BUILD_FEATURES }).set(1);
        r.register("dialogd_build_info", "The running build: version and cargo features", build);
        r.register_collector(Box::new(PoolCollector(metrics.pool.clone())));
        r.register_collector(Box::new(RemoteCollector(metrics.remote.clone())));
        r.register_collector(Box::new(ShardCollector(metrics.discord.clone())));
        r.register_collector(Box::new(WorkerCollector(metrics.worker.clone())));
        if let Err(error) = kubert_prometheus_process::register(r.sub_registry_with_prefix("process")) {
            tracing::warn!(%error, "process metrics are not available");
        }
        Arc::new(Metrics { registry, ..metrics })
    }

    /// Counts a message received on `platform`.
    pub fn message_in(&self, platform: Platform) {
        self.messages_in.get_or_create(&PlatformLabels { platform: platform.as_str() }).inc();
    }

    /// Counts an answer (reply or command answer) handed to `platform`.
    pub fn message_out(&self, platform: Platform) {
        self.messages_out.get_or_create(&PlatformLabels { platform: platform.as_str() }).inc();
    }

    /// Counts a generated reply sent on `platform`.
    pub fn replied(&self, platform: Platform) {
        self.replies.get_or_create(&PlatformLabels { platform: platform.as_str() }).inc();
    }

    /// Generated replies on every platform together.
    pub fn replies_total(&self) -> u64 {
        PLATFORMS.iter().map(|p| self.replies.get_or_create(&PlatformLabels { platform: p.as_str() }).get()).sum()
    }

    pub fn refused(&self, why: Refusal) {
        self.refusals.get_or_create(&ReasonLabels { reason: why.as_str() }).inc();
    }

    pub fn refusals(&self, why: Refusal) -> u64 {
        self.refusals.get_or_create(&ReasonLabels { reason: why.as_str() }).get()
    }

    /// Shows `dialogd_classifier_flagged_total` at 0 for every label of
    /// the loaded classifier, both directions (the daemon, at start).
    pub fn classifier_labels(&self, labels: &[String]) {
        for label in labels {
            for direction in [Direction::In, Direction::Out] {
                let _ = self.classifier_flagged.get_or_create(&ClassifierLabels { label: label.clone(), direction: direction.as_str() });
            }
        }
    }

    /// Counts a text the classifier flagged under `label`.
    pub fn classifier_flagged(&self, label: &str, direction: Direction) {
        self.classifier_flagged.get_or_create(&ClassifierLabels { label: label.to_string(), direction: direction.as_str() }).inc();
    }

    /// Counts a job's end (`promoted`, `rejected`, `failed`, `cancelled`;
    /// anything else is ignored).
    pub fn job_ended(&self, state: &str) {
        if let Some(state) = JOB_ENDS.iter().find(|s| **s == state) {
            self.jobs_ended.get_or_create(&StateLabels { state }).inc();
        }
    }

    /// Shows a training job's step and loss (`dialogd_job_step`,
    /// `dialogd_job_loss`, labelled `job_id` and `target`); no loss yet
    /// leaves the loss series out.
    pub fn job_progress(&self, job_id: u64, target: &str, progress: &crate::training::Progress) {
        let labels = JobLabels { job_id: job_id.to_string(), target: target.to_string() };
        self.job_step.get_or_create(&labels).set(progress.step as i64);
        if let Some(loss) = progress.loss {
            self.job_loss.get_or_create(&labels).set(loss);
        }
    }

    /// Takes a job's series away (its trainer ended here).
    pub fn job_progress_ended(&self, job_id: u64, target: &str) {
        let labels = JobLabels { job_id: job_id.to_string(), target: target.to_string() };
        self.job_step.remove(&labels);
        self.job_loss.remove(&labels);
    }

    /// Records the store's state for `dialogd_store_up` and `/healthz`.
    pub fn set_store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    /// Whether the store answered last time it was asked.
    pub fn store_is_up(&self) -> bool {
        self.store_up.get() != 0
    }

    pub fn observe_generation(&self, took: Duration) {
        self.generation_seconds.observe(took.as_secs_f64());
    }

    /// The OpenMetrics 1.0 text exposition ([`CONTENT_TYPE`]), which
    /// Prometheus scrapes natively: counters are described without their
    /// `_total` suffix and sampled with it, and the text ends with `# EOF`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Rewrites the OpenMetrics text of [`Metrics::render`] as the Prometheus
/// text format 0.0.4 ([`PROMETHEUS_CONTENT_TYPE`]), for clients that do not
/// ask for OpenMetrics (`curl`, `promtool check metrics`, older scrapers).
/// The samples are the same; what differs is the framing: counter families
/// are described under their sample name (`x_total`, not `x`), and there are
/// no `# UNIT` or `# EOF` lines. See
/// <https://prometheus.io/docs/instrumenting/exposition_formats/> and
/// <https://github.com/prometheus/OpenMetrics/blob/main/specification/OpenMetrics.md>.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        let described = ["# HELP ", "# TYPE "].iter().find_map(|tag| Some((*tag, line.strip_prefix(tag)?)));
        match described {
            _ if line.starts_with("# UNIT ") || line == "# EOF" => continue,
            Some((tag, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) { "_total" } else { "" };
                out.push_str(&format!("{tag}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The Prometheus text format that [`to_prometheus_text`] writes.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The cargo features this binary was built with, for `dialogd_build_info`.
const BUILD_FEATURES: &str = if cfg!(feature = "cuda") { "cuda" } else { "" };

/// Writes the Redis Streams client's counters at scrape time (only with
/// `backend = "redis"`).
#[derive(Debug)]
struct RemoteCollector(Arc<OnceLock<Arc<crate::remote::ClientStats>>>);

impl Collector for RemoteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(stats) = self.0.get() else { return Ok(()) };
        let mut family = encoder.encode_descriptor(
            "dialogd_generation_answers_dropped",
            "Workers' answers not used: a second answer to one request, or one past its deadline.",
            None,
            MetricType::Counter,
        )?;
        for (reason, value) in [("duplicate", &stats.duplicate), ("late", &stats.late)] {
            let labels = ReasonLabels { reason };
            ConstCounter::new(value.load(Relaxed)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabels {
    consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerOutcomeLabels {
    consumer: String,
    outcome: &'static str,
}

/// Writes a generation worker's counters at scrape time (only in a
/// `dialogd worker` process), labelled with its consumer name in the
/// group.
#[derive(Debug)]
struct WorkerCollector(Arc<OnceLock<(String, Arc<crate::remote::WorkerStats>)>>);

impl Collector for WorkerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some((consumer, stats)) = self.0.get() else { return Ok(()) };
        let mut family = encoder.encode_descriptor(
            "dialogd_worker_requests",
            "Generation requests this worker finished: answered, failed (an error reply) or expired (past their deadline, dropped)",
            None,
            MetricType::Counter,
        )?;
        for (outcome, value) in [("answered", &stats.answered), ("failed", &stats.failed), ("expired", &stats.expired)] {
            let labels = WorkerOutcomeLabels { consumer: consumer.clone(), outcome };
            ConstCounter::new(value.load(Relaxed)).encode(family.encode_family(&labels)?)?;
        }
        let labels = ConsumerLabels { consumer: consumer.clone() };
        let counters = [
            ("dialogd_worker_claimed", "Requests this worker took over from a consumer presumed dead (XAUTOCLAIM)", &stats.claimed),
            ("dialogd_worker_base_swaps", "Promoted base models this worker swapped in", &stats.swaps),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value.load(Relaxed)).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "dialogd_worker_base_version",
            "The promoted base version this worker serves (0: the configured model)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(stats.base_version.load(Relaxed) as i64).encode(family.encode_family(&labels)?)?;
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabels {
    shard: u32,
}

/// Writes the Discord adapter's per-shard figures at scrape time (only
/// with the Discord adapter on), labelled `shard`.
#[derive(Debug)]
struct ShardCollector(Arc<OnceLock<Arc<ShardStats>>>);

impl Collector for ShardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = self.0.get() else { return Ok(()) };
        let shards = stats.snapshot();
        if shards.is_empty() {
            return Ok(());
        }
        type Figure = fn(&ShardFigures) -> i64;
        let gauges: [(&str, &str, Figure); 2] = [
            ("dialogd_discord_shard_up", "Whether the Discord shard is connected (1) or not (0).", |f| i64::from(f.up)),
            ("dialogd_discord_shard_guilds", "Guilds in the Discord shard's Ready.", |f| f.guilds as i64),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (shard, figures) in &shards {
                ConstGauge::new(value(figures)).encode(family.encode_family(&ShardLabels { shard: *shard })?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "dialogd_discord_shard_messages",
            "Messages, edits and slash commands the Discord shard handed to the core.",
            None,
            MetricType::Counter,
        )?;
        for (shard, figures) in &shards {
            ConstCounter::new(figures.messages).encode(family.encode_family(&ShardLabels { shard: *shard })?)?;
        }
        let timed: Vec<(u32, f64)> = shards.iter().filter_map(|(id, f)| Some((*id, f.latency?.as_secs_f64()))).collect();
        if !timed.is_empty() {
            let mut family = encoder.encode_descriptor(
                "dialogd_discord_shard_latency_seconds",
                "The Discord shard's last heartbeat round trip.",
                None,
                MetricType::Gauge,
            )?;
            for (shard, seconds) in timed {
                ConstGauge::new(seconds).encode(family.encode_family(&ShardLabels { shard })?)?;
            }
        }
        Ok(())
    }
}

/// Writes the pool's snapshot at scrape time: the pool keeps its own
/// lock-free counters (it sits below telemetry), and this reads them.
#[derive(Debug)]
struct PoolCollector(Arc<OnceLock<Arc<crate::pool::PoolMetrics>>>);

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pool = self.0.get().map(|p| p.snapshot());
        // The queue depth is always shown (0 before the pool runs).
        let depth = pool.as_ref().map_or(0, |p| p.queue_depth as i64);
        ConstGauge::new(depth).encode(encoder.encode_descriptor(
            "dialogd_generation_queue_depth",
            "Jobs waiting for generation.",
            None,
            MetricType::Gauge,
        )?)?;
        let Some(p) = pool else { return Ok(()) };
        let counters: [(&str, &str, u64); 6] = [
            ("dialogd_pool_tokens", "Tokens generated by the pool.", p.tokens_generated),
            ("dialogd_pool_prefill_tokens", "Prompt tokens prefilled by the pool.", p.prefill_tokens),
            ("dialogd_pool_decode_steps", "Batched steps (each one's decode rows and the prompts prefilled with them).", p.decode_steps),
            ("dialogd_pool_refusals", "Requests refused because the pool queue was full.", p.refusals),
            ("dialogd_pool_requests_failed", "Pool requests that failed.", p.requests_failed),
            ("dialogd_pool_requests_cancelled", "Pool requests whose caller went away.", p.requests_cancelled),
        ];
        for (name, help, value) in counters {
            ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        ConstCounter::new(p.decode_seconds_total).encode(encoder.encode_descriptor(
            "dialogd_pool_decode_seconds",
            "Time spent in steps (the prefills in them included).",
            None,
            MetricType::Counter,
        )?)?;
        let gauges: [(&str, &str, u64); 2] = [
            ("dialogd_pool_active_sequences", "Sequences in the current batch.", p.active_sequences),
            ("dialogd_model_version", "Model version served (0 at start, +1 per swap).", p.model_version),
        ];
        for (name, help, value) in gauges {
            ConstGauge::new(value as i64).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        // The pool's buckets are cumulative, the last one +Inf; the encoder
        // wants each bucket's own count and accumulates itself.
        let mut below = 0;
        let buckets: Vec<(f64, u64)> = crate::pool::metrics::TTFT_BUCKETS_MS
            .iter()
            .map(|ms| *ms as f64 / 1000.0)
            .chain([f64::MAX])
            .zip(&p.ttft_buckets)
            .map(|(bound, cumulative)| {
                let own = cumulative - below;
                below = *cumulative;
                (bound, own)
            })
            .collect();
        let mut ttft = encoder.encode_descriptor(
            "dialogd_time_to_first_token_seconds",
            "Submission to first token.",
            None,
            MetricType::Histogram,
        )?;
        ttft.encode_histogram::<NoLabelSet>(p.ttft_seconds_sum, below, &buckets, None)
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

/// Serves `GET /metrics` until `stop` resolves: OpenMetrics to clients whose
/// `Accept` names `application/openmetrics-text` (Prometheus does), the
/// Prometheus text format 0.0.4 to the rest.
pub async fn serve_metrics(
    server: MetricsServer,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{header, HeaderMap};
    // A `dialogd worker` answers `/healthz` here too (a daemon's is on its
    // HTTP adapter).
    let worker_health = metrics.worker.get().map(|(consumer, stats)| {
        let (consumer, stats) = (consumer.clone(), stats.clone());
        axum::routing::get(move || {
            let (consumer, stats) = (consumer.clone(), stats.clone());
            async move { worker_healthz(&consumer, &stats) }
        })
    });
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: HeaderMap| {
            let metrics = metrics.clone();
            async move {
                // Prometheus asks for OpenMetrics; everyone else gets 0.0.4.
                let wants_openmetrics = headers
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| v.contains("application/openmetrics-text"));
                let text = metrics.render();
                if wants_openmetrics {
                    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text)
                } else {
                    ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], to_prometheus_text(&text))
                }
            }
        }),
    );
    let app = match worker_health {
        Some(route) => app.route("/healthz", route),
        None => app,
    };
    axum::serve(server.listener, app).with_graceful_shutdown(stop).await
}

/// A worker's `/healthz`: 200 while it takes requests and reads its stream,
/// otherwise 503; the body says which
/// (`{"status":"ok"|"loading"|"redis_down"|"stopping","consumer":…,"base_version":…}`).
fn worker_healthz(consumer: &str, stats: &crate::remote::WorkerStats) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let health = stats.health();
    let code = if health.ready { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "status": health.status,
        "consumer": consumer,
        "base_version": stats.base_version.load(std::sync::atomic::Ordering::Relaxed),
    });
    (code, axum::Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_counts_labels_and_histogram() {
        let m = Metrics::new();
        m.message_in(Platform::Telegram);
        m.message_in(Platform::Telegram);
        m.message_in(Platform::Http);
        m.refused(Refusal::Busy);
        m.job_ended("promoted");
        m.job_ended("no such state");
        m.observe_generation(Duration::from_millis(70));
        m.classifier_labels(&["toxicity".to_string(), "insult".to_string()]);
        m.classifier_flagged("insult", Direction::Out);
        let progress = crate::training::Progress { step: 12, total_steps: 100, loss: Some(2.5), tokens_per_s: 1.0, eta_s: None, updated: 0 };
        m.job_progress(7, "persona:pirate", &progress);
        let worker = Arc::new(crate::remote::WorkerStats::default());
        // Its /healthz through a worker's stages.
        let status = |w: &crate::remote::WorkerStats| {
            let (code, body) = worker_healthz("w1", w);
            (code.as_u16(), body.0["status"].as_str().unwrap().to_string(), body.0["consumer"].clone())
        };
        assert_eq!(status(&worker), (503, "loading".into(), serde_json::json!("w1")));
        worker.set_state(crate::remote::WorkerState::Serving);
        worker.stream_up.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(status(&worker).0, 200);
        worker.stream_up.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(status(&worker), (503, "redis_down".into(), serde_json::json!("w1")));
        worker.set_state(crate::remote::WorkerState::Stopping);
        assert_eq!(status(&worker).1, "stopping");
        worker.answered.store(5, std::sync::atomic::Ordering::Relaxed);
        worker.claimed.store(2, std::sync::atomic::Ordering::Relaxed);
        worker.base_version.store(3, std::sync::atomic::Ordering::Relaxed);
        let _ = m.worker.set(("w1".to_string(), worker));
        let text = m.render();
        assert!(text.contains("dialogd_worker_requests_total{consumer=\"w1\",outcome=\"answered\"} 5\n"), "{text}");
        assert!(text.contains("dialogd_worker_requests_total{consumer=\"w1\",outcome=\"failed\"} 0\n"), "{text}");
        assert!(text.contains("dialogd_worker_claimed_total{consumer=\"w1\"} 2\n"), "{text}");
        assert!(text.contains("dialogd_worker_base_version{consumer=\"w1\"} 3\n"), "{text}");
        assert!(text.contains("dialogd_job_step{job_id=\"7\",target=\"persona:pirate\"} 12\n"), "{text}");
        assert!(text.contains("dialogd_job_loss{job_id=\"7\",target=\"persona:pirate\"} 2.5\n"), "{text}");
        m.job_progress_ended(7, "persona:pirate");
        assert!(!m.render().contains("dialogd_job_step{"), "the ended job's series stays");
        let text = m.render();
        assert!(text.contains("dialogd_classifier_flagged_total{label=\"insult\",direction=\"out\"} 1\n"), "{text}");
        assert!(text.contains("dialogd_classifier_flagged_total{label=\"toxicity\",direction=\"in\"} 0\n"), "{text}");
        assert!(text.contains("dialogd_messages_in_total{platform=\"telegram\"} 2\n"), "{text}");
        assert!(text.contains("dialogd_messages_in_total{platform=\"http\"} 1\n"), "{text}");
        assert!(text.contains("dialogd_messages_in_total{platform=\"discord\"} 0\n"), "{text}");
        assert!(text.contains("dialogd_refusals_total{reason=\"busy\"} 1\n"));
        assert!(text.contains("dialogd_refusals_total{reason=\"invalid\"} 0\n"));
        assert!(text.contains("dialogd_jobs_ended_total{state=\"promoted\"} 1\n"));
        assert!(text.contains("dialogd_generation_seconds_bucket{le=\"0.05\"} 0\n"), "{text}");
        assert!(text.contains("dialogd_generation_seconds_bucket{le=\"0.1\"} 1\n"));
        assert!(text.contains("dialogd_generation_seconds_count 1\n"));
        assert!(text.contains("dialogd_generation_queue_depth 0\n"));
        assert!(text.contains(&format!("dialogd_build_info{{version=\"{}\"", env!("CARGO_PKG_VERSION"))), "{text}");
        assert!(text.ends_with("# EOF\n"));
        let plain = to_prometheus_text(&text);
        assert!(plain.contains("# HELP dialogd_messages_in_total Messages received from adapters.\n# TYPE dialogd_messages_in_total counter\n"), "{plain}");
        assert!(plain.contains("# TYPE dialogd_store_up gauge\n"), "{plain}");
        assert!(plain.contains("# TYPE dialogd_generation_seconds histogram\n"), "{plain}");
        assert!(!plain.contains("# EOF") && !plain.contains("# UNIT") && !plain.contains(" info\n"), "{plain}");
        assert!(!text.contains(".."), "doubled full stops in help texts:\n{text}");
        assert_eq!(m.refusals(Refusal::Busy), 1);
        assert!(m.store_is_up());
    }

    #[test]
    fn the_pool_histogram_is_cumulative_once() {
        let m = Metrics::new();
        let pool = Arc::new(crate::pool::PoolMetrics::default());
        pool.first_token(Duration::from_millis(30));
        pool.first_token(Duration::from_millis(30));
        pool.first_token(Duration::from_secs(60));
        let _ = m.pool.set(pool);
        let text = m.render();
        assert!(text.contains("dialogd_time_to_first_token_seconds_bucket{le=\"0.025\"} 0\n"), "{text}");
        assert!(text.contains("dialogd_time_to_first_token_seconds_bucket{le=\"0.05\"} 2\n"), "{text}");
        assert!(text.contains("dialogd_time_to_first_token_seconds_bucket{le=\"10.0\"} 2\n"), "{text}");
        assert!(text.contains("dialogd_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("dialogd_time_to_first_token_seconds_count 3\n"), "{text}");
    }
}
