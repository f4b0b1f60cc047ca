//! The recipe's `data:` section.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How rows are read and what is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Detect from the first rows.
    #[default]
    Auto,
    /// `{"text": ...}`: every token trained.
    Text,
}

/// `data:` in a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training file (relative paths resolve against the recipe's folder).
    pub train: PathBuf,
    /// Evaluation file; otherwise `val_split` of the training rows, or none.
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// Share of training rows held out for evaluation when `eval` is not given.
    #[serde(default)]
    pub val_split: Option<f64>,
    #[serde(default)]
    pub format: DataFormat,
    /// Longest sequence in tokens; longer rows are truncated (and counted).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
}

fn default_seq_len() -> usize {
    512
}
