//! The causal-LM loss: next-token negative log-likelihood in f32, masked by `-100` labels,
//! summed so callers can weight by tokens across micro-batches and rows.

use burn::tensor::{activation::log_softmax, backend::Backend, DType, Int, Tensor, TensorData};

/// Label value excluded from the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Targets for a batch: `targets[b][i]` is the label of position `i + 1` (what position `i`
/// predicts), `IGNORE_INDEX` at the last position; plus the count of trained targets.
pub fn shift_labels(labels: &[Vec<i64>]) -> (Vec<i64>, usize) {
    let mut out = Vec::with_capacity(labels.iter().map(Vec::len).sum());
    let mut count = 0;
    for row in labels {
        for i in 0..row.len() {
            let t = row.get(i + 1).copied().unwrap_or(IGNORE_INDEX);
            count += usize::from(t != IGNORE_INDEX);
            out.push(t);
        }
    }
    (out, count)
}

/// Sum of the NLL over trained positions: `logits` `[batch, seq, vocab]` (f32) and already
/// shifted `targets` (`batch * seq` values, `IGNORE_INDEX` excluded). Returns a `[1]` tensor.
pub fn nll_sum<B: Backend>(logits: Tensor<B, 3>, targets: &[i64]) -> Tensor<B, 1> {
    let [b, t, _] = logits.dims();
    let device = logits.device();
    let idx: Vec<i64> = targets.iter().map(|&x| x.max(0)).collect();
    let keep: Vec<f32> = targets.iter().map(|&x| if x == IGNORE_INDEX { 0.0 } else { 1.0 }).collect();
    let idx = Tensor::<B, 3, Int>::from_data(TensorData::new(idx, [b, t, 1]), &device);
    let keep = Tensor::<B, 3>::from_data(TensorData::new(keep, [b, t, 1]), (&device, DType::F32));
    let logp = log_softmax(logits.cast(DType::F32), 2).gather(2, idx);
    (logp * keep).sum().neg()
}
