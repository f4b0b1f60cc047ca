//! A 10-step training run from a PEFT-initialised adapter reproduces the same run in PyTorch
//! (torch AdamW, clip_grad_norm_, linear warmup schedule, same batches): losses, gradient norms
//! and the final adapter (tests/fixtures/peft/*_train).

use temper::data::Batch;
use temper::export::Adapter;
use temper::lora::apply_adapter;
use temper::model::{load_model, WeightPrecision};
use temper::ops::TemperAutodiff;
use temper::train::optim::LrSchedule;
use temper::train::{optimizer_step, Optimizer, TrainConfig};

use crate::common::{fixtures, manifest, max_abs_diff, CpuAutodiff, Reference};

const LOSS_TOL: f64 = 1e-4;

fn run(name: &str, checkpointing: bool) {
    run_on::<CpuAutodiff>(name, checkpointing, &Default::default());
}

/// The 10-step curve of fixture `name` against PyTorch, on backend `B`.
pub fn run_on<B: TemperAutodiff>(name: &str, checkpointing: bool, device: &B::Device) {
    let m = manifest();
    let e = &m["train"][name];
    let device = device.clone();
    let mut model = load_model::<B>(&fixtures().join(e["base_model"].as_str().unwrap()), WeightPrecision::F32, &device).unwrap().model;
    apply_adapter(&mut model, &Adapter::read(&fixtures().join(e["initial_adapter"].as_str().unwrap())).unwrap()).unwrap();
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
    let mut opt = Optimizer::new(&mut model, &cfg);
    let r = Reference::open(&fixtures().join(e["reference"].as_str().unwrap()));
    let (ids, shape) = r.i64("input_ids");
    let (labels, _) = r.i64("labels");
    let (steps, rows, t) = (shape[0], shape[1], shape[2]);
    let want_loss: Vec<f64> = e["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let want_norm: Vec<f64> = e["grad_norms"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let want_lr: Vec<f64> = e["lrs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    for s in 0..steps {
        let row = |v: &[i64], i: usize| v[(s * rows + i) * t..(s * rows + i + 1) * t].to_vec();
        let batch = Batch {
            input_ids: (0..rows).map(|i| row(&ids, i).into_iter().map(|x| x as u32).collect()).collect(),
            labels: (0..rows).map(|i| row(&labels, i)).collect(),
            positions: vec![(0..t).collect(); rows],
            segments: None,
        };
        let lr = cfg.learning_rate * LrSchedule::Linear.factor(s, 2, steps);
        assert!((lr - want_lr[s]).abs() < 1e-12, "{name} step {s}: lr {lr} vs torch {}", want_lr[s]);
        let stats = optimizer_step(&mut model, &mut opt, &[batch], lr, checkpointing).unwrap();
        assert!((stats.loss - want_loss[s]).abs() <= LOSS_TOL, "{name} step {s}: loss {} vs torch {}", stats.loss, want_loss[s]);
        assert!((stats.grad_norm - want_norm[s]).abs() <= 1e-4 * want_norm[s].max(1.0), "{name} step {s}: grad norm {} vs torch {}", stats.grad_norm, want_norm[s]);
    }
    let ours = temper::lora::extract_adapter(&mut model, &temper::lora::LoraConfig::default(), "x").unwrap();
    let theirs = Adapter::read(&fixtures().join(e["final_adapter"].as_str().unwrap())).unwrap();
    let initial = Adapter::read(&fixtures().join(e["initial_adapter"].as_str().unwrap())).unwrap();
    // Final weights: within 0.5% of how far training moved them (AdamW amplifies last-bit
    // differences where the second moment is tiny; Gemma 2's soft-capped loss is ~24).
    let moved = theirs
        .modules
        .iter()
        .map(|(m, p)| max_abs_diff(&p.a.data, &initial.modules[m].a.data).max(max_abs_diff(&p.b.data, &initial.modules[m].b.data)))
        .fold(0.0, f32::max);
    assert!(moved > 1e-2, "{name}: the reference run barely moved the weights ({moved})");
    for (module, pair) in &theirs.modules {
        let got = &ours.modules[module];
        let d = max_abs_diff(&got.a.data, &pair.a.data).max(max_abs_diff(&got.b.data, &pair.b.data));
        assert!(d <= 5e-3 * moved, "{name}: final {module} differs from torch by {d:e} (training moved weights by {moved:e})");
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

#[test]
fn gradient_checkpointing_gives_the_same_curve() {
    run("llama_train", true);
    run("gemma2_train", true);
}

/// Learning-rate multipliers of transformers' get_{cosine,linear,constant}_schedule_with_warmup
/// (warmup 3, 17 steps), recorded with transformers 4.57.6.
#[test]
fn schedules_match_transformers() {
    let cosine = [0.0, 0.3333333333333333, 0.6666666666666666, 1.0, 0.9874639560909118, 0.9504844339512095, 0.890915741234015, 0.8117449009293668, 0.716941869558779, 0.6112604669781572, 0.5, 0.38873953302184283, 0.28305813044122097, 0.18825509907063326, 0.1090842587659851, 0.04951556604879048, 0.01253604390908819];
    let linear = [0.0, 0.3333333333333333, 0.6666666666666666, 1.0, 0.9285714285714286, 0.8571428571428571, 0.7857142857142857, 0.7142857142857143, 0.6428571428571429, 0.5714285714285714, 0.5, 0.42857142857142855, 0.35714285714285715, 0.2857142857142857, 0.21428571428571427, 0.14285714285714285, 0.07142857142857142];
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
