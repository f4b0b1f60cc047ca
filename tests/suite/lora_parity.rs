//! LoRA against PEFT: logits with an adapter, LoRA gradients, frozen base weights, and the
//! adapter format round trip (tests/fixtures/peft, made by make_peft_fixtures.py).

use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use temper::export::Adapter;
use temper::lora::{apply_adapter, extract_adapter, inject, projections_mut, LoraConfig, LoraInit};
use temper::model::{load_model, WeightPrecision};
use temper::ops::loss::{nll_sum, shift_labels};
use temper::ops::{TemperAutodiff, TemperBackend};

use crate::common::{fixtures, manifest, max_abs_diff, Cpu, CpuAutodiff, Reference};

const LOGITS_TOL: f32 = 1e-4;
const GRAD_TOL: f32 = 1e-4;

fn peft_names() -> Vec<String> {
    manifest()["peft"].as_object().expect("peft").keys().cloned().collect()
}

fn batch<B: burn::tensor::backend::Backend>(r: &Reference, device: &B::Device) -> (Tensor<B, 2, Int>, Vec<Vec<i64>>) {
    let (ids, shape) = r.i64("input_ids");
    let (labels, _) = r.i64("labels");
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [shape[0], shape[1]]), device);
    (input, labels.chunks(shape[1]).map(<[i64]>::to_vec).collect())
}

#[test]
fn logits_with_peft_adapters_match_peft() {
    check_peft_logits_on::<Cpu>(&Default::default());
}

/// Logits and loss of every PEFT fixture adapter on its base model, on backend `B`.
pub fn check_peft_logits_on<B: TemperBackend>(device: &B::Device) {
    let m = manifest();
    let names = peft_names();
    assert!(names.len() >= 10, "expected the PEFT fixtures, found {names:?}");
    for name in names {
        let e = &m["peft"][&name];
        let device = device.clone();
        let mut model =
            load_model::<B>(&fixtures().join(e["base_model"].as_str().unwrap()), WeightPrecision::F32, &device)
                .unwrap()
                .model;
        let adapter = Adapter::read(&fixtures().join(e["adapter"].as_str().unwrap())).unwrap();
        apply_adapter(&mut model, &adapter).unwrap();
        let r = Reference::open(&fixtures().join(e["reference"].as_str().unwrap()));
        let (input, labels) = batch::<B>(&r, &device);
        let logits = model.forward(input);
        let got: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
        let diff = max_abs_diff(&got, &r.f32("logits").0);
        assert!(diff <= LOGITS_TOL, "{name}: max |logit diff| with adapter {diff:e}");
        let (targets, count) = shift_labels(&labels);
        let loss = nll_sum(logits, &targets).into_scalar().elem::<f32>() / count as f32;
        let want = e["loss"].as_f64().unwrap() as f32;
        assert!((loss - want).abs() <= 1e-4, "{name}: loss {loss} vs PEFT {want}");
    }
}

#[test]
fn lora_gradients_match_peft_and_frozen_weights_get_none() {
    check_peft_grads_on::<CpuAutodiff>(&Default::default());
}

/// LoRA gradients of every PEFT fixture adapter for one batch, on backend `B`.
pub fn check_peft_grads_on<B: TemperAutodiff>(device: &B::Device) {
    let m = manifest();
    for name in peft_names() {
        let e = &m["peft"][&name];
        let device = device.clone();
        let mut model =
            load_model::<B>(&fixtures().join(e["base_model"].as_str().unwrap()), WeightPrecision::F32, &device)
                .unwrap()
                .model;
        let adapter = Adapter::read(&fixtures().join(e["adapter"].as_str().unwrap())).unwrap();
        apply_adapter(&mut model, &adapter).unwrap();
        let r = Reference::open(&fixtures().join(e["reference"].as_str().unwrap()));
        let (input, labels) = batch::<B>(&r, &device);
        let (targets, count) = shift_labels(&labels);
        let loss = nll_sum(model.forward(input), &targets).div_scalar(count as f32);
        let grads = loss.backward();
        let mut checked = 0;
        for (module, proj) in projections_mut(&mut model) {
            assert!(proj.weight.val().grad(&grads).is_none(), "{name}: frozen {module}.weight got a gradient");
            let Some(lora) = &proj.lora else { continue };
            for (which, param) in [("A", &lora.lora_a), ("B", &lora.lora_b)] {
                let key = format!(
                    "grad.base_model.model.{}.lora_{which}.weight",
                    temper::model::names::peft_module(&module, adapter.nested)
                );
                let got: Vec<f32> =
                    param.val().grad(&grads).expect("LoRA param has a gradient").into_data().to_vec().unwrap();
                let diff = max_abs_diff(&got, &r.f32(&key).0);
                assert!(diff <= GRAD_TOL, "{name}: {key} differs from PEFT by {diff:e}");
                checked += 1;
            }
        }
        assert_eq!(checked, 2 * adapter.modules.len(), "{name}: every adapted module checked");
    }
}

#[test]
fn adapter_round_trips_through_the_peft_format() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("peft/llama_rslora/adapter");
    let original = Adapter::read(&src).unwrap();
    let out = tmp.path().join("adapter");
    original.write(&out, temper::export::WriteMode::Refuse, &[]).unwrap();
    let back = Adapter::read(&out).unwrap();
    assert_eq!(back.modules, original.modules);
    assert_eq!(back.config.rank_pattern, original.config.rank_pattern);
    assert_eq!(back.config.alpha_pattern, original.config.alpha_pattern);
    assert!(back.config.use_rslora);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["target_modules"], serde_json::json!(["down_proj", "o_proj", "q_proj", "v_proj"]));
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["use_dora"], false);
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
    // Refuses to overwrite without being told to.
    assert!(original.write(&out, temper::export::WriteMode::Refuse, &[]).is_err());
}

#[test]
fn dora_and_other_unimplemented_options_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("peft/llama/adapter");
    for (key, value) in [
        ("use_dora", serde_json::json!(true)),
        ("bias", serde_json::json!("all")),
        ("modules_to_save", serde_json::json!(["lm_head"])),
    ] {
        let dir = tmp.path().join(key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join("adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
        cfg[key] = value;
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
        let err = Adapter::read(&dir).unwrap_err().to_string();
        assert!(err.contains("adapter_config.json") && err.contains(key), "{err}");
    }
}

#[test]
fn adapter_for_another_model_is_refused() {
    let device = Default::default();
    let mut model = load_model::<Cpu>(&fixtures().join("models/qwen2"), WeightPrecision::F32, &device).unwrap().model;
    let adapter = Adapter::read(&fixtures().join("peft/phi3/adapter")).unwrap();
    let err = apply_adapter(&mut model, &adapter).unwrap_err().to_string();
    assert!(err.contains("another base model"), "{err}");
}

#[test]
fn adapters_exported_by_temper_give_peft_logits() {
    // tests/fixtures/temper_export: adapters written by `temper train`, loaded by PEFT in
    // scripts/reference/check_temper_export.py, which recorded PEFT's logits (and checked that
    // every tensor landed, and no other LoRA layer was made: on the vision-language models, PEFT
    // took Temper's model.language_model.* keys and left the vision tower alone).
    let root = fixtures().join("temper_export");
    for name in ["llama", "phi3", "qwen3", "gemma3_vlm", "mistral3_vlm"] {
        let device = Default::default();
        let mut model =
            load_model::<Cpu>(&fixtures().join("models").join(name), WeightPrecision::F32, &device).unwrap().model;
        let r = Reference::open(&root.join(name).join("peft_logits.safetensors"));
        let (ids, shape) = r.i64("input_ids");
        let input = || Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids.clone(), [shape[0], shape[1]]), &device);
        let base_logits: Vec<f32> = model.forward(input()).into_data().to_vec().unwrap();
        apply_adapter(&mut model, &Adapter::read(&root.join(name).join("adapter")).unwrap()).unwrap();
        let got: Vec<f32> = model.forward(input()).into_data().to_vec().unwrap();
        let want = r.f32("logits").0;
        let diff = max_abs_diff(&got, &want);
        assert!(diff <= LOGITS_TOL, "{name}: temper vs PEFT with temper's adapter: {diff:e}");
        assert!(max_abs_diff(&base_logits, &want) > 1e-2, "{name}: the exported adapter must change the logits");
    }
}

/// An adapter Temper trains on a vision-language model's text decoder carries exactly the keys
/// PEFT writes for that model (`base_model.model.model.language_model.layers.*`), and a target
/// that PEFT resolves against the whole model (so it cannot match the vision tower's q_proj).
#[test]
fn adapters_on_vision_language_models_use_peft_module_names() {
    for name in ["gemma3_vlm", "mistral3_vlm"] {
        let device = Default::default();
        let mut model =
            load_model::<Cpu>(&fixtures().join("models").join(name), WeightPrecision::F32, &device).unwrap().model;
        let cfg = LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() };
        inject(&mut model, &cfg, 1).unwrap();
        let adapter = extract_adapter(&mut model, &cfg, name).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        adapter.write(&tmp.path().join("a"), temper::export::WriteMode::Refuse, &[]).unwrap();
        let keys = |dir: &std::path::Path| {
            let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
            let mut k: Vec<String> =
                safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(String::from).collect();
            k.sort();
            k
        };
        let peft = fixtures().join(format!("peft/{name}/adapter"));
        assert_eq!(keys(&tmp.path().join("a")), keys(&peft), "{name}");
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("a/adapter_config.json")).unwrap()).unwrap();
        let re = regex::Regex::new(written["target_modules"].as_str().unwrap()).unwrap();
        assert!(re.is_match("model.language_model.layers.0.self_attn.q_proj"));
        assert!(!re.is_match("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"));
        // Read back: Temper's own names again, and the same weights.
        let back = Adapter::read(&tmp.path().join("a")).unwrap();
        assert!(back.nested && back.modules == adapter.modules, "{name}");
        // A PEFT regex written for the whole model selects the same projections in a recipe.
        let mut again =
            load_model::<Cpu>(&fixtures().join("models").join(name), WeightPrecision::F32, &device).unwrap().model;
        let peft_cfg = Adapter::read(&peft).unwrap().config;
        let targeted =
            inject(&mut again, &LoraConfig { init_lora_weights: LoraInit::Flag(true), ..peft_cfg }, 1).unwrap();
        assert_eq!(targeted.len(), adapter.modules.len(), "{name}");
    }
}

/// Naming lm_head on a model whose head is tied to the embeddings is refused, not dropped.
#[test]
fn lm_head_target_on_a_tied_model_is_refused() {
    let device = Default::default();
    let mut model = load_model::<Cpu>(&fixtures().join("models/qwen2"), WeightPrecision::F32, &device).unwrap().model;
    assert!(model.lm_head.is_none());
    let cfg = LoraConfig {
        target_modules: temper::lora::TargetModules::List(vec!["q_proj".into(), "lm_head".into()]),
        ..Default::default()
    };
    let err = inject(&mut model, &cfg, 1).unwrap_err().to_string();
    assert!(err.contains("lm_head") && err.contains("tie_word_embeddings"), "{err}");
    let mut untied = load_model::<Cpu>(&fixtures().join("models/llama"), WeightPrecision::F32, &device).unwrap().model;
    assert!(inject(&mut untied, &cfg, 1).unwrap().contains(&"lm_head".to_string()));
}
