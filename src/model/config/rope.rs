//! The RoPE glue: `rope_theta`, `rope_scaling` / `rope_parameters` (flat or keyed by layer
//! type) and `partial_rotary_factor` -> [`RopeConfig`]s (the math lives in `model::rope`).

use std::path::Path;

use serde_json::Value;

use super::mixers::is_delta_net_family;
use super::{compact, unsupported, HfConfig};
use crate::model::rope::{RopeConfig, RopeScaling};
use crate::{Error, Result};

impl HfConfig {
    /// The global RoPE and, for Gemma 3 and OLMo 3, the sliding layers' own. transformers >= 5
    /// may key `rope_parameters` by layer type (`full_attention`, `sliding_attention`).
    pub(super) fn rope_configs(
        &self,
        path: &Path,
        head_dim: usize,
        max_pos: usize,
    ) -> Result<(RopeConfig, Option<RopeConfig>)> {
        let params = self.rope_parameters.as_ref().and_then(Value::as_object);
        let by_type = |t: &str| params.and_then(|p| p.get(t)).filter(|v| v.is_object());
        let rotary_dim = self.rotary_dim(path, head_dim)?;
        let (global, local) = match (by_type("full_attention"), by_type("sliding_attention")) {
            (Some(full), sliding) => {
                let global =
                    self.rope_from(path, "rope_parameters.full_attention", Some(full), None, rotary_dim, max_pos)?;
                let local = match sliding {
                    Some(v) => Some(self.rope_from(
                        path,
                        "rope_parameters.sliding_attention",
                        Some(v),
                        None,
                        rotary_dim,
                        max_pos,
                    )?),
                    None => None,
                };
                (global, local)
            }
            _ => {
                let scaling_value = match (&self.rope_scaling, &self.rope_parameters) {
                    (Some(v), _) if !v.is_null() => Some(("rope_scaling", v)),
                    (_, Some(v)) if !v.is_null() => Some(("rope_parameters", v)),
                    _ => None,
                };
                let theta =
                    self.rope_theta.or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64));
                let key = scaling_value.map_or("rope_scaling", |(k, _)| k);
                (self.rope_from(path, key, scaling_value.map(|(_, v)| v), theta, rotary_dim, max_pos)?, None)
            }
        };
        let local = match self.model_type.as_str() {
            // Gemma 3: the local layers rotate with rope_local_base_freq and no scaling.
            "gemma3_text" => Some(local.unwrap_or(RopeConfig {
                theta: self.rope_local_base_freq.unwrap_or(10_000.0),
                rotary_dim,
                scaling: RopeScaling::Default,
            })),
            // OLMo 3: the sliding layers use the default RoPE of the same theta.
            "olmo3" => {
                Some(local.unwrap_or(RopeConfig { theta: global.theta, rotary_dim, scaling: RopeScaling::Default }))
            }
            _ => None,
        };
        Ok((global, local))
    }

    /// One RoPE from a `rope_scaling` / `rope_parameters` object (`key` names it in errors).
    fn rope_from(
        &self,
        path: &Path,
        key: &str,
        scaling: Option<&Value>,
        theta: Option<f64>,
        rotary_dim: usize,
        max_pos: usize,
    ) -> Result<RopeConfig> {
        let theta =
            theta.or_else(|| scaling.and_then(|v| v.get("rope_theta")).and_then(Value::as_f64)).unwrap_or(10000.0);
        if let Some(v) = scaling {
            self.check_mrope(path, key, v)?;
        }
        let scaling = match scaling {
            None => RopeScaling::Default,
            Some(v) => RopeScaling::from_json(v, max_pos, self.original_max_position_embeddings).map_err(|reason| {
                Error::Unsupported { path: path.to_path_buf(), key: key.to_string(), value: compact(v), reason }
            })?,
        };
        let rope = RopeConfig { theta, rotary_dim, scaling };
        rope.check().map_err(|reason| Error::InvalidConfig { path: path.to_path_buf(), key: key.into(), reason })?;
        Ok(rope)
    }

    /// Qwen 3.5's interleaved M-RoPE (`mrope_section`, `mrope_interleaved`) rotates each
    /// frequency by one of three position rows (time, height, width). For text-only input the
    /// three rows are equal (`position_ids.expand(3, ...)`, modeling_qwen3_5.py:176), so M-RoPE
    /// is exactly plain 1-D RoPE and the keys are accepted for the qwen3_5 families (their config
    /// classes exempt them from RoPE validation, `ignore_keys_at_rope_validation`). Other
    /// families do not implement M-RoPE: refused.
    fn check_mrope(&self, path: &Path, key: &str, v: &Value) -> Result<()> {
        let qwen3_5 = matches!(self.model_type.as_str(), "qwen3_5_text" | "qwen3_5_moe_text");
        for name in ["mrope_section", "mrope_interleaved"] {
            let Some(x) = v.get(name).filter(|x| !x.is_null()) else { continue };
            let well_formed = match name {
                "mrope_section" => x.as_array().is_some_and(|a| a.iter().all(|n| n.as_u64().is_some())),
                _ => x.is_boolean(),
            };
            if !qwen3_5 {
                return Err(unsupported(
                    path,
                    &format!("{key}.{name}"),
                    compact(x),
                    &format!("multimodal RoPE is not implemented for {}", self.model_type),
                ));
            }
            if !well_formed {
                return Err(unsupported(
                    path,
                    &format!("{key}.{name}"),
                    compact(x),
                    "expected a list of section sizes (mrope_section) or a boolean (mrope_interleaved)",
                ));
            }
        }
        Ok(())
    }

    /// `partial_rotary_factor` as transformers 5 resolves it: inside `rope_parameters` (flat, or
    /// its `full_attention` entry) first, then the top-level key, then the class default (0.25
    /// for Qwen 3.5 / Qwen3-Next: `kwargs.setdefault("partial_rotary_factor", 0.25)` in their
    /// `__post_init__`, configuration_qwen3_5.py:110; 1.0 otherwise).
    fn partial_rotary_factor(&self) -> f64 {
        let params = self.rope_parameters.as_ref();
        let inside = |v: Option<&Value>| v.and_then(|p| p.get("partial_rotary_factor")).and_then(Value::as_f64);
        inside(params)
            .or_else(|| inside(params.and_then(|p| p.get("full_attention"))))
            .or(self.partial_rotary_factor)
            .unwrap_or(if is_delta_net_family(&self.model_type) { 0.25 } else { 1.0 })
    }

    fn rotary_dim(&self, path: &Path, head_dim: usize) -> Result<usize> {
        let factor = self.partial_rotary_factor();
        if !(factor > 0.0 && factor <= 1.0) {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                key: "partial_rotary_factor".into(),
                reason: format!("{factor} is not in (0, 1]"),
            });
        }
        let rotary_dim = ((head_dim as f64) * factor) as usize;
        if !rotary_dim.is_multiple_of(2) || rotary_dim == 0 {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                key: "partial_rotary_factor".into(),
                reason: format!("gives an odd or zero rotary dimension {rotary_dim} for head_dim {head_dim}"),
            });
        }
        Ok(rotary_dim)
    }
}

/// Ministral 3's query temperature (transformers' `get_llama_4_attn_scale`,
/// models/ministral3/modeling_ministral3.py:105-107): after RoPE, queries are multiplied by
/// `1 + beta * ln(1 + floor(position / original_max_position_embeddings))`, exactly 1 below the
/// original context. It reads the position ids, so packed documents restart it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueryScale {
    /// `rope_parameters.llama_4_scaling_beta`
    pub beta: f64,
    /// `rope_parameters.original_max_position_embeddings`
    pub original_max_position_embeddings: f64,
}

impl QueryScale {
    /// The factor at `position`, in f32 as torch computes it (`positions / max` in float32,
    /// floor, log, then `1 + beta * ...`).
    pub fn factor(&self, position: usize) -> f32 {
        let floor = (position as f32 / self.original_max_position_embeddings as f32).floor();
        1.0 + self.beta as f32 * (1.0 + floor).ln()
    }
}

impl HfConfig {
    /// Ministral 3's [`QueryScale`], from `rope_parameters` (or `rope_scaling`); `None` for
    /// other families, which do not read the key, and when `llama_4_scaling_beta` is absent.
    pub(super) fn query_scale(&self, path: &Path) -> Result<Option<QueryScale>> {
        if self.model_type != "ministral3" {
            return Ok(None);
        }
        let (key, params) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(v), _) if v.is_object() => ("rope_parameters", v),
            (_, Some(v)) if v.is_object() => ("rope_scaling", v),
            _ => return Ok(None),
        };
        let number = |name: &str| -> Result<Option<f64>> {
            match params.get(name).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v.as_f64().filter(|x| x.is_finite()).map(Some).ok_or_else(|| Error::InvalidConfig {
                    path: path.to_path_buf(),
                    key: format!("{key}.{name}"),
                    reason: format!("expected a number, got {}", compact(v)),
                }),
            }
        };
        let Some(beta) = number("llama_4_scaling_beta")? else { return Ok(None) };
        let original = number("original_max_position_embeddings")?
            .or(self.original_max_position_embeddings.map(|x| x as f64))
            .filter(|&x| x >= 1.0)
            .ok_or_else(|| Error::InvalidConfig {
                path: path.to_path_buf(),
                key: format!("{key}.original_max_position_embeddings"),
                reason: "llama_4_scaling_beta needs the original context length (a positive number) here".into(),
            })?;
        Ok(Some(QueryScale { beta, original_max_position_embeddings: original }))
    }
}
