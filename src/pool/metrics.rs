//! What the pool counts: queue depth, batch size, tokens, time to first
//! token, refusals. Lock-free; the daemon reads a snapshot to export.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (milliseconds) of the time-to-first-token histogram.
pub const TTFT_BUCKETS_MS: [u64; 10] = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// Live counters, shared by the handle and the engine.
#[derive(Debug, Default)]
pub struct PoolMetrics {
    queue_depth: AtomicU64,
    active_sequences: AtomicU64,
    requests_completed: AtomicU64,
    requests_failed: AtomicU64,
    requests_cancelled: AtomicU64,
    refusals: AtomicU64,
    tokens_generated: AtomicU64,
    decode_steps: AtomicU64,
    decode_micros: AtomicU64,
    prefill_tokens: AtomicU64,
    ttft_buckets: [AtomicU64; TTFT_BUCKETS_MS.len() + 1],
    ttft_micros_sum: AtomicU64,
    model_version: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PoolMetricsSnapshot {
    pub queue_depth: u64,
    pub active_sequences: u64,
    pub requests_completed: u64,
    pub requests_failed: u64,
    pub requests_cancelled: u64,
    pub refusals: u64,
    pub tokens_generated: u64,
    /// Engine steps: one forward pass over every unfinished candidate's
    /// next token and the prompts admitted with them.
    pub decode_steps: u64,
    /// Time spent in those steps, the prefills in them included.
    pub decode_seconds_total: f64,
    pub prefill_tokens: u64,
    /// Cumulative counts per bucket of [`TTFT_BUCKETS_MS`], then +Inf.
    pub ttft_buckets: Vec<u64>,
    pub ttft_seconds_sum: f64,
    /// 0 for the model the pool started with, then 1, 2, … per swap.
    pub model_version: u64,
}

impl PoolMetrics {
    pub(crate) fn queued(&self) {
        self.queue_depth.fetch_add(1, Relaxed);
    }
    pub(crate) fn dequeued(&self) {
        self.queue_depth.fetch_sub(1, Relaxed);
    }
    pub(crate) fn refused(&self) {
        self.refusals.fetch_add(1, Relaxed);
    }
    pub(crate) fn set_active(&self, n: usize) {
        self.active_sequences.store(n as u64, Relaxed);
    }
    pub(crate) fn completed(&self) {
        self.requests_completed.fetch_add(1, Relaxed);
    }
    pub(crate) fn failed(&self) {
        self.requests_failed.fetch_add(1, Relaxed);
    }
    pub(crate) fn cancelled(&self) {
        self.requests_cancelled.fetch_add(1, Relaxed);
    }
    pub(crate) fn tokens(&self, n: usize) {
        self.tokens_generated.fetch_add(n as u64, Relaxed);
    }
    pub(crate) fn prefilled(&self, n: usize) {
        self.prefill_tokens.fetch_add(n as u64, Relaxed);
    }
    pub(crate) fn step(&self, took: Duration) {
        self.decode_steps.fetch_add(1, Relaxed);
        self.decode_micros.fetch_add(took.as_micros() as u64, Relaxed);
    }
    pub(crate) fn swapped(&self, version: u64) {
        self.model_version.store(version, Relaxed);
    }
    pub(crate) fn first_token(&self, ttft: Duration) {
        let ms = ttft.as_millis() as u64;
        let idx = TTFT_BUCKETS_MS.iter().position(|&b| ms <= b).unwrap_or(TTFT_BUCKETS_MS.len());
        self.ttft_buckets[idx].fetch_add(1, Relaxed);
        self.ttft_micros_sum.fetch_add(ttft.as_micros() as u64, Relaxed);
    }

    pub fn snapshot(&self) -> PoolMetricsSnapshot {
        let mut cumulative = 0;
        let ttft_buckets = self
            .ttft_buckets
            .iter()
            .map(|b| {
                cumulative += b.load(Relaxed);
                cumulative
            })
            .collect();
        PoolMetricsSnapshot {
            queue_depth: self.queue_depth.load(Relaxed),
            active_sequences: self.active_sequences.load(Relaxed),
            requests_completed: self.requests_completed.load(Relaxed),
            requests_failed: self.requests_failed.load(Relaxed),
            requests_cancelled: self.requests_cancelled.load(Relaxed),
            refusals: self.refusals.load(Relaxed),
            tokens_generated: self.tokens_generated.load(Relaxed),
            decode_steps: self.decode_steps.load(Relaxed),
            decode_seconds_total: self.decode_micros.load(Relaxed) as f64 / 1e6,
            prefill_tokens: self.prefill_tokens.load(Relaxed),
            ttft_buckets,
            ttft_seconds_sum: self.ttft_micros_sum.load(Relaxed) as f64 / 1e6,
            model_version: self.model_version.load(Relaxed),
        }
    }
}
