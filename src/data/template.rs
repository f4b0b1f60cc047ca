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

/// One chat message as templates see it: its role and every other field of the row's message
/// object (`content`, `reasoning_content`, `tool_calls`, `tool_call_id`, `name`, ...), in the
/// row's order, so `message.reasoning_content is defined` and `'tool_calls' in message` answer as
/// they do in `apply_chat_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    /// Every field but `role`.
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        let mut fields = serde_json::Map::new();
        fields.insert("content".into(), content.into());
        Self { role: role.into(), fields }
    }

    /// The message with one more field (or `key` replaced).
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.fields.insert(key.into(), value.into());
        self
    }

    /// `content` when it is a string; empty otherwise (absent, null, a tool's JSON result).
    pub fn content(&self) -> &str {
        self.fields.get("content").and_then(serde_json::Value::as_str).unwrap_or("")
    }

    /// The tool calls of an assistant message (empty when it has none).
    pub fn tool_calls(&self) -> &[serde_json::Value] {
        match self.fields.get("tool_calls") {
            Some(serde_json::Value::Array(calls)) => calls,
            _ => &[],
        }
    }
}

impl Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.fields.len() + 1))?;
        map.serialize_entry("role", &self.role)?;
        for (k, v) in &self.fields {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A compiled chat template with the tokenizer's special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The model's own template (false: the plain fallback).
    pub is_model_template: bool,
    /// The template marks assistant output with `{% generation %}` blocks.
    pub has_generation_blocks: bool,
}

/// What `{% generation %}` ... `{% endgeneration %}` becomes: a filter block whose output is
/// wrapped in these two private-use characters, removed again after rendering (transformers
/// implements the tag as a Jinja2 extension that records the spans; minijinja has no custom tags).
const GENERATION_OPEN: char = '\u{F8F0}';
const GENERATION_CLOSE: char = '\u{F8F1}';
const GENERATION_FILTER: &str = "__temper_generation";

/// Byte spans of the `{% generation %}` output in a rendered text.
pub type Spans = Vec<(usize, usize)>;

impl ChatTemplate {
    /// `source` (the recipe's override or the tokenizer's template); the plain template if none.
    pub fn new(source: Option<&str>, tokenizer: &TextTokenizer) -> Result<Self, String> {
        let is_model_template = source.is_some();
        let (source, has_generation_blocks) = generation_blocks_as_filters(source.unwrap_or(PLAIN_CHAT_TEMPLATE));
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(|e| e.to_string())?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<JValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("template raised: {msg}")))
        });
        env.add_function("strftime_now", |fmt: String| -> String { strftime(&fmt, std::time::SystemTime::now()) });
        env.add_filter("tojson", tojson);
        env.add_filter("string", py_string);
        env.add_filter(GENERATION_FILTER, |body: String| format!("{GENERATION_OPEN}{body}{GENERATION_CLOSE}"));
        env.add_template_owned("chat", source).map_err(|e| describe(&e))?;
        Ok(Self {
            env,
            bos_token: tokenizer.bos_token.clone().unwrap_or_default(),
            eos_token: tokenizer.eos_token.clone().unwrap_or_default(),
            is_model_template,
            has_generation_blocks,
        })
    }

    /// `apply_chat_template(messages, add_generation_prompt, tokenize=False, **kwargs)`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        kwargs: &BTreeMap<String, serde_json::Value>,
    ) -> Result<String, String> {
        self.render_with_spans(messages, add_generation_prompt, kwargs).map(|(text, _)| text)
    }

    /// The rendered text and the byte spans of its `{% generation %}` blocks (none without them).
    pub fn render_with_spans(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        kwargs: &BTreeMap<String, serde_json::Value>,
    ) -> Result<(String, Spans), String> {
        let tmpl = self.env.get_template("chat").map_err(|e| describe(&e))?;
        let mut ctx: BTreeMap<String, JValue> =
            kwargs.iter().map(|(k, v)| (k.clone(), JValue::from(minijinja::value::Serde(v)))).collect();
        ctx.insert("messages".into(), JValue::from(minijinja::value::Serde(messages)));
        ctx.insert("add_generation_prompt".into(), JValue::from(add_generation_prompt));
        ctx.insert("bos_token".into(), JValue::from(self.bos_token.clone()));
        ctx.insert("eos_token".into(), JValue::from(self.eos_token.clone()));
        let raw = tmpl.render(ctx).map_err(|e| describe(&e))?;
        if !self.has_generation_blocks {
            return Ok((raw, Vec::new()));
        }
        let mut text = String::with_capacity(raw.len());
        let mut spans = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        for c in raw.chars() {
            match c {
                GENERATION_OPEN => open.push(text.len()),
                GENERATION_CLOSE => {
                    let start = open.pop().ok_or("unbalanced {% generation %} block")?;
                    // Nested blocks count once, as the outermost span.
                    if open.is_empty() && text.len() > start {
                        spans.push((start, text.len()));
                    }
                }
                c => text.push(c),
            }
        }
        Ok((text, spans))
    }
}

/// The template with `{% generation %}` / `{% endgeneration %}` (whitespace control kept)
/// rewritten as `{% filter __temper_generation %}` / `{% endfilter %}`, and whether it had any.
fn generation_blocks_as_filters(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(p) = rest.find("{%") {
        out.push_str(&rest[..p]);
        let tag = &rest[p..];
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            rest = "";
            break;
        };
        let inner = &tag[2..close];
        let (lead, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (c.to_string(), &inner[1..]),
            _ => (String::new(), inner),
        };
        let (body, trail) = match body.chars().last() {
            Some(c @ ('-' | '+')) => (&body[..body.len() - 1], c.to_string()),
            _ => (body, String::new()),
        };
        match body.trim() {
            "generation" => {
                found = true;
                out.push_str(&format!("{{%{lead} filter {GENERATION_FILTER} {trail}%}}"));
            }
            "endgeneration" => out.push_str(&format!("{{%{lead} endfilter {trail}%}}")),
            _ => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// Python's `datetime.now().strftime(fmt)` for the directives chat templates use (dates in their
/// system prompts); the time is UTC. Unknown directives are kept as written.
fn strftime(fmt: &str, now: std::time::SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, tod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let (h, m, s) = (tod / 3600, tod / 60 % 60, tod % 60);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", if h % 12 == 0 { 12 } else { h % 12 })),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Jinja2's `string` filter, Python's `str()`: `True` / `False` / `None` for booleans and none
/// (minijinja writes `true` / `none`), as Qwen 3.5's template prints tool-call arguments with
/// `args_value | string`. Strings pass through unchanged (safe ones stay safe).
fn py_string(v: JValue) -> JValue {
    use minijinja::value::ValueKind;
    match v.kind() {
        ValueKind::String => v,
        ValueKind::Bool => JValue::from(if v.is_true() { "True" } else { "False" }),
        ValueKind::None => JValue::from("None"),
        _ => JValue::from(v.to_string()),
    }
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=indent)`, so `", "`
/// and `": "` separators (not minijinja's HTML-safe compact form).
fn tojson(v: JValue, kwargs: minijinja::value::Kwargs) -> Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json =
        serde_json::to_value(&v).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_dates_as_python_does() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208 of a leap year.
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_722_085_509 - 86_400);
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(strftime("%A %B %e, %y %H:%M:%S %I%p %j %%", t), "Friday July 26, 24 13:05:09 01PM 208 %");
        assert_eq!(
            strftime("%d-%m-%Y %a", std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400)),
            "29-02-2000 Tue"
        );
    }

    #[test]
    fn generation_tags_become_filter_blocks_with_their_whitespace_control() {
        let (s, found) = generation_blocks_as_filters("a{%- generation %}b{% endgeneration -%}c{% if x %}{% endif %}");
        assert!(found);
        assert_eq!(s, "a{%- filter __temper_generation %}b{% endfilter -%}c{% if x %}{% endif %}");
        assert!(!generation_blocks_as_filters("{% if generation %}{% endif %}").1);
    }
}
