//! Sparse mixture-of-experts layers: [`MoeConfig`] and the MoE defaults of each sparse family.

use std::path::Path;

use super::mlp::Activation;
use super::{HfConfig, MOE_MODEL_TYPES};
use crate::{Error, Result};

/// Where a sparse family's expert tensors sit in a checkpoint as the Hub ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertNaming {
    /// `mlp.gate.weight`, `mlp.experts.{e}.{gate,up,down}_proj.weight` (Qwen, OLMoE).
    Qwen,
    /// `block_sparse_moe.gate.weight`, `block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`.
    Mixtral,
    /// gpt-oss: `mlp.router.{weight,bias}`, fused `mlp.experts.gate_up_proj` `[E, H, 2I]` (x @ W,
    /// gate and up interleaved in its columns) with `gate_up_proj_bias` `[E, 2I]`, `down_proj`
    /// `[E, I, H]` with `down_proj_bias` `[E, H]`; or the MXFP4 `*_blocks` / `*_scales` of both.
    GptOss,
    /// Llama 4: `feed_forward.router.weight`, fused `feed_forward.experts.gate_up_proj`
    /// `[E, H, 2I]` (x @ W, gate columns then up columns) and `down_proj` `[E, I, H]`, no biases;
    /// `feed_forward.shared_expert.*`.
    Llama4,
}

/// How the router turns logits into top-k weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routing {
    /// Softmax over all experts (f32), top-k, optionally renormalised (Mixtral, Qwen, OLMoE).
    SoftmaxTopK,
    /// Top-k of the logits, then a softmax over those k (gpt-oss).
    TopKSoftmax,
    /// DeepSeek-V3 / V3.2 / Kimi K2 (`DeepseekV3TopkRouter`, f32): scores `sigmoid(logits)`;
    /// experts are chosen on `scores + e_score_correction_bias` among the `topk_group` best of
    /// `groups` equal groups (a group's score: the sum of its two best); the weights are the
    /// unbiased scores of the chosen experts.
    SigmoidGrouped { groups: usize, topk_group: usize },
    /// Llama 4 (`Llama4Router`): top-k of the logits, each chosen expert weighted by the sigmoid
    /// of its logit (the token is scaled by it before the expert: [`MoeConfig::scale_input`]).
    SigmoidTopK,
    /// DeepSeek-V2 (`DeepseekV2TopkRouter`): softmax scores, top-k (`greedy`), or top-k among
    /// the `topk_group` best groups by their best score (`group_limited_greedy`, other groups'
    /// scores set to 0); never renormalised.
    SoftmaxGrouped { groups: usize, topk_group: usize },
}

/// The experts' gated activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertActivation {
    /// `act(gate) * up`, gate and up the two halves of gate_up.
    Glu(Activation),
    /// gpt-oss: gate and up interleaved; `gate = min(gate, limit)`, `up = clamp(up, -limit,
    /// limit)`, `(up + 1) * gate * sigmoid(alpha * gate)`.
    ClampGlu { alpha: f64, limit: f64 },
}

/// A sparse mixture-of-experts MLP: a softmax router picks `top_k` of `num_experts` experts per
/// token (transformers' `*TopKRouter`).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Each expert's intermediate size.
    pub expert_intermediate: usize,
    /// Renormalise the top-k probabilities to sum to one (Mixtral always does).
    pub norm_topk_prob: bool,
    /// Per layer: whether its MLP is the sparse block (`decoder_sparse_step`, `mlp_only_layers`).
    pub sparse_layers: Vec<bool>,
    /// Qwen2-MoE: an always-on shared expert of this size, gated by sigmoid(shared_expert_gate).
    pub shared_expert_intermediate: Option<usize>,
    /// The load-balancing loss coefficient (used only when a recipe turns the loss on).
    pub router_aux_loss_coef: f64,
    pub naming: ExpertNaming,
    pub routing: Routing,
    pub activation: ExpertActivation,
    /// gpt-oss: the router and every expert projection have biases.
    pub biases: bool,
    /// DeepSeek: the routed experts' weighted sum is multiplied by this (1 elsewhere).
    pub routed_scaling: f64,
    /// Qwen: the shared expert's output is scaled by `sigmoid(shared_expert_gate(x))`; DeepSeek
    /// adds its shared experts ungated.
    pub shared_expert_gated: bool,
    /// The shared expert's module under `mlp.`: `shared_expert` (Qwen) or `shared_experts` (DeepSeek).
    pub shared_expert_name: &'static str,
    /// DeepSeek: the router runs in f32 (its weight kept in f32, as transformers'
    /// `_keep_in_fp32_modules_strict`), and `mlp.gate.e_score_correction_bias` is read (V3).
    pub router_f32: bool,
    /// Llama 4: each expert gets the token times its routing weight, `E(w·x)`, and its output is
    /// summed unweighted (elsewhere `w·E(x)`).
    pub scale_input: bool,
}

impl MoeConfig {
    pub fn is_sparse(&self, layer: usize) -> bool {
        self.sparse_layers.get(layer).copied().unwrap_or(false)
    }
}

impl HfConfig {
    /// The MoE switches of a sparse family, with the defaults of its transformers 5 config class.
    pub(super) fn moe_config(&self, path: &Path) -> Result<Option<MoeConfig>> {
        let mt = self.model_type.as_str();
        if !MOE_MODEL_TYPES.contains(&mt) {
            return Ok(None);
        }
        let invalid =
            |key: &str, reason: String| Error::InvalidConfig { path: path.to_path_buf(), key: key.to_string(), reason };
        // (key, experts, top-k, expert intermediate) defaults of each class.
        let (experts_key, default_experts, default_k, default_expert_i) = match mt {
            "qwen3_moe" => ("num_experts", 128, 8, 768),
            "qwen2_moe" => ("num_experts", 60, 4, 1408),
            // Qwen3_5MoeTextConfig (configuration_qwen3_5_moe.py:105-108).
            "qwen3_5_moe_text" => ("num_experts", 256, 8, 512),
            // Qwen3NextConfig (configuration_qwen3_next.py:110-113).
            "qwen3_next" => ("num_experts", 512, 10, 512),
            "olmoe" => ("num_experts", 64, 8, 0),
            "gpt_oss" => ("num_local_experts", 128, 4, 0),
            // DeepseekV3Config / DeepseekV32Config: 256 routed experts, top 8, 2048 wide.
            "deepseek_v3" | "deepseek_v32" => ("n_routed_experts", 256, 8, 2048),
            "llama4_text" => ("num_local_experts", 16, 1, 0),
            // DeepseekV2Config: 64 routed experts, 1407 wide; its num_experts_per_tok has no default.
            "deepseek_v2" => ("n_routed_experts", 64, 0, 1407),
            _ => ("num_local_experts", 8, 2, 0),
        };
        // transformers 5 writes `num_local_experts` for every family (an attribute alias).
        let local = matches!(mt, "mixtral" | "gpt_oss" | "llama4_text");
        let deepseek = mt.starts_with("deepseek");
        let num_experts = if deepseek {
            self.n_routed_experts.or(self.num_local_experts).or(self.num_experts)
        } else if local {
            self.num_local_experts.or(self.num_experts)
        } else {
            self.num_experts.or(self.num_local_experts)
        }
        .unwrap_or(default_experts);
        let top_k = self.num_experts_per_tok.unwrap_or(default_k);
        if num_experts == 0 || top_k == 0 || top_k > num_experts {
            return Err(invalid(
                "num_experts_per_tok",
                format!("{top_k} experts per token of {num_experts} ({experts_key}): need 1 <= k <= experts"),
            ));
        }
        let qwen_style = deepseek || matches!(mt, "qwen3_moe" | "qwen2_moe" | "qwen3_5_moe_text" | "qwen3_next");
        let expert_intermediate = match (qwen_style, self.intermediate_size) {
            (true, _) => self.moe_intermediate_size.unwrap_or(default_expert_i),
            (false, Some(i)) => i,
            (false, None) => {
                return Err(invalid("intermediate_size", "is required: it is each expert's size in this family".into()))
            }
        };
        if let Some(j) = self.router_jitter_noise.filter(|j| *j != 0.0) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                key: "router_jitter_noise".into(),
                value: j.to_string(),
                reason: "router jitter (random input scaling while training) is not implemented; set it to 0".into(),
            });
        }
        let shared_default = match mt {
            "qwen2_moe" => Some(5632),
            "qwen3_5_moe_text" | "qwen3_next" => Some(512),
            _ => None,
        };
        // DeepSeek: `n_shared_experts` experts of the routed size, run as one MLP.
        let llama4 = mt == "llama4_text";
        let shared_expert_intermediate = if llama4 {
            // Llama 4's shared expert has the experts' size and is always on.
            Some(expert_intermediate)
        } else if deepseek {
            let n = self.n_shared_experts.unwrap_or(if mt == "deepseek_v2" { 2 } else { 1 });
            (n > 0).then_some(n * expert_intermediate)
        } else {
            shared_default.map(|d| self.shared_expert_intermediate_size.unwrap_or(d))
        };
        let routing = self.routing(path, num_experts, top_k)?;
        Ok(Some(MoeConfig {
            num_experts,
            top_k,
            expert_intermediate,
            norm_topk_prob: match mt {
                // DeepseekV2TopkRouter never renormalises; V3 / V3.2 default to it.
                "deepseek_v2" => false,
                "deepseek_v3" | "deepseek_v32" => self.norm_topk_prob.unwrap_or(true),
                // Mixtral and Qwen 3.5 MoE always renormalise (Qwen3_5MoeTopKRouter has no switch,
                // modeling_qwen3_5_moe.py:988); Qwen3-Next defaults to it (configuration_qwen3_next.py:114).
                "mixtral" | "qwen3_5_moe_text" => true,
                "qwen3_next" => self.norm_topk_prob.unwrap_or(true),
                "gpt_oss" | "llama4_text" => false,
                _ => self.norm_topk_prob.unwrap_or(false),
            },
            sparse_layers: self.sparse_layers(path)?,
            shared_expert_intermediate,
            router_aux_loss_coef: self.router_aux_loss_coef.unwrap_or(if mt == "olmoe" { 0.01 } else { 0.001 }),
            naming: match mt {
                "mixtral" => ExpertNaming::Mixtral,
                "gpt_oss" => ExpertNaming::GptOss,
                "llama4_text" => ExpertNaming::Llama4,
                _ => ExpertNaming::Qwen,
            },
            routing,
            activation: if mt == "gpt_oss" {
                ExpertActivation::ClampGlu {
                    alpha: self.swiglu_alpha.unwrap_or(1.702),
                    limit: self.swiglu_limit.unwrap_or(7.0),
                }
            } else {
                ExpertActivation::Glu(self.activation(path)?)
            },
            biases: mt == "gpt_oss",
            routed_scaling: if deepseek {
                self.routed_scaling_factor.unwrap_or(if mt == "deepseek_v2" { 1.0 } else { 2.5 })
            } else {
                1.0
            },
            shared_expert_gated: !deepseek && !llama4,
            shared_expert_name: if deepseek { "shared_experts" } else { "shared_expert" },
            router_f32: deepseek,
            scale_input: llama4,
        }))
    }

    /// How the family's router picks experts; DeepSeek's group limits checked against the
    /// expert count (`n_group` must divide it, `topk_group` groups must hold at least k experts).
    fn routing(&self, path: &Path, experts: usize, top_k: usize) -> Result<Routing> {
        let invalid =
            |key: &str, reason: String| Error::InvalidConfig { path: path.to_path_buf(), key: key.to_string(), reason };
        let mt = self.model_type.as_str();
        let grouped = |groups: usize, topk_group: usize| -> Result<(usize, usize)> {
            if groups == 0 || !experts.is_multiple_of(groups) {
                return Err(invalid("n_group", format!("{groups} groups must divide the {experts} routed experts")));
            }
            if topk_group == 0 || topk_group > groups {
                return Err(invalid("topk_group", format!("{topk_group} must be between 1 and n_group = {groups}")));
            }
            if topk_group * (experts / groups) < top_k {
                return Err(invalid(
                    "topk_group",
                    format!(
                        "{topk_group} groups of {} experts hold fewer than the {top_k} experts each token needs",
                        experts / groups
                    ),
                ));
            }
            // V3 scores a group by the sum of its two best experts.
            if mt != "deepseek_v2" && experts / groups < 2 {
                return Err(invalid("n_group", format!("each group needs at least 2 experts ({experts} / {groups})")));
            }
            Ok((groups, topk_group))
        };
        Ok(match mt {
            "gpt_oss" => Routing::TopKSoftmax,
            "llama4_text" => Routing::SigmoidTopK,
            "deepseek_v3" | "deepseek_v32" => {
                let (groups, topk_group) = grouped(self.n_group.unwrap_or(8), self.topk_group.unwrap_or(4))?;
                Routing::SigmoidGrouped { groups, topk_group }
            }
            "deepseek_v2" => match self.topk_method.as_deref().unwrap_or("greedy") {
                "greedy" => Routing::SoftmaxGrouped { groups: 1, topk_group: 1 },
                "group_limited_greedy" => {
                    let (g, k) = grouped(self.n_group.unwrap_or(1), self.topk_group.unwrap_or(1))?;
                    Routing::SoftmaxGrouped { groups: g, topk_group: k }
                }
                other => {
                    return Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        key: "topk_method".into(),
                        value: format!("{other:?}"),
                        reason: "deepseek_v2 routes with greedy or group_limited_greedy".into(),
                    })
                }
            },
            _ => Routing::SoftmaxTopK,
        })
    }

    /// Per layer, whether its MLP is sparse: Qwen2-MoE, Qwen3-MoE and Qwen3-Next skip the
    /// `mlp_only_layers` and keep every `decoder_sparse_step`-th layer; the others (Qwen 3.5 MoE
    /// included, whose config class has neither key) are sparse everywhere.
    fn sparse_layers(&self, path: &Path) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        if self.model_type.starts_with("deepseek") {
            return self.deepseek_sparse_layers(path);
        }
        if self.model_type == "llama4_text" {
            return self.llama4_sparse_layers(path);
        }
        let (step, only) = match self.model_type.as_str() {
            "qwen3_moe" | "qwen2_moe" | "qwen3_next" => {
                (self.decoder_sparse_step.unwrap_or(1), self.mlp_only_layers.clone().unwrap_or_default())
            }
            _ => (1, Vec::new()),
        };
        if step == 0 {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                key: "decoder_sparse_step".into(),
                reason: "must be positive".into(),
            });
        }
        if let Some(&l) = only.iter().find(|&&l| l >= n) {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                key: "mlp_only_layers".into(),
                reason: format!("names layer {l}, but the model has {n} layers"),
            });
        }
        Ok((0..n).map(|i| !only.contains(&i) && (i + 1) % step == 0).collect())
    }

    /// DeepSeek: layers from `first_k_dense_replace` on are sparse (V3.2: `mlp_layer_types`
    /// when given, `dense` / `sparse` per layer).
    fn deepseek_sparse_layers(&self, path: &Path) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        if let (Some(types), "deepseek_v32") = (&self.mlp_layer_types, self.model_type.as_str()) {
            if types.len() != n {
                return Err(Error::InvalidConfig {
                    path: path.to_path_buf(),
                    key: "mlp_layer_types".into(),
                    reason: format!("has {} entries for {n} layers", types.len()),
                });
            }
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "dense" => Ok(false),
                    "sparse" => Ok(true),
                    other => Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        key: "mlp_layer_types".into(),
                        value: format!("{other:?}"),
                        reason: "each entry is dense or sparse".into(),
                    }),
                })
                .collect();
        }
        let dense = self.first_k_dense_replace.unwrap_or(if self.model_type == "deepseek_v2" { 0 } else { 3 });
        Ok((0..n).map(|i| i >= dense).collect())
    }

    /// Llama 4: `moe_layers`, or every `interleave_moe_layer_step`-th layer (the last of each step).
    fn llama4_sparse_layers(&self, path: &Path) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        let bad =
            |key: &str, reason: String| Error::InvalidConfig { path: path.to_path_buf(), key: key.into(), reason };
        let layers: Vec<usize> = match &self.moe_layers {
            Some(l) => l.clone(),
            None => {
                let step = self.interleave_moe_layer_step.unwrap_or(1);
                if step == 0 {
                    return Err(bad("interleave_moe_layer_step", "must be positive".into()));
                }
                (step - 1..n).step_by(step).collect()
            }
        };
        if let Some(&l) = layers.iter().find(|&&l| l >= n) {
            return Err(bad("moe_layers", format!("names layer {l}, but the model has {n} layers")));
        }
        Ok((0..n).map(|i| layers.contains(&i)).collect())
    }
}
