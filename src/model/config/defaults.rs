//! The per-family defaults of transformers' config classes that a `config.json` may leave out.

use serde_json::Value;

/// Whether the family's config class ties the LM head to the embeddings by default
/// (config.json omits a value equal to its class default).
pub(super) fn default_tie(model_type: &str) -> bool {
    model_type.starts_with("gemma") || model_type == "smollm3"
}

/// The defaults of the config classes that nested `text_config`s rely on (transformers writes
/// a sub-config's keys only where they differ from its class): Gemma3TextConfig and MistralConfig
/// as in transformers 4.57; Qwen3_5TextConfig, Qwen3_5MoeTextConfig, Qwen3NextConfig and
/// Ministral3Config as in transformers 5.25 (where a hand-written or older file may leave them
/// out too).
pub(super) fn fill_class_defaults(obj: &mut serde_json::Map<String, Value>) {
    // Kimi K2's text checkpoints name a DeepSeek-V3 decoder `kimi_k2` (their auto_map points at
    // DeepseekV3Config; transformers 5.25 renames it so inside kimi_k25).
    if obj.get("model_type").and_then(Value::as_str) == Some("kimi_k2") {
        obj.insert("model_type".into(), Value::from("deepseek_v3"));
    }
    let model_type = obj.get("model_type").and_then(Value::as_str).unwrap_or_default().to_string();
    if matches!(model_type.as_str(), "deepseek_v3" | "deepseek_v2" | "deepseek_v32") {
        // Absent means the class default; `null` (kept) means a plain q_proj.
        obj.entry("q_lora_rank").or_insert(Value::from(1536));
    }
    let hybrid = hybrid_defaults(&model_type);
    let defaults: &[(&str, Value)] = match model_type.as_str() {
        "gemma3_text" => &[
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
        "mistral" => &[
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
        // Llama4TextConfig (transformers 5.25, models/llama4/configuration_llama4.py): Scout's shape.
        "llama4_text" => &[
            ("vocab_size", Value::from(202_048)),
            ("hidden_size", Value::from(5120)),
            ("intermediate_size", Value::from(8192)),
            ("intermediate_size_mlp", Value::from(16_384)),
            ("num_hidden_layers", Value::from(48)),
            ("num_attention_heads", Value::from(40)),
            ("num_key_value_heads", Value::from(8)),
            ("head_dim", Value::from(128)),
            ("hidden_act", Value::from("silu")),
            ("max_position_embeddings", Value::from(131_072)),
            ("rms_norm_eps", Value::from(1e-5)),
            ("bos_token_id", Value::from(1)),
            ("eos_token_id", Value::from(2)),
            ("tie_word_embeddings", Value::from(false)),
            ("num_experts_per_tok", Value::from(1)),
            ("num_local_experts", Value::from(16)),
            ("interleave_moe_layer_step", Value::from(1)),
            // Absent: the class default; `null` (kept) turns chunking off.
            ("attention_chunk_size", Value::from(8192)),
        ],
        // Ministral3Config (transformers 5.25, models/ministral3/configuration_ministral3.py:73-106).
        "ministral3" => &[
            ("vocab_size", Value::from(131_072)),
            ("hidden_size", Value::from(4096)),
            ("intermediate_size", Value::from(14_336)),
            ("num_hidden_layers", Value::from(34)),
            ("num_attention_heads", Value::from(32)),
            ("num_key_value_heads", Value::from(8)),
            ("head_dim", Value::from(128)),
            ("hidden_act", Value::from("silu")),
            ("max_position_embeddings", Value::from(262_144)),
            ("rms_norm_eps", Value::from(1e-5)),
            ("bos_token_id", Value::from(1)),
            ("eos_token_id", Value::from(2)),
            ("tie_word_embeddings", Value::from(false)),
        ],
        _ => &hybrid,
    };
    for (key, value) in defaults {
        obj.entry(*key).or_insert_with(|| value.clone());
    }
    if model_type == "ministral3" && obj.get("rope_parameters").is_none_or(Value::is_null) {
        // `__post_init__`: YaRN x16 over a 16k original context, with the query temperature.
        let max_pos = obj.get("max_position_embeddings").cloned().unwrap_or(Value::from(262_144));
        obj.insert(
            "rope_parameters".into(),
            serde_json::json!({
                "type": "yarn", "rope_theta": 1_000_000.0, "factor": 16.0,
                "original_max_position_embeddings": 16_384, "max_position_embeddings": max_pos,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                "llama_4_scaling_beta": 0.1,
            }),
        );
    }
}

/// The 5.25 defaults of the hybrid attention / Gated DeltaNet families (empty for the others):
/// `Qwen3_5TextConfig` (models/qwen3_5/configuration_qwen3_5.py:81-101), `Qwen3_5MoeTextConfig`
/// (models/qwen3_5_moe/configuration_qwen3_5_moe.py:85-110, no dense `intermediate_size`) and
/// `Qwen3NextConfig` (models/qwen3_next/configuration_qwen3_next.py:88-116). `layer_types`
/// (every 4th layer full) and `partial_rotary_factor` (0.25) are derived where they are read.
fn hybrid_defaults(model_type: &str) -> Vec<(&'static str, Value)> {
    let (vocab, hidden, intermediate, layers, kv_heads) = match model_type {
        "qwen3_5_text" => (248_320, 4096, Some(12_288), 32, 4),
        "qwen3_5_moe_text" => (248_320, 2048, None, 40, 2),
        "qwen3_next" => (151_936, 2048, Some(5632), 48, 2),
        _ => return Vec::new(),
    };
    let mut d = vec![
        ("vocab_size", Value::from(vocab)),
        ("hidden_size", Value::from(hidden)),
        ("num_hidden_layers", Value::from(layers)),
        ("num_attention_heads", Value::from(16)),
        ("num_key_value_heads", Value::from(kv_heads)),
        ("head_dim", Value::from(256)),
        ("hidden_act", Value::from("silu")),
        ("max_position_embeddings", Value::from(32_768)),
        ("rms_norm_eps", Value::from(1e-6)),
        ("tie_word_embeddings", Value::from(false)),
        ("attention_bias", Value::from(false)),
        ("linear_conv_kernel_dim", Value::from(4)),
        ("linear_key_head_dim", Value::from(128)),
        ("linear_value_head_dim", Value::from(128)),
        ("linear_num_key_heads", Value::from(16)),
        ("linear_num_value_heads", Value::from(32)),
    ];
    if let Some(i) = intermediate {
        d.push(("intermediate_size", Value::from(i)));
    }
    match model_type {
        "qwen3_5_moe_text" => d.extend([
            ("moe_intermediate_size", Value::from(512)),
            ("shared_expert_intermediate_size", Value::from(512)),
            ("num_experts_per_tok", Value::from(8)),
            ("num_experts", Value::from(256)),
            ("router_aux_loss_coef", Value::from(0.001)),
        ]),
        "qwen3_next" => d.extend([
            ("decoder_sparse_step", Value::from(1)),
            ("moe_intermediate_size", Value::from(512)),
            ("shared_expert_intermediate_size", Value::from(512)),
            ("num_experts_per_tok", Value::from(10)),
            ("num_experts", Value::from(512)),
            ("norm_topk_prob", Value::from(true)),
            ("router_aux_loss_coef", Value::from(0.001)),
        ]),
        _ => {}
    }
    d
}
