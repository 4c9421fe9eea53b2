//! PLACEHOLDER being replaced by the real core: a reactive rule so callers compile.

use super::types::*;

/// The stateful core: one per InferenceService (history lives here).
pub struct Autoscaler {
    config: Config,
    last: Option<Decision>,
}

impl Autoscaler {
    pub fn new(config: Config) -> Self {
        Autoscaler { config, last: None }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// One decision at `now_s`. `snapshot` is `None` when Prometheus could not be queried.
    pub fn step(
        &mut self,
        now_s: f64,
        snapshot: Option<&Snapshot>,
        facts: &ClusterFacts,
    ) -> Decision {
        let cloud_prev = facts.cloud.desired;
        let fresh = snapshot.filter(|s| now_s - s.time_s <= self.config.max_staleness_s);
        let Some(s) = fresh.and_then(|s| s.cloud.map(|c| (s, c))) else {
            let d = Decision {
                time_s: now_s,
                metrics_available: false,
                hold_reason: Some("no fresh metrics".into()),
                forecast: None,
                cloud: TargetDecision {
                    replicas: cloud_prev,
                    previous: cloud_prev,
                    reason: "hold".into(),
                    limited: None,
                },
                edge: Default::default(),
                shards: vec![],
                plan: None,
            };
            self.last = Some(d.clone());
            return d;
        };
        let want = (s.1.arrival_rps / self.config.target_rps_per_replica).ceil() as u32;
        let replicas = want.clamp(self.config.cloud.min, self.config.cloud.max);
        let d = Decision {
            time_s: now_s,
            metrics_available: true,
            hold_reason: None,
            forecast: None,
            cloud: TargetDecision {
                replicas,
                previous: cloud_prev,
                reason: "reactive".into(),
                limited: None,
            },
            edge: Default::default(),
            shards: vec![],
            plan: None,
        };
        self.last = Some(d.clone());
        d
    }
}
