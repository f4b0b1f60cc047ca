//! Tiny configs of the hybrid attention / Gated DeltaNet families, as transformers 5.25 writes
//! them (`scripts/reference/print_hybrid_configs.py`: `AutoConfig.for_model(...)` with the
//! ARCHITECTURES-2026 §6.1 kwargs, `to_json_string(use_diff=True)`; no torch needed), and the
//! switches derived from them.

use std::path::Path;

use serde_json::{json, Value};

use super::*;

const QWEN3_5_TEXT: &str = r#"{"attention_bias":false,"attention_dropout":0.0,"bos_token_id":null,"eos_token_id":null,"head_dim":16,"hidden_act":"silu","hidden_size":64,"initializer_range":0.02,"intermediate_size":96,"layer_types":["linear_attention","linear_attention","linear_attention","full_attention"],"linear_conv_kernel_dim":4,"linear_key_head_dim":16,"linear_num_key_heads":2,"linear_num_value_heads":4,"linear_value_head_dim":16,"max_position_embeddings":256,"model_type":"qwen3_5_text","num_attention_heads":4,"num_hidden_layers":4,"num_key_value_heads":2,"pad_token_id":null,"rms_norm_eps":1e-06,"rope_parameters":{"mrope_interleaved":true,"mrope_section":[1,1,0],"partial_rotary_factor":0.25,"rope_theta":10000000.0,"rope_type":"default"},"tie_word_embeddings":true,"transformers_version":"5.25.0","use_cache":true,"vocab_size":128}"#;

const QWEN3_5: &str = r#"{"image_token_id":248056,"model_type":"qwen3_5","text_config":{"attention_bias":false,"attention_dropout":0.0,"bos_token_id":null,"eos_token_id":null,"head_dim":16,"hidden_act":"silu","hidden_size":64,"initializer_range":0.02,"intermediate_size":96,"layer_types":["linear_attention","linear_attention","linear_attention","full_attention"],"linear_conv_kernel_dim":4,"linear_key_head_dim":16,"linear_num_key_heads":2,"linear_num_value_heads":4,"linear_value_head_dim":16,"max_position_embeddings":256,"model_type":"qwen3_5_text","num_attention_heads":4,"num_hidden_layers":4,"num_key_value_heads":2,"pad_token_id":null,"rms_norm_eps":1e-06,"rope_parameters":{"mrope_interleaved":true,"mrope_section":[1,1,0],"partial_rotary_factor":0.25,"rope_theta":10000000.0,"rope_type":"default"},"tie_word_embeddings":true,"use_cache":true,"vocab_size":128},"tie_word_embeddings":true,"transformers_version":"5.25.0","video_token_id":248057,"vision_config":{"depth":1,"hidden_act":"gelu_pytorch_tanh","hidden_size":32,"in_channels":3,"initializer_range":0.02,"intermediate_size":64,"model_type":"qwen3_5_vision","num_heads":2,"num_position_embeddings":16,"out_hidden_size":64,"patch_size":8,"rope_parameters":{"rope_theta":10000.0,"rope_type":"axial"},"spatial_merge_size":2,"temporal_patch_size":2},"vision_end_token_id":248054,"vision_start_token_id":248053}"#;

const QWEN3_5_MOE_TEXT: &str = r#"{"attention_bias":false,"attention_dropout":0.0,"bos_token_id":null,"eos_token_id":null,"head_dim":16,"hidden_act":"silu","hidden_size":64,"initializer_range":0.02,"layer_types":["linear_attention","linear_attention","linear_attention","full_attention"],"linear_conv_kernel_dim":4,"linear_key_head_dim":16,"linear_num_key_heads":2,"linear_num_value_heads":4,"linear_value_head_dim":16,"max_position_embeddings":256,"model_type":"qwen3_5_moe_text","moe_intermediate_size":32,"num_attention_heads":4,"num_experts":4,"num_experts_per_tok":2,"num_hidden_layers":4,"num_key_value_heads":2,"output_router_logits":false,"pad_token_id":null,"rms_norm_eps":1e-06,"rope_parameters":{"mrope_interleaved":true,"mrope_section":[1,1,0],"partial_rotary_factor":0.25,"rope_theta":10000000.0,"rope_type":"default"},"router_aux_loss_coef":0.001,"shared_expert_intermediate_size":32,"tie_word_embeddings":true,"transformers_version":"5.25.0","use_cache":true,"vocab_size":128}"#;

const QWEN3_5_MOE: &str = r#"{"image_token_id":248056,"model_type":"qwen3_5_moe","text_config":{"attention_bias":false,"attention_dropout":0.0,"bos_token_id":null,"eos_token_id":null,"head_dim":16,"hidden_act":"silu","hidden_size":64,"initializer_range":0.02,"layer_types":["linear_attention","linear_attention","linear_attention","full_attention"],"linear_conv_kernel_dim":4,"linear_key_head_dim":16,"linear_num_key_heads":2,"linear_num_value_heads":4,"linear_value_head_dim":16,"max_position_embeddings":256,"model_type":"qwen3_5_moe_text","moe_intermediate_size":32,"num_attention_heads":4,"num_experts":4,"num_experts_per_tok":2,"num_hidden_layers":4,"num_key_value_heads":2,"output_router_logits":false,"pad_token_id":null,"rms_norm_eps":1e-06,"rope_parameters":{"mrope_interleaved":true,"mrope_section":[1,1,0],"partial_rotary_factor":0.25,"rope_theta":10000000.0,"rope_type":"default"},"router_aux_loss_coef":0.001,"shared_expert_intermediate_size":32,"tie_word_embeddings":true,"use_cache":true,"vocab_size":128},"tie_word_embeddings":true,"transformers_version":"5.25.0","video_token_id":248057,"vision_config":{"depth":1,"hidden_act":"gelu_pytorch_tanh","hidden_size":32,"in_channels":3,"initializer_range":0.02,"intermediate_size":64,"model_type":"qwen3_5_moe_vision","num_heads":2,"num_position_embeddings":16,"out_hidden_size":64,"patch_size":8,"rope_parameters":{"rope_theta":10000.0,"rope_type":"axial"},"spatial_merge_size":2,"temporal_patch_size":2},"vision_end_token_id":248054,"vision_start_token_id":248053}"#;

const QWEN3_NEXT: &str = r#"{"attention_bias":false,"attention_dropout":0.0,"bos_token_id":null,"decoder_sparse_step":1,"eos_token_id":null,"head_dim":16,"hidden_act":"silu","hidden_size":64,"initializer_range":0.02,"intermediate_size":96,"layer_types":["linear_attention","linear_attention","linear_attention","full_attention"],"linear_conv_kernel_dim":4,"linear_key_head_dim":16,"linear_num_key_heads":2,"linear_num_value_heads":4,"linear_value_head_dim":16,"max_position_embeddings":256,"mlp_only_layers":[],"model_type":"qwen3_next","moe_intermediate_size":32,"norm_topk_prob":true,"num_attention_heads":4,"num_experts":4,"num_experts_per_tok":2,"num_hidden_layers":4,"num_key_value_heads":2,"output_router_logits":false,"pad_token_id":null,"rms_norm_eps":1e-06,"rope_parameters":{"partial_rotary_factor":0.25,"rope_theta":10000000.0,"rope_type":"default"},"router_aux_loss_coef":0.001,"shared_expert_intermediate_size":32,"tie_word_embeddings":true,"transformers_version":"5.25.0","use_cache":true,"vocab_size":128}"#;

fn derive(v: Value) -> Result<DecoderConfig> {
    let path = Path::new("config.json");
    HfConfig::from_value(path, v)?.to_decoder_config(path)
}

fn parse(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

fn error_key(e: Error) -> String {
    match e {
        Error::Unsupported { key, .. } | Error::InvalidConfig { key, .. } => key,
        other => panic!("not a config error: {other}"),
    }
}

use Mixer::{Attention as A, GatedDeltaNet as G};

#[test]
fn qwen3_5_text_derives_hybrid_layers_gated_attention_and_offset_norms() {
    let c = derive(parse(QWEN3_5_TEXT)).unwrap();
    assert_eq!(c.layer_mixers, [G, G, G, A]);
    assert_eq!(
        c.delta_net,
        Some(DeltaNetConfig {
            num_k_heads: 2,
            num_v_heads: 4,
            k_head_dim: 16,
            v_head_dim: 16,
            conv_kernel: 4,
            grouped: false
        })
    );
    assert!(c.attn_output_gate && c.qk_norm && !c.qk_norm_whole && c.tie_word_embeddings);
    assert!(!c.qkv_bias && !c.o_bias && !c.sandwich_norms && !c.post_norms);
    assert_eq!((c.norm_offset, c.rms_norm_eps, c.attn_scale), (1.0, 1e-6, 0.25));
    assert_eq!((c.head_dim, c.intermediate_size, c.max_position_embeddings), (16, 96, 256));
    // rope_parameters: theta 1e7, partial_rotary_factor 0.25 of head_dim 16; M-RoPE accepted.
    assert_eq!((c.rope.theta, c.rope.rotary_dim, &c.rope.scaling), (1e7, 4, &crate::model::rope::RopeScaling::Default));
    assert_eq!(c.layer_windows, [None; 4]);
    assert_eq!(c.layer_rope, [true; 4]);
    assert!(c.moe.is_none() && c.composite.is_none() && c.composite_notice().is_none());
    // 3 delta-net layers (17432 each) + 1 gated attention layer (16416), MLPs, norms, tied embeddings.
    assert_eq!(c.num_parameters(), 151_208);
}

#[test]
fn qwen3_5_composite_reads_the_text_decoder_and_the_top_level_tie() {
    let c = derive(parse(QWEN3_5)).unwrap();
    assert_eq!((c.model_type.as_str(), c.composite.as_deref()), ("qwen3_5_text", Some("qwen3_5")));
    assert_eq!(DecoderConfig { composite: None, ..c.clone() }, derive(parse(QWEN3_5_TEXT)).unwrap());
    let notice = c.composite_notice().unwrap();
    assert!(notice.contains("model.visual.*") && notice.contains("mtp.*"), "{notice}");
    assert_eq!(c.num_parameters(), 151_208);
    // Both levels carry the flag: the top level (the VLM class's) wins, either way.
    let mut v = parse(QWEN3_5);
    v["tie_word_embeddings"] = false.into();
    assert!(!derive(v.clone()).unwrap().tie_word_embeddings);
    v["tie_word_embeddings"] = true.into();
    v["text_config"]["tie_word_embeddings"] = false.into();
    assert!(derive(v.clone()).unwrap().tie_word_embeddings);
    // Only in text_config: that one.
    v.as_object_mut().unwrap().remove("tie_word_embeddings");
    assert!(!derive(v).unwrap().tie_word_embeddings);
}

#[test]
fn qwen3_5_text_config_left_out_takes_the_class_defaults() {
    let c = derive(json!({"model_type": "qwen3_5", "text_config": {}})).unwrap();
    assert_eq!(
        (c.model_type.as_str(), c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers),
        ("qwen3_5_text", 248_320, 4096, 12_288, 32)
    );
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim, c.rope.rotary_dim, c.rope.theta), (16, 4, 256, 64, 10_000.0));
    assert_eq!(
        c.delta_net,
        Some(DeltaNetConfig {
            num_k_heads: 16,
            num_v_heads: 32,
            k_head_dim: 128,
            v_head_dim: 128,
            conv_kernel: 4,
            grouped: false
        })
    );
    assert_eq!(c.layer_mixers.iter().filter(|m| **m == A).count(), 8);
    assert_eq!(&c.layer_mixers[..4], [G, G, G, A]);
    assert!(!c.tie_word_embeddings);
    let moe = derive(json!({"model_type": "qwen3_5_moe", "text_config": {}})).unwrap();
    let m = moe.moe.as_ref().unwrap();
    assert_eq!((moe.num_layers, moe.hidden_size, moe.num_kv_heads, moe.intermediate_size), (40, 2048, 2, 0));
    assert_eq!((m.num_experts, m.top_k, m.expert_intermediate, m.shared_expert_intermediate), (256, 8, 512, Some(512)));
}

#[test]
fn qwen3_5_moe_routes_to_renormalised_top_k_with_a_shared_expert_on_every_layer() {
    for (text, composite) in [(QWEN3_5_MOE_TEXT, None), (QWEN3_5_MOE, Some("qwen3_5_moe"))] {
        let mut v = parse(text);
        // Qwen3_5MoeTextConfig has no norm_topk_prob / decoder_sparse_step: ignored, as transformers does.
        let t = if composite.is_some() { &mut v["text_config"] } else { &mut v };
        t["norm_topk_prob"] = false.into();
        t["decoder_sparse_step"] = 2.into();
        let c = derive(v).unwrap();
        assert_eq!((c.model_type.as_str(), c.composite.as_deref()), ("qwen3_5_moe_text", composite));
        let m = c.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.expert_intermediate, m.shared_expert_intermediate), (4, 2, 32, Some(32)));
        assert!(m.norm_topk_prob && m.sparse_layers == [true; 4] && !m.biases);
        assert_eq!((m.naming, m.routing, m.router_aux_loss_coef), (ExpertNaming::Qwen, Routing::SoftmaxTopK, 0.001));
        assert_eq!(m.activation, ExpertActivation::Glu(Activation::Silu));
        assert_eq!(c.intermediate_size, 0, "no dense MLP");
        assert_eq!(c.layer_mixers, [G, G, G, A]);
        assert!(c.attn_output_gate && c.tie_word_embeddings && !c.delta_net.as_ref().unwrap().grouped);
        assert_eq!(c.num_parameters(), 201_640);
    }
}

#[test]
fn qwen3_next_groups_its_projections_and_reads_the_qwen2_moe_layer_switches() {
    let c = derive(parse(QWEN3_NEXT)).unwrap();
    assert_eq!(
        c.delta_net,
        Some(DeltaNetConfig {
            num_k_heads: 2,
            num_v_heads: 4,
            k_head_dim: 16,
            v_head_dim: 16,
            conv_kernel: 4,
            grouped: true
        })
    );
    assert_eq!(c.layer_mixers, [G, G, G, A]);
    assert!(c.attn_output_gate && c.qk_norm && c.norm_offset == 1.0 && c.composite.is_none());
    let m = c.moe.as_ref().unwrap();
    assert!(m.norm_topk_prob && m.sparse_layers == [true; 4]);
    assert_eq!((m.expert_intermediate, m.shared_expert_intermediate, m.naming), (32, Some(32), ExpertNaming::Qwen));
    assert_eq!(c.rope.rotary_dim, 4);
    // The Hub's Qwen3-Next files: top-level rope_theta / partial_rotary_factor, no layer_types;
    // norm_topk_prob, decoder_sparse_step and mlp_only_layers as in qwen2_moe.
    let mut v = parse(QWEN3_NEXT);
    let o = v.as_object_mut().unwrap();
    for k in ["rope_parameters", "layer_types", "norm_topk_prob"] {
        o.remove(k);
    }
    o.insert("rope_theta".into(), json!(1e6));
    o.insert("partial_rotary_factor".into(), json!(0.5));
    o.insert("rope_scaling".into(), Value::Null);
    o.insert("full_attention_interval".into(), json!(2));
    o.insert("mlp_only_layers".into(), json!([0]));
    o.insert("decoder_sparse_step".into(), json!(1));
    let c = derive(v).unwrap();
    assert_eq!((c.rope.theta, c.rope.rotary_dim), (1e6, 8));
    assert_eq!(c.layer_mixers, [G, A, G, A]);
    let m = c.moe.as_ref().unwrap();
    assert!(m.norm_topk_prob, "Qwen3NextConfig defaults norm_topk_prob to true");
    assert_eq!(m.sparse_layers, [false, true, true, true]);
}

#[test]
fn hybrid_configs_the_decoder_cannot_compute_are_refused_with_the_key() {
    let with = |base: &str, key: &str, value: Value| {
        let mut v = parse(base);
        v[key] = value;
        error_key(derive(v).unwrap_err())
    };
    assert_eq!(with(QWEN3_5_TEXT, "linear_num_value_heads", json!(3)), "linear_num_value_heads");
    assert_eq!(with(QWEN3_5_TEXT, "linear_key_head_dim", json!(0)), "linear_key_head_dim");
    assert_eq!(
        with(
            QWEN3_5_TEXT,
            "layer_types",
            json!(["linear_attention", "sliding_attention", "linear_attention", "full_attention"])
        ),
        "layer_types"
    );
    assert_eq!(with(QWEN3_5_TEXT, "layer_types", json!(["linear_attention", "full_attention"])), "layer_types");
    assert_eq!(with(QWEN3_5_TEXT, "hidden_act", json!("gelu")), "hidden_act");
    assert_eq!(with(QWEN3_NEXT, "mlp_only_layers", json!([4])), "mlp_only_layers");
    assert_eq!(with(QWEN3_NEXT, "decoder_sparse_step", json!(0)), "decoder_sparse_step");
    let mut v = parse(QWEN3_5_TEXT);
    v.as_object_mut().unwrap().remove("layer_types");
    v["full_attention_interval"] = json!(0);
    assert_eq!(error_key(derive(v).unwrap_err()), "full_attention_interval");
    // M-RoPE only for the qwen3_5 families (qwen3_next has none).
    let mut v = parse(QWEN3_NEXT);
    v["rope_parameters"]["mrope_section"] = json!([1, 1, 0]);
    assert_eq!(error_key(derive(v).unwrap_err()), "rope_parameters.mrope_section");
    let mut v = parse(QWEN3_5_TEXT);
    v["rope_parameters"]["mrope_interleaved"] = json!("yes");
    assert_eq!(error_key(derive(v).unwrap_err()), "rope_parameters.mrope_interleaved");
    // Other families: no linear_attention layers, no M-RoPE.
    let qwen3 = json!({"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128});
    let mut v = qwen3.clone();
    v["layer_types"] = json!(["linear_attention", "full_attention"]);
    assert_eq!(error_key(derive(v).unwrap_err()), "layer_types");
    let mut v = qwen3.clone();
    v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2]});
    assert_eq!(error_key(derive(v).unwrap_err()), "rope_parameters.mrope_section");
    let mut v = qwen3;
    v.as_object_mut().unwrap().remove("intermediate_size");
    assert_eq!(error_key(derive(v).unwrap_err()), "intermediate_size");
}

#[test]
fn existing_families_have_attention_only_and_ungated_q() {
    let c = derive(json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}))
    .unwrap();
    assert_eq!(c.layer_mixers, [A; 3]);
    assert!(c.delta_net.is_none() && !c.attn_output_gate && c.norm_offset == 0.0);
    // transformers 5 keeps partial_rotary_factor inside rope_parameters.
    assert_eq!(c.rope.rotary_dim, 8);
}
