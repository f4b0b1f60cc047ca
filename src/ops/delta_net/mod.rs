//! Gated DeltaNet (Qwen 3.5 / Qwen3-Next linear attention): the gated delta rule in its chunked
//! form with a hand-written backward, the plain recurrence it is tested against, and the
//! prefill form that starts from and returns a recurrent state.
//!
//! Per batch row and head, with a state `S` `[dk, dv]` starting at zero:
//! `S <- exp(g_t) S`, `S <- S + k_t (beta_t (v_t - Sᵀ k_t))ᵀ`, `o_t = Sᵀ q_t`.
//!
//! The chunked form (docs/ARCHITECTURES-2026 §1.4) cuts the sequence into chunks of `spec.chunk`
//! positions. Within a chunk everything is a batched matmul over all chunks, heads and rows at
//! once (the WY representation with `M = (I + A)⁻¹`, inverted exactly by recursive blocks); only
//! the state hand-over from one chunk to the next is a sequential loop. Nothing larger than one
//! chunk's `[chunk, chunk]` matrices is formed, so memory grows with `T`, not `T²`.
//!
//! Packing: a segment id per position restarts the state wherever it changes. In the chunked form
//! the decays `D` are zero across segments, the carried-in state reaches only the rows that
//! continue the previous chunk's last segment, and only the chunk's last segment feeds the
//! carried-out state. The backward applies the same masks.

mod backward;
mod chunk;
mod inverse;
mod recurrent;

use std::sync::Arc;

use burn::tensor::{backend::Backend, DType, Tensor};

pub use backward::{backward, DeltaNetGrads};
pub use inverse::{forward_substitution, unit_lower_inverse};
pub use recurrent::recurrent;

use chunk::{Dims, Inputs, Intra, Masks};

/// What one gated-delta-rule call computes.
#[derive(Debug, Clone)]
pub struct DeltaNetSpec {
    /// Per batch row, a segment id per position (packing several documents in one row, or left
    /// padding): the recurrent state restarts from zero wherever the id changes from t-1 to t.
    pub segments: Option<Arc<Vec<Vec<u32>>>>,
    /// Chunk length of the chunked form (64, as transformers).
    pub chunk: usize,
}

impl Default for DeltaNetSpec {
    fn default() -> Self {
        Self { segments: None, chunk: 64 }
    }
}

impl DeltaNetSpec {
    /// Per batch row, the index of each position's segment (0, 1, 2, ... counting the changes of
    /// id), for `len` positions; positions past a row's ids continue its last segment. `None`
    /// without segments.
    fn segment_index(&self, rows: usize, len: usize) -> Option<Vec<Vec<u32>>> {
        let seg = self.segments.as_ref()?;
        Some(
            (0..rows)
                .map(|r| {
                    let ids = seg.get(r).map(Vec::as_slice).unwrap_or(&[]);
                    let mut index = 0u32;
                    (0..len)
                        .map(|t| {
                            if t > 0 && t < ids.len() && ids[t] != ids[t - 1] {
                                index += 1;
                            }
                            index
                        })
                        .collect()
                })
                .collect(),
        )
    }
}

/// The chunked forward from `initial_state` `[b, h, dk, dv]` (zero when `None`): `q`, `k`
/// `[b, t, h, dk]` (L2-normalised, `q` scaled by `dk^-0.5`, heads already repeated to `v`'s),
/// `v` `[b, t, h, dv]`, the log decay `g` `[b, t, h]` (<= 0) and `beta` `[b, t, h]` in (0, 1) ->
/// the output `[b, t, h, dv]` and the state after each row's last position `[b, h, dk, dv]`, both
/// f32 (any input dtype; everything inside runs in f32). With segments the initial state
/// continues each row's first segment and the final state is its last segment's.
pub fn chunked_with_state<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    g: Tensor<B, 3>,
    beta: Tensor<B, 3>,
    initial_state: Option<Tensor<B, 4>>,
    spec: &DeltaNetSpec,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let d = Dims::of(q.dims(), v.dims(), spec);
    let device = q.device();
    let s0 = match initial_state {
        Some(s) => s.cast(DType::F32).reshape([d.bh(), d.dk, d.dv]),
        None => Tensor::zeros([d.bh(), d.dk, d.dv], (&device, DType::F32)),
    };
    if d.t == 0 {
        return (Tensor::zeros([d.b, 0, d.h, d.dv], (&device, DType::F32)), s0.reshape([d.b, d.h, d.dk, d.dv]));
    }
    let x = Inputs::new(q, k, v, g, beta, &d);
    let masks = Masks::new(spec, &d, &device);
    let intra = Intra::new(&x, &masks);
    let (states, last) = intra.scan(&x.k, s0);
    let out = intra.output(&x.q, &states);
    (chunk::merge(out, &d), last.reshape([d.b, d.h, d.dk, d.dv]))
}

/// The chunked forward from a zero state: the output `[b, t, h, dv]` (f32) only. What
/// [`crate::ops::TemperBackend::temper_gated_delta_rule`] computes on a base backend.
pub fn forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    g: Tensor<B, 3>,
    beta: Tensor<B, 3>,
    spec: &DeltaNetSpec,
) -> Tensor<B, 4> {
    chunked_with_state(q, k, v, g, beta, None, spec).0
}
