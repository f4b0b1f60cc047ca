//! FP8 checkpoints (issue 22, item 5, dequantize-on-load): float8 e4m3 projections with a
//! `weight_scale_inv` per block (divisible, and with ragged edge blocks) or per tensor, against
//! tests/fixtures/fp8 (scripts/reference/make_fp8_fixtures.py: transformers 5.25's
//! `Fp8Dequantize` where it accepts the shape, DeepSeek's ceil-div grid where it does not).

use burn::tensor::DType;
use temper::lora::{inject, LoraConfig};
use temper::model::weights::Checkpoint;
use temper::model::{load_model, WeightPrecision};
use temper::ops::dropout::StepKey;
use temper::train::{optimizer_step, Optimizer, StepOptions, TrainConfig};

use crate::common::{fixtures, max_abs_diff, Cpu, CpuAutodiff, Reference};

const MODELS: [&str; 3] = ["block", "ragged", "per_tensor"];

fn dir() -> std::path::PathBuf {
    fixtures().join("fp8")
}

/// Every dequantized projection bit for bit, and the logits within 1e-4 of transformers running
/// the dequantized weights.
#[test]
fn fp8_weights_dequantize_bit_for_bit_and_logits_match() {
    let device = Default::default();
    for name in MODELS {
        let r = Reference::open(&dir().join(format!("{name}.reference.safetensors")));
        let ckpt = Checkpoint::open(&dir().join(name)).unwrap();
        let mut checked = 0;
        for key in r.names().into_iter().filter(|k| k.starts_with("dequant.")) {
            let tensor = key.trim_start_matches("dequant.");
            let (want, shape) = r.f32(&key);
            let got: Vec<f32> = ckpt.read(tensor, &shape, DType::F32).unwrap().to_vec().unwrap();
            assert!(
                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: {tensor} is not the reference's dequantization bit for bit"
            );
            checked += 1;
        }
        assert_eq!(checked, 14, "{name}: every FP8 projection checked");
        let model = load_model::<Cpu>(&dir().join(name), WeightPrecision::F32, &device).unwrap().model;
        let (ids, shape) = r.i64("input_ids");
        let input = burn::tensor::Tensor::<Cpu, 2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(ids, [shape[0], shape[1]]),
            &device,
        );
        let got: Vec<f32> = model.forward(input).into_data().to_vec().unwrap();
        let d = max_abs_diff(&got, &r.f32("logits").0);
        assert!(d <= 1e-4, "{name}: logits differ from transformers by {d:e}");
    }
}

/// LoRA trains on an FP8 base: the loss falls over a few AdamW steps on one batch.
#[test]
fn lora_trains_on_an_fp8_base() {
    let device = Default::default();
    let mut model = load_model::<CpuAutodiff>(&dir().join("ragged"), WeightPrecision::F32, &device).unwrap().model;
    inject(&mut model, &LoraConfig { r: 4, lora_alpha: 8.0, ..LoraConfig::default() }, 3).unwrap();
    let mut opt = Optimizer::new(&mut model, &TrainConfig { learning_rate: 1e-2, ..TrainConfig::default() });
    let r = Reference::open(&dir().join("ragged.reference.safetensors"));
    let ids: Vec<u32> = r.i64("input_ids").0.iter().map(|&x| x as u32).collect();
    let batch = temper::data::Batch {
        labels: vec![ids.iter().map(|&x| x as i64).collect()],
        positions: vec![(0..ids.len()).collect()],
        input_ids: vec![ids],
        segments: None,
    };
    let losses: Vec<f64> = (0..6)
        .map(|s| {
            let o = StepOptions {
                lr: 1e-2,
                checkpointing: false,
                dropout: StepKey { seed: 1, step: s, micro_batch: 0 },
                loss_scale: 1.0,
                aux_loss_coef: None,
            };
            optimizer_step(&mut model, &mut opt, std::slice::from_ref(&batch), o).unwrap().loss
        })
        .collect();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[5] < losses[0] - 0.05, "the loss should fall: {losses:?}");
}

/// A scale grid that does not fit the weight, a missing scale and a truncated one are errors
/// naming the tensor, never a panic or silently wrong weights.
#[test]
fn broken_fp8_scales_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = dir().join("ragged");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let target = "model.layers.0.mlp.up_proj.weight_scale_inv";
    type Edit<'a> = &'a dyn Fn(&str, &safetensors::tensor::TensorView) -> Option<(Vec<usize>, Vec<u8>)>;
    let write = |edit: Edit, case: &str| {
        let out = tmp.path().join(case);
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(src.join("config.json"), out.join("config.json")).unwrap();
        let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in st.tensors() {
            let (shape, data) = match edit(&name, &view) {
                Some(x) => x,
                None if name == "(drop)" => continue,
                None => (view.shape().to_vec(), view.data().to_vec()),
            };
            if shape.is_empty() && data.is_empty() {
                continue;
            }
            owned.push((name, view.dtype(), shape, data));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = owned
            .iter()
            .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
        out
    };
    // up_proj is [96, 64] in blocks of 40: its grid is [3, 2]. A [2, 2] grid is refused.
    let wrong = write(&|n, v| (n == target).then(|| (vec![2, 2], v.data()[..16].to_vec())), "wrong_grid");
    // The scale dropped entirely (an empty edit removes it).
    let missing = write(&|n, _| (n == target).then(|| (vec![], vec![])), "missing");
    for (folder, expect) in [(wrong, "does not fit"), (missing, "without its scale")] {
        let e = load_model::<Cpu>(&folder, WeightPrecision::F32, &Default::default()).err().map(|e| e.to_string());
        let e = e.unwrap_or_else(|| panic!("{} loaded", folder.display()));
        assert!(e.contains("model.layers.0.mlp.up_proj.weight") && e.contains(expect), "{e}");
    }
    // Another FP8 format is refused with the key named.
    let e5m2 = tmp.path().join("e5m2");
    std::fs::create_dir_all(&e5m2).unwrap();
    std::fs::copy(src.join("model.safetensors"), e5m2.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap().replace("\"e4m3\"", "\"e5m2\"");
    std::fs::write(e5m2.join("config.json"), cfg).unwrap();
    let e = load_model::<Cpu>(&e5m2, WeightPrecision::F32, &Default::default()).err().map(|e| e.to_string()).unwrap();
    assert!(e.contains("quantization_config.fmt") && e.contains("e5m2"), "{e}");
}
