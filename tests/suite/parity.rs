//! Logits and losses of every supported architecture against transformers (tests/fixtures,
//! made by scripts/reference/make_fixtures.py).

use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use temper::model::{load_model, WeightPrecision};
use temper::ops::loss::{nll_sum, shift_labels};
use temper::ops::TemperBackend;

use crate::common::{fixtures, manifest, max_abs_diff, Cpu, Reference};

const LOGITS_TOL: f32 = 1e-4;

fn check_fixture(name: &str) {
    check_fixture_on::<Cpu>(name, &Default::default());
}

/// Logits and loss of fixture `name` on backend `B` against transformers.
pub fn check_fixture_on<B: TemperBackend>(name: &str, device: &B::Device) {
    let m = manifest();
    let entry = &m["models"][name];
    let dir = fixtures().join(entry["path"].as_str().expect("path"));
    let loaded = load_model::<B>(&dir, WeightPrecision::F32, device).unwrap_or_else(|e| panic!("{name}: {e}"));
    let reference = Reference::open(&fixtures().join(entry["reference"].as_str().expect("reference")));
    let (ids, shape) = reference.i64("input_ids");
    let (want, _) = reference.f32("logits");
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [shape[0], shape[1]]), device);
    let logits = loaded.model.forward(input);
    let got: Vec<f32> = logits.clone().into_data().to_vec().expect("f32 logits");
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= LOGITS_TOL, "{name}: max |logit diff| = {diff:e} > {LOGITS_TOL:e}");

    let rows: Vec<Vec<i64>> = ids.chunks(shape[1]).map(<[i64]>::to_vec).collect();
    let (targets, count) = shift_labels(&rows);
    let loss = nll_sum(logits, &targets).into_scalar().elem::<f32>() / count as f32;
    let want_loss = entry["loss"].as_f64().expect("loss") as f32;
    assert!((loss - want_loss).abs() <= 1e-4, "{name}: loss {loss} vs transformers {want_loss}");
}

macro_rules! parity_tests {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                check_fixture($name);
            }
        )*
    };
}

parity_tests! {
    llama_logits_match_transformers => "llama",
    llama_tied_bias_llama3_rope_logits_match_transformers => "llama_tied_bias",
    llama_linear_rope_logits_match_transformers => "llama_linear_rope",
    mistral_sliding_window_logits_match_transformers => "mistral",
    qwen2_logits_match_transformers => "qwen2",
    qwen3_yarn_logits_match_transformers => "qwen3",
    gemma_logits_match_transformers => "gemma",
    gemma2_softcap_logits_match_transformers => "gemma2",
    phi3_fused_logits_match_transformers => "phi3",
    granite_multipliers_logits_match_transformers => "granite",
    smollm3_nope_layers_logits_match_transformers => "smollm3",
    phi3_longrope_partial_rotary_logits_match_transformers => "phi3_longrope",
    llama_dynamic_ntk_rope_logits_match_transformers => "llama_dynamic_rope",
    olmo2_post_norms_logits_match_transformers => "olmo2",
    gemma3_local_global_rope_logits_match_transformers => "gemma3_text",
    olmo3_sliding_layers_logits_match_transformers => "olmo3",
    gemma3_vision_language_text_logits_match_transformers => "gemma3_vlm",
    mistral3_vision_language_text_logits_match_transformers => "mistral3_vlm",
    bf16_checkpoint_logits_match_transformers => "llama_bf16",
    f16_checkpoint_logits_match_transformers => "llama_f16",
    sharded_checkpoint_logits_match_transformers => "llama_sharded",
}

#[test]
fn every_fixture_model_has_a_parity_test() {
    let m = manifest();
    let names: Vec<&String> = m["models"].as_object().expect("models").keys().collect();
    assert_eq!(
        names.len(),
        22,
        "a fixture was added or removed: update parity_tests! or the llama_deep test ({names:?})"
    );
}

/// 30 layers, a 32k vocabulary, f16 weights (loaded as f32), tied head: deep and wide enough
/// that a less precise reduction shows. A sequential f32 sum over the vocabulary (burn-flex
/// without `simd`) puts the loss 1.2e-4 from float64; transformers' own f32 loss is 8.4e-6 from
/// it (`loss_f32_minus_f64` in the manifest). Both of Temper's loss paths (the chunked one that
/// training and `temper eval` use, and log-softmax over full logits) must stay within 5e-6
/// (measured: 4.3e-7).
#[test]
fn deep_wide_model_keeps_f32_accuracy_against_float64() {
    const LOSS_TOL: f64 = 5e-6;
    let m = manifest();
    let entry = &m["models"]["llama_deep"];
    let device = Default::default();
    let model = load_model::<Cpu>(&fixtures().join(entry["path"].as_str().unwrap()), WeightPrecision::F32, &device)
        .unwrap()
        .model;
    let reference = Reference::open(&fixtures().join(entry["reference"].as_str().unwrap()));
    let (ids, shape) = reference.i64("input_ids");
    let (b, t) = (shape[0], shape[1]);
    let input = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids.clone(), [b, t]), &device);
    let hidden = model.hidden_states(input, &model.causal_context(b, t, 0), None);
    let logits = model.logits(hidden.clone());
    let (want, want_shape) = reference.f32("logits");
    let tail = want_shape[1];
    let got: Vec<f32> = logits.clone().slice([0..b, t - tail..t]).into_data().to_vec().unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= LOGITS_TOL, "llama_deep: max |logit diff| over the last {tail} positions = {diff:e}");
    let rows: Vec<Vec<i64>> = ids.chunks(t).map(<[i64]>::to_vec).collect();
    let (targets, count) = shift_labels(&rows);
    let f64_loss = entry["loss_f64"].as_f64().unwrap();
    let chunked = model.nll_sum(hidden, &targets).into_scalar() as f64 / count as f64;
    let plain = nll_sum(logits, &targets).into_scalar() as f64 / count as f64;
    for (what, loss) in [("chunked cross-entropy", chunked), ("log_softmax", plain)] {
        let d = (loss - f64_loss).abs();
        eprintln!("llama_deep {what}: loss {loss} vs float64 {f64_loss} (|diff| {d:e})");
        assert!(d <= LOSS_TOL, "llama_deep {what}: loss {loss} is {d:e} from float64 {f64_loss}");
    }
}

/// Decoding with the KV cache (a prompt, then one token at a time) gives the logits of one
/// full forward pass, for every architecture (sliding windows and soft-capping included).
#[test]
fn kv_cache_decoding_matches_full_forward_for_every_fixture() {
    let m = manifest();
    for name in m["models"].as_object().unwrap().keys() {
        // Dynamic NTK recomputes theta from each call's last position, so a cache filled by
        // shorter calls holds keys rotated with other frequencies than one full pass uses (in
        // transformers too): the two are not meant to agree. LongRoPE is checked (its prompt
        // reaches past the switch to the long factors).
        if name != "llama_dynamic_rope" {
            check_kv_cache_on::<Cpu>(name, &Default::default());
        }
    }
}

/// Prompt of 5 tokens, then one token at a time, against one full pass, on backend `B`.
pub fn check_kv_cache_on<B: TemperBackend>(name: &str, device: &B::Device) {
    use temper::model::KvCache;
    let m = manifest();
    let entry = &m["models"][name];
    {
        let device = device.clone();
        let model = load_model::<B>(&fixtures().join(entry["path"].as_str().unwrap()), WeightPrecision::F32, &device)
            .unwrap()
            .model;
        let reference = Reference::open(&fixtures().join(entry["reference"].as_str().unwrap()));
        let (ids, shape) = reference.i64("input_ids");
        let row: Vec<i64> = ids[..shape[1]].to_vec();
        let t = row.len();
        let full: Vec<f32> = model
            .forward(Tensor::<B, 2, Int>::from_data(TensorData::new(row.clone(), [1, t]), &device))
            .into_data()
            .to_vec()
            .unwrap();
        let mut cache = KvCache::new(model.config.num_layers);
        let mut got = Vec::new();
        // LongRoPE switches to its long factors once a call reaches past the original context:
        // the prompt does, as the full pass does.
        let prompt = match &model.config.rope.scaling {
            temper::model::rope::RopeScaling::LongRope { original_max_position_embeddings, .. } => {
                original_max_position_embeddings + 1
            }
            _ => 5,
        };
        for (start, len) in std::iter::once((0, prompt)).chain((prompt..t).map(|i| (i, 1))) {
            let piece =
                Tensor::<B, 2, Int>::from_data(TensorData::new(row[start..start + len].to_vec(), [1, len]), &device);
            let ctx = model.causal_context(1, len, cache.len);
            let logits = model.logits(model.hidden_states(piece, &ctx, Some(&mut cache)));
            got.extend(logits.into_data().to_vec::<f32>().unwrap());
        }
        let diff = max_abs_diff(&got, &full);
        assert!(diff <= LOGITS_TOL, "{name}: cached decoding differs from the full pass by {diff:e}");
    }
}

/// Granite's and SmolLM3's own keys are validated with the key named.
#[test]
fn granite_and_smollm3_config_errors_name_the_key() {
    use temper::model::config::HfConfig;
    let load = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let path = fixtures().join(format!("models/{name}/config.json"));
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut v);
        let hf: HfConfig = serde_json::from_value(v).unwrap();
        hf.to_decoder_config(&path).map(|c| (c.layer_rope, c.residual_scale, c.logits_divisor))
    };
    assert_eq!(load("smollm3", &|_| {}).unwrap(), (vec![true, false, true, false], None, None));
    assert_eq!(load("granite", &|_| {}).unwrap(), (vec![true; 2], Some(0.4), Some(2.5)));
    let e = load("smollm3", &|v| v["no_rope_layers"] = serde_json::json!([1, 0])).unwrap_err().to_string();
    assert!(e.contains("no_rope_layers") && e.contains("2 entries for 4 layers"), "{e}");
    let e = load("granite", &|v| v["logits_scaling"] = serde_json::json!(0.0)).unwrap_err().to_string();
    assert!(e.contains("logits_scaling") && e.contains("non-zero"), "{e}");
}

/// Gemma 3 and OLMo 3 put their sliding layers on a RoPE of their own; Gemma 3 checkpoints from
/// the Hub leave out every key equal to Gemma3TextConfig's default, and transformers 5 keys
/// `rope_parameters` by layer type.
#[test]
fn gemma3_and_olmo3_configs_resolve_local_and_global_rope() {
    use temper::model::config::HfConfig;
    use temper::model::rope::RopeScaling;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let load = |v: serde_json::Value| {
        std::fs::write(&path, v.to_string()).unwrap();
        HfConfig::from_file(&path).and_then(|hf| hf.to_decoder_config(&path))
    };
    // google/gemma-3-4b-it's config.json: the text_config has only these keys.
    let c = load(serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model"}
    }))
    .unwrap();
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size), (8, 4, 256, 262_208));
    assert_eq!(c.composite.as_deref(), Some("gemma3"));
    assert_eq!(c.eos_token_ids, vec![1, 106]);
    assert!(c.tie_word_embeddings && c.qk_norm && c.sandwich_norms);
    assert!((c.attn_scale - 1.0 / 16.0).abs() < 1e-12);
    let global: Vec<usize> = (0..34).filter(|&i| c.layer_windows[i].is_none()).collect();
    assert_eq!(global, vec![5, 11, 17, 23, 29], "every 6th layer is global");
    assert!(c.layer_windows.iter().flatten().all(|&w| w == 1024));
    assert_eq!((c.rope.theta, &c.rope.scaling), (1e6, &RopeScaling::Linear { factor: 8.0 }));
    let local = c.local_rope.clone().unwrap();
    assert_eq!((local.theta, &local.scaling), (10_000.0, &RopeScaling::Default));

    // transformers 5: rope_parameters per layer type.
    let c = load(serde_json::json!({
        "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 100,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    }))
    .unwrap();
    assert_eq!((c.rope.theta, &c.rope.scaling), (1e6, &RopeScaling::Linear { factor: 8.0 }));
    assert_eq!(c.local_rope.as_ref().map(|r| r.theta), Some(10_000.0));
    assert_eq!(c.layer_windows, vec![Some(4096), None]);

    // OLMo 3: the sliding layers keep the theta, without the scaling.
    let c = load(serde_json::json!({
        "model_type": "olmo3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
        "vocab_size": 100, "sliding_window": 4096, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192}
    }))
    .unwrap();
    assert_eq!(
        c.layer_windows.iter().map(Option::is_some).collect::<Vec<_>>(),
        [true, true, true, false, true, true, true, false]
    );
    assert_eq!(c.local_rope.map(|r| (r.theta, r.scaling)), Some((500000.0, RopeScaling::Default)));

    let e = load(serde_json::json!({"model_type": "gemma3", "vision_config": {}})).unwrap_err().to_string();
    assert!(e.contains("text_config"), "{e}");
    let e = load(serde_json::json!({"model_type": "gemma3_text", "use_bidirectional_attention": true}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("use_bidirectional_attention"), "{e}");
}

/// The other vision-language layout (`model.language_model.*`, `model.vision_tower.*`,
/// `lm_head`: the live transformers module names, as newer transformers may save them): the
/// gemma3 and mistral3 fixtures with their tensors renamed so load to the same logits, and a
/// merge keeps the renamed layout.
#[test]
fn vision_language_checkpoints_in_the_nested_layout_load_and_merge() {
    use safetensors::SafeTensors;
    for name in ["gemma3_vlm", "mistral3_vlm"] {
        let src = fixtures().join("models").join(name);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested");
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let rename = |k: &str| {
            if let Some(rest) = k.strip_prefix("language_model.model.") {
                format!("model.language_model.{rest}")
            } else if let Some(rest) = k.strip_prefix("language_model.") {
                rest.to_string()
            } else {
                format!("model.{k}")
            }
        };
        let views: Vec<(String, safetensors::tensor::TensorView)> =
            st.tensors().into_iter().map(|(k, v)| (rename(&k), v)).collect();
        assert!(views.iter().any(|(k, _)| k == "model.language_model.embed_tokens.weight"));
        std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
        let device = Default::default();
        let model =
            load_model::<Cpu>(&dir, WeightPrecision::F32, &device).unwrap_or_else(|e| panic!("{name}: {e}")).model;
        let entry = &manifest()["models"][name];
        let reference = Reference::open(&fixtures().join(entry["reference"].as_str().unwrap()));
        let (ids, shape) = reference.i64("input_ids");
        let got: Vec<f32> = model
            .forward(Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [shape[0], shape[1]]), &device))
            .into_data()
            .to_vec()
            .unwrap();
        let diff = max_abs_diff(&got, &reference.f32("logits").0);
        assert!(diff <= LOGITS_TOL, "{name} (nested layout): {diff:e}");
        // Merging PEFT's adapter keeps the nested names and changes the adapted projections.
        let adapter = fixtures().join(format!("peft/{name}/adapter"));
        let out = tmp.path().join("merged");
        let input = temper::export::MergeInput {
            adapter: temper::export::Adapter::read(&adapter).unwrap(),
            dir: adapter.clone(),
            weight: 1.0,
        };
        let opts = temper::export::MergeOptions { dtype: temper::export::MergeDtype::Auto, untie: false };
        let summary =
            temper::export::merge_model(&dir, &[input], opts, &out, temper::export::WriteMode::Refuse, &mut |_| {})
                .unwrap();
        assert_eq!(summary.merged, manifest()["peft"][name]["merged_keys"].as_array().unwrap().len(), "{name}");
        let merged = std::fs::read(out.join("model.safetensors")).unwrap();
        let m = SafeTensors::deserialize(&merged).unwrap();
        assert!(m.names().iter().all(|k| !k.starts_with("language_model.")), "{name}: layout kept");
    }
}
