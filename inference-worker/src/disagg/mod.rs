//! Expert disaggregation: a MoE model's experts served by separate processes.

pub mod expert_server;
pub mod metrics;
pub mod placement;
pub mod shard_client;
pub mod wire;
