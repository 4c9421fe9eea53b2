//! Inputs and outputs of the autoscaler core. Plain data, no I/O; times are seconds on any
//! monotonic clock the caller chooses (simulated time in the simulator, Unix time live).

use std::collections::BTreeMap;

pub use super::plan_gate::Stage;

/// Forecasting method (mirrors the CRD's `forecast.method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Method {
    /// MSTL when the history covers two seasons, ETS when it is long enough, naive before.
    #[default]
    Auto,
    Ets,
    Mstl,
    Naive,
}

/// Replica bounds of one scaling target (the cloud tier, one edge site, one expert shard).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
}

/// Stabilisation and step limits, shared by every target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Behavior {
    /// Scale up to the lowest recommendation of this many past seconds (0 = act at once).
    pub up_window_s: f64,
    pub up_max_step: u32,
    /// Scale down to the highest recommendation of this many past seconds.
    pub down_window_s: f64,
    pub down_max_step: u32,
}

/// Service-level objectives that correct the capacity estimate when breached.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Slo {
    pub ttft_p95_s: Option<f64>,
    pub tpot_p95_s: Option<f64>,
}

/// The edge tier: one scaling target per site.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeConfig {
    pub per_site: Bounds,
    pub target_rps_per_replica: f64,
}

/// Disaggregated experts: one scaling target per shard, plus the placement plan.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertsConfig {
    pub num_experts: u32,
    pub shards: u32,
    pub per_shard: Bounds,
    /// How many experts one shard can hold (memory); >= ceil(num_experts / shards). Slots
    /// beyond that hold redundant copies of hot experts.
    pub slots_per_shard: u32,
    /// Routed tokens per second one shard replica sustains.
    pub target_tokens_per_s_per_replica: f64,
}

/// Everything the core needs from the InferenceService spec (converted by the caller).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub interval_s: f64,
    pub method: Method,
    /// Quantile of predicted demand to provision for, in (0.5, 1).
    pub quantile: f64,
    /// Fixed horizon; `None` = the p90 of observed replica ready times.
    pub horizon_s: Option<f64>,
    /// Ready time assumed until one has been observed.
    pub default_ready_time_s: f64,
    /// Requests per second one cloud replica sustains within the SLO (the prior; refined).
    pub target_rps_per_replica: f64,
    pub slo: Slo,
    pub behavior: Behavior,
    pub cloud: Bounds,
    pub edge: Option<EdgeConfig>,
    pub experts: Option<ExpertsConfig>,
    /// While an edge site is offline, add its forecast load to the cloud tier.
    pub prescale_cloud_for_edge: bool,
    /// A snapshot older than this (relative to `now`) is stale: hold the last decision.
    pub max_staleness_s: f64,
    /// Seed for anything random, so decisions are reproducible.
    pub seed: u64,
}

/// Load measured on one tier or site over the last interval.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct TierSample {
    /// Requests arriving per second (served + rejected + escalated away).
    pub arrival_rps: f64,
    /// Requests completed per second.
    pub served_rps: f64,
    /// Requests waiting in worker queues (sum over replicas).
    pub queue_depth: f64,
    /// Requests being decoded (sum over replicas).
    pub running: f64,
    pub ttft_p95_s: Option<f64>,
    pub tpot_p95_s: Option<f64>,
}

/// One edge site's sample; `online` comes from the EdgeNode phase.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct SiteSample {
    pub online: bool,
    pub load: Option<TierSample>,
}

/// What Prometheus said at one instant. `None` = the query returned no data.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Snapshot {
    pub time_s: f64,
    pub cloud: Option<TierSample>,
    /// Keyed by EdgeNode name.
    pub edge: BTreeMap<String, SiteSample>,
    /// Routed tokens per second per expert id (summed over layers).
    pub expert_tokens_per_s: Option<Vec<f64>>,
}

/// Replica counts of one target, from the API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplicaCounts {
    pub desired: u32,
    pub ready: u32,
}

/// What the cluster looks like now.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ClusterFacts {
    pub cloud: ReplicaCounts,
    /// Keyed by EdgeNode name; only sites the service runs on.
    pub edge: BTreeMap<String, ReplicaCounts>,
    /// Indexed by shard.
    pub shards: Vec<ReplicaCounts>,
    /// Seconds new replicas took from creation to Ready, observed since the last step.
    pub ready_times_s: Vec<f64>,
    /// The expert placement the cluster has (disaggregated experts only). `None`: the core
    /// takes its own last plan as in force (the simulator, unit tests).
    pub placement: Option<PlacementFacts>,
}

/// The expert placement as the cluster has it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PlacementFacts {
    /// Where routing is heading: a rollout's target while one is in progress, else what the
    /// router uses. Indexed by shard.
    pub shards: Vec<Vec<u32>>,
    pub stage: Stage,
}

/// The forecast behind a decision (cloud tier demand, requests per second).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ForecastSummary {
    /// Demand measured now.
    pub now: f64,
    /// Point forecast at the horizon.
    pub predicted: f64,
    /// Prediction interval at the configured quantile.
    pub lower: f64,
    pub upper: f64,
    pub horizon_s: f64,
    /// The method actually used (Auto resolves to one of the others).
    pub method: Method,
    /// How the interval has held its nominal levels lately (`None` before any forecast was
    /// scored at its horizon).
    pub calibration: Option<crate::forecast::Calibration>,
}

/// The decision for one target.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetDecision {
    pub replicas: u32,
    pub previous: u32,
    /// Human-readable why, e.g. "forecast 41.2 rps (p90 over 45 s) / 10.0 rps per replica".
    pub reason: String,
    /// Set when a bound, step limit or stabilisation window held the recommendation back.
    pub limited: Option<String>,
}

/// Which experts each shard holds, and how many replicas each shard gets.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertPlan {
    /// Indexed by shard: the expert ids it holds (an expert may be held by several shards).
    pub shards: Vec<Vec<u32>>,
    /// Indexed by shard.
    pub replicas: Vec<u32>,
    /// max / mean of the predicted load per replica (1.0 = perfectly balanced).
    pub imbalance: f64,
    /// Why it was emitted (set on plans in `Decision::plan`).
    pub reason: String,
}

/// The output of one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub time_s: f64,
    /// False when the snapshot was missing or stale; the decision then holds the last one.
    pub metrics_available: bool,
    /// Why the last decision is held, if it is.
    pub hold_reason: Option<String>,
    pub forecast: Option<ForecastSummary>,
    pub cloud: TargetDecision,
    /// Keyed by EdgeNode name.
    pub edge: BTreeMap<String, TargetDecision>,
    /// Indexed by shard.
    pub shards: Vec<TargetDecision>,
    /// A new placement plan, when it changed.
    pub plan: Option<ExpertPlan>,
}
