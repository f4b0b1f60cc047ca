//! The recipe's `data:` section.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How rows are read and what is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Detect from the first rows (the detected format is printed and kept in the stats).
    #[default]
    Auto,
    /// `{"text": ...}`: every token trained.
    Text,
    /// `{"prompt": ..., "completion": ...}`: the completion trained.
    Completion,
    /// `{"instruction", "input"?, "output"}`: the output trained.
    Alpaca,
    /// `{"messages": [{"role", "content"}]}` or ShareGPT `{"conversations": [{"from", "value"}]}`:
    /// assistant turns trained.
    Chat,
}

impl DataFormat {
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Auto => "auto",
            DataFormat::Text => "text",
            DataFormat::Completion => "completion",
            DataFormat::Alpaca => "alpaca",
            DataFormat::Chat => "chat",
        }
    }
}

impl std::str::FromStr for DataFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => DataFormat::Auto,
            "text" => DataFormat::Text,
            "completion" => DataFormat::Completion,
            "alpaca" => DataFormat::Alpaca,
            "chat" => DataFormat::Chat,
            other => return Err(format!("unknown format `{other}` (expected auto, text, completion, alpaca or chat)")),
        })
    }
}

/// A chat template given in the recipe: the template text itself, or `{file: path}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TemplateSource {
    Inline(String),
    File {
        /// Template file (relative paths resolve against the recipe's folder).
        file: PathBuf,
    },
}

/// `data:` in a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training data: a `.jsonl`, `.json` (array) or `.parquet` file, a folder of them, or a Hub
    /// dataset `hub:owner/name` (with `split`) or `hub:owner/name/path/in/repo.parquet`.
    /// Relative paths resolve against the recipe's folder.
    pub train: PathBuf,
    /// More training files, read after `train`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub train_files: Vec<PathBuf>,
    /// Evaluation file (same forms as `train`); otherwise `val_split` of the training rows, or none.
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
    /// Several rows per sequence, attention kept inside each row.
    #[serde(default)]
    pub packing: bool,
    /// Without packing: batch rows of similar length together (less padding).
    #[serde(default = "yes")]
    pub group_by_length: bool,
    /// `completion` format: text put between the prompt and the completion (not trained),
    /// e.g. `"\n"` for datasets whose prompts do not end with one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub separator: String,
    /// Train prompt / user / template tokens too.
    #[serde(default)]
    pub train_on_inputs: bool,
    /// Train the EOS / end-of-turn token, so the model learns to stop.
    #[serde(default = "yes")]
    pub train_on_eos: bool,
    /// Chat rows: train the reasoning (`<think>...</think>`) of the trained assistant turns, as
    /// the template renders it; false: only their answers (and tool calls).
    #[serde(default = "yes")]
    pub train_on_reasoning: bool,
    /// Chat rows: train the assistant turns that call tools; false: they are context only.
    #[serde(default = "yes")]
    pub train_on_tool_calls: bool,
    /// Chat rows: train the empty think block (`<think>\n\n</think>\n\n`) a template writes
    /// into turns without reasoning; it carries no content, so by default it is not trained.
    #[serde(default)]
    pub train_on_empty_think: bool,
    /// The tags around reasoning in a rendered assistant turn.
    #[serde(default = "default_think_tags")]
    pub think_tags: [String; 2],
    /// Skip (and count) unusable rows instead of stopping at the first.
    #[serde(default)]
    pub skip_invalid_rows: bool,
    /// Field names of this dataset for the format's fields, e.g. `{prompt: question, completion: answer}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, String>,
    /// Replaces the tokenizer's chat template.
    #[serde(default)]
    pub chat_template: Option<TemplateSource>,
    /// Extra variables for the chat template, e.g. `{enable_thinking: false}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub template_kwargs: BTreeMap<String, serde_json::Value>,
    /// Hub split for `hub:` datasets (`train`, `test`, ...).
    #[serde(default)]
    pub split: Option<String>,
    /// Hub revision (branch, tag or commit) for `hub:` datasets.
    #[serde(default)]
    pub revision: Option<String>,
    /// Read at most this many rows per file (quick experiments, preview).
    #[serde(default)]
    pub max_rows: Option<usize>,
}

impl DataConfig {
    /// A configuration with every default and this training file.
    pub fn new(train: impl Into<PathBuf>) -> Self {
        Self {
            train: train.into(),
            train_files: Vec::new(),
            eval: None,
            val_split: None,
            format: DataFormat::Auto,
            seq_len: default_seq_len(),
            packing: false,
            group_by_length: true,
            separator: String::new(),
            train_on_inputs: false,
            train_on_eos: true,
            train_on_reasoning: true,
            train_on_tool_calls: true,
            train_on_empty_think: false,
            think_tags: default_think_tags(),
            skip_invalid_rows: false,
            columns: BTreeMap::new(),
            chat_template: None,
            template_kwargs: BTreeMap::new(),
            split: None,
            revision: None,
            max_rows: None,
        }
    }

    /// The checks serde cannot make, as (key under `data`, reason).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.seq_len < 2 {
            return Err(("seq_len", format!("must be at least 2, got {}", self.seq_len)));
        }
        if let Some(v) = self.val_split {
            if !(0.0..1.0).contains(&v) {
                return Err(("val_split", format!("must be in [0, 1), got {v}")));
            }
        }
        if let Some(k) = self.think_tags.iter().position(|t| t.trim().is_empty()) {
            return Err((
                "think_tags",
                format!("tag {} is empty: give the opening and closing tags, e.g. [\"<think>\", \"</think>\"]", k + 1),
            ));
        }
        Ok(())
    }

    /// The dataset column that holds the format's field `field`.
    pub fn column<'a>(&'a self, field: &'a str) -> &'a str {
        self.columns.get(field).map_or(field, String::as_str)
    }
}

fn default_think_tags() -> [String; 2] {
    ["<think>".into(), "</think>".into()]
}

fn default_seq_len() -> usize {
    512
}

fn yes() -> bool {
    true
}
