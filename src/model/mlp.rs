//! The gated MLP: `down(act(gate(x)) * up(x))`, with Phi-3's fused `gate_up_proj`.

use burn::module::Module;
use burn::tensor::{activation, backend::Backend, Tensor};

use crate::lora::LoraLinear;
use crate::model::config::Activation;
use crate::ops::TemperBackend;

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Option<LoraLinear<B>>,
    pub up_proj: Option<LoraLinear<B>>,
    /// Phi-3: gate (first half) and up (second half) in one projection.
    pub gate_up_proj: Option<LoraLinear<B>>,
    pub down_proj: LoraLinear<B>,
    #[module(skip)]
    pub activation: Activation,
}

impl<B: TemperBackend> Mlp<B> {
    /// `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gate, up) = match (&self.gate_up_proj, &self.gate_proj, &self.up_proj) {
            (Some(fused), _, _) => {
                let both = fused.forward(x);
                let [b, t, two_i] = both.dims();
                let i = two_i / 2;
                (both.clone().slice([0..b, 0..t, 0..i]), both.slice([0..b, 0..t, i..two_i]))
            }
            (None, Some(g), Some(u)) => (g.forward(x.clone()), u.forward(x)),
            // The loader always builds one of the two layouts.
            _ => unreachable!("MLP built without projections"),
        };
        self.down_proj.forward(apply_activation(self.activation, gate) * up)
    }
}

/// The activation functions of the supported families, exactly as PyTorch defines them.
pub fn apply_activation<B: Backend, const D: usize>(act: Activation, x: Tensor<B, D>) -> Tensor<B, D> {
    match act {
        Activation::Silu => activation::silu(x),
        Activation::Gelu => activation::gelu(x),
        Activation::GeluTanh => {
            // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715))
                .mul_scalar((2.0 / std::f64::consts::PI).sqrt());
            x.mul_scalar(0.5) * inner.tanh().add_scalar(1.0)
        }
    }
}
