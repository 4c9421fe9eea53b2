//! Scaling policies the simulator compares: the interface, and the per-target wrapper that
//! runs one instance of a single-target baseline per scaling target.

use tidal_autoscaler::{ForecastSummary, WorkerLoad};

use super::cluster::TargetObs;

/// What a policy sees at a sync: the cloud tier and each edge site.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Observation {
    pub time_s: f64,
    pub cloud: TargetObs,
    /// (site name, observation), in site order.
    pub sites: Vec<(String, TargetObs)>,
}

/// What a policy decides at a sync.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Action {
    pub cloud: u32,
    /// Indexed like `Observation::sites`.
    pub sites: Vec<u32>,
    /// The forecast behind the decision, for policies that forecast (reported, not acted on).
    pub forecast: Option<ForecastSummary>,
}

/// What a fast path reads between syncs: each target's workers (queue, ready, desired).
#[derive(Clone, Debug, PartialEq)]
pub struct FastObservation {
    pub time_s: f64,
    pub cloud: WorkerLoad,
    /// (site name, reading), online sites only.
    pub sites: Vec<(String, WorkerLoad)>,
}

/// Scale-ups a fast path asks for (never down).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct FastAction {
    pub cloud: Option<u32>,
    /// (site name, replicas).
    pub sites: Vec<(String, u32)>,
}

/// A scaling policy under test.
pub trait Policy {
    fn name(&self) -> &str;
    /// Seconds between syncs.
    fn interval_s(&self) -> f64;
    fn decide(&mut self, obs: &Observation) -> Action;
    /// Seconds between fast-path readings, for a policy that has a fast path.
    fn fast_interval_s(&self) -> Option<f64> {
        None
    }
    /// The fast path between syncs.
    fn fast(&mut self, _obs: &FastObservation) -> FastAction {
        FastAction::default()
    }
    /// Whether an online edge site with no ready replica has its traffic served by the cloud
    /// tier (its Service pointed there) rather than waiting for a replica of its own.
    fn routes_idle_sites_to_cloud(&self) -> bool {
        false
    }
}

/// Replica bounds and the load one replica is meant to carry: the same for every policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TargetSpec {
    pub target_rps_per_replica: f64,
    pub min: u32,
    pub max: u32,
}

/// A baseline that scales one target from that target's own metrics.
pub trait Scaler {
    fn recommend(&mut self, now_s: f64, obs: &TargetObs) -> u32;
}

/// Runs one [`Scaler`] per target (cloud, then each edge site), independently.
pub struct PerTarget<S> {
    name: String,
    interval_s: f64,
    cloud: S,
    sites: Vec<S>,
    make_site: Box<dyn Fn() -> S>,
}

impl<S: Scaler> PerTarget<S> {
    pub fn new(name: &str, interval_s: f64, cloud: S, make_site: impl Fn() -> S + 'static) -> Self {
        PerTarget {
            name: name.to_string(),
            interval_s,
            cloud,
            sites: vec![],
            make_site: Box::new(make_site),
        }
    }
}

impl<S: Scaler> Policy for PerTarget<S> {
    fn name(&self) -> &str {
        &self.name
    }

    fn interval_s(&self) -> f64 {
        self.interval_s
    }

    fn decide(&mut self, obs: &Observation) -> Action {
        while self.sites.len() < obs.sites.len() {
            self.sites.push((self.make_site)());
        }
        let cloud = self.cloud.recommend(obs.time_s, &obs.cloud);
        let sites = obs
            .sites
            .iter()
            .zip(self.sites.iter_mut())
            .map(|((_, o), s)| s.recommend(obs.time_s, o))
            .collect();
        Action {
            cloud,
            sites,
            forecast: None,
        }
    }
}
