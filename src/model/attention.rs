//! Multi-head attention with grouped-query heads, the causal / sliding-window / segment masks,
//! and the KV cache used by generation. The attention itself is [`ops::attention`].

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use crate::lora::LoraLinear;
use crate::model::config::AttnTemperature;
use crate::model::norm::RmsNorm;
use crate::model::rope::RopeTables;
use crate::ops::{self, AttentionSpec, TemperBackend};

/// What each query may attend to, for one forward call: causal over the row (keys after the
/// query are blocked), within the layer's sliding window, and within its packing segment.
/// Blocks are formed on the device inside [`ops::attention`]; nothing `[q_len, k_len]` is
/// built on the host.
#[derive(Debug, Clone, Default)]
pub struct AttentionMask {
    /// Positions already in the KV cache before this call.
    pub past_len: usize,
    /// Per row, a segment id per key position (past + new): a query attends only to keys of its
    /// own segment. Used by packing, where several documents share one row.
    pub segments: Option<Arc<Vec<Vec<u32>>>>,
}

/// Keys and values of one layer, `[batch, kv_heads, positions, head_dim]`.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
}

/// Self-attention of one decoder layer. Field names follow the checkpoint.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Option<LoraLinear<B>>,
    pub k_proj: Option<LoraLinear<B>>,
    pub v_proj: Option<LoraLinear<B>>,
    /// Phi-3: q, k and v in one projection.
    pub qkv_proj: Option<LoraLinear<B>>,
    pub o_proj: LoraLinear<B>,
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub softcap: Option<f64>,
    pub window: Option<usize>,
    /// Whether q and k are rotated (false: a NoPE layer).
    pub rope: bool,
    /// Gemma 3 / OLMo 3: a sliding layer, rotated with the local RoPE tables.
    pub local_rope: bool,
    /// OLMo 2: `q_norm` / `k_norm` span the whole projection, not each head.
    pub qk_norm_whole: bool,
    /// OLMoE: q, k and v clamped to `[-c, c]` (after the whole-projection norms).
    pub clip_qkv: Option<f64>,
    /// gpt-oss: the per-head attention sinks (`self_attn.sinks`), frozen, kept on the host: the
    /// attention kernel takes them as constants.
    #[module(skip)]
    pub sinks: Option<Arc<Vec<f32>>>,
    /// Qwen 3.5 / Qwen3-Next: `q_proj` gives `[q_h | gate_h]` per head, and the attention output
    /// is multiplied by `sigmoid(gate)` before `o_proj`.
    pub output_gate: bool,
    /// Llama 4: the rotary dims pair up adjacently (`2i`, `2i + 1`); they are de-interleaved
    /// (evens, then odds) before the rotate-half rotation, for q and k alike, which keeps their
    /// dot products.
    pub rope_pairs: bool,
    /// Llama 4 (RoPE layers): a weightless RMS norm of q and k after RoPE, with this eps.
    pub weightless_qk_norm: Option<f64>,
    /// Llama 4 (NoPE layers): the queries' temperature by position.
    #[module(skip)]
    pub temperature: Option<AttnTemperature>,
    /// Llama 4 (RoPE layers): attention within chunks of this many positions.
    pub chunk: Option<usize>,
}

impl<B: TemperBackend> Attention<B> {
    /// `x`: `[batch, seq, hidden]` -> `[batch, seq, hidden]`. With `cache`, the new keys and
    /// values are appended to it and attention covers the cached positions too.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: &AttentionMask,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (mut q, mut k, mut v) = self.project(x);
        let gate = if self.output_gate {
            // Per head: the first head_dim values are the query, the next head_dim its gate.
            let both = q.reshape([b, t, h, 2 * hd]);
            q = both.clone().slice([0..b, 0..t, 0..h, 0..hd]).reshape([b, t, h * hd]);
            Some(both.slice([0..b, 0..t, 0..h, hd..2 * hd]).reshape([b, t, h * hd]))
        } else {
            None
        };
        if let (Some(qn), Some(kn), true) = (&self.q_norm, &self.k_norm, self.qk_norm_whole) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        if let Some(c) = self.clip_qkv {
            (q, k, v) = (q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c));
        }
        let mut q = q.reshape([b, t, h, hd]);
        let mut k = k.reshape([b, t, kv, hd]);
        if let (Some(qn), Some(kn), false) = (&self.q_norm, &self.k_norm, self.qk_norm_whole) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        if self.rope_pairs && self.rope {
            (q, k) = (pairs_first(q), pairs_first(k));
        }
        let (mut q, mut k) = if self.rope { (rope.apply_query(q), rope.apply(k)) } else { (q, k) };
        if let Some(eps) = self.weightless_qk_norm {
            (q, k) = (weightless_rms_norm(q, eps), weightless_rms_norm(k, eps));
        }
        if let Some(temp) = &self.temperature {
            // Positions from the row's start (cached ones included), as transformers counts them.
            let factors: Vec<f32> = (0..t).map(|i| temp.factor(mask.past_len + i)).collect();
            let f = Tensor::<B, 4>::from_data(TensorData::new(factors, [1, t, 1, 1]), (&q.device(), DType::F32));
            let dtype = q.dtype();
            q = q * f.cast(dtype);
        }
        let q = q.swap_dims(1, 2);
        let mut k = k.swap_dims(1, 2);
        let mut v = v.reshape([b, t, kv, hd]).swap_dims(1, 2);
        if let Some(slot) = cache {
            if let Some(prev) = slot.take() {
                k = Tensor::cat(vec![prev.k, k], 2);
                v = Tensor::cat(vec![prev.v, v], 2);
            }
            *slot = Some(LayerCache { k: k.clone(), v: v.clone() });
        }
        let spec = AttentionSpec {
            scale: self.scale,
            softcap: self.softcap,
            window: self.window,
            chunk: self.chunk,
            past_len: mask.past_len,
            segments: mask.segments.clone(),
            block_rows: None,
            sinks: self.sinks.clone(),
        };
        let out = ops::attention(q, k, v, &spec).swap_dims(1, 2).reshape([b, t, h * hd]);
        let out = match gate {
            Some(g) => out * burn::tensor::activation::sigmoid(g),
            None => out,
        };
        self.o_proj.forward(out)
    }

    fn project(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let (hq, hkv) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        match (&self.qkv_proj, &self.q_proj, &self.k_proj, &self.v_proj) {
            (Some(qkv), _, _, _) => {
                let [b, t, _] = x.dims();
                let all = qkv.forward(x);
                (
                    all.clone().slice([0..b, 0..t, 0..hq]),
                    all.clone().slice([0..b, 0..t, hq..hq + hkv]),
                    all.slice([0..b, 0..t, hq + hkv..hq + 2 * hkv]),
                )
            }
            (None, Some(q), Some(k), Some(v)) => (q.forward(x.clone()), k.forward(x.clone()), v.forward(x)),
            // The loader always builds one of the two layouts.
            _ => unreachable!("attention built without projections"),
        }
    }
}

/// Rotary dims laid out in adjacent pairs `[x0, x1, x2, x3, ...]` as `[x0, x2, ..., x1, x3, ...]`,
/// the rotate-half layout (Llama 4's complex rotation; DeepSeek's interleaved rope).
pub fn pairs_first<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, t, h, d] = x.dims();
    x.reshape([b, t, h, d / 2, 2]).swap_dims(3, 4).reshape([b, t, h, d])
}

/// `x / sqrt(mean(x²) + eps)` over the last dim, in f32 (Llama 4's `Llama4TextWeightlessRMSNorm`).
fn weightless_rms_norm<B: Backend>(x: Tensor<B, 4>, eps: f64) -> Tensor<B, 4> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let mean_sq = x.clone().powi_scalar(2).mean_dim(3);
    (x * mean_sq.add_scalar(eps).sqrt().recip()).cast(dtype)
}
