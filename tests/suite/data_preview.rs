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
    let text = ok(&temper(&[
        "preview",
        "--model",
        model.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "-n",
        "3",
        "--jsonl",
    ]));
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
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"robot\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let model = shared("models/stories260K");
    let out =
        temper(&["preview", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--format", "chat"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("bad.jsonl:1") && stderr.contains("unknown role `robot`"),
        "{stderr}"
    );
}

#[test]
fn preview_shows_reasoning_and_tool_turns_under_the_recipes_options() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("agent.jsonl");
    let rows = [
        serde_json::json!({"messages": [
            {"role": "user", "content": "What is the largest prime below 8?"},
            {"role": "assistant", "reasoning_content": "Small primes: 2, 3, 5, 7.", "content": "7"}]}),
        serde_json::json!({"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}], "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "18 C"},
            {"role": "assistant", "content": "It is 18 C."}]}),
    ];
    std::fs::write(&data, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let tok = shared("tokenizers/qwen3");
    let preview = |options: &str| {
        let recipe = tmp.path().join("r.yaml");
        std::fs::write(&recipe, format!("base_model: {}\ndata:\n  train: agent.jsonl\n{options}", tok.display()))
            .unwrap();
        ok(&temper(&["preview", "--model", tok.to_str().unwrap(), "--recipe", recipe.to_str().unwrap(), "-n", "2"]))
    };
    let shown = preview("");
    assert!(shown.contains("chat: assistant turns as the template renders them; reasoning trained, tool-call turns trained, empty think blocks not trained"), "{shown}");
    assert!(
        shown.contains("<|im_start|>assistant\n⟦<think>\nSmall primes: 2, 3, 5, 7.\n</think>\n\n7<|im_end|>⟧"),
        "{shown}"
    );
    assert!(shown.contains("<|im_start|>assistant\n⟦<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>⟧"), "{shown}");
    assert!(shown.contains("<|im_start|>assistant\n<think>\n\n</think>\n\n⟦It is 18 C.<|im_end|>⟧"), "{shown}");
    let shown = preview("  train_on_reasoning: false\n  train_on_tool_calls: false\n");
    assert!(shown.contains("reasoning not trained, tool-call turns not trained"), "{shown}");
    assert!(shown.contains("<think>\nSmall primes: 2, 3, 5, 7.\n</think>\n\n⟦7<|im_end|>⟧"), "{shown}");
    assert!(shown.contains("<|im_start|>assistant\n<tool_call>") && !shown.contains("⟦<tool_call>"), "{shown}");
    let recipe = tmp.path().join("bad.yaml");
    std::fs::write(
        &recipe,
        format!("base_model: {}\ndata:\n  train: agent.jsonl\n  train_on_reasonings: false\n", tok.display()),
    )
    .unwrap();
    let out = temper(&["preview", "--model", tok.to_str().unwrap(), "--recipe", recipe.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("train_on_reasonings"), "{stderr}");
}
