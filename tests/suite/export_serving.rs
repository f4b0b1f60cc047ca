//! The servability checks (`temper::export::serving`, the rules vLLM, llama.cpp and mistral.rs
//! apply when loading an adapter, listed with their sources there): adapters Temper writes pass
//! them, and an adapter that breaks each rule is caught by exactly the servers that refuse it.

use std::path::Path;

use serde_json::Value;
use temper::export::serving::{check_adapter, ServingBase, Verdict};
use temper::export::{Adapter, HostTensor, LoraPair, WriteMode};
use temper::lora::{extract_adapter, inject, module_names, projections_mut, LoraConfig, LoraInit, TargetModules};
use temper::model::{load_model, DecoderConfig, WeightPrecision};

use crate::common::{fixtures, Cpu};

fn verdicts(dir: &Path, base: &str) -> Vec<Verdict> {
    let base = ServingBase::from_model_dir(&fixtures().join("models").join(base)).unwrap();
    check_adapter(dir, Some(&base)).unwrap()
}

/// (server, broken rule ids) of every verdict.
fn broken(v: &[Verdict]) -> Vec<(&'static str, Vec<&'static str>)> {
    v.iter()
        .map(|v| {
            (v.server, {
                let mut r = v.rules();
                r.dedup();
                r
            })
        })
        .collect()
}

#[test]
fn module_names_from_the_config_are_the_loaded_models_projections() {
    for name in ["llama", "phi3", "gemma3_vlm", "qwen2"] {
        let dir = fixtures().join("models").join(name);
        let mut model = load_model::<Cpu>(&dir, WeightPrecision::F32, &Default::default()).unwrap().model;
        let (_, cfg) = DecoderConfig::from_model_dir(&dir).unwrap();
        let walked: Vec<String> = projections_mut(&mut model).into_iter().map(|(n, _)| n).collect();
        assert_eq!(module_names(&cfg), walked, "{name}");
    }
}

#[test]
fn written_adapters_pass_every_servers_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let device = Default::default();
    let mut model = load_model::<Cpu>(&fixtures().join("models/llama"), WeightPrecision::F32, &device).unwrap().model;
    let cfg = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        init_lora_weights: LoraInit::Flag(false),
        ..LoraConfig::default()
    };
    inject(&mut model, &cfg, 3).unwrap();
    let dir = tmp.path().join("fresh");
    extract_adapter(&mut model, &cfg, "models/llama").unwrap().write(&dir, WriteMode::Refuse, &[]).unwrap();
    let v = verdicts(&dir, "llama");
    assert!(v.iter().all(Verdict::ok), "{v:#?}");
    let lines: Vec<String> = v.iter().map(ToString::to_string).collect();
    assert_eq!(lines, ["vLLM: ok", "llama.cpp: ok [as the GGUF of `temper export --format gguf`]", "mistral.rs: ok"]);
    // Rank 32: vLLM takes it when started with a larger --max-lora-rank than its default 16.
    let mut model = load_model::<Cpu>(&fixtures().join("models/qwen2"), WeightPrecision::F32, &device).unwrap().model;
    let cfg = LoraConfig { r: 32, lora_alpha: 16.0, use_rslora: true, ..LoraConfig::default() };
    inject(&mut model, &cfg, 3).unwrap();
    let dir = tmp.path().join("r32");
    extract_adapter(&mut model, &cfg, "models/qwen2").unwrap().write(&dir, WriteMode::Refuse, &[]).unwrap();
    let v = verdicts(&dir, "qwen2");
    assert!(v.iter().all(Verdict::ok), "{v:#?}");
    assert_eq!(v[0].to_string(), "vLLM: ok [start vLLM with --max-lora-rank 32]");
    assert!(v[1].to_string().contains("convert_lora_to_gguf.py would under-scale"), "{}", v[1]);
}

/// Copy the llama PEFT fixture as Temper writes it, apply `edit` to its config and `tensors` to
/// its tensors, and return the verdicts.
fn broken_adapter(edit: impl FnOnce(&mut Value), tensors: impl FnOnce(&mut Adapter)) -> Vec<Verdict> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let mut adapter = Adapter::read(&fixtures().join("peft/llama/adapter")).unwrap();
    tensors(&mut adapter);
    adapter.write(&dir, WriteMode::Refuse, &[]).unwrap();
    let path = dir.join("adapter_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
    verdicts(&dir, "llama")
}

#[test]
fn each_broken_rule_is_reported_by_the_servers_that_refuse_it() {
    use serde_json::json;
    let none = |_: &mut Adapter| {};
    // (what is broken, the verdicts, the rules that vLLM, llama.cpp and mistral.rs report)
    type Case<'a> = (&'a str, Vec<Verdict>, [Vec<&'a str>; 3]);
    let cases: Vec<Case> = vec![
        ("DoRA", broken_adapter(|c| c["use_dora"] = json!(true), none), [vec!["V3"], vec!["L3"], vec!["M1"]]),
        ("bias", broken_adapter(|c| c["bias"] = json!("all"), none), [vec!["V4"], vec!["L3"], vec!["M1"]]),
        (
            "modules_to_save",
            broken_adapter(|c| c["modules_to_save"] = json!(["lm_head"]), none),
            [vec!["V2"], vec!["L3"], vec!["M1"]],
        ),
        ("peft_type", broken_adapter(|c| c["peft_type"] = json!("LOHA"), none), [vec![], vec![], vec!["M1"]]),
        (
            "layer_replication",
            broken_adapter(|c| c["layer_replication"] = json!([[0, 1]]), none),
            [vec![], vec![], vec!["M1"]],
        ),
        ("pissa init", broken_adapter(|c| c["init_lora_weights"] = json!("pissa"), none), [vec![], vec![], vec!["M2"]]),
        (
            "no lora_alpha",
            broken_adapter(
                |c| {
                    c.as_object_mut().unwrap().remove("lora_alpha");
                },
                none,
            ),
            [vec!["V1"], vec![], vec!["M3"]],
        ),
        (
            "target_modules too narrow",
            broken_adapter(|c| c["target_modules"] = json!(["q_proj"]), none),
            [vec![], vec![], vec!["M4"]],
        ),
        (
            "target_modules regex",
            broken_adapter(|c| c["target_modules"] = json!(".*proj"), none),
            [vec![], vec![], vec!["M4"]],
        ),
        (
            "alpha_pattern",
            broken_adapter(|c| c["alpha_pattern"] = json!({"o_proj": 4}), none),
            [vec!["V8"], vec![], vec![]],
        ),
        (
            "rank 640",
            broken_adapter(|c| c["r"] = json!(640), |a| resize_rank(a, 640)),
            [vec!["V5"], vec![], vec!["M8"]],
        ),
        ("rank in config != tensors", broken_adapter(|c| c["r"] = json!(2), none), [vec![], vec![], vec!["M6"]]),
        (
            "lm_head",
            broken_adapter(
                |c| {
                    c["target_modules"] =
                        json!(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])
                },
                add_lm_head,
            ),
            [vec![], vec![], vec!["M5"]],
        ),
        (
            "unknown module",
            broken_adapter(
                |c| {
                    c["target_modules"] =
                        json!(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc9"])
                },
                add_unknown_module,
            ),
            [vec!["V7"], vec!["L2"], vec!["M7"]],
        ),
    ];
    for (what, v, [vllm, llama, mistral]) in cases {
        assert_eq!(broken(&v), vec![("vLLM", vllm), ("llama.cpp", llama), ("mistral.rs", mistral)], "{what}: {v:#?}");
        for verdict in v.iter().filter(|v| !v.ok()) {
            assert!(
                verdict.to_string().starts_with(&format!("{}: refuses or misserves: ", verdict.server)),
                "{verdict}"
            );
        }
    }
}

fn pair(r: usize, d_in: usize, d_out: usize) -> LoraPair {
    LoraPair {
        a: HostTensor { shape: vec![r, d_in], data: vec![0.01; r * d_in] },
        b: HostTensor { shape: vec![d_out, r], data: vec![0.01; d_out * r] },
    }
}

fn resize_rank(a: &mut Adapter, r: usize) {
    for p in a.modules.values_mut() {
        *p = pair(r, p.a.shape[1], p.b.shape[0]);
    }
}

fn add_lm_head(a: &mut Adapter) {
    let r = a.config.r;
    a.modules.insert("lm_head".into(), pair(r, 48, 512));
}

fn add_unknown_module(a: &mut Adapter) {
    let r = a.config.r;
    a.modules.insert("model.layers.0.mlp.fc9".into(), pair(r, 48, 48));
}

/// A vision-language model's adapter: vLLM takes the regex target, mistral.rs reads names only,
/// and temper export has no GGUF mapping for the vision-language architectures.
#[test]
fn vision_language_adapters_are_vllm_only() {
    let v = verdicts(&fixtures().join("temper_export/gemma3_vlm/adapter"), "gemma3_vlm");
    assert_eq!(broken(&v), vec![("vLLM", vec![]), ("llama.cpp", vec!["L1"]), ("mistral.rs", vec!["M4"])], "{v:#?}");
}

// ---- Ollama ---------------------------------------------------------------------------------

/// The chat format is recognised from the real templates, and each gets Ollama's turn markers.
#[test]
fn modelfile_translates_known_chat_formats_and_keeps_the_base_template_otherwise() {
    use temper::export::gguf::GgufType;
    use temper::export::ollama::{modelfile, ChatFormat, OllamaOptions};
    let shared_template = |tok: &str| {
        temper::data::TextTokenizer::from_dir(&crate::common::shared(&format!("tokenizers/{tok}")))
            .unwrap()
            .chat_template
            .unwrap()
    };
    let file = |name: &str| std::fs::read_to_string(fixtures().join("chat_templates").join(name)).unwrap();
    let cases = [
        (shared_template("llama3"), Some(ChatFormat::Llama3)),
        (file("llama3_2.jinja"), Some(ChatFormat::Llama3)),
        (shared_template("qwen3"), Some(ChatFormat::ChatMl)),
        (file("olmo3.jinja"), None),
        (file("gemma3.jinja"), Some(ChatFormat::Gemma)),
        (file("phi4_mini.jinja"), Some(ChatFormat::Phi { newline: false })),
        (file("mistral_small3_1.jinja"), Some(ChatFormat::Mistral)),
        (file("olmo2.jinja"), None),
        (file("granite3.jinja"), None),
    ];
    for (template, want) in &cases {
        assert_eq!(ChatFormat::detect(template), *want, "{}", &template[..60.min(template.len())]);
    }
    let opts = OllamaOptions {
        from: "llama3.2:1b",
        chat_template: Some(&cases[0].0),
        eos_token: Some("<|end_of_text|>"),
        gguf_type: GgufType::F32,
    };
    let (text, format) = modelfile(&opts);
    assert_eq!(format, Some(ChatFormat::Llama3));
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines[..2], ["FROM llama3.2:1b", "ADAPTER ./adapter.gguf"]);
    assert!(text.contains("TEMPLATE \"\"\"{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"), "{text}");
    let stops: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("PARAMETER stop ")).collect();
    assert_eq!(stops, ["\"<|eot_id|>\"", "\"<|start_header_id|>\"", "\"<|end_of_text|>\""]);
    // Unknown format: no TEMPLATE (Ollama keeps the base model's), the eos token still stops.
    let opts = OllamaOptions { chat_template: Some(&cases[7].0), eos_token: Some("<|endoftext|>"), ..opts };
    let (text, format) = modelfile(&opts);
    assert!(
        format.is_none()
            && !text.lines().any(|l| l.starts_with("TEMPLATE"))
            && text.contains("PARAMETER stop \"<|endoftext|>\""),
        "{text}"
    );
}

/// `temper export --format ollama`: the folder holds the same GGUF as `--format gguf` and a
/// Modelfile from the base's chat template; the servability lines follow; bad input is refused
/// with nothing written.
#[test]
fn ollama_export_writes_the_gguf_and_a_modelfile() {
    let tmp = tempfile::tempdir().unwrap();
    // The llama fixture with the Llama-3 tokenizer's files (only the chat template is read).
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("models/llama").join(f), base.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(crate::common::shared("tokenizers/llama3").join(f), base.join(f)).unwrap();
    }
    let adapter = fixtures().join("peft/llama/adapter");
    let run = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_temper")).args(args).output().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = tmp.path().join("ollama");
    let o = run(&[
        "export",
        "--adapter",
        &s(&adapter),
        "--format",
        "ollama",
        "--base",
        "llama3.2:1b",
        "--model",
        &s(&base),
        "--out",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("serving      vLLM: ok")
            && stdout.contains("serving      llama.cpp: ok")
            && stdout.contains("serving      mistral.rs: ok"),
        "{stdout}"
    );
    let gguf = tmp.path().join("a.gguf");
    let o = run(&["export", "--adapter", &s(&adapter), "--format", "gguf", "--base", &s(&base), "--out", &s(&gguf)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(out.join("adapter.gguf")).unwrap(), std::fs::read(&gguf).unwrap());
    let modelfile = std::fs::read_to_string(out.join("Modelfile")).unwrap();
    assert!(
        modelfile.contains("FROM llama3.2:1b\nADAPTER ./adapter.gguf\nTEMPLATE \"\"\"")
            && modelfile.contains("PARAMETER stop \"<|eot_id|>\""),
        "{modelfile}"
    );
    // A base GGUF file is named by its absolute path.
    let out2 = tmp.path().join("ollama2");
    let o = run(&[
        "export",
        "--adapter",
        &s(&adapter),
        "--format",
        "ollama",
        "--base",
        &s(&gguf),
        "--model",
        &s(&base),
        "--out",
        &s(&out2),
    ]);
    assert!(o.status.success());
    assert!(std::fs::read_to_string(out2.join("Modelfile"))
        .unwrap()
        .contains(&format!("FROM {}\n", gguf.canonicalize().unwrap().display())));
    // Refused: no --base; an existing --out without --force; nothing new is left behind.
    let before = std::fs::read_dir(tmp.path()).unwrap().count();
    let o = run(&[
        "export",
        "--adapter",
        &s(&adapter),
        "--format",
        "ollama",
        "--model",
        &s(&base),
        "--out",
        &s(&tmp.path().join("x")),
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--format ollama needs --base"));
    let o = run(&[
        "export",
        "--adapter",
        &s(&adapter),
        "--format",
        "ollama",
        "--base",
        "m",
        "--model",
        &s(&base),
        "--out",
        &s(&out),
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already exists"));
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), before);
}
