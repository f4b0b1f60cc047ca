//! The library's one error type. Every variant names the file, key or tensor at fault and what
//! was expected, so a user can fix the input without reading the source.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A config key has a value this project does not support (or does not support yet).
    #[error("{path}: unsupported `{key}` = {value}: {reason}")]
    Unsupported { path: PathBuf, key: String, value: String, reason: String },

    /// A config key is missing or has an impossible value.
    #[error("{path}: invalid `{key}`: {reason}")]
    InvalidConfig { path: PathBuf, key: String, reason: String },

    #[error("{path}: missing tensor `{tensor}`{hint}")]
    MissingTensor { path: PathBuf, tensor: String, hint: String },

    #[error("{path}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    TensorShape { path: PathBuf, tensor: String, expected: Vec<usize>, actual: Vec<usize> },

    #[error("{path}: tensor `{tensor}` has dtype {dtype}, expected F32, F16 or BF16")]
    TensorDtype { path: PathBuf, tensor: String, dtype: String },

    #[error("{path}: not a valid safetensors file ({reason})")]
    Safetensors { path: PathBuf, reason: String },

    #[error("{path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    /// A data file row that cannot be used.
    #[error("{path}:{line}: {reason}")]
    Data { path: PathBuf, line: usize, reason: String },

    /// A recipe key with a bad value (the key path is dotted, e.g. `train.learning_rate`).
    #[error("{path}{}: recipe key `{key}`: {reason}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Recipe { path: PathBuf, line: Option<usize>, key: String, reason: String },

    /// A Hugging Face Hub download or cache lookup failed (the repository and file are named).
    #[error("hub {repo}: {file}: {reason}")]
    Hub { repo: String, file: String, reason: String },

    /// A caller passed an argument outside what the operation accepts.
    #[error("{0}")]
    InvalidArgument(String),

    /// Numbers stopped being numbers (NaN or infinity in a loss, gradient or weight).
    #[error("non-finite value: {0}")]
    NonFinite(String),
}

impl Error {
    /// Wrap an `std::io::Error` with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
