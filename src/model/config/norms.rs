//! RMSNorm switches: epsilon, the `1 + w` weight offset, q/k norms and where the norms sit.

use super::attention::is_sandwich;
use super::mixers::is_delta_net_family;
use super::HfConfig;

/// The decoder's norm switches.
pub(super) struct Norms {
    pub eps: f64,
    /// Gemma, Qwen 3.5 and Qwen3-Next store RMSNorm weights as `w - 1` and multiply by `1 + w`.
    pub offset: f64,
    pub qk_norm: bool,
    pub qk_norm_whole: bool,
    pub post_norms: bool,
    pub sandwich: bool,
}

impl HfConfig {
    pub(super) fn norms(&self) -> Norms {
        let mt = self.model_type.as_str();
        let is_olmo = mt == "olmo2" || mt == "olmo3";
        // Qwen 3.5 / Qwen3-Next: `(1 + w)` RMSNorms for the decoder norms and the per-head q/k
        // norms (Qwen3_5RMSNorm, modeling_qwen3_5.py:917-934); the delta net's gated norm is
        // plain `w` (see `DeltaNetConfig`).
        let hybrid = is_delta_net_family(mt);
        Norms {
            eps: self.rms_norm_eps.unwrap_or(1e-6),
            offset: if mt.starts_with("gemma") || hybrid { 1.0 } else { 0.0 },
            qk_norm: mt == "qwen3" || mt == "qwen3_moe" || mt == "gemma3_text" || is_olmo || mt == "olmoe" || hybrid,
            qk_norm_whole: is_olmo || mt == "olmoe",
            post_norms: is_olmo,
            sandwich: is_sandwich(mt),
        }
    }
}
