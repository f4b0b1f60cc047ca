//! FP8 checkpoints (issue 22, item 5, dequantize-on-load): float8 e4m3 projections with a
//! `weight_scale_inv` per block (divisible, and with ragged edge blocks) or per tensor, against
//! tests/fixtures/fp8 (scripts/reference/make_fp8_fixtures.py: transformers 5.25's
//! `Fp8Dequantize` where it accepts the shape, DeepSeek's ceil-div grid where it does not).

use burn::tensor::DType;
use temper::export::Adapter;
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

/// `temper merge` onto an FP8 base writes a bf16 model: every FP8 weight dequantized, the
/// adapter's update added in f32, cast once; the scales and `quantization_config` gone; and the
/// merged model gives the unmerged model's logits (within bf16's rounding).
#[test]
fn merge_onto_an_fp8_base_writes_bf16() {
    use temper::export::{merge_model, MergeDtype, MergeInput, MergeOptions, WriteMode};
    use temper::lora::{apply_adapter, extract_adapter, LoraInit, TargetModules};
    let tmp = tempfile::tempdir().unwrap();
    let device = Default::default();
    let base = dir().join("ragged");
    let mut model = load_model::<Cpu>(&base, WeightPrecision::F32, &device).unwrap().model;
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::List(vec!["q_proj".into(), "down_proj".into()]),
        init_lora_weights: LoraInit::Flag(false),
        ..LoraConfig::default()
    };
    inject(&mut model, &cfg, 5).unwrap();
    let adapter = extract_adapter(&mut model, &cfg, "fp8-ragged").unwrap();
    let adapter_dir = tmp.path().join("adapter");
    adapter.write(&adapter_dir, WriteMode::Refuse, &[]).unwrap();
    let out = tmp.path().join("merged");
    let input = MergeInput { adapter: Adapter::read(&adapter_dir).unwrap(), dir: adapter_dir, weight: 1.0 };
    let summary = merge_model(
        &base,
        &[input],
        MergeOptions { dtype: MergeDtype::Auto, untie: false },
        &out,
        WriteMode::Refuse,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(summary.dequantized, 14, "every FP8 weight dequantized");
    assert_eq!(summary.merged, 4, "q_proj and down_proj of both layers");
    let ckpt = Checkpoint::open(&out).unwrap();
    assert!(ckpt.tensor_names().all(|n| !n.ends_with("_scale_inv")), "the scales are dropped");
    let (dtype, _) = ckpt.info("model.layers.0.self_attn.k_proj.weight").unwrap();
    assert_eq!(dtype, safetensors::Dtype::BF16);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none(), "{config}");
    // An untouched projection is the bf16 rounding of the dequantized FP8 weight.
    let r = Reference::open(&dir().join("ragged.reference.safetensors"));
    let (deq, shape) = r.f32("dequant.model.layers.0.self_attn.k_proj.weight");
    let got: Vec<f32> =
        ckpt.read("model.layers.0.self_attn.k_proj.weight", &shape, DType::F32).unwrap().to_vec().unwrap();
    let rounded: Vec<f32> = deq.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    assert_eq!(got, rounded);
    // The merged model (bf16 weights read as f32) against base + adapter unmerged.
    let (ids, s) = r.i64("input_ids");
    let input = || {
        burn::tensor::Tensor::<Cpu, 2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(ids.clone(), [s[0], s[1]]),
            &device,
        )
    };
    let mut unmerged = load_model::<Cpu>(&base, WeightPrecision::F32, &device).unwrap().model;
    apply_adapter(&mut unmerged, &adapter).unwrap();
    let merged = load_model::<Cpu>(&out, WeightPrecision::F32, &device).unwrap().model;
    let (a, b): (Vec<f32>, Vec<f32>) = (
        unmerged.forward(input()).into_data().to_vec().unwrap(),
        merged.forward(input()).into_data().to_vec().unwrap(),
    );
    let plain: Vec<f32> = load_model::<Cpu>(&base, WeightPrecision::F32, &device)
        .unwrap()
        .model
        .forward(input())
        .into_data()
        .to_vec()
        .unwrap();
    let (d, effect) = (max_abs_diff(&a, &b), max_abs_diff(&a, &plain));
    assert!(effect > 0.2, "the adapter must change the logits (by {effect})");
    // Measured 2.4e-2 against an adapter effect of 2.3: the bf16 rounding of every weight.
    assert!(d <= 5e-2, "merged vs unmerged logits differ by {d:e} (bf16 weights)");
}

/// Quantization schemes Temper does not read are refused with the scheme named: compressed-tensors'
/// INT4 (Kimi K2 Thinking's experts), GPTQ, 8-bit bitsandbytes.
#[test]
fn other_quantization_schemes_are_refused_by_name() {
    let path = std::path::Path::new("config.json");
    let with = |q: serde_json::Value| {
        let v = serde_json::json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 128, "quantization_config": q});
        temper::model::config::HfConfig::from_value(path, v)
            .and_then(|h| h.to_decoder_config(path))
            .unwrap_err()
            .to_string()
    };
    let int4 = with(serde_json::json!({"quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "group_size": 32}}}}));
    assert!(int4.contains("compressed-tensors (pack-quantized, int4 weights in groups of 32)"), "{int4}");
    let gptq = with(serde_json::json!({"quant_method": "gptq", "bits": 4}));
    assert!(gptq.contains("gptq checkpoints are not supported"), "{gptq}");
    let bnb8 = with(serde_json::json!({"quant_method": "bitsandbytes", "load_in_8bit": true}));
    assert!(bnb8.contains("bitsandbytes 8-bit"), "{bnb8}");
}

/// By default the FP8 projections stay in 8 bits on the device: one byte per weight (4 codes
/// per 32-bit word) plus one f32 scale per block, dequantized block by block in each forward
/// and backward. That model gives the dequantize-on-load model's logits bit for bit and its LoRA
/// gradients, on every scale layout (divisible blocks, ragged edge blocks, per tensor).
#[test]
fn fp8_base_stays_in_8_bits_and_equals_dequantize_on_load() {
    use temper::model::load_model_with;
    use temper::ops::loss::{nll_sum, shift_labels};
    let device = Default::default();
    for name in MODELS {
        let path = dir().join(name);
        let mut kept = load_model_with::<CpuAutodiff>(&path, WeightPrecision::F32, None, true, &device).unwrap().model;
        let mut dense =
            load_model_with::<CpuAutodiff>(&path, WeightPrecision::F32, None, false, &device).unwrap().model;
        let (mut fp8, mut params, mut bytes) = (0, 0, 0);
        for (module, p) in temper::lora::projections_mut(&mut kept) {
            let Some(q) = p.quant.as_ref().filter(|q| q.is_fp8()) else { continue };
            fp8 += 1;
            let n = q.out_features * q.in_features;
            let (words, scales) = (q.words.dims()[0], q.absmax.dims()[0]);
            assert!(words * 4 >= n && words * 4 < n + 4, "{name}: {module} holds one byte per weight");
            assert!(scales * 4 <= n / 16, "{name}: {module} has {scales} scales for {n} weights");
            params += n;
            bytes += words * 4 + scales * 4;
        }
        assert_eq!(fp8, 14, "{name}: every FP8 projection kept in 8 bits");
        assert!(bytes as f64 <= params as f64 * 1.07, "{name}: {bytes} bytes for {params} FP8 weights");
        assert!(
            temper::lora::projections_mut(&mut dense).iter().all(|(_, p)| p.quant.is_none()),
            "{name}: dequantize_fp8 gives dense weights"
        );
        let r = Reference::open(&dir().join(format!("{name}.reference.safetensors")));
        let (ids, shape) = r.i64("input_ids");
        let lora = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            init_lora_weights: temper::lora::LoraInit::Flag(false),
            ..LoraConfig::default()
        };
        let run = |model: &mut temper::model::CausalLm<CpuAutodiff>| {
            inject(model, &lora, 11).unwrap();
            let input = burn::tensor::Tensor::<CpuAutodiff, 2, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(ids.clone(), [shape[0], shape[1]]),
                &device,
            );
            let logits = model.forward(input);
            let values: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
            let rows: Vec<Vec<i64>> = ids.chunks(shape[1]).map(<[i64]>::to_vec).collect();
            let (targets, _) = shift_labels(&rows);
            let grads = nll_sum(logits, &targets).backward();
            (values, crate::common::lora_grads(model, &grads, name))
        };
        let (kept_logits, kept_grads) = run(&mut kept);
        let (dense_logits, dense_grads) = run(&mut dense);
        assert!(
            kept_logits.iter().zip(&dense_logits).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: logits of the 8-bit base differ from the dequantized one"
        );
        assert_eq!(kept_grads.len(), dense_grads.len());
        for (module, pair) in &kept_grads {
            let want = &dense_grads[module];
            for (got, want) in [(&pair.a.data, &want.a.data), (&pair.b.data, &want.b.data)] {
                let d = max_abs_diff(got, want);
                assert!(d <= 1e-6, "{name}: {module} LoRA gradient differs by {d:e} on the 8-bit base");
            }
        }
    }
}

/// The 8-bit dequantization's two paths agree bit for bit with the on-load values: the generic
/// tensor path (every GPU backend runs it) and the CPU's host loop, on every scale layout.
#[test]
fn fp8_device_dequantization_equals_the_on_load_values() {
    let device = Default::default();
    for name in MODELS {
        let r = Reference::open(&dir().join(format!("{name}.reference.safetensors")));
        let mut model = load_model::<Cpu>(&dir().join(name), WeightPrecision::F32, &device).unwrap().model;
        let mut checked = 0;
        for (module, p) in temper::lora::projections_mut(&mut model) {
            let Some(q) = p.quant.as_ref() else { continue };
            let packed = q.packed();
            let want = r.f32(&format!("dequant.{module}.weight")).0;
            let generic: Vec<f32> = packed.dequantize(DType::F32).into_data().to_vec().unwrap();
            let host: Vec<f32> = packed.dequantize_on_host(DType::F32).unwrap().into_data().to_vec().unwrap();
            for (path, got) in [("generic", &generic), ("host", &host)] {
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name}: {module} dequantized on the device ({path}) differs from the reference"
                );
            }
            checked += 1;
        }
        assert_eq!(checked, 14, "{name}");
    }
}
