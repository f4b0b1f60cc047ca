//! Data: JSON Lines records, tokenisation, examples with label masks, batching.

pub mod config;
pub mod example;
pub mod jsonl;
pub mod pipeline;
pub mod tokenizer;

pub use config::{DataConfig, DataFormat};
pub use example::{Batch, Example};
pub use pipeline::{batches, prepare, DataStats, Prepared};
pub use tokenizer::TextTokenizer;
