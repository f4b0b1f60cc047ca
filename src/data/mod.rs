//! Data: tokenisation (and, as the data pipeline grows, records, templates, masking, packing).

pub mod tokenizer;

pub use tokenizer::TextTokenizer;
