//! The dense MLP: its activation and bias.

use std::path::Path;

use super::moe::MoeConfig;
use super::{invalid, unsupported, HfConfig};
use crate::{Error, Result};

/// MLP activation functions found in the supported families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`
    Silu,
    /// `gelu_pytorch_tanh`, `gelu_new`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    Gelu,
}

impl HfConfig {
    pub(super) fn activation(&self, path: &Path) -> Result<Activation> {
        // Gemma 2 reads `hidden_activation`; the others `hidden_act`.
        let (key, name) = match (&self.hidden_activation, &self.hidden_act) {
            (Some(a), _)
                if self.model_type == "gemma2" || self.model_type == "gemma3_text" || self.hidden_act.is_none() =>
            {
                ("hidden_activation", a.as_str())
            }
            (_, Some(a)) => ("hidden_act", a.as_str()),
            (Some(a), None) => ("hidden_activation", a.as_str()),
            (None, None) => {
                ("hidden_act", if self.model_type.starts_with("gemma") { "gelu_pytorch_tanh" } else { "silu" })
            }
        };
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Activation::GeluTanh),
            "gelu" => Ok(Activation::Gelu),
            other => Err(Error::Unsupported {
                path: path.to_path_buf(),
                key: key.to_string(),
                value: format!("{other:?}"),
                reason: "supported: silu, gelu, gelu_pytorch_tanh".into(),
            }),
        }
    }

    /// `intermediate_size`, needed unless every layer is sparse (Qwen 3.5 MoE has no dense MLP
    /// and its config class no such key: 0 then).
    pub(super) fn dense_intermediate_size(&self, path: &Path, moe: Option<&MoeConfig>) -> Result<usize> {
        let all_sparse = moe.is_some_and(|m| (0..self.num_hidden_layers).all(|l| m.is_sparse(l)));
        // Llama 4: `intermediate_size` is each expert's; the dense layers use `intermediate_size_mlp`.
        if self.model_type == "llama4_text" {
            return Ok(self.intermediate_size_mlp.unwrap_or(16_384));
        }
        match self.intermediate_size {
            Some(i) => Ok(i),
            None if all_sparse => Ok(0),
            None => Err(invalid(path, "intermediate_size", "is required: layers of this model use a dense MLP".into())),
        }
    }

    pub(super) fn mlp_bias(&self, path: &Path) -> Result<bool> {
        let mt = self.model_type.as_str();
        match mt {
            "llama" | "granite" | "smollm3" => Ok(self.mlp_bias.unwrap_or(false)),
            _ if self.mlp_bias == Some(true) => {
                Err(unsupported(path, "mlp_bias", "true".into(), &format!("{mt} has no MLP bias")))
            }
            _ => Ok(false),
        }
    }
}
