//! The chunked form's backward, by hand (docs/ARCHITECTURES-2026 §1.5): recompute the per-chunk
//! quantities and the state before each chunk, run the state gradient backwards over the chunks,
//! then form every chunk's gradients at once through `M = (I + A)⁻¹`, `A`, `P`, the decays and
//! the chunk-local cumulative sum of `g`. Peak memory: the inputs, a few `[chunk, chunk]` matrices
//! per chunk and the states before and gradients after each chunk; never `[T, T]`.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use super::chunk::{merge, merge_col, split, Dims, Inputs, Intra, Masks};
use super::DeltaNetSpec;

/// Gradients of the chunked form's inputs, each in its input's dtype and shape.
#[derive(Debug, Clone)]
pub struct DeltaNetGrads<B: Backend> {
    pub q: Tensor<B, 4>,
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    pub g: Tensor<B, 3>,
    pub beta: Tensor<B, 3>,
}

/// Gradients of `q`, `k`, `v`, `g` and `beta` (the inputs of [`super::forward`], zero initial
/// state) from the output's gradient `dout` `[b, t, h, dv]`.
pub fn backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    g: Tensor<B, 3>,
    beta: Tensor<B, 3>,
    dout: Tensor<B, 4>,
    spec: &DeltaNetSpec,
) -> DeltaNetGrads<B> {
    let (qt, kt, vt, gt, bt) = (q.dtype(), k.dtype(), v.dtype(), g.dtype(), beta.dtype());
    let d = Dims::of(q.dims(), v.dims(), spec);
    let device = q.device();
    if d.t == 0 {
        return DeltaNetGrads {
            q: q.zeros_like(),
            k: k.zeros_like(),
            v: v.zeros_like(),
            g: g.zeros_like(),
            beta: beta.zeros_like(),
        };
    }
    let x = Inputs::new(q, k, v, g, beta, &d);
    let masks = Masks::new(spec, &d, &device);
    let it = Intra::new(&x, &masks);
    let (states, _) = it.scan(&x.k, Tensor::zeros([d.bh(), d.dk, d.dv], (&device, DType::F32)));
    let d_o = split(dout, &d);
    let ds_next = reverse_scan(&it, &x, &d_o);
    let (dq, dk, dv, dg, dbeta) = chunk_grads(&it, &x, &d_o, states, ds_next, &device);
    DeltaNetGrads {
        q: merge(dq, &d).cast(qt),
        k: merge(dk, &d).cast(kt),
        v: merge(dv, &d).cast(vt),
        g: merge_col(dg, &d).cast(gt),
        beta: merge_col(dbeta, &d).cast(bt),
    }
}

/// The gradient of the state after each chunk `[n, bh, dk, dv]` (zero after the last), from
/// `dS_n = λ dS_{n+1} + Q̃ᵀ dO - Wᵀ (Pᵀ dO + K̃ dS_{n+1})`, with `Q̃ = Γ ⊙ Q`, `K̃ = kdec ⊙ K`.
fn reverse_scan<B: Backend>(it: &Intra<B>, x: &Inputs<B>, d_o: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, bh, c, dk] = x.k.dims();
    let dv = d_o.dims()[3];
    let wt = it.w.clone().swap_dims(2, 3);
    let kd = x.k.clone() * it.kdec.clone();
    // Every chunk's dO terms at once.
    let qt = (x.q.clone() * it.decay_in.clone()).swap_dims(2, 3);
    let r = qt.matmul(d_o.clone()) - wt.clone().matmul(it.p.clone().swap_dims(2, 3).matmul(d_o.clone()));
    let at = |x: &Tensor<B, 4>, i: usize, r: usize, s: usize| x.clone().narrow(0, i, 1).reshape([bh, r, s]);
    let mut ds = Tensor::<B, 3>::zeros([bh, dk, dv], (&d_o.device(), DType::F32));
    let mut after = Vec::with_capacity(n);
    for i in (0..n).rev() {
        after.push(ds.clone());
        let back = at(&wt, i, dk, c).matmul(at(&kd, i, c, dk).matmul(ds.clone()));
        ds = ds * at(&it.lambda, i, 1, 1) + at(&r, i, dk, dv) - back;
    }
    after.reverse();
    Tensor::stack(after, 0)
}

/// Row sums of `[n, bh, c, c]` as a column `[n, bh, c, 1]`.
fn rows<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    x.sum_dim(3)
}

/// Column sums of `[n, bh, c, c]` as a column `[n, bh, c, 1]`.
fn cols<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    x.sum_dim(2).swap_dims(2, 3)
}

type Grads<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

/// Every chunk's input gradients (chunk layout; `dg`, `dβ` as columns) from the states before
/// (`s`) and the state gradients after (`ds`) each chunk.
fn chunk_grads<B: Backend>(
    it: &Intra<B>,
    x: &Inputs<B>,
    d_o: &Tensor<B, 4>,
    s: Tensor<B, 4>,
    ds: Tensor<B, 4>,
    device: &B::Device,
) -> Grads<B> {
    let c = x.k.dims()[2];
    let t = |x: &Tensor<B, 4>| x.clone().swap_dims(2, 3);
    let feat = |a: &Tensor<B, 4>, b: Tensor<B, 4>| (a.clone() * b).sum_dim(3);
    // Through the hand-over: V' = U - W S, O = Q̃ S + P V', S_next = λ S + K̃ᵀ V'.
    let vp = it.u.clone() - it.w.clone().matmul(s.clone());
    let dvp = t(&it.p).matmul(d_o.clone()) + (x.k.clone() * it.kdec.clone()).matmul(ds.clone());
    let dqt = d_o.clone().matmul(t(&s));
    let dkt = vp.clone().matmul(t(&ds));
    let dlambda = (s.clone() * ds).sum_dim(3).sum_dim(2);
    let dp = d_o.clone().matmul(t(&vp));
    let dw = dvp.clone().matmul(t(&s)).neg();
    // Through U = M Vb, W = M Kb, M = (I + A)⁻¹: dA = -Mᵀ dM Mᵀ = -(dVb Uᵀ + dKb Wᵀ).
    let mt = t(&it.m);
    let dvb = mt.clone().matmul(dvp);
    let dkb = mt.matmul(dw);
    let da = (dvb.clone().matmul(t(&it.u)) + dkb.clone().matmul(t(&it.w))).neg().tril(-1);
    // Through A = β ⊙ (K Kᵀ ⊙ D) (strict lower) and P = (Q Kᵀ) ⊙ D.
    let da_kkd = da.clone() * it.kkd.clone();
    let e = da * it.d.clone() * x.beta.clone();
    let f = dp.clone() * it.d.clone();
    let h = da_kkd.clone() * x.beta.clone() + dp * it.p.clone();
    // Through Vb = β V, Kb = β Γ K, Q̃ = Γ Q, K̃ = kdec K.
    let kb_k = feat(&x.k, dkb.clone());
    let kt_k = feat(&x.k, dkt.clone()) * it.kdec.clone();
    let dq = dqt.clone() * it.decay_in.clone() + f.clone().matmul(x.k.clone());
    let dk = dkb * (x.beta.clone() * it.decay_in.clone())
        + dkt * it.kdec.clone()
        + (e.clone() + t(&e)).matmul(x.k.clone())
        + t(&f).matmul(x.q.clone());
    let dv = dvb.clone() * x.beta.clone();
    let dbeta = feat(&x.v, dvb) + kb_k.clone() * it.decay_in.clone() + rows(da_kkd);
    // γ: every exp(γ_i - γ_j) pair, Γ, kdec = exp(γ_C - γ) and λ = exp(γ_C).
    let last = Tensor::<B, 4>::from_data(
        TensorData::new((0..c).map(|i| f32::from(u8::from(i + 1 == c))).collect::<Vec<_>>(), [1, 1, c, 1]),
        (device, DType::F32),
    );
    let to_last = kt_k.clone().sum_dim(2) + dlambda * it.lambda.clone();
    let dgamma =
        (kb_k * x.beta.clone() + feat(&x.q, dqt)) * it.decay_in.clone() - kt_k + last * to_last + rows(h.clone())
            - cols(h);
    // γ = cumsum(g) within the chunk: dg is the reverse cumulative sum of dγ.
    let dg = dgamma.clone().sum_dim(2) - dgamma.clone().cumsum(2) + dgamma;
    (dq, dk, dv, dg, dbeta)
}
