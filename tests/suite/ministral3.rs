//! Ministral 3 (issue 22, item 3), alone (`ministral3`) and inside the vision-language wrapper
//! (`mistral3`, both key layouts), against transformers 5.25 + PEFT 0.22 (tests/fixtures/mistral3,
//! made by scripts/reference/make_mistral3_fixtures.py): logits on a row that runs far past the
//! tiny `original_max_position_embeddings` (YaRN and the query temperature in effect), a
//! left-padded batch with generate's position ids, tied and untied heads, greedy generation with
//! the KV cache, and PEFT adapters' logits, loss and LoRA gradients.

use burn::tensor::ElementConversion;
use serde_json::Value;
use temper::export::Adapter;
use temper::lora::apply_adapter;
use temper::model::config::{HfConfig, QueryScale};
use temper::model::generate::{generate, SamplingConfig};
use temper::model::{load_model, CausalLm, WeightPrecision};
use temper::ops::loss::{nll_sum, shift_labels};
use temper::ops::{TemperAutodiff, TemperBackend};

use crate::common::{
    arange, f32s, fixtures, logits_at, max_abs_diff, raw_tensors, ref_ids, scale_of, worst_relative, Cpu, CpuAutodiff,
    Reference,
};

/// Logits and LoRA gradients: within 1e-4 of max(1, the largest reference value).
const TOL: f32 = 1e-4;

fn dir() -> std::path::PathBuf {
    fixtures().join("mistral3")
}

fn manifest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap()).unwrap()
}

fn model_on<B: TemperBackend>(rel: &str, device: &B::Device) -> CausalLm<B> {
    load_model::<B>(&dir().join(rel), WeightPrecision::F32, device).unwrap_or_else(|e| panic!("{rel}: {e}")).model
}

/// Every checkpoint's logits (batch, and the 100-token row where the query scale reaches 1.19)
/// within 1e-4 of transformers; the wrapper in the layout save_pretrained writes
/// (`language_model.model.*`) and in transformers 5's in-memory one (`model.language_model.*`).
#[test]
fn ministral3_logits_match_transformers() {
    check_logits_on::<Cpu>(&Default::default());
}

/// [`ministral3_logits_match_transformers`] on backend `B` (the wgpu group runs it too).
pub fn check_logits_on<B: TemperBackend>(device: &B::Device) {
    let m = manifest();
    for (name, reference) in [
        ("ministral3", "ministral3"),
        ("ministral3_tied", "ministral3_tied"),
        ("mistral3", "mistral3"),
        ("mistral3_tf5", "mistral3"),
        // The wrapper's text logits equal the text model's on every input (manifest), so its
        // long row is checked against the text model's reference.
        ("mistral3", "ministral3"),
    ] {
        let model = model_on::<B>(m["models"][name]["path"].as_str().unwrap(), device);
        let r = Reference::open(&dir().join(m["models"][reference]["reference"].as_str().unwrap()));
        for key in ["", "long."] {
            if !r.names().contains(&format!("{key}input_ids")) {
                continue;
            }
            let input = ref_ids::<B>(&r, &format!("{key}input_ids"), device);
            let [b, t] = input.dims();
            let got = logits_at(&model, input, arange(b, t), None);
            let d = max_abs_diff(&got, &r.f32(&format!("{key}logits")).0);
            assert!(d <= TOL, "{name}: {key}logits differ from transformers by {d:e}");
        }
    }
}

/// A left-padded batch as generate runs it: pads in their own segment, the real tokens of the
/// padded row at positions 0.. (so its RoPE angles and query scale restart); compared at the
/// real positions.
#[test]
fn ministral3_left_padded_batch_matches_transformers() {
    let device = Default::default();
    let m = manifest();
    for name in ["ministral3", "ministral3_tied"] {
        let model = model_on::<Cpu>(m["models"][name]["path"].as_str().unwrap(), &device);
        let r = Reference::open(&dir().join(m["models"][name]["reference"].as_str().unwrap()));
        let (worst, real, cols, _) = crate::common::padded_batch_diff(&model, &r, &device);
        assert!(real > cols, "{name}: the padded batch has real tokens in both rows");
        assert!(worst <= TOL, "{name}: left-padded logits differ by {worst:e} at real positions");
    }
}

/// The long row's loss equals transformers' `model(input_ids, labels=input_ids).loss`.
#[test]
fn ministral3_loss_matches_transformers() {
    let device = Default::default();
    let m = manifest();
    for name in ["ministral3", "ministral3_tied"] {
        let e = &m["models"][name];
        let model = model_on::<Cpu>(e["path"].as_str().unwrap(), &device);
        let r = Reference::open(&dir().join(e["reference"].as_str().unwrap()));
        let input = ref_ids::<Cpu>(&r, "long.input_ids", &device);
        let (targets, count) = shift_labels(&[r.i64("long.input_ids").0]);
        let [b, t] = input.dims();
        let hidden = model.hidden_states(input, &model.causal_context(b, t, 0), None);
        let loss = model.nll_sum(hidden, &targets).into_scalar().elem::<f32>() / count as f32;
        let want = e["loss_long"].as_f64().unwrap() as f32;
        assert!((loss - want).abs() <= TOL, "{name}: loss {loss} vs transformers {want}");
    }
}

/// The query temperature per position equals transformers' f32 values (one per block of
/// `original_max_position_embeddings` = 16 positions), and the config carries it.
#[test]
fn ministral3_query_scale_equals_transformers_per_position() {
    let m = manifest();
    let path = dir().join("models/ministral3/config.json");
    let cfg = HfConfig::from_file(&path).and_then(|hf| hf.to_decoder_config(&path)).unwrap();
    let qs = cfg.query_scale.expect("ministral3 has a query scale");
    assert_eq!(qs, QueryScale { beta: 0.1, original_max_position_embeddings: 16.0 });
    let want = m["models"]["ministral3"]["query_scale_long"]["per_block_of_16_positions"].as_array().unwrap();
    assert!(want.len() >= 7, "the fixture covers several blocks");
    for (block, w) in want.iter().enumerate() {
        let w = w.as_f64().unwrap() as f32;
        for p in [block * 16, block * 16 + 15] {
            assert_eq!(qs.factor(p), w, "query scale at position {p}");
        }
    }
    // The fixture exercises both deltas from Mistral: without them its logits move by > 1.
    let checks = &m["models"]["ministral3"]["scaling_checks"];
    assert!(checks["long_max_abs_logit_diff_llama_4_scaling_beta_0"].as_f64().unwrap() > 1.0);
    assert!(checks["long_max_abs_logit_diff_default_rope"].as_f64().unwrap() > 1.0);
}

/// Greedy generation with the KV cache (the decoded tokens' query scale at their absolute
/// positions) gives transformers' tokens.
#[test]
fn ministral3_generation_with_the_kv_cache_matches() {
    let m = manifest();
    let device = Default::default();
    let model = model_on::<Cpu>("models/ministral3", &device);
    let r = Reference::open(&dir().join(m["models"]["ministral3"]["reference"].as_str().unwrap()));
    let prompt: Vec<u32> = r.i64("long.input_ids").0[..90].iter().map(|&x| x as u32).collect();
    let want: Vec<u32> = m["models"]["ministral3"]["generate"]["new_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let cfg =
        SamplingConfig { max_new_tokens: want.len(), temperature: 0.0, stop_tokens: Vec::new(), ..Default::default() };
    let got = generate(&model, &prompt, &cfg, |_| {}).unwrap();
    assert_eq!(got, want, "greedy tokens with the KV cache");
}

/// PEFT adapters: logits, loss and every LoRA gradient within 1e-4 of PEFT's (the wrapper's
/// adapter, saved with `model.language_model.*` keys and a regex target, holds the same weights:
/// its gradients are the text model's under those names).
#[test]
fn ministral3_peft_logits_and_gradients_match() {
    check_peft_on::<CpuAutodiff>(&Default::default());
}

/// [`ministral3_peft_logits_and_gradients_match`] on backend `B`.
pub fn check_peft_on<B: TemperAutodiff>(device: &B::Device) {
    let m = manifest();
    let grads_ref = Reference::open(&dir().join(m["peft"]["ministral3"]["reference"].as_str().unwrap()));
    for name in ["ministral3", "mistral3"] {
        let e = &m["peft"][name];
        let mut model = model_on::<B>(e["base_model"].as_str().unwrap(), device);
        let adapter =
            Adapter::read(&dir().join(e["adapter"].as_str().unwrap())).unwrap_or_else(|err| panic!("{name}: {err}"));
        apply_adapter(&mut model, &adapter).unwrap_or_else(|err| panic!("{name}: {err}"));
        let r = Reference::open(&dir().join(e["reference"].as_str().unwrap()));
        let input = ref_ids::<B>(&r, "input_ids", device);
        let labels = vec![r.i64("input_ids").0];
        let logits = model.forward(input);
        let got: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
        let want = r.f32("logits").0;
        let d = max_abs_diff(&got, &want);
        assert!(d <= TOL * scale_of(&want), "{name}: adapter logits differ by {d:e} (largest {})", scale_of(&want));
        let (targets, count) = shift_labels(&labels);
        let loss = nll_sum(logits, &targets).div_scalar(count as f32);
        let value = loss.clone().into_scalar().elem::<f32>();
        let want_loss = e["loss"].as_f64().unwrap() as f32;
        assert!((value - want_loss).abs() <= TOL, "{name}: loss {value} vs PEFT {want_loss}");
        let grads = loss.backward();
        let host = crate::common::lora_grads(&mut model, &grads, name);
        let mut checked = 0;
        for (module, pair) in &host {
            // Temper names the text decoder's modules `model.layers.*` whichever layout it was
            // loaded from; PEFT's reference gradients are the text model's.
            for (which, t) in [("A", &pair.a), ("B", &pair.b)] {
                let key = format!("grad.base_model.model.{module}.lora_{which}.weight");
                assert!(grads_ref.names().contains(&key), "{name}: PEFT has no gradient {key}");
                let (want, want_shape) = grads_ref.f32(&key);
                assert_eq!(t.shape, want_shape, "{name}: {key} shape");
                let d = max_abs_diff(&t.data, &want);
                assert!(d <= TOL * scale_of(&want), "{name}: {key} differs by {d:e} (largest {})", scale_of(&want));
                checked += 1;
            }
        }
        assert_eq!(checked, e["grad_keys"].as_u64().unwrap_or(56) as usize, "{name}: every LoRA gradient checked");
    }
}

/// The config rules: the class defaults fill a bare `ministral3` (YaRN x16 over 16k, beta 0.1),
/// and the wrapper's top-level `tie_word_embeddings` wins over its text config's.
#[test]
fn ministral3_config_defaults_and_wrapper_tying() {
    let path = std::path::Path::new("config.json");
    let bare = serde_json::json!({"model_type": "ministral3", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "vocab_size": 128});
    let cfg = HfConfig::from_value(path, bare.clone()).unwrap().to_decoder_config(path).unwrap();
    assert_eq!(cfg.query_scale, Some(QueryScale { beta: 0.1, original_max_position_embeddings: 16_384.0 }));
    assert!(matches!(cfg.rope.scaling, temper::model::rope::RopeScaling::Yarn { factor, .. } if factor == 16.0));
    assert_eq!(cfg.rope.theta, 1e6);
    assert!(!cfg.tie_word_embeddings);
    assert_eq!(cfg.layer_windows, vec![None, None], "no sliding window by default");
    let wrap = |top: Option<bool>, text: Option<bool>| {
        let mut text_config = bare.clone();
        if let Some(t) = text {
            text_config["tie_word_embeddings"] = t.into();
        }
        let mut v = serde_json::json!({"model_type": "mistral3", "text_config": text_config});
        if let Some(t) = top {
            v["tie_word_embeddings"] = t.into();
        }
        HfConfig::from_value(path, v).unwrap().to_decoder_config(path).unwrap().tie_word_embeddings
    };
    assert!(wrap(Some(true), Some(false)), "the top level wins");
    assert!(!wrap(Some(false), Some(true)), "the top level wins");
    assert!(!wrap(None, Some(false)), "without a top-level flag, the text config's");
    assert!(wrap(None, Some(true)));
}

/// `temper merge` against PEFT's `merge_and_unload` (tests/fixtures/mistral3/peft/ministral3/
/// merged.safetensors, the text model's 28 adapted tensors): into the text checkpoint, and into
/// the `mistral3` wrapper in the layout save_pretrained writes (`language_model.model.*`), where
/// the same tensors change under their own names and every other tensor (vision tower,
/// projector, norms, embeddings, head) is copied byte for byte. f32: within 1e-5 of max(1, |x|).
#[test]
fn ministral3_merge_matches_peft_merge_and_unload() {
    use temper::export::{merge_model, MergeDtype, MergeInput, MergeOptions, WriteMode};
    let m = manifest();
    let want: std::collections::BTreeMap<String, Vec<f32>> =
        raw_tensors(&dir().join(m["peft"]["ministral3"]["merged"]["path"].as_str().unwrap()))
            .into_iter()
            .map(|(k, (_, b))| (k, f32s(&b)))
            .collect();
    assert_eq!(want.len(), 28);
    let tmp = tempfile::tempdir().unwrap();
    for (model, adapter, prefix) in [
        ("models/ministral3", "peft/ministral3/adapter", "model.layers."),
        ("models/mistral3", "peft/mistral3/adapter", "language_model.model.layers."),
    ] {
        let adapter_dir = dir().join(adapter);
        let input = MergeInput { adapter: Adapter::read(&adapter_dir).unwrap(), dir: adapter_dir, weight: 1.0 };
        let out = tmp.path().join(model.replace('/', "_"));
        let opts = MergeOptions { dtype: MergeDtype::Auto, untie: false };
        merge_model(&dir().join(model), &[input], opts, &out, WriteMode::Refuse, &mut |_| {})
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        let base = raw_tensors(&dir().join(model).join("model.safetensors"));
        let got = raw_tensors(&out.join("model.safetensors"));
        assert_eq!(got.keys().collect::<Vec<_>>(), base.keys().collect::<Vec<_>>(), "{model}: the base's tensors");
        let mut changed = 0;
        for (name, (shape, bytes)) in &base {
            let (got_shape, got_bytes) = &got[name];
            assert_eq!(got_shape, shape, "{model}: {name}");
            let peft_name = name.strip_prefix(prefix).map(|rest| format!("model.layers.{rest}"));
            match peft_name.as_ref().and_then(|n| want.get(n)) {
                Some(w) => {
                    let worst = worst_relative(&f32s(got_bytes), w);
                    assert!(worst <= 1e-5, "{model}: {name} differs from merge_and_unload by {worst:e}");
                    changed += 1;
                }
                None => assert!(got_bytes == bytes, "{model}: {name} is not adapted and must be copied byte for byte"),
            }
        }
        assert_eq!(changed, 28, "{model}: every adapted tensor merged");
    }
}
