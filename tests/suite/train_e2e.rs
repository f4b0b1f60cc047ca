//! Training end to end on the real model (stories260K): the quickstart recipe through the
//! binary, exact resume, recipe errors, and a run that diverges.

use std::path::{Path, PathBuf};
use std::process::Command;

use temper::data::{prepare, DataConfig, TextTokenizer};
use temper::lora::LoraConfig;
use temper::model::{load_model, WeightPrecision};
use temper::recipe::Recipe;
use temper::train::metrics::MetricLine;
use temper::train::{train, RunConfig, TrainConfig};

use crate::common::{shared, CpuAutodiff};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn temper(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_temper")).args(args).current_dir(repo()).output().expect("run temper")
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// The quickstart as a user runs it on a fresh clone: its base model is the copy of stories260K
/// shipped in examples/models (no Hub, no ../shared).
#[test]
fn quickstart_recipe_trains_stories260k_and_the_adapter_reloads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let shipped = repo().join("examples/models/stories260K");
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        let (a, b) =
            (std::fs::read(shipped.join(f)).unwrap(), std::fs::read(shared("models/stories260K").join(f)).unwrap());
        assert!(a == b, "examples/models/stories260K/{f} is the real model's file");
    }
    let o = temper(&[
        "train",
        "recipes/quickstart.yaml",
        "--set",
        &format!("output.dir={}", out.display()),
        "--set",
        "train.max_steps=24",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "train failed: {}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains(&out.join("adapter").display().to_string()), "prints where the adapter went: {stdout}");
    // The console (not a terminal here: plain lines): one data summary, the model as typed, and
    // the eval loss at every eval step (10, 20 and the last) with its change.
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.lines().filter(|l| l.starts_with("data: ") && l.contains(" rows")).count(), 1, "{stderr}");
    assert!(stderr.contains("training on cpu: examples/models/stories260K -> "), "{stderr}");
    assert!(stderr.lines().any(|l| l == "license: mit"), "the base model's license up front: {stderr}");
    let card = std::fs::read_to_string(out.join("adapter/README.md")).unwrap();
    assert!(card.contains("\nlicense: \"mit\"\n") && card.contains("## License"), "{card}");
    for (step, since) in [(10, 0), (20, 10), (24, 20)] {
        let line = stderr.lines().find(|l| l.starts_with(&format!("step {step}: eval loss "))).unwrap_or_else(|| {
            panic!("no eval line at step {step}: {stderr}");
        });
        assert!(line.contains("perplexity") && line.contains(&format!("since step {since})")), "{line}");
    }
    let summary = read_json(&out.join("summary.json"));
    let (before, after) =
        (summary["initial_eval_loss"].as_f64().unwrap(), summary["final_eval_loss"].as_f64().unwrap());
    assert!(after < before - 0.2, "eval loss should fall: {before} -> {after}");
    assert_eq!(summary["steps"], 24);
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/README.md",
        "loss_curve.svg",
        "recipe.yaml",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<MetricLine> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().filter(|m| matches!(m, MetricLine::Train { .. })).count(), 24);
    assert!(lines.iter().any(|m| matches!(m, MetricLine::Eval { .. })));
    // save_total_limit 2 with save_steps 20: checkpoints at 20 and 24.
    let ckpts = temper::train::checkpoint::list(&out).unwrap();
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), vec![20, 24]);
    // The exported adapter reloads and lowers the loss on the eval rows.
    let eval = |adapter: Option<&Path>| {
        let mut args = vec![
            "eval".to_string(),
            "--model".into(),
            shipped.display().to_string(),
            "--data".into(),
            "datasets/stories/eval.jsonl".into(),
            "--json".into(),
            "--device".into(),
            "cpu".into(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter".to_string(), a.display().to_string()]);
        }
        let o = Command::new(env!("CARGO_BIN_EXE_temper")).args(&args).current_dir(repo()).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["loss"].as_f64().unwrap()
    };
    let (base, tuned) = (eval(None), eval(Some(&out.join("adapter"))));
    assert!(tuned < base - 0.2, "adapter should lower eval loss: base {base}, with adapter {tuned}");
}

fn small_run(out: &Path, resume: bool, stop: Option<usize>) -> Vec<(usize, f64)> {
    small_run_with(out, resume, stop, |t| t)
}

fn small_run_with(
    out: &Path,
    resume: bool,
    stop: Option<usize>,
    tweak: impl Fn(TrainConfig) -> TrainConfig,
) -> Vec<(usize, f64)> {
    let model_dir = shared("models/stories260K");
    let tok = TextTokenizer::from_dir(&model_dir).unwrap();
    let data_cfg = DataConfig {
        train: repo().join("datasets/stories/train.jsonl"),
        eval: Some(repo().join("datasets/stories/eval.jsonl")),
        seq_len: 64,
        ..DataConfig::new(repo().join("datasets/stories/train.jsonl"))
    };
    let data = prepare(&data_cfg, &tok, Path::new("."), 1).unwrap();
    let device = Default::default();
    let model = load_model::<CpuAutodiff>(&model_dir, WeightPrecision::F32, &device).unwrap().model;
    let run = RunConfig {
        base_model: "stories260K".into(),
        lora: LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.1, ..LoraConfig::default() },
        data: data_cfg,
        train: tweak(TrainConfig {
            max_steps: Some(8),
            micro_batch_size: 2,
            gradient_accumulation_steps: 2,
            learning_rate: 2e-3,
            warmup_steps: Some(2),
            save_steps: Some(2),
            eval_steps: Some(4),
            resume,
            ..TrainConfig::default()
        }),
        output_dir: out.to_path_buf(),
        recipe_text: None,
        show_progress: false,
        stop_after_steps: stop,
        base_license: None,
    };
    train(model, &data, 2, &run).unwrap();
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| match serde_json::from_str::<MetricLine>(l).unwrap() {
            MetricLine::Train { step, loss, .. } => Some((step, loss)),
            _ => None,
        })
        .collect()
}

#[test]
fn resumed_run_matches_uninterrupted_run_step_for_step() {
    let tmp = tempfile::tempdir().unwrap();
    let full = small_run(&tmp.path().join("full"), false, None);
    // Killed after step 5: the last checkpoint is step 4, step 5 is logged but must be redone.
    let part = tmp.path().join("part");
    let first = small_run(&part, false, Some(5));
    assert_eq!(first.len(), 5);
    assert!(!part.join("adapter").exists(), "an interrupted run exports no adapter");
    let resumed = small_run(&part, true, None);
    assert_eq!(full.len(), 8);
    assert_eq!(resumed.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    for ((s, a), (_, b)) in full.iter().zip(&resumed) {
        assert!((a - b).abs() <= 1e-6, "step {s}: uninterrupted {a} vs resumed {b}");
    }
    let a = temper::export::Adapter::read(&tmp.path().join("full/adapter")).unwrap();
    let b = temper::export::Adapter::read(&part.join("adapter")).unwrap();
    for (m, p) in &a.modules {
        assert_eq!(p, &b.modules[m], "final adapter {m} identical after resume");
    }
}

#[test]
fn diverging_run_stops_keeps_the_last_good_checkpoint_and_writes_no_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = temper(&[
        "train",
        "recipes/quickstart.yaml",
        "--set",
        &format!("base_model={}", shared("models/stories260K").display()),
        "--set",
        &format!("output.dir={}", out.display()),
        "--set",
        "train.max_steps=6",
        "--set",
        "train.save_steps=1",
        "--set",
        "train.learning_rate=1.0e30",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.max_grad_norm=0",
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("non-finite"), "{err}");
    assert!(!out.join("adapter").exists(), "no adapter from a diverged run");
    let ckpts = temper::train::checkpoint::list(&out).unwrap();
    assert!(!ckpts.is_empty(), "checkpoints before the divergence stay");
    let (_, adapter, _, _) = temper::train::checkpoint::load_latest(&out).unwrap().unwrap();
    assert!(adapter.modules.values().all(|p| p.a.data.iter().chain(&p.b.data).all(|x| x.is_finite())));
}

#[test]
fn recipe_typo_names_the_key_path_and_line() {
    let text = std::fs::read_to_string(repo().join("recipes/quickstart.yaml"))
        .unwrap()
        .replace("  learning_rate:", "  lerning_rate:");
    let err = Recipe::from_yaml(&text, Path::new("recipes/quickstart.yaml"), &[]).unwrap_err().to_string();
    let line = text.lines().position(|l| l.contains("lerning_rate")).unwrap() + 1;
    assert!(err.contains("train.lerning_rate") && err.contains(&format!("quickstart.yaml:{line}")), "{err}");
    assert_eq!(err.matches("lerning_rate").count(), 2, "the key once, and serde's message naming it once: {err}");
    // A top-level key, and the same through --set (a YAML value, not the file's text).
    let text = format!("method: dpo\n{}", std::fs::read_to_string(repo().join("recipes/quickstart.yaml")).unwrap());
    for overrides in [vec![], vec!["train.max_steps=3".to_string()]] {
        let err = Recipe::from_yaml(&text, Path::new("r.yaml"), &overrides).unwrap_err();
        let temper::Error::Recipe { key, .. } = &err else { panic!("{err}") };
        assert_eq!(key, "method", "{err}");
    }
    let base = std::fs::read_to_string(repo().join("recipes/quickstart.yaml")).unwrap();
    let err = Recipe::from_yaml(&base, Path::new("r.yaml"), &["train.learning_rat=1.0".to_string()]).unwrap_err();
    let temper::Error::Recipe { key, .. } = &err else { panic!("{err}") };
    assert_eq!(key, "train.learning_rat", "{err}");
}

#[test]
fn recipe_wrong_type_and_impossible_values_are_named() {
    let base = std::fs::read_to_string(repo().join("recipes/quickstart.yaml")).unwrap();
    let p = Path::new("r.yaml");
    let err = Recipe::from_yaml(&base.replace("micro_batch_size: 4", "micro_batch_size: four"), p, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.micro_batch_size"), "{err}");
    let err = Recipe::from_yaml(&base.replace("learning_rate: 1.0e-3", "learning_rate: -1.0"), p, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.learning_rate") && err.contains("positive"), "{err}");
    let err = Recipe::from_yaml(&base, p, &["lora.r=0".into()]).unwrap_err().to_string();
    assert!(err.contains("lora.r"), "{err}");
    let err = Recipe::from_yaml(&base.replace("output:", "outptu:"), p, &[]).unwrap_err().to_string();
    assert!(err.contains("outptu"), "{err}");
}

#[test]
fn training_row_that_is_not_json_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.jsonl");
    std::fs::write(&data, "{\"text\": \"a\"}\n{\"text\": \"b\"}\nnot json\n").unwrap();
    let o = temper(&[
        "train",
        "recipes/quickstart.yaml",
        "--set",
        &format!("base_model={}", shared("models/stories260K").display()),
        "--set",
        &format!("data.train={}", data.display()),
        "--set",
        &format!("output.dir={}", tmp.path().join("run").display()),
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("train.jsonl:3"), "{err}");
}

#[test]
fn every_recipe_parses() {
    let mut found = Vec::new();
    let mut stack = vec![repo().join("recipes")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                Recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
                found.push(p);
            }
        }
    }
    assert!(!found.is_empty(), "recipes/ has no recipe");
}

/// Early stopping (transformers' EarlyStoppingCallback): with a threshold no evaluation can beat,
/// patience 2 and evaluations every 2 steps, the run stops at step 6 (best at 2, then two evals
/// without improvement), writes its adapter, checkpoint and summary, and says so; with
/// `load_best_at_end` the adapter is the lowest eval loss's, kept in `best_adapter/`.
#[test]
fn early_stopping_stops_on_patience_and_keeps_the_best_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = temper(&[
        "train",
        "recipes/quickstart.yaml",
        "--set",
        &format!("output.dir={}", out.display()),
        "--set",
        "train.max_steps=20",
        "--set",
        "train.eval_steps=2",
        "--set",
        "train.save_steps=100",
        "--set",
        "train.early_stopping_patience=2",
        "--set",
        "train.early_stopping_threshold=10.0",
        "--set",
        "train.load_best_at_end=true",
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "train failed: {stderr}");
    assert!(stderr.contains("early stopping at step 6: 2 evaluations without an improvement"), "{stderr}");
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["steps"], 6);
    assert_eq!(summary["stopped_early_at"], 6);
    let evals: Vec<(usize, f64)> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| match serde_json::from_str::<MetricLine>(l).unwrap() {
            MetricLine::Eval { step, eval_loss, .. } => Some((step, eval_loss)),
            _ => None,
        })
        .collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 4, 6]);
    let best = evals.iter().copied().fold((0, f64::INFINITY), |b, e| if e.1 < b.1 { e } else { b });
    assert_eq!(summary["best_eval_step"], best.0);
    assert_eq!(summary["best_eval_loss"].as_f64().unwrap(), best.1);
    let ckpts = temper::train::checkpoint::list(&out).unwrap();
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), vec![6], "a checkpoint where it stopped");
    // adapter/ is best_adapter/ (the lowest eval loss's), not necessarily the last step's.
    let a = temper::export::Adapter::read(&out.join("adapter")).unwrap();
    let b = temper::export::Adapter::read(&out.join("best_adapter")).unwrap();
    assert_eq!(a.modules.len(), b.modules.len());
    for (m, p) in &a.modules {
        assert_eq!(p.a.data, b.modules[m].a.data, "{m}");
        assert_eq!(p.b.data, b.modules[m].b.data, "{m}");
    }
    // Patience without evaluations is refused, naming the key.
    let bad = temper(&[
        "train",
        "recipes/quickstart.yaml",
        "--set",
        "train.eval_steps=null",
        "--set",
        "train.early_stopping_patience=2",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("train.early_stopping_patience"), "{err}");
}

/// Early stopping survives a resume: killed after step 5 (checkpoint at 4, one evaluation
/// without improvement so far), the resumed run stops where the uninterrupted one did.
#[test]
fn early_stopping_counters_survive_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let tweak = |t: TrainConfig| TrainConfig {
        eval_steps: Some(2),
        early_stopping_patience: Some(2),
        early_stopping_threshold: 10.0,
        ..t
    };
    let full = small_run_with(&tmp.path().join("full"), false, None, tweak);
    assert_eq!(full.len(), 6, "stops at step 6");
    let part = tmp.path().join("part");
    small_run_with(&part, false, Some(5), tweak);
    let resumed = small_run_with(&part, true, None, tweak);
    assert_eq!(resumed.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>());
    let (a, b) = (read_json(&tmp.path().join("full/summary.json")), read_json(&part.join("summary.json")));
    assert_eq!(b["stopped_early_at"], 6);
    assert_eq!((&a["best_eval_step"], &a["best_eval_loss"]), (&b["best_eval_step"], &b["best_eval_loss"]));
    for ((s, x), (_, y)) in full.iter().zip(&resumed) {
        assert!((x - y).abs() <= 1e-6, "step {s}: uninterrupted {x} vs resumed {y}");
    }
}
