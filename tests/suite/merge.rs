//! `temper merge`: merged weights against PEFT's merge_and_unload, merged vs unmerged logits in
//! temper itself, the folder layout, and bad inputs refused with nothing left behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use temper::export::{merge_model, verify_merge, Adapter, MergeDtype, MergeInput, MergeOptions, WriteMode};
use temper::lora::{apply_adapter, extract_adapter, inject, LoraConfig, LoraInit, TargetModules};
use temper::model::{load_model, WeightPrecision};
use temper::ops::TemperBackend;

use crate::common::{fixtures, manifest, shared, Cpu, Reference};

/// f32 merge vs PEFT: |ours - peft| <= REL_TOL * max(1, |peft|).
const REL_TOL: f32 = 1e-5;

fn input(dir: &Path, weight: f64) -> MergeInput {
    MergeInput { adapter: Adapter::read(dir).unwrap(), dir: dir.to_path_buf(), weight }
}

fn opts(dtype: MergeDtype) -> MergeOptions {
    MergeOptions { dtype, untie: false }
}

fn merge(model: &Path, inputs: &[MergeInput], dtype: MergeDtype, out: &Path) {
    merge_model(model, inputs, opts(dtype), out, WriteMode::Refuse, &mut |_| {}).unwrap();
}

/// Every tensor of a merged folder as (dtype, shape, f32 values).
fn tensors(dir: &Path) -> Vec<(String, Dtype, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let data = temper::export::shard::bytes_to_f32(view.dtype(), view.data()).unwrap();
            out.push((name, view.dtype(), view.shape().to_vec(), data));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn merged_weights_match_peft_merge_and_unload() {
    let m = manifest();
    let (mut checked, mut expected) = (0, 0);
    for (name, e) in m["peft"].as_object().unwrap() {
        if e["merged_stored"] != true {
            continue;
        }
        expected += e["merged_keys"].as_array().unwrap().len();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let base = fixtures().join(e["base_model"].as_str().unwrap());
        merge(&base, &[input(&fixtures().join(e["adapter"].as_str().unwrap()), 1.0)], MergeDtype::Auto, &out);
        let r = Reference::open(&fixtures().join(e["reference"].as_str().unwrap()));
        let merged = tensors(&out);
        let base_tensors = tensors(&base);
        assert_eq!(merged.len(), base_tensors.len(), "{name}: same tensors as the base");
        for ((key, dtype, shape, got), (bkey, _, _, base_values)) in merged.iter().zip(&base_tensors) {
            assert_eq!(key, bkey);
            assert_eq!(*dtype, Dtype::F32);
            let ref_key = format!("merged.{key}");
            if r.names().contains(&ref_key) {
                let (want, want_shape) = r.f32(&ref_key);
                assert_eq!(shape, &want_shape, "{name}: {key}");
                let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0.0, f32::max);
                assert!(worst <= REL_TOL, "{name}: {key} differs from merge_and_unload by {worst:e} (relative)");
                assert_ne!(got, base_values, "{name}: {key} should have changed");
                checked += 1;
            } else {
                assert_eq!(got, base_values, "{name}: {key} is not a target and must be untouched");
            }
        }
    }
    assert!(checked == expected && checked >= 26, "checked {checked} of {expected} merged tensors");
}

fn stories_adapter(seed: u64, r: usize, targets: &[&str]) -> (Adapter, Tensor<Cpu, 3>) {
    let device = Default::default();
    let mut model = load_model::<Cpu>(&shared("models/stories260K"), WeightPrecision::F32, &device).unwrap().model;
    let cfg = LoraConfig {
        r,
        lora_alpha: 2.0 * r as f64,
        target_modules: TargetModules::List(targets.iter().map(|s| s.to_string()).collect()),
        init_lora_weights: LoraInit::Flag(false),
        ..LoraConfig::default()
    };
    inject(&mut model, &cfg, seed).unwrap();
    let logits = model.forward(ids::<Cpu>(&device));
    (extract_adapter(&mut model, &cfg, "stories260K").unwrap(), logits)
}

fn ids<B: burn::tensor::backend::Backend>(device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(vec![1i64, 403, 407, 261, 378, 267, 319, 30, 289, 2], [1, 10]), device)
}

#[test]
fn merged_model_matches_unmerged_on_stories260k() {
    check_merged_matches_unmerged_on::<Cpu>(&Default::default());
}

/// `temper merge`'s output against base + adapter applied unmerged, both run on backend `B`
/// (the merge itself runs on the host).
pub fn check_merged_matches_unmerged_on<B: TemperBackend>(device: &B::Device) {
    let tmp = tempfile::tempdir().unwrap();
    let (adapter, _) =
        stories_adapter(7, 4, &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
    let dir = tmp.path().join("adapter");
    adapter.write(&dir, WriteMode::Refuse, &[]).unwrap();
    let out = tmp.path().join("merged");
    merge(&shared("models/stories260K"), &[input(&dir, 1.0)], MergeDtype::Auto, &out);
    let load = |dir: &Path| load_model::<B>(dir, WeightPrecision::F32, device).unwrap().model;
    let base = load(&shared("models/stories260K"));
    let mut unmerged = load(&shared("models/stories260K"));
    apply_adapter(&mut unmerged, &adapter).unwrap();
    let merged = load(&out);
    let logits = |m: &temper::model::CausalLm<B>| -> Vec<f32> {
        m.forward(ids::<B>(device)).into_data().convert::<f32>().to_vec().unwrap()
    };
    let (want, got, plain) = (logits(&unmerged), logits(&merged), logits(&base));
    let diff = crate::common::max_abs_diff(&got, &want);
    let effect = crate::common::max_abs_diff(&plain, &want);
    assert!(effect > 0.1, "the adapter must change the logits (changed by {effect})");
    assert!(diff <= 1e-4, "merged vs unmerged logits differ by {diff:e}");
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing from the merged folder");
    }
    // ../shared's stories260K declares no license: the merged card says it is unknown.
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("## License") && card.contains("unknown"), "{card}");
}

#[test]
fn weighted_sum_of_two_adapters_matches_both_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _) = stories_adapter(11, 4, &["q_proj", "v_proj"]);
    let (b, _) = stories_adapter(12, 2, &["v_proj", "down_proj"]);
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    a.write(&da, WriteMode::Refuse, &[]).unwrap();
    b.write(&db, WriteMode::Refuse, &[]).unwrap();
    let inputs = [input(&da, 0.7), input(&db, 0.3)];
    let out = tmp.path().join("merged");
    merge(&shared("models/stories260K"), &inputs, MergeDtype::Auto, &out);
    let report = verify_merge::<Cpu>(
        &shared("models/stories260K"),
        &inputs,
        &out,
        &[1, 403, 407, 261, 378],
        &Default::default(),
    )
    .unwrap();
    assert!(report.max_abs_logit_diff <= 1e-4, "{report:?}");
}

#[test]
fn sharded_base_keeps_its_shards_and_index_and_casts_to_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("models/llama_sharded");
    let out = tmp.path().join("merged");
    merge(&base, &[input(&fixtures().join("peft/llama/adapter"), 1.0)], MergeDtype::Bf16, &out);
    let read = |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let (src_idx, idx) =
        (read(&base.join("model.safetensors.index.json")), read(&out.join("model.safetensors.index.json")));
    assert_eq!(src_idx["weight_map"], idx["weight_map"], "same tensor -> shard assignment");
    let total: u64 = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            SafeTensors::deserialize(&bytes).unwrap().tensors().iter().map(|(_, v)| v.data().len() as u64).sum::<u64>()
        })
        .sum();
    assert_eq!(idx["metadata"]["total_size"], total);
    assert!(tensors(&out).iter().all(|(_, dt, _, _)| *dt == Dtype::BF16));
    let cfg = read(&out.join("config.json"));
    assert!(
        cfg.get("dtype") == Some(&"bfloat16".into()) || cfg.get("torch_dtype") == Some(&"bfloat16".into()),
        "{cfg}"
    );
    // bf16: the merged weights are the f32 merge rounded once.
    let f32_out = tmp.path().join("merged_f32");
    merge(&base, &[input(&fixtures().join("peft/llama/adapter"), 1.0)], MergeDtype::F32, &f32_out);
    for ((k, _, _, bf), (_, _, _, f)) in tensors(&out).iter().zip(tensors(&f32_out)) {
        let rounded: Vec<f32> = f.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        assert_eq!(bf, &rounded, "{k}");
    }
}

// ---- the binary, bad inputs -------------------------------------------------------------

fn temper(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_temper")).args(args).output().expect("run temper")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a merge that must fail; returns stderr and checks nothing was left in `parent`.
fn refused(args: &[&str], parent: &Path, before: usize) -> String {
    let out = temper(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected failure: {err}");
    assert_eq!(std::fs::read_dir(parent).unwrap().count(), before, "partial output left behind: {err}");
    err
}

#[test]
fn merge_command_refuses_bad_inputs_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = fixtures().join("models/llama");
    let out = tmp.path().join("merged");
    let good = fixtures().join("peft/llama/adapter");

    let err = refused(
        &["merge", "--model", s(&llama), "--adapter", s(&fixtures().join("peft/phi3/adapter")), "--out", s(&out)],
        tmp.path(),
        0,
    );
    assert!(err.contains("another base model"), "{err}");

    let err = refused(
        &["merge", "--model", s(&llama), "--adapter", s(&tmp.path().join("nowhere")), "--out", s(&out)],
        tmp.path(),
        0,
    );
    assert!(err.contains("adapter_config.json"), "{err}");

    let dora = tmp.path().join("dora");
    std::fs::create_dir_all(&dora).unwrap();
    std::fs::copy(good.join("adapter_model.safetensors"), dora.join("adapter_model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(good.join("adapter_config.json")).unwrap()).unwrap();
    cfg["use_dora"] = true.into();
    std::fs::write(dora.join("adapter_config.json"), cfg.to_string()).unwrap();
    let err = refused(&["merge", "--model", s(&llama), "--adapter", s(&dora), "--out", s(&out)], tmp.path(), 1);
    assert!(err.contains("use_dora") && err.contains("DoRA"), "{err}");

    let no_weights = tmp.path().join("no_weights");
    std::fs::create_dir_all(&no_weights).unwrap();
    std::fs::copy(good.join("adapter_config.json"), no_weights.join("adapter_config.json")).unwrap();
    let err = refused(&["merge", "--model", s(&llama), "--adapter", s(&no_weights), "--out", s(&out)], tmp.path(), 2);
    assert!(err.contains("adapter_model.safetensors"), "{err}");

    let err = refused(
        &[
            "merge",
            "--model",
            s(&llama),
            "--adapter",
            s(&good),
            "--adapter",
            s(&good),
            "--weights",
            "0.5",
            "--out",
            s(&out),
        ],
        tmp.path(),
        2,
    );
    assert!(err.contains("--weights"), "{err}");

    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = refused(&["merge", "--model", s(&llama), "--adapter", s(&good), "--out", s(&out)], tmp.path(), 3);
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    assert!(out.join("keep.txt").is_file(), "an existing output is not touched without --force");

    let ok = temper(&[
        "merge",
        "--model",
        s(&llama),
        "--adapter",
        s(&good),
        "--out",
        s(&out),
        "--force",
        "--verify",
        "--json",
    ]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert!(report["verify"]["max_abs_logit_diff"].as_f64().unwrap() < 1e-4, "{report}");
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").is_file());
}

#[test]
fn lm_head_adapter_on_tied_embeddings_needs_untie() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut adapter, _) = stories_adapter(5, 2, &["q_proj"]);
    // An lm_head pair of the right shapes: A [r, hidden], B [vocab, r].
    let q = adapter.modules.values().next().unwrap().clone();
    let hidden = q.a.shape[1];
    let b = temper::export::HostTensor {
        shape: vec![512, 2],
        data: (0..1024).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect(),
    };
    let a = temper::export::HostTensor { shape: vec![2, hidden], data: q.a.data.clone() };
    adapter.modules.insert("lm_head".into(), temper::export::LoraPair { a, b });
    let dir = tmp.path().join("adapter");
    adapter.write(&dir, WriteMode::Refuse, &[]).unwrap();
    let model = shared("models/stories260K");
    let out = tmp.path().join("merged");
    let err = merge_model(&model, &[input(&dir, 1.0)], opts(MergeDtype::Auto), &out, WriteMode::Refuse, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("--untie") && err.contains("lm_head"), "{err}");
    assert!(!out.exists());
    let untie = MergeOptions { dtype: MergeDtype::Auto, untie: true };
    let summary = merge_model(&model, &[input(&dir, 1.0)], untie, &out, WriteMode::Refuse, &mut |_| {}).unwrap();
    assert!(summary.untied);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], false);
    let names: Vec<String> = tensors(&out).into_iter().map(|t| t.0).collect();
    assert!(names.contains(&"lm_head.weight".to_string()));
}

#[test]
fn finiteness_check_finds_nan_and_inf_at_any_position_and_alignment() {
    use temper::export::shard::{all_finite, f32_to_bytes};
    for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
        for n in [1usize, 3, 4, 5, 8, 9, 17] {
            let ok = f32_to_bytes(dtype, &vec![1.5; n]);
            for shift in 0..3 {
                let mut buf = vec![0u8; shift];
                buf.extend_from_slice(&ok);
                assert!(all_finite(dtype, &buf[shift..]), "{dtype:?} n={n} shift={shift}");
            }
            for pos in 0..n {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut v = vec![-2.25f32; n];
                    v[pos] = bad;
                    let bytes = f32_to_bytes(dtype, &v);
                    for shift in 0..3 {
                        let mut buf = vec![0u8; shift];
                        buf.extend_from_slice(&bytes);
                        assert!(!all_finite(dtype, &buf[shift..]), "{dtype:?} n={n} pos={pos} {bad} shift={shift}");
                    }
                }
            }
        }
    }
    // f16 overflows to infinity on the cast: caught after it.
    assert!(!all_finite(Dtype::F16, &f32_to_bytes(Dtype::F16, &[1.0, 70000.0])));
}

/// Vision-language checkpoints (Gemma 3, Mistral 3, saved as `language_model.model.*` next to
/// `vision_tower.*`): merging PEFT's adapter on the text decoder changes exactly the adapted
/// projections, under the checkpoint's own names; every other tensor (the vision tower and the
/// projector too) and config.json are copied byte for byte; and the merged model's text logits
/// equal PEFT's with the adapter.
#[test]
fn vision_language_merge_keeps_the_vision_tower_byte_for_byte() {
    use temper::model::names::{internal_module, TextLayout};
    let m = manifest();
    for name in ["gemma3_vlm", "mistral3_vlm"] {
        let e = &m["peft"][name];
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let base = fixtures().join(e["base_model"].as_str().unwrap());
        merge(&base, &[input(&fixtures().join(e["adapter"].as_str().unwrap()), 1.0)], MergeDtype::Auto, &out);
        let changed: std::collections::BTreeSet<String> = e["merged_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| TextLayout::Legacy.checkpoint_name(&internal_module(k.as_str().unwrap()).0))
            .collect();
        let (base_bytes, merged_bytes) = (
            std::fs::read(base.join("model.safetensors")).unwrap(),
            std::fs::read(out.join("model.safetensors")).unwrap(),
        );
        let (b, mm) =
            (SafeTensors::deserialize(&base_bytes).unwrap(), SafeTensors::deserialize(&merged_bytes).unwrap());
        assert_eq!(b.names().len(), mm.names().len(), "{name}: tensor count");
        let (mut same, mut vision, mut differ) = (0, 0, std::collections::BTreeSet::new());
        for (key, view) in b.tensors() {
            let merged = mm.tensor(&key).unwrap_or_else(|_| panic!("{name}: {key} missing from the merge"));
            assert_eq!((merged.dtype(), merged.shape()), (view.dtype(), view.shape()), "{name}: {key}");
            if merged.data() == view.data() {
                same += 1;
                vision += usize::from(!key.starts_with("language_model."));
            } else {
                differ.insert(key);
            }
        }
        assert_eq!(differ, changed, "{name}: exactly the adapted projections change");
        assert!(
            vision >= 10 && same + differ.len() == b.names().len(),
            "{name}: {vision} vision / projector tensors kept"
        );
        assert_eq!(std::fs::read(base.join("config.json")).unwrap(), std::fs::read(out.join("config.json")).unwrap());

        let device = Default::default();
        let merged_model = load_model::<Cpu>(&out, WeightPrecision::F32, &device).unwrap().model;
        let r = Reference::open(&fixtures().join(e["reference"].as_str().unwrap()));
        let (ids, shape) = r.i64("input_ids");
        let got: Vec<f32> = merged_model
            .forward(Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [shape[0], shape[1]]), &device))
            .into_data()
            .to_vec()
            .unwrap();
        let diff = crate::common::max_abs_diff(&got, &r.f32("logits").0);
        assert!(diff <= 1e-4, "{name}: merged text logits vs PEFT: {diff:e}");
    }
}

/// `merge` verifies small models by default (streamed layer by layer), and the check is not one
/// that passes whatever was written: merging with the wrong weight is caught.
#[test]
fn verify_is_the_default_for_small_models_and_catches_a_wrong_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _) = stories_adapter(13, 4, &["q_proj", "o_proj", "up_proj"]);
    let dir = tmp.path().join("a");
    a.write(&dir, WriteMode::Refuse, &[]).unwrap();
    let base = shared("models/stories260K");
    let out = tmp.path().join("merged");
    let o = temper(&["merge", "--model", s(&base), "--adapter", s(&dir), "--out", s(&out), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["verify"]["max_abs_logit_diff"].as_f64().unwrap() < 1e-4, "{report}");
    let o = temper(&[
        "merge",
        "--model",
        s(&base),
        "--adapter",
        s(&dir),
        "--out",
        s(&out),
        "--force",
        "--no-verify",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["verify"].is_null(), "{report}");
    // Merged at weight 0.5, checked against weight 1: the difference shows.
    let half = tmp.path().join("half");
    merge(&base, &[input(&dir, 0.5)], MergeDtype::Auto, &half);
    let wrong =
        verify_merge::<Cpu>(&base, &[input(&dir, 1.0)], &half, &[1, 403, 407, 261, 378], &Default::default()).unwrap();
    let right =
        verify_merge::<Cpu>(&base, &[input(&dir, 0.5)], &half, &[1, 403, 407, 261, 378], &Default::default()).unwrap();
    assert!(right.max_abs_logit_diff <= 1e-4 && wrong.max_abs_logit_diff > 1e-2, "{right:?} {wrong:?}");
}
