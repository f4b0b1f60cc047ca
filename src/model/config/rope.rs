//! The RoPE glue: `rope_theta`, `rope_scaling` / `rope_parameters` (flat or keyed by layer
//! type) and `partial_rotary_factor` -> [`RopeConfig`]s (the math lives in `model::rope`).

use std::path::Path;

use serde_json::Value;

use super::{compact, HfConfig};
use crate::model::rope::{RopeConfig, RopeScaling};
use crate::{Error, Result};

impl HfConfig {
    /// The global RoPE and, for Gemma 3 and OLMo 3, the sliding layers' own. transformers >= 5
    /// may key `rope_parameters` by layer type (`full_attention`, `sliding_attention`).
    pub(super) fn rope_configs(&self, path: &Path, head_dim: usize, max_pos: usize) -> Result<(RopeConfig, Option<RopeConfig>)> {
        let params = self.rope_parameters.as_ref().and_then(Value::as_object);
        let by_type = |t: &str| params.and_then(|p| p.get(t)).filter(|v| v.is_object());
        let rotary_dim = self.rotary_dim(path, head_dim)?;
        let (global, local) = match (by_type("full_attention"), by_type("sliding_attention")) {
            (Some(full), sliding) => {
                let global = self.rope_from(path, "rope_parameters.full_attention", Some(full), None, rotary_dim, max_pos)?;
                let local = match sliding {
                    Some(v) => Some(self.rope_from(path, "rope_parameters.sliding_attention", Some(v), None, rotary_dim, max_pos)?),
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
                let theta = self.rope_theta.or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64));
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
            "olmo3" => Some(local.unwrap_or(RopeConfig { theta: global.theta, rotary_dim, scaling: RopeScaling::Default })),
            _ => None,
        };
        Ok((global, local))
    }

    /// One RoPE from a `rope_scaling` / `rope_parameters` object (`key` names it in errors).
    fn rope_from(&self, path: &Path, key: &str, scaling: Option<&Value>, theta: Option<f64>, rotary_dim: usize, max_pos: usize) -> Result<RopeConfig> {
        let theta = theta
            .or_else(|| scaling.and_then(|v| v.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(10000.0);
        let scaling = match scaling {
            None => RopeScaling::Default,
            Some(v) => RopeScaling::from_json(v, max_pos, self.original_max_position_embeddings).map_err(|reason| Error::Unsupported {
                path: path.to_path_buf(),
                key: key.to_string(),
                value: compact(v),
                reason,
            })?,
        };
        let rope = RopeConfig { theta, rotary_dim, scaling };
        rope.check().map_err(|reason| Error::InvalidConfig { path: path.to_path_buf(), key: key.into(), reason })?;
        Ok(rope)
    }

    fn rotary_dim(&self, path: &Path, head_dim: usize) -> Result<usize> {
        let factor = self.partial_rotary_factor.unwrap_or(1.0);
        if !(factor > 0.0 && factor <= 1.0) {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                key: "partial_rotary_factor".into(),
                reason: format!("{factor} is not in (0, 1]"),
            });
        }
        let rotary_dim = ((head_dim as f64) * factor) as usize;
        if rotary_dim % 2 != 0 || rotary_dim == 0 {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                key: "partial_rotary_factor".into(),
                reason: format!("gives an odd or zero rotary dimension {rotary_dim} for head_dim {head_dim}"),
            });
        }
        Ok(rotary_dim)
    }
}
