//! Data files -> raw rows (JSON objects) with the file and line (or row number) each came from.
//! A row that cannot be read is kept as an error, so the caller decides: stop or skip and count.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::data::jsonl::kind;
use crate::{Error, Result};

/// Why a row was not used; the names are the keys of `DataStats::skipped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    NotUtf8,
    InvalidJson,
    MissingField,
    WrongType,
    UnknownRole,
    EmptyField,
    NoTrainedTokens,
    Template,
    ToolCall,
}

impl SkipReason {
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::NotUtf8 => "not_utf8",
            SkipReason::InvalidJson => "invalid_json",
            SkipReason::MissingField => "missing_field",
            SkipReason::WrongType => "wrong_type",
            SkipReason::UnknownRole => "unknown_role",
            SkipReason::EmptyField => "empty_field",
            SkipReason::NoTrainedTokens => "no_trained_tokens",
            SkipReason::Template => "template_error",
            SkipReason::ToolCall => "bad_tool_call",
        }
    }
}

/// A row that cannot be used, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct RowError {
    pub reason: SkipReason,
    pub message: String,
}

impl RowError {
    pub fn new(reason: SkipReason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }

    pub fn missing(field: &str) -> Self {
        Self::new(SkipReason::MissingField, format!("missing field `{field}`"))
    }

    pub fn wrong_type(field: &str, expected: &str, found: &Value) -> Self {
        Self::new(SkipReason::WrongType, format!("`{field}` must be {expected}, found {}", kind(found)))
    }

    /// The library error for this row.
    pub fn at(&self, file: &Path, line: usize) -> Error {
        Error::Data { path: file.to_path_buf(), line, reason: self.message.clone() }
    }
}

/// One row of a data file: 1-based line (`.jsonl`, `.json`) or row number (`.parquet`).
#[derive(Debug, Clone)]
pub struct RawRow {
    pub file: Arc<PathBuf>,
    pub line: usize,
    pub value: std::result::Result<Map<String, Value>, RowError>,
}

/// The data files a path names: the file itself, or the `.jsonl` / `.json` / `.parquet` files of
/// a folder in name order.
pub fn list_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
            let p = entry.map_err(|e| Error::io(path, e))?.path();
            if p.is_file() && is_data_file(&p) {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(Error::Data {
                path: path.to_path_buf(),
                line: 0,
                reason: "folder has no .jsonl, .json or .parquet file".into(),
            });
        }
        return Ok(files);
    }
    if !path.is_file() {
        return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "data file not found")));
    }
    Ok(vec![path.to_path_buf()])
}

pub fn is_data_file(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("jsonl" | "json" | "parquet"))
}

/// Rows of one file (at most `limit`), by extension: `.json` is an array of objects, `.parquet`
/// a table, anything else JSON Lines.
pub fn read_rows(path: &Path, limit: Option<usize>) -> Result<Vec<RawRow>> {
    let file = Arc::new(path.to_path_buf());
    let limit = limit.unwrap_or(usize::MAX);
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => read_json_array(&file, limit),
        Some("parquet") => crate::data::parquet::read_parquet(&file, limit),
        _ => read_jsonl(&file, limit),
    }
}

fn object(v: Value) -> std::result::Result<Map<String, Value>, RowError> {
    match v {
        Value::Object(map) => Ok(map),
        other => Err(RowError::new(SkipReason::WrongType, format!("expected a JSON object, found {}", kind(&other)))),
    }
}

fn read_jsonl(file: &Arc<PathBuf>, limit: usize) -> Result<Vec<RawRow>> {
    let f = std::fs::File::open(file.as_path()).map_err(|e| Error::io(file.as_path(), e))?;
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(f).split(b'\n').enumerate() {
        if rows.len() >= limit {
            break;
        }
        let bytes = line.map_err(|e| Error::io(file.as_path(), e))?;
        let value = match std::str::from_utf8(&bytes) {
            Err(e) => Err(RowError::new(SkipReason::NotUtf8, format!("not valid UTF-8 ({e})"))),
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => serde_json::from_str::<Value>(text)
                .map_err(|e| RowError::new(SkipReason::InvalidJson, format!("not valid JSON: {e}")))
                .and_then(object),
        };
        rows.push(RawRow { file: file.clone(), line: i + 1, value });
    }
    Ok(rows)
}

/// A `.json` file holding one array of objects; each row gets the line its element starts on.
fn read_json_array(file: &Arc<PathBuf>, limit: usize) -> Result<Vec<RawRow>> {
    let bytes = std::fs::read(file.as_path()).map_err(|e| Error::io(file.as_path(), e))?;
    let err = |pos: usize, reason: String| Error::Data { path: file.to_path_buf(), line: line_at(&bytes, pos), reason };
    if let Err(e) = std::str::from_utf8(&bytes) {
        return Err(err(e.valid_up_to(), format!("not valid UTF-8 ({e})")));
    }
    let mut pos = skip_ws(&bytes, 0);
    if bytes.get(pos) != Some(&b'[') {
        return Err(err(
            pos,
            "a .json data file must hold one array of objects (use .jsonl for one object per line)".into(),
        ));
    }
    pos = skip_ws(&bytes, pos + 1);
    let mut rows = Vec::new();
    if bytes.get(pos) == Some(&b']') {
        return Ok(rows);
    }
    loop {
        let mut stream = serde_json::Deserializer::from_slice(&bytes[pos..]).into_iter::<Value>();
        let value = match stream.next() {
            Some(Ok(v)) => v,
            Some(Err(e)) => return Err(err(pos, format!("not valid JSON: {e}"))),
            None => return Err(err(pos, "unterminated array".into())),
        };
        let start = pos;
        pos = skip_ws(&bytes, pos + stream.byte_offset());
        if rows.len() < limit {
            rows.push(RawRow { file: file.clone(), line: line_at(&bytes, start), value: object(value) });
        }
        match bytes.get(pos) {
            Some(b',') => pos = skip_ws(&bytes, pos + 1),
            Some(b']') => return Ok(rows),
            _ => return Err(err(pos, "expected `,` or `]` after an array element".into())),
        }
    }
}

fn skip_ws(bytes: &[u8], mut pos: usize) -> usize {
    while bytes.get(pos).is_some_and(u8::is_ascii_whitespace) {
        pos += 1;
    }
    pos
}

fn line_at(bytes: &[u8], pos: usize) -> usize {
    1 + bytes[..pos.min(bytes.len())].iter().filter(|&&b| b == b'\n').count()
}
