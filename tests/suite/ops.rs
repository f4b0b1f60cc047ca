//! The custom operations against their plain formulas: blockwise attention (forward and its
//! hand-written backward) and chunked cross-entropy, with block sizes that leave ragged last
//! blocks, on the shapes and masks the model families use.

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use temper::ops::attention::{self, AttentionSpec};
use temper::ops::cross_entropy::{self, CrossEntropySpec};
use temper::ops::loss::IGNORE_INDEX;
use temper::ops::{self as tops, TemperBackend};

use crate::common::{max_abs_diff, Cpu, CpuAutodiff};

const ATTN_TOL: f32 = 1e-5;
const CE_TOL: f32 = 1e-6;

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 tensor")
}

fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<Cpu, D> {
    <Cpu as Backend>::seed(&Default::default(), seed);
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

struct Case {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    /// The value head dim (the query/key one is 6).
    v_dim: usize,
    spec: AttentionSpec,
}

fn cases(t: usize) -> Vec<Case> {
    let scale = 1.0 / (6.0f64).sqrt();
    let mut out = Vec::new();
    for block in [None, Some(1), Some(4), Some(5)] {
        let base = AttentionSpec { block_rows: block, ..AttentionSpec::causal(scale) };
        out.push(Case { name: "causal, 4 heads, 2 kv heads", heads: 4, kv_heads: 2, v_dim: 6, spec: base.clone() });
        out.push(Case { name: "causal, 3 heads, 1 kv head", heads: 3, kv_heads: 1, v_dim: 6, spec: base.clone() });
        out.push(Case {
            name: "window 3",
            heads: 4,
            kv_heads: 4,
            v_dim: 6,
            spec: AttentionSpec { window: Some(3), ..base.clone() },
        });
        out.push(Case {
            name: "soft-capped 2.0",
            heads: 2,
            kv_heads: 1,
            v_dim: 6,
            spec: AttentionSpec { softcap: Some(2.0), ..base.clone() },
        });
        let segs =
            vec![(0..t).map(|i| (i / 4) as u32).collect::<Vec<_>>(), (0..t).map(|i| u32::from(i >= 7)).collect()];
        out.push(Case {
            name: "packed segments and window 5",
            heads: 4,
            kv_heads: 2,
            v_dim: 6,
            spec: AttentionSpec { segments: Some(Arc::new(segs.clone())), window: Some(5), ..base.clone() },
        });
        // Multi-head latent attention: values 9 wide, queries and keys 6, packed rows.
        out.push(Case {
            name: "value head dim 9, packed segments",
            heads: 4,
            kv_heads: 4,
            v_dim: 9,
            spec: AttentionSpec { segments: Some(Arc::new(segs.clone())), ..base.clone() },
        });
        // Llama 4: chunks of 4 positions (the queries of a block straddle chunk boundaries).
        out.push(Case {
            name: "chunks of 4",
            heads: 4,
            kv_heads: 2,
            v_dim: 6,
            spec: AttentionSpec { chunk: Some(4), ..base.clone() },
        });
        out.push(Case {
            name: "chunks of 3 within packed segments",
            heads: 4,
            kv_heads: 2,
            v_dim: 6,
            spec: AttentionSpec { chunk: Some(3), segments: Some(Arc::new(segs)), ..base.clone() },
        });
        // gpt-oss: a per-head sink logit in every row's denominator, with a sliding window.
        out.push(Case {
            name: "attention sinks and window 4",
            heads: 4,
            kv_heads: 2,
            v_dim: 6,
            spec: AttentionSpec { sinks: Some(Arc::new(vec![0.5, -1.0, 2.0, 0.0])), window: Some(4), ..base.clone() },
        });
    }
    out
}

#[test]
fn blockwise_attention_forward_and_gradients_equal_the_plain_formula() {
    let (b, t, hd) = (2, 11, 6);
    for (i, case) in cases(t).into_iter().enumerate() {
        let seed = 10 * i as u64;
        let q = random([b, case.heads, t, hd], seed);
        let k = random([b, case.kv_heads, t, hd], seed + 1);
        let v = random([b, case.kv_heads, t, case.v_dim], seed + 2);
        let up = random([b, case.heads, t, case.v_dim], seed + 3);
        let run = |blockwise: bool| {
            let qa = Tensor::<CpuAutodiff, 4>::from_inner(q.clone()).require_grad();
            let ka = Tensor::<CpuAutodiff, 4>::from_inner(k.clone()).require_grad();
            let va = Tensor::<CpuAutodiff, 4>::from_inner(v.clone()).require_grad();
            let out = if blockwise {
                tops::attention(qa.clone(), ka.clone(), va.clone(), &case.spec)
            } else {
                attention::reference(qa.clone(), ka.clone(), va.clone(), &case.spec)
            };
            let grads = (out.clone() * Tensor::from_inner(up.clone())).sum().backward();
            let g = |x: &Tensor<CpuAutodiff, 4>| values(x.grad(&grads).expect("gradient"));
            (values(out.inner()), g(&qa), g(&ka), g(&va))
        };
        let (got, want) = (run(true), run(false));
        let label = format!("{} (block rows {:?})", case.name, case.spec.block_rows);
        for (what, a, w) in
            [("output", &got.0, &want.0), ("dq", &got.1, &want.1), ("dk", &got.2, &want.2), ("dv", &got.3, &want.3)]
        {
            let diff = max_abs_diff(a, w);
            assert!(diff <= ATTN_TOL, "{label}: {what} differs by {diff:e}");
        }
        // The gradient is not trivially zero (a backward that dropped a term would still be
        // "close" to a zero reference).
        assert!(got.2.iter().any(|x| x.abs() > 1e-3), "{label}: dk is all zeros");
    }
}

#[test]
fn blockwise_attention_with_a_kv_cache_equals_the_plain_formula() {
    // Generation: 3 new queries over 8 cached + 3 new keys, blocks of 2 rows.
    let (b, h, kv, past, t, hd) = (1, 4, 2, 8, 3, 6);
    let q = random([b, h, t, hd], 1);
    let k = random([b, kv, past + t, hd], 2);
    let v = random([b, kv, past + t, hd], 3);
    for (window, chunk) in [(None, None), (Some(4), None), (None, Some(3)), (None, Some(5))] {
        let spec = AttentionSpec { past_len: past, window, chunk, block_rows: Some(2), ..AttentionSpec::causal(0.4) };
        let got = values(tops::attention(q.clone(), k.clone(), v.clone(), &spec));
        let want = values(attention::reference(q.clone(), k.clone(), v.clone(), &spec));
        let diff = max_abs_diff(&got, &want);
        assert!(diff <= ATTN_TOL, "window {window:?}, chunk {chunk:?}: cached attention differs by {diff:e}");
    }
}

#[test]
fn chunked_cross_entropy_loss_and_gradients_equal_full_log_softmax() {
    let (n, h, vocab) = (13, 8, 37);
    let hidden = random([n, h], 5);
    let weight = random([vocab, h], 6);
    let targets: Vec<i64> = (0..n).map(|i| if i % 4 == 3 { IGNORE_INDEX } else { (i * 7 % vocab) as i64 }).collect();
    for softcap in [None, Some(3.0)] {
        for chunk in [None, Some(1), Some(5)] {
            let spec = CrossEntropySpec { chunk_rows: chunk, ..CrossEntropySpec::new(targets.clone(), softcap) };
            let run = |chunked: bool| {
                let ha = Tensor::<CpuAutodiff, 2>::from_inner(hidden.clone()).require_grad();
                let wa = Tensor::<CpuAutodiff, 2>::from_inner(weight.clone()).require_grad();
                let loss = if chunked {
                    tops::cross_entropy_sum(ha.clone(), wa.clone(), &spec)
                } else {
                    cross_entropy::reference(ha.clone(), wa.clone(), &spec)
                };
                let grads = loss.clone().mul_scalar(0.5).backward();
                (values(loss.inner()), values(ha.grad(&grads).expect("dh")), values(wa.grad(&grads).expect("dw")))
            };
            let (got, want) = (run(true), run(false));
            let rel = (got.0[0] - want.0[0]).abs() / want.0[0].abs();
            assert!(rel <= CE_TOL, "softcap {softcap:?}, chunk {chunk:?}: loss {} vs {}", got.0[0], want.0[0]);
            for (what, a, w) in [("d hidden", &got.1, &want.1), ("d weight", &got.2, &want.2)] {
                let diff = max_abs_diff(a, w);
                assert!(diff <= CE_TOL, "softcap {softcap:?}, chunk {chunk:?}: {what} differs by {diff:e}");
            }
        }
    }
}

/// Without autodiff the operations take the base backend's default method (no graph).
#[test]
fn custom_operations_run_on_the_base_backend() {
    fn check<B: TemperBackend>(device: &B::Device) {
        let q = Tensor::<B, 4>::ones([1, 2, 3, 4], device);
        let out = tops::attention(q.clone(), q.clone(), q, &AttentionSpec::causal(0.5));
        assert_eq!(out.dims(), [1, 2, 3, 4]);
        let loss = tops::cross_entropy_sum(
            Tensor::<B, 2>::zeros([2, 4], device),
            Tensor::<B, 2>::zeros([5, 4], device),
            &CrossEntropySpec::new(vec![1, 2], None),
        );
        let value = values(loss)[0];
        // Uniform logits over 5 tokens, 2 rows: 2 ln 5.
        assert!((value - 2.0 * 5f32.ln()).abs() < 1e-5, "{value}");
    }
    check::<Cpu>(&Default::default());
    check::<burn::backend::NdArray<f32>>(&Default::default());
}

/// The softmax normaliser over a Qwen-size vocabulary sums 151,936 terms. burn-flex without its
/// `simd` feature sums a row with one sequential f32 accumulator (`iter().sum()` in
/// `reduce_last_dim_f32`), which is 1e-5 to 4e-5 off in the log here; its SIMD kernel (8
/// vector accumulators) and a correct f32 path stay near the f32 resolution of a ~12 loss
/// (1e-6). Both loss paths are checked against f64 on the host.
#[test]
fn loss_over_a_large_vocabulary_keeps_f32_precision() {
    const TOL: f64 = 4e-6;
    let (rows, h, vocab) = (4, 16, 151_936);
    let hidden = random([rows, h], 21);
    let weight = random([vocab, h], 22).mul_scalar(0.5);
    let (hv, wv) = (values(hidden.clone()), values(weight.clone()));
    for r in 0..rows {
        let target = (r * 37_813 % vocab) as i64;
        let z: Vec<f64> =
            (0..vocab).map(|v| (0..h).map(|j| hv[r * h + j] as f64 * wv[v * h + j] as f64).sum()).collect();
        let max = z.iter().copied().fold(f64::MIN, f64::max);
        let want = max + z.iter().map(|x| (x - max).exp()).sum::<f64>().ln() - z[target as usize];
        let row = hidden.clone().slice([r..r + 1, 0..h]);
        let chunked =
            values(tops::cross_entropy_sum(row.clone(), weight.clone(), &CrossEntropySpec::new(vec![target], None)))[0]
                as f64;
        let logits = row.matmul(weight.clone().transpose()).reshape([1, 1, vocab]);
        let plain = values(temper::ops::loss::nll_sum(logits, &[target]))[0] as f64;
        for (what, got) in [("chunked", chunked), ("log_softmax", plain)] {
            assert!(
                (got - want).abs() <= TOL,
                "row {r}, {what}: NLL {got} vs f64 {want} (diff {:e})",
                (got - want).abs()
            );
        }
    }
}
