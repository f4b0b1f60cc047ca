//! Chunked cross-entropy: the output head's matmul and the next-token loss computed over row
//! chunks, so neither the `[tokens, vocab]` f32 logits nor their gradient exist at once.
//!
//! Under autodiff the forward also forms each chunk's `softmax - one_hot(target)` while its
//! logits exist and multiplies it back through the head, keeping only the `[tokens, hidden]`
//! gradient for the backward to scale (as Liger-Kernel's fused linear cross-entropy does):
//! no logits are kept and none recomputed. Gemma 2's final soft-capping is inside both.

use std::sync::Arc;

use burn::tensor::{backend::Backend, DType, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::ops::loss::IGNORE_INDEX;

/// Logits at or above this many f32 values per chunk are split into more chunks.
const CHUNK_LOGITS: usize = 1 << 23;

/// The targets of one loss call.
#[derive(Debug, Clone)]
pub struct CrossEntropySpec {
    /// Target token of every row (`IGNORE_INDEX` rows are not counted).
    pub targets: Arc<Vec<i64>>,
    /// `cap * tanh(logits / cap)` before the softmax.
    pub softcap: Option<f64>,
    /// Rows per chunk; `None` picks it from the vocabulary size.
    pub chunk_rows: Option<usize>,
}

impl CrossEntropySpec {
    pub fn new(targets: Vec<i64>, softcap: Option<f64>) -> Self {
        Self { targets: Arc::new(targets), softcap, chunk_rows: None }
    }

    fn chunks(&self, rows: usize, vocab: usize) -> impl Iterator<Item = (usize, usize)> {
        let size = self.chunk_rows.unwrap_or(CHUNK_LOGITS / vocab.max(1)).clamp(1, rows.max(1));
        (0..rows).step_by(size).map(move |r0| (r0, (r0 + size).min(rows)))
    }

    /// Target ids `[n, 1]` (ignored rows point at 0) and weights `[n, 1]` (0 or 1) of a chunk.
    fn chunk_targets<B: Backend>(
        &self,
        (r0, r1): (usize, usize),
        device: &B::Device,
    ) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
        let rows = &self.targets[r0..r1];
        let idx: Vec<i64> = rows.iter().map(|&x| x.max(0)).collect();
        let keep: Vec<f32> = rows.iter().map(|&x| if x == IGNORE_INDEX { 0.0 } else { 1.0 }).collect();
        let n = r1 - r0;
        (
            Tensor::from_data(TensorData::new(idx, [n, 1]), device),
            Tensor::from_data(TensorData::new(keep, [n, 1]), (device, DType::F32)),
        )
    }
}

/// f32 logits of rows `[r0, r1)`, and `tanh(logits / cap)` when soft-capping.
fn logits<B: Backend>(
    hidden: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    (r0, r1): (usize, usize),
    spec: &CrossEntropySpec,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    let h = hidden.dims()[1];
    let z = hidden.clone().slice([r0..r1, 0..h]).matmul(weight.clone().transpose()).cast(DType::F32);
    match spec.softcap {
        Some(cap) => {
            let t = z.div_scalar(cap).tanh();
            (t.clone().mul_scalar(cap), Some(t))
        }
        None => (z, None),
    }
}

/// `hidden` `[n, h]`, `weight` `[vocab, h]` -> summed NLL `[1]` (f32), without gradients.
pub fn forward<B: Backend>(hidden: Tensor<B, 2>, weight: Tensor<B, 2>, spec: &CrossEntropySpec) -> Tensor<B, 1> {
    let [n, _] = hidden.dims();
    let vocab = weight.dims()[0];
    let device = hidden.device();
    let mut total = Tensor::<B, 1>::zeros([1], (&device, DType::F32));
    for chunk in spec.chunks(n, vocab) {
        let (z, _) = logits(&hidden, &weight, chunk, spec);
        let (idx, keep) = spec.chunk_targets::<B>(chunk, &device);
        let max = z.clone().max_dim(1);
        let lse = (z.clone() - max.clone()).exp().sum_dim(1).log() + max;
        total = total + ((lse - z.gather(1, idx)) * keep).sum();
    }
    total
}

/// The forward pass plus the gradient of the summed NLL with respect to `hidden` `[n, h]` (and
/// `weight` `[vocab, h]` when `want_weight`, a trainable head), for an upstream gradient of 1.
/// The loss is a scalar, so the backward only scales these: computing them here, while each
/// chunk's logits exist, spares the backward a second pass of the head's matmul.
pub fn forward_with_grad<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    spec: &CrossEntropySpec,
    want_weight: bool,
) -> (Tensor<B, 1>, Tensor<B, 2>, Option<Tensor<B, 2>>) {
    let [n, h] = hidden.dims();
    let vocab = weight.dims()[0];
    let device = hidden.device();
    let dtype = hidden.dtype();
    let mut total = Tensor::<B, 1>::zeros([1], (&device, DType::F32));
    let mut dhs = Vec::new();
    let mut dw = want_weight.then(|| Tensor::<B, 2>::zeros([vocab, h], (&device, DType::F32)));
    for chunk in spec.chunks(n, vocab) {
        let (r0, r1) = chunk;
        let (z, tanh) = logits(&hidden, &weight, chunk, spec);
        let (idx, keep) = spec.chunk_targets::<B>(chunk, &device);
        let max = z.clone().max_dim(1);
        let e = (z.clone() - max.clone()).exp();
        let sum = e.clone().sum_dim(1);
        let lse = sum.clone().log() + max;
        total = total + ((lse - z.gather(1, idx.clone())) * keep.clone()).sum();
        // d(sum of NLL) / d logits = (softmax - one_hot(target)) * keep
        let mut dz = (e / sum * keep.clone()).scatter(1, idx, keep.neg(), IndexingUpdateOp::Add);
        if let Some(t) = tanh {
            dz = dz * t.powi_scalar(2).neg().add_scalar(1.0);
        }
        let dz = dz.cast(dtype);
        if let Some(acc) = dw.take() {
            let hc = hidden.clone().slice([r0..r1, 0..h]);
            dw = Some(acc + dz.clone().transpose().matmul(hc).cast(DType::F32));
        }
        dhs.push(dz.matmul(weight.clone()));
    }
    (total, Tensor::cat(dhs, 0), dw.map(|w| w.cast(weight.dtype())))
}

/// The plain formula, for tests: full logits, `log_softmax`, gather.
pub fn reference<B: Backend>(hidden: Tensor<B, 2>, weight: Tensor<B, 2>, spec: &CrossEntropySpec) -> Tensor<B, 1> {
    let n = hidden.dims()[0];
    let (z, _) = logits(&hidden, &weight, (0, n), spec);
    let (idx, keep) = spec.chunk_targets::<B>((0, n), &hidden.device());
    (burn::tensor::activation::log_softmax(z, 1).gather(1, idx) * keep).sum().neg()
}
