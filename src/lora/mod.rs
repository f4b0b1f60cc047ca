//! LoRA: low-rank deltas on frozen projections, with PEFT's names and math.

pub mod linear;

pub use linear::{LoraDelta, LoraLinear};
