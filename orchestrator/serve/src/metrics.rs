//! Prometheus metrics of the server (`GET /metrics`, text format), with the official
//! `prometheus-client` crate.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub request_seconds: Histogram,
    queue_seconds: Histogram,
    batch_size: Histogram,
    pub queue_depth: Gauge<i64, std::sync::atomic::AtomicI64>,
    active: Gauge,
    steps: Counter<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("orchestrate_serve")),
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            request_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            queue_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            queue_depth: Gauge::default(),
            active: Gauge::default(),
            steps: Counter::default(),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register("requests", "HTTP requests by endpoint and status", m.requests.clone());
            r.register("prompt_tokens", "Prompt tokens read", m.prompt_tokens.clone());
            r.register("generated_tokens", "Tokens generated", m.generated_tokens.clone());
            r.register(
                "request_duration_seconds",
                "Time from a request's arrival to its last token",
                m.request_seconds.clone(),
            );
            r.register("queue_wait_seconds", "Time a request waited for a place in the batch", m.queue_seconds.clone());
            r.register("batch_size", "Sequences decoded together in one step", m.batch_size.clone());
            r.register("queue_depth", "Requests waiting for a place in the batch", m.queue_depth.clone());
            r.register("active_sequences", "Sequences being decoded", m.active.clone());
            r.register("decode_steps", "Batched decoding steps", m.steps.clone());
        }
        m
    }

    /// The metrics in Prometheus' text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { endpoint: endpoint.into(), status }).inc();
    }

    pub(crate) fn dequeued(&self, queued_at: Instant) {
        self.queue_depth.dec();
        self.queue_seconds.observe(queued_at.elapsed().as_secs_f64());
    }

    pub(crate) fn finished(&self, tokens: usize, queued_at: Instant) {
        self.generated_tokens.inc_by(tokens as u64);
        self.request_seconds.observe(queued_at.elapsed().as_secs_f64());
    }

    pub(crate) fn set_active(&self, n: usize) {
        self.active.set(n as i64);
    }

    pub(crate) fn step(&self, batch: usize) {
        self.steps.inc();
        self.batch_size.observe(batch as f64);
    }
}
