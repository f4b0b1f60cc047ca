//! Chat templates and assistant-only masking against transformers' `apply_chat_template` for the
//! real Llama-3 and Qwen3 tokenizers (tests/fixtures/chat, made by
//! scripts/reference/make_chat_fixtures.py).

use std::collections::BTreeMap;

use serde_json::Value;
use temper::data::encode::Encoder;
use temper::data::record::Conversation;
use temper::data::{ChatTemplate, DataConfig, Message, TextTokenizer};
use temper::ops::loss::IGNORE_INDEX;

use crate::common::{fixtures, shared};

fn cases(name: &str) -> (TextTokenizer, Vec<Value>) {
    let text = std::fs::read_to_string(fixtures().join(format!("chat/{name}.json"))).expect("chat fixture");
    let v: Value = serde_json::from_str(&text).expect("fixture parses");
    let tok = TextTokenizer::from_dir(&shared(&format!("tokenizers/{name}"))).expect("tokenizer");
    (tok, v["chat"].as_array().expect("chat cases").clone())
}

fn messages(case: &Value) -> Vec<Message> {
    case["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn kwargs(case: &Value) -> BTreeMap<String, Value> {
    case["kwargs"].as_object().map(|o| o.clone().into_iter().collect()).unwrap_or_default()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check_rendering(name: &str) {
    let (tok, cases) = cases(name);
    let template = ChatTemplate::new(tok.chat_template.as_deref(), &tok).expect("template compiles");
    assert!(cases.len() >= 8, "{name}: fixture has {} cases", cases.len());
    for case in &cases {
        let what = format!("{name}/{} agp={} {:?}", case["name"], case["add_generation_prompt"], case["kwargs"]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(&messages(case), agp, &kwargs(case)).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(text, case["text"].as_str().unwrap(), "{what}: rendered text");
        assert_eq!(tok.encode_plain(&text).unwrap(), ids(&case["input_ids"]), "{what}: token ids");
    }
}

#[test]
fn llama3_chat_template_matches_transformers_text_and_ids() {
    check_rendering("llama3");
}

#[test]
fn qwen3_chat_template_matches_transformers_text_and_ids_with_enable_thinking() {
    check_rendering("qwen3");
}

/// Runs of consecutive trained tokens, decoded with special tokens kept.
pub fn trained_runs(tok: &TextTokenizer, input_ids: &[u32], labels: &[i64]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (&id, &l) in input_ids.iter().zip(labels) {
        if l != IGNORE_INDEX {
            assert_eq!(l, id as i64, "a trained label equals its input id");
            cur.push(id);
        } else if !cur.is_empty() {
            runs.push(tok.decode_with_special(&std::mem::take(&mut cur)).unwrap());
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode_with_special(&cur).unwrap());
    }
    runs
}

fn check_masking(name: &str, eot: &str, trims: bool) {
    let (tok, cases) = cases(name);
    let mut checked = 0;
    for case in cases.iter().filter(|c| !c["add_generation_prompt"].as_bool().unwrap()) {
        let what = format!("{name}/{} {:?}", case["name"], case["kwargs"]);
        let msgs = messages(case);
        let mut cfg = DataConfig::new("unused");
        cfg.template_kwargs = kwargs(case);
        let template = ChatTemplate::new(tok.chat_template.as_deref(), &tok).unwrap();
        let ex = Encoder::new(&tok, template, &cfg)
            .chat(&Conversation::new(msgs.clone()))
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        // The training path tokenises exactly as apply_chat_template(tokenize=True).
        assert_eq!(ex.input_ids, ids(&case["input_ids"]), "{what}: ids");
        let want: Vec<String> = msgs
            .iter()
            .filter(|m| m.role == "assistant")
            .map(|m| format!("{}{eot}", if trims { m.content().trim() } else { m.content() }))
            .collect();
        assert_eq!(trained_runs(&tok, &ex.input_ids, &ex.labels), want, "{what}: trained tokens");
        checked += usize::from(!want.is_empty());
    }
    assert!(checked >= 2, "{name}: only {checked} cases with assistant turns");
}

#[test]
fn llama3_masking_trains_each_assistant_content_and_eot_only() {
    check_masking("llama3", "<|eot_id|>", true);
}

#[test]
fn qwen3_masking_trains_each_assistant_content_and_im_end_only() {
    check_masking("qwen3", "<|im_end|>", false);
}

#[test]
fn train_on_inputs_trains_every_chat_token_and_train_on_eos_false_drops_eot() {
    let (tok, cases) = cases("qwen3");
    let case = cases
        .iter()
        .find(|c| c["name"] == "multi_turn" && c["kwargs"].as_object().is_none_or(|o| o.is_empty()))
        .unwrap();
    let msgs = messages(case);
    let mut cfg = DataConfig::new("unused");
    cfg.train_on_inputs = true;
    let t = || ChatTemplate::new(tok.chat_template.as_deref(), &tok).unwrap();
    let ex = Encoder::new(&tok, t(), &cfg).chat(&Conversation::new(msgs.clone())).unwrap();
    assert!(ex.labels.iter().all(|&l| l != IGNORE_INDEX));
    cfg.train_on_inputs = false;
    cfg.train_on_eos = false;
    let ex = Encoder::new(&tok, t(), &cfg).chat(&Conversation::new(msgs.clone())).unwrap();
    let runs = trained_runs(&tok, &ex.input_ids, &ex.labels);
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| !r.contains("<|im_end|>")), "{runs:?}");
}

#[test]
fn recipe_template_override_replaces_the_tokenizers() {
    let (tok, _) = cases("qwen3");
    let t = ChatTemplate::new(Some("{% for m in messages %}[{{ m.role }}]{{ m.content | trim }}{% endfor %}"), &tok)
        .unwrap();
    let text = t.render(&[Message::new("user", " hi ")], false, &BTreeMap::new()).unwrap();
    assert_eq!(text, "[user]hi");
    let err = t.render(&[], false, &BTreeMap::new()).map(|_| ());
    assert!(err.is_ok());
    let raising = ChatTemplate::new(Some("{{ raise_exception('roles must alternate') }}"), &tok).unwrap();
    let e = raising.render(&[], false, &BTreeMap::new()).unwrap_err();
    assert!(e.contains("roles must alternate"), "{e}");
}
