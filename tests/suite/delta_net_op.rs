//! The gated delta rule (Gated DeltaNet): the chunked form and its hand-written backward against
//! the plain recurrence (forward, and gradients by Burn's autodiff through it), packing against
//! each document run alone, prefill with a carried state, and the exact block inverse of the
//! chunk's unit lower-triangular system against forward substitution.

use std::sync::Arc;

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use temper::ops::delta_net::{self, DeltaNetSpec};
use temper::ops::{self as tops};

use crate::common::{max_abs_diff, Cpu, CpuAutodiff};

/// Chunked against recurrent (f32, same inputs): outputs and final states.
const FWD_TOL: f32 = 1e-5;
/// Gradients: max |got - want| <= GRAD_TOL * max(1, max |want|) per tensor.
const GRAD_TOL: f32 = 1e-5;

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 tensor")
}

/// A small deterministic generator (xorshift64*), so that inputs are the same on every backend.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }

    fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

fn tensor<B: Backend, const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
    let device = B::Device::default();
    Tensor::from_data(TensorData::new(data, shape), (&device, DType::F32))
}

/// The op's inputs, as the model layer hands them over.
#[derive(Clone)]
struct Inputs<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    g: Tensor<B, 3>,
    beta: Tensor<B, 3>,
}

fn l2norm<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let norm = (x.clone().powi_scalar(2).sum_dim(3).add_scalar(1e-6)).sqrt();
    x / norm
}

/// Random inputs like Qwen 3.5's: L2-normalised q (scaled by dk^-0.5) and k, beta = sigmoid,
/// and g = -exp(A_log) softplus(a + dt_bias) with exp(A_log) spread over [0.01, 16] by head.
fn inputs(b: usize, t: usize, h: usize, dk: usize, dv: usize, seed: u64) -> Inputs<Cpu> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let q = l2norm(tensor::<Cpu, 4>(rng.normals(b * t * h * dk), [b, t, h, dk])).mul_scalar(1.0 / (dk as f64).sqrt());
    let k = l2norm(tensor::<Cpu, 4>(rng.normals(b * t * h * dk), [b, t, h, dk]));
    let v = tensor(rng.normals(b * t * h * dv), [b, t, h, dv]);
    let rate: Vec<f32> = (0..h).map(|i| 0.01 * 1600f32.powf(i as f32 / (h.max(2) - 1) as f32)).collect();
    let g = (0..b * t * h).map(|i| -rate[i % h] * (rng.normal() - 1.0).exp().ln_1p()).collect();
    let beta = (0..b * t * h).map(|_| 1.0 / (1.0 + (-rng.normal()).exp())).collect();
    Inputs { q, k, v, g: tensor(g, [b, t, h]), beta: tensor(beta, [b, t, h]) }
}

fn narrow_rows<B: Backend>(x: &Inputs<B>, row: usize, start: usize, len: usize) -> Inputs<B> {
    let n4 = |t: &Tensor<B, 4>| t.clone().narrow(0, row, 1).narrow(1, start, len);
    let n3 = |t: &Tensor<B, 3>| t.clone().narrow(0, row, 1).narrow(1, start, len);
    Inputs { q: n4(&x.q), k: n4(&x.k), v: n4(&x.v), g: n3(&x.g), beta: n3(&x.beta) }
}

fn chunked(x: &Inputs<Cpu>, s0: Option<Tensor<Cpu, 4>>, spec: &DeltaNetSpec) -> (Tensor<Cpu, 4>, Tensor<Cpu, 4>) {
    delta_net::chunked_with_state(x.q.clone(), x.k.clone(), x.v.clone(), x.g.clone(), x.beta.clone(), s0, spec)
}

fn recurrent(x: &Inputs<Cpu>, s0: Option<Tensor<Cpu, 4>>, spec: &DeltaNetSpec) -> (Tensor<Cpu, 4>, Tensor<Cpu, 4>) {
    delta_net::recurrent(x.q.clone(), x.k.clone(), x.v.clone(), x.g.clone(), x.beta.clone(), s0, spec)
}

fn spec(chunk: usize, segments: Option<Vec<Vec<u32>>>) -> DeltaNetSpec {
    DeltaNetSpec { segments: segments.map(Arc::new), chunk }
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    let diff = max_abs_diff(got, want);
    assert!(diff <= tol, "{what}: differs by {diff:e} (tolerance {tol:e})");
    assert!(got.iter().all(|x| x.is_finite()), "{what}: not finite");
    diff
}

/// Output and the five input gradients for the upstream gradient `up`, through the op's
/// autodiff node (`op = true`) or Burn's autodiff through the recurrence.
fn grads(x: &Inputs<Cpu>, up: &Tensor<Cpu, 4>, spec: &DeltaNetSpec, op: bool) -> Vec<Vec<f32>> {
    let a4 = |t: &Tensor<Cpu, 4>| Tensor::<CpuAutodiff, 4>::from_inner(t.clone()).require_grad();
    let a3 = |t: &Tensor<Cpu, 3>| Tensor::<CpuAutodiff, 3>::from_inner(t.clone()).require_grad();
    let (q, k, v, g, beta) = (a4(&x.q), a4(&x.k), a4(&x.v), a3(&x.g), a3(&x.beta));
    let out = if op {
        tops::gated_delta_rule(q.clone(), k.clone(), v.clone(), g.clone(), beta.clone(), spec)
    } else {
        delta_net::recurrent(q.clone(), k.clone(), v.clone(), g.clone(), beta.clone(), None, spec).0
    };
    let gr = (out.clone() * Tensor::from_inner(up.clone())).sum().backward();
    let d4 = |t: &Tensor<CpuAutodiff, 4>| values(t.grad(&gr).expect("gradient"));
    let d3 = |t: &Tensor<CpuAutodiff, 3>| values(t.grad(&gr).expect("gradient"));
    vec![values(out.inner()), d4(&q), d4(&k), d4(&v), d3(&g), d3(&beta)]
}

const NAMES: [&str; 6] = ["output", "dq", "dk", "dv", "dg", "dbeta"];

/// Compares [`grads`] lists with the relative-ish gradient tolerance; returns the largest
/// relative difference.
fn compare_grads(label: &str, got: &[Vec<f32>], want: &[Vec<f32>], nonzero: bool) -> f32 {
    let mut worst = 0f32;
    for ((name, a), w) in NAMES.iter().zip(got).zip(want) {
        let scale = w.iter().fold(1f32, |m, x| m.max(x.abs()));
        let diff = assert_close(&format!("{label}: {name} (scale {scale})"), a, w, GRAD_TOL * scale);
        worst = worst.max(diff / scale);
        // A backward that dropped a term would still be "close" to a zero reference.
        assert!(!nonzero || w.iter().any(|x| x.abs() > 1e-4), "{label}: {name} is all zeros");
    }
    worst
}

#[test]
fn chunked_form_equals_the_recurrence_for_ragged_lengths() {
    let (b, h, dk, dv) = (2, 3, 16, 8);
    for t in [1, 5, 64, 100, 150] {
        for chunk in [64, 16] {
            let x = inputs(b, t, h, dk, dv, t as u64);
            let spec = spec(chunk, None);
            let (o, s) = chunked(&x, None, &spec);
            let (ro, rs) = recurrent(&x, None, &spec);
            assert_eq!(o.dims(), [b, t, h, dv]);
            assert_eq!(s.dims(), [b, h, dk, dv]);
            let d_o = assert_close(&format!("t {t}, chunk {chunk}: output"), &values(o), &values(ro.clone()), FWD_TOL);
            let d_s = assert_close(&format!("t {t}, chunk {chunk}: final state"), &values(s), &values(rs), FWD_TOL);
            // The trait's default method (the base backend) is the same chunked form.
            let op = tops::gated_delta_rule(x.q.clone(), x.k.clone(), x.v.clone(), x.g.clone(), x.beta.clone(), &spec);
            assert_close(&format!("t {t}, chunk {chunk}: op output"), &values(op), &values(ro), FWD_TOL);
            eprintln!("t {t}, chunk {chunk}: max |chunked - recurrent| output {d_o:e}, state {d_s:e}");
        }
    }
}

/// Row 0 has boundaries inside chunks and exactly at chunk edges (64, 128); row 1 starts a new
/// segment at position 1 and reuses an id after another one (a change, not a return).
fn packed_segments(t: usize) -> Vec<Vec<u32>> {
    let cuts0 = [30, 64, 128, 140];
    let row0 = (0..t).map(|i| cuts0.iter().filter(|&&c| i >= c).count() as u32).collect();
    let row1 = (0..t)
        .map(|i| {
            if i < 1 {
                7
            } else if i < 63 {
                3
            } else if i < 100 {
                7
            } else {
                3
            }
        })
        .collect();
    vec![row0, row1]
}

/// `[start, end)` of each document of a row of segment ids.
fn documents(ids: &[u32]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=ids.len() {
        if i == ids.len() || ids[i] != ids[i - 1] {
            out.push((start, i));
            start = i;
        }
    }
    out
}

#[test]
fn packed_documents_equal_each_document_run_alone() {
    let (b, t, h, dk, dv) = (2, 150, 3, 16, 8);
    let x = inputs(b, t, h, dk, dv, 7);
    let up = tensor::<Cpu, 4>(Rng(99).normals(b * t * h * dv), [b, t, h, dv]);
    let segs = packed_segments(t);
    let packed = spec(64, Some(segs.clone()));
    let (o, s) = chunked(&x, None, &packed);
    let whole = grads(&x, &up, &packed, true);
    let mut worst = [0f32; 3];
    for (row, ids) in segs.iter().enumerate() {
        let docs = documents(ids);
        for &(start, end) in &docs {
            let len = end - start;
            let label = format!("row {row}, document {start}..{end}");
            let alone = narrow_rows(&x, row, start, len);
            let part = |y: &Tensor<Cpu, 4>| y.clone().narrow(0, row, 1).narrow(1, start, len);
            let (ao, a_s) = chunked(&alone, None, &spec(64, None));
            worst[0] = worst[0].max(assert_close(&format!("{label}: output"), &values(part(&o)), &values(ao), FWD_TOL));
            if end == t {
                let last = s.clone().narrow(0, row, 1);
                worst[1] =
                    worst[1].max(assert_close(&format!("{label}: final state"), &values(last), &values(a_s), FWD_TOL));
            }
            // The packed gradients at this document's positions are the document's own.
            let doc_grads = grads(&alone, &part(&up), &spec(64, None), true);
            let picked: Vec<Vec<f32>> = whole
                .iter()
                .map(|all| {
                    // Per position features: dv or dk for the 4-D tensors, 1 for g and beta.
                    let e = all.len() / (b * t * h);
                    all[(row * t + start) * h * e..(row * t + end) * h * e].to_vec()
                })
                .collect();
            // A one-position document has dg = 0 exactly (its state starts at zero).
            worst[2] = worst[2].max(compare_grads(&label, &picked, &doc_grads, len > 1));
        }
        assert!(docs.len() >= 4, "row {row}: {} documents", docs.len());
    }
    // And the packed gradients equal autodiff through the segmented recurrence.
    compare_grads("packed vs recurrent", &whole, &grads(&x, &up, &packed, false), true);
    eprintln!(
        "packed vs alone: output {:e}, final state {:e}, gradients (relative) {:e}",
        worst[0], worst[1], worst[2]
    );
}

#[test]
fn prefill_with_a_state_equals_the_recurrence_and_splits_anywhere() {
    let (b, t, h, dk, dv) = (2, 150, 3, 16, 8);
    let x = inputs(b, t, h, dk, dv, 11);
    let s0 = tensor::<Cpu, 4>(Rng(5).normals(b * h * dk * dv), [b, h, dk, dv]).mul_scalar(0.3);
    for segments in [None, Some(packed_segments(t))] {
        let label = if segments.is_some() { "segments" } else { "no segments" };
        let spec = spec(64, segments);
        let (o, s) = chunked(&x, Some(s0.clone()), &spec);
        let (ro, rs) = recurrent(&x, Some(s0.clone()), &spec);
        let d_o = assert_close(&format!("{label}: output from a state"), &values(o.clone()), &values(ro), FWD_TOL);
        let d_s = assert_close(&format!("{label}: final state from a state"), &values(s.clone()), &values(rs), FWD_TOL);
        // Prefill 70 positions (not a chunk multiple, inside a segment of both rows), continue.
        let cut = 70;
        let first = narrow_all(&x, 0, cut);
        let second = narrow_all(&x, cut, t - cut);
        let split_spec = |a: usize, len: usize| DeltaNetSpec {
            segments: spec.segments.as_ref().map(|s| Arc::new(s.iter().map(|r| r[a..a + len].to_vec()).collect())),
            chunk: 64,
        };
        let (o1, s1) = chunked(&first, Some(s0.clone()), &split_spec(0, cut));
        let (o2, s2) = chunked(&second, Some(s1), &split_spec(cut, t - cut));
        let d_split =
            assert_close(&format!("{label}: split output"), &values(Tensor::cat(vec![o1, o2], 1)), &values(o), FWD_TOL);
        assert_close(&format!("{label}: split final state"), &values(s2), &values(s), FWD_TOL);
        eprintln!("{label}: from a state, output {d_o:e}, state {d_s:e}; split {d_split:e}");
    }
}

fn narrow_all<B: Backend>(x: &Inputs<B>, start: usize, len: usize) -> Inputs<B> {
    Inputs {
        q: x.q.clone().narrow(1, start, len),
        k: x.k.clone().narrow(1, start, len),
        v: x.v.clone().narrow(1, start, len),
        g: x.g.clone().narrow(1, start, len),
        beta: x.beta.clone().narrow(1, start, len),
    }
}

#[test]
fn hand_written_backward_equals_autodiff_through_the_recurrence() {
    let (b, h, dk, dv) = (2, 3, 16, 8);
    for t in [100, 150] {
        for segments in [None, Some(packed_segments(t))] {
            let label = format!("t {t}, segments {}", segments.is_some());
            let x = inputs(b, t, h, dk, dv, 100 + t as u64);
            let up = tensor::<Cpu, 4>(Rng(t as u64).normals(b * t * h * dv), [b, t, h, dv]);
            let spec = spec(64, segments);
            let worst = compare_grads(&label, &grads(&x, &up, &spec, true), &grads(&x, &up, &spec, false), true);
            eprintln!("{label}: largest relative gradient difference {worst:e}");
        }
    }
}

/// The autodiff backend really records the op's node: its gradients are bit for bit those of the
/// hand-written backward called directly (autodiff through the forward's tensor ops would round
/// differently), and they match the recurrence on a long case (5 chunks, a ragged last one).
#[test]
fn autodiff_records_the_hand_written_backward() {
    let (b, t, h, dk, dv) = (1, 300, 2, 16, 8);
    let x = inputs(b, t, h, dk, dv, 3);
    let up = tensor::<Cpu, 4>(Rng(17).normals(b * t * h * dv), [b, t, h, dv]);
    let spec = spec(64, None);
    let via_node = grads(&x, &up, &spec, true);
    let direct =
        delta_net::backward(x.q.clone(), x.k.clone(), x.v.clone(), x.g.clone(), x.beta.clone(), up.clone(), &spec);
    let direct = [values(direct.q), values(direct.k), values(direct.v), values(direct.g), values(direct.beta)];
    for (name, (a, w)) in NAMES[1..].iter().zip(via_node[1..].iter().zip(&direct)) {
        assert_eq!(max_abs_diff(a, w), 0.0, "{name}: the autodiff node's gradient is not the hand-written backward's");
    }
    let worst = compare_grads("t 300", &via_node, &grads(&x, &up, &spec, false), true);
    eprintln!("t 300: largest relative gradient difference {worst:e}");
}

/// bf16 inputs: computed in f32 (the output equals the f32 run on the rounded inputs), the
/// gradients come back in bf16.
#[test]
fn half_precision_inputs_compute_in_f32() {
    let (b, t, h, dk, dv) = (1, 70, 2, 16, 8);
    let x = inputs(b, t, h, dk, dv, 23);
    let half = Inputs {
        q: x.q.clone().cast(DType::BF16),
        k: x.k.clone().cast(DType::BF16),
        v: x.v.clone().cast(DType::BF16),
        g: x.g.clone().cast(DType::BF16),
        beta: x.beta.clone().cast(DType::BF16),
    };
    let rounded = Inputs {
        q: half.q.clone().cast(DType::F32),
        k: half.k.clone().cast(DType::F32),
        v: half.v.clone().cast(DType::F32),
        g: half.g.clone().cast(DType::F32),
        beta: half.beta.clone().cast(DType::F32),
    };
    let spec = spec(64, None);
    let o = tops::gated_delta_rule(
        half.q.clone(),
        half.k.clone(),
        half.v.clone(),
        half.g.clone(),
        half.beta.clone(),
        &spec,
    );
    assert_eq!(o.dtype(), DType::F32);
    assert_close("bf16 inputs", &values(o), &values(chunked(&rounded, None, &spec).0), 0.0);
    let up = Tensor::<Cpu, 4>::ones([b, t, h, dv], &Default::default());
    let d = delta_net::backward(half.q, half.k, half.v, half.g, half.beta, up, &spec);
    for dt in [d.q.dtype(), d.k.dtype(), d.v.dtype(), d.g.dtype(), d.beta.dtype()] {
        assert_eq!(dt, DType::BF16);
    }
}

/// `(I + A)⁻¹` by recursive blocks against f64 forward substitution, on the chunk systems of
/// random keys and on an adversarial one: beta ≈ 1, nearly equal keys, no decay (A close to a
/// strictly lower matrix of ones, where the nilpotent product's partial sums blow up in f32).
#[test]
fn block_inverse_equals_forward_substitution() {
    let c = 64;
    let mut rng = Rng(42);
    let system = |keys: Vec<f32>, beta: f32, m: usize| {
        let k = l2norm(tensor::<Cpu, 4>(keys, [1, m, c, 16])).reshape([m, c, 16]);
        k.clone().matmul(k.swap_dims(1, 2)).mul_scalar(beta).tril(-1)
    };
    let random = system(rng.normals(4 * c * 16), 0.7, 4);
    let base = rng.normals(16);
    let close: Vec<f32> = (0..2 * c * 16).map(|i| base[i % 16] + 1e-3 * rng.normal()).collect();
    let adversarial = system(close, 0.999, 2);
    for (label, a, m, hard) in
        [("random keys", random, 4, false), ("beta 0.999, nearly equal keys, no decay", adversarial, 2, true)]
    {
        let want = values(delta_net::forward_substitution(a.clone()));
        let got = delta_net::unit_lower_inverse(a.clone());
        let scale = want.iter().fold(1f32, |s, x| s.max(x.abs()));
        let diff = assert_close(label, &values(got.clone()), &want, 1e-5 * scale);
        // And it is an inverse: (I + A) M = I.
        let eye = Tensor::<Cpu, 2>::from_data(
            TensorData::new((0..c * c).map(|i| f32::from(u8::from(i / c == i % c))).collect::<Vec<_>>(), [c, c]),
            &Default::default(),
        );
        let eye = eye.reshape([1, c, c]).repeat_dim(0, m);
        let residual = values((eye.clone() + a.clone()).matmul(got) - eye.clone());
        let res = residual.iter().fold(0f32, |s, x| s.max(x.abs()));
        assert!(res <= 1e-4, "{label}: (I + A) M - I reaches {res:e}");
        // The nilpotent product (I - A)(I + A²)(I + A⁴)...(I + A³²), for comparison.
        let (mut prod, mut power) = (eye.clone() - a.clone(), a.clone().matmul(a));
        for _ in 0..5 {
            prod = prod.matmul(eye.clone() + power.clone());
            power = power.clone().matmul(power);
        }
        let nilpotent = max_abs_diff(&values(prod), &want);
        // The adversarial case is one: the product is far off there (5e10 measured).
        assert!(
            !hard || nilpotent > 1.0,
            "{label}: the nilpotent product is accurate ({nilpotent:e}), the case is not adversarial"
        );
        eprintln!("{label}: max |block - substitution| {diff:e} (entries up to {scale}), residual {res:e}; nilpotent product {nilpotent:e}");
    }
}

/// The same op on the ndarray backend (base method and autodiff node), against Flex.
#[test]
fn ndarray_backend_gives_the_same_output_and_gradients() {
    check_op_on::<burn::backend::Autodiff<burn::backend::NdArray<f32>>>("ndarray", &Default::default());
}

/// The op on backend `A` (base method and autodiff node), against Flex: packed segments and
/// decays down to -16 per step (chunk-local cumulative sums near -200, where an outer
/// difference computed the wrong way round overflows). The wgpu group runs it on lavapipe.
pub fn check_op_on<A>(label: &str, device: &A::Device)
where
    A: burn::tensor::backend::AutodiffBackend + tops::TemperBackend,
    A::InnerBackend: tops::TemperBackend,
{
    fn to<A: Backend, const D: usize>(t: &Tensor<Cpu, D>, device: &A::Device) -> Tensor<A, D> {
        Tensor::from_data(t.to_data(), device)
    }
    let (b, t, h, dk, dv) = (2, 100, 3, 16, 8);
    let x = inputs(b, t, h, dk, dv, 31);
    let up = tensor::<Cpu, 4>(Rng(8).normals(b * t * h * dv), [b, t, h, dv]);
    for (what, spec) in [("unpacked", spec(64, None)), ("packed", spec(64, Some(packed_segments(t))))] {
        let label = format!("{label} {what}");
        let want = grads(&x, &up, &spec, true);
        let req4 = |t: &Tensor<Cpu, 4>| to::<A, 4>(t, device).require_grad();
        let req3 = |t: &Tensor<Cpu, 3>| to::<A, 3>(t, device).require_grad();
        let (q, k, v, g, beta) = (req4(&x.q), req4(&x.k), req4(&x.v), req3(&x.g), req3(&x.beta));
        let base = tops::gated_delta_rule(
            q.clone().inner(),
            k.clone().inner(),
            v.clone().inner(),
            g.clone().inner(),
            beta.clone().inner(),
            &spec,
        );
        assert_close(&format!("{label} base output"), &values(base), &want[0], FWD_TOL);
        let out = tops::gated_delta_rule(q.clone(), k.clone(), v.clone(), g.clone(), beta.clone(), &spec);
        let gr = (out.clone() * to::<A, 4>(&up, device)).sum().backward();
        let d4 = |t: &Tensor<A, 4>| values(t.grad(&gr).expect("gradient"));
        let d3 = |t: &Tensor<A, 3>| values(t.grad(&gr).expect("gradient"));
        let got = vec![values(out.inner()), d4(&q), d4(&k), d4(&v), d3(&g), d3(&beta)];
        compare_grads(&format!("{label} vs flex"), &got, &want, true);
    }
}

/// Against transformers 5.25's own `torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule`
/// (tests/fixtures/qwen35/ops): with the L2 norm, the dk^-1/2 scale and the key-head repeat done
/// as the model does them, the op's output and final state equal both, and its gradients of
/// `sum(out * R)` equal torch autograd's through the chunked function.
#[test]
fn gated_delta_rule_matches_transformers_torch_functions() {
    use burn::tensor::Int;
    let r = crate::common::Reference::open(&crate::common::fixtures().join("qwen35/ops/gated_delta_rule.safetensors"));
    let device = Default::default();
    let tensor4 = |name: &str| -> Tensor<CpuAutodiff, 4> {
        let (v, s) = r.f32(name);
        Tensor::<CpuAutodiff, 4>::from_data(TensorData::new(v, [s[0], s[1], s[2], s[3]]), &device).require_grad()
    };
    let tensor3 = |name: &str| -> Tensor<CpuAutodiff, 3> {
        let (v, s) = r.f32(name);
        Tensor::<CpuAutodiff, 3>::from_data(TensorData::new(v, [s[0], s[1], s[2]]), &device).require_grad()
    };
    let (q, k, v, g, beta) = (tensor4("q"), tensor4("k"), tensor4("v"), tensor3("g"), tensor3("beta"));
    let [b, t, hk, dk] = q.dims();
    let hv = v.dims()[2];
    let prep = |x: Tensor<CpuAutodiff, 4>, scale: f64| {
        let n = x.clone() * x.powi_scalar(2).sum_dim(3).add_scalar(1e-6).sqrt().recip();
        let n = n.mul_scalar(scale);
        // v-head j uses k-head j / r.
        let idx = Tensor::<CpuAutodiff, 1, Int>::from_data(
            TensorData::new((0..hv).map(|j| (j / (hv / hk)) as i64).collect::<Vec<_>>(), [hv]),
            &device,
        );
        n.select(2, idx)
    };
    let qn = prep(q.clone(), 1.0 / (dk as f64).sqrt());
    let kn = prep(k.clone(), 1.0);
    let spec = DeltaNetSpec::default();
    let out = tops::gated_delta_rule(qn.clone(), kn.clone(), v.clone(), g.clone(), beta.clone(), &spec);
    let got = values(out.clone());
    for key in ["out_chunk", "out_recurrent"] {
        let d = max_abs_diff(&got, &r.f32(key).0);
        assert!(d <= FWD_TOL, "output vs transformers' {key}: {d:e}");
    }
    let (_, state) = delta_net::chunked_with_state(
        qn.inner(),
        kn.inner(),
        v.clone().inner(),
        g.clone().inner(),
        beta.clone().inner(),
        None,
        &spec,
    );
    let d = max_abs_diff(&values(state), &r.f32("final_state_chunk").0);
    assert!(d <= FWD_TOL, "final state vs transformers': {d:e}");
    let (rv, rs) = r.f32("R");
    let weight = Tensor::<CpuAutodiff, 4>::from_data(TensorData::new(rv, [rs[0], rs[1], rs[2], rs[3]]), &device);
    let grads = (out * weight).sum().backward();
    let check = |name: &str, got: Vec<f32>| {
        let want = r.f32(&format!("grad_chunk.{name}")).0;
        let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
        let d = max_abs_diff(&got, &want);
        assert!(d <= GRAD_TOL * scale, "grad {name} vs torch autograd: {d:e} (scale {scale})");
    };
    check("q", values(q.grad(&grads).unwrap()));
    check("k", values(k.grad(&grads).unwrap()));
    check("v", values(v.grad(&grads).unwrap()));
    check("g", values(g.grad(&grads).unwrap()));
    check("beta", values(beta.grad(&grads).unwrap()));
    let _ = (b, t);
}
