//! `temper preview` (the real binary): GSM8K through a recipe's column mapping, OpenAssistant
//! trees flattened by examples/flatten_oasst.rs, `--jsonl`, bad input.

use std::process::{Command, Output};

use serde_json::Value;

use crate::common::shared;

#[allow(dead_code)]
#[path = "../../examples/flatten_oasst.rs"]
mod flatten_oasst;

fn temper(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_temper")).args(args).output().expect("run temper")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "temper failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn gsm8k_recipe(dir: &std::path::Path) -> std::path::PathBuf {
    let recipe = dir.join("gsm8k.yaml");
    let yaml = format!(
        "base_model: {}\ndata:\n  train: {}\n  columns: {{prompt: question, completion: answer}}\n  separator: \"\\n\"\n  seq_len: 1024\n",
        shared("models/stories260K").display(),
        shared("datasets/gsm8k/train.jsonl").display()
    );
    std::fs::write(&recipe, yaml).unwrap();
    recipe
}

#[test]
fn preview_marks_the_trained_gsm8k_answer_through_the_recipe_mapping() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = gsm8k_recipe(tmp.path());
    let model = shared("models/stories260K");
    let out = temper(&["preview", "--model", model.to_str().unwrap(), "--recipe", recipe.to_str().unwrap(), "-n", "2"]);
    let text = ok(&out);
    assert_eq!(text.matches("── row").count(), 2, "{text}");
    assert!(text.contains("May?\n⟦Natalia sold 48/2 = <<48/2=24>>24 clips in May."), "{text}");
    assert!(text.contains("#### 72</s>⟧"), "{text}");
    assert!(text.contains("Natalia sold clips to 48 of her friends"), "the prompt is shown, unmarked: {text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("detected format `completion`"), "{stderr}");
}

#[test]
fn preview_jsonl_prints_input_ids_and_masked_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = gsm8k_recipe(tmp.path());
    let model = shared("models/stories260K");
    let text = ok(&temper(&["preview", "--model", model.to_str().unwrap(), "--recipe", recipe.to_str().unwrap(), "-n", "3", "--jsonl"]));
    let rows: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let (ids, labels) = (r["input_ids"].as_array().unwrap(), r["labels"].as_array().unwrap());
        assert_eq!(ids.len(), labels.len());
        assert_eq!(labels[0], -100);
        assert_eq!(labels.last(), ids.last(), "EOS trained");
    }
}

#[test]
fn oasst_trees_flatten_to_chat_that_previews_with_the_qwen3_template() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("oasst_chat.jsonl");
    let (trees, convs) = flatten_oasst::run(&shared("datasets/oasst/en_100_tree.jsonl"), &out).unwrap();
    assert_eq!(trees, 100);
    assert!(convs >= 100, "{convs} conversations");
    let text = std::fs::read_to_string(&out).unwrap();
    let source = std::fs::read_to_string(shared("datasets/oasst/en_100_tree.jsonl")).unwrap();
    let synthetic_root: Value = serde_json::from_str(source.lines().next().unwrap()).unwrap();
    let synthetic_text = synthetic_root["prompt"]["text"].as_str().unwrap();
    assert!(!text.contains(&serde_json::to_string(synthetic_text).unwrap()[1..40]), "synthetic rows are dropped");
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let msgs = v["messages"].as_array().unwrap();
        assert_eq!(msgs.first().unwrap()["role"], "user");
        assert_eq!(msgs.last().unwrap()["role"], "assistant");
    }
    let tok = shared("tokenizers/qwen3");
    let shown = temper(&["preview", "--model", tok.to_str().unwrap(), "--data", out.to_str().unwrap(), "-n", "2"]);
    let shown_text = ok(&shown);
    assert!(shown_text.contains("<|im_start|>user\n") && shown_text.contains("<|im_end|>⟧"), "{shown_text}");
    assert!(String::from_utf8_lossy(&shown.stderr).contains("detected format `chat`"));
}

#[test]
fn preview_of_a_bad_row_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"robot\", \"content\": \"x\"}]}\n").unwrap();
    let model = shared("models/stories260K");
    let out = temper(&["preview", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--format", "chat"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("bad.jsonl:1") && stderr.contains("unknown role `robot`"), "{stderr}");
}
