//! Records -> token ids with labels: what is trained (completion, assistant turns, EOS) and
//! what is only context (prompt, template, other roles).

use crate::data::config::DataConfig;
use crate::data::example::Example;
use crate::data::record::Record;
use crate::data::source::{RowError, SkipReason};
use crate::data::template::{alpaca_plain_prompt, ChatTemplate, Message};
use crate::data::TextTokenizer;
use crate::train::loss::IGNORE_INDEX;

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
                    self.chat(&[Message::new("user", &user), Message::new("assistant", output)])
                } else {
                    self.completion(&alpaca_plain_prompt(instruction, input), output)
                }
            }
            Record::Chat(messages) => self.chat(messages),
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
    /// each assistant message's content (found after the prefix rendered up to it with a
    /// generation prompt) is trained, plus the special token that ends its turn.
    pub fn chat(&self, messages: &[Message]) -> Result<Example, RowError> {
        let kwargs = &self.cfg.template_kwargs;
        let template_err = |e: String| RowError::new(SkipReason::Template, format!("chat template: {e}"));
        let full = self.template.render(messages, false, kwargs).map_err(template_err)?;
        let (input_ids, offsets) = self.tok.encode_plain_with_offsets(&full).map_err(tok_err)?;
        if self.cfg.train_on_inputs {
            let labels = input_ids.iter().map(|&x| x as i64).collect();
            return Ok(Example { input_ids, labels });
        }
        let mut labels = vec![IGNORE_INDEX; input_ids.len()];
        let mut floor = 0;
        for (i, m) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            // A prefix render that fails (a template that wants a user turn first) only loses the hint.
            let prefix = self.template.render(&messages[..i], true, kwargs).unwrap_or_default();
            let from = common_prefix_len(&prefix, &full).max(floor);
            let (start, end) = find_content(&full, from, &m.content).ok_or_else(|| {
                RowError::new(
                    SkipReason::Template,
                    format!("message {i}: the chat template does not render this assistant content verbatim, so its tokens cannot be masked"),
                )
            })?;
            floor = end;
            let mut last = None;
            for (k, &(s, e)) in offsets.iter().enumerate() {
                if e > start && s < end {
                    labels[k] = input_ids[k] as i64;
                    last = Some(k);
                }
            }
            if let Some(k) = last {
                if let Some(&next) = input_ids.get(k + 1) {
                    if self.cfg.train_on_eos && self.tok.is_special(next) {
                        labels[k + 1] = next as i64;
                    }
                }
            }
        }
        Ok(Example { input_ids, labels })
    }
}

/// Byte length of the longest common prefix of `a` and `b` (on a char boundary).
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, x), y)| x != y).map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// Byte span of `content` (or, for templates that trim, its trimmed form) in `text[from..]`.
fn find_content(text: &str, from: usize, content: &str) -> Option<(usize, usize)> {
    let rest = text.get(from..)?;
    [content, content.trim()]
        .into_iter()
        .filter(|c| !c.is_empty())
        .find_map(|c| rest.find(c).map(|p| (from + p, from + p + c.len())))
}
