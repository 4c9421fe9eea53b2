//! Tidal's own core as a simulator policy: builds the contract types (`Config`, `Snapshot`,
//! `ClusterFacts`) from the simulated cluster, exactly as the live operator builds them from
//! the spec, Prometheus and the API server.

use std::collections::BTreeMap;

use tidal_autoscaler::{
    Autoscaler, Behavior, Bounds, ClusterFacts, Config, EdgeConfig, FastPathConfig, Method,
    ReplicaCounts, SiteSample, Slo, Snapshot,
};

use super::cluster::{ReplicaModel, TargetObs};
use super::policy::{Action, FastAction, FastObservation, Observation, Policy, TargetSpec};

/// Knobs of the Tidal policy that are not part of the shared cluster model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TidalOptions {
    pub interval_s: f64,
    pub quantile: f64,
    pub down_window_s: f64,
    pub seed: u64,
    /// The fast path on the workers' queues (`None`: the slow path alone).
    pub fast: Option<FastPathConfig>,
}

impl Default for TidalOptions {
    fn default() -> Self {
        TidalOptions {
            interval_s: 15.0,
            quantile: 0.9,
            down_window_s: 300.0,
            seed: 1,
            fast: Some(FastPathConfig::default()),
        }
    }
}

/// The core, driven through its public contract only.
pub struct TidalPolicy {
    core: Autoscaler,
    interval_s: f64,
    fast: Option<FastPathConfig>,
    name: String,
}

impl TidalPolicy {
    pub fn new(
        cloud: TargetSpec,
        edge: Option<TargetSpec>,
        model: &ReplicaModel,
        opts: &TidalOptions,
    ) -> Self {
        let config = Config {
            interval_s: opts.interval_s,
            method: Method::Auto,
            quantile: opts.quantile,
            horizon_s: None,
            default_ready_time_s: model.cold_start_s,
            target_rps_per_replica: cloud.target_rps_per_replica,
            slo: Slo {
                ttft_p95_s: Some(model.slo_ttft_s),
                tpot_p95_s: None,
            },
            behavior: Behavior {
                up_window_s: 0.0,
                up_max_step: cloud.max,
                down_window_s: opts.down_window_s,
                down_max_step: cloud.max,
            },
            cloud: Bounds {
                min: cloud.min,
                max: cloud.max,
            },
            edge: edge.map(|e| EdgeConfig {
                per_site: Bounds {
                    min: e.min,
                    max: e.max,
                },
                target_rps_per_replica: e.target_rps_per_replica,
            }),
            experts: None,
            prescale_cloud_for_edge: true,
            max_staleness_s: 2.0 * opts.interval_s,
            seed: opts.seed,
        };
        TidalPolicy {
            core: Autoscaler::new(config),
            interval_s: opts.interval_s,
            fast: opts.fast,
            name: "tidal".into(),
        }
    }

    /// Renames the policy (for variants with other options, e.g. `tidal-q0.99`).
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }
}

fn counts(o: &TargetObs) -> ReplicaCounts {
    ReplicaCounts {
        desired: o.desired,
        ready: o.ready,
    }
}

impl Policy for TidalPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn interval_s(&self) -> f64 {
        self.interval_s
    }

    fn routes_idle_sites_to_cloud(&self) -> bool {
        true
    }

    fn decide(&mut self, obs: &Observation) -> Action {
        let snapshot = Snapshot {
            time_s: obs.time_s,
            cloud: Some(obs.cloud.sample),
            edge: obs
                .sites
                .iter()
                .map(|(name, o)| {
                    let sample = SiteSample {
                        online: o.online,
                        load: o.online.then_some(o.sample),
                    };
                    (name.clone(), sample)
                })
                .collect(),
            expert_tokens_per_s: None,
        };
        let mut ready_times_s = obs.cloud.ready_times_s.clone();
        for (_, o) in &obs.sites {
            ready_times_s.extend_from_slice(&o.ready_times_s);
        }
        let facts = ClusterFacts {
            cloud: counts(&obs.cloud),
            edge: obs
                .sites
                .iter()
                .map(|(n, o)| (n.clone(), counts(o)))
                .collect::<BTreeMap<_, _>>(),
            shards: vec![],
            ready_times_s,
            placement: None,
        };
        let d = self.core.step(obs.time_s, Some(&snapshot), &facts);
        Action {
            cloud: d.cloud.replicas,
            sites: obs
                .sites
                .iter()
                .map(|(n, o)| d.edge.get(n).map_or(o.desired, |t| t.replicas))
                .collect(),
            forecast: d.forecast,
        }
    }

    fn fast_interval_s(&self) -> Option<f64> {
        self.fast.map(|f| f.interval_s)
    }

    fn fast(&mut self, obs: &FastObservation) -> FastAction {
        let Some(cfg) = self.fast else {
            return FastAction::default();
        };
        let sites = obs.sites.iter().cloned().collect::<BTreeMap<_, _>>();
        let d = self
            .core
            .fast_step(obs.time_s, &cfg, Some(obs.cloud), &sites);
        FastAction {
            cloud: d.cloud.map(|s| s.replicas),
            sites: d.edge.into_iter().map(|(n, s)| (n, s.replicas)).collect(),
        }
    }
}
