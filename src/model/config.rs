//! `config.json` (Hugging Face) -> [`DecoderConfig`], the one set of switches the decoder reads.
//!
//! The supported families differ by a handful of switches; everything a family sets that this
//! decoder does not implement is refused here, with the key and value named, so a model is never
//! run wrongly.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::model::rope::{RopeConfig, RopeScaling};
use crate::{Error, Result};

/// The `model_type`s this decoder implements.
pub const SUPPORTED_MODEL_TYPES: &[&str] =
    &["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite", "smollm3", "olmo2", "olmo3", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"];

/// The sparse mixture-of-experts families among them.
pub const MOE_MODEL_TYPES: &[&str] = &["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"];

/// Vision-language checkpoints whose text decoder (`text_config`) is trained and evaluated on
/// its own; the vision tower is left out of the model and copied unchanged by merge.
pub const COMPOSITE_MODEL_TYPES: &[&str] = &["gemma3", "mistral3"];

/// `config.json` as Hugging Face writes it (only the keys this project reads).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub max_position_embeddings: Option<usize>,
    /// Phi-3 LongRoPE: the pre-training context (the long factors apply past it).
    pub original_max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    /// transformers >= 5 folds `rope_theta` and `rope_scaling` into this.
    pub rope_parameters: Option<Value>,
    pub partial_rotary_factor: Option<f64>,
    pub tie_word_embeddings: Option<bool>,
    pub hidden_act: Option<String>,
    pub hidden_activation: Option<String>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: RoPE theta of the sliding-window layers (the global layers use `rope_theta`).
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 3: layers slide except every `sliding_window_pattern`-th (when `layer_types` is absent).
    pub sliding_window_pattern: Option<usize>,
    /// EmbeddingGemma: attention is not causal.
    pub use_bidirectional_attention: Option<bool>,
    /// Granite: embeddings, q.k, residual branches and logits are scaled by these.
    pub embedding_multiplier: Option<f64>,
    pub attention_multiplier: Option<f64>,
    pub residual_multiplier: Option<f64>,
    pub logits_scaling: Option<f64>,
    /// SmolLM3: per layer, 1 where RoPE is applied and 0 where it is skipped (NoPE).
    pub no_rope_layers: Option<Vec<u8>>,
    pub no_rope_layer_interval: Option<usize>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub pad_token_id: Option<Value>,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
    pub quantization_config: Option<Value>,
    pub architectures: Option<Vec<String>>,
    /// Mixture of experts (qwen2_moe, qwen3_moe, olmoe: `num_experts`; mixtral: `num_local_experts`).
    pub num_experts: Option<usize>,
    pub num_local_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    pub norm_topk_prob: Option<bool>,
    pub decoder_sparse_step: Option<usize>,
    pub mlp_only_layers: Option<Vec<usize>>,
    pub shared_expert_intermediate_size: Option<usize>,
    pub router_aux_loss_coef: Option<f64>,
    pub output_router_logits: Option<bool>,
    pub router_jitter_noise: Option<f64>,
    /// Qwen2-MoE: q/k/v biases (transformers >= 5 spells it out; always on before).
    pub qkv_bias: Option<bool>,
    /// OLMoE: q, k and v are clamped to [-clip_qkv, clip_qkv] after their projections (and norms).
    pub clip_qkv: Option<f64>,
    /// gpt-oss: the clamped GLU of its experts.
    pub swiglu_alpha: Option<f64>,
    pub swiglu_limit: Option<f64>,
    /// Set when this is the `text_config` of a vision-language checkpoint: its `model_type`.
    #[serde(skip)]
    pub composite: Option<String>,
}

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
}

/// How the router turns logits into top-k weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routing {
    /// Softmax over all experts (f32), top-k, optionally renormalised (Mixtral, Qwen, OLMoE).
    SoftmaxTopK,
    /// Top-k of the logits, then a softmax over those k (gpt-oss).
    TopKSoftmax,
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
}

impl MoeConfig {
    pub fn is_sparse(&self, layer: usize) -> bool {
        self.sparse_layers.get(layer).copied().unwrap_or(false)
    }
}

/// Everything the decoder needs, derived once from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// Gemma stores RMSNorm weights as `w - 1` and multiplies by `1 + w`.
    pub norm_offset: f64,
    pub activation: Activation,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: RMSNorm over each head of q and k before RoPE.
    pub qk_norm: bool,
    /// OLMo 2: that RMSNorm spans the whole q and k projections instead of each head.
    pub qk_norm_whole: bool,
    /// OLMo 2: no norm before attention and MLP; their outputs are normed before the residual add.
    pub post_norms: bool,
    /// Phi-3: `qkv_proj` and `gate_up_proj` instead of separate projections.
    pub fused_projections: bool,
    /// Gemma 2: norms after attention and around the MLP.
    pub sandwich_norms: bool,
    pub tie_word_embeddings: bool,
    /// Gemma: embeddings are multiplied by sqrt(hidden_size).
    pub embed_scale: Option<f64>,
    /// Multiplier of q.k (1/sqrt(head_dim) unless `query_pre_attn_scalar` says otherwise).
    pub attn_scale: f64,
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// Per layer: `Some(w)` when that layer attends to the last `w` positions only.
    pub layer_windows: Vec<Option<usize>>,
    /// Per layer: whether q and k are rotated (SmolLM3 skips RoPE on some layers).
    pub layer_rope: Vec<bool>,
    /// Granite: attention and MLP outputs are multiplied by this before the residual add.
    pub residual_scale: Option<f64>,
    /// Granite: logits are divided by this.
    pub logits_divisor: Option<f64>,
    /// The RoPE of the global (full-attention) layers, and of every layer when `local_rope` is None.
    pub rope: RopeConfig,
    /// Gemma 3 and OLMo 3: the sliding-window layers' own RoPE (Gemma 3: `rope_local_base_freq`,
    /// unscaled; OLMo 3: the same theta, unscaled).
    pub local_rope: Option<RopeConfig>,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint declares (`torch_dtype` / `dtype`), e.g. "bfloat16".
    pub torch_dtype: Option<String>,
    /// The vision-language `model_type` (gemma3, mistral3) whose text decoder this is.
    pub composite: Option<String>,
    /// Sparse mixture-of-experts layers.
    pub moe: Option<MoeConfig>,
    /// OLMoE: q, k, v clamped to this magnitude.
    pub clip_qkv: Option<f64>,
    /// gpt-oss: a learned per-head logit in every softmax denominator (`self_attn.sinks`).
    pub attention_sinks: bool,
}

impl HfConfig {
    /// Read and parse a `config.json`.
    /// A vision-language checkpoint (`model_type` gemma3 or mistral3) gives its `text_config`,
    /// marked with [`HfConfig::composite`]. Keys a family's config class has defaults for and
    /// transformers leaves out of a nested `text_config` are filled in as the class would.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json_error = |source| Error::Json { path: path.to_path_buf(), source };
        let value: Value = serde_json::from_str(&text).map_err(json_error)?;
        let outer_type = value.get("model_type").and_then(Value::as_str).unwrap_or_default().to_string();
        let (mut obj, composite) = if COMPOSITE_MODEL_TYPES.contains(&outer_type.as_str()) {
            let mut text_config = match value.get("text_config") {
                Some(Value::Object(t)) => t.clone(),
                _ => {
                    return Err(Error::InvalidConfig {
                        path: path.to_path_buf(),
                        key: "text_config".into(),
                        reason: format!("a {outer_type} checkpoint needs its text decoder's config as an object here"),
                    })
                }
            };
            let default_text = if outer_type == "gemma3" { "gemma3_text" } else { "mistral" };
            text_config.entry("model_type").or_insert_with(|| Value::from(default_text));
            // Token ids and the dtype are often only given at the top level.
            for key in ["architectures", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "quantization_config"] {
                if let Some(v) = value.get(key).filter(|v| !v.is_null()) {
                    text_config.entry(key).or_insert_with(|| v.clone());
                }
            }
            (text_config, Some(outer_type))
        } else {
            match value {
                Value::Object(o) => (o, None),
                _ => return Err(Error::InvalidConfig { path: path.to_path_buf(), key: "config.json".into(), reason: "expected a JSON object".into() }),
            }
        };
        fill_class_defaults(&mut obj);
        let mut cfg: HfConfig = serde_json::from_value(Value::Object(obj)).map_err(json_error)?;
        cfg.composite = composite;
        Ok(cfg)
    }

    /// Derive the decoder switches, refusing anything this decoder would compute wrongly.
    /// `path` is only used to name the file in errors.
    pub fn to_decoder_config(&self, path: &Path) -> Result<DecoderConfig> {
        let mt = self.model_type.as_str();
        let unsupported = |key: &str, value: String, reason: &str| Error::Unsupported {
            path: path.to_path_buf(),
            key: key.to_string(),
            value,
            reason: reason.to_string(),
        };
        if !SUPPORTED_MODEL_TYPES.contains(&mt) {
            return Err(unsupported(
                "model_type",
                format!("{mt:?}"),
                &format!("supported: {}", SUPPORTED_MODEL_TYPES.join(", ")),
            ));
        }
        if let Some(q) = &self.quantization_config {
            // bitsandbytes 4-bit (nf4 / fp4) is read as it is stored; anything else is refused.
            let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("?");
            let four_bit = method == "bitsandbytes" && q.get("load_in_4bit").and_then(Value::as_bool) == Some(true);
            let kind = q.get("bnb_4bit_quant_type").and_then(Value::as_str).unwrap_or("fp4");
            if !four_bit || crate::quant::FourBit::from_name(kind).is_none() {
                let what = if method == "bitsandbytes" { format!("bitsandbytes {}", if four_bit { kind } else { "8-bit" }) } else { method.to_string() };
                return Err(unsupported(
                    "quantization_config",
                    compact(q),
                    &format!("{what} checkpoints are not supported (bitsandbytes 4-bit nf4 / fp4 are); use the unquantized weights"),
                ));
            }
        }
        let invalid = |key: &str, reason: String| Error::InvalidConfig {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(invalid(
                "num_key_value_heads",
                format!("{kv_heads} must be positive and divide num_attention_heads = {heads}"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if self.hidden_size % heads == 0 => self.hidden_size / heads,
            None => {
                return Err(invalid(
                    "head_dim",
                    format!("absent, and hidden_size {} is not a multiple of {heads} heads", self.hidden_size),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid("head_dim", format!("{head_dim} must be even for RoPE")));
        }

        let is_gemma = mt.starts_with("gemma");
        let is_olmo = mt == "olmo2" || mt == "olmo3";
        let moe = self.moe_config(path)?;
        if self.use_bidirectional_attention == Some(true) {
            return Err(unsupported("use_bidirectional_attention", "true".into(), "this is an embedding model (attention is not causal); Temper trains causal language models"));
        }
        let activation = self.activation(path)?;
        // The classes whose default ties the head (config.json omits a value equal to the default).
        let default_tie = is_gemma || mt == "smollm3";
        let sandwich = mt == "gemma2" || mt == "gemma3_text";
        let (qkv_bias, o_bias) = match mt {
            "qwen2" => (true, false),
            "qwen2_moe" => (self.qkv_bias.unwrap_or(true), false),
            "gpt_oss" => {
                let b = self.attention_bias.unwrap_or(true);
                (b, b)
            }
            "llama" | "qwen3" | "qwen3_moe" | "olmoe" | "gemma" | "gemma2" | "gemma3_text" | "granite" | "smollm3" | "olmo2" | "olmo3" => {
                let b = self.attention_bias.unwrap_or(false);
                (b, b)
            }
            _ => {
                if self.attention_bias == Some(true) {
                    return Err(unsupported("attention_bias", "true".into(), &format!("{mt} has no attention bias")));
                }
                (false, false)
            }
        };
        let mlp_bias = match mt {
            "llama" | "granite" | "smollm3" => self.mlp_bias.unwrap_or(false),
            _ if self.mlp_bias == Some(true) => {
                return Err(unsupported("mlp_bias", "true".into(), &format!("{mt} has no MLP bias")))
            }
            _ => false,
        };
        let attn_scale = match (mt, self.query_pre_attn_scalar) {
            ("gemma2" | "gemma3_text", Some(s)) => 1.0 / s.sqrt(),
            ("granite", _) => self.attention_multiplier.unwrap_or(1.0),
            _ => 1.0 / (head_dim as f64).sqrt(),
        };
        let granite = |v: Option<f64>| if mt == "granite" { Some(v.unwrap_or(1.0)) } else { None };
        if let Some(s) = granite(self.logits_scaling).filter(|s| *s == 0.0 || !s.is_finite()) {
            return Err(invalid("logits_scaling", format!("{s} must be a finite non-zero number (logits are divided by it)")));
        }
        let (attn_softcap, final_softcap) = if sandwich {
            (self.attn_logit_softcapping, self.final_logit_softcapping)
        } else {
            (None, None)
        };
        let max_pos = self.max_position_embeddings.unwrap_or(4096);
        let (rope, local_rope) = self.rope_configs(path, head_dim, max_pos)?;

        Ok(DecoderConfig {
            model_type: mt.to_string(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            norm_offset: if is_gemma { 1.0 } else { 0.0 },
            activation,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: mt == "qwen3" || mt == "qwen3_moe" || mt == "gemma3_text" || is_olmo || mt == "olmoe",
            qk_norm_whole: is_olmo || mt == "olmoe",
            post_norms: is_olmo,
            fused_projections: mt == "phi3",
            sandwich_norms: sandwich,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(default_tie),
            embed_scale: if is_gemma { Some((self.hidden_size as f64).sqrt()) } else { granite(self.embedding_multiplier) },
            attn_scale,
            attn_softcap,
            final_softcap,
            layer_windows: self.layer_windows(path)?,
            layer_rope: self.layer_rope(path)?,
            residual_scale: granite(self.residual_multiplier),
            logits_divisor: granite(self.logits_scaling),
            rope,
            local_rope,
            max_position_embeddings: max_pos,
            bos_token_id: first_id(&self.bos_token_id),
            eos_token_ids: all_ids(&self.eos_token_id),
            torch_dtype: self.torch_dtype.clone().or_else(|| self.dtype.clone()),
            composite: self.composite.clone(),
            moe,
            clip_qkv: if mt == "olmoe" { self.clip_qkv } else { None },
            attention_sinks: mt == "gpt_oss",
        })
    }

    /// The MoE switches of a sparse family, with the defaults of its transformers 5 config class.
    fn moe_config(&self, path: &Path) -> Result<Option<MoeConfig>> {
        let mt = self.model_type.as_str();
        if !MOE_MODEL_TYPES.contains(&mt) {
            return Ok(None);
        }
        let invalid = |key: &str, reason: String| Error::InvalidConfig { path: path.to_path_buf(), key: key.to_string(), reason };
        let (experts_key, default_experts, default_k) = match mt {
            "qwen3_moe" => ("num_experts", 128, 8),
            "qwen2_moe" => ("num_experts", 60, 4),
            "olmoe" => ("num_experts", 64, 8),
            "gpt_oss" => ("num_local_experts", 128, 4),
            _ => ("num_local_experts", 8, 2),
        };
        // transformers 5 writes `num_local_experts` for every family (an attribute alias).
        let local = matches!(mt, "mixtral" | "gpt_oss");
        let num_experts = if local { self.num_local_experts.or(self.num_experts) } else { self.num_experts.or(self.num_local_experts) }.unwrap_or(default_experts);
        let top_k = self.num_experts_per_tok.unwrap_or(default_k);
        if num_experts == 0 || top_k == 0 || top_k > num_experts {
            return Err(invalid("num_experts_per_tok", format!("{top_k} experts per token of {num_experts} ({experts_key}): need 1 <= k <= experts")));
        }
        let expert_intermediate = match mt {
            "qwen3_moe" | "qwen2_moe" => self.moe_intermediate_size.unwrap_or(if mt == "qwen3_moe" { 768 } else { 1408 }),
            _ => self.intermediate_size,
        };
        let n = self.num_hidden_layers;
        let (step, only) = match mt {
            "qwen3_moe" | "qwen2_moe" => (self.decoder_sparse_step.unwrap_or(1), self.mlp_only_layers.clone().unwrap_or_default()),
            _ => (1, Vec::new()),
        };
        if step == 0 {
            return Err(invalid("decoder_sparse_step", "must be positive".into()));
        }
        if let Some(&l) = only.iter().find(|&&l| l >= n) {
            return Err(invalid("mlp_only_layers", format!("names layer {l}, but the model has {n} layers")));
        }
        if let Some(j) = self.router_jitter_noise.filter(|j| *j != 0.0) {
            return Err(Error::Unsupported { path: path.to_path_buf(), key: "router_jitter_noise".into(), value: j.to_string(), reason: "router jitter (random input scaling while training) is not implemented; set it to 0".into() });
        }
        Ok(Some(MoeConfig {
            num_experts,
            top_k,
            expert_intermediate,
            norm_topk_prob: mt == "mixtral" || (mt != "gpt_oss" && self.norm_topk_prob.unwrap_or(false)),
            sparse_layers: (0..n).map(|i| !only.contains(&i) && (i + 1) % step == 0).collect(),
            shared_expert_intermediate: if mt == "qwen2_moe" { Some(self.shared_expert_intermediate_size.unwrap_or(5632)) } else { None },
            router_aux_loss_coef: self.router_aux_loss_coef.unwrap_or(if mt == "olmoe" { 0.01 } else { 0.001 }),
            naming: match mt {
                "mixtral" => ExpertNaming::Mixtral,
                "gpt_oss" => ExpertNaming::GptOss,
                _ => ExpertNaming::Qwen,
            },
            routing: if mt == "gpt_oss" { Routing::TopKSoftmax } else { Routing::SoftmaxTopK },
            activation: if mt == "gpt_oss" {
                ExpertActivation::ClampGlu { alpha: self.swiglu_alpha.unwrap_or(1.702), limit: self.swiglu_limit.unwrap_or(7.0) }
            } else {
                ExpertActivation::Glu(self.activation(path)?)
            },
            biases: mt == "gpt_oss",
        }))
    }

    fn activation(&self, path: &Path) -> Result<Activation> {
        // Gemma 2 reads `hidden_activation`; the others `hidden_act`.
        let (key, name) = match (&self.hidden_activation, &self.hidden_act) {
            (Some(a), _) if self.model_type == "gemma2" || self.model_type == "gemma3_text" || self.hidden_act.is_none() => ("hidden_activation", a.as_str()),
            (_, Some(a)) => ("hidden_act", a.as_str()),
            (Some(a), None) => ("hidden_activation", a.as_str()),
            (None, None) => ("hidden_act", if self.model_type.starts_with("gemma") { "gelu_pytorch_tanh" } else { "silu" }),
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

    /// The global RoPE and, for Gemma 3 and OLMo 3, the sliding layers' own. transformers >= 5
    /// may key `rope_parameters` by layer type (`full_attention`, `sliding_attention`).
    fn rope_configs(&self, path: &Path, head_dim: usize, max_pos: usize) -> Result<(RopeConfig, Option<RopeConfig>)> {
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

    /// Which layers rotate q and k: all, but for SmolLM3's NoPE layers (`no_rope_layers`, or
    /// every `no_rope_layer_interval`-th layer, 4 by default, as transformers derives it).
    fn layer_rope(&self, path: &Path) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        if self.model_type != "smollm3" {
            return Ok(vec![true; n]);
        }
        if let Some(flags) = &self.no_rope_layers {
            if flags.len() != n {
                return Err(Error::InvalidConfig { path: path.to_path_buf(), key: "no_rope_layers".into(), reason: format!("has {} entries for {n} layers", flags.len()) });
            }
            return Ok(flags.iter().map(|&f| f != 0).collect());
        }
        let every = self.no_rope_layer_interval.unwrap_or(4);
        if every == 0 {
            return Err(Error::InvalidConfig { path: path.to_path_buf(), key: "no_rope_layer_interval".into(), reason: "must be positive".into() });
        }
        Ok((0..n).map(|i| (i + 1) % every != 0).collect())
    }

    /// Which layers use sliding-window attention, with transformers' per-family rules.
    fn layer_windows(&self, path: &Path) -> Result<Vec<Option<usize>>> {
        let n = self.num_hidden_layers;
        let window = self.sliding_window;
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
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" => Ok(window),
                    other => Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        key: "layer_types".into(),
                        value: format!("{other:?}"),
                        reason: "supported: full_attention, sliding_attention".into(),
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
                    return Err(Error::InvalidConfig { path: path.to_path_buf(), key: "sliding_window_pattern".into(), reason: "must be positive".into() });
                }
                (0..n).map(|i| if (i + 1) % every != 0 { window } else { None }).collect()
            }
            "mistral" | "phi3" | "mixtral" => vec![window; n],
            "qwen2" | "qwen3" | "qwen2_moe" | "qwen3_moe" if self.use_sliding_window == Some(true) => {
                let first_full = self.max_window_layers.unwrap_or(n);
                (0..n).map(|i| if i >= first_full { window } else { None }).collect()
            }
            _ => vec![None; n],
        })
    }
}

impl DecoderConfig {
    /// Read `config.json` from a model folder and derive the decoder switches.
    pub fn from_model_dir(dir: &Path) -> Result<(HfConfig, DecoderConfig)> {
        let path: PathBuf = dir.join("config.json");
        let hf = HfConfig::from_file(&path)?;
        let cfg = hf.to_decoder_config(&path)?;
        Ok((hf, cfg))
    }

    /// The one-line notice for a vision-language checkpoint, whose vision tower is not loaded.
    pub fn composite_notice(&self) -> Option<String> {
        self.composite.as_ref().map(|outer| {
            format!("{outer} is a vision-language checkpoint: using its {} text decoder; the vision tower is not loaded (merge copies it unchanged)", self.model_type)
        })
    }

    /// Number of parameters of the base model (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let i = self.intermediate_size;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        let mut mlp = 3 * h * i;
        if self.mlp_bias {
            mlp += 2 * i + h;
        }
        let qk_norms = match (self.qk_norm, self.qk_norm_whole) {
            (true, true) => q + kv,
            (true, false) => 2 * self.head_dim,
            _ => 0,
        };
        let norms = h * if self.sandwich_norms { 4 } else { 2 } + qk_norms;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let layer_mlp = |l: usize| match &self.moe {
            Some(m) if m.is_sparse(l) => {
                let shared = m.shared_expert_intermediate.map_or(0, |si| 3 * h * si + h);
                m.num_experts * (3 * h * m.expert_intermediate + h) + shared
            }
            _ => mlp,
        };
        (0..self.num_layers).map(|l| attn + layer_mlp(l) + norms).sum::<usize>() + embed + head + h
    }
}

/// The defaults of the config classes that nested `text_config`s rely on (transformers writes
/// a sub-config's keys only where they differ from its class): Gemma3TextConfig and MistralConfig
/// as in transformers 4.57.
fn fill_class_defaults(obj: &mut serde_json::Map<String, Value>) {
    let defaults: &[(&str, Value)] = match obj.get("model_type").and_then(Value::as_str) {
        Some("gemma3_text") => &[
            ("vocab_size", Value::from(262_208)),
            ("hidden_size", Value::from(2304)),
            ("intermediate_size", Value::from(9216)),
            ("num_hidden_layers", Value::from(26)),
            ("num_attention_heads", Value::from(8)),
            ("num_key_value_heads", Value::from(4)),
            ("head_dim", Value::from(256)),
            ("hidden_activation", Value::from("gelu_pytorch_tanh")),
            ("max_position_embeddings", Value::from(131_072)),
            ("rms_norm_eps", Value::from(1e-6)),
            ("pad_token_id", Value::from(0)),
            ("eos_token_id", Value::from(1)),
            ("bos_token_id", Value::from(2)),
            ("tie_word_embeddings", Value::from(true)),
            ("rope_theta", Value::from(1_000_000.0)),
            ("rope_local_base_freq", Value::from(10_000.0)),
            ("query_pre_attn_scalar", Value::from(256)),
            ("sliding_window", Value::from(4096)),
        ],
        Some("mistral") => &[
            ("vocab_size", Value::from(32_000)),
            ("hidden_size", Value::from(4096)),
            ("intermediate_size", Value::from(14_336)),
            ("num_hidden_layers", Value::from(32)),
            ("num_attention_heads", Value::from(32)),
            ("num_key_value_heads", Value::from(8)),
            ("hidden_act", Value::from("silu")),
            ("max_position_embeddings", Value::from(131_072)),
            ("rms_norm_eps", Value::from(1e-6)),
            ("bos_token_id", Value::from(1)),
            ("eos_token_id", Value::from(2)),
            ("tie_word_embeddings", Value::from(false)),
            ("rope_theta", Value::from(10_000.0)),
            ("sliding_window", Value::from(4096)),
        ],
        _ => &[],
    };
    for (key, value) in defaults {
        obj.entry(*key).or_insert_with(|| value.clone());
    }
}

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "<unprintable>".into())
}

fn first_id(v: &Option<Value>) -> Option<u32> {
    all_ids(v).into_iter().next()
}

fn all_ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}
