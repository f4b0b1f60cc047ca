//! One integration-test binary (one link step on small CI machines).

mod common;
mod cli;
mod lora_parity;
mod parity;
mod train_e2e;
mod train_parity;
