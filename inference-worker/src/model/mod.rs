//! Checkpoints and the decoder: what a model is and how it is loaded.

pub mod config;
pub mod decoder;
pub mod fixture;
pub mod hub;
pub mod layers;
pub mod loader;
pub mod moe;
pub mod weights;
