//! Tidal's operator: CRD types, controllers and the autoscaler.
//!
//! Pure logic lives where `kube` cannot reach it: the autoscaler core is its own crate
//! (`tidal-autoscaler`, re-exported here as [`autoscaler`]) shared with the simulator
//! (`tidal-sim`); the desired-state builders ([`children`], [`edge`]) import no `kube`.

/// The API group and version every Tidal custom resource lives in.
pub const API_GROUP: &str = "tidal.rs";
/// The served and stored version of the Tidal API.
pub const API_VERSION: &str = "v1alpha1";

pub mod children;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod edge;
pub mod error;
pub mod metrics;
pub mod run;
pub mod server;
pub mod telemetry;

pub use tidal_autoscaler as autoscaler;
