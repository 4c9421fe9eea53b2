//! Metrics of expert disaggregation (router <-> expert shard traffic). Registered
//! into the worker's one registry by [`crate::serve::metrics::Metrics::new`]; documented
//! in `inference-worker/METRICS.md` with the others.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

pub struct ShardMetrics {
    /// Router: time from sending a layer's message to a shard to having its answer
    /// (retries included), by shard.
    pub request_seconds: Family<ShardLabels, Histogram, fn() -> Histogram>,
    /// Router: attempts that failed on one replica and moved to another, by shard.
    pub retries: Family<ShardLabels, Counter>,
    /// Router: layer messages that failed on every replica of a shard, by shard.
    pub failures: Family<ShardLabels, Counter>,
    /// Both roles: bytes of expert messages (request + response bodies), by
    /// direction (`sent`, `received`).
    pub wire_bytes: Family<DirectionLabels, Counter>,
    /// Expert role: time to compute one layer message.
    pub compute_seconds: Histogram,
    /// Both roles: `version` of the placement plan in use (0 for the `full` role).
    pub placement_version: Gauge,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        Self {
            request_seconds: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            failures: Family::default(),
            wire_bytes: Family::default(),
            compute_seconds: latency_histogram(),
            placement_version: Gauge::default(),
        }
    }
}

impl ShardMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tidal_worker_shard_request_seconds",
            "Router: round trip of one layer's message to an expert shard, retries included",
            self.request_seconds.clone(),
        );
        registry.register(
            "tidal_worker_shard_retries",
            "Router: expert-shard attempts that failed on one replica and were retried on another",
            self.retries.clone(),
        );
        registry.register(
            "tidal_worker_shard_failures",
            "Router: layer messages that failed on every replica of an expert shard",
            self.failures.clone(),
        );
        registry.register(
            "tidal_worker_expert_wire_bytes",
            "Bytes of router <-> expert shard messages, by direction",
            self.wire_bytes.clone(),
        );
        registry.register(
            "tidal_worker_expert_compute_seconds",
            "Expert role: time to compute one layer message",
            self.compute_seconds.clone(),
        );
        registry.register(
            "tidal_worker_placement_version",
            "Version of the expert placement plan in use",
            self.placement_version.clone(),
        );
    }

    pub fn shard(shard: usize) -> ShardLabels {
        ShardLabels {
            shard: shard.to_string(),
        }
    }

    pub fn add_bytes(&self, direction: &str, n: usize) {
        self.wire_bytes
            .get_or_create(&DirectionLabels {
                direction: direction.into(),
            })
            .inc_by(n as u64);
    }
}
