//! Llama 4's attention switches (`llama4_text`, and the text decoder of `llama4`): rotary pairs
//! of adjacent dims, a weightless RMS norm of q and k after RoPE, no RoPE on every fourth layer
//! (where the queries get a temperature instead), and chunked attention on the RoPE layers
//! (transformers 5.25 `modeling_llama4.py:301-392`, `configuration_llama4.py`).

use std::path::Path;

use super::{invalid, HfConfig};
use crate::Result;

/// Llama 4's query temperature on its NoPE layers: queries are multiplied by
/// `1 + attn_scale · ln(1 + floor((p + 1) / floor_scale))`, with `p` the position counted from
/// the row's start (cached positions included: transformers uses `arange + past`, not the
/// position ids, so packed documents and left padding do not restart it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnTemperature {
    pub floor_scale: f64,
    pub attn_scale: f64,
}

impl AttnTemperature {
    /// The factor at position `p`, in f32 as transformers computes it.
    pub fn factor(&self, p: usize) -> f32 {
        let floor = ((p as f32 + 1.0) / self.floor_scale as f32).floor();
        floor.ln_1p() * self.attn_scale as f32 + 1.0
    }
}

/// What Llama 4 adds to attention, per model.
pub(super) struct Llama4Attention {
    pub qk_norm: bool,
    pub temperature: Option<AttnTemperature>,
    /// Per layer, the chunk of its chunked attention (RoPE layers), or `None` (NoPE layers).
    pub chunks: Vec<Option<usize>>,
}

impl HfConfig {
    /// Llama 4's attention switches (all off for the other families). `layer_rope` are the
    /// layers that rotate (`no_rope_layers`).
    pub(super) fn llama4_attention(&self, path: &Path, layer_rope: &[bool]) -> Result<Llama4Attention> {
        let n = self.num_hidden_layers;
        if self.model_type != "llama4_text" {
            return Ok(Llama4Attention { qk_norm: false, temperature: None, chunks: vec![None; n] });
        }
        let chunk = match self.attention_chunk_size {
            Some(0) => {
                return Err(invalid(path, "attention_chunk_size", "must be positive (or null: no chunking)".into()))
            }
            c => c,
        };
        // `layer_types`: chunked_attention on the RoPE layers, full_attention on the others.
        let chunks: Vec<Option<usize>> = match &self.layer_types {
            Some(types) if types.len() == n => types
                .iter()
                .map(|t| match t.as_str() {
                    "chunked_attention" => Ok(chunk),
                    "full_attention" => Ok(None),
                    other => Err(invalid(
                        path,
                        "layer_types",
                        format!("{other:?}: llama4_text layers are chunked_attention or full_attention"),
                    )),
                })
                .collect::<Result<_>>()?,
            Some(types) => {
                return Err(invalid(path, "layer_types", format!("has {} entries for {n} layers", types.len())))
            }
            None => layer_rope.iter().map(|&r| if r { chunk } else { None }).collect(),
        };
        let floor_scale = self.floor_scale.unwrap_or(8192.0);
        if floor_scale <= 0.0 {
            return Err(invalid(path, "floor_scale", format!("{floor_scale} must be positive")));
        }
        let temperature = (self.attn_temperature_tuning != Some(false))
            .then(|| AttnTemperature { floor_scale, attn_scale: self.attn_scale.unwrap_or(0.1) });
        Ok(Llama4Attention { qk_norm: self.use_qk_norm.unwrap_or(true), temperature, chunks })
    }
}
