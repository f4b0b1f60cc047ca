//! The one parameterised decoder. Reads top to bottom like the checkpoint: `model.embed_tokens`,
//! `model.layers.{i}.{self_attn,mlp,*_layernorm}`, `model.norm`, `lm_head`. Family differences
//! are switches in [`DecoderConfig`].

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};

use crate::lora::LoraLinear;
use std::sync::Arc;

use crate::model::attention::{Attention, AttentionMask, LayerCache};
use crate::model::config::{DecoderConfig, Mixer};
use crate::model::delta_net::{DeltaNetCache, GatedDeltaNet};
use crate::model::mla::LatentAttention;
use crate::model::mlp::Mlp;
use crate::model::moe::{Expert, MoeBlock};
use crate::model::norm::RmsNorm;
use crate::model::rope::{RopeConfig, RopeTables};
use crate::model::weights::WeightSource;
use crate::ops::loss;
use crate::ops::{self, CrossEntropySpec, TemperBackend};
use crate::Result;

/// `embed_tokens.weight`: `[vocab, hidden]`, frozen.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// `None` for OLMo 2, which norms the attention and MLP outputs instead.
    pub input_layernorm: Option<RmsNorm<B>>,
    /// The token mixer: attention (`self_attn`) or, on Qwen 3.5 / Qwen3-Next's linear-attention
    /// layers, a gated delta net (`linear_attn`); the loader builds exactly one.
    pub self_attn: Option<Attention<B>>,
    pub linear_attn: Option<GatedDeltaNet<B>>,
    /// DeepSeek's multi-head latent attention (`self_attn.*` in its checkpoints).
    pub latent_attn: Option<LatentAttention<B>>,
    /// Llama-style: the norm before the MLP. Gemma 2 and OLMo 2: the norm after attention.
    pub post_attention_layernorm: RmsNorm<B>,
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
    /// The dense MLP (`None` on a sparse layer).
    pub mlp: Option<Mlp<B>>,
    /// A sparse mixture-of-experts layer's MLP (named `mlp.*` as in transformers 5).
    pub moe: Option<MoeBlock<B>>,
    /// Granite: each branch's output is multiplied by this before the residual add.
    pub residual_scale: Option<f64>,
    /// The feed-forward block's module name in the checkpoint: `mlp`, or Llama 4's `feed_forward`.
    #[module(skip)]
    pub ffn_name: &'static str,
}

impl<B: TemperBackend> DecoderLayer<B> {
    /// The feed-forward branch: the dense MLP or the mixture of experts (whose routing is
    /// recorded in `ctx` when asked).
    pub fn feed_forward(&self, x: Tensor<B, 3>, ctx: &ForwardContext<B>) -> Tensor<B, 3> {
        match (&self.moe, &self.mlp) {
            (Some(moe), _) => match &ctx.router {
                Some(rec) => {
                    let (y, routing) = moe.forward_routed(x);
                    rec.borrow_mut().push(routing);
                    y
                }
                None => moe.forward(x),
            },
            (None, Some(mlp)) => mlp.forward(x),
            // The loader always builds one of the two.
            (None, None) => x,
        }
    }

    /// The token mixer's output for normed input `x` `[batch, seq, hidden]`.
    pub fn mix(
        &self,
        x: Tensor<B, 3>,
        ctx: &ForwardContext<B>,
        cache: Option<&mut Option<LayerState<B>>>,
    ) -> Tensor<B, 3> {
        if let Some(mla) = &self.latent_attn {
            return match cache {
                None => mla.forward(x, &ctx.rope, &ctx.mask, None),
                Some(slot) => {
                    let mut kv = match slot.take() {
                        Some(LayerState::Attention(c)) => Some(c),
                        _ => None,
                    };
                    let y = mla.forward(x, &ctx.rope, &ctx.mask, Some(&mut kv));
                    *slot = kv.map(LayerState::Attention);
                    y
                }
            };
        }
        match (&self.self_attn, &self.linear_attn) {
            (Some(attn), _) => {
                let rope = match (&ctx.local_rope, attn.local_rope) {
                    (Some(local), true) => local,
                    _ => &ctx.rope,
                };
                match cache {
                    None => attn.forward(x, rope, &ctx.mask, None),
                    Some(slot) => {
                        let mut kv = match slot.take() {
                            Some(LayerState::Attention(c)) => Some(c),
                            _ => None,
                        };
                        let y = attn.forward(x, rope, &ctx.mask, Some(&mut kv));
                        *slot = kv.map(LayerState::Attention);
                        y
                    }
                }
            }
            (None, Some(dn)) => {
                let segments = ctx.mask.segments.as_ref();
                match cache {
                    None => dn.forward(x, segments, None),
                    Some(slot) => {
                        let mut state = match slot.take() {
                            Some(LayerState::DeltaNet(c)) => Some(c),
                            _ => None,
                        };
                        let y = dn.forward(x, segments, Some(&mut state));
                        *slot = state.map(LayerState::DeltaNet);
                        y
                    }
                }
            }
            // The loader always builds one of the three.
            (None, None) => x,
        }
    }

    /// `[batch, seq, hidden]` -> same.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &ForwardContext<B>,
        cache: Option<&mut Option<LayerState<B>>>,
    ) -> Tensor<B, 3> {
        let scaled = |t: Tensor<B, 3>| match self.residual_scale {
            Some(s) => t.mul_scalar(s),
            None => t,
        };
        let normed = match &self.input_layernorm {
            Some(norm) => norm.forward(x.clone()),
            None => x.clone(),
        };
        let h = self.mix(normed, ctx, cache);
        match (&self.pre_feedforward_layernorm, &self.post_feedforward_layernorm) {
            (Some(pre), Some(post)) => {
                let x = x + self.post_attention_layernorm.forward(h);
                let m = self.feed_forward(pre.forward(x.clone()), ctx);
                x + post.forward(m)
            }
            (None, Some(post)) => {
                // OLMo 2: the branch outputs are normed, their inputs are not.
                let x = x + self.post_attention_layernorm.forward(h);
                let m = self.feed_forward(x.clone(), ctx);
                x + post.forward(m)
            }
            _ => {
                let x = x + scaled(h);
                let m = self.feed_forward(self.post_attention_layernorm.forward(x.clone()), ctx);
                x + scaled(m)
            }
        }
    }
}

/// `model.*` of a `*ForCausalLM` checkpoint.
#[derive(Module, Debug)]
pub struct DecoderModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// A causal language model: the decoder plus its output head.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: DecoderModel<B>,
    /// `None` when the head is tied to `model.embed_tokens`.
    pub lm_head: Option<LoraLinear<B>>,
    #[module(skip)]
    pub config: DecoderConfig,
}

/// Positions, masks and rotary tables for one forward call.
pub struct ForwardContext<B: Backend> {
    /// The tables of the global layers (of every layer when `local_rope` is None).
    pub rope: RopeTables<B>,
    /// Gemma 3 / OLMo 3: the sliding-window layers' tables.
    pub local_rope: Option<RopeTables<B>>,
    pub mask: AttentionMask,
    /// When set, every sparse layer records its router logits and choices here (the
    /// load-balancing loss, [`crate::model::moe::load_balancing_term`]).
    pub router: Option<std::cell::RefCell<Vec<crate::model::moe::RouterOutput<B>>>>,
}

impl<B: Backend> ForwardContext<B> {
    /// The context of a model with config `cfg` whose activations are `dtype` on `device`.
    pub fn new(
        cfg: &DecoderConfig,
        positions: &[Vec<usize>],
        past_len: usize,
        segments: Option<Vec<Vec<u32>>>,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        // MLA rotates each head's query and the one key all heads share.
        let heads = if cfg.mla.is_some() { [cfg.num_heads, 1] } else { [cfg.num_heads, cfg.num_kv_heads] };
        let query_scale = cfg.query_scale.map(|qs| {
            let b = positions.len();
            let t = positions.first().map_or(0, Vec::len);
            let factors: Vec<f32> = positions.iter().flatten().map(|&p| qs.factor(p)).collect();
            Tensor::<B, 4>::from_data(TensorData::new(factors, [b, t, 1, 1]), (device, DType::F32)).cast(dtype)
        });
        let tables = |rope: &RopeConfig| RopeTables {
            query_scale: query_scale.clone(),
            ..rope.tables(positions, &heads, cfg.head_dim, dtype, device)
        };
        ForwardContext {
            rope: tables(&cfg.rope),
            local_rope: cfg.local_rope.as_ref().map(tables),
            mask: AttentionMask { past_len, segments: segments.map(Arc::new) },
            router: None,
        }
    }

    /// The same context, recording the routers' outputs.
    pub fn recording_router(mut self) -> Self {
        self.router = Some(std::cell::RefCell::new(Vec::new()));
        self
    }
}

/// What one layer keeps between generation calls: keys and values, or a delta net's state.
#[derive(Debug, Clone)]
pub enum LayerState<B: Backend> {
    Attention(LayerCache<B>),
    DeltaNet(DeltaNetCache<B>),
}

/// Per-layer cache for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<Option<LayerState<B>>>,
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], len: 0 }
    }
}

impl<B: Backend> CausalLm<B> {
    /// Build the model from a weight source; matrices in `dtype`, norms in f32.
    pub fn load(cfg: &DecoderConfig, weights: &mut WeightSource, dtype: DType, device: &B::Device) -> Result<Self> {
        let embed = load_embedding(cfg, weights, dtype, device)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(load_layer(cfg, weights, i, dtype, device)?);
        }
        let (norm, lm_head) = load_norm_and_head(cfg, weights, dtype, device)?;
        Ok(Self { model: DecoderModel { embed_tokens: embed, layers, norm }, lm_head, config: cfg.clone() })
    }

    /// The model without its layers (embeddings, final norm, head), for running the layers
    /// one at a time as they are loaded ([`load_layer`]).
    pub fn load_without_layers(
        cfg: &DecoderConfig,
        weights: &mut WeightSource,
        dtype: DType,
        device: &B::Device,
    ) -> Result<Self> {
        let embed = load_embedding(cfg, weights, dtype, device)?;
        let (norm, lm_head) = load_norm_and_head(cfg, weights, dtype, device)?;
        Ok(Self { model: DecoderModel { embed_tokens: embed, layers: Vec::new(), norm }, lm_head, config: cfg.clone() })
    }

    /// The dtype activations flow in (that of the embedding matrix).
    pub fn dtype(&self) -> DType {
        self.model.embed_tokens.weight.val().dtype()
    }

    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.weight.val().device()
    }

    /// Rotary tables and masks for `positions` (one row per sequence), `past_len` cached
    /// positions, and optional per-row segment ids (packing).
    pub fn context(
        &self,
        positions: &[Vec<usize>],
        past_len: usize,
        segments: Option<Vec<Vec<u32>>>,
    ) -> ForwardContext<B> {
        ForwardContext::new(&self.config, positions, past_len, segments, self.dtype(), &self.device())
    }

    /// Plain causal context for a `[batch, seq]` call starting at position `past_len`.
    pub fn causal_context(&self, batch: usize, seq: usize, past_len: usize) -> ForwardContext<B> {
        let positions = vec![(past_len..past_len + seq).collect::<Vec<_>>(); batch];
        self.context(&positions, past_len, None)
    }

    /// Token embeddings (Gemma: scaled by sqrt(hidden), rounded to the activation dtype as
    /// transformers does): `[batch, seq]` -> `[batch, seq, hidden]`.
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        let h = self.config.hidden_size;
        let x = self.model.embed_tokens.weight.val().select(0, ids.reshape([b * t])).reshape([b, t, h]);
        match self.config.embed_scale {
            Some(scale) => {
                let s = Tensor::<B, 1>::from_floats([scale as f32], &self.device()).cast(x.dtype());
                x * s.unsqueeze::<3>()
            }
            None => x,
        }
    }
}

impl<B: TemperBackend> CausalLm<B> {
    /// Logits in f32: `[batch, seq, hidden]` hidden states -> `[batch, seq, vocab]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, t, h] = hidden.dims();
                let w = self.model.embed_tokens.weight.val();
                hidden.reshape([b * t, h]).matmul(w.transpose()).reshape([b, t, self.config.vocab_size])
            }
        };
        let logits = logits.cast(DType::F32);
        let logits = match self.config.logits_divisor {
            Some(d) => logits.div_scalar(d),
            None => logits,
        };
        match self.config.final_softcap {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        }
    }

    /// Final hidden states: `[batch, seq]` token ids -> `[batch, seq, hidden]`.
    pub fn hidden_states(
        &self,
        ids: Tensor<B, 2, Int>,
        ctx: &ForwardContext<B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let t = ids.dims()[1];
        let mut x = self.embed(ids);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, ctx, slot);
        }
        if let Some(c) = cache {
            c.len += t;
        }
        self.model.norm.forward(x)
    }

    /// `[batch, seq]` ids -> `[batch, seq, vocab]` f32 logits, plain causal attention.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        let ctx = self.causal_context(b, t, 0);
        self.logits(self.hidden_states(ids, &ctx, None))
    }

    /// Summed next-token NLL of final hidden states `[batch, seq, hidden]` against already
    /// shifted `targets` (`batch * seq` values, `IGNORE_INDEX` excluded) -> `[1]` f32. The head
    /// and the loss run chunked ([`ops::cross_entropy_sum`]), never holding `[tokens, vocab]`
    /// logits; a head with its own LoRA delta takes the plain path.
    pub fn nll_sum(&self, hidden: Tensor<B, 3>, targets: &[i64]) -> Tensor<B, 1> {
        let weight = match &self.lm_head {
            Some(head) if head.lora.is_some() => return loss::nll_sum(self.logits(hidden), targets),
            Some(head) => head.weight.val(),
            None => self.model.embed_tokens.weight.val(),
        };
        let [b, t, h] = hidden.dims();
        // Granite's logits / s = (hidden / s) . W^T.
        let hidden = match self.config.logits_divisor {
            Some(d) => hidden.div_scalar(d),
            None => hidden,
        };
        let spec = CrossEntropySpec::new(targets.to_vec(), self.config.final_softcap);
        ops::cross_entropy_sum(hidden.reshape([b * t, h]), weight, &spec)
    }
}

fn load_embedding<B: Backend>(
    cfg: &DecoderConfig,
    weights: &mut WeightSource,
    dtype: DType,
    device: &B::Device,
) -> Result<Embedding<B>> {
    let embed =
        weights.tensor::<B, 2>("model.embed_tokens.weight", [cfg.vocab_size, cfg.hidden_size], dtype, device)?;
    Ok(Embedding { weight: Param::from_tensor(embed).set_require_grad(false) })
}

fn load_norm_and_head<B: Backend>(
    cfg: &DecoderConfig,
    weights: &mut WeightSource,
    dtype: DType,
    device: &B::Device,
) -> Result<(RmsNorm<B>, Option<LoraLinear<B>>)> {
    let h = cfg.hidden_size;
    let norm = RmsNorm::new(weights.norm("model.norm.weight", h, device)?, cfg.rms_norm_eps, cfg.norm_offset);
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        let w = weights.tensor::<B, 2>("lm_head.weight", [cfg.vocab_size, h], dtype, device)?;
        Some(LoraLinear::frozen(w, None))
    };
    Ok((norm, lm_head))
}

/// Decoder layer `i` from a weight source (merge --verify streams the model layer by layer).
pub fn load_layer<B: Backend>(
    cfg: &DecoderConfig,
    w: &mut WeightSource,
    i: usize,
    dtype: DType,
    device: &B::Device,
) -> Result<DecoderLayer<B>> {
    let p = format!("model.layers.{i}");
    let h = cfg.hidden_size;
    let (mlp, moe) = match &cfg.moe {
        Some(m) if m.is_sparse(i) => {
            let shared_expert = match m.shared_expert_intermediate {
                Some(si) => Some(load_mlp(
                    cfg,
                    w,
                    &format!("{p}.{}.{}", cfg.ffn_name, m.shared_expert_name),
                    si,
                    dtype,
                    device,
                )?),
                None => None,
            };
            (None, Some(load_moe(cfg, m, w, &p, shared_expert, dtype, device)?))
        }
        _ => (Some(load_mlp(cfg, w, &format!("{p}.{}", cfg.ffn_name), cfg.intermediate_size, dtype, device)?), None),
    };
    let (self_attn, linear_attn, latent_attn) = match cfg.layer_mixers.get(i).copied().unwrap_or(Mixer::Attention) {
        Mixer::Attention => (Some(load_attention(cfg, w, &p, i, dtype, device)?), None, None),
        Mixer::GatedDeltaNet => (None, Some(load_delta_net(cfg, w, &p, dtype, device)?), None),
        Mixer::LatentAttention => (None, None, Some(load_latent_attention(cfg, w, &p, dtype, device)?)),
    };
    let (eps, off) = (cfg.rms_norm_eps, cfg.norm_offset);
    let mut norm = |name: &str, dim: usize| -> Result<RmsNorm<B>> {
        Ok(RmsNorm::new(w.norm(&format!("{p}.{name}.weight"), dim, device)?, eps, off))
    };
    let (pre_ff, post_ff) = if cfg.sandwich_norms {
        (Some(norm("pre_feedforward_layernorm", h)?), Some(norm("post_feedforward_layernorm", h)?))
    } else if cfg.post_norms {
        (None, Some(norm("post_feedforward_layernorm", h)?))
    } else {
        (None, None)
    };
    Ok(DecoderLayer {
        input_layernorm: if cfg.post_norms { None } else { Some(norm("input_layernorm", h)?) },
        self_attn,
        linear_attn,
        latent_attn,
        post_attention_layernorm: norm("post_attention_layernorm", h)?,
        pre_feedforward_layernorm: pre_ff,
        post_feedforward_layernorm: post_ff,
        mlp,
        moe,
        residual_scale: cfg.residual_scale,
        ffn_name: cfg.ffn_name,
    })
}

/// The projection `name` (`{name}.weight` `[out, in]`, optional `{name}.bias`); a bitsandbytes
/// 4-bit checkpoint (or quantize-on-load) keeps it packed (QLoRA).
fn load_proj<B: Backend>(
    w: &mut WeightSource,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
    dtype: DType,
    device: &B::Device,
) -> Result<LoraLinear<B>> {
    let b = if bias { Some(w.tensor::<B, 1>(&format!("{name}.bias"), [out], dtype, device)?) } else { None };
    if let Some(q) = w.quant4::<B>(&format!("{name}.weight"), [out, inp], device)? {
        return Ok(LoraLinear::frozen_4bit(q, b, device));
    }
    let weight = w.tensor::<B, 2>(&format!("{name}.weight"), [out, inp], dtype, device)?;
    Ok(LoraLinear::frozen(weight, b))
}

/// A dense gated MLP under `prefix` (`mlp`, `mlp.shared_expert`) of intermediate size `inter`.
fn load_mlp<B: Backend>(
    cfg: &DecoderConfig,
    w: &mut WeightSource,
    prefix: &str,
    inter: usize,
    dtype: DType,
    device: &B::Device,
) -> Result<Mlp<B>> {
    let h = cfg.hidden_size;
    let (gate_proj, up_proj, gate_up_proj) = if cfg.fused_projections {
        (None, None, Some(load_proj(w, &format!("{prefix}.gate_up_proj"), 2 * inter, h, false, dtype, device)?))
    } else {
        (
            Some(load_proj(w, &format!("{prefix}.gate_proj"), inter, h, cfg.mlp_bias, dtype, device)?),
            Some(load_proj(w, &format!("{prefix}.up_proj"), inter, h, cfg.mlp_bias, dtype, device)?),
            None,
        )
    };
    let down_proj = load_proj(w, &format!("{prefix}.down_proj"), h, inter, cfg.mlp_bias, dtype, device)?;
    Ok(Mlp { gate_proj, up_proj, gate_up_proj, down_proj, activation: cfg.activation })
}

/// Layer `p`'s self-attention (`{p}.self_attn.*`).
fn load_attention<B: Backend>(
    cfg: &DecoderConfig,
    w: &mut WeightSource,
    p: &str,
    i: usize,
    dtype: DType,
    device: &B::Device,
) -> Result<Attention<B>> {
    let h = cfg.hidden_size;
    let (q_dim, kv_dim) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let a = format!("{p}.self_attn");
    let (q_proj, k_proj, v_proj, qkv_proj) = if cfg.fused_projections {
        (None, None, None, Some(load_proj(w, &format!("{a}.qkv_proj"), q_dim + 2 * kv_dim, h, false, dtype, device)?))
    } else {
        // A gated attention's q_proj holds each head's query and gate.
        let q_rows = if cfg.attn_output_gate { 2 * q_dim } else { q_dim };
        (
            Some(load_proj(w, &format!("{a}.q_proj"), q_rows, h, cfg.qkv_bias, dtype, device)?),
            Some(load_proj(w, &format!("{a}.k_proj"), kv_dim, h, cfg.qkv_bias, dtype, device)?),
            Some(load_proj(w, &format!("{a}.v_proj"), kv_dim, h, cfg.qkv_bias, dtype, device)?),
            None,
        )
    };
    let o_proj = load_proj(w, &format!("{a}.o_proj"), h, q_dim, cfg.o_bias, dtype, device)?;
    let sinks = if cfg.attention_sinks {
        let s = w.tensor::<B, 1>(&format!("{a}.sinks"), [cfg.num_heads], DType::F32, device)?;
        let host: Vec<f32> =
            s.into_data().to_vec().map_err(|e| crate::Error::InvalidArgument(format!("reading {a}.sinks: {e:?}")))?;
        Some(Arc::new(host))
    } else {
        None
    };
    let (eps, off) = (cfg.rms_norm_eps, cfg.norm_offset);
    let mut norm = |name: &str, dim: usize| -> Result<RmsNorm<B>> {
        Ok(RmsNorm::new(w.norm(&format!("{a}.{name}.weight"), dim, device)?, eps, off))
    };
    let (q_norm, k_norm) = match (cfg.qk_norm, cfg.qk_norm_whole) {
        (true, false) => (Some(norm("q_norm", cfg.head_dim)?), Some(norm("k_norm", cfg.head_dim)?)),
        (true, true) => (Some(norm("q_norm", q_dim)?), Some(norm("k_norm", kv_dim)?)),
        _ => (None, None),
    };
    let window = cfg.layer_windows.get(i).copied().flatten();
    let rope = cfg.layer_rope.get(i).copied().unwrap_or(true);
    Ok(Attention {
        q_proj,
        k_proj,
        v_proj,
        qkv_proj,
        o_proj,
        q_norm,
        k_norm,
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        scale: cfg.attn_scale,
        softcap: cfg.attn_softcap,
        window,
        rope,
        local_rope: cfg.local_rope.is_some() && window.is_some(),
        qk_norm_whole: cfg.qk_norm_whole,
        clip_qkv: cfg.clip_qkv,
        sinks,
        output_gate: cfg.attn_output_gate,
        rope_pairs: cfg.rope_pairs,
        weightless_qk_norm: (cfg.qk_weightless_norm && rope).then_some(cfg.rms_norm_eps),
        temperature: cfg.attn_temperature.filter(|_| !rope),
        chunk: cfg.layer_chunks.get(i).copied().flatten(),
    })
}

/// Layer `p`'s multi-head latent attention (`{p}.self_attn.*`, DeepSeek's tensor names).
fn load_latent_attention<B: Backend>(
    cfg: &DecoderConfig,
    w: &mut WeightSource,
    p: &str,
    dtype: DType,
    device: &B::Device,
) -> Result<LatentAttention<B>> {
    let m = cfg.mla.clone().ok_or_else(|| {
        crate::Error::InvalidArgument(format!("{p} is a latent-attention layer, but the config has no MLA dimensions"))
    })?;
    let (h, heads) = (cfg.hidden_size, cfg.num_heads);
    let a = format!("{p}.self_attn");
    let q_rows = heads * m.qk_dim();
    let proj = |w: &mut WeightSource, name: &str, out: usize, inp: usize, bias: bool| {
        load_proj::<B>(w, &format!("{a}.{name}"), out, inp, bias, dtype, device)
    };
    let latent_norm = |w: &mut WeightSource, name: &str, dim: usize| -> Result<RmsNorm<B>> {
        Ok(RmsNorm::new(w.norm(&format!("{a}.{name}.weight"), dim, device)?, m.latent_norm_eps, 0.0))
    };
    let (q_proj, q_a_proj, q_a_layernorm, q_b_proj) = match m.q_lora_rank {
        None => (Some(proj(w, "q_proj", q_rows, h, false)?), None, None, None),
        Some(r) => (
            None,
            Some(proj(w, "q_a_proj", r, h, m.bias)?),
            Some(latent_norm(w, "q_a_layernorm", r)?),
            Some(proj(w, "q_b_proj", q_rows, r, false)?),
        ),
    };
    let kv_a_proj_with_mqa = proj(w, "kv_a_proj_with_mqa", m.kv_lora_rank + m.rope_dim, h, m.bias)?;
    let kv_a_layernorm = latent_norm(w, "kv_a_layernorm", m.kv_lora_rank)?;
    let kv_b_proj = proj(w, "kv_b_proj", heads * (m.nope_dim + m.v_dim), m.kv_lora_rank, false)?;
    let o_proj = proj(w, "o_proj", h, heads * m.v_dim, cfg.o_bias)?;
    Ok(LatentAttention {
        q_proj,
        q_a_proj,
        q_a_layernorm,
        q_b_proj,
        kv_a_proj_with_mqa,
        kv_a_layernorm,
        kv_b_proj,
        o_proj,
        num_heads: heads,
        kv_lora_rank: m.kv_lora_rank,
        nope_dim: m.nope_dim,
        rope_dim: m.rope_dim,
        v_dim: m.v_dim,
        scale: cfg.attn_scale,
        interleaved: m.interleaved,
    })
}

/// Layer `p`'s gated delta net (`{p}.linear_attn.*`), in Qwen 3.5's separate-projection layout
/// or Qwen3-Next's grouped one.
fn load_delta_net<B: Backend>(
    cfg: &DecoderConfig,
    w: &mut WeightSource,
    p: &str,
    dtype: DType,
    device: &B::Device,
) -> Result<GatedDeltaNet<B>> {
    let dn = cfg.delta_net.clone().ok_or_else(|| {
        crate::Error::InvalidArgument(format!(
            "{p} is a linear-attention layer, but the config has no delta-net dimensions"
        ))
    })?;
    let h = cfg.hidden_size;
    let (kd, vd, hv) = (dn.num_k_heads * dn.k_head_dim, dn.num_v_heads * dn.v_head_dim, dn.num_v_heads);
    let a = format!("{p}.linear_attn");
    let channels = 2 * kd + vd;
    let proj = |w: &mut WeightSource, name: &str, out: usize, inp: usize| {
        load_proj::<B>(w, &format!("{a}.{name}"), out, inp, false, dtype, device)
    };
    let (mut qkv, mut z, mut b, mut a_proj, mut qkvz, mut ba) = (None, None, None, None, None, None);
    if dn.grouped {
        qkvz = Some(proj(w, "in_proj_qkvz", 2 * kd + 2 * vd, h)?);
        ba = Some(proj(w, "in_proj_ba", 2 * hv, h)?);
    } else {
        qkv = Some(proj(w, "in_proj_qkv", channels, h)?);
        z = Some(proj(w, "in_proj_z", vd, h)?);
        b = Some(proj(w, "in_proj_b", hv, h)?);
        a_proj = Some(proj(w, "in_proj_a", hv, h)?);
    }
    let out_proj = proj(w, "out_proj", h, vd)?;
    let conv = w
        .tensor::<B, 3>(&format!("{a}.conv1d.weight"), [channels, 1, dn.conv_kernel], dtype, device)?
        .reshape([channels, dn.conv_kernel]);
    let frozen1 = |t: Tensor<B, 1>| Param::from_tensor(t).set_require_grad(false);
    let a_log = w.tensor::<B, 1>(&format!("{a}.A_log"), [hv], DType::F32, device)?;
    let dt_bias = w.tensor::<B, 1>(&format!("{a}.dt_bias"), [hv], DType::F32, device)?;
    // The gated norm multiplies by w itself (init ones), whatever the decoder's norms do.
    let norm = match w {
        WeightSource::Random { .. } => Tensor::ones([dn.v_head_dim], (device, DType::F32)),
        _ => w.norm(&format!("{a}.norm.weight"), dn.v_head_dim, device)?,
    };
    Ok(GatedDeltaNet {
        in_proj_qkv: qkv,
        in_proj_z: z,
        in_proj_b: b,
        in_proj_a: a_proj,
        in_proj_qkvz: qkvz,
        in_proj_ba: ba,
        conv1d: Param::from_tensor(conv).set_require_grad(false),
        a_log: frozen1(a_log),
        dt_bias: frozen1(dt_bias),
        norm: frozen1(norm),
        out_proj,
        cfg: dn,
        norm_eps: cfg.rms_norm_eps,
    })
}

/// Layer `p`'s mixture of experts: the router, each expert's gate/up (stacked) and down
/// projections from the Hub's per-expert tensors (`mlp.experts.{e}.gate_proj.weight`, Mixtral's
/// `block_sparse_moe.experts.{e}.w1/w3/w2.weight`) or transformers 5's fused 3-D ones
/// (`mlp.experts.gate_up_proj` `[E, 2I, H]`, `mlp.experts.down_proj` `[E, H, I]`).
fn load_moe<B: Backend>(
    cfg: &DecoderConfig,
    m: &crate::model::config::MoeConfig,
    w: &mut WeightSource,
    p: &str,
    shared_expert: Option<Mlp<B>>,
    dtype: DType,
    device: &B::Device,
) -> Result<MoeBlock<B>> {
    use crate::model::config::ExpertNaming;
    let (h, inter, e_count) = (cfg.hidden_size, m.expert_intermediate, m.num_experts);
    match m.naming {
        ExpertNaming::GptOss => return load_gpt_oss_moe(m, w, p, h, dtype, device),
        ExpertNaming::Llama4 => return load_llama4_moe(m, w, p, h, shared_expert, dtype, device),
        _ => {}
    }
    let fused_gu = format!("{p}.mlp.experts.gate_up_proj");
    let (block, names) = match m.naming {
        ExpertNaming::Mixtral if !w.contains(&fused_gu) => ("block_sparse_moe", ["w1", "w3", "w2"]),
        _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
    };
    // DeepSeek keeps its router in f32 (transformers' `_keep_in_fp32_modules_strict`).
    let router_dtype = if m.router_f32 { DType::F32 } else { dtype };
    let router = w.tensor::<B, 2>(&format!("{p}.{block}.gate.weight"), [e_count, h], router_dtype, device)?;
    let mut experts = Vec::with_capacity(e_count);
    if w.contains(&fused_gu) {
        let gu = w.tensor::<B, 3>(&fused_gu, [e_count, 2 * inter, h], dtype, device)?;
        let down = w.tensor::<B, 3>(&format!("{p}.mlp.experts.down_proj"), [e_count, h, inter], dtype, device)?;
        for e in 0..e_count {
            experts.push(Expert {
                gate_up_proj: LoraLinear::frozen(gu.clone().slice(e..e + 1).reshape([2 * inter, h]), None),
                down_proj: LoraLinear::frozen(down.clone().slice(e..e + 1).reshape([h, inter]), None),
            });
        }
    } else {
        for e in 0..e_count {
            let q = format!("{p}.{block}.experts.{e}");
            let gate = w.tensor::<B, 2>(&format!("{q}.{}.weight", names[0]), [inter, h], dtype, device)?;
            let up = w.tensor::<B, 2>(&format!("{q}.{}.weight", names[1]), [inter, h], dtype, device)?;
            let down = w.tensor::<B, 2>(&format!("{q}.{}.weight", names[2]), [h, inter], dtype, device)?;
            experts.push(Expert {
                gate_up_proj: LoraLinear::frozen(Tensor::cat(vec![gate, up], 0), None),
                down_proj: LoraLinear::frozen(down, None),
            });
        }
    }
    let shared_expert_gate = if shared_expert.is_some() && m.shared_expert_gated {
        Some(LoraLinear::frozen(
            w.tensor::<B, 2>(&format!("{p}.mlp.shared_expert_gate.weight"), [1, h], dtype, device)?,
            None,
        ))
    } else {
        None
    };
    let mut block =
        MoeBlock::new(m, LoraLinear::frozen(router, None), "gate", experts, shared_expert, shared_expert_gate);
    if matches!(m.routing, crate::model::config::Routing::SigmoidGrouped { .. }) {
        block.score_bias = Some(Arc::new(score_correction_bias::<B>(w, &format!("{p}.mlp.gate"), e_count, device)?));
    }
    Ok(block)
}

/// DeepSeek-V3's `{gate}.e_score_correction_bias` `[E]` (f32, on the host); zeros when the
/// checkpoint has none, as transformers initialises the buffer.
fn score_correction_bias<B: Backend>(
    w: &mut WeightSource,
    gate: &str,
    e_count: usize,
    device: &B::Device,
) -> Result<Vec<f32>> {
    let name = format!("{gate}.e_score_correction_bias");
    if matches!(w, WeightSource::Random { .. }) || !w.contains(&name) {
        return Ok(vec![0.0; e_count]);
    }
    let t = w.tensor::<B, 1>(&name, [e_count], DType::F32, device)?;
    t.into_data().to_vec().map_err(|e| crate::Error::InvalidArgument(format!("reading {name}: {e:?}")))
}

/// Llama 4's experts: fused `feed_forward.experts.gate_up_proj` `[E, H, 2I]` and `down_proj`
/// `[E, I, H]` used as `x @ W` (stored here transposed, per expert: `[2I, H]` with the gate rows
/// first, and `[H, I]`), the router `feed_forward.router`, and the always-on shared expert.
fn load_llama4_moe<B: Backend>(
    m: &crate::model::config::MoeConfig,
    w: &mut WeightSource,
    p: &str,
    h: usize,
    shared_expert: Option<Mlp<B>>,
    dtype: DType,
    device: &B::Device,
) -> Result<MoeBlock<B>> {
    let (inter, e_count) = (m.expert_intermediate, m.num_experts);
    let q = format!("{p}.feed_forward.experts");
    let router = w.tensor::<B, 2>(&format!("{p}.feed_forward.router.weight"), [e_count, h], dtype, device)?;
    let gu = w.tensor::<B, 3>(&format!("{q}.gate_up_proj"), [e_count, h, 2 * inter], dtype, device)?;
    let down = w.tensor::<B, 3>(&format!("{q}.down_proj"), [e_count, inter, h], dtype, device)?;
    let experts = (0..e_count)
        .map(|e| Expert {
            gate_up_proj: LoraLinear::frozen(gu.clone().slice(e..e + 1).reshape([h, 2 * inter]).transpose(), None),
            down_proj: LoraLinear::frozen(down.clone().slice(e..e + 1).reshape([inter, h]).transpose(), None),
        })
        .collect();
    Ok(MoeBlock::new(m, LoraLinear::frozen(router, None), "router", experts, shared_expert, None))
}

/// gpt-oss's experts: fused `[E, H, 2I]` / `[E, I, H]` tensors used as `x @ W` (stored here
/// transposed, per expert, as every `LoraLinear` is `[out, in]`; gate and up stay interleaved),
/// their biases, and the biased router `mlp.router`. MXFP4 checkpoints (`*_blocks`, `*_scales`)
/// are dequantized as they load, as transformers does.
fn load_gpt_oss_moe<B: Backend>(
    m: &crate::model::config::MoeConfig,
    w: &mut WeightSource,
    p: &str,
    h: usize,
    dtype: DType,
    device: &B::Device,
) -> Result<MoeBlock<B>> {
    let (inter, e_count) = (m.expert_intermediate, m.num_experts);
    let q = format!("{p}.mlp.experts");
    let router = w.tensor::<B, 2>(&format!("{p}.mlp.router.weight"), [e_count, h], dtype, device)?;
    let router_bias = w.tensor::<B, 1>(&format!("{p}.mlp.router.bias"), [e_count], dtype, device)?;
    // Each expert tensor in MXFP4 (`*_blocks` / `*_scales`) or as it is.
    let mut experts_tensor = |name: String, shape: [usize; 3]| -> Result<Tensor<B, 3>> {
        match w.mxfp4::<B>(&name, shape, dtype, device)? {
            Some(t) => Ok(t),
            None => w.tensor::<B, 3>(&name, shape, dtype, device),
        }
    };
    let gu = experts_tensor(format!("{q}.gate_up_proj"), [e_count, h, 2 * inter])?;
    let down = experts_tensor(format!("{q}.down_proj"), [e_count, inter, h])?;
    let gu_bias = w.tensor::<B, 2>(&format!("{q}.gate_up_proj_bias"), [e_count, 2 * inter], dtype, device)?;
    let down_bias = w.tensor::<B, 2>(&format!("{q}.down_proj_bias"), [e_count, h], dtype, device)?;
    let experts = (0..e_count)
        .map(|e| Expert {
            gate_up_proj: LoraLinear::frozen(
                gu.clone().slice(e..e + 1).reshape([h, 2 * inter]).transpose(),
                Some(gu_bias.clone().slice(e..e + 1).reshape([2 * inter])),
            ),
            down_proj: LoraLinear::frozen(
                down.clone().slice(e..e + 1).reshape([inter, h]).transpose(),
                Some(down_bias.clone().slice(e..e + 1).reshape([h])),
            ),
        })
        .collect();
    Ok(MoeBlock::new(m, LoraLinear::frozen(router, Some(router_bias)), "router", experts, None, None))
}
