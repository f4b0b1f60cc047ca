//! The PEFT LoRA adapter format (see shared/docs/PEFT-FORMAT.md): `adapter_config.json` +
//! `adapter_model.safetensors`, keys `base_model.model.<module>.lora_{A,B}.weight`.
//! Read into host memory (f32) so the same reader serves loading into a model and merging.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::export::atomic::{write_dir_atomically, WriteMode};
use crate::lora::{LoraConfig, LoraInit, TargetModules};
use crate::model::names::{internal_module, is_legacy_name, peft_module_in};
use crate::{Error, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// A tensor in host memory, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A and B of one module: A `[r, in]`, B `[out, r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub a: HostTensor,
    pub b: HostTensor,
}

impl LoraPair {
    /// An empty rank-0 pair, for name mapping only.
    pub fn placeholder() -> Self {
        let t = || HostTensor { shape: vec![0, 0], data: Vec::new() };
        LoraPair { a: t(), b: t() }
    }
}

/// An adapter: its LoRA settings, what it was trained on, and its tensors by module name
/// (`model.layers.0.self_attn.q_proj`).
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub config: LoraConfig,
    pub base_model: String,
    pub modules: BTreeMap<String, LoraPair>,
    /// Trained on the text decoder of a vision-language model: PEFT names its modules
    /// `model.language_model.*` ([`peft_module`]); `modules` keeps Temper's names either way.
    pub nested: bool,
    /// With `nested`: PEFT names the decoder `language_model.model.*` (Llama 4's wrapper class).
    pub legacy_names: bool,
    /// How mixture-of-experts deltas are written: PEFT's 3-D form (default) or per expert.
    pub expert_format: crate::export::experts::ExpertFormat,
}

/// `adapter_config.json` as PEFT and others write it; unknown keys are accepted.
#[derive(Debug, Deserialize)]
struct PeftConfigFile {
    peft_type: Option<String>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: Option<TargetModules>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    rank_pattern: Option<BTreeMap<String, usize>>,
    #[serde(default)]
    alpha_pattern: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    layers_to_transform: Option<Value>,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    layer_replication: Option<Value>,
    #[serde(default)]
    use_qalora: bool,
    #[serde(default)]
    target_parameters: Option<Value>,
    #[serde(default)]
    trainable_token_indices: Option<Value>,
    #[serde(default)]
    alora_invocation_tokens: Option<Value>,
    #[serde(default)]
    init_lora_weights: Option<Value>,
}

impl Adapter {
    /// Read a PEFT adapter folder, refusing options whose math is not implemented.
    pub fn read(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        if dir.join("adapter_model.bin").exists() && !dir.join(WEIGHTS_FILE).exists() {
            return Err(Error::Unsupported {
                path: dir.join("adapter_model.bin"),
                key: "adapter_model.bin".into(),
                value: "pickle".into(),
                reason: "pickle files can execute code when loaded and are never read; save the adapter with safe_serialization=True".into(),
            });
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let file: PeftConfigFile =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: cfg_path.clone(), source })?;
        let config = file.to_lora_config(&cfg_path)?;
        let base_model = file.base_model_name_or_path.clone().unwrap_or_default();
        let (mut modules, nested, legacy_names) = read_tensors(&dir.join(WEIGHTS_FILE))?;
        let targets = |fused: &str| {
            let hit =
                config.target_parameters.iter().flatten().any(|t| fused == t || fused.ends_with(&format!(".{t}")));
            if hit {
                config.rank_alpha(fused).0
            } else {
                0
            }
        };
        let expert_format = crate::export::experts::split_experts(&mut modules, targets, &dir.join(WEIGHTS_FILE))?;
        Ok(Adapter { config, base_model, modules, nested, legacy_names, expert_format })
    }

    /// Write `adapter_config.json` (2-space indent, sorted keys) and
    /// `adapter_model.safetensors` (`format: pt`) into `dir`, atomically: a crash leaves
    /// either the old folder or the new one. `extra_files` (name, bytes) go alongside.
    pub fn write(&self, dir: &Path, mode: WriteMode, extra_files: &[(&str, Vec<u8>)]) -> Result<()> {
        for (name, pair) in &self.modules {
            if pair.a.data.iter().chain(&pair.b.data).any(|x| !x.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "adapter weights of {name}; nothing written to {}",
                    dir.display()
                )));
            }
        }
        let config =
            serde_json::to_string_pretty(&self.config_json()).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let weights = self.safetensors_bytes()?;
        write_dir_atomically(dir, mode, |tmp| {
            std::fs::write(tmp.join(CONFIG_FILE), config.as_bytes())
                .map_err(|e| Error::io(tmp.join(CONFIG_FILE), e))?;
            std::fs::write(tmp.join(WEIGHTS_FILE), &weights).map_err(|e| Error::io(tmp.join(WEIGHTS_FILE), e))?;
            for (name, bytes) in extra_files {
                std::fs::write(tmp.join(name), bytes).map_err(|e| Error::io(tmp.join(name), e))?;
            }
            Ok(())
        })
    }

    /// The conservative key set of PEFT-FORMAT.md; `target_modules` as an explicit list of the
    /// module names adapted (what vLLM and mistral.rs check tensors against).
    pub fn config_json(&self) -> Value {
        use crate::export::experts::{per_expert, ExpertFormat};
        use crate::lora::inject::moe_parameter;
        // Experts and routers are parameters in transformers 5: `target_parameters`; written per
        // expert, the experts are modules again (`gate_proj`, ... or Mixtral's `w1`, ...).
        let per = match self.expert_format {
            ExpertFormat::PerExpert { mixtral } => Some(per_expert(&self.modules, mixtral)),
            ExpertFormat::Fused => None,
        };
        let names: Vec<&String> = per.as_ref().map_or_else(|| self.modules.keys().collect(), |p| p.keys().collect());
        let targets: std::collections::BTreeSet<String> =
            names.iter().filter(|m| per.is_some() || moe_parameter(m).is_none()).map(|m| target_name(m)).collect();
        let params: std::collections::BTreeSet<String> = names
            .iter()
            .filter(|m| per.is_none() || m.ends_with(".mlp.gate") || m.ends_with(".mlp.router"))
            .filter_map(|m| moe_parameter(m))
            .map(|p| {
                // `mlp.gate.weight`, `mlp.experts.down_proj` (Llama 4: `feed_forward.*`).
                let block = if p.contains(".feed_forward.") { "feed_forward" } else { "mlp" };
                match p.rsplit('.').nth(1) {
                    Some(router @ ("gate" | "router")) => format!("{block}.{router}.weight"),
                    _ => format!("{block}.experts.{}", p.rsplit('.').next().unwrap_or_default()),
                }
            })
            .collect();
        // A list of names would also match the vision tower's q_proj / k_proj / v_proj in PEFT.
        let targets = if self.nested {
            let names: Vec<String> = targets.iter().map(|t| regex::escape(t)).collect();
            let prefix = if self.legacy_names { r"language_model\.model" } else { r"model\.language_model" };
            json!(format!(r"^{prefix}\..*\.({})$", names.join("|")))
        } else {
            json!(targets)
        };
        let c = &self.config;
        let int_or_float = |x: f64| if x.fract() == 0.0 && x.abs() < 1e15 { json!(x as i64) } else { json!(x) };
        let mut out = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": c.r,
            "lora_alpha": int_or_float(c.lora_alpha),
            "target_modules": targets,
            "lora_dropout": c.lora_dropout,
            "use_rslora": c.use_rslora,
            "use_dora": false,
            "bias": "none",
            "fan_in_fan_out": false,
            "modules_to_save": null,
            "rank_pattern": c.rank_pattern,
            "alpha_pattern": c.alpha_pattern.iter().map(|(k, v)| (k.clone(), int_or_float(*v))).collect::<BTreeMap<_, _>>(),
            "init_lora_weights": match &c.init_lora_weights { LoraInit::Flag(b) => json!(b), LoraInit::Named(n) => json!(n) },
            "inference_mode": true,
            "layers_to_transform": c.layers_to_transform,
            "layers_pattern": null,
            "revision": null,
        });
        if !params.is_empty() {
            out["target_parameters"] = json!(params);
        }
        out
    }

    fn safetensors_bytes(&self) -> Result<Vec<u8>> {
        let mut entries: Vec<(String, &HostTensor)> = Vec::new();
        let (fused, _) = match self.expert_format {
            crate::export::experts::ExpertFormat::PerExpert { mixtral } => {
                (crate::export::experts::per_expert(&self.modules, mixtral), Vec::new())
            }
            crate::export::experts::ExpertFormat::Fused => crate::export::experts::fuse_experts(&self.modules)?,
        };
        for (module, pair) in &fused {
            let module = peft_module_in(module, self.nested, self.legacy_names);
            entries.push((format!("{KEY_PREFIX}{module}.lora_A.weight"), &pair.a));
            entries.push((format!("{KEY_PREFIX}{module}.lora_B.weight"), &pair.b));
        }
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        f32_safetensors(&entries, metadata)
    }
}

/// A module's name in `target_modules`: its last name, which PEFT matches as a suffix, or
/// `shared_expert.<name>` for a shared expert's projection, as PEFT writes it: a bare `gate_proj`
/// would also match the dense MLP layers of a model that mixes dense and sparse layers, so PEFT
/// (and vLLM / mistral.rs, which read the list) would build modules that were never trained.
fn target_name(module: &str) -> String {
    let last = module.rsplit('.').next().unwrap_or(module);
    if module.contains(".shared_expert.") {
        format!("shared_expert.{last}")
    } else {
        last.to_string()
    }
}

/// Serialise f32 host tensors (name, tensor) into safetensors bytes with `metadata`.
pub fn f32_safetensors(
    entries: &[(String, &HostTensor)],
    metadata: std::collections::HashMap<String, String>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> =
        entries.iter().map(|(_, t)| t.data.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = entries
        .iter()
        .zip(&bytes)
        .map(|((k, t), d)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), d)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::InvalidArgument(format!("tensor {k}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::InvalidArgument(format!("serialising safetensors: {e}")))
}

impl PeftConfigFile {
    fn to_lora_config(&self, path: &Path) -> Result<LoraConfig> {
        let refuse = |key: &str, value: String, reason: &str| Error::Unsupported {
            path: path.to_path_buf(),
            key: key.into(),
            value,
            reason: reason.into(),
        };
        match self.peft_type.as_deref() {
            Some("LORA") | None => {}
            Some(other) => return Err(refuse("peft_type", format!("{other:?}"), "only LORA adapters are supported")),
        }
        if self.use_dora {
            return Err(refuse("use_dora", "true".into(), "DoRA is not implemented"));
        }
        if let Some(b) = self.bias.as_deref().filter(|b| *b != "none") {
            return Err(refuse("bias", format!("{b:?}"), "only bias \"none\" is supported"));
        }
        if self.fan_in_fan_out {
            return Err(refuse("fan_in_fan_out", "true".into(), "GPT-2 style Conv1D layouts are not supported"));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(refuse(
                "modules_to_save",
                format!("{:?}", self.modules_to_save),
                "fully trained extra modules are not supported",
            ));
        }
        if self.lora_bias {
            return Err(refuse("lora_bias", "true".into(), "LoRA bias terms are not supported"));
        }
        if self.use_qalora {
            return Err(refuse("use_qalora", "true".into(), "QA-LoRA is not supported"));
        }
        for (key, v) in [
            ("layer_replication", &self.layer_replication),
            ("trainable_token_indices", &self.trainable_token_indices),
            ("alora_invocation_tokens", &self.alora_invocation_tokens),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(refuse(
                    key,
                    v.as_ref().map(Value::to_string).unwrap_or_default(),
                    "this PEFT option is not supported",
                ));
            }
        }
        let layers_to_transform = match &self.layers_to_transform {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as usize]),
            Some(Value::Array(a)) => Some(a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect()),
            Some(other) => {
                return Err(refuse("layers_to_transform", other.to_string(), "expected an integer or a list"))
            }
        };
        let init_lora_weights = match &self.init_lora_weights {
            Some(Value::Bool(b)) => LoraInit::Flag(*b),
            Some(Value::String(s)) => LoraInit::Named(s.clone()),
            _ => LoraInit::Flag(true),
        };
        Ok(LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: self.target_modules.clone().unwrap_or_default(),
            use_rslora: self.use_rslora,
            // Informational once trained; "gaussian" and other names are accepted on read.
            init_lora_weights,
            layers_to_transform,
            rank_pattern: self.rank_pattern.clone().unwrap_or_default(),
            alpha_pattern: self.alpha_pattern.clone().unwrap_or_default(),
            target_parameters: match &self.target_parameters {
                None | Some(Value::Null) => None,
                Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                    Some(a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                }
                Some(other) => {
                    return Err(refuse("target_parameters", other.to_string(), "expected a list of parameter names"))
                }
            },
        })
    }
}

/// `adapter_model.safetensors` -> A/B pairs by module name (f32, bf16 and f16 accepted).
/// The pairs by Temper's module names, whether the names were a composite model's, and whether
/// in the `language_model.model.*` layout.
fn read_tensors(path: &Path) -> Result<(BTreeMap<String, LoraPair>, bool, bool)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })?;
    let mut a_parts: BTreeMap<String, HostTensor> = BTreeMap::new();
    let mut b_parts: BTreeMap<String, HostTensor> = BTreeMap::new();
    let mut nested = false;
    let mut legacy = false;
    for (key, view) in st.tensors() {
        let Some((module, which)) = parse_key(&key) else {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                key: key.clone(),
                value: "tensor".into(),
                reason: format!("expected `{KEY_PREFIX}<module>.lora_A.weight` or `.lora_B.weight`"),
            });
        };
        let data = to_f32(view.dtype(), view.data()).ok_or_else(|| Error::TensorDtype {
            path: path.to_path_buf(),
            tensor: key.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        let t = HostTensor { shape: view.shape().to_vec(), data };
        if t.shape.len() != 2 {
            return Err(Error::TensorShape {
                path: path.to_path_buf(),
                tensor: key.clone(),
                expected: vec![0, 0],
                actual: t.shape,
            });
        }
        legacy |= is_legacy_name(&module);
        let (module, composite) = internal_module(&module);
        nested |= composite;
        if which == 'A' {
            a_parts.insert(module, t)
        } else {
            b_parts.insert(module, t)
        };
    }
    let mut out = BTreeMap::new();
    for (module, a) in a_parts {
        let b = b_parts.remove(&module).ok_or_else(|| Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: format!("{KEY_PREFIX}{}.lora_B.weight", peft_module_in(&module, nested, legacy)),
            hint: " (lora_A without its lora_B)".into(),
        })?;
        if a.shape[0] != b.shape[1] {
            return Err(Error::TensorShape {
                path: path.to_path_buf(),
                tensor: format!("{KEY_PREFIX}{}.lora_B.weight", peft_module_in(&module, nested, legacy)),
                expected: vec![b.shape[0], a.shape[0]],
                actual: b.shape.clone(),
            });
        }
        out.insert(module, LoraPair { a, b });
    }
    if let Some(module) = b_parts.keys().next() {
        return Err(Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: format!("{KEY_PREFIX}{}.lora_A.weight", peft_module_in(module, nested, legacy)),
            hint: " (lora_B without its lora_A)".into(),
        });
    }
    if out.is_empty() {
        return Err(Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: "lora_A / lora_B".into(),
            hint: " (the adapter has no LoRA tensors)".into(),
        });
    }
    Ok((out, nested, legacy))
}

/// `base_model.model.X.lora_A.weight` (also `.lora_A.default.weight`) -> (X, 'A')
fn parse_key(key: &str) -> Option<(String, char)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    for (suffix, which) in [
        (".lora_A.weight", 'A'),
        (".lora_B.weight", 'B'),
        (".lora_A.default.weight", 'A'),
        (".lora_B.default.weight", 'B'),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((module.to_string(), which));
        }
    }
    None
}

fn to_f32(dtype: safetensors::Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    use safetensors::Dtype;
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}
