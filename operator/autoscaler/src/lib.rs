//! The autoscaler's pure core: `(config, metrics snapshot, history, cluster facts) -> decision`.
//!
//! A crate of its own so the boundary holds: no I/O and no `kube` dependency. The operator's
//! live loop (`tidal_operator::controller::autoscale`) feeds it from Prometheus and the API
//! server, and the simulator (the `tidal-sim` crate) feeds it from a trace and a cluster model. Both call [`Autoscaler::step`] once per interval.
//!
//! The types in [`types`] are the contract between the three; add fields, never rename.
//!
//! One job per module: [`forecast`] (bounded history, cached augurs models, conformal
//! intervals), [`conformal`] (their online calibration), [`level`] (the smoothed demand now and how much of it lasts a horizon), [`capacity`] (capacity per replica, learned and SLO-corrected), [`fast`] (scale-ups
//! from the workers' own queue readings, every second or two), [`stabilize`]
//! (windows, step limits, bounds), [`queueing`] (headroom for waits within the TTFT SLO),
//! [`planner`] (expert placement and shard replicas), [`plan_gate`] (when a new placement may
//! replace the one in force or a rollout in progress), and
//! [`core`] (the stateful step tying them together).

pub mod capacity;
pub mod conformal;
pub mod core;
pub mod fast;
pub mod forecast;
pub mod level;
pub mod plan_gate;
pub mod planner;
pub mod queueing;
pub mod stabilize;
pub mod types;

pub use self::core::{Autoscaler, FastDecision};
pub use self::fast::{FastPathConfig, FastScale, WorkerLoad};
pub use self::forecast::History;
pub use self::types::*;
