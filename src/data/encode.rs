//! Records -> token ids with labels: what is trained (completion, assistant turns, EOS) and
//! what is only context (prompt, template, other roles).

use std::collections::BTreeMap;

use crate::data::config::DataConfig;
use crate::data::example::Example;
use crate::data::record::{Conversation, Record};
use crate::data::source::{RowError, SkipReason};
use crate::data::template::{alpaca_plain_prompt, ChatTemplate, Message};
use crate::data::TextTokenizer;
use crate::ops::loss::IGNORE_INDEX;

/// Tokenises records the same way for training, evaluation and preview.
pub struct Encoder<'a> {
    tok: &'a TextTokenizer,
    template: ChatTemplate,
    cfg: &'a DataConfig,
}

fn tok_err(e: crate::Error) -> RowError {
    RowError::new(SkipReason::Template, e.to_string())
}

impl<'a> Encoder<'a> {
    pub fn new(tok: &'a TextTokenizer, template: ChatTemplate, cfg: &'a DataConfig) -> Self {
        Self { tok, template, cfg }
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    pub fn encode(&self, rec: &Record) -> Result<Example, RowError> {
        match rec {
            Record::Text(text) => {
                let ids = self.tok.encode(text).map_err(tok_err)?;
                let labels = ids.iter().map(|&x| x as i64).collect();
                Ok(self.with_eos(Example { input_ids: ids, labels }))
            }
            Record::Completion { prompt, completion } => self.completion(prompt, completion),
            Record::Alpaca { instruction, input, output } => {
                if self.template.is_model_template {
                    let user = if input.is_empty() { instruction.clone() } else { format!("{instruction}\n\n{input}") };
                    self.chat(&Conversation::new(vec![Message::new("user", &user), Message::new("assistant", output)]))
                } else {
                    self.completion(&alpaca_plain_prompt(instruction, input), output)
                }
            }
            Record::Chat(conv) => self.chat(conv),
        }
    }

    /// `tokenizer(prompt + separator + completion)` (BOS as the model adds it), then EOS. The
    /// tokens shared with `tokenizer(prompt + separator)` are the prompt (not trained unless
    /// `train_on_inputs`); tokenising the text once keeps the ids the model will see at inference.
    fn completion(&self, prompt: &str, completion: &str) -> Result<Example, RowError> {
        let prompt = format!("{prompt}{}", self.cfg.separator);
        let input_ids = self.tok.encode(&format!("{prompt}{completion}")).map_err(tok_err)?;
        let p = self.tok.encode(&prompt).map_err(tok_err)?;
        let boundary = input_ids.iter().zip(&p).take_while(|(a, b)| a == b).count();
        let labels = input_ids
            .iter()
            .enumerate()
            .map(|(k, &x)| if k < boundary && !self.cfg.train_on_inputs { IGNORE_INDEX } else { x as i64 })
            .collect();
        Ok(self.with_eos(Example { input_ids, labels }))
    }

    /// Append EOS unless the ids already end with it; it is trained when `train_on_eos`.
    fn with_eos(&self, mut ex: Example) -> Example {
        if let Some(eos) = self.tok.eos_id() {
            if ex.input_ids.last() != Some(&eos) {
                ex.input_ids.push(eos);
                ex.labels.push(eos as i64);
            }
            if let Some(last) = ex.labels.last_mut() {
                *last = if self.cfg.train_on_eos { eos as i64 } else { IGNORE_INDEX };
            }
        }
        ex
    }

    /// The whole conversation rendered once and tokenised as `apply_chat_template(tokenize=True)`;
    /// each assistant turn is trained as the template renders it in that conversation (see
    /// `assistant_spans`), plus the special token that ends it.
    pub fn chat(&self, conv: &Conversation) -> Result<Example, RowError> {
        let mut kwargs = self.cfg.template_kwargs.clone();
        kwargs.extend(conv.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        let template_err = |e: String| RowError::new(SkipReason::Template, format!("chat template: {e}"));
        let messages = &conv.messages;
        let (full, generation) = self.template.render_with_spans(messages, false, &kwargs).map_err(template_err)?;
        let (input_ids, offsets) = self.tok.encode_plain_with_offsets(&full).map_err(tok_err)?;
        if self.cfg.train_on_inputs {
            let labels = input_ids.iter().map(|&x| x as i64).collect();
            return Ok(Example { input_ids, labels });
        }
        let turns = if self.template.has_generation_blocks {
            self.generation_turns(messages, generation)?
        } else {
            self.assistant_spans(messages, &full, &kwargs).map_err(template_err)?
        };
        let mut labels = vec![IGNORE_INDEX; input_ids.len()];
        for turn in turns {
            if let Some(i) = turn.message {
                if !self.cfg.train_on_tool_calls && !messages[i].tool_calls().is_empty() {
                    continue;
                }
            }
            let kept = self.kept_ranges(&full, turn.start, turn.end);
            let mut last = None;
            for (k, &(s, e)) in offsets.iter().enumerate() {
                if kept.iter().any(|&(a, b)| e > a && s < b) {
                    labels[k] = input_ids[k] as i64;
                    last = Some(k);
                }
            }
            if turn.ends_with_eot {
                // The span holds its end-of-turn token: drop it when it is not to be trained.
                if let Some(k) = last.filter(|&k| !self.cfg.train_on_eos && self.tok.is_special(input_ids[k])) {
                    labels[k] = IGNORE_INDEX;
                }
            } else if let Some(k) = last {
                // The end-of-turn token right after the turn (past any whitespace-only tokens, as
                // templates that write "\n<|eot|>" have it) is what teaches the model to stop.
                let mut j = k + 1;
                while j < input_ids.len()
                    && !self.tok.is_special(input_ids[j])
                    && full.get(offsets[j].0..offsets[j].1).is_some_and(|t| t.trim().is_empty())
                {
                    j += 1;
                }
                if self.cfg.train_on_eos && j < input_ids.len() && self.tok.is_special(input_ids[j]) {
                    for l in k + 1..=j {
                        labels[l] = input_ids[l] as i64;
                    }
                }
            }
        }
        Ok(Example { input_ids, labels })
    }

    /// The spans of `{% generation %}` blocks, each one turn: mapped to the assistant messages in
    /// order when there are as many, so `train_on_tool_calls` can tell which turn calls tools.
    fn generation_turns(&self, messages: &[Message], spans: Vec<(usize, usize)>) -> Result<Vec<Turn>, RowError> {
        let assistants: Vec<usize> =
            messages.iter().enumerate().filter(|(_, m)| m.role == "assistant").map(|(i, _)| i).collect();
        let mapped = spans.len() == assistants.len();
        if !mapped && !self.cfg.train_on_tool_calls {
            return Err(RowError::new(
                SkipReason::Template,
                format!("the chat template's {{% generation %}} blocks ({}) are not one per assistant message ({}), so `train_on_tool_calls: false` cannot tell which turns call tools", spans.len(), assistants.len()),
            ));
        }
        Ok(spans
            .into_iter()
            .enumerate()
            .map(|(k, (start, end))| Turn { message: mapped.then(|| assistants[k]), start, end, ends_with_eot: true })
            .collect())
    }

    /// Where each assistant turn lies in `full`, the rendering of the whole conversation, found
    /// without assuming that the template renders earlier turns the same way in a shorter
    /// conversation (Qwen3 drops the reasoning of turns before the last user message; rendering
    /// prefixes and diffing them, as other tools do, breaks on that):
    /// 1. The turn's own text is where `full` differs from the same conversation rendered with
    ///    this one message replaced by a placeholder (common prefix and suffix of the two): all
    ///    that depends on the message (reasoning, answer, tool calls), in its real context.
    /// 2. Its start moves back to the end of the generation prompt (what `add_generation_prompt`
    ///    adds to the messages before it), so text the template writes between the prompt and
    ///    the content, such as Qwen3's `<think>\n`, is trained: the model generates it.
    fn assistant_spans(
        &self,
        messages: &[Message],
        full: &str,
        kwargs: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Vec<Turn>, String> {
        let mut turns = Vec::new();
        let mut floor = 0;
        // One copy of the conversation; each probe swaps one message out and back.
        let mut probe = messages.to_vec();
        for (i, m) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            probe[i] = Message::new("assistant", PLACEHOLDER);
            let other = match self.template.render(&probe, false, kwargs) {
                Ok(text) => text,
                // A template that checks tool messages against the tool calls before them: keep
                // the calls (and their names, which the tool response may repeat), with their
                // arguments and the reasoning or content swapped out, so the calls are found too.
                Err(_) => {
                    probe[i] = with_placeholder_calls(m);
                    match self.template.render(&probe, false, kwargs) {
                        Ok(text) => text,
                        // Only the content and reasoning then.
                        Err(_) => {
                            let mut kept = m.clone().with("content", PLACEHOLDER);
                            kept.fields.remove("reasoning_content");
                            probe[i] = kept;
                            self.template.render(&probe, false, kwargs)?
                        }
                    }
                }
            };
            probe[i] = m.clone();
            let (start, end) = differing_region(full, &other);
            if end <= start {
                // The template renders nothing of this message here (Llama 3's drops tool calls).
                continue;
            }
            if start < floor {
                return Err(format!("message {i}: the template's rendering of this assistant message reaches into the previous turn, so its tokens cannot be masked"));
            }
            // A prefix render that fails (a template that wants a user turn last) only loses the hint.
            let prompt = match (
                self.template.render(&messages[..i], false, kwargs),
                self.template.render(&messages[..i], true, kwargs),
            ) {
                (Ok(without), Ok(with)) => {
                    with.get(common_prefix_len(&without, &with)..).unwrap_or_default().to_string()
                }
                _ => String::new(),
            };
            let start = generation_start(full, floor, start, &prompt);
            turns.push(Turn { message: Some(i), start, end, ends_with_eot: false });
            floor = end;
        }
        Ok(turns)
    }

    /// The parts of the turn `full[start..end]` that are trained: all of it but its think blocks
    /// where they are not (`train_on_reasoning`, `train_on_empty_think`).
    fn kept_ranges(&self, full: &str, start: usize, end: usize) -> Vec<(usize, usize)> {
        let [open, close] = &self.cfg.think_tags;
        if open.is_empty() || close.is_empty() {
            return vec![(start, end)];
        }
        let mut kept = Vec::new();
        let mut from = start;
        let mut search = start;
        // A think block the generation prompt opened (Qwen 3.5's `<|im_start|>assistant\n<think>\n`):
        // the turn starts inside it, so it runs from the turn's start to the first close tag.
        let mut opened_by_prompt = full[..start].trim_end().ends_with(open.as_str());
        loop {
            // Where the block starts in the turn and where its body starts.
            let (a, body) = if std::mem::take(&mut opened_by_prompt) {
                (start, start)
            } else {
                match full.get(search..end).and_then(|t| t.find(open.as_str())) {
                    Some(p) => (search + p, search + p + open.len()),
                    None => break,
                }
            };
            let Some(b) = full.get(body..end).and_then(|t| t.find(close.as_str())).map(|p| body + p) else { break };
            let empty = full[body..b].trim().is_empty();
            let train = if empty { self.cfg.train_on_empty_think } else { self.cfg.train_on_reasoning };
            let block_end = b + close.len();
            if !train {
                // The block and the whitespace that separates it from the answer.
                let after = full[block_end..end].len() - full[block_end..end].trim_start().len();
                kept.push((from, a));
                from = block_end + after;
            }
            search = block_end;
        }
        kept.push((from, end));
        kept.retain(|&(a, b)| b > a);
        kept
    }
}

/// An assistant message with tool calls, its text swapped for [`PLACEHOLDER`] where that keeps
/// it a valid message: each call's arguments, and its reasoning (`thinking`, as gpt-oss's
/// template takes it alongside calls, or `reasoning_content`) or else its content (gpt-oss
/// refuses a call message with both).
fn with_placeholder_calls(m: &Message) -> Message {
    let mut kept = m.clone();
    let reasoning = ["thinking", "reasoning_content"]
        .into_iter()
        .find(|k| kept.fields.get(*k).and_then(serde_json::Value::as_str).is_some_and(|s| !s.is_empty()));
    match reasoning {
        Some(k) => {
            kept.fields.insert(k.into(), PLACEHOLDER.into());
        }
        None if !kept.content().is_empty() => {
            kept.fields.insert("content".into(), PLACEHOLDER.into());
        }
        None => {}
    }
    if let Some(serde_json::Value::Array(calls)) = kept.fields.get_mut("tool_calls") {
        for call in calls.iter_mut() {
            let target = match call.get_mut("function") {
                Some(f) if f.is_object() => f,
                _ => call,
            };
            if let Some(obj) = target.as_object_mut() {
                if obj.contains_key("arguments") {
                    // An array: its first and last characters (`[`, `]`) differ from those of an
                    // object or a string, so the diff covers the whole of the real arguments.
                    obj.insert("arguments".into(), serde_json::json!([PLACEHOLDER]));
                }
            }
        }
    }
    kept
}

/// What replaces an assistant message to find the text that depends on it: one private-use
/// character, which no content starts or ends with and which template logic (`'</think>' in
/// content`, `| trim`, `startswith`) treats as plain text.
const PLACEHOLDER: &str = "\u{F8F2}";

/// One assistant turn in the rendered text.
struct Turn {
    /// Its message (None: a `{% generation %}` block that could not be matched to one).
    message: Option<usize>,
    start: usize,
    end: usize,
    /// The span already holds the end-of-turn token (`{% generation %}` blocks).
    ends_with_eot: bool,
}

/// The byte range of `a` that differs from `b`: `a` without the longest common prefix and the
/// longest common suffix (not overlapping it) of the two, on char boundaries.
fn differing_region(a: &str, b: &str) -> (usize, usize) {
    let prefix = common_prefix_len(a, b);
    let mut suffix = 0;
    for (x, y) in a[prefix..].chars().rev().zip(b[prefix..].chars().rev()) {
        if x != y {
            break;
        }
        suffix += x.len_utf8();
    }
    (prefix, a.len() - suffix)
}

/// The end of the generation prompt `prompt` before the turn whose own text starts at `content`
/// in `full`: the last place after `floor` where the whole prompt ends, or else one of its leading
/// lines (a template may render the turn without the prompt's last lines, as Qwen3 does the empty
/// think block of `enable_thinking: false` in earlier turns). No match: the turn starts at `content`.
fn generation_start(full: &str, floor: usize, content: usize, prompt: &str) -> usize {
    let Some(window) = full.get(floor..content) else { return content };
    let mut cuts: Vec<usize> = prompt.match_indices('\n').map(|(p, _)| p + 1).collect();
    cuts.push(prompt.len());
    cuts.dedup();
    for &k in cuts.iter().rev().filter(|&&k| k > 0) {
        if let Some(p) = window.rfind(&prompt[..k]) {
            return floor + p + k;
        }
    }
    content
}

/// Byte length of the longest common prefix of `a` and `b` (on a char boundary).
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, x), y)| x != y).map_or(a.len().min(b.len()), |((i, _), _)| i)
}
