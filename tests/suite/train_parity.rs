//! A 10-step training run from a PEFT-initialised adapter reproduces the same run in PyTorch
//! (torch AdamW, clip_grad_norm_, linear warmup schedule, same batches): losses, gradient norms
//! and the final adapter (tests/fixtures/peft/*_train).

use temper::data::Batch;
use temper::export::Adapter;
use temper::lora::apply_adapter;
use temper::model::CausalLm;
use temper::model::{load_model, WeightPrecision};
use temper::ops::dropout::StepKey;
use temper::ops::TemperAutodiff;
use temper::train::optim::LrSchedule;
use temper::train::{optimizer_step, LossScaler, Optimizer, StepOptions, StepStats, TrainConfig};

use crate::common::{fixtures, manifest, max_abs_diff, CpuAutodiff, Reference};

const LOSS_TOL: f64 = 1e-4;

/// The manifest entry of training fixture `name` and the folder its paths are relative to:
/// `DIR/NAME` is in tests/fixtures/DIR's own manifest (the transformers 5 fixtures: `moe/`,
/// `qwen35/`).
fn train_entry(name: &str) -> (std::path::PathBuf, serde_json::Value) {
    match name.split_once('/') {
        Some((dir, n)) => {
            let root = fixtures().join(dir);
            let m: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
            (root, m["train"][n].clone())
        }
        None => (fixtures(), manifest()["train"][name].clone()),
    }
}

pub fn run(name: &str, checkpointing: bool) {
    run_on::<CpuAutodiff>(name, checkpointing, &Default::default());
}

/// The 10-step curve of fixture `name` against PyTorch, on backend `B`.
pub fn run_on<B: TemperAutodiff>(name: &str, checkpointing: bool, device: &B::Device) {
    run_with::<B>(name, checkpointing, 1e-4, device);
}

/// [`run_on`] with gradient norms compared within `norm_tol` (relative, at least 1 absolute).
pub fn run_with<B: TemperAutodiff>(name: &str, checkpointing: bool, norm_tol: f64, device: &B::Device) {
    let (root, e) = train_entry(name);
    let (mut model, curve) = curve_on::<B>(name, checkpointing, 0.0, device);
    let want = |k: &str| -> Vec<f64> { e[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    let (want_loss, want_norm, want_lr) = (want("losses"), want("grad_norms"), want("lrs"));
    assert_eq!(curve.len(), want_loss.len());
    for (s, stats) in curve.iter().enumerate() {
        assert!((stats.lr - want_lr[s]).abs() < 1e-12, "{name} step {s}: lr {} vs torch {}", stats.lr, want_lr[s]);
        assert!(
            (stats.loss - want_loss[s]).abs() <= LOSS_TOL,
            "{name} step {s}: loss {} vs torch {}",
            stats.loss,
            want_loss[s]
        );
        assert!(
            (stats.grad_norm - want_norm[s]).abs() <= norm_tol * want_norm[s].max(1.0),
            "{name} step {s}: grad norm {} vs torch {}",
            stats.grad_norm,
            want_norm[s]
        );
    }
    let ours = temper::lora::extract_adapter(&mut model, &temper::lora::LoraConfig::default(), "x").unwrap();
    let theirs = Adapter::read(&root.join(e["final_adapter"].as_str().unwrap())).unwrap();
    let initial = Adapter::read(&root.join(e["initial_adapter"].as_str().unwrap())).unwrap();
    // Final weights: within 0.5% of how far training moved them (AdamW amplifies last-bit
    // differences where the second moment is tiny; Gemma 2's soft-capped loss is ~24).
    let moved = theirs
        .modules
        .iter()
        .map(|(m, p)| {
            max_abs_diff(&p.a.data, &initial.modules[m].a.data).max(max_abs_diff(&p.b.data, &initial.modules[m].b.data))
        })
        .fold(0.0, f32::max);
    assert!(moved > 1e-2, "{name}: the reference run barely moved the weights ({moved})");
    for (module, pair) in &theirs.modules {
        let got = &ours.modules[module];
        let d = max_abs_diff(&got.a.data, &pair.a.data).max(max_abs_diff(&got.b.data, &pair.b.data));
        assert!(
            d <= 5e-3 * moved,
            "{name}: final {module} differs from torch by {d:e} (training moved weights by {moved:e})"
        );
    }
}

/// The fixture's training run (its PEFT-initialised adapter, batches, AdamW settings and
/// schedule) on backend `B`, with every adapter's dropout set to `dropout`: the trained model
/// and each step's statistics.
pub fn curve_on<B: TemperAutodiff>(
    name: &str,
    checkpointing: bool,
    dropout: f64,
    device: &B::Device,
) -> (CausalLm<B>, Vec<StepStats>) {
    let (mut model, mut opt, steps) = fixture_run::<B>(name, WeightPrecision::F32, dropout, device);
    let curve = steps
        .into_iter()
        .enumerate()
        .map(|(s, (batch, lr))| {
            optimizer_step(
                &mut model,
                &mut opt,
                &[batch],
                StepOptions {
                    lr,
                    checkpointing,
                    dropout: StepKey { seed: 5, step: s as u64, micro_batch: 0 },
                    loss_scale: 1.0,
                    aux_loss_coef: None,
                },
            )
            .unwrap()
        })
        .collect();
    (model, curve)
}

/// The fixture run's model (base in `precision`, PEFT-initialised adapter with `dropout`),
/// optimizer, and each step's batch and learning rate.
fn fixture_run<B: TemperAutodiff>(
    name: &str,
    precision: WeightPrecision,
    dropout: f64,
    device: &B::Device,
) -> (CausalLm<B>, Optimizer<B>, Vec<(Batch, f64)>) {
    let (root, e) = train_entry(name);
    let mut model = load_model::<B>(&root.join(e["base_model"].as_str().unwrap()), precision, device).unwrap().model;
    apply_adapter(&mut model, &Adapter::read(&root.join(e["initial_adapter"].as_str().unwrap())).unwrap()).unwrap();
    for (_, proj) in temper::lora::projections_mut(&mut model) {
        if let Some(lora) = proj.lora.as_mut() {
            lora.dropout = dropout;
        }
    }
    let o = &e["optimizer"];
    let cfg = TrainConfig {
        learning_rate: o["lr"].as_f64().unwrap(),
        adam_beta1: o["betas"][0].as_f64().unwrap(),
        adam_beta2: o["betas"][1].as_f64().unwrap(),
        adam_epsilon: o["eps"].as_f64().unwrap(),
        weight_decay: o["weight_decay"].as_f64().unwrap(),
        max_grad_norm: Some(1.0),
        ..TrainConfig::default()
    };
    let opt = Optimizer::new(&mut model, &cfg);
    let r = Reference::open(&root.join(e["reference"].as_str().unwrap()));
    let (ids, shape) = r.i64("input_ids");
    let (labels, _) = r.i64("labels");
    let (steps, rows, t) = (shape[0], shape[1], shape[2]);
    let batches = (0..steps)
        .map(|s| {
            let row = |v: &[i64], i: usize| v[(s * rows + i) * t..(s * rows + i + 1) * t].to_vec();
            let batch = Batch {
                input_ids: (0..rows).map(|i| row(&ids, i).into_iter().map(|x| x as u32).collect()).collect(),
                labels: (0..rows).map(|i| row(&labels, i)).collect(),
                positions: vec![(0..t).collect(); rows],
                segments: None,
            };
            (batch, cfg.learning_rate * LrSchedule::Linear.factor(s, 2, steps))
        })
        .collect();
    (model, opt, batches)
}

/// Two curves agree step for step: losses within `tol`, gradient norms within `tol` relative.
pub fn assert_same_curve(what: &str, a: &[StepStats], b: &[StepStats], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (s, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x.loss - y.loss).abs() <= tol, "{what} step {s}: loss {} vs {}", x.loss, y.loss);
        assert!(
            (x.grad_norm - y.grad_norm).abs() <= tol * x.grad_norm.max(1.0),
            "{what} step {s}: grad norm {} vs {}",
            x.grad_norm,
            y.grad_norm
        );
    }
}

#[test]
fn ten_step_loss_curve_matches_pytorch_llama() {
    run("llama_train", false);
}

#[test]
fn ten_step_loss_curve_matches_pytorch_qwen2_phi3_gemma2() {
    for name in ["qwen2_train", "phi3_train", "gemma2_train"] {
        run(name, false);
    }
}

/// Gemma 3: sliding and global layers on their own RoPE tables, q/k norms, final soft-capping;
/// with gradient checkpointing too (its recompute rebuilds both tables).
#[test]
fn ten_step_loss_curve_matches_pytorch_gemma3_text() {
    run("gemma3_text_train", false);
    run("gemma3_text_train", true);
}

/// QLoRA: the 10-step curve on a bitsandbytes nf4 base against PyTorch + PEFT + bitsandbytes,
/// with and without gradient checkpointing.
#[test]
fn ten_step_loss_curve_matches_pytorch_on_a_4bit_base() {
    run("llama64_nf4_train", false);
    run("llama64_nf4_train", true);
}

/// Qwen3-MoE with LoRA on attention, the dense layer and the experts (`target_parameters`):
/// losses, gradient norms and final weights against PyTorch + PEFT 0.21 on transformers 5.
#[test]
fn ten_step_loss_curve_matches_pytorch_qwen3_moe() {
    run("moe/qwen3_moe_train", false);
}

#[test]
fn gradient_checkpointing_gives_the_same_curve() {
    run("llama_train", true);
    run("gemma2_train", true);
}

/// Learning-rate multipliers of transformers' get_{cosine,linear,constant}_schedule_with_warmup
/// (warmup 3, 17 steps), recorded with transformers 4.57.6.
#[test]
fn schedules_match_transformers() {
    let cosine = [
        0.0,
        0.3333333333333333,
        0.6666666666666666,
        1.0,
        0.9874639560909118,
        0.9504844339512095,
        0.890915741234015,
        0.8117449009293668,
        0.716941869558779,
        0.6112604669781572,
        0.5,
        0.38873953302184283,
        0.28305813044122097,
        0.18825509907063326,
        0.1090842587659851,
        0.04951556604879048,
        0.01253604390908819,
    ];
    let linear = [
        0.0,
        0.3333333333333333,
        0.6666666666666666,
        1.0,
        0.9285714285714286,
        0.8571428571428571,
        0.7857142857142857,
        0.7142857142857143,
        0.6428571428571429,
        0.5714285714285714,
        0.5,
        0.42857142857142855,
        0.35714285714285715,
        0.2857142857142857,
        0.21428571428571427,
        0.14285714285714285,
        0.07142857142857142,
    ];
    for (schedule, want) in [(LrSchedule::Cosine, cosine), (LrSchedule::Linear, linear)] {
        for (s, w) in want.iter().enumerate() {
            let got = schedule.factor(s, 3, 17);
            assert!((got - w).abs() < 1e-12, "{schedule:?} step {s}: {got} vs {w}");
        }
    }
    for s in 0..17 {
        let want = if s < 3 { s as f64 / 3.0 } else { 1.0 };
        assert!((LrSchedule::Constant.factor(s, 3, 17) - want).abs() < 1e-12);
    }
}

/// Dropout masks are drawn from (seed, step, micro-batch, module), not from a backend's
/// generator: the same curve on Flex and ndarray, and with gradient checkpointing (whose
/// recomputation must drop what the forward pass dropped).
#[test]
fn dropout_curve_is_the_same_on_every_cpu_backend_and_with_checkpointing() {
    type NdAutodiff = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
    let (_, plain) = curve_on::<CpuAutodiff>("llama_train", false, 0.0, &Default::default());
    let (_, flex) = curve_on::<CpuAutodiff>("llama_train", false, 0.1, &Default::default());
    let (_, checkpointed) = curve_on::<CpuAutodiff>("llama_train", true, 0.1, &Default::default());
    let (_, ndarray) = curve_on::<NdAutodiff>("llama_train", false, 0.1, &Default::default());
    let moved = flex.iter().zip(&plain).map(|(a, b)| (a.loss - b.loss).abs()).fold(0.0, f64::max);
    assert!(moved > 1e-3, "dropout 0.1 should change the curve (largest loss change {moved})");
    assert_same_curve("flex vs flex + checkpointing", &flex, &checkpointed, 1e-5);
    assert_same_curve("flex vs ndarray", &flex, &ndarray, 1e-5);
}

/// An f16 base (wgpu's half precision; f16 runs on the CPU too) with dynamic loss scaling: a
/// scale so large that the first steps' f16 gradients overflow makes the scaler halve it and
/// redo those steps, and the curve then follows the f32 curve within f16's precision.
#[test]
fn f16_base_with_dynamic_loss_scaling_follows_the_f32_curve() {
    let device = Default::default();
    let (_, f32_curve) = curve_on::<CpuAutodiff>("llama_train", false, 0.0, &device);
    let (mut model, mut opt, steps) = fixture_run::<CpuAutodiff>("llama_train", WeightPrecision::F16, 0.0, &device);
    assert_eq!(model.dtype(), burn::tensor::DType::F16);
    let mut scaler = LossScaler { scale: 2f64.powi(40), good_steps: 0 };
    let (mut redone, mut curve) = (0, Vec::new());
    for (s, (batch, lr)) in steps.into_iter().enumerate() {
        let stats = loop {
            let o = StepOptions {
                lr,
                checkpointing: false,
                dropout: StepKey { seed: 5, step: s as u64, micro_batch: 0 },
                loss_scale: scaler.scale,
                aux_loss_coef: None,
            };
            let stats = optimizer_step(&mut model, &mut opt, std::slice::from_ref(&batch), o).unwrap();
            if scaler.update(stats.overflow) {
                break stats;
            }
            redone += 1;
        };
        curve.push(stats);
    }
    assert!(
        redone > 0 && scaler.scale < 2f64.powi(40),
        "the 2^40 scale should overflow f16 (scale now {})",
        scaler.scale
    );
    let worst = f32_curve.iter().zip(&curve).map(|(a, b)| (a.loss - b.loss).abs()).fold(0.0, f64::max);
    eprintln!(
        "f16 base: {redone} steps redone, final scale {}, largest loss difference from f32 {worst:e}",
        scaler.scale
    );
    // f16 keeps 11 bits: the fixture's losses (~6.2) moved by at most 9.1e-4.
    for (s, (a, b)) in f32_curve.iter().zip(&curve).enumerate() {
        assert!((a.loss - b.loss).abs() <= 5e-3, "step {s}: f32 loss {} vs f16 {}", a.loss, b.loss);
        assert!(
            (a.grad_norm - b.grad_norm).abs() <= 5e-2 * a.grad_norm.max(1e-3),
            "step {s}: f32 grad norm {} vs f16 {}",
            a.grad_norm,
            b.grad_norm
        );
    }
}

#[test]
fn loss_scaler_halves_on_overflow_and_doubles_after_the_growth_interval() {
    let mut s = LossScaler::for_dtype(burn::tensor::DType::F16, None);
    assert_eq!(s.scale, 65536.0);
    assert!(!s.update(true));
    assert_eq!(s.scale, 32768.0);
    for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
        assert!(s.update(false));
    }
    assert_eq!(s.scale, 32768.0);
    assert!(s.update(false));
    assert_eq!((s.scale, s.good_steps), (65536.0, 0));
    assert_eq!(LossScaler::for_dtype(burn::tensor::DType::BF16, None).scale, 1.0);
    assert_eq!(
        LossScaler::for_dtype(burn::tensor::DType::F16, Some((8.0, 3))),
        LossScaler { scale: 8.0, good_steps: 3 }
    );
}
