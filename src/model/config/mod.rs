//! `config.json` (Hugging Face) -> [`DecoderConfig`], the one set of switches the decoder reads.
//!
//! The supported families differ by a handful of switches; everything a family sets that this
//! decoder does not implement is refused here, with the key and value named, so a model is never
//! run wrongly. The derivation is split by concern: attention shape and scales
//! ([`attention`]), norms ([`norms`]), the dense MLP ([`mlp`]), sparse experts ([`moe`]), RoPE
//! ([`rope`]), per-layer token mixers and the Gated DeltaNet ([`mixers`]), the per-family class defaults ([`defaults`]), composite (vision-language)
//! checkpoints ([`composite`]) and the parameter count ([`params`]).

mod attention;
mod composite;
mod defaults;
mod llama4;
mod mixers;
mod mla;
mod mlp;
mod moe;
mod norms;
mod params;
mod rope;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::model::rope::RopeConfig;
use crate::{Error, Result};

pub use llama4::AttnTemperature;
pub use mixers::{DeltaNetConfig, Mixer};
pub use mla::MlaConfig;
pub use mlp::Activation;
pub use moe::{ExpertActivation, ExpertNaming, MoeConfig, Routing};
pub use rope::QueryScale;

/// The `model_type`s this decoder implements.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "ministral3",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "granite",
    "smollm3",
    "olmo2",
    "olmo3",
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "gpt_oss",
    "qwen3_5_text",
    "qwen3_5_moe_text",
    "qwen3_next",
    "deepseek_v3",
    "deepseek_v2",
    "deepseek_v32",
    "llama4_text",
];

/// The sparse mixture-of-experts families among them.
pub const MOE_MODEL_TYPES: &[&str] = &[
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "gpt_oss",
    "qwen3_5_moe_text",
    "qwen3_next",
    "deepseek_v3",
    "deepseek_v2",
    "deepseek_v32",
    "llama4_text",
];

/// Vision-language checkpoints whose text decoder (`text_config`) is trained and evaluated on
/// its own; the vision tower is left out of the model and copied unchanged by merge.
pub const COMPOSITE_MODEL_TYPES: &[&str] = &["gemma3", "mistral3", "qwen3_5", "qwen3_5_moe", "llama4"];

/// `config.json` as Hugging Face writes it (only the keys this project reads).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    pub hidden_size: usize,
    /// The dense MLP's size; absent for Qwen 3.5 MoE, whose every layer is sparse.
    pub intermediate_size: Option<usize>,
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
    /// Qwen 3.5 / Qwen3-Next Gated DeltaNet layers.
    pub linear_num_key_heads: Option<usize>,
    pub linear_num_value_heads: Option<usize>,
    pub linear_key_head_dim: Option<usize>,
    pub linear_value_head_dim: Option<usize>,
    pub linear_conv_kernel_dim: Option<usize>,
    /// Qwen 3.5 / Qwen3-Next: every `full_attention_interval`-th layer attends (when `layer_types` is absent).
    pub full_attention_interval: Option<usize>,
    /// DeepSeek-V2 / V3 / V3.2 multi-head latent attention (`null` q_lora_rank: a plain q_proj).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: Option<usize>,
    pub qk_nope_head_dim: Option<usize>,
    pub qk_rope_head_dim: Option<usize>,
    pub v_head_dim: Option<usize>,
    pub rope_interleave: Option<bool>,
    /// DeepSeek-V3.2: keys the indexer keeps per query.
    pub index_topk: Option<usize>,
    /// DeepSeek routing: routed and shared experts, the scale of the routed sum, group-limited top-k.
    pub n_routed_experts: Option<usize>,
    pub n_shared_experts: Option<usize>,
    pub routed_scaling_factor: Option<f64>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    /// DeepSeek-V2: `greedy` or `group_limited_greedy`.
    pub topk_method: Option<String>,
    /// DeepSeek: the first `first_k_dense_replace` layers have a dense MLP.
    pub first_k_dense_replace: Option<usize>,
    /// DeepSeek-V3.2: per layer `dense` or `sparse` (derived from first_k_dense_replace when absent).
    pub mlp_layer_types: Option<Vec<String>>,
    /// Llama 4: the dense layers' MLP size (`intermediate_size` is each expert's), the sparse
    /// layers, the weightless q/k norm, chunked attention and the NoPE layers' query temperature.
    pub intermediate_size_mlp: Option<usize>,
    pub interleave_moe_layer_step: Option<usize>,
    pub moe_layers: Option<Vec<usize>>,
    pub use_qk_norm: Option<bool>,
    pub attention_chunk_size: Option<usize>,
    pub attn_temperature_tuning: Option<bool>,
    pub floor_scale: Option<f64>,
    pub attn_scale: Option<f64>,
    /// Set when this is the `text_config` of a vision-language checkpoint: its `model_type`.
    #[serde(skip)]
    pub composite: Option<String>,
}

/// Everything the decoder needs, derived once from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The dense MLP's size (0 when every layer is sparse: Qwen 3.5 MoE has no dense MLP).
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
    /// Per layer: attention or a gated delta net (`layer_types`: full_attention / linear_attention).
    pub layer_mixers: Vec<Mixer>,
    /// Qwen 3.5 / Qwen3-Next: the Gated DeltaNet of the `linear_attention` layers.
    pub delta_net: Option<DeltaNetConfig>,
    /// Qwen 3.5 / Qwen3-Next: `q_proj` holds `[q_h | gate_h]` per head (2 * heads * head_dim rows);
    /// the attention output is multiplied by sigmoid(gate) before o_proj.
    pub attn_output_gate: bool,
    /// Granite: attention and MLP outputs are multiplied by this before the residual add.
    pub residual_scale: Option<f64>,
    /// Granite: logits are divided by this.
    pub logits_divisor: Option<f64>,
    /// The RoPE of the global (full-attention) layers, and of every layer when `local_rope` is None.
    pub rope: RopeConfig,
    /// Gemma 3 and OLMo 3: the sliding-window layers' own RoPE (Gemma 3: `rope_local_base_freq`,
    /// unscaled; OLMo 3: the same theta, unscaled).
    pub local_rope: Option<RopeConfig>,
    /// Ministral 3: queries multiplied after RoPE by a factor that grows with the position.
    pub query_scale: Option<QueryScale>,
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
    /// DeepSeek-V2 / V3 / V3.2, Kimi K2: multi-head latent attention on every layer (the rotary
    /// tables then span `head_dim` = its `qk_rope_head_dim`).
    pub mla: Option<MlaConfig>,
    /// The feed-forward block's module name: `mlp`, or Llama 4's `feed_forward`.
    pub ffn_name: &'static str,
    /// Llama 4: the rotary dims pair up adjacently (`view_as_complex`), not first half with
    /// second half.
    pub rope_pairs: bool,
    /// Llama 4 (`use_qk_norm`): q and k of the RoPE layers go through a weightless RMS norm
    /// (eps `rms_norm_eps`) after RoPE.
    pub qk_weightless_norm: bool,
    /// Llama 4: the NoPE layers' query temperature.
    pub attn_temperature: Option<AttnTemperature>,
    /// Per layer: `Some(c)` when it attends within chunks of `c` positions (Llama 4's RoPE layers).
    pub layer_chunks: Vec<Option<usize>>,
}

impl HfConfig {
    /// Read and parse a `config.json`.
    /// A vision-language checkpoint (`COMPOSITE_MODEL_TYPES`) gives its `text_config`,
    /// marked with [`HfConfig::composite`]. Keys a family's config class has defaults for and
    /// transformers leaves out of a nested `text_config` are filled in as the class would.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json_error = |source| Error::Json { path: path.to_path_buf(), source };
        let value: Value = serde_json::from_str(&text).map_err(json_error)?;
        Self::from_value(path, value)
    }

    /// [`HfConfig::from_file`] on an already parsed `config.json` (`path` names it in errors).
    pub fn from_value(path: &Path, value: Value) -> Result<Self> {
        let json_error = |source| Error::Json { path: path.to_path_buf(), source };
        let (mut obj, composite) = composite::text_decoder_object(path, value)?;
        defaults::fill_class_defaults(&mut obj);
        let mut cfg: HfConfig = serde_json::from_value(Value::Object(obj)).map_err(json_error)?;
        cfg.composite = composite;
        Ok(cfg)
    }

    /// Derive the decoder switches, refusing anything this decoder would compute wrongly.
    /// `path` is only used to name the file in errors.
    pub fn to_decoder_config(&self, path: &Path) -> Result<DecoderConfig> {
        let mt = self.model_type.as_str();
        if !SUPPORTED_MODEL_TYPES.contains(&mt) {
            return Err(unsupported(
                path,
                "model_type",
                format!("{mt:?}"),
                &format!("supported: {}", SUPPORTED_MODEL_TYPES.join(", ")),
            ));
        }
        self.check_quantization(path)?;
        let shape = self.attention_shape(path)?;
        let moe = self.moe_config(path)?;
        if self.use_bidirectional_attention == Some(true) {
            return Err(unsupported(
                path,
                "use_bidirectional_attention",
                "true".into(),
                "this is an embedding model (attention is not causal); Temper trains causal language models",
            ));
        }
        let activation = self.activation(path)?;
        let intermediate_size = self.dense_intermediate_size(path, moe.as_ref())?;
        let layer_mixers = self.layer_mixers(path)?;
        let delta_net = self.delta_net(path)?;
        let mla = self.mla(path)?;
        let mut attn = self.attention_switches(path, shape.head_dim)?;
        if let Some(m) = &mla {
            attn.scale = self.mla_scale(m);
        }
        let mlp_bias = self.mlp_bias(path)?;
        let scales = self.scales(path)?;
        let max_pos = self.max_position_embeddings.unwrap_or(4096);
        let (rope, local_rope) = self.rope_configs(path, shape.head_dim, max_pos)?;
        let query_scale = self.query_scale(path)?;
        let norms = self.norms();
        let layer_rope = self.layer_rope(path)?;
        let llama4 = self.llama4_attention(path, &layer_rope)?;

        Ok(DecoderConfig {
            model_type: mt.to_string(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: shape.heads,
            num_kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
            rms_norm_eps: norms.eps,
            norm_offset: norms.offset,
            activation,
            qkv_bias: attn.qkv_bias,
            o_bias: attn.o_bias,
            mlp_bias,
            qk_norm: norms.qk_norm,
            qk_norm_whole: norms.qk_norm_whole,
            post_norms: norms.post_norms,
            fused_projections: mt == "phi3",
            sandwich_norms: norms.sandwich,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(defaults::default_tie(mt)),
            embed_scale: scales.embed_scale,
            attn_scale: attn.scale,
            attn_softcap: attn.softcap,
            final_softcap: scales.final_softcap,
            layer_windows: self.layer_windows(path)?,
            layer_rope,
            layer_mixers,
            delta_net,
            attn_output_gate: attn.output_gate,
            residual_scale: scales.residual_scale,
            logits_divisor: scales.logits_divisor,
            rope,
            local_rope,
            query_scale,
            max_position_embeddings: max_pos,
            bos_token_id: first_id(&self.bos_token_id),
            eos_token_ids: all_ids(&self.eos_token_id),
            torch_dtype: self.torch_dtype.clone().or_else(|| self.dtype.clone()),
            composite: self.composite.clone(),
            moe,
            clip_qkv: if mt == "olmoe" { self.clip_qkv } else { None },
            attention_sinks: mt == "gpt_oss",
            mla,
            ffn_name: if mt == "llama4_text" { "feed_forward" } else { "mlp" },
            rope_pairs: mt == "llama4_text",
            qk_weightless_norm: llama4.qk_norm,
            attn_temperature: llama4.temperature,
            layer_chunks: llama4.chunks,
        })
    }

    /// bitsandbytes 4-bit (nf4 / fp4) is read as it is stored, FP8 (e4m3 with block or
    /// per-tensor scales) is dequantized on load; any other quantization is refused, named.
    fn check_quantization(&self, path: &Path) -> Result<()> {
        let Some(q) = &self.quantization_config else { return Ok(()) };
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("?");
        if method == "fp8" {
            let fmt = q.get("fmt").and_then(Value::as_str).unwrap_or("e4m3");
            if fmt != "e4m3" {
                return Err(unsupported(
                    path,
                    "quantization_config.fmt",
                    compact(&Value::from(fmt)),
                    "FP8 checkpoints are read in e4m3 (float8_e4m3fn) only",
                ));
            }
            return Ok(());
        }
        let four_bit = method == "bitsandbytes" && q.get("load_in_4bit").and_then(Value::as_bool) == Some(true);
        let kind = q.get("bnb_4bit_quant_type").and_then(Value::as_str).unwrap_or("fp4");
        if !four_bit || crate::quant::FourBit::from_name(kind).is_none() {
            let what = match method {
                "bitsandbytes" => format!("bitsandbytes {}", if four_bit { kind } else { "8-bit" }),
                // Kimi K2 Thinking's INT4 experts and the like: name the scheme, not just the tool.
                "compressed-tensors" => compressed_tensors_scheme(q),
                _ => method.to_string(),
            };
            return Err(unsupported(
                path,
                "quantization_config",
                compact(q),
                &format!(
                    "{what} checkpoints are not supported (bitsandbytes 4-bit nf4 / fp4 and FP8 e4m3 are); use the unquantized weights"
                ),
            ));
        }
        Ok(())
    }
}

impl DecoderConfig {
    /// Refuse a sequence (`what`: what it is, for the message) this model cannot compute exactly:
    /// DeepSeek-V3.2 past its `index_topk`, where its indexer would start dropping keys.
    pub fn check_length(&self, len: usize, what: &str) -> Result<()> {
        match self.mla.as_ref().and_then(|m| m.dense_limit) {
            Some(limit) if len > limit => Err(Error::InvalidArgument(format!(
                "{what} is {len} tokens, but {} keeps only index_topk = {limit} keys per query past that length (its sparse \
                 attention); Temper computes its attention densely, which is exact up to {limit} tokens: use sequences of at \
                 most {limit} tokens",
                self.model_type
            ))),
            _ => Ok(()),
        }
    }

    /// Read `config.json` from a model folder and derive the decoder switches.
    pub fn from_model_dir(dir: &Path) -> Result<(HfConfig, DecoderConfig)> {
        let path: PathBuf = dir.join("config.json");
        let hf = HfConfig::from_file(&path)?;
        let cfg = hf.to_decoder_config(&path)?;
        Ok((hf, cfg))
    }
}

/// `compressed-tensors (pack-quantized, int4 weights in groups of 32)` from its config groups.
fn compressed_tensors_scheme(q: &Value) -> String {
    let format = q.get("format").and_then(Value::as_str).unwrap_or("?");
    let weights = q
        .get("config_groups")
        .and_then(Value::as_object)
        .and_then(|g| g.values().next())
        .and_then(|g| g.get("weights"));
    let detail = weights.map(|w| {
        let bits = w.get("num_bits").and_then(Value::as_u64).map_or("?".to_string(), |b| b.to_string());
        let kind = w.get("type").and_then(Value::as_str).unwrap_or("?");
        match w.get("group_size").and_then(Value::as_u64) {
            Some(g) => format!(", {kind}{bits} weights in groups of {g}"),
            None => format!(", {kind}{bits} weights"),
        }
    });
    format!("compressed-tensors ({format}{})", detail.unwrap_or_default())
}

/// A value this decoder does not implement (`key` = `value`), and why.
fn unsupported(path: &Path, key: &str, value: String, reason: &str) -> Error {
    Error::Unsupported { path: path.to_path_buf(), key: key.to_string(), value, reason: reason.to_string() }
}

/// A malformed or inconsistent value of `key`.
fn invalid(path: &Path, key: &str, reason: String) -> Error {
    Error::InvalidConfig { path: path.to_path_buf(), key: key.to_string(), reason }
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
