//! Custom operations with hand-written backward passes: blockwise attention, chunked
//! cross-entropy and the gated delta rule (Gated DeltaNet). Each holds its forward, its backward
//! and the plain reference it is tested against; the model only calls them.
//!
//! Burn dispatches a custom backward through the backend type, so the operations are methods
//! of [`TemperBackend`], a `Backend` extension. The base backends (Flex, ndarray, CUDA, wgpu)
//! use the default methods, which compute the forward pass block by block from Burn's tensor
//! ops; `Autodiff<B>` overrides them to record one graph node whose backward recomputes the
//! blocks instead of keeping them (the memory win over autodiff's per-op graph).
//!
//! [`loss`] holds the plain causal-LM loss and the label convention (`IGNORE_INDEX`) that data,
//! model and training share: numerics both `model/` and `train/` use live here, below both.

pub mod attention;
pub mod cross_entropy;
pub mod delta_net;
pub mod dropout;
pub mod loss;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{BoolTensor, FloatTensor};
use burn::tensor::{Tensor, TensorPrimitive};

pub use attention::AttentionSpec;
pub use cross_entropy::CrossEntropySpec;
pub use delta_net::DeltaNetSpec;

use crate::quant::device::Packed4Bit;

/// A backend Temper can run on: Burn's `Backend` plus the custom operations.
pub trait TemperBackend: Backend {
    /// Attention of `q` `[batch, heads, q_len, head_dim]` over `k` `[batch, kv_heads, k_len,
    /// head_dim]` and `v` `[batch, kv_heads, k_len, v_dim]` -> `[batch, heads, q_len, v_dim]`
    /// (`v_dim` may differ from `head_dim`: multi-head latent attention).
    fn temper_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spec: &AttentionSpec,
    ) -> FloatTensor<Self> {
        let (out, _) = attention::forward::<Self>(wrap(q), wrap(k), wrap(v), spec);
        out.into_primitive().tensor()
    }

    /// Summed next-token NLL of `hidden` `[tokens, hidden]` under the head `weight`
    /// `[vocab, hidden]`, without holding `[tokens, vocab]` logits -> `[1]` (f32).
    fn temper_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        spec: &CrossEntropySpec,
    ) -> FloatTensor<Self> {
        unwrap(cross_entropy::forward::<Self>(wrap(hidden), wrap(weight), spec))
    }

    /// The gated delta rule from a zero state: `q`, `k` `[b, t, h, dk]` (L2-normalised, `q`
    /// scaled by `dk^-0.5`, heads repeated to the value heads), `v` `[b, t, h, dv]`, the log
    /// decay `g` and `beta` `[b, t, h]` -> `o` `[b, t, h, dv]` in f32 (any input dtype). Under
    /// autodiff one graph node whose backward recomputes the chunks (no per-op graph).
    fn temper_gated_delta_rule(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        spec: &DeltaNetSpec,
    ) -> FloatTensor<Self> {
        unwrap(delta_net::forward::<Self>(wrap(q), wrap(k), wrap(v), wrap(g), wrap(beta), spec))
    }

    /// `x` `[rows, in]` times a 4-bit weight's `dequant(W)ᵀ` -> `[rows, out]`. Under autodiff the
    /// backward dequantizes again (no dense W is kept) and gives only `dx`: the base is frozen.
    fn temper_linear_4bit(x: FloatTensor<Self>, w: &Packed4Bit<Self>) -> FloatTensor<Self> {
        crate::quant::device::linear_4bit_forward::<Self>(x, w)
    }

    /// dequant(W) `[out, in]` in `dtype`. Default: generic tensor code (every device); the CPU
    /// backends compute it on the host in one pass.
    fn temper_dequantize_4bit(w: &Packed4Bit<Self>, dtype: burn::tensor::DType) -> FloatTensor<Self> {
        w.dequantize(dtype).into_primitive().tensor()
    }

    /// Which elements LoRA dropout zeroes in a `[rows, cols]` input (`true` = dropped). Default:
    /// laid out on the host (the CPU backends); the GPUs send the decisions packed.
    fn temper_dropout_mask(
        key: dropout::MaskKey,
        rows: usize,
        cols: usize,
        p: f64,
        device: &Self::Device,
    ) -> BoolTensor<Self> {
        dropout::dropped_on_host::<Self>(key, rows, cols, p, device).into_primitive()
    }

    /// Bytes the device's allocator holds in reserve (its pool only grows within a run, so
    /// read after the work it is that work's peak). `None` for the CPU backends, whose memory
    /// is the process's (peak RSS).
    fn temper_reserved_bytes(_device: &Self::Device) -> Option<u64> {
        None
    }
}

/// A training backend: autodiff over a [`TemperBackend`].
pub trait TemperAutodiff: AutodiffBackend<InnerBackend: TemperBackend> + TemperBackend {}

impl<B: AutodiffBackend<InnerBackend: TemperBackend> + TemperBackend> TemperAutodiff for B {}

impl TemperBackend for burn::backend::Flex {
    fn temper_dequantize_4bit(w: &Packed4Bit<Self>, dtype: burn::tensor::DType) -> FloatTensor<Self> {
        w.dequantize_on_host(dtype).unwrap_or_else(|| w.dequantize(dtype)).into_primitive().tensor()
    }
}
impl TemperBackend for burn::backend::NdArray<f32> {
    fn temper_dequantize_4bit(w: &Packed4Bit<Self>, dtype: burn::tensor::DType) -> FloatTensor<Self> {
        w.dequantize_on_host(dtype).unwrap_or_else(|| w.dequantize(dtype)).into_primitive().tensor()
    }
}
#[cfg(feature = "cuda")]
impl TemperBackend for burn::backend::Cuda<f32, i32> {
    fn temper_dropout_mask(
        key: dropout::MaskKey,
        rows: usize,
        cols: usize,
        p: f64,
        device: &Self::Device,
    ) -> BoolTensor<Self> {
        dropout::dropped_packed::<Self>(key, rows, cols, p, device).into_primitive()
    }

    fn temper_reserved_bytes(device: &Self::Device) -> Option<u64> {
        use burn::cubecl::Runtime;
        burn::cubecl::cuda::CudaRuntime::client(device).memory_usage().ok().map(|m| m.bytes_reserved)
    }
}
#[cfg(feature = "wgpu")]
impl TemperBackend for burn::backend::Wgpu<f32, i32> {
    fn temper_dropout_mask(
        key: dropout::MaskKey,
        rows: usize,
        cols: usize,
        p: f64,
        device: &Self::Device,
    ) -> BoolTensor<Self> {
        dropout::dropped_packed::<Self>(key, rows, cols, p, device).into_primitive()
    }

    fn temper_reserved_bytes(device: &Self::Device) -> Option<u64> {
        use burn::cubecl::Runtime;
        burn::backend::wgpu::WgpuRuntime::client(device).memory_usage().ok().map(|m| m.bytes_reserved)
    }
}

pub(crate) fn wrap<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn unwrap<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: TemperBackend> Backward<B, 3> for AttentionBackward {
    /// q, k, v, the output, its log-sum-exp per query row, and the spec.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, AttentionSpec);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, out, lse, spec) = ops.state;
        let (dq, dk, dv) = attention::backward::<B>(wrap(q), wrap(k), wrap(v), wrap(out), wrap(lse), wrap(grad), &spec);
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, unwrap(g));
            }
        }
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: TemperBackend> Backward<B, 2> for CrossEntropyBackward {
    /// The loss's gradients with respect to hidden and (a trainable) weight for an upstream
    /// gradient of 1, formed in the forward pass.
    type State = (FloatTensor<B>, Option<FloatTensor<B>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_h, node_w] = ops.parents;
        let grad: Tensor<B, 1> = wrap(grads.consume::<B>(&ops.node));
        let (dh, dw) = ops.state;
        let scale = |g: FloatTensor<B>| {
            let g: Tensor<B, 2> = wrap(g);
            let s = grad.clone().cast(g.dtype()).reshape([1, 1]);
            unwrap(g * s)
        };
        if let Some(node) = node_h {
            grads.register::<B>(node.id, scale(dh));
        }
        if let (Some(node), Some(dw)) = (node_w, dw) {
            grads.register::<B>(node.id, scale(dw));
        }
    }
}

#[derive(Debug)]
struct DeltaNetBackward;

impl<B: TemperBackend> Backward<B, 5> for DeltaNetBackward {
    /// q, k, v, g, beta and the spec: the backward recomputes the chunks from them.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, DeltaNetSpec);

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v, node_g, node_beta] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, g, beta, spec) = ops.state;
        let d = delta_net::backward::<B>(wrap(q), wrap(k), wrap(v), wrap(g), wrap(beta), wrap(grad), &spec);
        for (node, g) in [
            (node_q, unwrap(d.q)),
            (node_k, unwrap(d.k)),
            (node_v, unwrap(d.v)),
            (node_g, unwrap(d.g)),
            (node_beta, unwrap(d.beta)),
        ] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct Linear4BitBackward;

impl<B: TemperBackend> Backward<B, 1> for Linear4BitBackward {
    /// The packed weight only: the backward dequantizes it again.
    type State = Packed4Bit<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, crate::quant::device::linear_4bit_input_grad::<B>(grad, &ops.state));
        }
    }
}

impl<B: TemperBackend, C: CheckpointStrategy> TemperBackend for Autodiff<B, C> {
    fn temper_linear_4bit(x: FloatTensor<Self>, w: &Packed4Bit<Self>) -> FloatTensor<Self> {
        let nested = w.nested.as_ref().map(|n| crate::quant::device::NestedPrims::<B> {
            codes: n.codes.clone(),
            nested_absmax: n.nested_absmax.primitive.clone(),
            map: n.map.primitive.clone(),
            offset: n.offset,
            blocks: n.blocks,
        });
        let inner = Packed4Bit::<B> {
            words: w.words.clone(),
            absmax: w.absmax.primitive.clone(),
            nested,
            code: w.code.primitive.clone(),
            shape: w.shape,
            blocksize: w.blocksize,
            fp8: w.fp8,
        };
        match Linear4BitBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::temper_linear_4bit(x.primitive, &inner);
                prep.finish(inner, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::temper_linear_4bit(x.primitive, &inner)),
        }
    }

    fn temper_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spec: &AttentionSpec,
    ) -> FloatTensor<Self> {
        let prep =
            AttentionBackward.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful();
        match prep {
            OpsKind::Tracked(prep) => {
                let (out, lse) = attention::forward::<B>(
                    wrap(q.primitive.clone()),
                    wrap(k.primitive.clone()),
                    wrap(v.primitive.clone()),
                    spec,
                );
                let out = unwrap(out);
                prep.finish((q.primitive, k.primitive, v.primitive, out.clone(), unwrap(lse), spec.clone()), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::temper_attention(q.primitive, k.primitive, v.primitive, spec)),
        }
    }

    fn temper_gated_delta_rule(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        spec: &DeltaNetSpec,
    ) -> FloatTensor<Self> {
        let prep = DeltaNetBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone(), g.node.clone(), beta.node.clone()])
            .compute_bound()
            .stateful();
        match prep {
            OpsKind::Tracked(prep) => {
                let o = B::temper_gated_delta_rule(
                    q.primitive.clone(),
                    k.primitive.clone(),
                    v.primitive.clone(),
                    g.primitive.clone(),
                    beta.primitive.clone(),
                    spec,
                );
                prep.finish((q.primitive, k.primitive, v.primitive, g.primitive, beta.primitive, spec.clone()), o)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::temper_gated_delta_rule(
                q.primitive,
                k.primitive,
                v.primitive,
                g.primitive,
                beta.primitive,
                spec,
            )),
        }
    }

    fn temper_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        spec: &CrossEntropySpec,
    ) -> FloatTensor<Self> {
        let prep =
            CrossEntropyBackward.prepare::<C>([hidden.node.clone(), weight.node.clone()]).compute_bound().stateful();
        match prep {
            OpsKind::Tracked(prep) => {
                // A trainable head (tracked weight) needs its gradient too.
                let want_weight = !weight.node.requirement.is_none();
                let (loss, dh, dw) = cross_entropy::forward_with_grad::<B>(
                    wrap(hidden.primitive),
                    wrap(weight.primitive),
                    spec,
                    want_weight,
                );
                prep.finish((unwrap(dh), dw.map(unwrap)), unwrap(loss))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::temper_cross_entropy(hidden.primitive, weight.primitive, spec)),
        }
    }

    fn temper_dropout_mask(
        key: dropout::MaskKey,
        rows: usize,
        cols: usize,
        p: f64,
        device: &Self::Device,
    ) -> BoolTensor<Self> {
        B::temper_dropout_mask(key, rows, cols, p, device)
    }

    fn temper_reserved_bytes(device: &Self::Device) -> Option<u64> {
        B::temper_reserved_bytes(device)
    }
}

/// [`TemperBackend::temper_attention`] on tensors.
pub fn attention<B: TemperBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    spec: &AttentionSpec,
) -> Tensor<B, 4> {
    wrap(B::temper_attention(unwrap(q), unwrap(k), unwrap(v), spec))
}

/// [`TemperBackend::temper_gated_delta_rule`] on tensors: `q`, `k` `[b, t, h, dk]`, `v`
/// `[b, t, h, dv]`, `g`, `beta` `[b, t, h]` -> `o` `[b, t, h, dv]` (f32).
pub fn gated_delta_rule<B: TemperBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    g: Tensor<B, 3>,
    beta: Tensor<B, 3>,
    spec: &DeltaNetSpec,
) -> Tensor<B, 4> {
    wrap(B::temper_gated_delta_rule(unwrap(q), unwrap(k), unwrap(v), unwrap(g), unwrap(beta), spec))
}

/// [`TemperBackend::temper_cross_entropy`] on tensors.
pub fn cross_entropy_sum<B: TemperBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    spec: &CrossEntropySpec,
) -> Tensor<B, 1> {
    wrap(B::temper_cross_entropy(unwrap(hidden), unwrap(weight), spec))
}

/// [`TemperBackend::temper_linear_4bit`] on tensors: `x` `[rows, in]` -> `[rows, out]`.
pub fn linear_4bit<B: TemperBackend>(x: Tensor<B, 2>, w: &Packed4Bit<B>) -> Tensor<B, 2> {
    wrap(B::temper_linear_4bit(unwrap(x), w))
}
