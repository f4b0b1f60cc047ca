//! JSON rows -> typed records of one format, through the recipe's column mapping; and the
//! detection of the format from the first rows.

use serde_json::{Map, Value};

use crate::data::config::{DataConfig, DataFormat};
use crate::data::source::{RawRow, RowError, SkipReason};
use crate::data::template::Message;

/// A chat row: its messages, and the row's own template variables (`tools`, `documents`, and
/// the keys of its `chat_template_kwargs` object), which the recipe's `template_kwargs` sit under.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    pub messages: Vec<Message>,
    pub vars: std::collections::BTreeMap<String, Value>,
}

impl Conversation {
    pub fn new(messages: Vec<Message>) -> Self {
        Self { messages, vars: Default::default() }
    }
}

/// One usable row.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Text(String),
    Completion { prompt: String, completion: String },
    Alpaca { instruction: String, input: String, output: String },
    Chat(Conversation),
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
        DataFormat::Chat => conversation(obj, cfg).map(Record::Chat),
    }
}

/// A required string field; `non_empty`: whitespace alone is refused too.
fn string(obj: &Map<String, Value>, cfg: &DataConfig, field: &str, non_empty: bool) -> Result<String, RowError> {
    let col = cfg.column(field);
    match obj.get(col) {
        Some(Value::String(s)) if non_empty && s.trim().is_empty() => {
            Err(RowError::new(SkipReason::EmptyField, format!("`{col}` is empty")))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(RowError::wrong_type(col, "a string", other)),
        None => Err(RowError::missing(col)),
    }
}

/// Row fields that are template variables, passed to the chat template under the same name.
const ROW_TEMPLATE_VARS: [&str; 2] = ["tools", "documents"];

/// `messages` (`role`/`content`) or ShareGPT `conversations` (`from`/`value`), with the row's
/// `tools`, `documents` and `chat_template_kwargs`.
fn conversation(obj: &Map<String, Value>, cfg: &DataConfig) -> Result<Conversation, RowError> {
    let messages = chat(obj, cfg)?;
    let mut vars = std::collections::BTreeMap::new();
    for name in ROW_TEMPLATE_VARS {
        let col = cfg.column(name);
        let value = match obj.get(col) {
            None | Some(Value::Null) => continue,
            // Many tool datasets store the list as a JSON string.
            Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
                RowError::new(SkipReason::WrongType, format!("`{col}` is a string that is not JSON: {e}"))
            })?,
            Some(v) => v.clone(),
        };
        if !value.is_array() {
            return Err(RowError::wrong_type(col, "a list", &value));
        }
        vars.insert(name.to_string(), value);
    }
    let col = cfg.column("chat_template_kwargs");
    match obj.get(col) {
        None | Some(Value::Null) => {}
        Some(Value::Object(kw)) => vars.extend(kw.iter().map(|(k, v)| (k.clone(), v.clone()))),
        Some(other) => return Err(RowError::wrong_type(col, "an object", other)),
    }
    Ok(Conversation { messages, vars })
}

/// The messages of a chat row: roles normalised, every other field kept as the row has it.
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
    let mut out: Vec<Message> = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(RowError::wrong_type(&format!("{col}[{i}]"), "an object", m));
        };
        let at = |key: &str| format!("{col}[{i}].{key}");
        let raw_role = match m.get(role_key) {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(RowError::wrong_type(&at(role_key), "a string", other)),
            None => return Err(RowError::missing(&at(role_key))),
        };
        let role = match (raw_role, sharegpt) {
            ("system", _) | ("tool", _) => raw_role,
            ("user", false) | ("human", true) => "user",
            ("assistant", false) | ("gpt", true) => "assistant",
            _ => {
                let expected = if sharegpt { "human, gpt, system or tool" } else { "system, user, assistant or tool" };
                return Err(RowError::new(
                    SkipReason::UnknownRole,
                    format!("{}: unknown role `{raw_role}` (expected {expected})", at(role_key)),
                ));
            }
        };
        // Every field templates may read, under the names they read them by.
        let mut msg = Message { role: role.to_string(), fields: Map::new() };
        for (k, v) in m {
            if k == role_key {
                continue;
            }
            let name = if k == content_key { "content" } else { k.as_str() };
            msg.fields.insert(name.to_string(), v.clone());
        }
        let tool_calls = match m.get("tool_calls") {
            None | Some(Value::Null) => 0,
            Some(Value::Array(calls)) if role == "assistant" => {
                if let Some((k, bad)) = calls.iter().enumerate().find(|(_, c)| !c.is_object()) {
                    return Err(RowError::new(
                        SkipReason::ToolCall,
                        format!(
                            "{}[{k}]: a tool call must be an object, found {}",
                            at("tool_calls"),
                            crate::data::jsonl::kind(bad)
                        ),
                    ));
                }
                calls.len()
            }
            Some(Value::Array(_)) => {
                return Err(RowError::new(
                    SkipReason::ToolCall,
                    format!("{}: only assistant messages make tool calls, this one is `{role}`", at("tool_calls")),
                ))
            }
            Some(other) => {
                return Err(RowError::new(
                    SkipReason::ToolCall,
                    format!(
                        "{}: must be a list of tool calls, found {}",
                        at("tool_calls"),
                        crate::data::jsonl::kind(other)
                    ),
                ))
            }
        };
        let reasoning = match m.get("reasoning_content") {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(RowError::wrong_type(&at("reasoning_content"), "a string", other)),
        };
        let content = match (m.get(content_key), role) {
            (Some(Value::String(s)), _) => s.as_str(),
            // An assistant turn that only calls tools may have no content (OpenAI's format).
            (None | Some(Value::Null), "assistant") if tool_calls > 0 => "",
            // A tool's result may be JSON (the Llama 3.1 template prints it with tojson).
            (Some(Value::Object(_) | Value::Array(_)), "tool") => "{}",
            (Some(other), _) => return Err(RowError::wrong_type(&at(content_key), "a string", other)),
            (None, _) => return Err(RowError::missing(&at(content_key))),
        };
        if role == "assistant" && content.trim().is_empty() && reasoning.trim().is_empty() && tool_calls == 0 {
            return Err(RowError::new(SkipReason::EmptyField, format!("{col}[{i}]: empty assistant turn")));
        }
        if role == "tool" {
            let call = out.iter().rev().find(|p| p.role != "tool");
            if !call.is_some_and(|p| p.role == "assistant" && !p.tool_calls().is_empty()) {
                return Err(RowError::new(
                    SkipReason::ToolCall,
                    format!("{col}[{i}]: a `tool` message must follow an assistant message with `tool_calls`"),
                ));
            }
        }
        out.push(msg);
    }
    Ok(out)
}
