//! Serving one model over an OpenAI-compatible HTTP API (and the HTTP lifecycle
//! every role shares).

pub mod api;
pub mod auth;
pub mod conn;
pub mod engine;
pub mod escalation;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod prefix_cache;
pub mod reload;
pub mod response;
pub mod sampling;
pub mod stop;
pub mod text;
pub mod tls;
