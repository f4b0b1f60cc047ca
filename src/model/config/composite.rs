//! Vision-language checkpoints (`COMPOSITE_MODEL_TYPES`): their text decoder is read from
//! `text_config`, with the keys transformers keeps only at the top level copied down.

use std::path::Path;

use serde_json::{Map, Value};

use super::{DecoderConfig, COMPOSITE_MODEL_TYPES};
use crate::{Error, Result};

/// The object the decoder's config is read from, and the outer `model_type` when the file is
/// a vision-language checkpoint (its `text_config`, completed from the top level).
pub(super) fn text_decoder_object(path: &Path, value: Value) -> Result<(Map<String, Value>, Option<String>)> {
    let outer_type = value.get("model_type").and_then(Value::as_str).unwrap_or_default().to_string();
    if !COMPOSITE_MODEL_TYPES.contains(&outer_type.as_str()) {
        return match value {
            Value::Object(o) => Ok((o, None)),
            _ => Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                key: "config.json".into(),
                reason: "expected a JSON object".into(),
            }),
        };
    }
    let mut text_config = match value.get("text_config") {
        Some(Value::Object(t)) => t.clone(),
        _ => {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                key: "text_config".into(),
                reason: format!("a {outer_type} checkpoint needs its text decoder's config as an object here"),
            })
        }
    };
    let default_text = match outer_type.as_str() {
        "gemma3" => "gemma3_text",
        "qwen3_5" => "qwen3_5_text",
        "qwen3_5_moe" => "qwen3_5_moe_text",
        "llama4" => "llama4_text",
        _ => "mistral",
    };
    text_config.entry("model_type").or_insert_with(|| Value::from(default_text));
    // Qwen 3.5: both levels carry `tie_word_embeddings`. The Hub checkpoints are saved from
    // Qwen3_5ForConditionalGeneration, whose tying reads its own (top-level) config
    // (`_tied_weights_keys` = lm_head <- model.language_model.embed_tokens, modeling_qwen3_5.py:1817;
    // `getattr(self.config, "tie_word_embeddings")`, modeling_utils.py:2494); only
    // AutoModelForCausalLM, which swaps in `get_text_config()` (auto/auto_factory.py:236-242),
    // reads the text_config's. Nothing in transformers syncs the two, so the top-level flag,
    // where given, wins: it is how the checkpoint was trained. Mistral 3 (Ministral 3 inside
    // `mistral3`) is the same: Mistral3ForConditionalGeneration ties from its own config
    // (configuration_mistral3.py:98, default True). Where the top level leaves the flag out, the
    // text config's value (or its class default) is kept: transformers 5.25 would fall back to
    // True there, but it also refuses to tie a checkpoint whose lm_head differs from the
    // embeddings (modeling_utils.py:2566-2585), which is what such older files hold.
    if matches!(outer_type.as_str(), "qwen3_5" | "qwen3_5_moe" | "mistral3") {
        if let Some(tie) = value.get("tie_word_embeddings").filter(|v| v.is_boolean()) {
            text_config.insert("tie_word_embeddings".into(), tie.clone());
        }
    }
    // Token ids and the dtype are often only given at the top level.
    for key in
        ["architectures", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "quantization_config"]
    {
        if let Some(v) = value.get(key).filter(|v| !v.is_null()) {
            text_config.entry(key).or_insert_with(|| v.clone());
        }
    }
    Ok((text_config, Some(outer_type)))
}

impl DecoderConfig {
    /// The one-line notice for a vision-language checkpoint, whose vision tower is not loaded.
    pub fn composite_notice(&self) -> Option<String> {
        self.composite.as_ref().map(|outer| {
            let mut notice = format!("{outer} is a vision-language checkpoint: using its {} text decoder; the vision tower", self.model_type);
            if matches!(outer.as_str(), "qwen3_5" | "qwen3_5_moe") {
                notice.push_str(" (`model.visual.*`) is not loaded and the multi-token-prediction weights (`mtp.*`) are ignored (merge copies both unchanged)");
            } else {
                notice.push_str(" is not loaded (merge copies it unchanged)");
            }
            notice
        })
    }
}
