//! Reading JSON Lines files with errors that name the file and line.

use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// Every non-blank line of a `.jsonl` file as a JSON object, with its 1-based line number.
pub fn read_objects(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line_no = i + 1;
        let bytes = line.map_err(|e| Error::io(path, e))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: line_no,
            reason: format!("not valid UTF-8 ({e})"),
        })?;
        if text.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => rows.push((line_no, map)),
            Ok(other) => {
                return Err(Error::Data {
                    path: path.to_path_buf(),
                    line: line_no,
                    reason: format!("expected a JSON object, found {}", kind(&other)),
                })
            }
            Err(e) => {
                return Err(Error::Data {
                    path: path.to_path_buf(),
                    line: line_no,
                    reason: format!("not valid JSON: {e}"),
                })
            }
        }
    }
    Ok(rows)
}

/// The `text` field of every row of a `{"text": ...}` file.
pub fn read_text_rows(path: &Path) -> Result<Vec<(usize, String)>> {
    read_objects(path)?
        .into_iter()
        .map(|(line, obj)| match obj.get("text") {
            Some(Value::String(s)) => Ok((line, s.clone())),
            Some(other) => Err(Error::Data {
                path: path.to_path_buf(),
                line,
                reason: format!("`text` must be a string, found {}", kind(other)),
            }),
            None => Err(Error::Data { path: path.to_path_buf(), line, reason: "missing field `text`".into() }),
        })
        .collect()
}

/// A short name for a JSON value's type, for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
