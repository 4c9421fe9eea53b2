//! Tidal's operator: CRD types, controllers and the autoscaler.
//!
//! Pure logic (desired-state builders, forecasting, planning) lives in modules that do not
//! import `kube`, so it is unit-tested and shared with the simulator.

/// The API group and version every Tidal custom resource lives in.
pub const API_GROUP: &str = "tidal.rs";
/// The served and stored version of the Tidal API.
pub const API_VERSION: &str = "v1alpha1";

pub mod autoscaler;
pub mod children;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod edge;
pub mod error;
pub mod metrics;
pub mod run;
pub mod server;
pub mod sim;
pub mod telemetry;
