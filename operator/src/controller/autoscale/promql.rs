//! Every PromQL query the autoscaler runs, built from the worker metrics contract
//! (inference-worker/METRICS.md). Pure string builders, unit-tested.
//!
//! Worker series are selected by the labels Prometheus attaches when it scrapes a worker pod:
//! `namespace`, and the pod's `tidal.rs/*` labels mapped to `tidal_*` (the chart's scrape
//! config `labelmap`s `__meta_kubernetes_pod_label_tidal_rs_(.+)` to `tidal_$1`):
//! `tidal_inference_service`, `tidal_tier` (`cloud`/`edge`), `tidal_role`
//! (`full`/`router`/`expert`), `tidal_edge_node`, `tidal_shard`.

/// Endpoints that carry inference requests (not `/v1/models`).
const INFERENCE_ENDPOINTS: &str = "/v1/(chat/)?completions";

/// Which workers of one InferenceService a query reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub namespace: String,
    pub service: String,
    /// `rate()` window, e.g. `1m` (at least four scrape intervals).
    pub window: String,
}

/// The part of the service that serves requests: the cloud tier's full or router workers,
/// or every edge site's workers (grouped by `tidal_edge_node`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Cloud,
    Edge,
}

impl Scope {
    fn selector(&self, tier: Tier, extra: &str) -> String {
        let tier = match tier {
            // Expert shards see no requests; the router or full workers do.
            Tier::Cloud => r#"tidal_tier="cloud",tidal_role=~"full|router""#,
            Tier::Edge => r#"tidal_tier="edge""#,
        };
        format!(
            r#"{{namespace="{}",tidal_inference_service="{}",{tier}{extra}}}"#,
            escape(&self.namespace),
            escape(&self.service)
        )
    }

    fn by(tier: Tier) -> &'static str {
        match tier {
            Tier::Cloud => "",
            Tier::Edge => " by (tidal_edge_node)",
        }
    }

    /// Requests arriving per second (`tidal_worker_requests_total`, every status: accepted,
    /// rejected with 429 or escalated away all count as demand).
    pub fn arrival_rps(&self, tier: Tier) -> String {
        let sel = self.selector(tier, &format!(r#",endpoint=~"{INFERENCE_ENDPOINTS}""#));
        format!(
            "sum{}(rate(tidal_worker_requests_total{sel}[{}]))",
            Self::by(tier),
            self.window
        )
    }

    /// Requests per second that reached the cloud tier through an edge site's Service (a site
    /// with no ready replica routes there), by that Service's name
    /// (`tidal_worker_site_requests_total{site}`, counted by the cloud workers).
    pub fn routed_site_rps(&self) -> String {
        format!(
            "sum by (site) (rate(tidal_worker_site_requests_total{}[{}]))",
            self.selector(Tier::Cloud, ""),
            self.window
        )
    }

    /// Requests completed successfully per second (`tidal_worker_requests_total{status="200"}`).
    pub fn served_rps(&self, tier: Tier) -> String {
        let sel = self.selector(
            tier,
            &format!(r#",endpoint=~"{INFERENCE_ENDPOINTS}",status="200""#),
        );
        format!(
            "sum{}(rate(tidal_worker_requests_total{sel}[{}]))",
            Self::by(tier),
            self.window
        )
    }

    /// Requests waiting for a batch slot, summed over workers (`tidal_worker_queue_depth`).
    pub fn queue_depth(&self, tier: Tier) -> String {
        format!(
            "sum{}(tidal_worker_queue_depth{})",
            Self::by(tier),
            self.selector(tier, "")
        )
    }

    /// Sequences being decoded, summed over workers (`tidal_worker_running_requests`).
    pub fn running(&self, tier: Tier) -> String {
        format!(
            "sum{}(tidal_worker_running_requests{})",
            Self::by(tier),
            self.selector(tier, "")
        )
    }

    /// p95 time to first token (`tidal_worker_time_to_first_token_seconds`).
    pub fn ttft_p95(&self, tier: Tier) -> String {
        self.p95("tidal_worker_time_to_first_token_seconds", tier)
    }

    /// p95 time per output token (`tidal_worker_time_per_output_token_seconds`).
    pub fn tpot_p95(&self, tier: Tier) -> String {
        self.p95("tidal_worker_time_per_output_token_seconds", tier)
    }

    fn p95(&self, histogram: &str, tier: Tier) -> String {
        let by = match tier {
            Tier::Cloud => "le",
            Tier::Edge => "le, tidal_edge_node",
        };
        format!(
            "histogram_quantile(0.95, sum by ({by}) (rate({histogram}_bucket{}[{}])))",
            self.selector(tier, ""),
            self.window
        )
    }

    /// Unix time of the newest scrape of any cloud worker (`timestamp(tidal_worker_ready)`):
    /// a snapshot older than the autoscaler's staleness limit is not acted on.
    pub fn last_scrape(&self) -> String {
        format!(
            "max(timestamp(tidal_worker_ready{}))",
            self.selector(Tier::Cloud, "")
        )
    }

    /// Gauges that cloud workers always export, missing from workers Prometheus has
    /// `tidal_worker_ready` for: `2 x workers - (queue-depth series + running series)`. Above
    /// zero, the snapshot is partial (a worker half-scraped, series dropped by a limit), and
    /// a decision on it would read the missing workers as idle.
    pub fn missing_gauges(&self) -> String {
        let sel = self.selector(Tier::Cloud, "");
        format!(
            "count(tidal_worker_ready{sel}) * 2 - ((count(tidal_worker_queue_depth{sel}) or vector(0)) \
             + (count(tidal_worker_running_requests{sel}) or vector(0)))"
        )
    }

    /// Routed tokens per second per expert, summed over layers
    /// (`tidal_worker_expert_tokens_total`), counted where experts run: `full` workers and
    /// `expert` shards (a router counts the same tokens again, so it is left out).
    pub fn expert_tokens(&self) -> String {
        format!(
            r#"sum by (expert) (rate(tidal_worker_expert_tokens_total{{namespace="{}",tidal_inference_service="{}",tidal_tier="cloud",tidal_role=~"full|expert"}}[{}]))"#,
            escape(&self.namespace),
            escape(&self.service),
            self.window
        )
    }
}

/// Escapes a label value for a PromQL string literal.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        Scope {
            namespace: "prod".into(),
            service: "chat".into(),
            window: "1m".into(),
        }
    }

    #[test]
    fn cloud_arrivals_select_the_service_and_inference_endpoints() {
        assert_eq!(
            scope().arrival_rps(Tier::Cloud),
            r#"sum(rate(tidal_worker_requests_total{namespace="prod",tidal_inference_service="chat",tidal_tier="cloud",tidal_role=~"full|router",endpoint=~"/v1/(chat/)?completions"}[1m]))"#
        );
    }

    #[test]
    fn edge_queries_group_by_site() {
        let q = scope().queue_depth(Tier::Edge);
        assert!(q.starts_with("sum by (tidal_edge_node)("), "{q}");
        assert!(q.contains(r#"tidal_tier="edge""#), "{q}");
        let p = scope().ttft_p95(Tier::Edge);
        assert!(p.contains("sum by (le, tidal_edge_node)"), "{p}");
        // What sleeping sites send to the cloud tier: counted by its workers, per site.
        assert_eq!(
            scope().routed_site_rps(),
            r#"sum by (site) (rate(tidal_worker_site_requests_total{namespace="prod",tidal_inference_service="chat",tidal_tier="cloud",tidal_role=~"full|router"}[1m]))"#
        );
    }

    #[test]
    fn served_counts_only_successes_and_experts_skip_the_router() {
        assert!(scope().served_rps(Tier::Cloud).contains(r#"status="200""#));
        let e = scope().expert_tokens();
        assert!(e.contains(r#"tidal_role=~"full|expert""#), "{e}");
        assert!(e.starts_with("sum by (expert)"), "{e}");
    }

    #[test]
    fn label_values_are_escaped() {
        let s = Scope {
            namespace: "a\"b".into(),
            service: r"c\d".into(),
            window: "30s".into(),
        };
        let q = s.running(Tier::Cloud);
        assert!(q.contains(r#"namespace="a\"b""#), "{q}");
        assert!(q.contains(r#"tidal_inference_service="c\\d""#), "{q}");
    }
}
