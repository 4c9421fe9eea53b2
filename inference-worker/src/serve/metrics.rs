//! Every metric the worker exports. The names are a contract with the autoscaler:
//! `inference-worker/METRICS.md` documents each one; keep the two in sync.

use crate::model::moe::ExpertCounts;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabels {
    pub site: String,
}

/// Distinct `site` labels one worker exports; later ones count as `other` (bounded series).
pub const MAX_SITES: usize = 256;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpertLabels {
    pub layer: String,
    pub expert: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnavailableLabels {
    pub reason: String,
    pub outcome: String,
}

fn escalation_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Why a request was escalated to a cloud endpoint (used by the escalation feature).
#[derive(Debug, Clone, Copy)]
pub enum EscalationReason {
    LowConfidence,
    Overloaded,
}

impl EscalationReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EscalationReason::LowConfidence => "low_confidence",
            EscalationReason::Overloaded => "overloaded",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// Inference requests that came in through an edge site's Service (by its name).
    pub site_requests: Family<SiteLabels, Counter>,
    pub queue_depth: Gauge,
    pub running: Gauge,
    /// KV positions held by the running sequences over what the worker can hold
    /// (`max_batch` sequences of the full context), 0 to 1.
    pub kv_cache_usage: Gauge<f64, AtomicU64>,
    pub ready: Gauge,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub cancelled: Counter,
    /// Prompt tokens of requests looked up in the prefix cache.
    pub prefix_cache_queried_tokens: Counter,
    /// Of those, tokens whose attention cache was reused instead of computed.
    pub prefix_cache_hit_tokens: Counter,
    pub prefix_cache_evicted_blocks: Counter,
    pub prefix_cache_bytes: Gauge,
    pub prefix_cache_blocks: Gauge,
    pub expert_tokens: Family<ExpertLabels, Counter>,
    pub escalations: Family<ReasonLabels, Counter>,
    /// Escalation latency: from the decision to escalate to the cloud's first token.
    pub escalation_duration: Family<ReasonLabels, Histogram, fn() -> Histogram>,
    /// Escalations the cloud could not take, by reason and what happened instead.
    pub escalation_unavailable: Family<UnavailableLabels, Counter>,
    /// The `site` labels seen so far (at most [`MAX_SITES`]).
    site_count: Mutex<std::collections::HashSet<String>>,
    /// Serialises copying model-side expert counts into `expert_tokens`.
    expert_sync: Mutex<()>,
    /// Router <-> expert shard traffic (expert disaggregation).
    pub shards: crate::disagg::metrics::ShardMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::build(None)
    }

    /// [`Metrics::new`] plus the same values under the names vLLM exports, labelled with
    /// `model_name`, which Gateway API Inference Extension schedulers, KEDA scalers and
    /// llm-d's autoscaler read (see METRICS.md).
    pub fn for_model(model_name: &str) -> Self {
        Self::build(Some(model_name))
    }

    fn build(vllm_model_name: Option<&str>) -> Self {
        let mut registry = Registry::default();
        let shards = crate::disagg::metrics::ShardMetrics::default();
        shards.register(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        let site_requests = Family::<SiteLabels, Counter>::default();
        let queue_depth = Gauge::default();
        let running = Gauge::default();
        let kv_cache_usage = Gauge::<f64, AtomicU64>::default();
        let ready = Gauge::default();
        let ttft = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let tpot = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let prompt_tokens = Counter::default();
        let generated_tokens = Counter::default();
        let cancelled = Counter::default();
        let prefix_cache_queried_tokens = Counter::default();
        let prefix_cache_hit_tokens = Counter::default();
        let prefix_cache_evicted_blocks = Counter::default();
        let prefix_cache_bytes = Gauge::default();
        let prefix_cache_blocks = Gauge::default();
        let expert_tokens = Family::<ExpertLabels, Counter>::default();
        let escalations = Family::<ReasonLabels, Counter>::default();
        let escalation_duration =
            Family::<ReasonLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                escalation_histogram as fn() -> Histogram,
            );
        let escalation_unavailable = Family::<UnavailableLabels, Counter>::default();
        registry.register(
            "tidal_worker_requests",
            "HTTP requests to the API endpoints, by endpoint and status code",
            requests.clone(),
        );
        registry.register(
            "tidal_worker_site_requests",
            "Inference requests that reached this worker through an edge site's Service (a site with no ready replica routes to the cloud tier), by that Service's name",
            site_requests.clone(),
        );
        registry.register(
            "tidal_worker_queue_depth",
            "Requests waiting to join the running batch",
            queue_depth.clone(),
        );
        registry.register(
            "tidal_worker_running_requests",
            "Requests in the running batch",
            running.clone(),
        );
        registry.register(
            "tidal_worker_kv_cache_usage_ratio",
            "KV positions held by running sequences over the worker's capacity (max batch x context)",
            kv_cache_usage.clone(),
        );
        registry.register(
            "tidal_worker_ready",
            "1 when the model is loaded and warm and the worker is not draining",
            ready.clone(),
        );
        registry.register(
            "tidal_worker_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token",
            ttft.clone(),
        );
        registry.register(
            "tidal_worker_time_per_output_token_seconds",
            "Time between consecutive generated tokens of a request",
            tpot.clone(),
        );
        registry.register(
            "tidal_worker_prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        registry.register(
            "tidal_worker_generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        registry.register(
            "tidal_worker_cancelled_requests",
            "Generations stopped because the client disconnected",
            cancelled.clone(),
        );
        registry.register(
            "tidal_worker_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache",
            prefix_cache_queried_tokens.clone(),
        );
        registry.register(
            "tidal_worker_prefix_cache_hit_tokens",
            "Prompt tokens whose attention cache was reused from an earlier request's prefix",
            prefix_cache_hit_tokens.clone(),
        );
        registry.register(
            "tidal_worker_prefix_cache_evicted_blocks",
            "Prefix cache blocks dropped to stay within its memory budget",
            prefix_cache_evicted_blocks.clone(),
        );
        registry.register(
            "tidal_worker_prefix_cache_bytes",
            "Bytes of attention cache held for prefix reuse",
            prefix_cache_bytes.clone(),
        );
        registry.register(
            "tidal_worker_prefix_cache_blocks",
            "Prompt blocks held for prefix reuse",
            prefix_cache_blocks.clone(),
        );
        registry.register(
            "tidal_worker_expert_tokens",
            "Tokens routed to each expert of each MoE layer",
            expert_tokens.clone(),
        );
        registry.register(
            "tidal_worker_escalations",
            "Requests escalated to a cloud endpoint, by reason",
            escalations.clone(),
        );
        registry.register(
            "tidal_worker_escalation_duration_seconds",
            "Time from the decision to escalate a request to the cloud's first token, by reason",
            escalation_duration.clone(),
        );
        registry.register(
            "tidal_worker_escalation_cloud_unavailable",
            "Escalations the cloud endpoint could not take, by reason and outcome",
            escalation_unavailable.clone(),
        );
        if let Some(model) = vllm_model_name {
            let vllm = registry.sub_registry_with_label((
                std::borrow::Cow::Borrowed("model_name"),
                std::borrow::Cow::Owned(model.to_string()),
            ));
            vllm.register(
                "vllm:num_requests_running",
                "Requests in the running batch (tidal_worker_running_requests)",
                running.clone(),
            );
            vllm.register(
                "vllm:num_requests_waiting",
                "Requests waiting to join the batch (tidal_worker_queue_depth)",
                queue_depth.clone(),
            );
            for name in ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"] {
                vllm.register(
                    name,
                    "KV cache usage, 0 to 1 (tidal_worker_kv_cache_usage_ratio)",
                    kv_cache_usage.clone(),
                );
            }
            vllm.register(
                "vllm:time_to_first_token_seconds",
                "Time to first token (tidal_worker_time_to_first_token_seconds)",
                ttft.clone(),
            );
            for name in [
                "vllm:inter_token_latency_seconds",
                "vllm:time_per_output_token_seconds",
            ] {
                vllm.register(
                    name,
                    "Time between output tokens (tidal_worker_time_per_output_token_seconds)",
                    tpot.clone(),
                );
            }
            vllm.register(
                "vllm:prompt_tokens",
                "Prompt tokens processed (tidal_worker_prompt_tokens)",
                prompt_tokens.clone(),
            );
            vllm.register(
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache (tidal_worker_prefix_cache_queried_tokens)",
                prefix_cache_queried_tokens.clone(),
            );
            vllm.register(
                "vllm:prefix_cache_hits",
                "Prompt tokens reused from the prefix cache (tidal_worker_prefix_cache_hit_tokens)",
                prefix_cache_hit_tokens.clone(),
            );
            vllm.register(
                "vllm:generation_tokens",
                "Tokens generated (tidal_worker_generated_tokens)",
                generated_tokens.clone(),
            );
        }
        for reason in [
            EscalationReason::LowConfidence,
            EscalationReason::Overloaded,
        ] {
            // Pre-create so the series exist at 0 before the first escalation.
            let _ = escalations.get_or_create(&ReasonLabels {
                reason: reason.as_str().into(),
            });
        }
        Self {
            registry,
            requests,
            site_requests,
            site_count: Mutex::new(std::collections::HashSet::new()),
            queue_depth,
            running,
            kv_cache_usage,
            ready,
            ttft,
            tpot,
            prompt_tokens,
            generated_tokens,
            cancelled,
            prefix_cache_queried_tokens,
            prefix_cache_hit_tokens,
            prefix_cache_evicted_blocks,
            prefix_cache_bytes,
            prefix_cache_blocks,
            expert_tokens,
            escalations,
            escalation_duration,
            escalation_unavailable,
            expert_sync: Mutex::new(()),
            shards,
        }
    }

    pub fn record_request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.into(),
                status: status.to_string(),
            })
            .inc();
    }

    /// One inference request that came in through the edge site Service `site`.
    pub fn record_site_request(&self, site: &str) {
        let site = {
            let mut seen = self.site_count.lock().unwrap_or_else(|e| e.into_inner());
            if seen.contains(site) || (seen.len() < MAX_SITES && seen.insert(site.to_string())) {
                site
            } else {
                "other"
            }
        };
        self.site_requests
            .get_or_create(&SiteLabels { site: site.into() })
            .inc();
    }

    pub fn escalation(&self, reason: EscalationReason) {
        self.escalations
            .get_or_create(&ReasonLabels {
                reason: reason.as_str().into(),
            })
            .inc();
    }

    pub fn escalation_latency(&self, reason: EscalationReason, secs: f64) {
        self.escalation_duration
            .get_or_create(&ReasonLabels {
                reason: reason.as_str().into(),
            })
            .observe(secs);
    }

    /// `outcome`: `served_locally`, `finished_locally`, `failed` or `rejected` (429: overloaded and not
    /// allowed to fail).
    pub fn escalation_unavailable(&self, reason: EscalationReason, outcome: &str) {
        self.escalation_unavailable
            .get_or_create(&UnavailableLabels {
                reason: reason.as_str().into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Brings `tidal_worker_expert_tokens` up to the model's own counters.
    pub fn sync_experts(&self, counts: &ExpertCounts) {
        let _guard = self.expert_sync.lock().unwrap_or_else(|e| e.into_inner());
        for (layer, expert, n) in counts.snapshot() {
            let c = self.expert_tokens.get_or_create(&ExpertLabels {
                layer: layer.to_string(),
                expert: expert.to_string(),
            });
            let have = c.get();
            if n > have {
                c.inc_by(n - have);
            }
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
