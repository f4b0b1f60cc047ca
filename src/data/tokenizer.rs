//! `tokenizer.json` + `tokenizer_config.json`, encoding exactly as transformers' fast
//! tokenizers do by default (special tokens, BOS/EOS rules), and decoding.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::{Error, Result};

/// A token's byte range `(start, end)` in the text it was encoded from.
pub type Span = (usize, usize);

/// A tokenizer with the settings of its `tokenizer_config.json`.
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    /// `Some(b)` when `add_bos_token` decides (Llama / Gemma tokenizer classes).
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub chat_template: Option<String>,
    /// The full `tokenizer_config.json` (chat templates read more keys from it).
    pub config: Value,
}

/// Classes whose fast tokenizer rebuilds its post-processor from `add_bos_token` /
/// `add_eos_token`: for them the config flags win over tokenizer.json.
const FLAG_CLASSES: &[&str] = &[
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "CodeLlamaTokenizer",
    "CodeLlamaTokenizerFast",
    "GemmaTokenizer",
    "GemmaTokenizerFast",
];

impl TextTokenizer {
    /// Load `tokenizer.json` (and `tokenizer_config.json` if present) from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path,
                reason: "not found (the model folder needs a tokenizer.json)".into(),
            });
        }
        let inner =
            Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer { path: path.clone(), reason: e.to_string() })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config: Value = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|source| Error::Json { path: cfg_path.clone(), source })?
        } else {
            Value::Null
        };
        let class = config.get("tokenizer_class").and_then(Value::as_str).unwrap_or("");
        let flags_decide = FLAG_CLASSES.contains(&class);
        let flag =
            |k: &str, default: bool| flags_decide.then(|| config.get(k).and_then(Value::as_bool).unwrap_or(default));
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: the one called "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let jinja_file = dir.join("chat_template.jinja");
        let chat_template = match chat_template {
            Some(t) => Some(t),
            None if jinja_file.is_file() => {
                Some(std::fs::read_to_string(&jinja_file).map_err(|e| Error::io(&jinja_file, e))?)
            }
            None => None,
        };
        Ok(Self {
            add_bos: flag("add_bos_token", true),
            add_eos: flag("add_eos_token", false),
            bos_token: token_string(&config, "bos_token"),
            eos_token: token_string(&config, "eos_token"),
            pad_token: token_string(&config, "pad_token"),
            chat_template,
            config,
            inner,
            path,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Encode as `tokenizer(text)` does: with the default special tokens (BOS for Llama).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_raw(text, true)?;
        if let Some(add_bos) = self.add_bos {
            // Llama / Gemma classes: the flags decide, whatever tokenizer.json's post-processor says.
            let bos = self.bos_id();
            let has_bos = bos.is_some() && ids.first().copied() == bos;
            match (add_bos, has_bos, bos) {
                (true, false, Some(b)) => ids.insert(0, b),
                (false, true, _) => {
                    ids.remove(0);
                }
                _ => {}
            }
            let eos = self.eos_id();
            let has_eos = eos.is_some() && ids.last().copied() == eos;
            match (self.add_eos.unwrap_or(false), has_eos, eos) {
                (true, false, Some(e)) => ids.push(e),
                (false, true, _) if !text.ends_with(self.eos_token.as_deref().unwrap_or("\u{0}")) => {
                    ids.pop();
                }
                _ => {}
            }
        }
        Ok(ids)
    }

    /// Encode without adding any special token (`add_special_tokens=False`).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_raw(text, false)
    }

    fn encode_raw(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), reason: format!("encoding failed: {e}") })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode without special tokens, with each token's byte span in `text`.
    pub fn encode_plain_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), reason: format!("encoding failed: {e}") })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Whether `id` is an added token marked special (`<|eot_id|>`, `<|im_end|>`, `</s>`...).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special)
    }

    /// Decode ids to text, keeping special tokens (what the model sees).
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), reason: format!("decoding failed: {e}") })
    }

    /// Decode ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), reason: format!("decoding failed: {e}") })
    }
}

/// `bos_token` etc. are a string or an AddedToken object with `content`.
fn token_string(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}
