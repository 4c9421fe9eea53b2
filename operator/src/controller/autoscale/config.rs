//! The autoscaler core's [`Config`] from an InferenceService spec (pure).

use crate::autoscaler::{Behavior, Bounds, Config, EdgeConfig, ExpertsConfig, Method, Slo};
use crate::crd::{AutoscalingMode, ForecastMethod, InferenceServiceSpec};

/// Assumed when the spec gives no `targetRpsPerReplica` (refined online from saturation).
pub const DEFAULT_TARGET_RPS: f64 = 1.0;
/// Assumed when the spec gives no `targetTokensPerSecondPerReplica` for expert shards.
pub const DEFAULT_TARGET_TOKENS_PER_S: f64 = 1000.0;

fn bounds(min: i32, max: i32) -> Bounds {
    let min = min.max(0) as u32;
    Bounds {
        min,
        max: (max.max(0) as u32).max(min),
    }
}

/// `autoscaling.mode: Advisory`: decisions are published, never applied.
pub fn advisory(spec: &InferenceServiceSpec) -> bool {
    spec.autoscaling
        .as_ref()
        .is_some_and(|a| a.mode == AutoscalingMode::Advisory)
}

/// `None` when the spec does not enable autoscaling.
pub fn from_spec(spec: &InferenceServiceSpec, default_ready_time_s: f64) -> Option<Config> {
    let a = spec.autoscaling.as_ref().filter(|a| a.enabled)?;
    let target = a.target_rps_per_replica.unwrap_or(DEFAULT_TARGET_RPS);
    let interval_s = f64::from(a.interval_seconds);
    Some(Config {
        interval_s,
        method: match a.forecast.method {
            ForecastMethod::Auto => Method::Auto,
            ForecastMethod::Ets => Method::Ets,
            ForecastMethod::Mstl => Method::Mstl,
            ForecastMethod::Naive => Method::Naive,
        },
        quantile: a.forecast.quantile,
        horizon_s: a.forecast.horizon_seconds.map(f64::from),
        default_ready_time_s,
        target_rps_per_replica: target,
        slo: Slo {
            ttft_p95_s: a
                .slo
                .as_ref()
                .and_then(|s| s.ttft_p95_ms)
                .map(|ms| f64::from(ms) / 1000.0),
            tpot_p95_s: a
                .slo
                .as_ref()
                .and_then(|s| s.tpot_p95_ms)
                .map(|ms| f64::from(ms) / 1000.0),
        },
        behavior: Behavior {
            up_window_s: f64::from(a.scale_up.stabilization_window_seconds),
            up_max_step: a.scale_up.max_step,
            down_window_s: f64::from(a.scale_down.stabilization_window_seconds),
            down_max_step: a.scale_down.max_step,
        },
        cloud: bounds(spec.cloud.min_replicas, spec.cloud.max_replicas),
        edge: spec.edge.as_ref().map(|e| EdgeConfig {
            per_site: bounds(e.min_replicas_per_node, e.max_replicas_per_node),
            target_rps_per_replica: target,
        }),
        experts: spec.cloud.experts.as_ref().and_then(|x| {
            let num_experts = spec.model.num_experts?;
            let shards = x.shards.max(1);
            let even = num_experts.div_ceil(shards);
            Some(ExpertsConfig {
                num_experts,
                shards,
                per_shard: bounds(x.min_replicas_per_shard, x.max_replicas_per_shard),
                slots_per_shard: x.slots_per_shard.unwrap_or(even + 1).max(even),
                target_tokens_per_s_per_replica: x
                    .target_tokens_per_second_per_replica
                    .unwrap_or(DEFAULT_TARGET_TOKENS_PER_S),
            })
        }),
        prescale_cloud_for_edge: a.prescale_cloud_for_edge,
        // Three missed intervals (or 30 s) without a fresh scrape is stale.
        max_staleness_s: (3.0 * interval_s).max(30.0),
        seed: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::InferenceService;

    fn example(file: &str) -> Vec<InferenceService> {
        let path = format!("{}/../deploy/examples/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(path).unwrap();
        serde_yaml::Deserializer::from_str(&text)
            .filter_map(|d| {
                let v = serde_yaml::Value::deserialize(d).ok()?;
                (v.get("kind")?.as_str()? == "InferenceService")
                    .then(|| serde_yaml::from_value(v).unwrap())
            })
            .collect()
    }
    use serde::Deserialize;

    #[test]
    fn moe_example_maps_shards_slots_and_bounds() {
        let tis = &example("moe-experts.yaml")[0];
        let c = from_spec(&tis.spec, 60.0).expect("autoscaling enabled");
        let x = c.experts.expect("experts");
        let spec_x = tis.spec.cloud.experts.as_ref().unwrap();
        assert_eq!(x.shards, spec_x.shards);
        assert!(x.slots_per_shard * x.shards >= x.num_experts);
        assert_eq!(c.cloud.min, tis.spec.cloud.min_replicas as u32);
        assert_eq!(c.cloud.max, tis.spec.cloud.max_replicas as u32);
        assert!(c.max_staleness_s >= 3.0 * c.interval_s);
    }

    #[test]
    fn disabled_autoscaling_gives_no_config() {
        let mut tis = example("dense-cloud.yaml").remove(0);
        if let Some(a) = tis.spec.autoscaling.as_mut() {
            a.enabled = false;
        }
        assert!(from_spec(&tis.spec, 60.0).is_none());
    }

    #[test]
    fn slo_milliseconds_become_seconds() {
        let mut tis = example("dense-cloud.yaml").remove(0);
        let a = tis
            .spec
            .autoscaling
            .get_or_insert_with(|| serde_json::from_value(serde_json::json!({})).unwrap());
        a.enabled = true;
        a.slo = Some(crate::crd::SloSpec {
            ttft_p95_ms: Some(1500),
            tpot_p95_ms: None,
        });
        let c = from_spec(&tis.spec, 60.0).unwrap();
        assert_eq!(c.slo.ttft_p95_s, Some(1.5));
        assert_eq!(c.slo.tpot_p95_s, None);
    }
}
