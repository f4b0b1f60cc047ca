//! LoRA: low-rank deltas on frozen projections, with PEFT's names and math.

pub mod config;
pub mod inject;
pub mod linear;
pub mod transfer;

pub use config::{LoraConfig, LoraInit, TargetModules};
pub use inject::{inject, is_target, layer_projections_mut, module_names, projection_names, projections_mut};
pub use linear::{LoraDelta, LoraLinear};
pub use transfer::{apply_adapter, apply_to, extract_adapter};
