//! One integration-test binary (one link step on small CI machines).

mod common;
mod cli;
mod lora_parity;
mod export_gguf;
mod export_serving;
mod merge;
mod parity;
