//! One integration-test binary (one link step on small CI machines).

mod cli;
mod common;
mod data_agent;
mod data_bad_rows;
mod data_chat;
mod data_formats;
mod data_packing;
mod data_preview;
mod deepseek;
mod delta_net_op;
mod export_gguf;
mod export_serving;
mod fp8;
mod hub;
mod llama4;
mod lora_parity;
mod merge;
mod ministral3;
mod moe;
mod ops;
mod parity;
mod quant;
mod qwen35;
mod qwen35_export;
mod train_e2e;
mod train_parity;
#[cfg(feature = "wgpu")]
mod wgpu;
