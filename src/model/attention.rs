//! Multi-head attention with grouped-query heads, the causal / sliding-window / segment masks,
//! and the KV cache used by generation.

use burn::module::Module;
use burn::tensor::{activation::softmax, backend::Backend, Bool, DType, Tensor, TensorData};

use crate::lora::LoraLinear;
use crate::model::norm::RmsNorm;
use crate::model::rope::RopeTables;

/// What each query may attend to, for one forward call.
#[derive(Debug, Clone)]
pub struct MaskSpec {
    pub batch: usize,
    /// Query positions in this call.
    pub q_len: usize,
    /// Positions already in the KV cache before this call.
    pub past_len: usize,
    /// Per row, a segment id per key position (past + new): a query attends only to keys of its
    /// own segment. Used by packing, where several documents share one row.
    pub segments: Option<Vec<Vec<u32>>>,
}

/// Blocked positions (`true` = may not attend), `[batch or 1, 1, q_len, k_len]`, for full
/// attention and for each distinct sliding window.
#[derive(Debug, Clone)]
pub struct AttentionMask<B: Backend> {
    full: Tensor<B, 4, Bool>,
    windowed: Vec<(usize, Tensor<B, 4, Bool>)>,
}

impl<B: Backend> AttentionMask<B> {
    pub fn new(spec: &MaskSpec, windows: &[Option<usize>], device: &B::Device) -> Self {
        let mut distinct: Vec<usize> = windows.iter().flatten().copied().collect();
        distinct.sort_unstable();
        distinct.dedup();
        Self {
            full: build_mask(spec, None, device),
            windowed: distinct.into_iter().map(|w| (w, build_mask(spec, Some(w), device))).collect(),
        }
    }

    pub fn for_window(&self, window: Option<usize>) -> &Tensor<B, 4, Bool> {
        match window {
            None => &self.full,
            Some(w) => self.windowed.iter().find(|(x, _)| *x == w).map_or(&self.full, |(_, m)| m),
        }
    }
}

fn build_mask<B: Backend>(spec: &MaskSpec, window: Option<usize>, device: &B::Device) -> Tensor<B, 4, Bool> {
    let k_len = spec.past_len + spec.q_len;
    let rows = if spec.segments.is_some() { spec.batch } else { 1 };
    let mut blocked = Vec::with_capacity(rows * spec.q_len * k_len);
    for r in 0..rows {
        let seg = spec.segments.as_ref().map(|s| &s[r]);
        for qi in 0..spec.q_len {
            let q = spec.past_len + qi;
            for k in 0..k_len {
                let mut no = k > q;
                if let Some(w) = window {
                    no |= q - k.min(q) >= w;
                }
                if let Some(seg) = seg {
                    no |= seg.get(k) != seg.get(q);
                }
                blocked.push(no);
            }
        }
    }
    Tensor::from_data(TensorData::new(blocked, [rows, 1, spec.q_len, k_len]), device)
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
}

impl<B: Backend> Attention<B> {
    /// `x`: `[batch, seq, hidden]` -> `[batch, seq, hidden]`. With `cache`, the new keys and
    /// values are appended to it and attention covers the cached positions too.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: &AttentionMask<B>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = self.project(x);
        let mut q = q.reshape([b, t, h, hd]);
        let mut k = k.reshape([b, t, kv, hd]);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        let q = rope.apply(q.swap_dims(1, 2));
        let mut k = rope.apply(k.swap_dims(1, 2));
        let mut v = v.reshape([b, t, kv, hd]).swap_dims(1, 2);
        if let Some(slot) = cache {
            if let Some(prev) = slot.take() {
                k = Tensor::cat(vec![prev.k, k], 2);
                v = Tensor::cat(vec![prev.v, v], 2);
            }
            *slot = Some(LayerCache { k: k.clone(), v: v.clone() });
        }
        let g = h / kv;
        // Grouped-query attention without repeating K/V: the g query heads that share a KV
        // head are stacked along the sequence axis (head i uses KV head i / g, as HF's repeat_kv).
        let q = q.reshape([b, kv, g * t, hd]);
        let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(self.scale).cast(DType::F32);
        if let Some(cap) = self.softcap {
            scores = scores.div_scalar(cap).tanh().mul_scalar(cap);
        }
        let m = mask.for_window(self.window).clone();
        let m = if g > 1 { m.repeat_dim(2, g) } else { m };
        let scores = scores.mask_fill(m, f32::MIN);
        let probs = softmax(scores, 3).cast(v.dtype());
        let out = probs.matmul(v).reshape([b, h, t, hd]).swap_dims(1, 2).reshape([b, t, h * hd]);
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
