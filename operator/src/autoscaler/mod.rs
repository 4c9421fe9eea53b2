//! The autoscaler's pure core: `(config, metrics snapshot, history, cluster facts) -> decision`.
//!
//! No I/O and no `kube` here: the operator's live loop (`crate::controller::autoscale`) feeds
//! it from Prometheus and the API server, and the simulator (`crate::sim`) feeds it from a
//! trace and a cluster model. Both call [`Autoscaler::step`] once per interval.
//!
//! The types in [`types`] are the contract between the three; add fields, never rename.

pub mod core;
pub mod types;

pub use self::core::Autoscaler;
pub use self::types::*;
