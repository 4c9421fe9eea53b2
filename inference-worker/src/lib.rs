//! Tidal's worker: a candle-based model server for MoE (Mixtral, Qwen2-MoE, Qwen3-MoE,
//! DeepSeek-V2) and Llama/Mistral/Qwen2/Qwen3 dense decoders, with an OpenAI-compatible
//! HTTP API.
//!
//! - [`model`]: checkpoints and the decoder itself (config, weights, layers, MoE).
//! - [`serve`]: serving one model over HTTP (API, batching engine, text, metrics,
//!   edge escalation, the bind/serve/drain lifecycle).
//! - [`disagg`]: expert disaggregation (placement plan, wire format, the router's
//!   shard client, the expert server).
//! - [`cli`]: the command line and the commands that run it.

pub mod cli;
pub mod disagg;
pub mod error;
pub mod model;
pub mod serve;

pub use error::{Error, Result};
