//! RMSNorm switches: epsilon, the `1 + w` weight offset, q/k norms and where the norms sit.

use super::attention::is_sandwich;
use super::HfConfig;

/// The decoder's norm switches.
pub(super) struct Norms {
    pub eps: f64,
    /// Gemma stores RMSNorm weights as `w - 1` and multiplies by `1 + w`.
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
        Norms {
            eps: self.rms_norm_eps.unwrap_or(1e-6),
            offset: if mt.starts_with("gemma") { 1.0 } else { 0.0 },
            qk_norm: mt == "qwen3" || mt == "qwen3_moe" || mt == "gemma3_text" || is_olmo || mt == "olmoe",
            qk_norm_whole: is_olmo || mt == "olmoe",
            post_norms: is_olmo,
            sandwich: is_sandwich(mt),
        }
    }
}
