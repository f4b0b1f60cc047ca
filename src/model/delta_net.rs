//! The gated delta net of Qwen 3.5 and Qwen3-Next (`model.layers.{i}.linear_attn`): a linear
//! attention whose state is updated by the delta rule with a learned decay. The projections,
//! the causal depthwise convolution, the decays and the gated norm live here; the recurrence
//! itself is the custom op [`ops::gated_delta_rule`] (chunked, with a hand-written backward).
//!
//! Per token (transformers' `Qwen3_5GatedDeltaNet.forward`): `qkv = conv(in_proj_qkv(x))` through
//! SiLU, split into q, k (`num_k_heads`) and v (`num_v_heads`); `beta = sigmoid(in_proj_b(x))`;
//! `g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)` (f32); q and k L2-normalised, q scaled by
//! `k_head_dim^-1/2`, each key head shared by `num_v_heads / num_k_heads` value heads; the
//! recurrence; `norm(o) * silu(in_proj_z(x))` per value head; `out_proj`.
//!
//! Packing and left padding: the recurrent state and the convolution window restart wherever the
//! segment id changes, so no document sees another's tokens (transformers' torch path leaks
//! across packed documents; this does not).

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, DType, Tensor, TensorData};

use crate::lora::LoraLinear;
use crate::model::config::DeltaNetConfig;
use crate::ops::delta_net::{self as op, DeltaNetSpec};
use crate::ops::{self, TemperBackend};

/// The chunk length of the chunked recurrence (transformers' `chunk_size`).
const CHUNK: usize = 64;
/// `l2norm`'s epsilon in transformers' `l2norm(x, eps=1e-6)`.
const L2_EPS: f64 = 1e-6;

/// What generation keeps of a delta-net layer between calls.
#[derive(Debug, Clone)]
pub struct DeltaNetCache<B: Backend> {
    /// The last `conv_kernel - 1` inputs of the convolution, `[batch, conv_kernel - 1, channels]`.
    pub conv: Tensor<B, 3>,
    /// The recurrent state, `[batch, v_heads, k_head_dim, v_head_dim]`, f32.
    pub state: Tensor<B, 4>,
}

/// One gated delta net. Field names follow the checkpoint.
#[derive(Module, Debug)]
pub struct GatedDeltaNet<B: Backend> {
    /// Qwen 3.5: q, k and v of every head, `[2 Kd + Vd, hidden]` (rows `[q | k | v]`).
    pub in_proj_qkv: Option<LoraLinear<B>>,
    /// Qwen 3.5: the output gate `z`, `[Vd, hidden]`.
    pub in_proj_z: Option<LoraLinear<B>>,
    /// Qwen 3.5: `b` (beta's logit) and `a` (the decay's input), `[v_heads, hidden]` each.
    pub in_proj_b: Option<LoraLinear<B>>,
    pub in_proj_a: Option<LoraLinear<B>>,
    /// Qwen3-Next: q, k, v, z grouped per key head (`[q_g k_g v_g z_g]` for each head g).
    pub in_proj_qkvz: Option<LoraLinear<B>>,
    /// Qwen3-Next: b, a grouped per key head (`[b_g a_g]`).
    pub in_proj_ba: Option<LoraLinear<B>>,
    /// `conv1d.weight` `[channels, 1, kernel]` held as `[channels, kernel]`, frozen.
    pub conv1d: Param<Tensor<B, 2>>,
    /// `A_log` `[v_heads]` (the decay rate's log), f32, frozen.
    pub a_log: Param<Tensor<B, 1>>,
    pub dt_bias: Param<Tensor<B, 1>>,
    /// The gated RMSNorm's weight `[v_head_dim]` (plain `w`, not `1 + w`), f32, frozen.
    pub norm: Param<Tensor<B, 1>>,
    pub out_proj: LoraLinear<B>,
    #[module(skip)]
    pub cfg: DeltaNetConfig,
    pub norm_eps: f64,
}

/// The per-token inputs of the recurrence before the convolution.
struct Projected<B: Backend> {
    /// `[b, t, 2 Kd + Vd]`, channels `[q | k | v]`.
    qkv: Tensor<B, 3>,
    /// `[b, t, Vd]`
    z: Tensor<B, 3>,
    /// `[b, t, v_heads]`
    b: Tensor<B, 3>,
    a: Tensor<B, 3>,
}

impl<B: TemperBackend> GatedDeltaNet<B> {
    /// `x` `[batch, seq, hidden]` -> same. `segments`: per row, a segment id per position of
    /// this call (packing, left padding); `cache`: generation's state, read and replaced.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        segments: Option<&Arc<Vec<Vec<u32>>>>,
        cache: Option<&mut Option<DeltaNetCache<B>>>,
    ) -> Tensor<B, 3> {
        let [bsz, t, _] = x.dims();
        let c = &self.cfg;
        let (hk, hv, dk, dv) = (c.num_k_heads, c.num_v_heads, c.k_head_dim, c.v_head_dim);
        let dtype = x.dtype();
        let p = self.project(x);
        let past = cache.as_ref().and_then(|slot| slot.as_ref()).cloned();
        let (mixed, conv_tail) = self.convolve(p.qkv, past.as_ref().map(|c| c.conv.clone()), segments);
        let kd = hk * dk;
        let q = mixed.clone().slice([0..bsz, 0..t, 0..kd]).reshape([bsz, t, hk, dk]);
        let k = mixed.clone().slice([0..bsz, 0..t, kd..2 * kd]).reshape([bsz, t, hk, dk]);
        let v = mixed.slice([0..bsz, 0..t, 2 * kd..2 * kd + hv * dv]).reshape([bsz, t, hv, dv]);
        let beta = activation::sigmoid(p.b);
        let g = self.decay(p.a);
        let q = repeat_heads(l2_normalize(q).mul_scalar(1.0 / (dk as f64).sqrt()), hv / hk);
        let k = repeat_heads(l2_normalize(k), hv / hk);
        let v = v.cast(DType::F32);
        let beta = beta.cast(DType::F32);
        let spec = DeltaNetSpec { segments: segments.cloned(), chunk: CHUNK };
        let core = match cache {
            None => ops::gated_delta_rule(q, k, v, g, beta, &spec),
            Some(slot) => {
                let initial = past.map(|c| c.state);
                let (o, state) = if t == 1 && initial.is_some() {
                    op::recurrent(q, k, v, g, beta, initial, &spec)
                } else {
                    op::chunked_with_state(q, k, v, g, beta, initial, &spec)
                };
                *slot = Some(DeltaNetCache { conv: conv_tail, state });
                o
            }
        };
        let y = self.gated_norm(core.cast(dtype), p.z.reshape([bsz, t, hv, dv]));
        self.out_proj.forward(y.reshape([bsz, t, hv * dv]))
    }

    /// The four projections, un-grouping Qwen3-Next's per-key-head layout into Qwen 3.5's.
    fn project(&self, x: Tensor<B, 3>) -> Projected<B> {
        let [bsz, t, _] = x.dims();
        let c = &self.cfg;
        let (hk, hv, dk, dv) = (c.num_k_heads, c.num_v_heads, c.k_head_dim, c.v_head_dim);
        match (
            &self.in_proj_qkv,
            &self.in_proj_z,
            &self.in_proj_b,
            &self.in_proj_a,
            &self.in_proj_qkvz,
            &self.in_proj_ba,
        ) {
            (Some(qkv), Some(z), Some(b), Some(a), _, _) => Projected {
                qkv: qkv.forward(x.clone()),
                z: z.forward(x.clone()),
                b: b.forward(x.clone()),
                a: a.forward(x),
            },
            (_, _, _, _, Some(qkvz), Some(ba)) => {
                let r = hv / hk;
                let width = 2 * dk + 2 * r * dv;
                let all = qkvz.forward(x.clone()).reshape([bsz, t, hk, width]);
                let part = |from: usize, len: usize| {
                    all.clone().slice([0..bsz, 0..t, 0..hk, from..from + len]).reshape([bsz, t, hk * len])
                };
                let qkv = Tensor::cat(vec![part(0, dk), part(dk, dk), part(2 * dk, r * dv)], 2);
                let z = part(2 * dk + r * dv, r * dv);
                let ba = ba.forward(x).reshape([bsz, t, hk, 2 * r]);
                let b = ba.clone().slice([0..bsz, 0..t, 0..hk, 0..r]).reshape([bsz, t, hv]);
                let a = ba.slice([0..bsz, 0..t, 0..hk, r..2 * r]).reshape([bsz, t, hv]);
                Projected { qkv, z, b, a }
            }
            // The loader always builds one of the two layouts.
            _ => unreachable!("gated delta net built without projections"),
        }
    }

    /// Causal depthwise convolution over time, then SiLU: `out[t, ch] = sum_j w[ch, j] *
    /// x[t - K + 1 + j, ch]`, zeros (or the cached inputs) before the first position, and never
    /// across a segment boundary. Returns the output and the last `K - 1` inputs (the cache).
    fn convolve(
        &self,
        x: Tensor<B, 3>,
        past: Option<Tensor<B, 3>>,
        segments: Option<&Arc<Vec<Vec<u32>>>>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [bsz, t, ch] = x.dims();
        let kernel = self.cfg.conv_kernel;
        let device = x.device();
        let lead = kernel - 1;
        let history = past.unwrap_or_else(|| Tensor::zeros([bsz, lead, ch], (&device, x.dtype())));
        let padded = Tensor::cat(vec![history.cast(x.dtype()), x], 1);
        let w = self.conv1d.val().cast(padded.dtype());
        let mut out: Option<Tensor<B, 3>> = None;
        for j in 0..kernel {
            // Tap j reads the input `shift` positions back.
            let shift = lead - j;
            let mut tap = padded.clone().slice([0..bsz, j..j + t, 0..ch]);
            if let (Some(seg), true) = (segments, shift > 0) {
                tap = tap * same_segment_mask::<B>(seg, bsz, t, shift, &device).cast(padded.dtype());
            }
            let term = tap * w.clone().slice([0..ch, j..j + 1]).reshape([1, 1, ch]);
            out = Some(match out {
                Some(o) => o + term,
                None => term,
            });
        }
        let tail = padded.clone().slice([0..bsz, t..t + lead, 0..ch]);
        let out = out.unwrap_or_else(|| Tensor::zeros([bsz, t, ch], (&device, padded.dtype())));
        (activation::silu(out), tail)
    }

    /// `g = -exp(A_log) * softplus(a + dt_bias)` in f32, `[b, t, v_heads]`.
    fn decay(&self, a: Tensor<B, 3>) -> Tensor<B, 3> {
        let hv = self.cfg.num_v_heads;
        let x = a.cast(DType::F32) + self.dt_bias.val().cast(DType::F32).reshape([1, 1, hv]);
        // softplus(x) = max(x, 0) + log1p(exp(-|x|)): exact, and finite for any x.
        let softplus = x.clone().clamp_min(0.0) + x.abs().neg().exp().log1p();
        softplus * self.a_log.val().cast(DType::F32).exp().neg().reshape([1, 1, hv])
    }

    /// The gated RMSNorm per value head: `(w * rmsnorm(o)) * silu(z)`, `o` and `z` `[b, t, hv, dv]`.
    fn gated_norm(&self, o: Tensor<B, 4>, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let dtype = o.dtype();
        let dv = self.cfg.v_head_dim;
        let x = o.cast(DType::F32);
        let normed = x.clone() * x.powi_scalar(2).mean_dim(3).add_scalar(self.norm_eps).sqrt().recip();
        let y = self.norm.val().cast(dtype).reshape([1, 1, 1, dv]) * normed.cast(dtype);
        (y.cast(DType::F32) * activation::silu(z.cast(DType::F32))).cast(dtype)
    }
}

/// `x * rsqrt(sum(x^2) + 1e-6)` over the last dimension, in f32.
fn l2_normalize<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let x = x.cast(DType::F32);
    x.clone() * x.powi_scalar(2).sum_dim(3).add_scalar(L2_EPS).sqrt().recip()
}

/// `[b, t, h, d]` -> `[b, t, h * r, d]`, head j of the result being head `j / r` of `x`.
fn repeat_heads<B: Backend>(x: Tensor<B, 4>, r: usize) -> Tensor<B, 4> {
    if r == 1 {
        return x;
    }
    let [b, t, h, d] = x.dims();
    x.reshape([b, t, h, 1, d]).expand([b, t, h, r, d]).reshape([b, t, h * r, d])
}

/// `[b, t, 1]`: 1 where position `i - shift` exists and is in the same segment as `i`.
fn same_segment_mask<B: Backend>(
    segments: &[Vec<u32>],
    bsz: usize,
    t: usize,
    shift: usize,
    device: &B::Device,
) -> Tensor<B, 3> {
    let mut m = Vec::with_capacity(bsz * t);
    for r in 0..bsz {
        let row = segments.get(r);
        for i in 0..t {
            let keep = i >= shift && row.is_none_or(|s| s.get(i) == s.get(i - shift));
            m.push(if keep || (i < shift && row.is_none_or(|s| s.get(i) == s.first())) { 1.0f32 } else { 0.0 });
        }
    }
    Tensor::from_data(TensorData::new(m, [bsz, t, 1]), (device, DType::F32))
}
