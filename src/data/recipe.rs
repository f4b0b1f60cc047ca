//! The `data:` section of a YAML recipe, read on its own (for `temper preview --recipe`); the
//! rest of the recipe is ignored here.

use std::path::Path;

use serde::Deserialize;
use serde_norway::Value;

use crate::data::DataConfig;
use crate::{Error, Result};

/// `data:` of the recipe at `path`. Errors name the key path (`data.seq_len`) and the line.
pub fn load_data_config(path: &Path) -> Result<DataConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    data_config_from_str(&text, path)
}

/// `data:` of recipe text (`path` only names the file in errors).
pub fn data_config_from_str(text: &str, path: &Path) -> Result<DataConfig> {
    let err =
        |key: &str, reason: String| Error::Recipe { path: path.to_path_buf(), line: None, key: key.into(), reason };
    let root: Value = serde_norway::from_str(text).map_err(|e| err("", located(&e)))?;
    let Value::Mapping(map) = &root else {
        return Err(err("", "a recipe is a YAML mapping of sections".into()));
    };
    match map.get("data") {
        None => return Err(err("data", "missing (the recipe needs a `data:` section)".into())),
        Some(Value::Mapping(_)) => {}
        Some(_) => return Err(err("data", "must be a mapping (train:, format:, ...)".into())),
    }
    // Deserialise from the text (not the Value) so errors keep their line numbers.
    #[derive(Deserialize)]
    struct Only {
        data: DataConfig,
    }
    let only: Only = serde_norway::from_str(text).map_err(|e| {
        let msg = located(&e);
        // serde_norway prefixes the path of the failing key: `data.seq_len: invalid type ...`.
        let key = msg.split(':').next().filter(|k| k.starts_with("data")).unwrap_or("data").to_string();
        err(&key, msg)
    })?;
    only.data.validate().map_err(|(k, r)| err(&format!("data.{k}"), r))?;
    Ok(only.data)
}

fn located(e: &serde_norway::Error) -> String {
    match e.location() {
        Some(loc) => format!("{e} (line {}, column {})", loc.line(), loc.column()),
        None => e.to_string(),
    }
}
