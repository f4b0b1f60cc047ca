//! Blockwise attention: causal, sliding-window and segment (packing) masks, logit soft-capping
//! and grouped-query heads without repeating K/V, never holding `[heads, q_len, k_len]` scores
//! for the whole sequence.
//!
//! The queries are cut into row blocks; each block's scores against the keys it may see (its
//! causal and window span) are formed, masked, soft-maxed in f32 and multiplied with V. The
//! forward keeps only the output and each row's log-sum-exp, and the backward recomputes every
//! block's probabilities from them (FlashAttention's recipe: `dS = P * (dP - rowsum(dO * O))`).
//! Each row block sees its whole key span at once, so no online rescaling across key blocks is
//! needed: the peak is `rows * k_len` scores per block instead of `q_len * k_len`, and with
//! Burn's tensor ops (no fused kernel) fewer, larger matmuls are faster than many small tiles.

use std::sync::Arc;

use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};

/// Scores at or above this many f32 values per block are split into more row blocks.
const BLOCK_SCORES: usize = 1 << 22;
/// Added to blocked scores (finite, so `0 * bias` stays 0 and no NaN appears).
const BLOCKED: f32 = -1.0e30;

/// What one attention call computes.
#[derive(Debug, Clone)]
pub struct AttentionSpec {
    /// Multiplies `q . k` (usually `1 / sqrt(head_dim)`).
    pub scale: f64,
    /// Gemma 2: `cap * tanh(scores / cap)` before masking.
    pub softcap: Option<f64>,
    /// A query at position `q` sees keys `k` with `q - k < window`.
    pub window: Option<usize>,
    /// Llama 4's chunked attention: a query sees only keys of its own chunk of `chunk`
    /// positions, counted from the start of its segment (of the row without segments; cached
    /// positions included), as transformers counts them from a row's first unpadded token.
    pub chunk: Option<usize>,
    /// Keys already cached before this call's queries (generation).
    pub past_len: usize,
    /// Per row, a segment id per key position (past + new); a query sees only keys of its own
    /// segment (packing).
    pub segments: Option<Arc<Vec<Vec<u32>>>>,
    /// Query rows per block; `None` picks it from the problem size.
    pub block_rows: Option<usize>,
    /// gpt-oss: per head, a learned logit that joins every row's softmax denominator (and takes
    /// no value): `p_j = exp(s_j) / (sum_k exp(s_k) + exp(sink))`.
    pub sinks: Option<Arc<Vec<f32>>>,
}

impl AttentionSpec {
    pub fn causal(scale: f64) -> Self {
        Self {
            scale,
            softcap: None,
            window: None,
            chunk: None,
            past_len: 0,
            segments: None,
            block_rows: None,
            sinks: None,
        }
    }

    fn block_rows(&self, batch: usize, heads: usize, q_len: usize, k_len: usize) -> usize {
        let rows = self.block_rows.unwrap_or_else(|| BLOCK_SCORES / (batch * heads * k_len).max(1));
        rows.clamp(1, q_len.max(1))
    }

    /// Row blocks `[q0, q1)` of the queries and the key span `[k0, k1)` each may see.
    fn blocks(&self, batch: usize, heads: usize, q_len: usize, k_len: usize) -> Vec<(usize, usize, usize, usize)> {
        let rows = self.block_rows(batch, heads, q_len, k_len);
        (0..q_len)
            .step_by(rows)
            .map(|q0| {
                let q1 = (q0 + rows).min(q_len);
                let k1 = (self.past_len + q1).min(k_len);
                let mut k0 = self.window.map_or(0, |w| (self.past_len + q0 + 1).saturating_sub(w));
                // With segments, a chunk starts at its segment's start: no narrowing here.
                if let (Some(c), None) = (self.chunk.filter(|&c| c > 0), &self.segments) {
                    k0 = k0.max((self.past_len + q0) / c * c);
                }
                (q0, q1, k0.min(k1), k1)
            })
            .collect()
    }

    /// Additive mask `[rows or 1, 1, 1, q1 - q0, k1 - k0]` (0 or [`BLOCKED`]) for one block.
    fn bias<B: Backend>(&self, (q0, q1, k0, k1): (usize, usize, usize, usize), device: &B::Device) -> Tensor<B, 5> {
        let (bq, bk) = (q1 - q0, k1 - k0);
        let q = self.past_len + q0;
        let qpos = Tensor::<B, 1, Int>::arange(q as i64..(q + bq) as i64, device).float().reshape([bq, 1]);
        let kpos = Tensor::<B, 1, Int>::arange(k0 as i64..k1 as i64, device).float().reshape([1, bk]);
        // k - q: positive where the key is in the future.
        let ahead = kpos - qpos;
        let mut blocked = ahead.clone().clamp(0.0, 1.0);
        if let Some(w) = self.window {
            // q - k >= w, i.e. (q - k) - (w - 1) >= 1.
            blocked = blocked + ahead.clone().neg().sub_scalar(w as f64 - 1.0).clamp(0.0, 1.0);
        }
        let chunk = self.chunk.filter(|&c| c > 0);
        if let (Some(c), None) = (chunk, &self.segments) {
            // Another chunk: floor(q / c) - floor(k / c) >= 1 (keys ahead are blocked already).
            let qc = Tensor::<B, 1, Int>::arange(q as i64..(q + bq) as i64, device).div_scalar(c as i64);
            let kc = Tensor::<B, 1, Int>::arange(k0 as i64..k1 as i64, device).div_scalar(c as i64);
            let apart = qc.float().reshape([bq, 1]) - kc.float().reshape([1, bk]);
            blocked = blocked + apart.clamp(0.0, 1.0);
        }
        let blocked: Tensor<B, 5> = match &self.segments {
            None => blocked.reshape([1, 1, 1, bq, bk]),
            Some(seg) => {
                let rows = seg.len();
                let flat: Vec<f32> = seg
                    .iter()
                    .flat_map(|r| (0..k1).map(move |i| r.get(i).copied().unwrap_or(u32::MAX) as f32))
                    .collect();
                let ids = Tensor::<B, 2>::from_data(TensorData::new(flat, [rows, k1]), (device, DType::F32));
                let sq = ids.clone().slice([0..rows, q..q + bq]).reshape([rows, bq, 1]);
                let sk = ids.slice([0..rows, k0..k1]).reshape([rows, 1, bk]);
                let mut other = (sk - sq).abs().clamp_max(1.0);
                if let Some(c) = chunk {
                    // Per row, each position's chunk within its segment (a run of equal ids).
                    let ids: Vec<f32> = seg.iter().flat_map(|r| chunk_ids(r, k1, c)).collect();
                    let ids = Tensor::<B, 2>::from_data(TensorData::new(ids, [rows, k1]), (device, DType::F32));
                    let cq = ids.clone().slice([0..rows, q..q + bq]).reshape([rows, bq, 1]);
                    let ck = ids.slice([0..rows, k0..k1]).reshape([rows, 1, bk]);
                    other = other + (ck - cq).abs().clamp_max(1.0);
                }
                (other + blocked.unsqueeze::<3>()).reshape([rows, 1, 1, bq, bk])
            }
        };
        blocked.clamp_max(1.0).mul_scalar(BLOCKED as f64)
    }
}

/// The chunk of each of a row's first `len` positions, counted from the start of its segment
/// (a run of equal segment ids; positions past the row's ids form one more run).
fn chunk_ids(row: &[u32], len: usize, chunk: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    let mut start = 0;
    for i in 0..len {
        if i > 0 && row.get(i) != row.get(i - 1) {
            start = i;
        }
        out.push(((i - start) / chunk) as f32);
    }
    out
}

/// Scores of one block in f32 before masking: `[b, kv, g, bq, bk]`, plus `tanh(s / cap)` when
/// soft-capping (the backward needs it).
fn scores<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    dims: [usize; 5],
    spec: &AttentionSpec,
) -> (Tensor<B, 5>, Option<Tensor<B, 5>>) {
    let s = q.matmul(k.swap_dims(2, 3)).cast(DType::F32).mul_scalar(spec.scale).reshape(dims);
    match spec.softcap {
        Some(cap) => {
            let t = s.div_scalar(cap).tanh();
            (t.clone().mul_scalar(cap), Some(t))
        }
        None => (s, None),
    }
}

/// `scores` `[b, kv, g, bq, bk]` plus a mask `[rows or 1, 1, 1, bq, bk]`, added as one
/// `[bq * bk]` row shared by every head (the backends' fast broadcast shape).
fn add_bias<B: Backend>(scores: Tensor<B, 5>, bias: Tensor<B, 5>) -> Tensor<B, 5> {
    let dims = scores.dims();
    let [b, kv, g, bq, bk] = dims;
    let rows = bias.dims()[0];
    (scores.reshape([b, kv * g, bq * bk]) + bias.reshape([rows, 1, bq * bk])).reshape(dims)
}

/// Slices of one row block: `q` as `[b, kv, g * bq, hd]`, `k` / `v` spans `[b, kv, bk, hd | vd]`.
fn block_inputs<B: Backend>(
    q: &Tensor<B, 5>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    (q0, q1, k0, k1): (usize, usize, usize, usize),
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, kv, g, _, hd] = q.dims();
    let qb = q.clone().slice([0..b, 0..kv, 0..g, q0..q1, 0..hd]).reshape([b, kv, g * (q1 - q0), hd]);
    let kb = k.clone().slice([0..b, 0..kv, k0..k1, 0..hd]);
    let vb = v.clone().slice([0..b, 0..kv, k0..k1, 0..v.dims()[3]]);
    (qb, kb, vb)
}

/// `q` `[b, h, t, hd]`, `k` `[b, kv, s, hd]`, `v` `[b, kv, s, vd]` -> the output `[b, h, t, vd]`
/// (in `v`'s dtype) and the f32 log-sum-exp of every query row `[b, h, t]`. The value head dim
/// may differ from the query/key one (multi-head latent attention).
pub fn forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    spec: &AttentionSpec,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let [b, h, t, hd] = q.dims();
    let [_, kv, s, _] = k.dims();
    let vd = v.dims()[3];
    let g = h / kv;
    let device = q.device();
    let q = q.reshape([b, kv, g, t, hd]);
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for blk in spec.blocks(b, h, t, s) {
        let (q0, q1, k0, k1) = blk;
        let (bq, bk) = (q1 - q0, k1 - k0);
        let (qb, kb, vb) = block_inputs(&q, &k, &v, blk);
        let (sc, _) = scores(qb, kb, [b, kv, g, bq, bk], spec);
        let sc = add_bias(sc, spec.bias::<B>(blk, &device));
        let mut max = sc.clone().max_dim(4);
        let sink = spec.sinks.as_ref().map(|s| {
            Tensor::<B, 1>::from_data(TensorData::new(s.to_vec(), [s.len()]), (&device, DType::F32))
                .reshape([1, kv, g, 1, 1])
        });
        if let Some(s) = &sink {
            max = max.max_pair(s.clone().expand([b, kv, g, bq, 1]));
        }
        let e = (sc - max.clone()).exp();
        let mut sum = e.clone().sum_dim(4);
        if let Some(s) = sink {
            // The sink's own term; the log-sum-exp the backward recomputes P from includes it.
            sum = sum + (s - max.clone()).exp();
        }
        let p = (e / sum.clone()).cast(vb.dtype()).reshape([b, kv, g * bq, bk]);
        outs.push(p.matmul(vb).reshape([b, kv, g, bq, vd]));
        lses.push((max + sum.log()).reshape([b, kv, g, bq]));
    }
    let out = Tensor::cat(outs, 3).reshape([b, h, t, vd]);
    let lse = Tensor::cat(lses, 3).reshape([b, h, t]);
    (out, lse)
}

/// Gradients of q, k and v from the upstream gradient `dout` `[b, h, t, vd]`, recomputing each
/// block's probabilities from the saved `lse`. Accumulates in f32; returns the inputs' dtypes.
pub fn backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    out: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    dout: Tensor<B, 4>,
    spec: &AttentionSpec,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, t, hd] = q.dims();
    let [_, kv, s, _] = k.dims();
    let vd = v.dims()[3];
    let g = h / kv;
    let device = q.device();
    let (qdt, kdt, vdt) = (q.dtype(), k.dtype(), v.dtype());
    let q = q.reshape([b, kv, g, t, hd]);
    let dout = dout.cast(vdt).reshape([b, kv, g, t, vd]);
    // rowsum(dO * O), f32: `[b, kv, g, t, 1]`.
    let delta = (dout.clone().cast(DType::F32) * out.cast(DType::F32).reshape([b, kv, g, t, vd])).sum_dim(4);
    let lse = lse.reshape([b, kv, g, t, 1]);
    let mut dk = Tensor::<B, 4>::zeros([b, kv, s, hd], (&device, DType::F32));
    let mut dv = Tensor::<B, 4>::zeros([b, kv, s, vd], (&device, DType::F32));
    let mut dqs = Vec::new();
    for blk in spec.blocks(b, h, t, s) {
        let (q0, q1, k0, k1) = blk;
        let (bq, bk) = (q1 - q0, k1 - k0);
        let (qb, kb, vb) = block_inputs(&q, &k, &v, blk);
        // The block's rows of a per-row tensor, made contiguous (a strided right-hand side
        // takes the backends' slow broadcast path).
        let rows = |x: &Tensor<B, 5>, d: usize| {
            x.clone().slice([0..b, 0..kv, 0..g, q0..q1, 0..d]).reshape([b * kv * g * bq * d]).reshape([b, kv, g, bq, d])
        };
        let (sc, tanh) = scores(qb.clone(), kb.clone(), [b, kv, g, bq, bk], spec);
        let p = (add_bias(sc, spec.bias::<B>(blk, &device)) - rows(&lse, 1)).exp();
        let dob = rows(&dout, vd).reshape([b, kv, g * bq, vd]);
        // dV += P^T dO
        let pm = p.clone().reshape([b, kv, g * bq, bk]);
        let dv_blk = pm.cast(vdt).swap_dims(2, 3).matmul(dob.clone()).cast(DType::F32);
        // dS = P * (dO V^T - delta)
        let dp = dob.matmul(vb.swap_dims(2, 3)).cast(DType::F32).reshape([b, kv, g, bq, bk]);
        let mut ds = p * (dp - rows(&delta, 1));
        if let Some(t) = tanh {
            ds = ds * (t.powi_scalar(2).neg().add_scalar(1.0));
        }
        let ds = ds.mul_scalar(spec.scale).reshape([b, kv, g * bq, bk]);
        dqs.push(ds.clone().cast(kdt).matmul(kb).cast(DType::F32).reshape([b, kv, g, bq, hd]));
        let dk_blk = ds.cast(qdt).swap_dims(2, 3).matmul(qb).cast(DType::F32);
        let (kspan, vspan) = ([0..b, 0..kv, k0..k1, 0..hd], [0..b, 0..kv, k0..k1, 0..vd]);
        dk = dk.clone().slice_assign(kspan.clone(), dk.slice(kspan) + dk_blk);
        dv = dv.clone().slice_assign(vspan.clone(), dv.slice(vspan) + dv_blk);
    }
    let dq = Tensor::cat(dqs, 3).reshape([b, h, t, hd]).cast(qdt);
    (dq, dk.cast(kdt), dv.cast(vdt))
}

/// The plain formula, for tests: full `[b, h, t, s]` scores with K/V repeated per group and a
/// boolean mask built on the host. Differentiable by Burn's autodiff.
pub fn reference<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, spec: &AttentionSpec) -> Tensor<B, 4> {
    let [b, h, t, _] = q.dims();
    let [_, kv, s, _] = k.dims();
    let g = h / kv;
    let device = q.device();
    let repeat = |x: Tensor<B, 4>| {
        let d = x.dims()[3];
        x.reshape([b, kv, 1, s, d]).repeat_dim(2, g).reshape([b, h, s, d])
    };
    let (k, v) = (repeat(k), repeat(v));
    let mut sc = q.matmul(k.swap_dims(2, 3)).cast(DType::F32).mul_scalar(spec.scale);
    if let Some(cap) = spec.softcap {
        sc = sc.div_scalar(cap).tanh().mul_scalar(cap);
    }
    let mut blocked = Vec::with_capacity(b * t * s);
    for r in 0..b {
        for qi in 0..t {
            let qp = spec.past_len + qi;
            for kp in 0..s {
                let mut no = kp > qp || spec.window.is_some_and(|w| qp - kp.min(qp) >= w);
                if let Some(c) = spec.chunk.filter(|&c| c > 0) {
                    let ids = spec.segments.as_ref().map(|seg| chunk_ids(&seg[r], s.max(qp + 1), c));
                    no |= match ids {
                        Some(ids) => ids[kp] != ids[qp],
                        None => kp / c != qp / c,
                    };
                }
                if let Some(seg) = &spec.segments {
                    no |= seg[r].get(kp) != seg[r].get(qp);
                }
                blocked.push(no);
            }
        }
    }
    let mask =
        Tensor::<B, 4, burn::tensor::Bool>::from_data(TensorData::new(blocked, [b, 1, t, s]), &device).repeat_dim(1, h);
    let sc = sc.mask_fill(mask, f32::MIN);
    let p = match &spec.sinks {
        // softmax over [scores, sink], the sink's column dropped.
        Some(sinks) => {
            let col = Tensor::<B, 1>::from_data(TensorData::new(sinks.to_vec(), [h]), (&device, DType::F32))
                .reshape([1, h, 1, 1])
                .expand([b, h, t, 1]);
            burn::tensor::activation::softmax(Tensor::cat(vec![sc, col], 3), 3).slice([0..b, 0..h, 0..t, 0..s])
        }
        None => burn::tensor::activation::softmax(sc, 3),
    };
    p.cast(v.dtype()).matmul(v)
}
