//! Temper: LoRA fine-tuning of open-weight language models on Burn.
//!
//! - [`model`]: Hugging Face `config.json` + safetensors -> one parameterised decoder
//!   (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Phi-3), generation with a KV cache.
//! - [`lora`]: LoRA deltas on frozen projections, with PEFT's names and math.
//! - [`data`]: rows (JSONL / JSON / Parquet / Hub), formats, chat templates, label masks,
//!   packing and batching.
//! - [`hub`]: models and datasets from the Hugging Face Hub (cache, offline use).
//! - [`ops`]: custom operations with their own backward pass (blockwise attention, chunked
//!   cross-entropy) and [`ops::TemperBackend`], the backend trait that carries them.
//! - [`train`]: the causal-LM loss and evaluation.

pub mod data;
pub mod error;
pub mod export;
pub mod hub;
pub mod lora;
pub mod model;
pub mod ops;
pub mod quant;
pub mod recipe;
pub mod train;

pub use error::{Error, Result};
