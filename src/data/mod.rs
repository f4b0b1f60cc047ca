//! Data: rows from JSON Lines / JSON / Parquet files or the Hub, formats (text, completion,
//! alpaca, chat), chat templates, tokenisation with label masks, packing and batching.

pub mod batching;
pub mod config;
pub mod encode;
pub mod example;
pub mod jsonl;
pub mod parquet;
pub mod pipeline;
pub mod recipe;
pub mod record;
pub mod source;
pub mod template;
pub mod tokenizer;

pub use batching::batches;
pub use config::{DataConfig, DataFormat, TemplateSource};
pub use example::{Batch, Example};
pub use pipeline::{prepare, DataStats, Prepared};
pub use record::Conversation;
pub use template::{ChatTemplate, Message};
pub use tokenizer::TextTokenizer;
