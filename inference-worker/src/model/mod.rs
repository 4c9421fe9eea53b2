//! Checkpoints and the decoder: what a model is and how it is loaded.

pub mod config;
pub mod decoder;
pub mod device;
pub mod fixture;
pub mod gguf;
pub mod gguf_fixture;
pub mod gguf_vocab;
pub mod hub;
pub mod layers;
pub mod loader;
pub(crate) mod matmul;
pub mod mla;
pub mod moe;
pub mod q41;
pub mod source;
pub mod threads;
pub mod weights;
