//! RMSNorm as the supported families compute it: in f32, cast back to the input dtype.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, Tensor};

/// `y = x / sqrt(mean(x^2) + eps) * (offset + weight)`; Gemma stores `weight - 1` (offset 1).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[dim]`, f32, frozen.
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
    pub offset: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(weight: Tensor<B, 1>, eps: f64, offset: f64) -> Self {
        Self { weight: Param::from_tensor(weight).set_require_grad(false), eps, offset }
    }

    /// Normalise over the last dimension; any rank, same shape and dtype out.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let mean_sq = x.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = x * mean_sq.add_scalar(self.eps).sqrt().recip();
        let mut w = self.weight.val();
        if self.offset != 0.0 {
            w = w.add_scalar(self.offset);
        }
        let shape: [usize; D] = std::array::from_fn(|i| if i == D - 1 { w.dims()[0] } else { 1 });
        (normed * w.reshape(shape)).cast(dtype)
    }
}
