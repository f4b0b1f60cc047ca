//! Attention: head counts and head_dim, biases, the q.k scale, softcaps, the per-layer
//! sliding windows and RoPE/NoPE pattern, and the embedding / residual / logit scales some
//! families add around the blocks.

use std::path::Path;

use super::mixers::is_delta_net_family;
use super::mla::is_mla_family;
use super::{invalid, unsupported, HfConfig};
use crate::{Error, Result};

/// Query and key/value heads and the per-head dimension.
pub(super) struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The attention projections' biases, the q.k scale, the attention-logit softcap and the
/// output gate.
pub(super) struct AttentionSwitches {
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub scale: f64,
    pub softcap: Option<f64>,
    /// Qwen 3.5 / Qwen3-Next: `q_proj` also yields a per-head gate; output * sigmoid(gate).
    pub output_gate: bool,
}

/// Gemma and Granite scales around the decoder blocks, and Gemma 2's final-logit softcap.
pub(super) struct Scales {
    pub embed_scale: Option<f64>,
    pub residual_scale: Option<f64>,
    pub logits_divisor: Option<f64>,
    pub final_softcap: Option<f64>,
}

impl HfConfig {
    pub(super) fn attention_shape(&self, path: &Path) -> Result<AttentionShape> {
        let heads = self.num_attention_heads;
        if is_mla_family(&self.model_type) {
            // MLA: `kv_b_proj` expands the latent to one key and value per query head, whatever
            // `num_key_value_heads` says, and the rotary tables span the rope dims only
            // (`head_dim = qk_rope_head_dim`, as the config classes set it).
            if heads == 0 {
                return Err(invalid(path, "num_attention_heads", "must be positive".into()));
            }
            return Ok(AttentionShape { heads, kv_heads: heads, head_dim: self.qk_rope_head_dim.unwrap_or(64) });
        }
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(invalid(
                path,
                "num_key_value_heads",
                format!("{kv_heads} must be positive and divide num_attention_heads = {heads}"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if self.hidden_size.is_multiple_of(heads) => self.hidden_size / heads,
            None => {
                return Err(invalid(
                    path,
                    "head_dim",
                    format!("absent, and hidden_size {} is not a multiple of {heads} heads", self.hidden_size),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid(path, "head_dim", format!("{head_dim} must be even for RoPE")));
        }
        Ok(AttentionShape { heads, kv_heads, head_dim })
    }

    pub(super) fn attention_switches(&self, path: &Path, head_dim: usize) -> Result<AttentionSwitches> {
        let mt = self.model_type.as_str();
        let (qkv_bias, o_bias) = match mt {
            "qwen2" => (true, false),
            "qwen2_moe" => (self.qkv_bias.unwrap_or(true), false),
            "gpt_oss" => {
                let b = self.attention_bias.unwrap_or(true);
                (b, b)
            }
            // Qwen 3.5 / Qwen3-Next: `attention_bias` on q, k, v and o (modeling_qwen3_5.py:836-847).
            "llama" | "qwen3" | "qwen3_moe" | "olmoe" | "gemma" | "gemma2" | "gemma3_text" | "granite" | "smollm3"
            | "olmo2" | "olmo3" | "qwen3_5_text" | "qwen3_5_moe_text" | "qwen3_next" | "deepseek_v3"
            | "deepseek_v2" | "deepseek_v32" => {
                let b = self.attention_bias.unwrap_or(false);
                (b, b)
            }
            _ => {
                if self.attention_bias == Some(true) {
                    return Err(unsupported(
                        path,
                        "attention_bias",
                        "true".into(),
                        &format!("{mt} has no attention bias"),
                    ));
                }
                (false, false)
            }
        };
        let scale = match (mt, self.query_pre_attn_scalar) {
            ("gemma2" | "gemma3_text", Some(s)) => 1.0 / s.sqrt(),
            ("granite", _) => self.attention_multiplier.unwrap_or(1.0),
            _ => 1.0 / (head_dim as f64).sqrt(),
        };
        let softcap = if is_sandwich(mt) { self.attn_logit_softcapping } else { None };
        Ok(AttentionSwitches { qkv_bias, o_bias, scale, softcap, output_gate: is_delta_net_family(mt) })
    }

    pub(super) fn scales(&self, path: &Path) -> Result<Scales> {
        let mt = self.model_type.as_str();
        let granite = |v: Option<f64>| if mt == "granite" { Some(v.unwrap_or(1.0)) } else { None };
        if let Some(s) = granite(self.logits_scaling).filter(|s| *s == 0.0 || !s.is_finite()) {
            return Err(invalid(
                path,
                "logits_scaling",
                format!("{s} must be a finite non-zero number (logits are divided by it)"),
            ));
        }
        Ok(Scales {
            embed_scale: if mt.starts_with("gemma") {
                Some((self.hidden_size as f64).sqrt())
            } else {
                granite(self.embedding_multiplier)
            },
            residual_scale: granite(self.residual_multiplier),
            logits_divisor: granite(self.logits_scaling),
            final_softcap: if is_sandwich(mt) { self.final_logit_softcapping } else { None },
        })
    }

    /// Which layers rotate q and k: all, but for SmolLM3's NoPE layers (`no_rope_layers`, or
    /// every `no_rope_layer_interval`-th layer, 4 by default, as transformers derives it).
    pub(super) fn layer_rope(&self, path: &Path) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        if !matches!(self.model_type.as_str(), "smollm3" | "llama4_text") {
            return Ok(vec![true; n]);
        }
        // Llama 4 reads an empty list as absent (`__post_init__`).
        if let Some(flags) = self.no_rope_layers.as_ref().filter(|f| !f.is_empty()) {
            if flags.len() != n {
                return Err(Error::InvalidConfig {
                    path: path.to_path_buf(),
                    key: "no_rope_layers".into(),
                    reason: format!("has {} entries for {n} layers", flags.len()),
                });
            }
            return Ok(flags.iter().map(|&f| f != 0).collect());
        }
        let every = self.no_rope_layer_interval.unwrap_or(4);
        if every == 0 {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                key: "no_rope_layer_interval".into(),
                reason: "must be positive".into(),
            });
        }
        Ok((0..n).map(|i| (i + 1) % every != 0).collect())
    }

    /// Which layers use sliding-window attention, with transformers' per-family rules.
    pub(super) fn layer_windows(&self, path: &Path) -> Result<Vec<Option<usize>>> {
        let n = self.num_hidden_layers;
        let window = self.sliding_window;
        // Llama 4's `layer_types` (chunked / full attention) are read by `llama4_attention`.
        if self.model_type == "llama4_text" {
            return Ok(vec![None; n]);
        }
        // SmolLM3 writes `layer_types` but slides only with `use_sliding_window`.
        if self.model_type == "smollm3" && self.use_sliding_window != Some(true) {
            return Ok(vec![None; n]);
        }
        if let Some(types) = &self.layer_types {
            if types.len() != n {
                return Err(Error::InvalidConfig {
                    path: path.to_path_buf(),
                    key: "layer_types".into(),
                    reason: format!("has {} entries for {n} layers", types.len()),
                });
            }
            // The hybrid families' `linear_attention` layers are delta nets (no window); they have
            // no sliding layers. DeepSeek-V3.2's `indexed_attention` layers are dense MLA up to
            // its `index_topk` (no window either).
            let hybrid = is_delta_net_family(&self.model_type);
            let indexed = self.model_type == "deepseek_v32";
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" if !hybrid => Ok(window),
                    "linear_attention" if hybrid => Ok(None),
                    "indexed_attention" if indexed => Ok(None),
                    other => Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        key: "layer_types".into(),
                        value: format!("{other:?}"),
                        reason: if hybrid {
                            "supported: full_attention, linear_attention"
                        } else {
                            "supported: full_attention, sliding_attention"
                        }
                        .into(),
                    }),
                })
                .collect();
        }
        Ok(match self.model_type.as_str() {
            // Gemma 2 alternates: even layers slide, odd layers are global.
            "gemma2" => (0..n).map(|i| if i % 2 == 0 { window } else { None }).collect(),
            // Gemma 3: every `sliding_window_pattern`-th layer (6 by default) is global; OLMo 3: every 4th.
            "gemma3_text" | "olmo3" => {
                let every = if self.model_type == "olmo3" { 4 } else { self.sliding_window_pattern.unwrap_or(6) };
                if every == 0 {
                    return Err(Error::InvalidConfig {
                        path: path.to_path_buf(),
                        key: "sliding_window_pattern".into(),
                        reason: "must be positive".into(),
                    });
                }
                (0..n).map(|i| if (i + 1) % every != 0 { window } else { None }).collect()
            }
            "mistral" | "ministral3" | "phi3" | "mixtral" => vec![window; n],
            "qwen2" | "qwen3" | "qwen2_moe" | "qwen3_moe" if self.use_sliding_window == Some(true) => {
                let first_full = self.max_window_layers.unwrap_or(n);
                (0..n).map(|i| if i >= first_full { window } else { None }).collect()
            }
            _ => vec![None; n],
        })
    }
}

/// Gemma 2 and 3: norms after attention and around the MLP, and softcaps.
pub(super) fn is_sandwich(model_type: &str) -> bool {
    model_type == "gemma2" || model_type == "gemma3_text"
}
