//! Multi-head latent attention (DeepSeek-V2 / V3 / V3.2, Kimi K2, Moonlight): the third token
//! mixer beside attention and the gated delta net. Every layer of these families is MLA.
//!
//! Per layer (`model.layers.L.self_attn.*`, transformers 5.25 `modeling_deepseek_v3.py:349-483`):
//! the queries come from `q_proj` `[H·(dn + dr), hidden]`, or through a low-rank bottleneck
//! `q_a_proj` `[q_lora_rank, hidden]` -> `q_a_layernorm` -> `q_b_proj` `[H·(dn + dr), q_lora_rank]`;
//! `kv_a_proj_with_mqa` `[kv_lora_rank + dr, hidden]` gives the latent and one rotary key shared
//! by every head; `kv_a_layernorm` and `kv_b_proj` `[H·(dn + dv), kv_lora_rank]` expand the latent
//! to each head's non-rotary key and value; `o_proj` `[hidden, H·dv]`. RoPE turns only the `dr`
//! dims; the softmax scale is `(dn + dr)^-0.5`, times YaRN's `mscale²` when the rope has
//! `mscale_all_dim`.

use std::path::Path;

use serde_json::Value;

use super::{invalid, HfConfig};
use crate::Result;

/// The families whose every layer is multi-head latent attention. `kimi_k2` is read as
/// `deepseek_v3` (its config says so: [`super::defaults`] renames it on the way in).
pub(super) const MLA_MODEL_TYPES: &[&str] = &["deepseek_v3", "deepseek_v2", "deepseek_v32"];

/// Whether `model_type` is an MLA family.
pub(super) fn is_mla_family(model_type: &str) -> bool {
    MLA_MODEL_TYPES.contains(&model_type)
}

/// The shapes and switches of one MLA layer.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// `q_lora_rank`: `Some` when the queries pass through `q_a_proj` / `q_b_proj` (DeepSeek-V3,
    /// Kimi K2, V3.2), `None` for a plain `q_proj` (Moonlight, DeepSeek-V2-Lite).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    /// `qk_nope_head_dim`: the per-head key / query dims without position.
    pub nope_dim: usize,
    /// `qk_rope_head_dim`: the rotary dims (one key part shared by all heads).
    pub rope_dim: usize,
    /// `v_head_dim`
    pub v_dim: usize,
    /// `q_a_proj` and `kv_a_proj_with_mqa` have biases (`attention_bias`).
    pub bias: bool,
    /// The rotary dims come in adjacent pairs (V2, V3.2, and V3 unless `rope_interleave` is false).
    pub interleaved: bool,
    /// The eps of `q_a_layernorm` and `kv_a_layernorm`: their class builds them without the
    /// config's `rms_norm_eps`, so 1e-6.
    pub latent_norm_eps: f64,
    /// DeepSeek-V3.2: the indexer keeps `index_topk` keys per query. Up to that many positions
    /// it keeps every key and the model is dense MLA exactly; longer sequences are refused.
    pub dense_limit: Option<usize>,
}

impl MlaConfig {
    /// The query / key head dim `dn + dr`.
    pub fn qk_dim(&self) -> usize {
        self.nope_dim + self.rope_dim
    }

    /// Parameters of one MLA layer with `heads` heads on a `hidden`-wide model (norms included).
    pub fn num_parameters(&self, hidden: usize, heads: usize) -> usize {
        let q_rows = heads * self.qk_dim();
        let q = match self.q_lora_rank {
            Some(r) => hidden * r + r + r * q_rows + usize::from(self.bias) * r,
            None => hidden * q_rows,
        };
        let kv_a = (self.kv_lora_rank + self.rope_dim) * (hidden + usize::from(self.bias));
        let kv_b = self.kv_lora_rank * heads * (self.nope_dim + self.v_dim);
        let o = heads * self.v_dim * hidden + usize::from(self.bias) * hidden;
        q + kv_a + self.kv_lora_rank + kv_b + o
    }
}

impl HfConfig {
    /// The MLA switches of a DeepSeek-family config, with its class defaults (transformers 5.25
    /// `DeepseekV3Config`, `DeepseekV2Config`, `DeepseekV32Config`).
    pub(super) fn mla(&self, path: &Path) -> Result<Option<MlaConfig>> {
        let mt = self.model_type.as_str();
        if !is_mla_family(mt) {
            return Ok(None);
        }
        // `q_lora_rank: null` selects q_proj; a missing key was filled with the class default
        // (1536) by `defaults::fill_class_defaults`.
        let q_lora_rank = self.q_lora_rank;
        if q_lora_rank == Some(0) {
            return Err(invalid(path, "q_lora_rank", "must be positive, or null for a plain q_proj".into()));
        }
        if mt == "deepseek_v32" && q_lora_rank.is_none() {
            return Err(invalid(
                path,
                "q_lora_rank",
                "deepseek_v32 needs it (the indexer reads the query latent); null is only valid for V2 / V3".into(),
            ));
        }
        let cfg = MlaConfig {
            q_lora_rank,
            kv_lora_rank: self.kv_lora_rank.unwrap_or(512),
            nope_dim: self.qk_nope_head_dim.unwrap_or(128),
            rope_dim: self.qk_rope_head_dim.unwrap_or(64),
            v_dim: self.v_head_dim.unwrap_or(128),
            bias: self.attention_bias.unwrap_or(false),
            interleaved: self.rope_interleave.unwrap_or(true),
            latent_norm_eps: 1e-6,
            dense_limit: (mt == "deepseek_v32").then(|| self.index_topk.unwrap_or(2048)),
        };
        for (key, v) in [
            ("kv_lora_rank", cfg.kv_lora_rank),
            ("qk_nope_head_dim", cfg.nope_dim),
            ("qk_rope_head_dim", cfg.rope_dim),
            ("v_head_dim", cfg.v_dim),
        ] {
            if v == 0 {
                return Err(invalid(path, key, "must be positive".into()));
            }
        }
        if !cfg.rope_dim.is_multiple_of(2) {
            return Err(invalid(path, "qk_rope_head_dim", format!("{} must be even for RoPE", cfg.rope_dim)));
        }
        if self.rope_interleave == Some(false) && mt != "deepseek_v3" {
            return Err(invalid(path, "rope_interleave", format!("{mt} always rotates interleaved pairs")));
        }
        Ok(Some(cfg))
    }

    /// The softmax scale of MLA: `(dn + dr)^-0.5`, times `mscale²` with `mscale = 0.1 ·
    /// mscale_all_dim · ln(factor) + 1` when the rope is not the default one and has a non-zero
    /// `mscale_all_dim` (transformers' `yarn_apply_mscale`).
    pub(super) fn mla_scale(&self, mla: &MlaConfig) -> f64 {
        let base = 1.0 / (mla.qk_dim() as f64).sqrt();
        let Some(rope) = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()) else { return base };
        let kind = rope.get("rope_type").or_else(|| rope.get("type")).and_then(Value::as_str).unwrap_or("default");
        let all_dim = rope.get("mscale_all_dim").and_then(Value::as_f64).unwrap_or(0.0);
        let factor = rope.get("factor").and_then(Value::as_f64).unwrap_or(1.0);
        if kind == "default" || all_dim == 0.0 {
            return base;
        }
        let mscale = if factor <= 1.0 { 1.0 } else { 0.1 * all_dim * factor.ln() + 1.0 };
        base * mscale * mscale
    }
}
