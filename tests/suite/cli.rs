//! The real binary on the real model (stories260K) and on fixture models, including bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{fixtures, manifest, shared};

fn temper(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_temper")).args(args).output().expect("run temper")
}

fn stdout_ok(out: &Output) -> String {
    assert!(out.status.success(), "temper failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn stderr_failed(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure, got success: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A copy of a fixture model with the stories260K tokenizer beside it (fixtures ship no
/// tokenizer; their vocab is the stories260K one).
fn fixture_with_tokenizer(name: &str, tmp: &Path) -> PathBuf {
    let src = fixtures().join("models").join(name);
    let dst = tmp.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(shared("models/stories260K").join(f), dst.join(f)).unwrap();
    }
    dst
}

#[test]
fn greedy_generation_reproduces_transformers_text() {
    let m = manifest();
    let want = m["stories260K"]["greedy"]["text"].as_str().expect("greedy text");
    let model = shared("models/stories260K");
    let out = temper(&[
        "generate",
        "--model",
        path(&model),
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "40",
        "--device",
        "cpu",
    ]);
    let text = stdout_ok(&out);
    assert_eq!(text.trim_end(), want);
    assert!(text
        .starts_with("Once upon a time, there was a little girl named Lily. She loved to play outside in the park."));
}

fn eval_json(model: &Path) -> serde_json::Value {
    let data = fixtures().join("eval.jsonl");
    let out = temper(&["eval", "--model", path(model), "--data", path(&data), "--json", "--device", "cpu"]);
    serde_json::from_str(stdout_ok(&out).trim()).expect("eval --json prints one JSON object")
}

fn assert_eval_matches(got: &serde_json::Value, want: &serde_json::Value, what: &str) {
    let (gl, wl) = (got["loss"].as_f64().unwrap(), want["loss"].as_f64().unwrap());
    assert!((gl - wl).abs() <= 1e-4, "{what}: loss {gl} vs transformers {wl}");
    assert_eq!(got["tokens"], want["tokens"], "{what}: token count");
    let (gp, wp) = (got["perplexity"].as_f64().unwrap(), want["perplexity"].as_f64().unwrap());
    assert!((gp / wp - 1.0).abs() <= 1e-4, "{what}: perplexity {gp} vs {wp}");
}

#[test]
fn eval_on_stories260k_matches_transformers() {
    let got = eval_json(&shared("models/stories260K"));
    assert_eval_matches(&got, &manifest()["stories260K"]["eval"], "stories260K");
}

#[test]
fn eval_on_fixture_models_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let m = manifest();
    for name in ["llama", "qwen3", "gemma2", "phi3", "llama_bf16"] {
        let dir = fixture_with_tokenizer(name, tmp.path());
        assert_eval_matches(&eval_json(&dir), &m["models"][name]["eval"], name);
    }
}

#[test]
fn inspect_reports_architecture() {
    let out = temper(&["inspect", path(&shared("models/stories260K")), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout_ok(&out)).unwrap();
    assert_eq!(v["model_type"], "llama");
    assert_eq!(v["parameters"], 260032);
    assert_eq!(v["layers"], 5);
    assert_eq!(v["kv_heads"], 4);
    assert_eq!(v["vocab_size"], 512);
    assert_eq!(v["chat_template"], false);
    // ../shared's copy has no model card or LICENSE; the one shipped for the quickstart has both.
    assert_eq!(v["license"]["source"], serde_json::Value::Null);
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models/stories260K");
    let out = temper(&["inspect", path(&shipped)]);
    let text = stdout_ok(&out);
    assert!(text.lines().any(|l| l.starts_with("license") && l.ends_with(" mit")), "{text}");
    let out = temper(&["inspect", path(&shared("models/stories260K"))]);
    assert!(stdout_ok(&out).contains("license      unknown"), "an unknown license is said so");
}

/// A writable copy of the llama fixture for corrupting.
fn scratch_llama(tmp: &Path) -> PathBuf {
    fixture_with_tokenizer("llama", tmp)
}

fn generate_err(model: &Path) -> String {
    stderr_failed(&temper(&[
        "generate",
        "--model",
        path(model),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "1",
        "--device",
        "cpu",
    ]))
}

#[test]
fn unsupported_model_type_is_refused_with_key_and_value() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = scratch_llama(tmp.path());
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"llama\"", "\"mamba\"");
    std::fs::write(&cfg, text).unwrap();
    let err = generate_err(&dir);
    assert!(err.contains("config.json") && err.contains("model_type") && err.contains("mamba"), "{err}");
}

#[test]
fn unsupported_rope_scaling_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = scratch_llama(tmp.path());
    let cfg = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["rope_scaling"] = serde_json::json!({"rope_type": "mrope", "mrope_section": [2, 1, 1]});
    std::fs::write(&cfg, v.to_string()).unwrap();
    let err = generate_err(&dir);
    assert!(err.contains("rope_scaling") && err.contains("mrope"), "{err}");
}

/// Rewrite the llama fixture's safetensors with one tensor changed by `edit`.
fn rewrite_weights(dir: &Path, edit: impl Fn(&str, Vec<usize>) -> Option<Vec<usize>>) {
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        if let Some(shape) = edit(&name, view.shape().to_vec()) {
            let n: usize = shape.iter().product();
            kept.push((name, shape, vec![0u8; n * 4]));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(n, s, d)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &file).unwrap();
}

#[test]
fn missing_weight_names_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = scratch_llama(tmp.path());
    rewrite_weights(&dir, |name, shape| (name != "model.layers.1.mlp.up_proj.weight").then_some(shape));
    let err = generate_err(&dir);
    assert!(err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("missing"), "{err}");
}

#[test]
fn wrong_shape_names_file_tensor_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = scratch_llama(tmp.path());
    rewrite_weights(&dir, |name, shape| {
        Some(if name == "model.layers.0.self_attn.k_proj.weight" { vec![shape[0] + 1, shape[1]] } else { shape })
    });
    let err = generate_err(&dir);
    assert!(
        err.contains("model.safetensors")
            && err.contains("model.layers.0.self_attn.k_proj.weight")
            && err.contains("expected"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_names_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = scratch_llama(tmp.path());
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 1000]).unwrap();
    let err = generate_err(&dir);
    assert!(err.contains("model.safetensors") && err.contains("truncated") && err.contains("tensor `"), "{err}");
}

#[test]
fn eval_row_that_is_not_json_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n\n{\"text\": oops}\n").unwrap();
    let model = shared("models/stories260K");
    let err = stderr_failed(&temper(&["eval", "--model", path(&model), "--data", path(&data), "--device", "cpu"]));
    assert!(err.contains("bad.jsonl:3") && err.contains("not valid JSON"), "{err}");
    std::fs::write(&data, "{\"prompt\": \"no text field\"}\n").unwrap();
    let err = stderr_failed(&temper(&["eval", "--model", path(&model), "--data", path(&data), "--device", "cpu"]));
    assert!(err.contains("bad.jsonl:1") && err.contains("text"), "{err}");
}

#[test]
fn unknown_device_is_refused() {
    let err = stderr_failed(&temper(&["eval", "--model", "x", "--data", "y", "--device", "tpu"]));
    assert!(err.contains("unknown device") && err.contains("tpu"), "{err}");
}

/// A fixtures folder holding only `llama`, its manifest entry edited by `edit`.
fn one_fixture(tmp: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = tmp.join("fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    for sub in ["models", "reference"] {
        std::os::unix::fs::symlink(fixtures().join(sub), dir.join(sub)).unwrap();
    }
    let mut m = manifest();
    let llama = m["models"]["llama"].clone();
    m["models"] = serde_json::json!({ "llama": llama });
    edit(&mut m["models"]["llama"]);
    std::fs::write(dir.join("manifest.json"), serde_json::to_string(&m).unwrap()).unwrap();
    dir
}

#[test]
fn selftest_passes_every_fixture_on_the_cpu() {
    let out = temper(&["selftest", "--fixtures", path(&fixtures()), "--device", "cpu", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout_ok(&out)).unwrap();
    assert_eq!(report["pass"], true, "{report}");
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["models"].as_array().unwrap().len(), manifest()["models"].as_object().unwrap().len());
}

#[test]
fn selftest_fails_a_model_off_its_reference_and_names_bad_manifest_entries() {
    let tmp = tempfile::tempdir().unwrap();
    // A reference loss moved by 1e-3 (10x the f32 tolerance) must fail.
    let moved =
        one_fixture(&tmp.path().join("moved"), |e| e["loss"] = serde_json::json!(e["loss"].as_f64().unwrap() + 1e-3));
    let err = stderr_failed(&temper(&["selftest", "--fixtures", path(&moved), "--device", "cpu"]));
    assert!(err.contains("1 of 1 fixture models outside tolerance"), "{err}");
    let no_path = one_fixture(&tmp.path().join("no_path"), |e| e["path"] = serde_json::Value::Null);
    let err = stderr_failed(&temper(&["selftest", "--fixtures", path(&no_path), "--device", "cpu"]));
    assert!(err.contains("manifest.json: models.llama.path is not a string"), "{err}");
    let err = stderr_failed(&temper(&["selftest", "--fixtures", path(tmp.path()), "--device", "cpu"]));
    assert!(err.contains(&format!("reading {}", tmp.path().join("manifest.json").display())), "{err}");
}
