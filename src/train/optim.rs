//! AdamW exactly as PyTorch's `torch.optim.AdamW`, global-norm gradient clipping as
//! `clip_grad_norm_`, and the learning-rate schedules of transformers. Written here rather than
//! taken from Burn: Burn's AdamW defaults differ, it clips per tensor, and its state is keyed
//! by random parameter ids, which would break exact resume.

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (PyTorch defaults unless set).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments of each trained tensor, and the number of steps taken.
#[derive(Debug, Clone)]
pub struct AdamState<B: Backend> {
    pub step: usize,
    pub m: Vec<Tensor<B, 2>>,
    pub v: Vec<Tensor<B, 2>>,
}

impl<B: Backend> AdamState<B> {
    pub fn zeros(shapes: &[[usize; 2]], device: &B::Device) -> Self {
        let z = || shapes.iter().map(|s| Tensor::zeros(*s, device)).collect();
        Self { step: 0, m: z(), v: z() }
    }
}

impl AdamW {
    /// One update of every parameter in `params` (values, on the inner backend) given `grads`.
    pub fn step<B: Backend>(
        &self,
        params: Vec<Tensor<B, 2>>,
        grads: &[Tensor<B, 2>],
        lr: f64,
        state: &mut AdamState<B>,
    ) -> Vec<Tensor<B, 2>> {
        state.step += 1;
        let t = state.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        params
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let g = grads[i].clone();
                let p = if self.weight_decay != 0.0 { p.mul_scalar(1.0 - lr * self.weight_decay) } else { p };
                let m = state.m[i].clone().mul_scalar(self.beta1) + g.clone().mul_scalar(1.0 - self.beta1);
                let v = state.v[i].clone().mul_scalar(self.beta2) + (g.clone() * g).mul_scalar(1.0 - self.beta2);
                let denom = v.clone().sqrt().div_scalar(bc2_sqrt).add_scalar(self.eps);
                let p = p - (m.clone() / denom).mul_scalar(step_size);
                state.m[i] = m;
                state.v[i] = v;
                p
            })
            .collect()
    }
}

/// Total L2 norm of all gradients (before clipping) and the gradients scaled so the total
/// norm is at most `max_norm` (PyTorch: coefficient max_norm / (norm + 1e-6), capped at 1).
pub fn clip_global_norm<B: Backend>(grads: Vec<Tensor<B, 2>>, max_norm: Option<f64>) -> (f64, Vec<Tensor<B, 2>>) {
    // One f32 sum of squares per tensor on the device, read back in one transfer (one sync per
    // step rather than one per LoRA tensor) and added up in f64, as before.
    let sums: Vec<Tensor<B, 1>> =
        grads.iter().map(|g| g.clone().cast(burn::tensor::DType::F32).powi_scalar(2).sum()).collect();
    let sq: f64 = if sums.is_empty() {
        0.0
    } else {
        Tensor::cat(sums, 0).into_data().convert::<f64>().to_vec::<f64>().map_or(f64::NAN, |v| v.iter().sum())
    };
    let norm = sq.sqrt();
    match max_norm {
        Some(max) if max > 0.0 => {
            let coef = (max / (norm + 1e-6)).min(1.0);
            if coef < 1.0 {
                return (norm, grads.into_iter().map(|g| g.mul_scalar(coef)).collect());
            }
            (norm, grads)
        }
        _ => (norm, grads),
    }
}

/// `lr_scheduler` in a recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    Linear,
    #[default]
    Cosine,
}

impl LrSchedule {
    /// Multiplier of the base learning rate at optimizer step `step` (0-based), as
    /// transformers' `get_{constant,linear,cosine}_schedule_with_warmup`.
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let decay_steps = total.saturating_sub(warmup).max(1) as f64;
        let progress = (step - warmup) as f64 / decay_steps;
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Linear => ((total.saturating_sub(step)) as f64 / decay_steps).max(0.0),
            LrSchedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}
