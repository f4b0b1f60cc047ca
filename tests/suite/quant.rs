//! bitsandbytes' 4-bit formats (issue 10): Temper's quantizer gives the codes and absmax that
//! `bitsandbytes.functional.quantize_4bit` gives, and the same dequantized values, bit for bit
//! (tests/fixtures/quant, made by scripts/reference/make_quant_fixtures.py).

use safetensors::{Dtype, SafeTensors};
use temper::quant::{dequantize_4bit, quantize_4bit, FourBit};

use crate::common::fixtures;

fn f32s(view: &safetensors::tensor::TensorView) -> Vec<f32> {
    temper::export::shard::bytes_to_f32(view.dtype(), view.data()).expect("float tensor")
}

#[test]
fn nf4_and_fp4_codes_absmax_and_dequantization_are_bitsandbytes_bit_for_bit() {
    let bytes = std::fs::read(fixtures().join("quant/bnb4bit.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["cases"]).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let cases = cases.as_object().unwrap();
    assert_eq!(cases.len(), 9);
    for (name, c) in cases {
        let kind = if c["quant_type"] == "nf4" { FourBit::Nf4 } else { FourBit::Fp4 };
        let blocksize = c["blocksize"].as_u64().unwrap() as usize;
        let input = st.tensor(&format!("{name}.input")).unwrap();
        assert_ne!(input.dtype(), Dtype::U8);
        let q = quantize_4bit(&f32s(&input), blocksize, kind);
        let want_packed = st.tensor(&format!("{name}.packed")).unwrap();
        assert_eq!(q.packed, want_packed.data(), "{name}: packed codes");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let want_absmax = f32s(&st.tensor(&format!("{name}.absmax")).unwrap());
        assert_eq!(bits(&q.absmax), bits(&want_absmax), "{name}: absmax");
        let want = f32s(&st.tensor(&format!("{name}.dequant")).unwrap());
        let got = dequantize_4bit(&q);
        assert_eq!(got.len(), want.len(), "{name}: dequantized length");
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!("{name}: dequantized value {i} is {} (code {}), bitsandbytes {}", got[i], q.packed[i / 2], want[i]);
        }
    }
}

/// Double quantization (`compress_statistics=True`): the 4-bit codes, the 8-bit absmax codes,
/// the nested absmax and the offset equal bitsandbytes' bit for bit, and so do the absmax it
/// computes with (tests/fixtures/quant/bnb4bit_dq.safetensors: 4 to 938 absmax values).
#[test]
fn double_quantization_is_bitsandbytes_bit_for_bit() {
    use temper::quant::{quantize_absmax, LoadIn4Bit};
    let bytes = std::fs::read(fixtures().join("quant/bnb4bit_dq.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["cases"]).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let cases = cases.as_object().unwrap();
    assert_eq!(cases.len(), 4);
    for (name, c) in cases {
        let kind = if c["quant_type"] == "nf4" { FourBit::Nf4 } else { FourBit::Fp4 };
        let input = f32s(&st.tensor(&format!("{name}.input")).unwrap());
        let plain = quantize_4bit(&input, 64, kind);
        let nested = quantize_absmax(&plain.absmax);
        assert_eq!(
            nested.codes,
            st.tensor(&format!("{name}.absmax_codes")).unwrap().data(),
            "{name}: 8-bit absmax codes"
        );
        assert_eq!(
            bits(&nested.nested_absmax),
            bits(&f32s(&st.tensor(&format!("{name}.nested_absmax")).unwrap())),
            "{name}: nested absmax"
        );
        assert_eq!(
            nested.offset.to_bits(),
            f32s(&st.tensor(&format!("{name}.offset")).unwrap())[0].to_bits(),
            "{name}: offset"
        );
        let q = LoadIn4Bit { kind, double_quant: true }.quantize(&input);
        assert_eq!(q.packed, st.tensor(&format!("{name}.packed")).unwrap().data(), "{name}: 4-bit codes");
        assert_eq!(
            bits(&q.absmax),
            bits(&f32s(&st.tensor(&format!("{name}.absmax")).unwrap())),
            "{name}: dequantized absmax"
        );
    }
}

/// `*-bnb-4bit` checkpoints as transformers + bitsandbytes save them (NF4 with and without double
/// quantization, FP4): every 4-bit projection of the llama fixture reads back to exactly the
/// weights bitsandbytes dequantizes.
#[test]
fn bitsandbytes_checkpoints_dequantize_to_bitsandbytes_weights() {
    use temper::model::{Checkpoint, DecoderConfig};
    use temper::quant::read_bnb_4bit;
    let (_, cfg) = DecoderConfig::from_model_dir(&fixtures().join("models/llama")).unwrap();
    let shapes = |module: &str| -> [usize; 2] {
        let (h, q, kv, i) =
            (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size);
        match module.rsplit('.').next().unwrap() {
            "q_proj" => [q, h],
            "k_proj" | "v_proj" => [kv, h],
            "o_proj" => [h, q],
            "gate_proj" | "up_proj" => [i, h],
            _ => [h, i],
        }
    };
    for (name, double_quant) in [("llama_bnb_nf4", false), ("llama_bnb_nf4_dq", true), ("llama_bnb_fp4", false)] {
        let dir = fixtures().join("quant").join(name);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let bytes = std::fs::read(dir.join("dequantized.safetensors")).unwrap();
        let want = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(want.names().len(), 14, "{name}: 2 layers x 7 projections");
        for (key, view) in want.tensors() {
            let module = key.trim_end_matches(".weight");
            let w = read_bnb_4bit(&ckpt, &key, shapes(module)).unwrap_or_else(|e| panic!("{name}/{key}: {e}"));
            assert_eq!(w.double_quant, double_quant);
            let got: Vec<u32> = dequantize_4bit(&w.quantized).iter().map(|x| x.to_bits()).collect();
            let want: Vec<u32> = f32s(&view).iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, want, "{name}/{key}");
        }
    }
}

/// A quant state that is truncated or disagrees with its tensors or with the model's shape is a
/// named error.
#[test]
fn broken_bitsandbytes_weights_are_named_errors() {
    use temper::model::Checkpoint;
    use temper::quant::read_bnb_4bit;
    let src = fixtures().join("quant/llama_bnb_nf4_dq/model.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let key = "model.layers.0.self_attn.q_proj.weight";
    type Edit<'a> = &'a dyn Fn(&str, Vec<u8>) -> Option<Vec<u8>>;
    let write = |edit: Edit| {
        let tmp = tempfile::tempdir().unwrap();
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in st.tensors() {
            if let Some(data) = edit(&name, view.data().to_vec()) {
                let shape = if view.dtype() == Dtype::U8 { vec![data.len()] } else { view.shape().to_vec() };
                owned.push((name, view.dtype(), shape, data));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = owned
            .iter()
            .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(tmp.path().join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
        let ckpt = Checkpoint::open(tmp.path()).unwrap();
        read_bnb_4bit(&ckpt, key, [48, 48]).map(|_| ()).unwrap_err().to_string()
    };
    let state = format!("{key}.quant_state.bitsandbytes__nf4");
    let e = write(&|n, d| if n == state { Some(d[..d.len() / 2].to_vec()) } else { Some(d) });
    assert!(e.contains(&state) && e.contains("not a bitsandbytes quant state"), "{e}");
    let e = write(&|n, d| {
        if n == state {
            Some(String::from_utf8(d).unwrap().replace("[48, 48]", "[48, 40]").into_bytes())
        } else {
            Some(d)
        }
    });
    assert!(e.contains(key) && e.contains("[48, 40]"), "{e}");
    let e = write(&|n, d| if n == key { Some(d[..d.len() - 8].to_vec()) } else { Some(d) });
    assert!(e.contains(key) && e.contains("bytes"), "{e}");
    let e = write(&|n, d| if n == format!("{key}.absmax") { Some(d[..d.len() - 1].to_vec()) } else { Some(d) });
    assert!(e.contains("nested_absmax") || e.contains("absmax"), "{e}");
    let e = write(&|n, d| if n == format!("{key}.nested_quant_map") { None } else { Some(d) });
    assert!(e.contains("nested_quant_map"), "{e}");
    // The model expects another shape than the checkpoint holds.
    let ckpt = Checkpoint::open(&fixtures().join("quant/llama_bnb_nf4_dq")).unwrap();
    let e = read_bnb_4bit(&ckpt, key, [48, 64]).unwrap_err().to_string();
    assert!(e.contains(key) && e.contains("64"), "{e}");
}

/// The 4-bit weight on a device: dequantized by tensor ops to exactly the host values (packed
/// words, a short last block), and `linear_4bit` under autodiff gives the output and the input
/// gradient of the dense product `x · dequant(W)ᵀ`, with no gradient for the weight.
#[test]
fn device_4bit_linear_matches_the_dense_product_and_its_input_gradient() {
    use burn::tensor::{DType, Tensor, TensorData};
    use temper::quant::device::Packed4Bit;
    use temper::quant::Quantized4Bit;
    fn check<B: temper::ops::TemperBackend>(q: &Quantized4Bit, shape: [usize; 2], what: &str) -> Vec<f32> {
        let device = Default::default();
        let w = Packed4Bit::<B>::upload(q, shape, &device);
        let got: Vec<f32> = w.dequantize(DType::F32).into_data().to_vec().unwrap();
        let want = dequantize_4bit(q);
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{what}"
        );
        got
    }
    for (shape, kind, bs) in [([24, 128], FourBit::Nf4, 64), ([7, 37], FourBit::Nf4, 64), ([9, 40], FourBit::Fp4, 128)]
    {
        let n = shape[0] * shape[1];
        let values: Vec<f32> =
            (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32)).collect();
        let q = quantize_4bit(&values, bs, kind);
        let what = format!("{shape:?} {kind:?}");
        let dense = check::<crate::common::Cpu>(&q, shape, &what);
        check::<burn::backend::NdArray<f32>>(&q, shape, &what);

        // Autodiff: y = x · Wᵀ and dx for a loss sum(y * g), against the dense product.
        type A = crate::common::CpuAutodiff;
        let device = Default::default();
        let rows = 5;
        let xv: Vec<f32> = (0..rows * shape[1]).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
        let gv: Vec<f32> = (0..rows * shape[0]).map(|i| ((i * 13 % 11) as f32 - 5.0) / 5.0).collect();
        let g = Tensor::<A, 2>::from_data(TensorData::new(gv, [rows, shape[0]]), &device);
        let x4 = Tensor::<A, 2>::from_data(TensorData::new(xv.clone(), [rows, shape[1]]), &device).require_grad();
        let w4 = Packed4Bit::<A>::upload(&q, shape, &device);
        let y4 = temper::ops::linear_4bit(x4.clone(), &w4);
        let grads = (y4.clone() * g.clone()).sum().backward();
        let dx4: Vec<f32> = x4.grad(&grads).unwrap().into_data().to_vec().unwrap();
        let xd = Tensor::<A, 2>::from_data(TensorData::new(xv, [rows, shape[1]]), &device).require_grad();
        let wd = Tensor::<A, 2>::from_data(TensorData::new(dense, shape), &device);
        let yd = xd.clone().matmul(wd.transpose());
        let grads = (yd.clone() * g).sum().backward();
        let dxd: Vec<f32> = xd.grad(&grads).unwrap().into_data().to_vec().unwrap();
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let (y4, yd): (Vec<f32>, Vec<f32>) = (y4.into_data().to_vec().unwrap(), yd.into_data().to_vec().unwrap());
        assert!(
            diff(&y4, &yd) <= 1e-5 && diff(&dx4, &dxd) <= 1e-5,
            "{what}: y {:e}, dx {:e}",
            diff(&y4, &yd),
            diff(&dx4, &dxd)
        );
    }
}

/// Device dequantization equals the host's bit for bit on backend `B` (the wgpu group runs it
/// on a GPU device: the packed words, shifts and masks in WGSL).
pub fn check_device_dequantize_on<B: temper::ops::TemperBackend>(device: &B::Device) {
    use burn::tensor::DType;
    use temper::quant::device::Packed4Bit;
    for (shape, kind, bs) in [([24, 128], FourBit::Nf4, 64), ([7, 37], FourBit::Nf4, 64), ([9, 40], FourBit::Fp4, 128)]
    {
        let n = shape[0] * shape[1];
        // Values whose top nibbles are >= 8, so sign-extending shifts would show.
        let values: Vec<f32> =
            (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32)).collect();
        let q = quantize_4bit(&values, bs, kind);
        assert!(q.packed.iter().any(|b| b >> 4 >= 8), "{shape:?}: no high nibble >= 8");
        let got: Vec<f32> =
            Packed4Bit::<B>::upload(&q, shape, device).dequantize(DType::F32).into_data().to_vec().unwrap();
        let want = dequantize_4bit(&q);
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{shape:?} {kind:?}"
        );
    }
}

/// bitsandbytes 4-bit checkpoints load with their projections kept packed, and their logits
/// equal transformers + bitsandbytes' on the CPU (f32 compute) within 1e-4: nf4, nf4 with double
/// quantization, fp4. LoRA on such a base trains: its A/B get gradients, the 4-bit base none.
#[test]
fn bitsandbytes_4bit_models_match_transformers_and_train_lora() {
    use burn::tensor::{Int, Tensor, TensorData};
    use temper::lora::{inject, projections_mut, LoraConfig, LoraInit};
    use temper::model::{load_model, WeightPrecision};
    use temper::ops::loss::{nll_sum, shift_labels};
    let dense_dir = fixtures().join("quant/llama64");
    for name in ["llama64_nf4", "llama64_nf4_dq", "llama64_fp4"] {
        let dir = fixtures().join("quant").join(name);
        let device = Default::default();
        let mut model = load_model::<crate::common::Cpu>(&dir, WeightPrecision::F32, &device)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .model;
        let projections = projections_mut(&mut model);
        assert_eq!(
            projections.iter().filter(|(_, p)| p.quant.is_some()).count(),
            14,
            "{name}: every layer projection is 4-bit"
        );
        let r = crate::common::Reference::open(&dir.join("reference.safetensors"));
        let (ids, shape) = r.i64("input_ids");
        let input = || {
            Tensor::<crate::common::Cpu, 2, Int>::from_data(TensorData::new(ids.clone(), [shape[0], shape[1]]), &device)
        };
        let got: Vec<f32> = model.forward(input()).into_data().to_vec().unwrap();
        let (want, _) = r.f32("logits");
        let diff = crate::common::max_abs_diff(&got, &want);
        assert!(diff <= 1e-4, "{name}: max |logit diff| vs transformers + bitsandbytes = {diff:e}");
        // The quantization is visible: the dense base gives other logits.
        let dense = load_model::<crate::common::Cpu>(&dense_dir, WeightPrecision::F32, &device).unwrap().model;
        let dense_logits: Vec<f32> = dense.forward(input()).into_data().to_vec().unwrap();
        assert!(crate::common::max_abs_diff(&dense_logits, &want) > 1e-3, "{name}");

        let mut model = load_model::<crate::common::CpuAutodiff>(&dir, WeightPrecision::F32, &device).unwrap().model;
        let cfg = LoraConfig { r: 4, lora_alpha: 8.0, init_lora_weights: LoraInit::Flag(false), ..Default::default() };
        inject(&mut model, &cfg, 5).unwrap();
        let rows: Vec<Vec<i64>> = ids.chunks(shape[1]).map(<[i64]>::to_vec).collect();
        let (targets, _) = shift_labels(&rows);
        let x = Tensor::<crate::common::CpuAutodiff, 2, Int>::from_data(
            TensorData::new(ids.clone(), [shape[0], shape[1]]),
            &device,
        );
        let grads = nll_sum(model.forward(x), &targets).backward();
        for (module, proj) in projections_mut(&mut model) {
            let Some(lora) = &proj.lora else { continue };
            let g: Vec<f32> = lora
                .lora_a
                .val()
                .grad(&grads)
                .unwrap_or_else(|| panic!("{name}: no gradient for {module}.lora_A"))
                .into_data()
                .to_vec()
                .unwrap();
            assert!(g.iter().any(|x| *x != 0.0) && g.iter().all(|x| x.is_finite()), "{name}: {module}");
            assert!(proj.weight.val().grad(&grads).is_none(), "{name}: {module} base got a gradient");
        }
    }
}

/// Quantizing an f32 checkpoint as it loads gives bitsandbytes' 4-bit model (nf4, nf4 with double
/// quantization, fp4): the packed codes and absmax of every projection equal those
/// transformers + bitsandbytes saved, and the logits
/// equal theirs within 1e-4. `temper eval --load-in-4bit` reports that model's loss.
#[test]
fn quantize_on_load_is_the_bitsandbytes_model() {
    use burn::tensor::{Int, Tensor, TensorData};
    use temper::lora::projections_mut;
    use temper::model::{load_model_4bit, Checkpoint, WeightPrecision};
    use temper::quant::read_bnb_4bit;
    let dense = fixtures().join("quant/llama64");
    for (name, kind, double_quant) in [
        ("llama64_nf4", FourBit::Nf4, false),
        ("llama64_nf4_dq", FourBit::Nf4, true),
        ("llama64_fp4", FourBit::Fp4, false),
    ] {
        let device = Default::default();
        let spec = temper::quant::LoadIn4Bit { kind, double_quant };
        let mut model =
            load_model_4bit::<crate::common::Cpu>(&dense, WeightPrecision::F32, Some(spec), &device).unwrap().model;
        let bnb = Checkpoint::open(&fixtures().join("quant").join(name)).unwrap();
        let mut checked = 0;
        for (module, proj) in projections_mut(&mut model) {
            let Some(q) = &proj.quant else { continue };
            let want = read_bnb_4bit(&bnb, &format!("{module}.weight"), [q.out_features, q.in_features]).unwrap();
            let words: Vec<i32> = q.words.clone().into_data().convert::<i32>().to_vec().unwrap();
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).take(want.quantized.packed.len()).collect();
            assert_eq!(bytes, want.quantized.packed, "{name}: {module} codes");
            // Double quantization keeps the 8-bit codes on the device: dequantized there.
            assert_eq!(q.absmax_codes.is_some(), double_quant, "{name}: {module} keeps its absmax in 8 bits");
            let absmax: Vec<f32> = q.packed().absmax().into_data().to_vec().unwrap();
            assert_eq!(
                absmax.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.quantized.absmax.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{name}: {module} absmax"
            );
            checked += 1;
        }
        assert_eq!(checked, 14, "{name}");
        let r = crate::common::Reference::open(&fixtures().join("quant").join(name).join("reference.safetensors"));
        let (ids, shape) = r.i64("input_ids");
        let got: Vec<f32> = model
            .forward(Tensor::<crate::common::Cpu, 2, Int>::from_data(
                TensorData::new(ids, [shape[0], shape[1]]),
                &device,
            ))
            .into_data()
            .to_vec()
            .unwrap();
        let diff = crate::common::max_abs_diff(&got, &r.f32("logits").0);
        assert!(diff <= 1e-4, "{name}: quantized on load vs transformers + bitsandbytes: {diff:e}");
    }
    // The CLI flag, on the real stories260K model: a 4-bit loss close to, and not equal to, f32's.
    let model = crate::common::shared("models/stories260K");
    let eval = |extra: &[&str]| -> f64 {
        let mut args = vec![
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            "tests/fixtures/eval.jsonl",
            "--device",
            "cpu",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_temper"))
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["loss"].as_f64().unwrap()
    };
    let (full, nf4, dq) = (eval(&[]), eval(&["--load-in-4bit"]), eval(&["--load-in-4bit", "--double-quant"]));
    assert!(nf4 != full && (nf4 - full).abs() < 0.5, "f32 {full}, nf4 {nf4}");
    // Double quantization moves each absmax by at most half an 8-bit step: the loss barely moves.
    assert!(dq != full && (dq - nf4).abs() < 0.05, "nf4 {nf4}, nf4 + double quantization {dq}");
}

/// A recipe's `quantization:` section trains LoRA on a 4-bit base; its keys are checked like
/// every other section's, with the key and line named.
#[test]
fn recipe_quantization_section_trains_on_a_4bit_base_and_is_validated() {
    let tmp = tempfile::tempdir().unwrap();
    let model = crate::common::shared("models/stories260K");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/stories/train.jsonl");
    let recipe = |quant: &str| {
        let path = tmp.path().join("r.yaml");
        let text = format!(
            "base_model: {}\ndata:\n  train: {}\n  format: text\n  seq_len: 32\nlora:\n  r: 4\n  lora_alpha: 8\ntrain:\n  max_steps: 3\n  micro_batch_size: 2\n  learning_rate: 1.0e-2\noutput:\n  dir: {}\n{quant}device: cpu\n",
            model.display(),
            data.display(),
            tmp.path().join("run").display()
        );
        std::fs::write(&path, text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_temper"))
            .args(["train", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let o = recipe("quantization:\n  load_in_4bit: true\n  quant_type: nf4\n  double_quant: true\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("base quantized to nf4 with double quantization"), "{err}");
    assert!(tmp.path().join("run/adapter/adapter_model.safetensors").is_file());
    for (section, key) in [
        ("quantization:\n  load_in_4bit: true\n  quant_type: int4\n", "quantization.quant_type"),
        ("quantization:\n  load_in_4bit: false\n  double_quant: true\n", "quantization.double_quant"),
        ("quantization:\n  load_in_4bit: true\n  bits: 4\n", "bits"),
    ] {
        let o = recipe(section);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(key) && err.contains("r.yaml"), "{section}: {err}");
    }
}

/// PEFT LoRA on the bitsandbytes 4-bit models (nf4, nf4 + double quantization, fp4): Temper's
/// logits and LoRA gradients for one batch equal PEFT + bitsandbytes' within 1e-4.
#[test]
fn lora_on_a_4bit_base_matches_peft_logits_and_gradients() {
    check_4bit_peft_on::<crate::common::CpuAutodiff>(&Default::default());
}

/// [`lora_on_a_4bit_base_matches_peft_logits_and_gradients`] on backend `A` (the wgpu group
/// runs it on a GPU device).
pub fn check_4bit_peft_on<A: temper::ops::TemperAutodiff>(device: &A::Device) {
    use burn::tensor::{Int, Tensor, TensorData};
    use temper::export::Adapter;
    use temper::lora::{apply_adapter, projections_mut};
    use temper::model::{load_model, WeightPrecision};
    use temper::ops::loss::{nll_sum, shift_labels};
    for name in ["llama64_nf4", "llama64_nf4_dq", "llama64_fp4"] {
        let dir = fixtures().join("quant").join(name);
        let device = device.clone();
        let mut model = load_model::<A>(&dir, WeightPrecision::F32, &device).unwrap().model;
        let adapter = Adapter::read(&dir.join("peft_adapter")).unwrap();
        apply_adapter(&mut model, &adapter).unwrap();
        let r = crate::common::Reference::open(&dir.join("peft_reference.safetensors"));
        let (ids, shape) = r.i64("input_ids");
        let (labels, _) = r.i64("labels");
        let logits = model.forward(Tensor::<A, 2, Int>::from_data(TensorData::new(ids, [shape[0], shape[1]]), &device));
        let got: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
        let diff = crate::common::max_abs_diff(&got, &r.f32("logits").0);
        assert!(diff <= 1e-4, "{name}: logits vs PEFT + bitsandbytes {diff:e}");
        let rows: Vec<Vec<i64>> = labels.chunks(shape[1]).map(<[i64]>::to_vec).collect();
        let (targets, count) = shift_labels(&rows);
        let grads = nll_sum(logits, &targets).div_scalar(count as f32).backward();
        let mut checked = 0;
        for (module, proj) in projections_mut(&mut model) {
            let Some(lora) = &proj.lora else { continue };
            for (which, p) in [("A", &lora.lora_a), ("B", &lora.lora_b)] {
                let g: Vec<f32> = p.val().grad(&grads).unwrap().into_data().to_vec().unwrap();
                let want = r.f32(&format!("grad.base_model.model.{module}.lora_{which}.weight")).0;
                let d = crate::common::max_abs_diff(&g, &want);
                assert!(d <= 1e-4, "{name}: {module}.lora_{which} gradient {d:e}");
                checked += 1;
            }
        }
        assert_eq!(checked, 28, "{name}");
    }
}

#[test]
fn inspect_shows_a_4bit_checkpoints_scheme() {
    let dir = fixtures().join("quant/llama64_nf4_dq");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_temper"))
        .args(["inspect", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && out.contains("quantized    bitsandbytes 4-bit nf4, double quantization, compute dtype float32"),
        "{out}"
    );
}

/// `temper merge` onto a bitsandbytes 4-bit base: the 4-bit weights are dequantized, merged in
/// f32 and written in 16 / 32 bits, their quant-state tensors and quantization_config go; the f32
/// merge's logits equal the 4-bit base + adapter's (PEFT's) within 1e-4, and a bf16 merge is that
/// f32 merge rounded once.
#[test]
fn merge_onto_a_4bit_base_writes_a_dequantized_model() {
    use burn::tensor::{Int, Tensor, TensorData};
    use temper::model::{load_model, WeightPrecision};
    for name in ["llama64_nf4", "llama64_nf4_dq"] {
        let dir = fixtures().join("quant").join(name);
        let tmp = tempfile::tempdir().unwrap();
        let merge = |dtype: &str| {
            let out = tmp.path().join(dtype);
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_temper"))
                .args([
                    "merge",
                    "--model",
                    dir.to_str().unwrap(),
                    "--adapter",
                    dir.join("peft_adapter").to_str().unwrap(),
                    "--out",
                    out.to_str().unwrap(),
                    "--dtype",
                    dtype,
                    "--no-verify",
                ])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            assert!(o.status.success() && err.contains("14 weights were dequantized"), "{name}: {err}");
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
            assert!(config.get("quantization_config").is_none(), "{name}");
            out
        };
        let (f32_dir, bf16_dir) = (merge("f32"), merge("bf16"));
        let (a, b) = (
            std::fs::read(f32_dir.join("model.safetensors")).unwrap(),
            std::fs::read(bf16_dir.join("model.safetensors")).unwrap(),
        );
        let (full, half) = (SafeTensors::deserialize(&a).unwrap(), SafeTensors::deserialize(&b).unwrap());
        assert_eq!(
            full.names().len(),
            2 * 9 + 3,
            "{name}: 7 projections + 2 norms per layer, embeddings, norm, head; no quant tensors"
        );
        for (k, v) in full.tensors() {
            assert_eq!(v.dtype(), Dtype::F32, "{name}: {k}");
            let h = half.tensor(&k).unwrap();
            let rounded: Vec<u8> = f32s(&v).iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
            assert_eq!(h.data(), &rounded[..], "{name}: {k} bf16 = the f32 merge rounded once");
        }
        let device = Default::default();
        let merged = load_model::<crate::common::Cpu>(&f32_dir, WeightPrecision::F32, &device).unwrap().model;
        let r = crate::common::Reference::open(&dir.join("peft_reference.safetensors"));
        let (ids, shape) = r.i64("input_ids");
        let got: Vec<f32> = merged
            .forward(Tensor::<crate::common::Cpu, 2, Int>::from_data(
                TensorData::new(ids, [shape[0], shape[1]]),
                &device,
            ))
            .into_data()
            .to_vec()
            .unwrap();
        let diff = crate::common::max_abs_diff(&got, &r.f32("logits").0);
        assert!(diff <= 1e-4, "{name}: merged logits vs 4-bit base + adapter {diff:e}");
    }
}

/// The CPU backends dequantize on the host in one pass: the same f32 values, bit for bit, as the
/// generic tensor path every device runs (plain and double-quantized absmax, a short last block).
#[test]
fn host_dequantization_equals_the_generic_path() {
    use temper::quant::device::Packed4Bit;
    use temper::quant::LoadIn4Bit;
    let device = Default::default();
    for (shape, double_quant) in [([24usize, 128usize], false), ([7, 37], false), ([40, 160], true)] {
        let n = shape[0] * shape[1];
        let values: Vec<f32> =
            (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32)).collect();
        let q = LoadIn4Bit { kind: FourBit::Nf4, double_quant }.quantize(&values);
        let w = Packed4Bit::<crate::common::Cpu>::upload(&q, shape, &device);
        let generic: Vec<f32> = w.dequantize(burn::tensor::DType::F32).into_data().to_vec().unwrap();
        let host: Vec<f32> = w.dequantize_on_host(burn::tensor::DType::F32).unwrap().into_data().to_vec().unwrap();
        assert_eq!(
            host.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            generic.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{shape:?} double_quant {double_quant}"
        );
    }
}
