//! Chat templates: `tokenizer_config.json`'s Jinja `chat_template` rendered with minijinja the
//! way transformers' `apply_chat_template` renders it (trim_blocks, lstrip_blocks, `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, Python string methods).

use std::collections::BTreeMap;

use minijinja::{Environment, ErrorKind, Value as JValue};
use serde::Serialize;

use crate::data::TextTokenizer;

/// Used when the model has no chat template and the recipe gives none. Each assistant turn
/// ends with the EOS token, so the model learns to stop.
pub const PLAIN_CHAT_TEMPLATE: &str = "{% if bos_token %}{{ bos_token }}{% endif %}\
{% for m in messages %}\
{% if m.role == 'system' %}{{ m.content }}\n\n\
{% elif m.role == 'user' %}### User:\n{{ m.content }}\n\n\
{% else %}### Assistant:\n{{ m.content }}{{ eos_token }}\n\n{% endif %}\
{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}";

/// The prompt of the plain Alpaca template (used when the model has no chat template); the
/// output follows it and is the trained part.
pub fn alpaca_plain_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// One chat message as templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template with the tokenizer's special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The model's own template (false: the plain fallback).
    pub is_model_template: bool,
}

impl ChatTemplate {
    /// `source` (the recipe's override or the tokenizer's template); the plain template if none.
    pub fn new(source: Option<&str>, tokenizer: &TextTokenizer) -> Result<Self, String> {
        let is_model_template = source.is_some();
        let source = source.unwrap_or(PLAIN_CHAT_TEMPLATE).to_string();
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(|e| e.to_string())?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<JValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("template raised: {msg}")))
        });
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source).map_err(|e| describe(&e))?;
        Ok(Self {
            env,
            bos_token: tokenizer.bos_token.clone().unwrap_or_default(),
            eos_token: tokenizer.eos_token.clone().unwrap_or_default(),
            is_model_template,
        })
    }

    /// `apply_chat_template(messages, add_generation_prompt, tokenize=False, **kwargs)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool, kwargs: &BTreeMap<String, serde_json::Value>) -> Result<String, String> {
        let tmpl = self.env.get_template("chat").map_err(|e| describe(&e))?;
        let mut ctx: BTreeMap<String, JValue> = kwargs.iter().map(|(k, v)| (k.clone(), JValue::from(minijinja::value::Serde(v)))).collect();
        ctx.insert("messages".into(), JValue::from(minijinja::value::Serde(messages)));
        ctx.insert("add_generation_prompt".into(), JValue::from(add_generation_prompt));
        ctx.insert("bos_token".into(), JValue::from(self.bos_token.clone()));
        ctx.insert("eos_token".into(), JValue::from(self.eos_token.clone()));
        tmpl.render(ctx).map_err(|e| describe(&e))
    }
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=indent)`, so `", "`
/// and `": "` separators (not minijinja's HTML-safe compact form).
fn tojson(v: JValue, kwargs: minijinja::value::Kwargs) -> Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&v).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    py_json(&json, indent, 0, &mut out);
    Ok(out)
}

fn py_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, x)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&J::String(k.clone()).to_string());
                out.push_str(": ");
                py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A minijinja error with its cause chain on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}
