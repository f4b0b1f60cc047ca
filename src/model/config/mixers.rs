//! The token mixer of each decoder layer: attention, or (Qwen 3.5 / Qwen3-Next) a gated delta
//! net, chosen per layer by `layer_types` as transformers 5.25 derives it.

use std::path::Path;

use super::{invalid, unsupported, HfConfig};
use crate::Result;

/// The families whose layers mix attention with Gated DeltaNet ("linear attention") layers.
pub(super) const DELTA_NET_MODEL_TYPES: &[&str] = &["qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"];

/// Whether `model_type` is a hybrid attention / Gated DeltaNet family.
pub(super) fn is_delta_net_family(model_type: &str) -> bool {
    DELTA_NET_MODEL_TYPES.contains(&model_type)
}

/// The token mixer of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mixer {
    Attention,
    GatedDeltaNet,
    /// DeepSeek's multi-head latent attention ([`super::MlaConfig`]), on every layer of its families.
    LatentAttention,
}

/// Qwen 3.5 / Qwen3-Next linear-attention (Gated DeltaNet) layers (`model.layers.L.linear_attn.*`).
///
/// With `Kd = num_k_heads * k_head_dim` and `Vd = num_v_heads * v_head_dim`: the causal
/// depthwise `conv1d` (`[2Kd + Vd, 1, conv_kernel]`, no bias, channels `[q | k | v]`) is followed
/// by silu (the family's `hidden_act`, checked to be silu); `A_log` and `dt_bias` are `[num_v_heads]`;
/// the output norm `linear_attn.norm` (`[v_head_dim]`) is a gated RMSNorm whose weight is used as
/// stored (plain `w`, initialised to ones), not the `1 + w` of the decoder norms, with the
/// decoder's `rms_norm_eps`, times silu(z); then `out_proj` `[hidden, Vd]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaNetConfig {
    /// `linear_num_key_heads`
    pub num_k_heads: usize,
    /// `linear_num_value_heads`, a multiple of `num_k_heads` (each key head serves
    /// `num_v_heads / num_k_heads` value heads).
    pub num_v_heads: usize,
    /// `linear_key_head_dim`
    pub k_head_dim: usize,
    /// `linear_value_head_dim`
    pub v_head_dim: usize,
    /// `linear_conv_kernel_dim`
    pub conv_kernel: usize,
    /// Qwen3-Next: `in_proj_qkvz` / `in_proj_ba` grouped per key head; Qwen 3.5: separate
    /// `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`.
    pub grouped: bool,
}

impl DeltaNetConfig {
    /// Parameters of one delta-net layer: in_proj_qkv `[2Kd+Vd, H]`, in_proj_z `[Vd, H]`,
    /// in_proj_b and in_proj_a `[Hv, H]` each (Qwen3-Next's grouped in_proj_qkvz / in_proj_ba
    /// hold the same rows), conv1d `[2Kd+Vd, 1, Kc]`, A_log and dt_bias `[Hv]`, norm `[dv]`,
    /// out_proj `[H, Vd]`.
    pub fn num_parameters(&self, hidden_size: usize) -> usize {
        let (h, hv) = (hidden_size, self.num_v_heads);
        let kd = self.num_k_heads * self.k_head_dim;
        let vd = hv * self.v_head_dim;
        let conv_dim = 2 * kd + vd;
        conv_dim * h + vd * h + 2 * hv * h + conv_dim * self.conv_kernel + 2 * hv + self.v_head_dim + h * vd
    }
}

impl HfConfig {
    /// Per layer, its token mixer. For the hybrid families, `layer_types` (`full_attention` /
    /// `linear_attention`) or, when absent, every `full_attention_interval`-th layer (4 by
    /// default) attends and the others are delta nets (`Qwen3_5TextConfig.__post_init__`).
    pub(super) fn layer_mixers(&self, path: &Path) -> Result<Vec<Mixer>> {
        let n = self.num_hidden_layers;
        if super::mla::is_mla_family(&self.model_type) {
            return Ok(vec![Mixer::LatentAttention; n]);
        }
        if !is_delta_net_family(&self.model_type) {
            return Ok(vec![Mixer::Attention; n]);
        }
        let Some(types) = &self.layer_types else {
            let every = self.full_attention_interval.unwrap_or(4);
            if every == 0 {
                return Err(invalid(path, "full_attention_interval", "must be positive".into()));
            }
            return Ok((0..n)
                .map(|i| if (i + 1) % every == 0 { Mixer::Attention } else { Mixer::GatedDeltaNet })
                .collect());
        };
        if types.len() != n {
            return Err(invalid(path, "layer_types", format!("has {} entries for {n} layers", types.len())));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(Mixer::Attention),
                "linear_attention" => Ok(Mixer::GatedDeltaNet),
                other => Err(unsupported(
                    path,
                    "layer_types",
                    format!("{other:?}"),
                    &format!("{} layers are full_attention or linear_attention", self.model_type),
                )),
            })
            .collect()
    }

    /// The delta-net switches of a hybrid family, with the defaults of its transformers 5.25
    /// config class (all three: 16 key heads, 32 value heads, head dims 128, kernel 4).
    pub(super) fn delta_net(&self, path: &Path) -> Result<Option<DeltaNetConfig>> {
        let mt = self.model_type.as_str();
        if !is_delta_net_family(mt) {
            return Ok(None);
        }
        let cfg = DeltaNetConfig {
            num_k_heads: self.linear_num_key_heads.unwrap_or(16),
            num_v_heads: self.linear_num_value_heads.unwrap_or(32),
            k_head_dim: self.linear_key_head_dim.unwrap_or(128),
            v_head_dim: self.linear_value_head_dim.unwrap_or(128),
            conv_kernel: self.linear_conv_kernel_dim.unwrap_or(4),
            grouped: mt == "qwen3_next",
        };
        for (key, v) in [
            ("linear_num_key_heads", cfg.num_k_heads),
            ("linear_num_value_heads", cfg.num_v_heads),
            ("linear_key_head_dim", cfg.k_head_dim),
            ("linear_value_head_dim", cfg.v_head_dim),
            ("linear_conv_kernel_dim", cfg.conv_kernel),
        ] {
            if v == 0 {
                return Err(invalid(path, key, "must be positive".into()));
            }
        }
        if !cfg.num_v_heads.is_multiple_of(cfg.num_k_heads) {
            return Err(invalid(
                path,
                "linear_num_value_heads",
                format!("{} is not a multiple of linear_num_key_heads = {} (each key head serves a whole number of value heads)", cfg.num_v_heads, cfg.num_k_heads),
            ));
        }
        // The short convolution's activation is `hidden_act` in transformers; the decoder applies silu.
        if let Some(act) = self.hidden_act.as_deref().filter(|a| !matches!(*a, "silu" | "swish")) {
            return Err(unsupported(
                path,
                "hidden_act",
                format!("{act:?}"),
                &format!("{mt} applies hidden_act after the delta net's convolution; only silu is supported"),
            ));
        }
        Ok(Some(cfg))
    }
}
