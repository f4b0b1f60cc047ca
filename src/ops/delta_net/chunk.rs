//! The chunked form's pieces: inputs laid out chunk by chunk, the segment masks, the per-chunk
//! quantities of docs/ARCHITECTURES-2026 §1.4 (for every chunk at once) and the sequential
//! hand-over of the state from chunk to chunk.
//!
//! Layout: `[n, b * h, c, d]` (chunk, batch row and head, position in the chunk, feature), so that
//! one chunk is a contiguous slice and every intra-chunk product is one batched matmul. Per
//! position scalars are columns `[n, b * h, c, 1]`.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use super::{inverse::unit_lower_inverse, DeltaNetSpec};

/// Sizes of one call: batch rows, positions, heads, key and value dims, chunk length, chunks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub dk: usize,
    pub dv: usize,
    pub c: usize,
    pub n: usize,
}

impl Dims {
    pub fn of([b, t, h, dk]: [usize; 4], v: [usize; 4], spec: &DeltaNetSpec) -> Self {
        let c = spec.chunk.max(1);
        Self { b, t, h, dk, dv: v[3], c, n: t.div_ceil(c) }
    }

    pub fn bh(&self) -> usize {
        self.b * self.h
    }
}

/// `[b, t, h, e]` -> f32 `[n, b * h, c, e]`, right-padded with zeros to `n * c` positions.
pub(super) fn split<B: Backend>(x: Tensor<B, 4>, d: &Dims) -> Tensor<B, 4> {
    let [b, t, h, e] = x.dims();
    let mut x = x.cast(DType::F32);
    let padded = d.n * d.c;
    if padded > t {
        let pad = Tensor::zeros([b, padded - t, h, e], (&x.device(), DType::F32));
        x = Tensor::cat(vec![x, pad], 1);
    }
    x.reshape([b, d.n, d.c, h, e]).permute([1, 0, 3, 2, 4]).reshape([d.n, b * h, d.c, e])
}

/// [`split`] of a per-position scalar `[b, t, h]` -> `[n, b * h, c, 1]`.
pub(super) fn split_col<B: Backend>(x: Tensor<B, 3>, d: &Dims) -> Tensor<B, 4> {
    split(x.unsqueeze_dim(3), d)
}

/// Inverse of [`split`]: `[n, b * h, c, e]` -> `[b, t, h, e]`.
pub(super) fn merge<B: Backend>(x: Tensor<B, 4>, d: &Dims) -> Tensor<B, 4> {
    let e = x.dims()[3];
    x.reshape([d.n, d.b, d.h, d.c, e]).permute([1, 0, 3, 2, 4]).reshape([d.b, d.n * d.c, d.h, e]).narrow(1, 0, d.t)
}

/// Inverse of [`split_col`]: `[n, b * h, c, 1]` -> `[b, t, h]`.
pub(super) fn merge_col<B: Backend>(x: Tensor<B, 4>, d: &Dims) -> Tensor<B, 3> {
    merge(x, d).reshape([d.b, d.t, d.h])
}

/// The inputs in f32, laid out per chunk.
pub(super) struct Inputs<B: Backend> {
    pub q: Tensor<B, 4>,
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    pub g: Tensor<B, 4>,
    pub beta: Tensor<B, 4>,
}

impl<B: Backend> Inputs<B> {
    pub fn new(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        g: Tensor<B, 3>,
        beta: Tensor<B, 3>,
        d: &Dims,
    ) -> Self {
        debug_assert_eq!(k.dims(), q.dims(), "q and k shapes");
        debug_assert_eq!(g.dims(), [d.b, d.t, d.h], "g shape");
        debug_assert_eq!(beta.dims(), [d.b, d.t, d.h], "beta shape");
        Self { q: split(q, d), k: split(k, d), v: split(v, d), g: split_col(g, d), beta: split_col(beta, d) }
    }
}

/// Where the state may flow (all f32 0/1): `carry` `[n, bh, c, 1]` marks the rows that continue
/// the segment the previous chunk ended in (the carried-in state reaches them; the first chunk's
/// first segment continues the initial state), `end` `[n, bh, c, 1]` the rows of the chunk's last
/// segment (they feed the carried-out state), `same` `[n or 1, bh or 1, c, c]` the causal pairs
/// `j <= i` of one segment.
pub(super) struct Masks<B: Backend> {
    pub carry: Tensor<B, 4>,
    pub end: Tensor<B, 4>,
    pub same: Tensor<B, 4>,
}

impl<B: Backend> Masks<B> {
    pub fn new(spec: &DeltaNetSpec, d: &Dims, device: &B::Device) -> Self {
        let causal = Tensor::<B, 2>::ones([d.c, d.c], (device, DType::F32)).tril(0).reshape([1, 1, d.c, d.c]);
        let Some(index) = spec.segment_index(d.b, d.n * d.c) else {
            let ones = Tensor::ones([d.n, d.bh(), d.c, 1], (device, DType::F32));
            return Self { carry: ones.clone(), end: ones, same: causal };
        };
        let (mut carry, mut end, mut seg) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in 0..d.n {
            for row in &index {
                let start = chunk * d.c;
                let before = if start == 0 { 0 } else { row[start - 1] };
                let last = row[start + d.c - 1];
                for &s in &row[start..start + d.c] {
                    carry.push(f32::from(u8::from(s == before)));
                    end.push(f32::from(u8::from(s == last)));
                    // Exact in f32 below 2^24 segments per row.
                    seg.push(s as f32);
                }
            }
        }
        let per_head = |x: Vec<f32>| {
            Tensor::<B, 4>::from_data(TensorData::new(x, [d.n, d.b, 1, d.c]), (device, DType::F32))
                .expand([d.n, d.b, d.h, d.c])
                .reshape([d.n, d.bh(), d.c, 1])
        };
        let seg = per_head(seg);
        // Segment indices only grow along a row: i and j share a segment when s_i - s_j is 0.
        let apart = outer_difference(seg).clamp(0.0, 1.0);
        Self { carry: per_head(carry), end: per_head(end), same: apart.neg().add_scalar(1.0) * causal }
    }
}

/// Every chunk's intra-chunk quantities, f32. With `γ` the chunk-local cumulative sum of `g`:
/// `D_ij = exp(γ_i - γ_j)` on `same`, `A = strict_lower(diag(β) K Kᵀ ⊙ D)`, `P = (Q Kᵀ) ⊙ D`,
/// `M = (I + A)⁻¹`, `U = M diag(β) V`, `W = M diag(β Γ) K` with `Γ = carry ⊙ exp(γ)`
/// (`decay_in`), the carried-out state's key weights `kdec = end ⊙ exp(γ_C - γ)` and its decay
/// `λ = carry_C exp(γ_C)`; `kkd = K Kᵀ ⊙ D` (so `A = strict_lower(diag(β) kkd)`) is kept for
/// the backward.
pub(super) struct Intra<B: Backend> {
    pub decay_in: Tensor<B, 4>,
    pub kdec: Tensor<B, 4>,
    pub lambda: Tensor<B, 4>,
    pub d: Tensor<B, 4>,
    pub kkd: Tensor<B, 4>,
    pub p: Tensor<B, 4>,
    pub m: Tensor<B, 4>,
    pub u: Tensor<B, 4>,
    pub w: Tensor<B, 4>,
}

impl<B: Backend> Intra<B> {
    pub fn new(x: &Inputs<B>, masks: &Masks<B>) -> Self {
        let [n, bh, c, _] = x.k.dims();
        let gamma = x.g.clone().cumsum(2);
        let gamma_last = gamma.clone().narrow(2, c - 1, 1);
        let decay_in = gamma.clone().exp() * masks.carry.clone();
        let kdec = (gamma_last.clone() - gamma.clone()).exp() * masks.end.clone();
        // γ_i - γ_j, zeroed above the diagonal before exp (where it is positive and may
        // overflow), then masked.
        let diff = outer_difference(gamma.clone()).tril(0);
        let lambda = gamma_last.exp() * masks.carry.clone().narrow(2, c - 1, 1);
        let d = diff.exp() * masks.same.clone();
        let kt = x.k.clone().swap_dims(2, 3);
        let kkd = x.k.clone().matmul(kt.clone()) * d.clone();
        let a = (kkd.clone() * x.beta.clone()).tril(-1);
        let p = x.q.clone().matmul(kt) * d.clone();
        let m = unit_lower_inverse(a.reshape([n * bh, c, c])).reshape([n, bh, c, c]);
        let u = m.clone().matmul(x.v.clone() * x.beta.clone());
        let w = m.clone().matmul(x.k.clone() * (x.beta.clone() * decay_in.clone()));
        Self { decay_in, kdec, lambda, d, kkd, p, m, u, w }
    }

    /// The state before each chunk `[n, bh, dk, dv]` and after the last `[bh, dk, dv]`, from
    /// `s0` `[bh, dk, dv]`: `S <- λ S + (kdec ⊙ K)ᵀ (U - W S)`, one chunk at a time.
    pub fn scan(&self, k: &Tensor<B, 4>, s0: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 3>) {
        let [n, bh, c, dk] = k.dims();
        let dv = self.u.dims()[3];
        let kd = (k.clone() * self.kdec.clone()).swap_dims(2, 3);
        let at = |x: &Tensor<B, 4>, i: usize, r: usize, s: usize| x.clone().narrow(0, i, 1).reshape([bh, r, s]);
        let mut s = s0;
        let mut states = Vec::with_capacity(n);
        for i in 0..n {
            states.push(s.clone());
            let vp = at(&self.u, i, c, dv) - at(&self.w, i, c, dk).matmul(s.clone());
            s = s * at(&self.lambda, i, 1, 1) + at(&kd, i, dk, c).matmul(vp);
        }
        (Tensor::stack(states, 0), s)
    }

    /// `O = (Γ ⊙ Q) S + P (U - W S)` for the states before each chunk `[n, bh, dk, dv]`.
    pub fn output(&self, q: &Tensor<B, 4>, states: &Tensor<B, 4>) -> Tensor<B, 4> {
        let vp = self.u.clone() - self.w.clone().matmul(states.clone());
        (q.clone() * self.decay_in.clone()).matmul(states.clone()) + self.p.clone().matmul(vp)
    }
}

/// `x` `[n, m, c, 1]` -> `[n, m, c, c]` with `out[.., i, j] = x_i - x_j`.
///
/// Both operands are expanded to the full shape before the subtraction: on wgpu, Burn 0.21's
/// fusion computes `x - x.swap_dims(2, 3)` (one buffer read through two broadcast layouts) wrongly (for
/// `x = [-50, -100, -150, -200]` its last row came out `[-150, 100, 150, 200]`), which turned
/// the decays into `exp(+200)` and the outputs into NaN. Tested on lavapipe by the wgpu group.
pub(super) fn outer_difference<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, m, c, _] = x.dims();
    x.clone().expand([n, m, c, c]) - x.swap_dims(2, 3).expand([n, m, c, c])
}
