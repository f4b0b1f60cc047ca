//! Sparse mixture-of-experts models (issue 11) against transformers 5.24 + PEFT 0.21
//! (tests/fixtures/moe, made by scripts/reference/make_moe_fixtures.py): logits and routing of
//! every model type, and PEFT adapters with `target_parameters` on the experts.

use std::collections::BTreeMap;

use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use serde_json::Value;
use temper::export::experts::fuse_experts;
use temper::export::{Adapter, LoraPair};
use temper::lora::{apply_adapter, extract_adapter};
use temper::model::{load_model, WeightPrecision};
use temper::ops::loss::{nll_sum, shift_labels};

use crate::common::{fixtures, max_abs_diff, Cpu, CpuAutodiff, Reference};

const LOGITS_TOL: f32 = 1e-4;
const GRAD_TOL: f32 = 1e-4;
/// The sparse families Temper implements.
const MODELS: &[&str] = &["qwen3_moe", "qwen3_moe_nonorm", "mixtral", "olmoe", "qwen2_moe", "gpt_oss"];

fn moe_dir() -> std::path::PathBuf {
    fixtures().join("moe")
}

fn moe_manifest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(moe_dir().join("manifest.json")).unwrap()).unwrap()
}

fn ids<B: burn::tensor::backend::Backend>(r: &Reference, device: &B::Device) -> Tensor<B, 2, Int> {
    let (ids, shape) = r.i64("input_ids");
    Tensor::from_data(TensorData::new(ids, [shape[0], shape[1]]), device)
}

/// Max |logit difference| of `model` on a reference file's `input_ids` against its `logits`.
fn logit_diff(model: &temper::model::CausalLm<Cpu>, reference: &std::path::Path) -> f32 {
    let r = Reference::open(reference);
    let got: Vec<f32> = model.forward(ids::<Cpu>(&r, &model.device())).into_data().to_vec().unwrap();
    max_abs_diff(&got, &r.f32("logits").0)
}

/// Logits equal transformers' within 1e-4 and every sparse layer routes each token to the
/// experts transformers chose (same top-k order), for routers with and without top-k
/// renormalisation, a dense layer among sparse ones, a shared expert and clipped q/k/v.
#[test]
fn moe_logits_and_routing_match_transformers() {
    let device = Default::default();
    let m = moe_manifest();
    for name in MODELS {
        let e = &m["models"][name];
        let model = load_model::<Cpu>(&moe_dir().join(e["path"].as_str().unwrap()), WeightPrecision::F32, &device)
            .unwrap()
            .model;
        let r = Reference::open(&moe_dir().join(e["reference"].as_str().unwrap()));
        let input = ids::<Cpu>(&r, &device);
        let got: Vec<f32> = model.forward(input.clone()).into_data().to_vec().unwrap();
        let diff = max_abs_diff(&got, &r.f32("logits").0);
        assert!(diff <= LOGITS_TOL, "{name}: max |logit diff| {diff:e}");
        // Routing, layer by layer.
        let [b, t] = input.dims();
        let ctx = model.causal_context(b, t, 0);
        let mut x = model.embed(input);
        let mut sparse = 0;
        for (i, layer) in model.model.layers.iter().enumerate() {
            if let Some(moe) = &layer.moe {
                let normed = layer.post_attention_layernorm.forward(attention_residual(layer, x.clone(), &ctx));
                let (_, routing) = moe.forward_routed(normed);
                let (want, shape) = r.i64(&format!("router.{i}.experts"));
                let got: Vec<i64> = routing.experts.iter().flatten().map(|&e| e as i64).collect();
                assert_eq!(got, want, "{name}: layer {i} routing ({shape:?})");
                let logits: Vec<f32> = routing.logits.into_data().to_vec().unwrap();
                let d = max_abs_diff(&logits, &r.f32(&format!("router.{i}.logits")).0);
                assert!(d <= 1e-4, "{name}: layer {i} router logits differ by {d:e}");
                sparse += 1;
            }
            x = layer.forward(x, &ctx, None);
        }
        let want_sparse = e["moe_layers"].as_array().unwrap().len();
        assert_eq!(sparse, want_sparse, "{name}: sparse layers");
    }
}

/// The residual stream after a layer's attention (pre-norm families, as all of these are).
fn attention_residual(
    layer: &temper::model::decoder::DecoderLayer<Cpu>,
    x: Tensor<Cpu, 3>,
    ctx: &temper::model::decoder::ForwardContext<Cpu>,
) -> Tensor<Cpu, 3> {
    let normed = layer.input_layernorm.as_ref().expect("pre-norm").forward(x.clone());
    let rope = &ctx.rope;
    x + layer.self_attn.as_ref().expect("an attention layer").forward(normed, rope, &ctx.mask, None)
}

/// The PEFT gradients of an adapter's tensors, by their PEFT module names.
fn fused_grads(grads: BTreeMap<String, LoraPair>) -> BTreeMap<String, LoraPair> {
    fuse_experts(&grads).unwrap().0
}

/// A PEFT adapter with `target_parameters` on the experts (3-D, `mlp.experts.gate_up_proj` /
/// `mlp.experts.down_proj`) and `target_modules` on attention, dense MLPs and the shared
/// expert: logits, loss and every LoRA gradient (fused back into PEFT's layout) equal PEFT's.
#[test]
fn peft_expert_adapters_match_peft_logits_and_gradients() {
    let device = Default::default();
    let m = moe_manifest();
    for name in MODELS {
        let e = &m["peft"][name];
        let base = &m["models"][name];
        let mut model =
            load_model::<CpuAutodiff>(&moe_dir().join(base["path"].as_str().unwrap()), WeightPrecision::F32, &device)
                .unwrap()
                .model;
        let adapter = Adapter::read(&moe_dir().join(e["adapter"].as_str().unwrap())).unwrap();
        assert!(adapter.modules.keys().any(|k| k.contains(".mlp.experts.")), "{name}: no expert deltas read");
        apply_adapter(&mut model, &adapter).unwrap();
        let r = Reference::open(&moe_dir().join(e["reference"].as_str().unwrap()));
        let input = ids::<CpuAutodiff>(&r, &device);
        let (labels, shape) = r.i64("labels");
        let labels: Vec<Vec<i64>> = labels.chunks(shape[1]).map(<[i64]>::to_vec).collect();
        let logits = model.forward(input);
        let got: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
        let diff = max_abs_diff(&got, &r.f32("logits").0);
        assert!(diff <= LOGITS_TOL, "{name}: logits with the adapter differ by {diff:e}");
        let (targets, count) = shift_labels(&labels);
        let loss = nll_sum(logits, &targets).div_scalar(count as f32);
        let loss_value = loss.clone().into_scalar().elem::<f32>();
        let want_loss = e["loss"].as_f64().unwrap() as f32;
        assert!((loss_value - want_loss).abs() <= 1e-4, "{name}: loss {loss_value} vs PEFT {want_loss}");
        let grads = loss.backward();
        let host = crate::common::lora_grads(&mut model, &grads, name);
        let fused = fused_grads(host);
        let mut checked = 0;
        for (module, pair) in &fused {
            for (which, t) in [("A", &pair.a), ("B", &pair.b)] {
                let key = format!("grad.base_model.model.{module}.lora_{which}.weight");
                assert!(r.names().contains(&key), "{name}: Temper has {key}, PEFT has no such gradient");
                let (want, want_shape) = r.f32(&key);
                assert_eq!(t.shape, want_shape, "{name}: {key} shape");
                let d = max_abs_diff(&t.data, &want);
                assert!(d <= GRAD_TOL, "{name}: {key} differs from PEFT by {d:e}");
                checked += 1;
            }
        }
        let want_keys = r.names().iter().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(checked, want_keys, "{name}: every PEFT gradient checked");
    }
}

/// The per-expert (2-D) form of the same adapter, as vLLM and llama.cpp read it, gives the same
/// logits; an adapter Temper writes is PEFT's 3-D form, byte for byte the tensors it read.
#[test]
fn per_expert_adapters_load_and_temper_writes_the_3d_form() {
    let device = Default::default();
    let m = moe_manifest();
    for name in ["qwen3_moe", "mixtral"] {
        let base = &m["models"][name];
        let e = &m["peft"][name]["per_expert"];
        assert!(e.is_object(), "{name}: per_expert missing from the MoE manifest");
        let mut model =
            load_model::<Cpu>(&moe_dir().join(base["path"].as_str().unwrap()), WeightPrecision::F32, &device)
                .unwrap()
                .model;
        let adapter = Adapter::read(&moe_dir().join(e["adapter"].as_str().unwrap())).unwrap();
        apply_adapter(&mut model, &adapter).unwrap();
        // Against the 3-D adapter's PEFT logits: the conversion is exact (the manifest records
        // PEFT's own difference: 0 for mixtral; for qwen3_moe PEFT 0.21 drops the dense layer's
        // tensors on load, see tests/fixtures/moe/README.md, while Temper keeps them).
        let diff = logit_diff(&model, &moe_dir().join(m["peft"][name]["reference"].as_str().unwrap()));
        assert!(diff <= LOGITS_TOL, "{name}: per-expert adapter logits differ by {diff:e}");
    }
    // Round trip: read the 3-D adapter, write it, compare tensors and config.
    let tmp = tempfile::tempdir().unwrap();
    let src = moe_dir().join(m["peft"]["qwen3_moe"]["adapter"].as_str().unwrap());
    let adapter = Adapter::read(&src).unwrap();
    let mut model =
        load_model::<Cpu>(&moe_dir().join("models/qwen3_moe"), WeightPrecision::F32, &device).unwrap().model;
    apply_adapter(&mut model, &adapter).unwrap();
    let back = extract_adapter(&mut model, &adapter.config, "models/qwen3_moe").unwrap();
    let out = tmp.path().join("adapter");
    back.write(&out, temper::export::WriteMode::Refuse, &[]).unwrap();
    let read = |dir: &std::path::Path| -> BTreeMap<String, Vec<u8>> {
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors().into_iter().map(|(k, v)| (k, v.data().to_vec())).collect()
    };
    assert_eq!(read(&out), read(&src), "the 3-D tensors Temper writes are PEFT's");
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["target_parameters"], serde_json::json!(["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]));
    assert_eq!(cfg["lora_dropout"], 0.0);
}

/// `temper merge` keeps the base's per-expert layout: every tensor PEFT's `merge_and_unload`
/// changed (saved back in the Hub layout) equals Temper's merged tensor within 1e-5, and the
/// merged Mixtral (`block_sparse_moe.experts.{e}.w1/w3/w2`) and gpt-oss (fused `[E, H, 2I]`
/// experts used as x @ W, so the delta lands transposed) give the adapter's logits.
#[test]
fn merge_writes_experts_in_the_base_layout() {
    use temper::export::{merge_model, MergeDtype, MergeInput, MergeOptions, WriteMode};
    let tmp = tempfile::tempdir().unwrap();
    let m = moe_manifest();
    for name in ["qwen3_moe", "mixtral", "gpt_oss"] {
        let dir = moe_dir().join(m["peft"][name]["adapter"].as_str().unwrap());
        let base = moe_dir().join(m["models"][name]["path"].as_str().unwrap());
        let out = tmp.path().join(name);
        let input = MergeInput { adapter: Adapter::read(&dir).unwrap(), dir: dir.clone(), weight: 1.0 };
        let summary = merge_model(
            &base,
            &[input],
            MergeOptions { dtype: MergeDtype::F32, untie: false },
            &out,
            WriteMode::Refuse,
            &mut |_| {},
        )
        .unwrap();
        assert!(summary.merged > 0, "{name}: nothing merged");
        let merged = Reference::open(&out.join("model.safetensors"));
        if name == "qwen3_moe" {
            let want = Reference::open(&moe_dir().join("peft/qwen3_moe/merged.safetensors"));
            for key in want.names() {
                let d = max_abs_diff(&merged.f32(&key).0, &want.f32(&key).0);
                assert!(d <= 1e-5, "{name}: merged {key} differs from PEFT's by {d:e}");
            }
            assert_eq!(summary.merged, want.names().len(), "{name}: merged tensors");
        }
        let fused = merged.names().iter().any(|k| k.ends_with(".mlp.experts.gate_up_proj"));
        assert_eq!(fused, name == "gpt_oss", "{name}: the merged model keeps the base's expert layout");
        let device = Default::default();
        let model = load_model::<Cpu>(&out, WeightPrecision::F32, &device).unwrap().model;
        let diff = logit_diff(&model, &moe_dir().join(m["peft"][name]["reference"].as_str().unwrap()));
        assert!(diff <= LOGITS_TOL, "{name}: merged model's logits differ from the adapter's by {diff:e}");
    }
}

/// `temper train` on a Qwen3-MoE checkpoint with `target_parameters` on the experts: the
/// adapter is PEFT's 3-D form (experts under `mlp.experts[.base_layer]`, none on the dense layer)
/// and reads back as every sparse layer's experts. Dropout with `target_parameters` is refused,
/// naming the key.
#[test]
fn recipe_trains_lora_on_the_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("qwen3_moe");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(moe_dir().join("models/qwen3_moe").join(f), model.join(f)).unwrap();
    }
    // The fixture's vocabulary is 512, as the stories260K tokenizer's.
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(crate::common::shared("models/stories260K").join(f), model.join(f)).unwrap();
    }
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/stories/train.jsonl");
    let recipe = |lora: &str| {
        let path = tmp.path().join("r.yaml");
        let text = format!(
            "base_model: {}\ndata:\n  train: {}\n  format: text\n  seq_len: 32\nlora:\n{lora}train:\n  max_steps: 8\n  micro_batch_size: 2\n  learning_rate: 1.0e-2\noutput:\n  dir: {}\ndevice: cpu\n",
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
    let o = recipe("  r: 4\n  lora_alpha: 8\n  target_modules: [q_proj, v_proj]\n  target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let adapter = tmp.path().join("run/adapter");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["target_parameters"], serde_json::json!(["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]));
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |k: &str| st.tensor(k).unwrap().shape().to_vec();
    assert_eq!(shape("base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"), vec![24, 48]);
    assert_eq!(shape("base_model.model.model.layers.0.mlp.experts.lora_B.weight"), vec![48, 24]);
    assert!(st.names().iter().all(|k| !k.contains("layers.1.mlp.experts")), "layer 1 is dense");
    let read = Adapter::read(&adapter).unwrap();
    assert_eq!(read.modules.keys().filter(|k| k.contains(".experts.")).count(), 3 * 6 * 2);
    let o = recipe("  r: 4\n  lora_dropout: 0.1\n  target_parameters: [mlp.experts.down_proj]\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("lora_dropout") && err.contains("target_parameters"), "{err}");
}

/// `temper export --format peft-per-expert` writes the 2-D per-expert form (Mixtral's
/// `block_sparse_moe.experts.{e}.w1/w3/w2`, the others' `experts.{e}.gate_proj/up_proj/down_proj`)
/// that reads back to the same logits; the serving check then has no 3-D complaint.
#[test]
fn export_writes_the_per_expert_form() {
    let tmp = tempfile::tempdir().unwrap();
    let m = moe_manifest();
    let device = Default::default();
    for (name, expect) in [
        ("qwen3_moe", "mlp.experts.3.up_proj.lora_B.weight"),
        ("mixtral", "block_sparse_moe.experts.3.w3.lora_B.weight"),
    ] {
        let src = moe_dir().join(m["peft"][name]["adapter"].as_str().unwrap());
        let base = moe_dir().join(m["models"][name]["path"].as_str().unwrap());
        let out = tmp.path().join(name);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_temper"))
            .args([
                "export",
                "--adapter",
                src.to_str().unwrap(),
                "--format",
                "peft-per-expert",
                "--out",
                out.to_str().unwrap(),
                "--base",
                base.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: {err}");
        assert!(!err.contains("(V9)"), "{name}: {err}");
        let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.names().iter().any(|k| k.ends_with(&format!("layers.0.{expect}"))), "{name}: {:?}", st.names());
        assert!(
            st.names().iter().all(|k| !k.contains(".mlp.experts.lora_") && !k.contains("base_layer")),
            "{name}: 3-D keys left"
        );
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert!(cfg.get("target_parameters").is_none(), "{name}: {cfg}");
        let mut model = load_model::<Cpu>(&base, WeightPrecision::F32, &device).unwrap().model;
        apply_adapter(&mut model, &Adapter::read(&out).unwrap()).unwrap();
        let diff = logit_diff(&model, &moe_dir().join(m["peft"][name]["reference"].as_str().unwrap()));
        assert!(diff <= LOGITS_TOL, "{name}: per-expert export's logits differ by {diff:e}");
    }
}

/// gpt-oss's MXFP4 experts (`*_blocks` `[E, rows, cols/32, 16]` + `*_scales`) dequantize as
/// they load into transformers' `[E, cols, rows]` layout: a checkpoint holding them gives the
/// logits of the same checkpoint with those values written out in f32 (the decoding itself is
/// checked bit for bit against transformers in src/quant/mxfp4.rs). Missing scales are a named
/// error. The model is the gpt_oss fixture's architecture widened to 32-multiples (hidden 64,
/// experts' intermediate 32), as MXFP4 needs, with random weights.
#[test]
fn gpt_oss_mxfp4_experts_load_dequantized() {
    use safetensors::{tensor::TensorView, Dtype};
    use temper::quant::mxfp4::dequantize_mxfp4;
    let tmp = tempfile::tempdir().unwrap();
    let src = moe_dir().join("models/gpt_oss");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = 64.into();
    cfg["intermediate_size"] = 32.into();
    cfg["head_dim"] = 16.into();
    let widen = |d: usize| match d {
        48 => 64,
        24 => 32,
        12 => 16,
        d => d,
    };
    let mut seed = 7u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let mut quantized: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut dense: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, view) in st.tensors() {
        let shape: Vec<usize> = view.shape().iter().map(|&d| widen(d)).collect();
        if k.ends_with("mlp.experts.gate_up_proj") || k.ends_with("mlp.experts.down_proj") {
            // In memory [E, cols, rows]; on disk blocks [E, rows, cols / 32, 16].
            let (e, cols, rows) = (shape[0], shape[1], shape[2]);
            let g = cols / 32;
            let blocks: Vec<u8> = (0..e * rows * g * 16).map(|_| next() as u8).collect();
            let scales: Vec<u8> = (0..e * rows * g).map(|_| 122 + (next() % 4) as u8).collect();
            let values = dequantize_mxfp4(&blocks, &scales, [e, rows, g, 16]).unwrap();
            dense.push((k.clone(), shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
            quantized.push((format!("{k}_blocks"), vec![e, rows, g, 16], blocks));
            quantized.push((format!("{k}_scales"), vec![e, rows, g], scales));
            continue;
        }
        let n: usize = shape.iter().product();
        let norm = k.ends_with("norm.weight");
        let values: Vec<f32> = (0..n)
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .map(|u| if norm { 1.0 + 0.1 * u } else { 0.2 * u })
            .collect();
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        dense.push((k.clone(), shape.clone(), raw.clone()));
        quantized.push((k, shape, raw));
    }
    let write = |dir: &std::path::Path, tensors: &[(String, Vec<usize>, Vec<u8>)], drop_scales: bool| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .filter(|(k, _, _)| !(drop_scales && k.ends_with("gate_up_proj_scales")))
            .map(|(k, s, b)| {
                (
                    k.clone(),
                    TensorView::new(
                        if k.ends_with("_blocks") || k.ends_with("_scales") { Dtype::U8 } else { Dtype::F32 },
                        s.clone(),
                        b,
                    )
                    .unwrap(),
                )
            })
            .collect();
        std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    };
    let (qdir, ddir, broken) = (tmp.path().join("mxfp4"), tmp.path().join("f32"), tmp.path().join("broken"));
    write(&qdir, &quantized, false);
    write(&ddir, &dense, false);
    write(&broken, &quantized, true);
    assert_eq!(
        quantized.iter().filter(|(k, _, _)| k.ends_with("_blocks")).count(),
        8,
        "both expert tensors of 4 layers in MXFP4"
    );
    let device = Default::default();
    let ids = Tensor::<Cpu, 2, Int>::from_data(
        TensorData::new((0..26i64).map(|t| 3 + t * 17 % 500).collect::<Vec<_>>(), [2, 13]),
        &device,
    );
    let logits = |dir: &std::path::Path| -> Vec<f32> {
        load_model::<Cpu>(dir, WeightPrecision::F32, &device)
            .unwrap()
            .model
            .forward(ids.clone())
            .into_data()
            .to_vec()
            .unwrap()
    };
    let (q, d) = (logits(&qdir), logits(&ddir));
    assert!(q.iter().all(|x| x.is_finite()) && q.iter().any(|&x| x != q[0]), "degenerate logits");
    assert_eq!(q, d, "MXFP4 checkpoint vs its dequantized f32 copy");
    let err =
        load_model::<Cpu>(&broken, WeightPrecision::F32, &device).err().expect("missing scales refused").to_string();
    assert!(err.contains("gate_up_proj_scales"), "{err}");
}

/// The load-balancing loss (`output_router_logits`) equals transformers' `aux_loss` on every
/// fixture model, and training with it on: the curve differs from training without it, and
/// gradient checkpointing (which adds each layer's term in its own recomputation) gives the
/// same curve as the plain backward.
#[test]
fn load_balancing_loss_matches_transformers_and_trains() {
    use temper::data::Batch;
    use temper::model::moe::{load_balancing_counts, load_balancing_term};
    use temper::ops::dropout::StepKey;
    use temper::train::{optimizer_step, Optimizer, StepOptions, TrainConfig};
    let device = Default::default();
    let m = moe_manifest();
    for name in MODELS {
        let e = &m["models"][name];
        let model = load_model::<Cpu>(&moe_dir().join(e["path"].as_str().unwrap()), WeightPrecision::F32, &device)
            .unwrap()
            .model;
        let r = Reference::open(&moe_dir().join(e["reference"].as_str().unwrap()));
        let input = ids::<Cpu>(&r, &device);
        let [b, t] = input.dims();
        let ctx = model.causal_context(b, t, 0).recording_router();
        let _ = model.hidden_states(input, &ctx, None);
        let layers = ctx.router.as_ref().unwrap().borrow();
        let experts = model.config.moe.as_ref().unwrap().num_experts;
        let (counts, rows) = load_balancing_counts(&layers, None, experts);
        let aux: f32 = layers
            .iter()
            .map(|l| load_balancing_term(l.logits.clone(), None, &counts, rows).into_scalar().elem::<f32>())
            .sum();
        let want = e["aux_loss"].as_f64().unwrap() as f32;
        assert!((aux - want).abs() <= 1e-5 * want.max(1.0), "{name}: aux loss {aux} vs transformers {want}");
    }
    // Training with it: Qwen3-MoE with LoRA on the experts, 4 steps on the fixture's batch.
    let curve = |aux: Option<f64>, checkpointing: bool| -> Vec<f64> {
        let mut model = load_model::<CpuAutodiff>(&moe_dir().join("models/qwen3_moe"), WeightPrecision::F32, &device)
            .unwrap()
            .model;
        apply_adapter(&mut model, &Adapter::read(&moe_dir().join("peft/qwen3_moe/adapter")).unwrap()).unwrap();
        let mut opt = Optimizer::new(&mut model, &TrainConfig { learning_rate: 1e-2, ..TrainConfig::default() });
        let r = Reference::open(&moe_dir().join("peft/qwen3_moe/reference.safetensors"));
        let (ids, shape) = r.i64("input_ids");
        let (labels, _) = r.i64("labels");
        let rows = |v: &[i64]| v.chunks(shape[1]).map(<[i64]>::to_vec).collect::<Vec<_>>();
        let batch = Batch {
            input_ids: rows(&ids).into_iter().map(|r| r.into_iter().map(|x| x as u32).collect()).collect(),
            labels: rows(&labels),
            positions: vec![(0..shape[1]).collect(); shape[0]],
            segments: None,
        };
        (0..4)
            .map(|s| {
                let o = StepOptions {
                    lr: 1e-2,
                    checkpointing,
                    dropout: StepKey { seed: 1, step: s, micro_batch: 0 },
                    loss_scale: 1.0,
                    aux_loss_coef: aux,
                };
                optimizer_step(&mut model, &mut opt, std::slice::from_ref(&batch), o).unwrap().loss
            })
            .collect()
    };
    let (plain, with_aux, with_aux_ckpt) = (curve(None, false), curve(Some(0.5), false), curve(Some(0.5), true));
    assert_eq!(plain[0], with_aux[0], "the first step's LM loss does not depend on the aux loss");
    assert!(
        plain.iter().zip(&with_aux).skip(1).any(|(a, b)| (a - b).abs() > 1e-6),
        "aux loss changed nothing: {plain:?} vs {with_aux:?}"
    );
    for (s, (a, b)) in with_aux.iter().zip(&with_aux_ckpt).enumerate() {
        assert!((a - b).abs() <= 1e-5, "step {s}: checkpointed {b} vs plain {a} with the aux loss");
    }
}

/// transformers 5's fused 3-D expert layout (`mlp.experts.gate_up_proj` `[E, 2I, H]`, gate rows
/// then up rows; `mlp.experts.down_proj` `[E, H, I]`), as `save_pretrained(save_original_format=
/// False)` writes it: the qwen3_moe fixture restacked so loads to the same logits, and a merge
/// into it keeps it fused and gives the adapter's logits.
#[test]
fn fused_3d_expert_checkpoints_load_and_merge() {
    use safetensors::{tensor::TensorView, Dtype};
    use temper::export::{merge_model, MergeDtype, MergeInput, MergeOptions, WriteMode};
    let tmp = tempfile::tempdir().unwrap();
    let src = moe_dir().join("models/qwen3_moe");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (experts, h, i) = (6usize, 48usize, 20usize);
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, view) in st.tensors() {
        if !k.contains(".mlp.experts.") {
            out.push((k, view.shape().to_vec(), view.data().to_vec()));
        }
    }
    for layer in [0usize, 2, 3] {
        let p = format!("model.layers.{layer}.mlp.experts");
        let t = |name: String| st.tensor(&name).unwrap().data().to_vec();
        let mut gu = Vec::new();
        let mut down = Vec::new();
        for e in 0..experts {
            gu.extend(t(format!("{p}.{e}.gate_proj.weight")));
            gu.extend(t(format!("{p}.{e}.up_proj.weight")));
            down.extend(t(format!("{p}.{e}.down_proj.weight")));
        }
        out.push((format!("{p}.gate_up_proj"), vec![experts, 2 * i, h], gu));
        out.push((format!("{p}.down_proj"), vec![experts, h, i], down));
    }
    let fused = tmp.path().join("fused");
    std::fs::create_dir_all(&fused).unwrap();
    std::fs::copy(src.join("config.json"), fused.join("config.json")).unwrap();
    let views: Vec<(String, TensorView)> =
        out.iter().map(|(k, s, b)| (k.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    std::fs::write(fused.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let device = Default::default();
    let m = moe_manifest();
    let logits = |dir: &std::path::Path, reference: &str| {
        let r = Reference::open(&moe_dir().join(reference));
        let model = load_model::<Cpu>(dir, WeightPrecision::F32, &device).unwrap().model;
        let got: Vec<f32> = model.forward(ids::<Cpu>(&r, &device)).into_data().to_vec().unwrap();
        max_abs_diff(&got, &r.f32("logits").0)
    };
    let d = logits(&fused, m["models"]["qwen3_moe"]["reference"].as_str().unwrap());
    assert!(d <= LOGITS_TOL, "fused checkpoint: logits differ by {d:e}");
    let dir = moe_dir().join(m["peft"]["qwen3_moe"]["adapter"].as_str().unwrap());
    let merged = tmp.path().join("merged");
    let input = MergeInput { adapter: Adapter::read(&dir).unwrap(), dir, weight: 1.0 };
    merge_model(
        &fused,
        &[input],
        MergeOptions { dtype: MergeDtype::F32, untie: false },
        &merged,
        WriteMode::Refuse,
        &mut |_| {},
    )
    .unwrap();
    let written = Reference::open(&merged.join("model.safetensors"));
    assert!(written.names().iter().any(|k| k == "model.layers.0.mlp.experts.gate_up_proj"), "merge changed the layout");
    let d = logits(&merged, m["peft"]["qwen3_moe"]["reference"].as_str().unwrap());
    assert!(d <= LOGITS_TOL, "merged fused checkpoint: logits differ from the adapter's by {d:e}");
}

/// The router gets LoRA only when `target_parameters` names it (`mlp.gate.weight`; gpt-oss's
/// `mlp.router.weight`), under PEFT's module names, and round-trips through the PEFT format.
#[test]
fn router_lora_only_when_asked() {
    use temper::lora::{inject, LoraConfig, TargetModules};
    let device = Default::default();
    for (name, param) in [("qwen3_moe", "mlp.gate.weight"), ("gpt_oss", "mlp.router.weight")] {
        let dir = moe_dir().join("models").join(name);
        let targets = |params: Vec<&str>| LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            target_modules: TargetModules::List(vec!["q_proj".into()]),
            target_parameters: Some(params.into_iter().map(String::from).collect()),
            ..LoraConfig::default()
        };
        let mut model = load_model::<Cpu>(&dir, WeightPrecision::F32, &device).unwrap().model;
        let hit = inject(&mut model, &targets(vec!["mlp.experts.down_proj"]), 0).unwrap();
        assert!(
            hit.iter().all(|m| !m.ends_with(".mlp.gate") && !m.ends_with(".mlp.router")),
            "{name}: router adapted unasked"
        );
        let mut model = load_model::<Cpu>(&dir, WeightPrecision::F32, &device).unwrap().model;
        let cfg = targets(vec![param]);
        let hit = inject(&mut model, &cfg, 0).unwrap();
        let router = param.trim_end_matches(".weight");
        assert_eq!(
            hit.iter().filter(|m| m.ends_with(&format!(".{router}"))).count(),
            4 - usize::from(name == "qwen3_moe"),
            "{name}: one router per sparse layer"
        );
        let adapter = extract_adapter(&mut model, &cfg, "x").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        adapter.write(&tmp.path().join("a"), temper::export::WriteMode::Refuse, &[]).unwrap();
        let cfg_json: Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("a/adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg_json["target_parameters"], serde_json::json!([param]), "{name}");
        let bytes = std::fs::read(tmp.path().join("a/adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(
            st.names().iter().any(|k| *k == format!("base_model.model.model.layers.3.{router}.lora_A.weight")),
            "{name}: {:?}",
            st.names()
        );
        assert_eq!(Adapter::read(&tmp.path().join("a")).unwrap().modules, adapter.modules, "{name}: round trip");
    }
}
