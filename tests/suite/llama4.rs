//! Llama 4 (issue 22, item 4): `llama4_text` and the text decoder of the `llama4` wrapper
//! against transformers 5.25 + PEFT 0.22 (tests/fixtures/llama4, made by
//! scripts/reference/make_llama4_fixtures.py): chunked attention on the RoPE layers (chunks of
//! 32 on 40- and 100-token rows), RoPE on complex pairs, the weightless q/k norm, the NoPE
//! layer's query temperature (from position 7), the top-1 sigmoid router that scales the token
//! before its expert, the shared expert, dense and sparse layers interleaved; logits, router
//! choices, a left-padded batch, loss, generation with the KV cache, PEFT adapters (experts in
//! PEFT's Llama 4 orientation), merge and a 10-step curve.

use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use serde_json::Value;
use temper::export::Adapter;
use temper::model::config::{HfConfig, Routing};
use temper::model::generate::{generate, SamplingConfig};
use temper::model::{load_model, CausalLm, WeightPrecision};
use temper::ops::loss::shift_labels;
use temper::ops::{TemperAutodiff, TemperBackend};

use crate::common::{
    arange, fixtures, logits_at, max_abs_diff, raw_tensors, ref_ids, scale_of, Cpu, CpuAutodiff, Reference,
};

/// Logits and LoRA gradients: within 1e-4 of max(1, the largest reference value).
const TOL: f32 = 1e-4;

/// The models, each with the reference it is compared with (the wrapper holds llama4_text's
/// text weights).
const MODELS: &[&str] = &["llama4_text", "llama4_text_dense_moe", "llama4"];

fn dir() -> std::path::PathBuf {
    fixtures().join("llama4")
}

fn manifest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap()).unwrap()
}

fn model_at<B: TemperBackend>(path: &std::path::Path, device: &B::Device) -> CausalLm<B> {
    load_model::<B>(path, WeightPrecision::F32, device).unwrap_or_else(|e| panic!("{}: {e}", path.display())).model
}

fn model_on<B: TemperBackend>(name: &str, device: &B::Device) -> CausalLm<B> {
    model_at(&dir().join(manifest()["models"][name]["path"].as_str().unwrap()), device)
}

fn reference(name: &str) -> Reference {
    Reference::open(&dir().join(manifest()["models"][name]["reference"].as_str().unwrap()))
}

/// Every model's logits (a 2x40 batch and a 100-token row, both longer than a chunk) within
/// 1e-4 of transformers; the wrapper's text decoder gives llama4_text's.
#[test]
fn llama4_logits_match_transformers() {
    check_logits_on::<Cpu>(&Default::default());
}

/// [`llama4_logits_match_transformers`] on backend `B` (the wgpu group runs it too).
pub fn check_logits_on<B: TemperBackend>(device: &B::Device) {
    for name in MODELS {
        let model = model_on::<B>(name, device);
        let r = reference(name);
        for key in ["batch.", "long."] {
            let input = ref_ids::<B>(&r, &format!("{key}input_ids"), device);
            let [b, t] = input.dims();
            let got = logits_at(&model, input, arange(b, t), None);
            let want = r.f32(&format!("{key}logits")).0;
            let d = max_abs_diff(&got, &want);
            assert!(d <= TOL * scale_of(&want), "{name}: {key}logits differ from transformers by {d:e}");
        }
    }
    // Each Llama 4 delta moves these logits by far more than the tolerance.
    let m = manifest();
    let checks = &m["models"]["llama4_text"]["delta_checks"];
    for key in [
        "long_max_abs_logit_diff_full_causal_instead_of_chunked",
        "long_max_abs_logit_diff_temperature_tuning_off",
        "long_max_abs_logit_diff_qk_norm_off",
        "long_max_abs_logit_diff_rotate_half_rope",
        "long_max_abs_logit_diff_router_score_applied_after_expert",
    ] {
        assert!(checks[key].as_f64().unwrap() > 0.1, "{key}: {}", checks[key]);
    }
}

/// Per token and MoE layer, the router picks transformers' expert.
#[test]
fn llama4_router_choices_match_transformers() {
    let device = Default::default();
    for name in ["llama4_text", "llama4_text_dense_moe"] {
        let model = model_on::<Cpu>(name, &device);
        let r = reference(name);
        let input = ref_ids::<Cpu>(&r, "batch.input_ids", &device);
        let [b, t] = input.dims();
        let ctx = model.causal_context(b, t, 0).recording_router();
        model.hidden_states(input, &ctx, None);
        let layers = ctx.router.as_ref().unwrap().borrow();
        let sparse: Vec<usize> =
            model.model.layers.iter().enumerate().filter(|(_, l)| l.moe.is_some()).map(|(i, _)| i).collect();
        let want_sparse: Vec<usize> = manifest()["models"][name]["moe_layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(sparse, want_sparse, "{name}: MoE layers");
        for (routing, &layer) in layers.iter().zip(&sparse) {
            let (want, shape) = r.i64(&format!("router.layer{layer}"));
            let got: Vec<i64> = routing.experts.iter().flatten().map(|&e| e as i64).collect();
            assert_eq!(got, want, "{name}: layer {layer} experts ({shape:?})");
        }
    }
}

/// A left-padded batch: pads in their own segment, the real tokens at positions 0..; the chunks
/// of the padded row start at its first real token (its segment), as transformers counts them,
/// and the NoPE layer's temperature counts from the row's start, as transformers does too.
#[test]
fn llama4_left_padded_batch_matches_transformers() {
    let device = Default::default();
    for name in ["llama4_text", "llama4_text_dense_moe"] {
        let model = model_on::<Cpu>(name, &device);
        let r = reference(name);
        let (worst, real, cols, scale) = crate::common::padded_batch_diff(&model, &r, &device);
        assert!(real > cols, "{name}: the padded batch has real tokens in both rows");
        assert!(worst <= TOL * scale, "{name}: left-padded logits differ by {worst:e} at real positions");
    }
}

/// The long row's loss equals transformers' `model(input_ids, labels=input_ids).loss`.
#[test]
fn llama4_loss_matches_transformers() {
    let device = Default::default();
    let m = manifest();
    for name in MODELS {
        let model = model_on::<Cpu>(name, &device);
        let r = reference(name);
        let input = ref_ids::<Cpu>(&r, "long.input_ids", &device);
        let (targets, count) = shift_labels(&[r.i64("long.input_ids").0]);
        let [b, t] = input.dims();
        let hidden = model.hidden_states(input, &model.causal_context(b, t, 0), None);
        let loss = model.nll_sum(hidden, &targets).into_scalar().elem::<f32>() / count as f32;
        let want = m["models"][name]["loss_long"].as_f64().unwrap() as f32;
        assert!((loss - want).abs() <= TOL, "{name}: loss {loss} vs transformers {want}");
    }
}

/// Greedy generation with the KV cache (chunks and the temperature at the cached positions)
/// gives transformers' tokens, and cached decoding in steps that cross chunk boundaries equals
/// the full pass.
#[test]
fn llama4_generation_with_the_kv_cache_matches() {
    let m = manifest();
    let device = Default::default();
    for name in MODELS {
        let model = model_on::<Cpu>(name, &device);
        let r = reference(name);
        let prompt: Vec<u32> = r.i64("long.input_ids").0[..90].iter().map(|&x| x as u32).collect();
        let want: Vec<u32> = m["models"][name]["generate"]["new_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let cfg = SamplingConfig {
            max_new_tokens: want.len(),
            temperature: 0.0,
            stop_tokens: Vec::new(),
            ..Default::default()
        };
        let got = generate(&model, &prompt, &cfg, |_| {}).unwrap();
        assert_eq!(got, want, "{name}: greedy tokens with the KV cache");
        let all: Vec<i64> = prompt.iter().chain(&got).map(|&x| x as i64).collect();
        let n = all.len();
        let full: Vec<f32> = model
            .forward(Tensor::from_data(TensorData::new(all.clone(), [1, n]), &device))
            .into_data()
            .to_vec()
            .unwrap();
        let mut cache = temper::model::KvCache::new(model.config.num_layers);
        let vocab = model.config.vocab_size;
        for (start, end) in [(0, 30), (30, 31), (31, 70), (70, n)] {
            let ids =
                Tensor::<Cpu, 2, Int>::from_data(TensorData::new(all[start..end].to_vec(), [1, end - start]), &device);
            let ctx = model.causal_context(1, end - start, start);
            let step: Vec<f32> =
                model.logits(model.hidden_states(ids, &ctx, Some(&mut cache))).into_data().to_vec().unwrap();
            let d = max_abs_diff(&step, &full[start * vocab..end * vocab]);
            assert!(d <= 1e-4, "{name}: cached positions {start}..{end} differ from the full pass by {d:e}");
        }
    }
}

/// PEFT adapters: on llama4_text (attention, dense MLP, shared expert, and the routed experts
/// through `target_parameters` in PEFT's Llama 4 orientation), logits, loss and every LoRA
/// gradient within 1e-4; on the wrapper (`language_model.model.*` names, a regex target), the
/// same adapter's logits.
#[test]
fn llama4_peft_logits_and_gradients_match() {
    check_peft_on::<CpuAutodiff>(&Default::default());
}

/// [`llama4_peft_logits_and_gradients_match`] on backend `B`.
pub fn check_peft_on<B: TemperAutodiff>(device: &B::Device) {
    let m = manifest();
    for name in ["llama4_text", "llama4"] {
        let e = &m["peft"][name];
        let path = |key: &str| dir().join(e[key].as_str().unwrap());
        let want_loss = e["loss"].as_f64().unwrap() as f32;
        let grads = e["grad_keys"].as_u64() != Some(0);
        crate::common::check_peft_adapter::<B>(
            name,
            &path("base_model"),
            &path("adapter"),
            &path("reference"),
            want_loss,
            grads,
            device,
        );
    }
}

/// The adapter Temper writes for llama4_text is PEFT's, key for key and bit for bit (the experts'
/// orientation swapped back), and the wrapper's keeps PEFT's `language_model.model.*` names and
/// a regex that cannot reach the vision tower.
#[test]
fn llama4_adapters_round_trip_in_peft_layout() {
    let m = manifest();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama4_text", "llama4"] {
        let src = dir().join(m["peft"][name]["adapter"].as_str().unwrap());
        let adapter = Adapter::read(&src).unwrap();
        let out = tmp.path().join(name);
        adapter.write(&out, temper::export::WriteMode::Refuse, &[]).unwrap();
        let want = raw_tensors(&src.join("adapter_model.safetensors"));
        let got = raw_tensors(&out.join("adapter_model.safetensors"));
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{name}: keys");
        for (k, (shape, bytes)) in &want {
            assert_eq!(&got[k].0, shape, "{name}: {k}");
            assert!(
                crate::common::f32s(&got[k].1) == crate::common::f32s(bytes),
                "{name}: {k} changed in the round trip"
            );
        }
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        if name == "llama4" {
            let re = cfg["target_modules"].as_str().expect("a regex");
            assert!(re.starts_with("^language_model\\.model\\."), "{re}");
        }
        let params: Vec<&str> =
            cfg["target_parameters"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(params, ["feed_forward.experts.down_proj", "feed_forward.experts.gate_up_proj"], "{name}");
    }
}

/// `temper merge` of the llama4_text adapter against PEFT's `merge_and_unload`: the adapted
/// tensors (the fused experts in their `[E, in, out]` layout included) within 1e-5 of
/// max(1, |x|), every other tensor byte for byte.
#[test]
fn llama4_merge_matches_peft_merge_and_unload() {
    let m = manifest();
    let e = &m["peft"]["llama4_text"];
    let merged = dir().join(e["merged"]["path"].as_str().unwrap());
    let want = raw_tensors(&merged);
    assert!(want.keys().any(|k| k.ends_with("feed_forward.experts.gate_up_proj")), "experts merged by PEFT");
    let path = |key: &str| dir().join(e[key].as_str().unwrap());
    crate::common::check_merge_matches_peft(&path("base_model"), &path("adapter"), &merged);
}

/// Ten AdamW steps of LoRA on llama4_text reproduce PyTorch + PEFT's curve.
#[test]
fn llama4_ten_step_curve_matches_pytorch() {
    crate::train_parity::run_with::<CpuAutodiff>("llama4/llama4_text_train", false, 5e-4, &Default::default());
}

/// The config rules: Llama4TextConfig's defaults (Scout's shape), the NoPE / chunked layer
/// pattern, the MoE layers from `interleave_moe_layer_step`, the wrapper's text config, and the
/// refusals naming their keys.
#[test]
fn llama4_config_defaults_and_refusals() {
    let path = std::path::Path::new("config.json");
    let derive = |v: Value| HfConfig::from_value(path, v).and_then(|hf| hf.to_decoder_config(path));
    let bare = serde_json::json!({"model_type": "llama4_text", "num_hidden_layers": 8, "interleave_moe_layer_step": 2});
    let cfg = derive(bare.clone()).unwrap();
    assert_eq!((cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (5120, 40, 8, 128));
    assert_eq!(cfg.intermediate_size, 16_384, "dense layers use intermediate_size_mlp");
    let moe = cfg.moe.clone().unwrap();
    assert_eq!((moe.num_experts, moe.top_k, moe.expert_intermediate), (16, 1, 8192));
    assert_eq!(moe.routing, Routing::SigmoidTopK);
    assert!(moe.scale_input && moe.shared_expert_intermediate == Some(8192) && !moe.shared_expert_gated);
    assert_eq!(moe.sparse_layers, vec![false, true, false, true, false, true, false, true]);
    assert_eq!(cfg.layer_rope, vec![true, true, true, false, true, true, true, false]);
    assert_eq!(
        cfg.layer_chunks,
        vec![Some(8192), Some(8192), Some(8192), None, Some(8192), Some(8192), Some(8192), None]
    );
    let temp = cfg.attn_temperature.unwrap();
    assert_eq!((temp.factor(8190), temp.factor(8191)), (1.0, 1.0 + 0.1 * 2f32.ln()));
    assert!(cfg.qk_weightless_norm && cfg.rope_pairs && cfg.ffn_name == "feed_forward");
    let wrapped = derive(serde_json::json!({"model_type": "llama4", "text_config": bare})).unwrap();
    assert_eq!((wrapped.model_type.as_str(), wrapped.composite.as_deref()), ("llama4_text", Some("llama4")));
    let refused = |v: Value, key: &str| {
        let e = derive(v).expect_err("refused").to_string();
        assert!(e.contains(key), "the error names {key}: {e}");
    };
    refused(serde_json::json!({"model_type": "llama4_text", "attention_chunk_size": 0}), "attention_chunk_size");
    refused(serde_json::json!({"model_type": "llama4_text", "num_hidden_layers": 2, "moe_layers": [5]}), "moe_layers");
    refused(
        serde_json::json!({"model_type": "llama4_text", "num_hidden_layers": 2, "layer_types": ["chunked_attention", "sliding_attention"]}),
        "layer_types",
    );
}

/// `temper train` from a recipe on the `llama4` wrapper (all-linear plus the routed experts),
/// then `temper generate` with the adapter: PEFT's `language_model.model.*` names, the experts
/// under `feed_forward`, nothing of the vision tower.
#[test]
fn recipe_trains_a_llama4_checkpoint_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("llama4");
    crate::common::with_stories_vocab(&dir().join(manifest()["models"]["llama4"]["path"].as_str().unwrap()), &model);
    let run = tmp.path().join("run");
    let experts =
        "  target_parameters: [feed_forward.experts.gate_up_proj, feed_forward.experts.down_proj]\n  lora_dropout: 0.0\n";
    let o = crate::common::train_stories(&model, &run, 96, experts);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("vision-language checkpoint"), "the VLM notice: {err}");
    let names: Vec<String> = raw_tensors(&run.join("adapter/adapter_model.safetensors")).into_keys().collect();
    let has = |s: &str| names.iter().any(|k| k.contains(s));
    for part in [
        "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A",
        "layers.0.feed_forward.gate_proj.lora_A",
        "layers.1.feed_forward.shared_expert.down_proj.lora_B",
        "layers.1.feed_forward.experts.base_layer.lora_A",
        "layers.3.feed_forward.experts.lora_B",
    ] {
        assert!(has(part), "{part} in {names:?}");
    }
    assert!(!has("vision") && !has("projector") && !has("router"), "{names:?}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_temper"))
        .args(["generate", "--model", model.to_str().unwrap(), "--adapter", run.join("adapter").to_str().unwrap()])
        .args(["--prompt", "Once upon a time", "--max-new-tokens", "8", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `temper export --format peft-per-expert` refuses Llama 4, whose experts are fused in every
/// format that exists (no server reads them per expert), and says what to use.
#[test]
fn llama4_per_expert_export_is_refused() {
    let m = manifest();
    let tmp = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_temper"))
        .args(["export", "--format", "peft-per-expert", "--adapter"])
        .arg(dir().join(m["peft"]["llama4_text"]["adapter"].as_str().unwrap()))
        .arg("--base")
        .arg(dir().join(m["models"]["llama4_text"]["path"].as_str().unwrap()))
        .arg("--out")
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("fused") && err.contains("--format peft"), "{err}");
    assert!(!tmp.path().join("out").exists(), "nothing written");
}
