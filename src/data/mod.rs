//! Data: JSON Lines records and tokenisation.

pub mod jsonl;
pub mod tokenizer;

pub use tokenizer::TextTokenizer;
