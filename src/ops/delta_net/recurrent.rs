//! The gated delta rule one position at a time (its definition, docs/ARCHITECTURES-2026 §1.3):
//! single-token decoding, and the reference the chunked form is tested against (differentiable
//! by Burn's autodiff, being plain tensor ops).

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use super::DeltaNetSpec;

/// Same inputs and outputs as [`super::chunked_with_state`]: per position
/// `S <- exp(g_t) S` (zero where a segment starts), `S <- S + k_t (beta_t (v_t - Sᵀ k_t))ᵀ`,
/// `o_t = Sᵀ q_t`. Returns the output `[b, t, h, dv]` and the final state `[b, h, dk, dv]` (f32).
pub fn recurrent<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    g: Tensor<B, 3>,
    beta: Tensor<B, 3>,
    initial_state: Option<Tensor<B, 4>>,
    spec: &DeltaNetSpec,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, t, h, dk] = q.dims();
    let dv = v.dims()[3];
    let device = q.device();
    let fp = DType::F32;
    let (q, k, v, g, beta) = (q.cast(fp), k.cast(fp), v.cast(fp), g.cast(fp), beta.cast(fp));
    let mut s = match initial_state {
        Some(s) => s.cast(fp),
        None => Tensor::zeros([b, h, dk, dv], (&device, fp)),
    };
    if t == 0 {
        return (Tensor::zeros([b, 0, h, dv], (&device, fp)), s);
    }
    // Per position and row, 0 where a new segment starts (the state restarts), else 1.
    let keep = spec.segment_index(b, t).map(|index| {
        let flat: Vec<f32> = (0..t)
            .flat_map(|i| index.iter().map(move |row| f32::from(u8::from(i == 0 || row[i] == row[i - 1]))))
            .collect();
        Tensor::<B, 2>::from_data(TensorData::new(flat, [t, b]), (&device, fp))
    });
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        let step = |x: &Tensor<B, 4>, e: usize| x.clone().narrow(1, i, 1).reshape([b, h, 1, e]);
        let scalar = |x: &Tensor<B, 3>| x.clone().narrow(1, i, 1).reshape([b, h, 1, 1]);
        let mut decay = scalar(&g).exp();
        if let Some(keep) = &keep {
            decay = decay * keep.clone().narrow(0, i, 1).reshape([b, 1, 1, 1]);
        }
        s = s * decay;
        let kt = step(&k, dk);
        let delta = (step(&v, dv) - kt.clone().matmul(s.clone())) * scalar(&beta);
        s = s + kt.swap_dims(2, 3).matmul(delta);
        outs.push(step(&q, dk).matmul(s.clone()));
    }
    (Tensor::cat(outs, 2).swap_dims(1, 2), s)
}
