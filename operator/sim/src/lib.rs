//! The autoscaler simulator behind `tidal-sim`: replays a request trace (or a synthetic
//! pattern) through a cluster model under Tidal's core and under baseline policies (HPA-,
//! KPA- and AIBrix-like), and scores each on SLO attainment, cost, scale events and forecast
//! accuracy.
//!
//! - [`trace`]: trace files -> arrivals per tick; [`synthetic`]: seeded patterns.
//! - [`cluster`]: one scaling target (replicas, cold start, FIFO queue, TTFT) as a fluid;
//!   [`des`]: the same as discrete events (requests, batching replicas, queueing).
//! - [`policy`], [`baselines`], [`tidal`]: the policies under test.
//! - [`engine`]: the replay loop; [`metrics`]: scores; [`report`], [`plot`]: output.
//! - [`frontier`]: policies compared at matched cost and SLO over a swept target utilisation;
//!   [`heldout`]: Tidal at a setting chosen on other scenarios (leave-one-out, fresh days).

pub mod baselines;
pub mod cluster;
pub mod des;
pub mod engine;
pub mod frontier;
pub mod heldout;
pub mod metrics;
pub mod plot;
pub mod policy;
pub mod replay_gap;
pub mod report;
pub mod synthetic;
pub mod tidal;
pub mod trace;

#[cfg(test)]
mod tests;

use std::str::FromStr;

use self::baselines::{AiBrix, Hpa, Kpa};
use self::cluster::ReplicaModel;
use self::engine::{EdgeSetup, Outage, RunResult, SimSetup};
use self::frontier::{Curve, Point};
use self::metrics::Summary;
use self::policy::{PerTarget, Policy, TargetSpec};
use self::tidal::{TidalOptions, TidalPolicy};
use self::trace::Trace;

/// The policies the simulator knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    Tidal,
    Hpa,
    Kpa,
    AiBrix,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 4] = [
        PolicyKind::Tidal,
        PolicyKind::Hpa,
        PolicyKind::Kpa,
        PolicyKind::AiBrix,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Tidal => "tidal",
            PolicyKind::Hpa => "hpa",
            PolicyKind::Kpa => "kpa",
            PolicyKind::AiBrix => "aibrix",
        }
    }

    /// Builds the policy for `setup`; every policy gets the same targets and bounds.
    pub fn build(self, setup: &SimSetup, tidal: &TidalOptions) -> Box<dyn Policy> {
        let cloud = setup.cloud;
        let site = setup.edge.as_ref().map_or(cloud, |e| e.spec);
        let horizon = setup.model.cold_start_s;
        match self {
            PolicyKind::Tidal => Box::new(TidalPolicy::new(
                cloud,
                setup.edge.as_ref().map(|e| e.spec),
                &setup.model,
                tidal,
            )),
            PolicyKind::Hpa => Box::new(PerTarget::new(
                "hpa",
                Hpa::INTERVAL_S,
                Hpa::new(cloud),
                move || Hpa::new(site),
            )),
            PolicyKind::Kpa => Box::new(PerTarget::new(
                "kpa",
                Kpa::INTERVAL_S,
                Kpa::new(cloud),
                move || Kpa::new(site),
            )),
            PolicyKind::AiBrix => Box::new(PerTarget::new(
                "aibrix",
                AiBrix::INTERVAL_S,
                AiBrix::new(cloud, horizon),
                move || AiBrix::new(site, horizon),
            )),
        }
    }
}

impl FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PolicyKind::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown policy {s:?}: one of tidal, hpa, kpa, aibrix"))
    }
}

/// How the cluster model is derived from a trace (the `tidal-sim` flags).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelOptions {
    /// Replicas the trace's mean load needs at the target utilisation (sets the capacity).
    pub mean_replicas: f64,
    /// Overrides the derived per-replica capacity (requests/s).
    pub capacity_rps: Option<f64>,
    /// Target load per replica as a fraction of its capacity (the same for every policy).
    pub target_utilization: f64,
    pub cold_start_s: f64,
    pub slo_ttft_s: f64,
    /// Overrides the prefill time derived from the mean prompt length.
    pub prefill_s: Option<f64>,
    /// Prompt tokens per second one replica prefills (derives the prefill time).
    pub prefill_tokens_per_s: f64,
    pub max_wait_s: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Edge sites (0 = no edge tier).
    pub edge_sites: usize,
    pub edge_fraction: f64,
    /// Fewest replicas per edge site (default: `min_replicas`); 0 lets a site sleep.
    pub edge_min_replicas: Option<u32>,
    pub edge_max_replicas: u32,
    pub outages: Vec<Outage>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            mean_replicas: 6.0,
            capacity_rps: None,
            target_utilization: 0.8,
            cold_start_s: 60.0,
            slo_ttft_s: 2.0,
            prefill_s: None,
            prefill_tokens_per_s: 20000.0,
            max_wait_s: 60.0,
            min_replicas: 1,
            max_replicas: 64,
            edge_sites: 0,
            edge_fraction: 0.3,
            edge_min_replicas: None,
            edge_max_replicas: 16,
            outages: vec![],
        }
    }
}

impl ModelOptions {
    /// The cluster for `trace`: capacity so that the mean load needs `mean_replicas` at the
    /// target utilisation; prefill from the mean prompt length.
    pub fn setup(&self, trace: &Trace) -> Result<SimSetup, String> {
        if self.mean_replicas <= 0.0
            || !(self.target_utilization > 0.0 && self.target_utilization <= 1.0)
        {
            return Err("mean replicas must be > 0 and target utilisation in (0, 1]".into());
        }
        if self.min_replicas > self.max_replicas {
            return Err(format!(
                "min replicas {} > max replicas {}",
                self.min_replicas, self.max_replicas
            ));
        }
        let mean = trace.mean_rps().max(1e-9);
        let capacity = match self.capacity_rps {
            Some(c) if c > 0.0 => c,
            Some(c) => return Err(format!("capacity must be > 0 rps, got {c}")),
            None => mean / (self.mean_replicas * self.target_utilization),
        };
        let prefill = self.prefill_s.unwrap_or_else(|| {
            (0.1 + trace.mean_input_tokens / self.prefill_tokens_per_s).min(0.5 * self.slo_ttft_s)
        });
        if prefill >= self.slo_ttft_s {
            return Err(format!(
                "prefill {prefill} s leaves no room in the {} s SLO",
                self.slo_ttft_s
            ));
        }
        let target = capacity * self.target_utilization;
        let edge = (self.edge_sites > 0).then(|| EdgeSetup {
            sites: self.edge_sites,
            fraction: self.edge_fraction,
            outages: self.outages.clone(),
            spec: TargetSpec {
                target_rps_per_replica: target,
                min: self.edge_min_replicas.unwrap_or(self.min_replicas),
                max: self.edge_max_replicas,
            },
        });
        if let Some(o) = self.outages.iter().find(|o| o.site >= self.edge_sites) {
            return Err(format!(
                "outage for site {} but only {} edge sites",
                o.site, self.edge_sites
            ));
        }
        Ok(SimSetup {
            model: ReplicaModel {
                capacity_rps: capacity,
                cold_start_s: self.cold_start_s,
                prefill_s: prefill,
                slo_ttft_s: self.slo_ttft_s,
                max_wait_s: self.max_wait_s,
            },
            cloud: TargetSpec {
                target_rps_per_replica: target,
                min: self.min_replicas,
                max: self.max_replicas,
            },
            edge,
            start_replicas: None,
        })
    }
}

/// Every policy's run and score on one trace.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub trace: Trace,
    pub setup: SimSetup,
    pub runs: Vec<RunResult>,
    pub summaries: Vec<Summary>,
    /// Per-tick arrivals the cloud tier received.
    pub cloud_arrivals: Vec<f64>,
    /// Each policy swept over target utilisations (empty unless [`sweep`] was run).
    pub curves: Vec<Curve>,
}

/// The name of a Tidal variant in reports: `tidal-q<quantile>`, or `tidal-no-fast` for the
/// default quantile without the fast path (`tidal-q<quantile>-no-fast` for both).
pub fn variant_name(opts: &TidalOptions) -> String {
    let default_q = opts.quantile == TidalOptions::default().quantile;
    match (opts.fast.is_some(), default_q) {
        (true, _) => format!("tidal-q{}", opts.quantile),
        (false, true) => "tidal-no-fast".to_string(),
        (false, false) => format!("tidal-q{}-no-fast", opts.quantile),
    }
}

/// Replays `trace` under each policy, then under Tidal with each of `variants` (other
/// options, same core; named by [`variant_name`]).
pub fn run_scenario(
    trace: Trace,
    setup: SimSetup,
    policies: &[PolicyKind],
    tidal: &TidalOptions,
    variants: &[TidalOptions],
) -> Scenario {
    let (cloud_arrivals, _) = engine::route(&trace, setup.edge.as_ref());
    let all = build_all(&setup, policies, tidal, variants);
    replay_each(trace, setup, cloud_arrivals, all, |t, s, p| {
        engine::simulate(t, s, p)
    })
}

/// Runs `replay` once per policy and scores each run against `cloud_arrivals`.
fn replay_each(
    trace: Trace,
    setup: SimSetup,
    cloud_arrivals: Vec<f64>,
    policies: Vec<Box<dyn Policy>>,
    replay: impl Fn(&Trace, &SimSetup, &mut dyn Policy) -> RunResult,
) -> Scenario {
    let mut runs = Vec::new();
    let mut summaries = Vec::new();
    for mut policy in policies {
        let run = replay(&trace, &setup, policy.as_mut());
        summaries.push(metrics::summarize(&run, &cloud_arrivals, trace.tick_s));
        runs.push(run);
    }
    Scenario {
        trace,
        setup,
        runs,
        summaries,
        cloud_arrivals,
        curves: Vec::new(),
    }
}

/// What a discrete-event replay of `trace` needs: the batching model calibrated for `setup`,
/// the trace's requests (drawn with `seed`) routed to targets, and the cloud's arrivals per tick.
#[allow(clippy::type_complexity)]
fn des_inputs(
    trace: &Trace,
    setup: &SimSetup,
    max_batch: u32,
    seed: u64,
) -> Result<
    (
        des::BatchModel,
        engine::Routed<Vec<trace::Request>>,
        Vec<f64>,
    ),
    String,
> {
    let batch = des::BatchModel::calibrated(
        setup.model,
        max_batch,
        trace.mean_input_tokens,
        trace.mean_output_tokens,
    )?;
    let requests = des::requests(trace, seed);
    let routed = engine::route_requests(trace, &requests, setup.edge.as_ref());
    let cloud = routed.cloud.iter().map(|r| r.len() as f64).collect();
    Ok((batch, routed, cloud))
}

/// One row of the edge scale-to-zero study ([`sleep_study`]).
#[derive(Clone, Debug)]
pub struct SleepRow {
    pub policy: String,
    /// Each site's fewest replicas.
    pub edge_min: u32,
    /// `fluid` or `discrete-event`.
    pub mode: &'static str,
    pub summary: Summary,
    pub sleep: engine::SleepStats,
}

/// Edge sites that may sleep, on `trace` with `model`'s edge tier: Tidal with its sites kept
/// at `model.min_replicas` (always on) and at 0 (a quiet site sleeps and its Service routes to
/// the cloud tier meanwhile), and KPA at 0 (Knative's scale to zero: a site's requests wait at
/// the site for a replica to start). Fluid mode, and discrete-event when `des_batch` is given.
pub fn sleep_study(
    trace: &Trace,
    model: &ModelOptions,
    tidal: &TidalOptions,
    des_batch: Option<u32>,
    seed: u64,
) -> Result<Vec<SleepRow>, String> {
    let cases = [
        (PolicyKind::Tidal, model.min_replicas),
        (PolicyKind::Tidal, 0),
        (PolicyKind::Kpa, 0),
    ];
    let mut rows = Vec::new();
    for (kind, edge_min) in cases {
        let m = ModelOptions {
            edge_min_replicas: Some(edge_min),
            ..model.clone()
        };
        let setup = m.setup(trace)?;
        let (cloud_arrivals, _) = engine::route(trace, setup.edge.as_ref());
        let row = |mode, run: RunResult, cloud: &[f64]| SleepRow {
            policy: kind.name().into(),
            edge_min,
            mode,
            summary: metrics::summarize(&run, cloud, trace.tick_s),
            sleep: run.sleep,
        };
        let mut policy = kind.build(&setup, tidal);
        let run = engine::simulate(trace, &setup, policy.as_mut());
        rows.push(row("fluid", run, &cloud_arrivals));
        if let Some(max_batch) = des_batch {
            let (batch, routed, cloud) = des_inputs(trace, &setup, max_batch, seed)?;
            let mut policy = kind.build(&setup, tidal);
            let run = engine::simulate_des(trace, &routed, &setup, &batch, policy.as_mut());
            rows.push(row("discrete-event", run, &cloud));
        }
    }
    Ok(rows)
}

/// The policies, then Tidal with each of `variants`.
fn build_all(
    setup: &SimSetup,
    policies: &[PolicyKind],
    tidal: &TidalOptions,
    variants: &[TidalOptions],
) -> Vec<Box<dyn Policy>> {
    let mut out: Vec<Box<dyn Policy>> = policies.iter().map(|p| p.build(setup, tidal)).collect();
    for v in variants {
        let edge = setup.edge.as_ref().map(|e| e.spec);
        let p = TidalPolicy::new(setup.cloud, edge, &setup.model, v).named(&variant_name(v));
        out.push(Box::new(p));
    }
    out
}

/// [`run_scenario`] in the discrete-event mode: the trace's requests (or ones drawn from its
/// arrivals with `seed`) on replicas of `max_batch` slots that batch like the worker
/// ([`des::BatchModel::calibrated`] from `setup`). No sweep: it is the slow mode.
pub fn run_scenario_des(
    trace: Trace,
    setup: SimSetup,
    policies: &[PolicyKind],
    tidal: &TidalOptions,
    variants: &[TidalOptions],
    max_batch: u32,
    seed: u64,
) -> Result<Scenario, String> {
    let (batch, routed, cloud_arrivals) = des_inputs(&trace, &setup, max_batch, seed)?;
    let all = build_all(&setup, policies, tidal, variants);
    Ok(replay_each(trace, setup, cloud_arrivals, all, |t, s, p| {
        engine::simulate_des(t, &routed, s, &batch, p)
    }))
}

/// `setup` with every policy's target load per replica at `utilization` of the replica's
/// capacity; the cluster itself (capacity, cold start, SLO) is unchanged.
pub fn at_utilization(setup: &SimSetup, utilization: f64) -> SimSetup {
    let target = setup.model.capacity_rps * utilization;
    let mut s = setup.clone();
    s.cloud.target_rps_per_replica = target;
    if let Some(e) = s.edge.as_mut() {
        e.spec.target_rps_per_replica = target;
    }
    s
}

/// Replays `trace` under each policy at each target utilisation, on up to `threads` threads;
/// one [`Curve`] per policy, points in the order of `utilizations`.
pub fn sweep(
    trace: &Trace,
    setup: &SimSetup,
    policies: &[PolicyKind],
    tidal: &TidalOptions,
    utilizations: &[f64],
    threads: usize,
) -> Vec<Curve> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let (cloud_arrivals, _) = engine::route(trace, setup.edge.as_ref());
    let jobs: Vec<(usize, usize)> = (0..policies.len())
        .flat_map(|p| (0..utilizations.len()).map(move |u| (p, u)))
        .collect();
    let results: Mutex<Vec<Option<Point>>> = Mutex::new(vec![None; jobs.len()]);
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, jobs.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(p, u)) = jobs.get(i) else { break };
                    let s = at_utilization(setup, utilizations[u]);
                    let mut policy = policies[p].build(&s, tidal);
                    let run = engine::simulate(trace, &s, policy.as_mut());
                    let sum = metrics::summarize(&run, &cloud_arrivals, trace.tick_s);
                    let point = Point {
                        utilization: utilizations[u],
                        attainment: sum.slo_attainment,
                        replica_seconds: sum.replica_seconds,
                    };
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(point);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    policies
        .iter()
        .enumerate()
        .map(|(p, kind)| Curve {
            policy: kind.name().to_string(),
            points: jobs
                .iter()
                .zip(&results)
                .filter(|((jp, _), _)| *jp == p)
                .filter_map(|(_, r)| *r)
                .collect(),
        })
        .collect()
}
