//! LoRA settings with PEFT's field names, so the recipe's `lora:` block round-trips into
//! `adapter_config.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `target_modules`: names matched as suffixes, a regex (full match), or `all-linear`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    /// `"all-linear"` or a regular expression matched against the full module name.
    Pattern(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Pattern("all-linear".into())
    }
}

/// How A (and B) start: PEFT's `init_lora_weights`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LoraInit {
    /// `true`: A kaiming-uniform (a = sqrt(5)), B zero. `false`: both random (tests only).
    Flag(bool),
    /// `"gaussian"`: A ~ N(0, 1/r), B zero.
    Named(String),
}

impl Default for LoraInit {
    fn default() -> Self {
        LoraInit::Flag(true)
    }
}

/// `lora:` in a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub init_lora_weights: LoraInit,
    /// Only these layer indices get adapters.
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
    /// Per-module rank overrides: key matched as `(.*\.)?key$` against the module name.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, matched like `rank_pattern`.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// PEFT's `target_parameters`: parameters matched as suffixes of their full names. Temper
    /// reads it for the experts of a mixture-of-experts model (`mlp.experts.gate_up_proj`,
    /// `mlp.experts.down_proj`, as transformers 5 names them) and the router (`mlp.gate.weight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_parameters: Option<Vec<String>>,
}

fn default_r() -> usize {
    16
}

fn default_alpha() -> f64 {
    32.0
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            target_modules: TargetModules::default(),
            use_rslora: false,
            init_lora_weights: LoraInit::default(),
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            target_parameters: None,
        }
    }
}

impl LoraConfig {
    /// Check values that would make the math meaningless.
    pub fn validate(&self) -> Result<(), String> {
        if self.r == 0 {
            return Err("`r` must be at least 1".into());
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(format!("`lora_alpha` must be positive, got {}", self.lora_alpha));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(format!("`lora_dropout` must be in [0, 1), got {}", self.lora_dropout));
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            return Err(format!("`rank_pattern.{k}` must be at least 1"));
        }
        match &self.init_lora_weights {
            LoraInit::Flag(_) => {}
            LoraInit::Named(n) if n == "gaussian" => {}
            LoraInit::Named(n) => {
                return Err(format!("`init_lora_weights` {n:?} is not supported (true, false or \"gaussian\")"))
            }
        }
        if self.target_parameters.as_ref().is_some_and(|t| !t.is_empty()) && self.lora_dropout > 0.0 {
            return Err(format!("`lora_dropout` {} with `target_parameters`: PEFT's LoRA on parameters has no dropout (it refuses to load such an adapter); set lora_dropout: 0", self.lora_dropout));
        }
        for t in self.target_parameters.iter().flatten() {
            let known = ["experts.gate_up_proj", "experts.down_proj", "gate.weight", "router.weight"];
            if !known.iter().any(|k| t.ends_with(k)) {
                return Err(format!("`target_parameters` entry {t:?} is not an expert or router parameter (supported: mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.gate.weight; gpt-oss: mlp.router.weight)"));
            }
        }
        if let TargetModules::Pattern(p) = &self.target_modules {
            if p != "all-linear" {
                regex::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| format!("`target_modules` is not a valid regex: {e}"))?;
            }
        }
        Ok(())
    }

    /// Rank and alpha for a module, after `rank_pattern` / `alpha_pattern`.
    pub fn rank_alpha(&self, module: &str) -> (usize, f64) {
        let r = pattern_value(&self.rank_pattern, module).unwrap_or(self.r);
        let a = pattern_value(&self.alpha_pattern, module).unwrap_or(self.lora_alpha);
        (r, a)
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self, module: &str) -> f64 {
        let (r, a) = self.rank_alpha(module);
        if self.use_rslora {
            a / (r as f64).sqrt()
        } else {
            a / r as f64
        }
    }
}

/// PEFT's `get_pattern_key`: the first key `k` with `(.*\.)?k$` matching the module name.
fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, module: &str) -> Option<T> {
    patterns.iter().find_map(|(k, v)| {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).ok()?;
        re.is_match(module).then_some(*v)
    })
}
