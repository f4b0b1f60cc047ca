//! Will a server take this adapter? The rules vLLM, llama.cpp and mistral.rs apply when they
//! load a PEFT LoRA adapter, checked on the written folder (`adapter_config.json` and the
//! safetensors header), one verdict per server. `temper train` and `temper export` print them;
//! the tests check adapters that break each rule.
//!
//! vLLM (`vllm/lora/peft_helper.py` `PEFTHelper.from_dict` / `_validate_features` /
//! `validate_legal`, `vllm/lora/utils.py` `parse_fine_tuned_lora_name`, `vllm/lora/lora_model.py`
//! `check_unexpected_modules`):
//! - V1 `r`, `lora_alpha`, `target_modules` present.
//! - V2 `modules_to_save` empty. V3 no DoRA. V4 `bias` "none".
//! - V5 `r` at most 512 (the largest `--max-lora-rank`; the default is 16).
//! - V6 every tensor is `base_model.model.<module>.lora_{A,B}.weight`.
//! - V7 every module's last name is one the model has.
//! - V8 one scaling for every module: vLLM applies `lora_alpha / r` (or `/ sqrt(r)`) to all of
//!   them, so `rank_pattern` / `alpha_pattern` would be served with the wrong scale.
//!
//! mistral.rs (`mistralrs-quant/src/lora/mod.rs` `LoraConfig::validate_dynamic`,
//! `mistralrs-quant/src/lora/dynamic/loader.rs`, `mistralrs-core/src/adapter/runtime.rs`):
//! - M1 `peft_type` LORA; no DoRA, `bias` "none", no `lora_bias`, no `modules_to_save`, no
//!   aLoRA / QA-LoRA / layer_replication / trainable_token_indices.
//! - M2 `init_lora_weights` a bool or a strategy that does not transform the base.
//! - M3 `r` >= 1, `lora_alpha` finite, rank_pattern ranks >= 1, alpha_pattern finite.
//! - M4 `target_modules` a non-empty list of names; every module with tensors is declared by it.
//! - M5 no adapter on lm_head. M6 lora_A `[rank, in]`, lora_B `[out, rank]` for the module's rank.
//! - M7 every tensor belongs to a module of the model; at least one. M8 ranks at most 256.
//!
//! LoRA on the experts of a mixture-of-experts model in PEFT's 3-D form (V9, L4, M9): one
//! verdict per server (shared/docs/MOE-NOTES.md §1c: vLLM reads the 2-D per-expert form for the
//! non-fused families, llama.cpp's converter maps only that form).
//!
//! The Gated DeltaNet hybrids (Qwen 3.5, Qwen3-Next) have rules of their own in vLLM and
//! mistral.rs (M10, and the 3-D expert form of Qwen 3.5 MoE's VLM class):
//! [`crate::export::serving_delta_net`].
//!
//! llama.cpp (`--lora FILE.gguf`): the architecture has a GGUF mapping in `temper export
//! --format gguf` (L1) and every module a GGUF tensor name (L2); no DoRA, biases or
//! modules_to_save (L3). The GGUF Temper writes folds rsLoRA and alpha_pattern into B, so the
//! scale is exact; llama.cpp's own `convert_lora_to_gguf.py` ignores both (noted).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde_json::Value;

use crate::export::gguf;
use crate::export::peft::{LoraPair, CONFIG_FILE, WEIGHTS_FILE};
use crate::export::serving_delta_net as delta_net;
use crate::lora::module_names;
use crate::model::names::{internal_module, peft_module_in};
use crate::model::DecoderConfig;
use crate::{Error, Result};

/// vLLM's accepted `--max-lora-rank` values; the default is 16.
pub const VLLM_RANKS: [usize; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];
pub const VLLM_DEFAULT_MAX_RANK: usize = 16;
/// mistral.rs's `DEFAULT_LORA_MAX_RANK`.
pub const MISTRALRS_MAX_RANK: usize = 256;

/// What the adapter was trained on, as far as the checks need it.
#[derive(Debug, Clone)]
pub struct ServingBase {
    /// `model_type` of the base's config.json (the outer one of a vision-language model).
    pub model_type: String,
    /// Every module an adapter may target, by PEFT's name.
    pub modules: Vec<String>,
}

impl ServingBase {
    /// From a base model folder's config.json (no weights are read).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: path.clone(), source })?;
        let (_, cfg) = DecoderConfig::from_model_dir(dir)?;
        let composite = cfg.composite.is_some();
        let legacy = crate::model::names::legacy_live_names(cfg.composite.as_deref());
        let mut modules: Vec<String> =
            module_names(&cfg).iter().map(|m| peft_module_in(m, composite, legacy)).collect();
        // The 2-D per-expert names of every expert (what `--format peft-per-expert` writes).
        let mixtral = cfg.model_type == "mixtral";
        let experts: BTreeMap<String, LoraPair> = modules
            .iter()
            .filter(|m| crate::export::experts::split_expert_name(m).is_some())
            .map(|m| (m.clone(), LoraPair::placeholder()))
            .collect();
        modules.extend(
            crate::export::experts::per_expert(&experts, mixtral).into_keys().filter(|k| !experts.contains_key(k)),
        );
        Ok(ServingBase { model_type: raw["model_type"].as_str().unwrap_or_default().to_string(), modules })
    }
}

/// A server's verdict on one adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub server: &'static str,
    /// Broken rules, as `(rule id, what)`: the server refuses the adapter or serves it wrongly.
    pub problems: Vec<(&'static str, String)>,
    /// What the user should know although the server takes it (a flag to pass, a caveat).
    pub notes: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The ids of the broken rules.
    pub fn rules(&self) -> Vec<&'static str> {
        self.problems.iter().map(|(r, _)| *r).collect()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ok() {
            write!(f, "{}: ok", self.server)?;
        } else {
            let what: Vec<String> = self.problems.iter().map(|(rule, w)| format!("{w} ({rule})")).collect();
            write!(f, "{}: refuses or misserves: {}", self.server, what.join("; "))?;
        }
        if !self.notes.is_empty() {
            write!(f, " [{}]", self.notes.join("; "))?;
        }
        Ok(())
    }
}

/// One tensor of the adapter file: its name and shape.
struct TensorInfo {
    name: String,
    shape: Vec<usize>,
}

/// Check the adapter folder `dir` for vLLM, llama.cpp and mistral.rs. Without `base` the checks
/// that need the model (its module names, the GGUF architecture) are skipped and say so.
pub fn check_adapter(dir: &Path, base: Option<&ServingBase>) -> Result<Vec<Verdict>> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: cfg_path.clone(), source })?;
    let weights = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&weights).map_err(|e| Error::io(&weights, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Safetensors { path: weights.clone(), reason: e.to_string() })?;
    let mut tensors: Vec<TensorInfo> =
        meta.tensors().into_iter().map(|(name, info)| TensorInfo { name, shape: info.shape.clone() }).collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    // PEFT's 3-D expert LoRA (`target_parameters`) is one verdict per server, not one per tensor.
    let (experts, tensors): (Vec<TensorInfo>, Vec<TensorInfo>) = tensors.into_iter().partition(|t| {
        [".mlp.experts.", ".feed_forward.experts."]
            .iter()
            .any(|b| t.name.contains(&format!("{b}lora_")) || t.name.contains(&format!("{b}base_layer.lora_")))
    });
    let mut verdicts =
        vec![vllm(&cfg, &tensors, base), llama_cpp(&cfg, &tensors, base), mistral_rs(&cfg, &tensors, base)];
    let model_type = base.map(|b| b.model_type.as_str());
    if !experts.is_empty() {
        let layers = experts.iter().filter(|t| t.name.ends_with("lora_A.weight")).count();
        let names: Vec<&str> = experts.iter().map(|t| t.name.as_str()).collect();
        let vllm_why = match delta_net::vllm_3d_experts(model_type, &names) {
            Some(Ok(())) => None,
            Some(Err(why)) => Some(why),
            None => Some(format!("{layers} expert LoRA pairs are PEFT's 3-D form (target_parameters); for Mixtral / Qwen-MoE / OLMoE models vLLM reads the 2-D per-expert form: `temper export --format peft-per-expert --base DIR` writes it")),
        };
        if let Some(why) = vllm_why {
            verdicts[0].problems.push(("V9", why));
        }
        let why = [
            ("L4", format!("{layers} expert LoRA pairs are PEFT's 3-D form, which llama.cpp's convert_lora_to_gguf.py does not map")),
            ("M9", format!("{layers} expert LoRA pairs are PEFT's 3-D form; mistral.rs's LoRA loader takes per-module Linear pairs")),
        ];
        for (v, (rule, what)) in verdicts[1..].iter_mut().zip(why) {
            v.problems.push((rule, what));
        }
    }
    let modules: Vec<String> = tensors.iter().filter_map(|t| split_key(&t.name)).map(|(m, _)| m).collect();
    delta_net::rules(model_type, &modules, &mut verdicts);
    Ok(verdicts)
}

/// `base_model.model.<module>.lora_{A,B}.weight` -> (module, "lora_A" / "lora_B").
fn split_key(name: &str) -> Option<(String, &str)> {
    let parts: Vec<&str> = name.split('.').collect();
    let n = parts.len();
    let ok = name.starts_with("base_model.model.")
        && n >= 4
        && parts[n - 1] == "weight"
        && (parts[n - 2] == "lora_A" || parts[n - 2] == "lora_B");
    ok.then(|| (parts[2..n - 2].join("."), parts[n - 2]))
}

fn flag(cfg: &Value, key: &str) -> bool {
    cfg.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn non_empty(cfg: &Value, key: &str) -> bool {
    cfg.get(key).is_some_and(|v| match v {
        Value::Null => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    })
}

fn bias_set(cfg: &Value) -> bool {
    cfg.get("bias").and_then(Value::as_str).is_some_and(|b| b != "none")
}

fn rank(cfg: &Value) -> usize {
    cfg.get("r").and_then(Value::as_u64).unwrap_or(0) as usize
}

fn rank_pattern(cfg: &Value) -> BTreeMap<String, usize> {
    serde_json::from_value(cfg.get("rank_pattern").cloned().unwrap_or(Value::Null)).unwrap_or_default()
}

fn last_name(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

fn vllm(cfg: &Value, tensors: &[TensorInfo], base: Option<&ServingBase>) -> Verdict {
    let mut v = Verdict { server: "vLLM", problems: Vec::new(), notes: Vec::new() };
    for key in ["r", "lora_alpha", "target_modules"] {
        if cfg.get(key).is_none_or(Value::is_null) {
            v.problems.push(("V1", format!("adapter_config.json has no `{key}`")));
        }
    }
    if non_empty(cfg, "modules_to_save") {
        v.problems.push(("V2", "modules_to_save is set".into()));
    }
    if flag(cfg, "use_dora") {
        v.problems.push(("V3", "DoRA".into()));
    }
    if bias_set(cfg) {
        v.problems.push(("V4", "bias is not \"none\" (needs --enable-lora-bias)".into()));
    }
    let r = rank(cfg);
    let max_rank = rank_pattern(cfg).values().copied().chain([r]).max().unwrap_or(r);
    match VLLM_RANKS.iter().find(|&&m| max_rank <= m) {
        None => v.problems.push(("V5", format!("rank {max_rank} is above vLLM's largest --max-lora-rank (512)"))),
        Some(&m) if m > VLLM_DEFAULT_MAX_RANK => v.notes.push(format!("start vLLM with --max-lora-rank {m}")),
        Some(_) => {}
    }
    let supported: Option<std::collections::BTreeSet<&str>> =
        base.map(|b| b.modules.iter().map(|m| last_name(m)).collect());
    for t in tensors {
        match split_key(&t.name) {
            None => v.problems.push(("V6", format!("tensor `{}` is not a LoRA weight vLLM reads", t.name))),
            Some((module, _)) => {
                if let Some(s) = &supported {
                    if !s.contains(last_name(&module)) {
                        v.problems.push(("V7", format!("`{module}` is not a module vLLM expects in this model")));
                    }
                }
            }
        }
    }
    if non_empty(cfg, "rank_pattern") || non_empty(cfg, "alpha_pattern") {
        v.problems.push((
            "V8",
            "rank_pattern / alpha_pattern give per-module scales; vLLM applies one lora_alpha / r to all".into(),
        ));
    }
    if base.is_none() {
        v.notes.push("base model not found: module names unchecked".into());
    }
    v
}

fn llama_cpp(cfg: &Value, tensors: &[TensorInfo], base: Option<&ServingBase>) -> Verdict {
    let mut v = Verdict { server: "llama.cpp", problems: Vec::new(), notes: Vec::new() };
    match base {
        Some(b) if gguf::architecture(&b.model_type).is_none() => {
            v.problems.push(("L1", format!("no GGUF mapping for model_type {:?} in temper export", b.model_type)));
        }
        Some(_) => {}
        None => v.notes.push("base model not found: architecture unchecked".into()),
    }
    let arch = base.and_then(|b| gguf::architecture(&b.model_type)).map(|(a, _)| a);
    let mut unmapped: Vec<String> = tensors
        .iter()
        .filter_map(|t| split_key(&t.name).map(|(m, _)| m))
        .filter(|m| match arch {
            Some(arch) => gguf::tensor_names(arch, &internal_module(m).0).is_none(),
            None => gguf::tensor_name(&internal_module(m).0).is_none(),
        })
        .collect();
    unmapped.dedup();
    if let Some(m) = unmapped.first() {
        v.problems.push(("L2", format!("`{m}` has no llama.cpp tensor name ({} modules)", unmapped.len())));
    }
    if flag(cfg, "use_dora") || bias_set(cfg) || flag(cfg, "lora_bias") || non_empty(cfg, "modules_to_save") {
        v.problems.push(("L3", "DoRA, biases or modules_to_save".into()));
    }
    if v.ok() {
        v.notes.push("as the GGUF of `temper export --format gguf`".into());
        if flag(cfg, "use_rslora") || non_empty(cfg, "alpha_pattern") {
            v.notes.push(
                "llama.cpp's convert_lora_to_gguf.py would under-scale this rsLoRA / alpha_pattern adapter".into(),
            );
        }
    }
    v
}

fn mistral_rs(cfg: &Value, tensors: &[TensorInfo], base: Option<&ServingBase>) -> Verdict {
    let mut v = Verdict { server: "mistral.rs", problems: Vec::new(), notes: Vec::new() };
    if cfg.get("peft_type").and_then(Value::as_str).is_some_and(|p| p != "LORA") {
        v.problems.push(("M1", "peft_type is not LORA".into()));
    }
    if flag(cfg, "use_dora")
        || bias_set(cfg)
        || flag(cfg, "lora_bias")
        || non_empty(cfg, "modules_to_save")
        || flag(cfg, "use_qalora")
    {
        v.problems.push(("M1", "DoRA, biases, modules_to_save or QA-LoRA".into()));
    }
    for key in ["alora_invocation_tokens", "layer_replication", "trainable_token_indices"] {
        if non_empty(cfg, key) {
            v.problems.push(("M1", format!("{key} is set")));
        }
    }
    match cfg.get("init_lora_weights") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => {}
        Some(Value::String(s))
            if !["pissa", "olora", "corda", "loftq", "lora_ga"].iter().any(|p| s.to_lowercase().starts_with(p)) => {}
        Some(other) => v.problems.push(("M2", format!("init_lora_weights {other} transforms the base weights"))),
    }
    let r = rank(cfg);
    let ranks = rank_pattern(cfg);
    let alphas: BTreeMap<String, f64> =
        serde_json::from_value(cfg.get("alpha_pattern").cloned().unwrap_or(Value::Null)).unwrap_or_default();
    let alpha_ok = cfg.get("lora_alpha").and_then(Value::as_f64).is_some_and(f64::is_finite);
    if r == 0 || !alpha_ok || ranks.values().any(|&x| x == 0) || alphas.values().any(|a| !a.is_finite()) {
        v.problems.push(("M3", "rank 0 or a non-finite alpha".into()));
    }
    let max_rank = ranks.values().copied().chain([r]).max().unwrap_or(r);
    if max_rank > MISTRALRS_MAX_RANK {
        v.problems.push(("M8", format!("rank {max_rank} is above mistral.rs's maximum {MISTRALRS_MAX_RANK}")));
    }
    let targets: Option<Vec<String>> = match cfg.get("target_modules") {
        Some(Value::Array(a)) => Some(a.iter().filter_map(Value::as_str).map(str::to_string).collect()),
        _ => None,
    };
    match &targets {
        None => v.problems.push(("M4", "target_modules is not a list of names (a regex or missing)".into())),
        Some(t) if t.is_empty() || t.iter().any(String::is_empty) => {
            v.problems.push(("M4", "target_modules is empty or has an empty name".into()))
        }
        Some(_) => {}
    }
    let mut sites = 0;
    for t in tensors {
        let Some((module, which)) = split_key(&t.name) else {
            v.problems.push(("M7", format!("tensor `{}` belongs to no LoRA site", t.name)));
            continue;
        };
        if let Some(b) = base {
            if !b.modules.contains(&module) {
                v.problems.push(("M7", format!("`{module}` is not a module of the model")));
            }
        }
        if let Some(t) = &targets {
            if !t.iter().any(|t| module == *t || module.ends_with(&format!(".{t}"))) {
                v.problems.push(("M4", format!("`{module}` is not declared by target_modules")));
            }
        }
        if module == "lm_head" && which == "lora_A" {
            v.problems.push(("M5", "an adapter on lm_head".into()));
        }
        let want =
            ranks.iter().find(|(k, _)| module == **k || module.ends_with(&format!(".{k}"))).map_or(r, |(_, &x)| x);
        let rank_dim = match (t.shape.len(), which) {
            (2, "lora_A") => Some(t.shape[0]),
            (2, _) => Some(t.shape[1]),
            _ => None,
        };
        if rank_dim != Some(want) {
            v.problems.push(("M6", format!("`{}` has shape {:?} for rank {want}", t.name, t.shape)));
        }
        sites += 1;
    }
    if sites == 0 {
        v.problems.push(("M7", "no LoRA tensors".into()));
    }
    v
}
