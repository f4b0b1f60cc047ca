//! Training and evaluation: the loss, AdamW and schedules, one optimizer step (with optional
//! block-level gradient checkpointing), checkpoints, metrics and the loop.

pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod metrics;
pub mod optim;
pub mod step;
pub mod trainer;

pub use config::{Precision, TrainConfig};
pub use trainer::{evaluate, optimizer_step, train, LossScaler, Optimizer, RunConfig, StepOptions, StepStats, Summary};
