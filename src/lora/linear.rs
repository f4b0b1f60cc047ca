//! `LoraLinear`: the one projection type of the decoder. A frozen base weight in the
//! checkpoint's `[out, in]` layout, an optional bias, and an optional trainable low-rank delta:
//! `y = W x (+ b) + scaling * B(A(dropout(x)))`. With no delta it is a plain linear layer, so the
//! decoder has no separate "LoRA version".

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, Tensor};

use crate::ops::{dropout, TemperBackend};
use crate::quant::device::Weight4Bit;

/// Trainable low-rank delta of one projection (PEFT's `lora_A` / `lora_B`), always f32.
#[derive(Module, Debug)]
pub struct LoraDelta<B: Backend> {
    /// `[r, in]`
    pub lora_a: Param<Tensor<B, 2>>,
    /// `[out, r]`
    pub lora_b: Param<Tensor<B, 2>>,
    pub scaling: f64,
    /// PEFT's `lora_dropout`: the probability of zeroing an input element of the delta path,
    /// applied only while training (inside a [`dropout::TrainingScope`]).
    pub dropout: f64,
    /// [`dropout::module_id`] of the projection's name: keys its dropout masks.
    pub module: u64,
}

/// A projection with a frozen base weight and an optional LoRA delta.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// `[out, in]`, never trained (`[0, 0]` when the base is `quant`).
    pub weight: Param<Tensor<B, 2>>,
    /// A bitsandbytes 4-bit base (QLoRA) instead of `weight`.
    pub quant: Option<Weight4Bit<B>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<LoraDelta<B>>,
}

impl<B: Backend> LoraLinear<B> {
    /// A frozen projection from its weight `[out, in]` and optional bias `[out]`.
    pub fn frozen(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: Param::from_tensor(weight).set_require_grad(false),
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
            quant: None,
            lora: None,
        }
    }

    /// A frozen projection on a 4-bit base.
    pub fn frozen_4bit(weight: Weight4Bit<B>, bias: Option<Tensor<B, 1>>, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::zeros([0, 0], device)).set_require_grad(false),
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
            quant: Some(weight),
            lora: None,
        }
    }

    /// `[out, in]`
    pub fn dims(&self) -> [usize; 2] {
        match &self.quant {
            Some(q) => [q.out_features, q.in_features],
            None => self.weight.shape().dims(),
        }
    }
}

impl<B: TemperBackend> LoraLinear<B> {
    /// `x`: `[batch, seq, in]` -> `[batch, seq, out]`, in `x`'s dtype.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d_in] = x.dims();
        let [d_out, _] = self.dims();
        let x2 = x.reshape([b * t, d_in]);
        let mut y = match &self.quant {
            Some(q) => crate::ops::linear_4bit(x2.clone(), &q.packed()),
            None => x2.clone().matmul(self.weight.val().transpose()),
        };
        if let Some(bias) = &self.bias {
            let dtype = y.dtype();
            y = y + bias.val().cast(dtype).unsqueeze_dim(0);
        }
        if let Some(lora) = &self.lora {
            let dtype = y.dtype();
            let mut h = x2.cast(DType::F32);
            if let (true, Some(step)) = (lora.dropout > 0.0, dropout::active()) {
                h = dropout::apply(h, step.mask_key(lora.module), lora.dropout);
            }
            let delta =
                h.matmul(lora.lora_a.val().transpose()).matmul(lora.lora_b.val().transpose()).mul_scalar(lora.scaling);
            y = y + delta.cast(dtype);
        }
        y.reshape([b, t, d_out])
    }
}
