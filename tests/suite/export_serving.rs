//! An adapter written by `Adapter::write` passes the checks vLLM's and mistral.rs's LoRA loaders
//! apply before serving it. The checks, from their source:
//!
//! vLLM (`vllm/lora/peft_helper.py`, `PEFTHelper.from_dict` / `_validate_features` /
//! `validate_legal`; `vllm/lora/utils.py` `parse_fine_tuned_lora_name`;
//! `vllm/lora/lora_model.py` `check_unexpected_modules`):
//! - V1 `r`, `lora_alpha`, `target_modules` present (required dataclass fields).
//! - V2 `modules_to_save` empty/None ("vLLM only supports modules_to_save being None").
//! - V3 `use_dora` false ("vLLM does not yet support DoRA").
//! - V4 `bias` "none" unless the server enables bias.
//! - V5 `r` <= `--max-lora-rank` (vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320, 512).
//! - V6 every tensor name splits as `base_model.model.<module>.lora_{A,B}.weight` (else
//!   "is unsupported LoRA weight"); `.lora_A.default.weight` is refused.
//! - V7 the last component of every module is one the model supports ("expected target
//!   modules in ... but received ...").
//!
//! mistral.rs (`mistralrs-quant/src/lora/mod.rs` `LoraConfig::validate_dynamic`,
//! `mistralrs-quant/src/lora/dynamic/loader.rs` `site_load_spec` / `validate_consumption`,
//! `mistralrs-core/src/adapter/runtime.rs` `validate_adapter_config`):
//! - M1 `peft_type` LORA; no DoRA, `bias` "none" and no `lora_bias`, no `modules_to_save`,
//!   no aLoRA / QA-LoRA / layer_replication / trainable_token_indices.
//! - M2 `init_lora_weights` a bool or a non-transforming strategy (not pissa/olora/corda/loftq).
//! - M3 `r` >= 1, `lora_alpha` finite, rank_pattern ranks >= 1, alpha_pattern finite.
//! - M4 `target_modules` non-empty, without empty names; every module with tensors is matched
//!   by it (name equal, or ending in `.<target>`) ("not declared by target_modules").
//! - M5 no adapter on lm_head ("does not support adapters targeting lm_head").
//! - M6 lora_A is `[rank_for(module), in]`, lora_B `[out, rank_for(module)]`.
//! - M7 every tensor consumed by some site; at least one site.
//! - M8 max rank (over rank_pattern too) <= 256 by default (`DEFAULT_LORA_MAX_RANK`).

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::SafeTensors;
use serde_json::Value;
use temper::export::{Adapter, WriteMode};
use temper::lora::{extract_adapter, inject, projection_names, LoraConfig, LoraInit, TargetModules};
use temper::model::{load_model, WeightPrecision};

use crate::common::{fixtures, Cpu};

const VLLM_RANKS: [usize; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];
const MISTRALRS_MAX_RANK: usize = 256;

/// Apply every check above; returns the list of violations.
fn serving_violations(dir: &Path, model_modules: &[String]) -> Vec<String> {
    let mut bad = Vec::new();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    for key in ["r", "lora_alpha", "target_modules"] {
        if cfg.get(key).is_none_or(Value::is_null) {
            bad.push(format!("V1: missing {key}"));
        }
    }
    if cfg["modules_to_save"].as_array().is_some_and(|a| !a.is_empty()) {
        bad.push("V2/M1: modules_to_save".into());
    }
    if cfg["use_dora"] == true {
        bad.push("V3/M1: use_dora".into());
    }
    if cfg.get("bias").is_some_and(|b| b != "none") || cfg["lora_bias"] == true {
        bad.push("V4/M1: bias".into());
    }
    if cfg.get("peft_type").is_some_and(|p| p != "LORA") {
        bad.push("M1: peft_type".into());
    }
    for key in ["alora_invocation_tokens", "layer_replication", "trainable_token_indices"] {
        if cfg.get(key).is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty())) {
            bad.push(format!("M1: {key}"));
        }
    }
    if cfg["use_qalora"] == true {
        bad.push("M1: use_qalora".into());
    }
    match &cfg["init_lora_weights"] {
        Value::Null | Value::Bool(_) => {}
        Value::String(s) if !["pissa", "olora", "corda", "loftq", "lora_ga"].iter().any(|p| s.to_lowercase().starts_with(p)) => {}
        other => bad.push(format!("M2: init_lora_weights {other}")),
    }
    let r = cfg["r"].as_u64().unwrap_or(0) as usize;
    let ranks: BTreeMap<String, usize> = serde_json::from_value(cfg["rank_pattern"].clone()).unwrap_or_default();
    let alphas: BTreeMap<String, f64> = serde_json::from_value(cfg["alpha_pattern"].clone()).unwrap_or_default();
    if r == 0 || !cfg["lora_alpha"].as_f64().is_some_and(f64::is_finite) || ranks.values().any(|&x| x == 0) || alphas.values().any(|a| !a.is_finite()) {
        bad.push("M3: rank / alpha".into());
    }
    if !VLLM_RANKS.iter().any(|&m| r <= m) {
        bad.push(format!("V5: rank {r} above vLLM's largest max_lora_rank"));
    }
    let max_rank = ranks.values().copied().chain([r]).max().unwrap_or(r);
    if max_rank > MISTRALRS_MAX_RANK {
        bad.push(format!("M8: rank {max_rank} > {MISTRALRS_MAX_RANK}"));
    }
    let targets: Vec<String> = match &cfg["target_modules"] {
        Value::Array(a) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Value::String(s) => vec![s.clone()],
        _ => vec![],
    };
    if targets.is_empty() || targets.iter().any(String::is_empty) {
        bad.push("M4: empty target_modules".into());
    }
    let supported: std::collections::BTreeSet<&str> = model_modules.iter().map(|m| m.rsplit('.').next().unwrap_or(m)).collect();
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut sites = 0;
    for (name, view) in st.tensors() {
        let parts: Vec<&str> = name.split('.').collect();
        let n = parts.len();
        let ok = name.starts_with("base_model.model.") && n >= 4 && parts[n - 1] == "weight" && (parts[n - 2] == "lora_A" || parts[n - 2] == "lora_B");
        if !ok {
            bad.push(format!("V6: {name} is unsupported LoRA weight"));
            continue;
        }
        let module = parts[2..n - 2].join(".");
        let last = parts[n - 3];
        if !supported.contains(last) || !model_modules.contains(&module) {
            bad.push(format!("V7/M7: {module} is not a module of the model"));
        }
        if !targets.iter().any(|t| &module == t || module.ends_with(&format!(".{t}"))) {
            bad.push(format!("M4: {module} not declared by target_modules"));
        }
        if module == "lm_head" {
            bad.push("M5: lm_head".into());
        }
        let rank = ranks.iter().find(|(k, _)| module == **k || module.ends_with(&format!(".{k}"))).map_or(r, |(_, &v)| v);
        let shape = view.shape();
        let rank_dim = if parts[n - 2] == "lora_A" { shape[0] } else { shape[1] };
        if shape.len() != 2 || rank_dim != rank {
            bad.push(format!("M6: {name} has shape {shape:?} for rank {rank}"));
        }
        sites += 1;
    }
    if sites == 0 {
        bad.push("M7: no LoRA tensors".into());
    }
    bad
}

#[test]
fn written_adapters_pass_vllm_and_mistralrs_loader_checks() {
    let tmp = tempfile::tempdir().unwrap();
    // A freshly trained-style adapter (random B) on every projection, and the rsLoRA fixture
    // with rank_pattern / alpha_pattern on a subset of layers, both re-written by temper.
    let device = Default::default();
    let mut model = load_model::<Cpu>(&fixtures().join("models/llama"), WeightPrecision::F32, &device).unwrap().model;
    let modules = projection_names(&model);
    let cfg = LoraConfig { r: 8, lora_alpha: 16.0, target_modules: TargetModules::Pattern("all-linear".into()), init_lora_weights: LoraInit::Flag(false), ..LoraConfig::default() };
    inject(&mut model, &cfg, 3).unwrap();
    let fresh = extract_adapter(&mut model, &cfg, "models/llama").unwrap();
    let rslora = Adapter::read(&fixtures().join("peft/llama_rslora/adapter")).unwrap();
    for (name, adapter) in [("fresh", fresh), ("rslora", rslora)] {
        let dir = tmp.path().join(name);
        adapter.write(&dir, WriteMode::Refuse, &[]).unwrap();
        let bad = serving_violations(&dir, &modules);
        assert!(bad.is_empty(), "{name}: {bad:#?}");
    }
}

#[test]
fn serving_checks_catch_what_servers_refuse() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    Adapter::read(&fixtures().join("peft/llama/adapter")).unwrap().write(&dir, WriteMode::Refuse, &[]).unwrap();
    let path = dir.join("adapter_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["use_dora"] = true.into();
    cfg["target_modules"] = serde_json::json!(["q_proj"]);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let device = Default::default();
    let model = load_model::<Cpu>(&fixtures().join("models/llama"), WeightPrecision::F32, &device).unwrap().model;
    let bad = serving_violations(&dir, &projection_names(&model));
    assert!(bad.iter().any(|b| b.starts_with("V3")), "{bad:?}");
    assert!(bad.iter().any(|b| b.starts_with("M4")), "{bad:?}");
}
