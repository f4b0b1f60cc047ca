//! DeepSeek-V2 / V3 / V3.2 and Kimi K2 (issue 22, items 1-2): multi-head latent attention with
//! and without the query latent, DeepSeek's routers (sigmoid scores with a selection bias and
//! group limits; V2's softmax greedy and group-limited greedy), shared experts and dense first
//! layers, against transformers 5.25 + PEFT 0.22 (tests/fixtures/deepseek, made by
//! scripts/reference/make_deepseek_fixtures.py): logits, router choices per token, a left-padded
//! batch, the loss, greedy generation with the KV cache, PEFT adapters' logits and LoRA
//! gradients (experts included), merge against `merge_and_unload`, and a 10-step training curve.

use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use serde_json::Value;
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

/// Every model of the fixture set, with transformers' logits.
const MODELS: &[&str] = &["deepseek_v3", "deepseek_v3_qlora", "deepseek_v2", "deepseek_v2_group", "deepseek_v32"];

fn dir() -> std::path::PathBuf {
    fixtures().join("deepseek")
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

/// Kimi K2's config (model_type `kimi_k2`, the auto_map of its Hub repo) beside
/// deepseek_v3_qlora's weights, in a temporary folder.
fn kimi_k2_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir().join("models/kimi_k2_config.json"), tmp.path().join("config.json")).unwrap();
    let weights = dir().join(manifest()["models"]["deepseek_v3_qlora"]["path"].as_str().unwrap());
    std::fs::copy(weights.join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    tmp
}

/// Every model's logits (a 2x40 batch; the 100-token row where V3.2's indexer would drop keys
/// is refused instead) within 1e-4 of transformers, and Kimi K2's config name read as
/// DeepSeek-V3.
#[test]
fn deepseek_logits_match_transformers() {
    check_logits_on::<Cpu>(&Default::default());
}

/// [`deepseek_logits_match_transformers`] on backend `B` (the wgpu group runs it too).
pub fn check_logits_on<B: TemperBackend>(device: &B::Device) {
    let kimi = kimi_k2_dir();
    let mut cases: Vec<(String, CausalLm<B>, Reference)> =
        MODELS.iter().map(|&n| (n.to_string(), model_on::<B>(n, device), reference(n))).collect();
    cases.push(("kimi_k2".into(), model_at::<B>(kimi.path(), device), reference("deepseek_v3_qlora")));
    for (name, model, r) in cases {
        for key in ["batch.", "long."] {
            let input = ref_ids::<B>(&r, &format!("{key}input_ids"), device);
            let [b, t] = input.dims();
            if let Err(e) = model.config.check_length(t, "the row") {
                assert_eq!(name, "deepseek_v32", "{name}: only V3.2 limits the length ({e})");
                assert!(e.to_string().contains("index_topk = 64"), "{name}: the limit is named: {e}");
                continue;
            }
            let got = logits_at(&model, input, arange(b, t), None);
            let want = r.f32(&format!("{key}logits")).0;
            let d = max_abs_diff(&got, &want);
            assert!(d <= TOL * scale_of(&want), "{name}: {key}logits differ from transformers by {d:e}");
        }
    }
}

/// Per token and sparse layer, the experts DeepSeek's routers choose equal transformers'
/// (as sets: its top-k is unsorted); the fixture's selection bias and group limits change the
/// choice for some tokens, so a router without them would fail.
#[test]
fn deepseek_router_choices_match_transformers() {
    let device = Default::default();
    let m = manifest();
    for name in MODELS {
        let model = model_on::<Cpu>(name, &device);
        let r = reference(name);
        let input = ref_ids::<Cpu>(&r, "batch.input_ids", &device);
        let [b, t] = input.dims();
        let ctx = model.causal_context(b, t, 0).recording_router();
        model.hidden_states(input, &ctx, None);
        let layers = ctx.router.as_ref().unwrap().borrow();
        let sparse: Vec<usize> =
            model.model.layers.iter().enumerate().filter(|(_, l)| l.moe.is_some()).map(|(i, _)| i).collect();
        assert_eq!(layers.len(), sparse.len(), "{name}: one routing per sparse layer");
        assert!(!sparse.contains(&0), "{name}: layer 0 is dense (first_k_dense_replace)");
        for (routing, &layer) in layers.iter().zip(&sparse) {
            let (want, shape) = r.i64(&format!("router.layer{layer}"));
            assert_eq!(routing.experts.len(), shape[0], "{name}: layer {layer} tokens");
            for (tok, (got, want)) in routing.experts.iter().zip(want.chunks(shape[1])).enumerate() {
                let mut got: Vec<i64> = got.iter().map(|&e| e as i64).collect();
                got.sort_unstable();
                assert_eq!(got, want, "{name}: layer {layer} token {tok} experts");
            }
        }
    }
    // The fixture exercises what it claims: the bias and the group limits change choices.
    for (name, keys) in [
        ("deepseek_v3", &["tokens_changed_if_bias_zeroed"][..]),
        ("deepseek_v3_qlora", &["tokens_changed_if_bias_zeroed", "tokens_changed_if_group_limit_removed"][..]),
        ("deepseek_v2_group", &["tokens_changed_if_group_limit_removed"][..]),
    ] {
        for key in keys {
            let changed: u64 = m["models"][name]["router_changes_batch"]
                .as_object()
                .unwrap()
                .values()
                .map(|l| l[*key].as_u64().unwrap())
                .sum();
            assert!(changed > 0, "{name}: {key} is {changed}");
        }
    }
}

/// A left-padded batch as generate runs it: pads in their own segment, the real tokens of the
/// padded row at positions 0..; compared at the real positions.
#[test]
fn deepseek_left_padded_batch_matches_transformers() {
    let device = Default::default();
    for name in ["deepseek_v3", "deepseek_v3_qlora", "deepseek_v2"] {
        let model = model_on::<Cpu>(name, &device);
        let r = reference(name);
        let (worst, real, cols, scale) = crate::common::padded_batch_diff(&model, &r, &device);
        assert!(real > cols, "{name}: the padded batch has real tokens in both rows");
        assert!(worst <= TOL * scale, "{name}: left-padded logits differ by {worst:e} at real positions");
    }
}

/// The long row's loss equals transformers' `model(input_ids, labels=input_ids).loss`.
#[test]
fn deepseek_loss_matches_transformers() {
    let device = Default::default();
    let m = manifest();
    for name in ["deepseek_v3", "deepseek_v3_qlora", "deepseek_v2", "deepseek_v2_group"] {
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

/// Greedy generation with the KV cache (expanded keys and values) gives transformers' tokens
/// (which it decodes from its compressed-latent cache), and every cached step's logits equal
/// the full pass's.
#[test]
fn deepseek_generation_with_the_kv_cache_matches() {
    let m = manifest();
    let device = Default::default();
    for name in ["deepseek_v3", "deepseek_v3_qlora", "deepseek_v2"] {
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
        // Cached decode = full pass, logit by logit, over prompt + generated tokens.
        let all: Vec<i64> = prompt.iter().chain(&got).map(|&x| x as i64).collect();
        let n = all.len();
        let full: Vec<f32> = model
            .forward(Tensor::from_data(TensorData::new(all.clone(), [1, n]), &device))
            .into_data()
            .to_vec()
            .unwrap();
        let mut cache = temper::model::KvCache::new(model.config.num_layers);
        let vocab = model.config.vocab_size;
        for (start, end) in [(0, 90), (90, 91), (91, 95), (95, n)] {
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

/// PEFT adapters on MLA (`q_proj` or `q_a_proj` / `q_b_proj`, `kv_a_proj_with_mqa`,
/// `kv_b_proj`, `o_proj`), the dense MLP, the shared experts and (deepseek_v3_qlora) the routed
/// experts through `target_parameters`: logits, loss and every LoRA gradient within 1e-4.
#[test]
fn deepseek_peft_logits_and_gradients_match() {
    check_peft_on::<CpuAutodiff>(&Default::default());
}

/// [`deepseek_peft_logits_and_gradients_match`] on backend `B`.
pub fn check_peft_on<B: TemperAutodiff>(device: &B::Device) {
    let m = manifest();
    for name in ["deepseek_v3", "deepseek_v3_qlora", "deepseek_v2"] {
        let e = &m["peft"][name];
        let path = |key: &str| dir().join(e[key].as_str().unwrap());
        let want_loss = e["loss"].as_f64().unwrap() as f32;
        let grads = true;
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

/// `temper merge` of the deepseek_v3_qlora adapter (MLA, dense MLP, shared and routed experts)
/// against PEFT's `merge_and_unload`: the adapted tensors within 1e-5 of max(1, |x|), every
/// other tensor (norms, routers, the selection bias, embeddings, head) byte for byte.
#[test]
fn deepseek_merge_matches_peft_merge_and_unload() {
    let m = manifest();
    let e = &m["peft"]["deepseek_v3_qlora"];
    let merged = dir().join(e["merged"]["path"].as_str().unwrap());
    let want = raw_tensors(&merged);
    assert!(!want.is_empty());
    let path = |key: &str| dir().join(e[key].as_str().unwrap());
    crate::common::check_merge_matches_peft(&path("base_model"), &path("adapter"), &merged);
}

/// Ten AdamW steps of LoRA on the Moonlight-shaped model reproduce PyTorch + PEFT's curve.
#[test]
fn deepseek_ten_step_curve_matches_pytorch() {
    crate::train_parity::run_with::<CpuAutodiff>("deepseek/deepseek_v3_train", false, 5e-4, &Default::default());
}

/// The config rules: the class defaults, `kimi_k2` read as DeepSeek-V3, V2's routers, and the
/// refusals (groups that do not divide the experts, an unknown V2 top-k method, V3.2 without
/// the query latent), each naming its key.
#[test]
fn deepseek_config_defaults_and_refusals() {
    let path = std::path::Path::new("config.json");
    let base = serde_json::json!({"model_type": "deepseek_v3", "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 128, "moe_intermediate_size": 32});
    let derive = |v: Value| HfConfig::from_value(path, v).and_then(|hf| hf.to_decoder_config(path));
    let cfg = derive(base.clone()).unwrap();
    let mla = cfg.mla.clone().expect("MLA");
    assert_eq!(
        (mla.q_lora_rank, mla.kv_lora_rank, mla.nope_dim, mla.rope_dim, mla.v_dim),
        (Some(1536), 512, 128, 64, 128)
    );
    assert_eq!((cfg.head_dim, cfg.num_kv_heads), (64, 4), "rotary tables over the rope dims; one key per head");
    assert!((cfg.attn_scale - 1.0 / 192f64.sqrt()).abs() < 1e-12);
    let moe = cfg.moe.clone().expect("MoE");
    assert_eq!(moe.routing, Routing::SigmoidGrouped { groups: 8, topk_group: 4 });
    assert_eq!((moe.num_experts, moe.top_k, moe.routed_scaling), (256, 8, 2.5));
    assert_eq!(moe.sparse_layers, vec![false, false, false, true], "first_k_dense_replace 3");
    assert_eq!(moe.shared_expert_intermediate, Some(32));
    let mut q_proj = base.clone();
    q_proj["q_lora_rank"] = Value::Null;
    assert_eq!(derive(q_proj).unwrap().mla.unwrap().q_lora_rank, None, "null selects q_proj");
    let mut kimi = base.clone();
    kimi["model_type"] = "kimi_k2".into();
    assert_eq!(derive(kimi).unwrap().model_type, "deepseek_v3");
    let mut v2 = base.clone();
    v2["model_type"] = "deepseek_v2".into();
    v2["num_experts_per_tok"] = 6.into();
    v2["n_routed_experts"] = 64.into();
    let cfg2 = derive(v2.clone()).unwrap();
    let moe2 = cfg2.moe.unwrap();
    assert_eq!(moe2.routing, Routing::SoftmaxGrouped { groups: 1, topk_group: 1 });
    assert!(!moe2.norm_topk_prob && moe2.routed_scaling == 1.0 && moe2.shared_expert_intermediate == Some(64));
    assert!(moe2.sparse_layers.iter().all(|&s| s), "V2 default: no dense layers");
    let refused = |v: Value, key: &str| {
        let e = derive(v).expect_err("refused").to_string();
        assert!(e.contains(key), "the error names {key}: {e}");
    };
    let mut bad = base.clone();
    bad["n_group"] = 3.into();
    refused(bad, "n_group");
    let mut bad = v2;
    bad["topk_method"] = "noaux_tc".into();
    refused(bad, "topk_method");
    let mut bad = base;
    bad["model_type"] = "deepseek_v32".into();
    bad["q_lora_rank"] = Value::Null;
    refused(bad, "q_lora_rank");
}

/// `temper train` from a recipe on a DeepSeek-V3 checkpoint (all-linear plus the routed experts
/// through `target_parameters`), then `temper generate` with the adapter; the adapter holds the
/// MLA projections, the shared experts and PEFT's 3-D expert pairs, and no router. DeepSeek-V3.2
/// with `seq_len` past its `index_topk` is refused before training, the limit named.
#[test]
fn recipe_trains_deepseek_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest();
    let model = tmp.path().join("deepseek_v3_qlora");
    crate::common::with_stories_vocab(&dir().join(m["models"]["deepseek_v3_qlora"]["path"].as_str().unwrap()), &model);
    let run = tmp.path().join("run");
    let experts = "  target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]\n  lora_dropout: 0.0\n";
    let o = crate::common::train_stories(&model, &run, 96, experts);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names: Vec<String> = raw_tensors(&run.join("adapter/adapter_model.safetensors")).into_keys().collect();
    let has = |s: &str| names.iter().any(|k| k.contains(s));
    for part in [
        "layers.0.self_attn.q_a_proj.lora_A",
        "layers.0.self_attn.q_b_proj.lora_B",
        "layers.1.self_attn.kv_a_proj_with_mqa.lora_A",
        "layers.1.self_attn.kv_b_proj.lora_B",
        "layers.3.self_attn.o_proj.lora_A",
        "layers.0.mlp.down_proj.lora_A",
        "layers.1.mlp.shared_experts.gate_proj.lora_A",
        "layers.1.mlp.experts.base_layer.lora_A",
        "layers.1.mlp.experts.lora_B",
    ] {
        assert!(has(part), "{part} in {names:?}");
    }
    assert!(!has("mlp.gate.") && !has("e_score"), "no router LoRA unless asked: {names:?}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_temper"))
        .args(["generate", "--model", model.to_str().unwrap(), "--adapter", run.join("adapter").to_str().unwrap()])
        .args(["--prompt", "Once upon a time", "--max-new-tokens", "8", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // V3.2: 96 tokens per row is past the fixture's index_topk of 64.
    let v32 = tmp.path().join("deepseek_v32");
    crate::common::with_stories_vocab(&dir().join(m["models"]["deepseek_v32"]["path"].as_str().unwrap()), &v32);
    let o = crate::common::train_stories(&v32, &tmp.path().join("run32"), 96, "");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("data.seq_len") && err.contains("index_topk = 64"), "{err}");
    let o = crate::common::train_stories(&v32, &tmp.path().join("run32b"), 64, "");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
