//! YAML recipes: typed and strict. An unknown or misspelt key, a wrong type or an impossible
//! value is an error naming the key path and its line. `--set key.path=value` overrides apply
//! on top; relative paths resolve against the recipe's folder (overrides: the working folder).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_norway::Value;

use crate::data::DataConfig;
use crate::lora::LoraConfig;
use crate::train::TrainConfig;
use crate::{Error, Result};

/// `output:` in a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Run folder: checkpoints, metrics, the loss curve, the summary and `adapter/`.
    pub dir: PathBuf,
}

/// `quantization:` in a recipe: a 4-bit frozen base (QLoRA), bit for bit as bitsandbytes; and
/// what becomes of an FP8 checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationConfig {
    /// Quantize the decoder projections to 4 bits as they load (a bitsandbytes 4-bit
    /// checkpoint is 4-bit either way).
    #[serde(default)]
    pub load_in_4bit: bool,
    /// An FP8 checkpoint's projections are kept in 8 bits on the device (one byte per weight,
    /// dequantized block by block in each forward and backward) unless this is true: then they
    /// are dequantized to the training dtype as they load (faster steps, 2-4x the memory).
    #[serde(default)]
    pub dequantize_fp8: bool,
    /// `nf4` (default) or `fp4`.
    #[serde(default = "default_quant_type")]
    pub quant_type: String,
    /// Quantize the absmax values too (bitsandbytes' double quantization: 8-bit absmax in
    /// blocks of 256, about 0.37 bits per weight less).
    #[serde(default)]
    pub double_quant: bool,
}

fn default_quant_type() -> String {
    "nf4".into()
}

impl QuantizationConfig {
    /// The format to quantize to on load, or the key and what is wrong with it.
    pub fn four_bit(&self) -> std::result::Result<Option<crate::quant::LoadIn4Bit>, (&'static str, String)> {
        let kind = crate::quant::FourBit::from_name(&self.quant_type)
            .ok_or_else(|| ("quant_type", format!("{:?} is not a 4-bit format (nf4 or fp4)", self.quant_type)))?;
        if self.double_quant && !self.load_in_4bit {
            return Err(("double_quant", "is true but load_in_4bit is false: double quantization applies to a 4-bit base (set load_in_4bit: true, or drop double_quant)".into()));
        }
        Ok(self.load_in_4bit.then_some(crate::quant::LoadIn4Bit { kind, double_quant: self.double_quant }))
    }
}

/// A training recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// A model folder or a Hugging Face Hub id (`owner/name`).
    pub base_model: String,
    /// Hub revision (branch, tag or commit) of `base_model`.
    #[serde(default)]
    pub revision: Option<String>,
    pub data: DataConfig,
    #[serde(default)]
    pub lora: LoraConfig,
    #[serde(default)]
    pub train: TrainConfig,
    pub output: OutputConfig,
    /// A 4-bit frozen base (QLoRA).
    #[serde(default)]
    pub quantization: Option<QuantizationConfig>,
    /// auto | cpu | cuda[:N] | wgpu
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_device() -> String {
    "auto".into()
}

/// A recipe with paths resolved, and the YAML it came from (overrides applied).
#[derive(Debug, Clone)]
pub struct LoadedRecipe {
    pub recipe: Recipe,
    pub path: PathBuf,
    /// The recipe as run: the file with overrides applied, for the run folder and model card.
    pub effective_yaml: String,
}

impl Recipe {
    /// Read, override, validate and resolve a recipe file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedRecipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_yaml(&text, path, overrides)
    }

    /// As [`Recipe::load`], from text (`path` names the file in errors and anchors paths).
    pub fn from_yaml(text: &str, path: &Path, overrides: &[String]) -> Result<LoadedRecipe> {
        let err = |key: &str, line: Option<usize>, reason: String| Error::Recipe {
            path: path.to_path_buf(),
            line,
            key: key.to_string(),
            reason,
        };
        let mut value: Value =
            serde_norway::from_str(text).map_err(|e| err("(syntax)", e.location().map(|l| l.line()), e.to_string()))?;
        let mut overridden = Vec::new();
        for o in overrides {
            let (key, raw) = o.split_once('=').ok_or_else(|| err(o, None, "--set expects key.path=value".into()))?;
            let v: Value = serde_norway::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
            set_path(&mut value, key, v).map_err(|reason| err(key, None, reason))?;
            overridden.push(key.to_string());
        }
        let parsed: std::result::Result<Recipe, _> = if overrides.is_empty() {
            serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(text))
        } else {
            serde_path_to_error::deserialize(value.clone())
        };
        let mut recipe = parsed.map_err(|e| {
            let inner = e.inner().to_string();
            let mut key = e.path().to_string();
            // serde_path_to_error's path already ends at the unknown field when it comes from a
            // YAML document; add the field only where the path stops at its section.
            if let Some(field) = unknown_field(&inner) {
                let named = key == field || key.ends_with(&format!(".{field}"));
                if key == "." || key.is_empty() {
                    key = field;
                } else if !named {
                    key = format!("{key}.{field}");
                }
            }
            let line = e.inner().location().map(|l| l.line()).or_else(|| find_key_line(text, &key));
            err(&key, line, strip_location(&inner))
        })?;
        let invalid = |key: String, reason: String| {
            let line = find_key_line(text, &key);
            err(&key, line, reason)
        };
        recipe.lora.validate().map_err(|r| invalid(format!("lora.{}", first_key(&r)), r))?;
        recipe.train.validate().map_err(|(k, r)| invalid(format!("train.{k}"), r))?;
        recipe.data.validate().map_err(|(k, r)| invalid(format!("data.{k}"), r))?;
        if let Some(q) = &recipe.quantization {
            q.four_bit().map_err(|(k, r)| invalid(format!("quantization.{k}"), r))?;
        }
        let recipe_dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let base_for =
            |key: &str| if overridden.iter().any(|k| k == key) { PathBuf::from(".") } else { recipe_dir.clone() };
        // Hub sources (`hub:owner/name/...`) are not paths.
        let join = |base: PathBuf, p: &Path| {
            if p.to_string_lossy().starts_with("hub:") {
                p.to_path_buf()
            } else {
                tidy(&base.join(p))
            }
        };
        recipe.data.train = join(base_for("data.train"), &recipe.data.train);
        recipe.data.train_files =
            recipe.data.train_files.iter().map(|p| join(base_for("data.train_files"), p)).collect();
        if let Some(e) = &recipe.data.eval {
            recipe.data.eval = Some(join(base_for("data.eval"), e));
        }
        if let Some(crate::data::config::TemplateSource::File { file }) = &mut recipe.data.chat_template {
            *file = tidy(&base_for("data.chat_template.file").join(&*file));
        }
        recipe.output.dir = tidy(&base_for("output.dir").join(&recipe.output.dir));
        let local = tidy(&base_for("base_model").join(&recipe.base_model));
        if local.is_dir() {
            recipe.base_model = local.to_string_lossy().into_owned();
        }
        let effective_yaml = if overrides.is_empty() {
            text.to_string()
        } else {
            serde_norway::to_string(&value).unwrap_or_else(|_| text.to_string())
        };
        Ok(LoadedRecipe { recipe, path: path.to_path_buf(), effective_yaml })
    }
}

/// A recipe-relative path as the user would type it from the working folder: `recipes/../runs/x`
/// becomes `runs/x`, `./a` becomes `a`. A `dir/..` pair is dropped only where `dir` is not a
/// symbolic link (through a link, `..` leads elsewhere).
fn tidy(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                let last_is_dir = matches!(out.components().next_back(), Some(Component::Normal(_)));
                let linked = std::fs::symlink_metadata(&out).is_ok_and(|m| m.file_type().is_symlink());
                if last_is_dir && !linked {
                    out.pop();
                } else {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out
    }
}

/// Set `a.b.c` in a YAML mapping, creating intermediate mappings.
fn set_path(root: &mut Value, key: &str, v: Value) -> std::result::Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        if node.is_null() {
            *node = Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().ok_or_else(|| format!("`{}` is not a section", parts[..i].join(".")))?;
        let k = Value::String(part.to_string());
        if i == parts.len() - 1 {
            map.insert(k, v);
            return Ok(());
        }
        node = map.entry(k).or_insert(Value::Null);
    }
    Ok(())
}

fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg.split("unknown field `").nth(1)?;
    Some(rest.split('`').next()?.to_string())
}

fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn first_key(reason: &str) -> String {
    reason.split('`').nth(1).unwrap_or("").to_string()
}

/// Line (1-based) of a dotted key in block or flow YAML: each part is searched after the
/// previous part's line.
pub fn find_key_line(text: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0;
    let mut found = None;
    for part in key.split('.').filter(|p| !p.is_empty()) {
        let pat = format!("{part}:");
        let idx = (from..lines.len()).find(|&i| {
            let l = lines[i].split('#').next().unwrap_or("");
            l.trim_start().starts_with(&pat)
                || l.contains(&format!("{{{pat}"))
                || l.contains(&format!(", {pat}"))
                || l.contains(&format!("{{ {pat}"))
        })?;
        found = Some(idx + 1);
        from = idx;
    }
    found
}

#[cfg(test)]
mod tidy_tests {
    use super::tidy;
    use std::path::{Path, PathBuf};

    #[test]
    fn recipe_paths_read_as_typed() {
        assert_eq!(tidy(Path::new("recipes/../runs/quickstart")), PathBuf::from("runs/quickstart"));
        assert_eq!(tidy(Path::new("./../shared/models/x")), PathBuf::from("../shared/models/x"));
        assert_eq!(tidy(Path::new("a/b/../../c")), PathBuf::from("c"));
        assert_eq!(tidy(Path::new("../../x")), PathBuf::from("../../x"));
        assert_eq!(tidy(Path::new("/abs/dir/../y")), PathBuf::from("/abs/y"));
        assert_eq!(tidy(Path::new("recipes/..")), PathBuf::from("."));
    }
}
