//! The per-family defaults of transformers' config classes that a `config.json` may leave out.

use serde_json::Value;

/// Whether the family's config class ties the LM head to the embeddings by default
/// (config.json omits a value equal to its class default).
pub(super) fn default_tie(model_type: &str) -> bool {
    model_type.starts_with("gemma") || model_type == "smollm3"
}

/// The defaults of the config classes that nested `text_config`s rely on (transformers writes
/// a sub-config's keys only where they differ from its class): Gemma3TextConfig and MistralConfig
/// as in transformers 4.57.
pub(super) fn fill_class_defaults(obj: &mut serde_json::Map<String, Value>) {
    let defaults: &[(&str, Value)] = match obj.get("model_type").and_then(Value::as_str) {
        Some("gemma3_text") => &[
            ("vocab_size", Value::from(262_208)),
            ("hidden_size", Value::from(2304)),
            ("intermediate_size", Value::from(9216)),
            ("num_hidden_layers", Value::from(26)),
            ("num_attention_heads", Value::from(8)),
            ("num_key_value_heads", Value::from(4)),
            ("head_dim", Value::from(256)),
            ("hidden_activation", Value::from("gelu_pytorch_tanh")),
            ("max_position_embeddings", Value::from(131_072)),
            ("rms_norm_eps", Value::from(1e-6)),
            ("pad_token_id", Value::from(0)),
            ("eos_token_id", Value::from(1)),
            ("bos_token_id", Value::from(2)),
            ("tie_word_embeddings", Value::from(true)),
            ("rope_theta", Value::from(1_000_000.0)),
            ("rope_local_base_freq", Value::from(10_000.0)),
            ("query_pre_attn_scalar", Value::from(256)),
            ("sliding_window", Value::from(4096)),
        ],
        Some("mistral") => &[
            ("vocab_size", Value::from(32_000)),
            ("hidden_size", Value::from(4096)),
            ("intermediate_size", Value::from(14_336)),
            ("num_hidden_layers", Value::from(32)),
            ("num_attention_heads", Value::from(32)),
            ("num_key_value_heads", Value::from(8)),
            ("hidden_act", Value::from("silu")),
            ("max_position_embeddings", Value::from(131_072)),
            ("rms_norm_eps", Value::from(1e-6)),
            ("bos_token_id", Value::from(1)),
            ("eos_token_id", Value::from(2)),
            ("tie_word_embeddings", Value::from(false)),
            ("rope_theta", Value::from(10_000.0)),
            ("sliding_window", Value::from(4096)),
        ],
        _ => &[],
    };
    for (key, value) in defaults {
        obj.entry(*key).or_insert_with(|| value.clone());
    }
}
