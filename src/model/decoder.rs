//! The one parameterised decoder. Reads top to bottom like the checkpoint: `model.embed_tokens`,
//! `model.layers.{i}.{self_attn,mlp,*_layernorm}`, `model.norm`, `lm_head`. Family differences
//! are switches in [`DecoderConfig`].

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, Int, Tensor};

use crate::lora::LoraLinear;
use std::sync::Arc;

use crate::model::attention::{Attention, AttentionMask, LayerCache};
use crate::model::config::DecoderConfig;
use crate::model::mlp::Mlp;
use crate::model::moe::{Expert, MoeBlock};
use crate::model::norm::RmsNorm;
use crate::model::rope::{RopeConfig, RopeTables};
use crate::model::weights::WeightSource;
use crate::ops::{self, CrossEntropySpec, TemperBackend};
use crate::train::loss;
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
    pub self_attn: Attention<B>,
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

    /// `[batch, seq, hidden]` -> same.
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &ForwardContext<B>, cache: Option<&mut Option<LayerCache<B>>>) -> Tensor<B, 3> {
        let scaled = |t: Tensor<B, 3>| match self.residual_scale {
            Some(s) => t.mul_scalar(s),
            None => t,
        };
        let normed = match &self.input_layernorm {
            Some(norm) => norm.forward(x.clone()),
            None => x.clone(),
        };
        let rope = match (&ctx.local_rope, self.self_attn.local_rope) {
            (Some(local), true) => local,
            _ => &ctx.rope,
        };
        let h = self.self_attn.forward(normed, rope, &ctx.mask, cache);
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
    pub fn new(cfg: &DecoderConfig, positions: &[Vec<usize>], past_len: usize, segments: Option<Vec<Vec<u32>>>, dtype: DType, device: &B::Device) -> Self {
        let heads = [cfg.num_heads, cfg.num_kv_heads];
        let tables = |rope: &RopeConfig| rope.tables(positions, &heads, cfg.head_dim, dtype, device);
        ForwardContext {
            rope: tables(&cfg.rope),
            local_rope: cfg.local_rope.as_ref().map(tables),
            mask: AttentionMask {
                past_len,
                segments: segments.map(Arc::new),
            },
            router: None,
        }
    }

    /// The same context, recording the routers' outputs.
    pub fn recording_router(mut self) -> Self {
        self.router = Some(std::cell::RefCell::new(Vec::new()));
        self
    }
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<Option<LayerCache<B>>>,
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
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
    pub fn load_without_layers(cfg: &DecoderConfig, weights: &mut WeightSource, dtype: DType, device: &B::Device) -> Result<Self> {
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
    pub fn context(&self, positions: &[Vec<usize>], past_len: usize, segments: Option<Vec<Vec<u32>>>) -> ForwardContext<B> {
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
    pub fn hidden_states(&self, ids: Tensor<B, 2, Int>, ctx: &ForwardContext<B>, mut cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
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

fn load_embedding<B: Backend>(cfg: &DecoderConfig, weights: &mut WeightSource, dtype: DType, device: &B::Device) -> Result<Embedding<B>> {
    let embed = weights.tensor::<B, 2>("model.embed_tokens.weight", [cfg.vocab_size, cfg.hidden_size], dtype, device)?;
    Ok(Embedding { weight: Param::from_tensor(embed).set_require_grad(false) })
}

fn load_norm_and_head<B: Backend>(cfg: &DecoderConfig, weights: &mut WeightSource, dtype: DType, device: &B::Device) -> Result<(RmsNorm<B>, Option<LoraLinear<B>>)> {
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
pub fn load_layer<B: Backend>(cfg: &DecoderConfig, w: &mut WeightSource, i: usize, dtype: DType, device: &B::Device) -> Result<DecoderLayer<B>> {
    let p = format!("model.layers.{i}");
    let h = cfg.hidden_size;
    let (q_dim, kv_dim) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let mut proj = |name: &str, out: usize, inp: usize, bias: bool| -> Result<LoraLinear<B>> {
        let b = if bias {
            Some(w.tensor::<B, 1>(&format!("{p}.{name}.bias"), [out], dtype, device)?)
        } else {
            None
        };
        // A bitsandbytes 4-bit checkpoint keeps the projection packed (QLoRA).
        if let Some(q) = w.quant4::<B>(&format!("{p}.{name}.weight"), [out, inp], device)? {
            return Ok(LoraLinear::frozen_4bit(q, b, device));
        }
        let weight = w.tensor::<B, 2>(&format!("{p}.{name}.weight"), [out, inp], dtype, device)?;
        Ok(LoraLinear::frozen(weight, b))
    };
    let (q_proj, k_proj, v_proj, qkv_proj) = if cfg.fused_projections {
        (None, None, None, Some(proj("self_attn.qkv_proj", q_dim + 2 * kv_dim, h, false)?))
    } else {
        (
            Some(proj("self_attn.q_proj", q_dim, h, cfg.qkv_bias)?),
            Some(proj("self_attn.k_proj", kv_dim, h, cfg.qkv_bias)?),
            Some(proj("self_attn.v_proj", kv_dim, h, cfg.qkv_bias)?),
            None,
        )
    };
    let o_proj = proj("self_attn.o_proj", h, q_dim, cfg.o_bias)?;
    let mut dense = |prefix: &str, inter: usize| -> Result<Mlp<B>> {
        let (gate_proj, up_proj, gate_up_proj) = if cfg.fused_projections {
            (None, None, Some(proj(&format!("{prefix}.gate_up_proj"), 2 * inter, h, false)?))
        } else {
            (
                Some(proj(&format!("{prefix}.gate_proj"), inter, h, cfg.mlp_bias)?),
                Some(proj(&format!("{prefix}.up_proj"), inter, h, cfg.mlp_bias)?),
                None,
            )
        };
        let down_proj = proj(&format!("{prefix}.down_proj"), h, inter, cfg.mlp_bias)?;
        Ok(Mlp { gate_proj, up_proj, gate_up_proj, down_proj, activation: cfg.activation })
    };
    let (mlp, moe) = match &cfg.moe {
        Some(m) if m.is_sparse(i) => {
            let shared_expert = match m.shared_expert_intermediate {
                Some(si) => Some(dense("mlp.shared_expert", si)?),
                None => None,
            };
            (None, Some(load_moe(cfg, m, w, &p, shared_expert, dtype, device)?))
        }
        _ => (Some(dense("mlp", cfg.intermediate_size)?), None),
    };
    let sinks = if cfg.attention_sinks {
        let s = w.tensor::<B, 1>(&format!("{p}.self_attn.sinks"), [cfg.num_heads], DType::F32, device)?;
        let host: Vec<f32> = s.into_data().to_vec().map_err(|e| crate::Error::InvalidArgument(format!("reading {p}.self_attn.sinks: {e:?}")))?;
        Some(std::sync::Arc::new(host))
    } else {
        None
    };
    let (eps, off) = (cfg.rms_norm_eps, cfg.norm_offset);
    let mut norm = |name: &str, dim: usize| -> Result<RmsNorm<B>> {
        Ok(RmsNorm::new(w.norm(&format!("{p}.{name}.weight"), dim, device)?, eps, off))
    };
    let (q_norm, k_norm) = match (cfg.qk_norm, cfg.qk_norm_whole) {
        (true, false) => (Some(norm("self_attn.q_norm", cfg.head_dim)?), Some(norm("self_attn.k_norm", cfg.head_dim)?)),
        (true, true) => (Some(norm("self_attn.q_norm", q_dim)?), Some(norm("self_attn.k_norm", kv_dim)?)),
        _ => (None, None),
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
        self_attn: Attention {
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
            window: cfg.layer_windows.get(i).copied().flatten(),
            rope: cfg.layer_rope.get(i).copied().unwrap_or(true),
            local_rope: cfg.local_rope.is_some() && cfg.layer_windows.get(i).copied().flatten().is_some(),
            qk_norm_whole: cfg.qk_norm_whole,
            clip_qkv: cfg.clip_qkv,
            sinks,
        },
        post_attention_layernorm: norm("post_attention_layernorm", h)?,
        pre_feedforward_layernorm: pre_ff,
        post_feedforward_layernorm: post_ff,
        mlp,
        moe,
        residual_scale: cfg.residual_scale,
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
    if m.naming == ExpertNaming::GptOss {
        return load_gpt_oss_moe(m, w, p, h, dtype, device);
    }
    let fused_gu = format!("{p}.mlp.experts.gate_up_proj");
    let (block, names) = match m.naming {
        ExpertNaming::Mixtral if !w.contains(&fused_gu) => ("block_sparse_moe", ["w1", "w3", "w2"]),
        _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
    };
    let router = w.tensor::<B, 2>(&format!("{p}.{block}.gate.weight"), [e_count, h], dtype, device)?;
    let mut experts = Vec::with_capacity(e_count);
    if w.contains(&fused_gu) {
        let gu = w.tensor::<B, 3>(&fused_gu, [e_count, 2 * inter, h], dtype, device)?;
        let down = w.tensor::<B, 3>(&format!("{p}.mlp.experts.down_proj"), [e_count, h, inter], dtype, device)?;
        for e in 0..e_count {
            experts.push(Expert {
                gate_up_proj: LoraLinear::frozen(gu.clone().slice([e..e + 1]).reshape([2 * inter, h]), None),
                down_proj: LoraLinear::frozen(down.clone().slice([e..e + 1]).reshape([h, inter]), None),
            });
        }
    } else {
        for e in 0..e_count {
            let q = format!("{p}.{block}.experts.{e}");
            let gate = w.tensor::<B, 2>(&format!("{q}.{}.weight", names[0]), [inter, h], dtype, device)?;
            let up = w.tensor::<B, 2>(&format!("{q}.{}.weight", names[1]), [inter, h], dtype, device)?;
            let down = w.tensor::<B, 2>(&format!("{q}.{}.weight", names[2]), [h, inter], dtype, device)?;
            experts.push(Expert { gate_up_proj: LoraLinear::frozen(Tensor::cat(vec![gate, up], 0), None), down_proj: LoraLinear::frozen(down, None) });
        }
    }
    let shared_expert_gate = if shared_expert.is_some() {
        Some(LoraLinear::frozen(w.tensor::<B, 2>(&format!("{p}.mlp.shared_expert_gate.weight"), [1, h], dtype, device)?, None))
    } else {
        None
    };
    Ok(MoeBlock::new(m, LoraLinear::frozen(router, None), "gate", experts, shared_expert, shared_expert_gate))
}

/// gpt-oss's experts: fused `[E, H, 2I]` / `[E, I, H]` tensors used as `x @ W` (stored here
/// transposed, per expert, as every `LoraLinear` is `[out, in]`; gate and up stay interleaved),
/// their biases, and the biased router `mlp.router`. MXFP4 checkpoints (`*_blocks`, `*_scales`)
/// are dequantized as they load, as transformers does.
fn load_gpt_oss_moe<B: Backend>(m: &crate::model::config::MoeConfig, w: &mut WeightSource, p: &str, h: usize, dtype: DType, device: &B::Device) -> Result<MoeBlock<B>> {
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
            gate_up_proj: LoraLinear::frozen(gu.clone().slice([e..e + 1]).reshape([h, 2 * inter]).transpose(), Some(gu_bias.clone().slice([e..e + 1]).reshape([2 * inter]))),
            down_proj: LoraLinear::frozen(down.clone().slice([e..e + 1]).reshape([inter, h]).transpose(), Some(down_bias.clone().slice([e..e + 1]).reshape([h]))),
        })
        .collect();
    Ok(MoeBlock::new(m, LoraLinear::frozen(router, Some(router_bias)), "router", experts, None, None))
}
