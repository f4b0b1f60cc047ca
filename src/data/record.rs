//! JSON rows -> typed records of one format, through the recipe's column mapping; and the
//! detection of the format from the first rows.

use serde_json::{Map, Value};

use crate::data::config::{DataConfig, DataFormat};
use crate::data::source::{RawRow, RowError, SkipReason};
use crate::data::template::Message;

/// One usable row.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Text(String),
    Completion { prompt: String, completion: String },
    Alpaca { instruction: String, input: String, output: String },
    Chat(Vec<Message>),
}

/// How many rows `detect` looks at.
const DETECT_ROWS: usize = 16;

/// The format of the first readable rows, and the field that decided it.
pub fn detect(rows: &[RawRow], cfg: &DataConfig) -> Option<(DataFormat, String)> {
    let has = |obj: &Map<String, Value>, field: &str| obj.contains_key(cfg.column(field));
    for row in rows.iter().take(DETECT_ROWS) {
        let Ok(obj) = &row.value else { continue };
        let found = if has(obj, "messages") {
            Some((DataFormat::Chat, cfg.column("messages")))
        } else if has(obj, "conversations") {
            Some((DataFormat::Chat, cfg.column("conversations")))
        } else if has(obj, "instruction") && has(obj, "output") {
            Some((DataFormat::Alpaca, cfg.column("instruction")))
        } else if has(obj, "prompt") && has(obj, "completion") {
            Some((DataFormat::Completion, cfg.column("prompt")))
        } else if has(obj, "text") {
            Some((DataFormat::Text, cfg.column("text")))
        } else {
            None
        };
        if let Some((format, field)) = found {
            return Some((format, format!("`{field}` in {}:{}", row.file.display(), row.line)));
        }
    }
    None
}

/// The row as a record of `format` (not `Auto`).
pub fn parse(obj: &Map<String, Value>, format: DataFormat, cfg: &DataConfig) -> Result<Record, RowError> {
    match format {
        DataFormat::Text | DataFormat::Auto => Ok(Record::Text(string(obj, cfg, "text", true)?)),
        DataFormat::Completion => Ok(Record::Completion {
            prompt: string(obj, cfg, "prompt", false)?,
            completion: string(obj, cfg, "completion", true)?,
        }),
        DataFormat::Alpaca => Ok(Record::Alpaca {
            instruction: string(obj, cfg, "instruction", true)?,
            input: match obj.get(cfg.column("input")) {
                None | Some(Value::Null) => String::new(),
                Some(_) => string(obj, cfg, "input", false)?,
            },
            output: string(obj, cfg, "output", true)?,
        }),
        DataFormat::Chat => chat(obj, cfg).map(Record::Chat),
    }
}

/// A required string field; `non_empty`: whitespace alone is refused too.
fn string(obj: &Map<String, Value>, cfg: &DataConfig, field: &str, non_empty: bool) -> Result<String, RowError> {
    let col = cfg.column(field);
    match obj.get(col) {
        Some(Value::String(s)) if non_empty && s.trim().is_empty() => Err(RowError::new(SkipReason::EmptyField, format!("`{col}` is empty"))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(RowError::wrong_type(col, "a string", other)),
        None => Err(RowError::missing(col)),
    }
}

/// `messages` (`role`/`content`) or ShareGPT `conversations` (`from`/`value`).
fn chat(obj: &Map<String, Value>, cfg: &DataConfig) -> Result<Vec<Message>, RowError> {
    let (col, role_key, content_key, sharegpt) = if obj.contains_key(cfg.column("messages")) {
        (cfg.column("messages"), cfg.column("role"), cfg.column("content"), false)
    } else if obj.contains_key(cfg.column("conversations")) {
        (cfg.column("conversations"), cfg.column("from"), cfg.column("value"), true)
    } else {
        return Err(RowError::missing(&format!("{}` (or `{}", cfg.column("messages"), cfg.column("conversations"))));
    };
    let list = match obj.get(col) {
        Some(Value::Array(list)) => list,
        Some(other) => return Err(RowError::wrong_type(col, "an array of messages", other)),
        None => return Err(RowError::missing(col)),
    };
    if list.is_empty() {
        return Err(RowError::new(SkipReason::EmptyField, format!("`{col}` is empty")));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(RowError::wrong_type(&format!("{col}[{i}]"), "an object", m));
        };
        let field = |key: &str| -> Result<&str, RowError> {
            match m.get(key) {
                Some(Value::String(s)) => Ok(s),
                Some(other) => Err(RowError::wrong_type(&format!("{col}[{i}].{key}"), "a string", other)),
                None => Err(RowError::missing(&format!("{col}[{i}].{key}"))),
            }
        };
        let raw_role = field(role_key)?;
        let role = match (raw_role, sharegpt) {
            ("system", _) => "system",
            ("user", false) | ("human", true) => "user",
            ("assistant", false) | ("gpt", true) => "assistant",
            _ => {
                let expected = if sharegpt { "human, gpt or system" } else { "system, user or assistant" };
                return Err(RowError::new(
                    SkipReason::UnknownRole,
                    format!("{col}[{i}].{role_key}: unknown role `{raw_role}` (expected {expected})"),
                ));
            }
        };
        let content = field(content_key)?;
        if role == "assistant" && content.trim().is_empty() {
            return Err(RowError::new(SkipReason::EmptyField, format!("{col}[{i}]: empty assistant turn")));
        }
        out.push(Message::new(role, content));
    }
    Ok(out)
}
