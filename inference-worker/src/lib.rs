//! Tidal's worker: a candle-based model server for Mixtral-family MoE and
//! Llama/Mistral/Qwen2 dense decoders, with an OpenAI-compatible HTTP API.

pub mod api;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod escalation;
pub mod expert_server;
pub mod fixture;
pub mod hub;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod placement;
pub mod sampling;
pub mod server;
pub mod shard_client;
pub mod shard_metrics;
pub mod text;
pub mod weights;
pub mod wire;

pub use error::{Error, Result};
