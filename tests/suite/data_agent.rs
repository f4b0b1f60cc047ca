//! Reasoning and tool-calling chat rows (issue 14) against transformers' `apply_chat_template`
//! (tests/fixtures/chat/agent.json, made by scripts/reference/make_chat_fixtures.py) for the real
//! Qwen3 and Llama-3 templates, Llama 3.2's tool-calling template, and a template with
//! `{% generation %}` blocks, whose reference mask is transformers' `return_assistant_tokens_mask`;
//! also the real templates of the issue-12 families, of gpt-oss (harmony) and Mixtral (issue 11),
//! and of Qwen 3.5 / 3.6 (thinking on by default), with Qwen3's tokenizer as a stand-in.
//! The trained tokens of each case are listed here, decoded turn by turn.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use temper::data::encode::Encoder;
use temper::data::{prepare, ChatTemplate, Conversation, DataConfig, DataFormat, Example, Message, TextTokenizer};
use temper::ops::loss::IGNORE_INDEX;

use crate::common::{fixtures, shared};

struct Case {
    name: String,
    tokenizer: String,
    template: Option<String>,
    kwargs: BTreeMap<String, Value>,
    conv: Conversation,
    text: String,
    input_ids: Vec<u32>,
    assistant_masks: Option<Vec<i64>>,
    /// Turn markers added to the tokenizer as special tokens (the family's own tokenizer has them).
    added_special_tokens: BTreeMap<String, u32>,
    /// Rendered with `add_generation_prompt=True` (the fixture's field; absent: false).
    add_generation_prompt: bool,
    /// Text put before the template file (gpt-oss: a `strftime_now` macro that pins the date).
    template_prefix: Option<String>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("chat/agent.json")).expect("agent fixture");
    let v: Value = serde_json::from_str(&text).expect("fixture parses");
    let cases: Vec<Case> = v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let messages = c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    let mut fields = m.as_object().unwrap().clone();
                    let role = fields.remove("role").unwrap().as_str().unwrap().to_string();
                    Message { role, fields }
                })
                .collect();
            let mut vars = BTreeMap::new();
            if !c["tools"].is_null() {
                vars.insert("tools".to_string(), c["tools"].clone());
            }
            Case {
                name: c["name"].as_str().unwrap().into(),
                tokenizer: c["tokenizer"].as_str().unwrap().into(),
                template: c["template"].as_str().map(String::from),
                kwargs: c["kwargs"].as_object().unwrap().clone().into_iter().collect(),
                conv: Conversation { messages, vars },
                text: c["text"].as_str().unwrap().into(),
                input_ids: c["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
                assistant_masks: c["assistant_masks"]
                    .as_array()
                    .map(|m| m.iter().map(|x| x.as_i64().unwrap()).collect()),
                added_special_tokens: c["added_special_tokens"]
                    .as_object()
                    .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap() as u32)).collect())
                    .unwrap_or_default(),
                add_generation_prompt: c["add_generation_prompt"].as_bool().unwrap_or(false),
                template_prefix: c["template_prefix"].as_str().map(String::from),
            }
        })
        .collect();
    assert_eq!(cases.len(), 81, "agent fixture cases");
    cases
}

fn tokenizer(name: &str) -> TextTokenizer {
    TextTokenizer::from_dir(&shared(&format!("tokenizers/{name}"))).expect("tokenizer")
}

/// The case's tokenizer: one of ../shared, with the case's turn markers added as special tokens
/// (the ids transformers' `add_special_tokens` gave them).
fn case_tokenizer(case: &Case) -> TextTokenizer {
    if case.added_special_tokens.is_empty() {
        return tokenizer(&case.tokenizer);
    }
    let src = shared(&format!("tokenizers/{}", case.tokenizer));
    let dir = tempfile::tempdir().unwrap();
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap()).unwrap();
    // tokenizers numbers added tokens past the vocabulary in the order listed.
    let mut added: Vec<(&String, &u32)> = case.added_special_tokens.iter().collect();
    added.sort_by_key(|(_, id)| **id);
    for (content, id) in added {
        let token = serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
        json["added_tokens"].as_array_mut().unwrap().push(token);
    }
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer_config.json"), dir.path().join("tokenizer_config.json")).unwrap();
    TextTokenizer::from_dir(dir.path()).expect("tokenizer with added tokens")
}

fn template(case: &Case, tok: &TextTokenizer) -> ChatTemplate {
    let source = match &case.template {
        Some(file) => {
            let text = std::fs::read_to_string(fixtures().join("chat_templates").join(file)).expect("template file");
            Some(format!("{}{text}", case.template_prefix.as_deref().unwrap_or("")))
        }
        None => tok.chat_template.clone(),
    };
    ChatTemplate::new(source.as_deref(), tok).expect("template compiles")
}

fn encode(case: &Case, tok: &TextTokenizer, edit: impl FnOnce(&mut DataConfig)) -> Example {
    let mut cfg = DataConfig::new("unused");
    cfg.template_kwargs = case.kwargs.clone();
    edit(&mut cfg);
    let what = format!("{}/{:?}/{}", case.tokenizer, case.template, case.name);
    Encoder::new(tok, template(case, tok), &cfg).chat(&case.conv).unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

/// Runs of consecutive trained tokens (the chat tests' helper).
fn trained_runs(tok: &TextTokenizer, ex: &Example) -> Vec<String> {
    crate::data_chat::trained_runs(tok, &ex.input_ids, &ex.labels)
}

fn find<'a>(cases: &'a [Case], tok: &str, template: Option<&str>, name: &str, kwargs: &str) -> &'a Case {
    cases
        .iter()
        .find(|c| {
            c.tokenizer == tok
                && c.template.as_deref() == template
                && c.name == name
                && serde_json::to_string(&c.kwargs).unwrap() == kwargs
        })
        .unwrap_or_else(|| panic!("no case {tok}/{template:?}/{name}/{kwargs}"))
}

#[test]
fn reasoning_and_tool_rows_render_and_tokenise_as_apply_chat_template() {
    let cases = cases();
    let mut toks: BTreeMap<String, TextTokenizer> = BTreeMap::new();
    for case in &cases {
        let key = format!("{}{:?}", case.tokenizer, case.added_special_tokens);
        let tok = toks.entry(key).or_insert_with(|| case_tokenizer(case));
        let what = format!("{}/{:?}/{} {:?}", case.tokenizer, case.template, case.name, case.kwargs);
        let mut kwargs = case.kwargs.clone();
        kwargs.extend(case.conv.vars.clone());
        let text = template(case, tok)
            .render(&case.conv.messages, case.add_generation_prompt, &kwargs)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(text, case.text, "{what}: rendered text");
        if case.add_generation_prompt {
            // A prompt for generation, not a training row.
            assert_eq!(tok.encode_plain(&text).unwrap(), case.input_ids, "{what}: ids");
        } else {
            // The training path tokenises exactly as apply_chat_template(tokenize=True).
            assert_eq!(encode(case, tok, |_| {}).input_ids, case.input_ids, "{what}: ids");
        }
    }
}

const QWEN_CALL: &str = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"unit\": \"celsius\", \"city\": \"Paris\"}}\n</tool_call><|im_end|>";

/// Qwen3's template, with and without `enable_thinking: false` (which changes the generation
/// prompt only).
#[test]
fn qwen3_trains_each_assistant_turn_as_rendered_in_the_whole_conversation() {
    let cases = cases();
    let tok = tokenizer("qwen3");
    let expected: [(&str, Vec<&str>); 7] = [
        ("reasoning_single", vec!["<think>\nTwo plus two makes four.\n</think>\n\n2+2 is 4.<|im_end|>"]),
        // The template drops the reasoning of turns before the last user message: the first turn
        // is trained as rendered, without it; the last one with it.
        ("reasoning_multi_turn", vec!["2+2 is 4.<|im_end|>", "<think>\nThree and three is six.\n</think>\n\n6<|im_end|>"]),
        ("reasoning_content_field", vec!["<think>\nSmall primes: 2, 3, 5, 7.\n</think>\n\n7<|im_end|>"]),
        ("reasoning_content_multi_turn", vec!["7<|im_end|>", "<think>\n11 is prime.\n</think>\n\n11<|im_end|>"]),
        // The empty think block of the last turn is not trained (train_on_empty_think: false).
        ("tool_call", vec![QWEN_CALL, "It is 18 °C and cloudy in Paris.<|im_end|>"]),
        (
            "tool_call_reasoning_multi_step",
            vec![
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>",
                "It is 18 °C and cloudy.<|im_end|>",
                "<think>\nCloudy, no rain in the result.\n</think>\n\nNot needed, but it is cloudy.<|im_end|>",
            ],
        ),
        (
            "parallel_tool_calls",
            vec![
                "Let me check both.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>",
                "18 °C, cloudy, and it is 14:05.<|im_end|>",
            ],
        ),
    ];
    for (name, want) in &expected {
        let case = find(&cases, "qwen3", None, name, "{}");
        assert_eq!(trained_runs(&tok, &encode(case, &tok, |_| {})), *want, "{name}");
        // With enable_thinking: false the generation prompt ends with `<think>\n\n</think>\n\n`:
        // its `<think>\n` is prompt, not generated, so a turn with reasoning trains from after it.
        let case = find(&cases, "qwen3", None, name, "{\"enable_thinking\":false}");
        let want: Vec<&str> = want.iter().map(|w| w.strip_prefix("<think>\n").unwrap_or(w)).collect();
        assert_eq!(trained_runs(&tok, &encode(case, &tok, |_| {})), want, "{name} enable_thinking: false");
    }
}

#[test]
fn reasoning_tool_call_and_empty_think_options_change_exactly_their_tokens() {
    let cases = cases();
    let tok = tokenizer("qwen3");
    let runs = |name: &str, kwargs: &str, edit: fn(&mut DataConfig)| {
        trained_runs(&tok, &encode(find(&cases, "qwen3", None, name, kwargs), &tok, edit))
    };
    let no_reasoning = |c: &mut DataConfig| c.train_on_reasoning = false;
    assert_eq!(runs("reasoning_single", "{}", no_reasoning), ["2+2 is 4.<|im_end|>"]);
    assert_eq!(runs("reasoning_multi_turn", "{}", no_reasoning), ["2+2 is 4.<|im_end|>", "6<|im_end|>"]);
    assert_eq!(runs("reasoning_content_field", "{}", no_reasoning), ["7<|im_end|>"]);
    assert_eq!(
        runs("tool_call_reasoning_multi_step", "{}", no_reasoning),
        [
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>",
            "It is 18 °C and cloudy.<|im_end|>",
            "Not needed, but it is cloudy.<|im_end|>"
        ]
    );
    let no_tools = |c: &mut DataConfig| c.train_on_tool_calls = false;
    assert_eq!(runs("tool_call", "{}", no_tools), ["It is 18 °C and cloudy in Paris.<|im_end|>"]);
    assert_eq!(runs("parallel_tool_calls", "{}", no_tools), ["18 °C, cloudy, and it is 14:05.<|im_end|>"]);
    let empty_think = |c: &mut DataConfig| c.train_on_empty_think = true;
    assert_eq!(
        runs("tool_call", "{}", empty_think),
        [QWEN_CALL, "<think>\n\n</think>\n\nIt is 18 °C and cloudy in Paris.<|im_end|>"]
    );
    // With enable_thinking: false the empty block is part of the generation prompt: never trained.
    assert_eq!(
        runs("tool_call", "{\"enable_thinking\":false}", empty_think),
        [QWEN_CALL, "It is 18 °C and cloudy in Paris.<|im_end|>"]
    );
    let no_eos = |c: &mut DataConfig| c.train_on_eos = false;
    assert_eq!(runs("reasoning_content_field", "{}", no_eos), ["<think>\nSmall primes: 2, 3, 5, 7.\n</think>\n\n7"]);
}

#[test]
fn llama3_templates_train_what_they_render() {
    let cases = cases();
    let tok = tokenizer("llama3");
    let think1 = "<think>\nTwo plus two makes four.\n</think>\n\n2+2 is 4.<|eot_id|>";
    let think2 = "<think>\nThree and three is six.\n</think>\n\n6<|eot_id|>";
    let answer = "It is 18 °C and cloudy in Paris.<|eot_id|>";
    for (template, kwargs) in [(None, "{}"), (Some("llama3_2.jinja"), "{\"date_string\":\"26 Jul 2024\"}")] {
        let runs =
            |name: &str| trained_runs(&tok, &encode(find(&cases, "llama3", template, name, kwargs), &tok, |_| {}));
        // Llama 3 keeps the reasoning of every turn in the text.
        assert_eq!(runs("reasoning_single"), [think1], "{template:?}");
        assert_eq!(runs("reasoning_multi_turn"), [think1, think2], "{template:?}");
        let tool_turns = runs("tool_call");
        if template.is_none() {
            // The original Llama 3 template renders no tool calls: that turn is empty and not trained.
            assert_eq!(tool_turns, [answer]);
        } else {
            assert_eq!(tool_turns, ["{\"name\": \"get_weather\", \"parameters\": {\"unit\": \"celsius\", \"city\": \"Paris\"}}<|eot_id|>", answer]);
        }
    }
}

#[test]
fn generation_blocks_give_transformers_assistant_tokens_mask() {
    let cases = cases();
    let tok = tokenizer("llama3");
    let mut checked = 0;
    for case in cases.iter().filter(|c| c.assistant_masks.is_some()) {
        let ex = encode(case, &tok, |_| {});
        let mask: Vec<i64> = ex.labels.iter().map(|&l| i64::from(l != IGNORE_INDEX)).collect();
        assert_eq!(Some(mask), case.assistant_masks, "{}", case.name);
        checked += 1;
    }
    assert_eq!(checked, 2);
    // Blocks map to assistant messages in order, so the tool-call turn can be left out.
    let case = find(&cases, "llama3", Some("llama3_generation.jinja"), "tool_call", "{}");
    let runs = trained_runs(&tok, &encode(case, &tok, |c| c.train_on_tool_calls = false));
    assert_eq!(runs, ["It is 18 °C and cloudy in Paris.<|eot_id|>"]);
}

/// A row file of tool-calling and reasoning rows: `prepare` reads `tools` (a list, or a JSON
/// string of one) and `chat_template_kwargs` from each row, and names each bad row.
#[test]
fn tool_rows_from_a_file_and_their_bad_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases();
    let case = find(&cases, "qwen3", None, "tool_call", "{}");
    let messages = serde_json::to_value(&case.conv.messages).unwrap();
    let tools = case.conv.vars["tools"].clone();
    let good = serde_json::json!({"messages": messages, "tools": tools});
    let as_string = serde_json::json!({"messages": messages, "tools": tools.to_string(), "chat_template_kwargs": {"enable_thinking": false}});
    let f = tmp.path().join("tools.jsonl");
    std::fs::write(&f, format!("{good}\n{as_string}\n")).unwrap();
    let tok = tokenizer("qwen3");
    let mut cfg = DataConfig::new(&f);
    cfg.seq_len = 4096;
    let p = prepare(&cfg, &tok, Path::new("/"), 0).unwrap();
    assert_eq!(p.stats.format, "chat");
    assert_eq!(p.train.len(), 2);
    for ex in &p.train {
        assert_eq!(ex.input_ids, case.input_ids, "a row's tools reach the template");
    }

    let user = serde_json::json!({"role": "user", "content": "Hi"});
    let bad = [
        (
            serde_json::json!({"messages": [user, {"role": "tool", "content": "18"}, {"role": "assistant", "content": "ok"}]}),
            "messages[1]: a `tool` message must follow an assistant message with `tool_calls`",
        ),
        (
            serde_json::json!({"messages": [user, {"role": "assistant", "content": "", "tool_calls": "get_weather()"}]}),
            "messages[1].tool_calls: must be a list of tool calls, found a string",
        ),
        (
            serde_json::json!({"messages": [user, {"role": "assistant", "content": "7", "reasoning_content": ["a"]}]}),
            "`messages[1].reasoning_content` must be a string, found an array",
        ),
        (
            serde_json::json!({"messages": [user, {"role": "assistant", "content": "7"}], "tools": {"name": "f"}}),
            "`tools` must be a list, found an object",
        ),
        (
            serde_json::json!({"messages": [user, {"role": "assistant", "content": "7"}], "tools": "[{"}),
            "`tools` is a string that is not JSON",
        ),
    ];
    let mut lines = vec![good.to_string()];
    for (k, (row, reason)) in bad.iter().enumerate() {
        let one = tmp.path().join(format!("bad{k}.jsonl"));
        std::fs::write(&one, format!("{good}\n{row}\n")).unwrap();
        let e = prepare(&DataConfig { seq_len: 4096, ..DataConfig::new(&one) }, &tok, Path::new("/"), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("bad{k}.jsonl:2: ")) && e.contains(reason), "row {k}: {e}");
        lines.push(row.to_string());
    }
    let all = tmp.path().join("all.jsonl");
    std::fs::write(&all, lines.join("\n") + "\n").unwrap();
    let mut cfg = DataConfig::new(&all);
    cfg.seq_len = 4096;
    cfg.format = DataFormat::Chat;
    cfg.skip_invalid_rows = true;
    let p = prepare(&cfg, &tok, Path::new("/"), 0).unwrap();
    assert_eq!(p.stats.rows, 1);
    let skipped: Vec<(&str, usize)> = p.stats.skipped.iter().map(|(k, &v)| (k.as_str(), v)).collect();
    assert_eq!(skipped, [("bad_tool_call", 2), ("wrong_type", 3)]);
}

/// The real templates of the issue-12 families (Gemma 3's `model` turns, OLMo 2's `<|assistant|>`,
/// OLMo 3's ChatML with functions, Granite 3.3's roles, Phi-4-mini's `<|end|>`, Mistral Small
/// 3.1's `[INST]`): each assistant turn is trained with the marker that ends it, nothing else.
#[test]
fn issue_12_family_templates_train_each_assistant_turn_and_its_end() {
    let cases = cases();
    let expect: &[(&str, &str, &str, &[&str])] = &[
        ("llama3", "gemma3.jinja", "plain_multi_turn", &["2+2 is 4.<end_of_turn>", "6<end_of_turn>"]),
        ("llama3", "gemma3.jinja", "plain_no_system", &["2+2 is 4.<end_of_turn>", "6<end_of_turn>"]),
        ("llama3", "olmo2.jinja", "plain_multi_turn", &["2+2 is 4.<|end_of_text|>", "6<|end_of_text|>"]),
        ("llama3", "olmo2.jinja", "plain_no_system", &["2+2 is 4.<|end_of_text|>", "6<|end_of_text|>"]),
        ("qwen3", "olmo3.jinja", "plain_multi_turn", &["2+2 is 4.<|im_end|>", "6<|im_end|>"]),
        ("qwen3", "olmo3.jinja", "plain_no_system", &["2+2 is 4.<|im_end|>", "6<|im_end|>"]),
        ("llama3", "granite3.jinja", "plain_multi_turn", &["2+2 is 4.<|end_of_text|>", "6<|end_of_text|>"]),
        ("llama3", "phi4_mini.jinja", "plain_multi_turn", &["2+2 is 4.<|end|>", "6<|end|>"]),
        ("llama3", "phi4_mini.jinja", "plain_no_system", &["2+2 is 4.<|end|>", "6<|end|>"]),
        ("mistral", "mistral_small3_1.jinja", "plain_system_blocks", &["2+2 is 4.</s>", "6</s>"]),
        // These three templates do not render an assistant message's tool_calls: that turn renders
        // empty and trains nothing; the tool's answer is never trained.
        ("qwen3", "olmo3.jinja", "tool_call", &["It is 18 °C and cloudy in Paris.<|im_end|>"]),
        ("llama3", "granite3.jinja", "tool_call", &["It is 18 °C and cloudy in Paris.<|end_of_text|>"]),
        ("llama3", "phi4_mini.jinja", "tool_call", &["It is 18 °C and cloudy in Paris.<|end|>"]),
    ];
    for (tok_name, template, name, want) in expect {
        let case = find(&cases, tok_name, Some(template), name, "{}");
        let tok = case_tokenizer(case);
        let ex = encode(case, &tok, |_| {});
        assert_eq!(trained_runs(&tok, &ex), *want, "{template} {name}");
    }
}

fn gpt_oss_final(answer: &str, end: &str) -> String {
    format!("<|channel|>final<|message|>{answer}{end}")
}

/// gpt-oss's harmony template (openai/gpt-oss-20b): every assistant turn is trained from the end
/// of the generation prompt `<|start|>assistant`, so its channel header is trained (the model
/// writes it), through the token that ends it: `<|end|>` for earlier turns, `<|return|>` for the
/// last. The template keeps the reasoning (`thinking`, the analysis channel) of the last turn
/// only, and does not read `reasoning_content`.
#[test]
fn gpt_oss_harmony_template_trains_each_turn_with_its_channel_and_end() {
    let cases = cases();
    let (a1, a2) = (gpt_oss_final("2+2 is 4.", "<|end|>"), gpt_oss_final("6", "<|return|>"));
    let think2 = format!(
        "<|channel|>analysis<|message|>Three and three is six.<|end|><|start|>assistant{}",
        gpt_oss_final("6", "<|return|>")
    );
    let high =
        r#"{"builtin_tools":["browser","python"],"model_identity":"You are a test model.","reasoning_effort":"high"}"#;
    let expect: Vec<(&str, &str, Vec<String>)> = vec![
        ("plain_multi_turn", "{}", vec![a1.clone(), a2.clone()]),
        ("plain_no_system", "{}", vec![a1.clone(), a2.clone()]),
        ("plain_no_system", high, vec![a1.clone(), a2.clone()]),
        ("developer_message", "{}", vec![gpt_oss_final("2+2 is 4.", "<|return|>")]),
        ("thinking_multi_turn", "{}", vec![a1.clone(), think2.clone()]),
        ("reasoning_content_field", "{}", vec![gpt_oss_final("7", "<|return|>")]),
    ];
    for (name, kwargs, want) in &expect {
        let case = find(&cases, "llama3", Some("gpt_oss.jinja"), name, kwargs);
        let tok = case_tokenizer(case);
        assert_eq!(trained_runs(&tok, &encode(case, &tok, |_| {})), *want, "{name} {kwargs}");
    }
    let case = find(&cases, "llama3", Some("gpt_oss.jinja"), "thinking_multi_turn", "{}");
    let tok = case_tokenizer(case);
    let no_eos = trained_runs(&tok, &encode(case, &tok, |c| c.train_on_eos = false));
    assert_eq!(no_eos, [gpt_oss_final("2+2 is 4.", ""), think2.strip_suffix("<|return|>").unwrap().to_string()]);

    // The template as shipped, with its own clock: the fixture's text with today's date.
    let case = find(&cases, "llama3", Some("gpt_oss.jinja"), "plain_no_system", "{}");
    let source = std::fs::read_to_string(fixtures().join("chat_templates/gpt_oss.jinja")).unwrap();
    let real = ChatTemplate::new(Some(&source), &tok).expect("template compiles");
    let today = ChatTemplate::new(Some("{{ strftime_now('%Y-%m-%d') }}"), &tok)
        .unwrap()
        .render(&[], false, &BTreeMap::new())
        .unwrap();
    let text = real.render(&case.conv.messages, false, &BTreeMap::new()).unwrap();
    assert_eq!(text, case.text.replace("Current date: 2025-08-05", &format!("Current date: {today}")));
}

/// The tool-call turns of gpt-oss rows, as the model writes them after `<|start|>assistant`:
/// the recipient, the commentary channel and the arguments, through `<|call|>`.
#[test]
fn gpt_oss_tool_call_turns_are_trained() {
    let cases = cases();
    let call = |args: &str| format!(" to=functions.get_weather<|channel|>commentary json<|message|>{args}<|call|>");
    let expect: Vec<(&str, Vec<String>)> = vec![
        (
            "tool_call",
            vec![
                call(r#"{"unit": "celsius", "city": "Paris"}"#),
                gpt_oss_final("It is 18 °C and cloudy in Paris.", "<|return|>"),
            ],
        ),
        (
            "tool_call_thinking_multi_step",
            vec![
                call(r#"{"city": "Paris"}"#),
                gpt_oss_final("It is 18 °C and cloudy.", "<|end|>"),
                format!(
                    "<|channel|>analysis<|message|>Cloudy, no rain in the result.<|end|><|start|>assistant{}",
                    gpt_oss_final("Not needed, but it is cloudy.", "<|return|>")
                ),
            ],
        ),
    ];
    for (name, want) in &expect {
        let case = find(&cases, "llama3", Some("gpt_oss.jinja"), name, "{}");
        let tok = case_tokenizer(case);
        assert_eq!(trained_runs(&tok, &encode(case, &tok, |_| {})), *want, "{name}");
    }
}

/// Mixtral-8x7B-Instruct's template (Mistral's "v1" template with a system prompt): each answer
/// and its `</s>`; the system prompt is folded into the first `[INST]`, which is not trained.
#[test]
fn mixtral_template_trains_each_answer_and_its_eos() {
    let cases = cases();
    for name in ["plain_multi_turn", "plain_no_system"] {
        let case = find(&cases, "mistral", Some("mixtral_8x7b.jinja"), name, "{}");
        let tok = case_tokenizer(case);
        assert_eq!(trained_runs(&tok, &encode(case, &tok, |_| {})), ["2+2 is 4.</s>", "6</s>"], "{name}");
    }
}

const QWEN35_WEATHER_CALL: &str =
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>";

/// Qwen 3.5's template (Qwen/Qwen3.5-*, tests/fixtures/chat_templates/qwen3_5.jinja): thinking is
/// on by default, so the generation prompt is `<|im_start|>assistant\n<think>\n` and the model
/// generates from inside the think block: a turn after the last user query is trained from its
/// reasoning to its `<|im_end|>`; the empty block of a turn without reasoning (`\n</think>\n\n`
/// after the prompt) is not trained (`train_on_empty_think: false`). Turns before the last user
/// query are rendered without their reasoning and trained so. Tool calls are `<function=...>`
/// blocks with one `<parameter=...>` per argument. With `enable_thinking: false` the generation
/// prompt closes the block, and the same tokens are trained.
#[test]
fn qwen3_5_trains_each_assistant_turn_from_inside_its_think_block() {
    let cases = cases();
    let tok = tokenizer("qwen3");
    let typed_call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=hourly>\nTrue\n</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n<parameter=at>\n{\"lat\": 48.85, \"lon\": 2.35}\n</parameter>\n<parameter=fields>\n[\"temp\", \"rain\"]\n</parameter>\n</function>\n</tool_call><|im_end|>";
    let typed_reasoning = format!("The tool takes typed arguments.\n</think>\n\n{typed_call}");
    let expected: Vec<(&str, Vec<String>)> = vec![
        ("reasoning_single", vec!["Two plus two makes four.\n</think>\n\n2+2 is 4.<|im_end|>".into()]),
        ("reasoning_multi_turn", vec!["2+2 is 4.<|im_end|>".into(), "Three and three is six.\n</think>\n\n6<|im_end|>".into()]),
        ("reasoning_content_field", vec!["Small primes: 2, 3, 5, 7.\n</think>\n\n7<|im_end|>".into()]),
        ("reasoning_content_multi_turn", vec!["7<|im_end|>".into(), "11 is prime.\n</think>\n\n11<|im_end|>".into()]),
        (
            "tool_call",
            vec![
                "<tool_call>\n<function=get_weather>\n<parameter=unit>\ncelsius\n</parameter>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>".into(),
                "It is 18 °C and cloudy in Paris.<|im_end|>".into(),
            ],
        ),
        (
            "tool_call_reasoning_multi_step",
            vec![QWEN35_WEATHER_CALL.into(), "It is 18 °C and cloudy.<|im_end|>".into(), "Cloudy, no rain in the result.\n</think>\n\nNot needed, but it is cloudy.<|im_end|>".into()],
        ),
        (
            "parallel_tool_calls",
            vec![
                "Let me check both.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>".into(),
                "18 °C, cloudy, and it is 14:05.<|im_end|>".into(),
            ],
        ),
        ("plain_multi_turn", vec!["2+2 is 4.<|im_end|>".into(), "6<|im_end|>".into()]),
        ("plain_no_system", vec!["2+2 is 4.<|im_end|>".into(), "6<|im_end|>".into()]),
        // Content as a list of text parts: the template joins the parts' text.
        ("text_parts", vec!["2+2 is 4.<|im_end|>".into(), "Three and three is six.\n</think>\n\n6<|im_end|>".into()]),
        // `| string` prints Python's `True`; objects and lists go through `| tojson`.
        ("tool_call_typed_arguments", vec![typed_reasoning.clone(), "Cloudy.\n</think>\n\nCloudy, 18 °C.<|im_end|>".into()]),
    ];
    for kwargs in ["{}", "{\"enable_thinking\":false}"] {
        for (name, want) in &expected {
            let case = find(&cases, "qwen3", Some("qwen3_5.jinja"), name, kwargs);
            assert_eq!(trained_runs(&tok, &encode(case, &tok, |_| {})), *want, "{name} {kwargs}");
        }
    }
    // The generation prompt: `<think>\n` opens the block (thinking on), or an empty block closes it.
    for (kwargs, prompt) in [
        ("{}", "<|im_start|>assistant\n<think>\n"),
        ("{\"enable_thinking\":false}", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ] {
        for name in ["plain_multi_turn_open", "tool_call_reasoning_pending"] {
            let case = find(&cases, "qwen3", Some("qwen3_5.jinja"), name, kwargs);
            assert!(
                case.add_generation_prompt && case.text.ends_with(&format!("<|im_end|>\n{prompt}")),
                "{name} {kwargs}"
            );
        }
    }

    // The options act on the block the generation prompt opened.
    let runs = |name: &str, edit: fn(&mut DataConfig)| {
        trained_runs(&tok, &encode(find(&cases, "qwen3", Some("qwen3_5.jinja"), name, "{}"), &tok, edit))
    };
    let no_reasoning = |c: &mut DataConfig| c.train_on_reasoning = false;
    assert_eq!(runs("reasoning_single", no_reasoning), ["2+2 is 4.<|im_end|>"]);
    assert_eq!(runs("reasoning_multi_turn", no_reasoning), ["2+2 is 4.<|im_end|>", "6<|im_end|>"]);
    assert_eq!(runs("tool_call_typed_arguments", no_reasoning), [typed_call, "Cloudy, 18 °C.<|im_end|>"]);
    let empty_think = |c: &mut DataConfig| c.train_on_empty_think = true;
    // `<think>\n\n</think>`: the `\n\n` token holds the prompt's newline and the block's.
    assert_eq!(runs("plain_multi_turn", empty_think), ["2+2 is 4.<|im_end|>", "\n\n</think>\n\n6<|im_end|>"]);
    let no_tools = |c: &mut DataConfig| c.train_on_tool_calls = false;
    assert_eq!(
        runs("tool_call_reasoning_multi_step", no_tools),
        [
            "It is 18 °C and cloudy.<|im_end|>",
            "Cloudy, no rain in the result.\n</think>\n\nNot needed, but it is cloudy.<|im_end|>"
        ]
    );
    let no_eos = |c: &mut DataConfig| c.train_on_eos = false;
    assert_eq!(runs("reasoning_content_field", no_eos), ["Small primes: 2, 3, 5, 7.\n</think>\n\n7"]);

    // A row whose content is a list of parts is refused by the data loader, naming the row: only
    // string content is read from files (images and videos are out of scope for a text trainer).
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("parts.jsonl");
    let row = serde_json::json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Hello"}]});
    std::fs::write(&f, format!("{row}\n")).unwrap();
    let mut cfg = DataConfig::new(&f);
    cfg.seq_len = 4096;
    let e = prepare(&cfg, &tok, Path::new("/"), 0).unwrap_err().to_string();
    assert!(e.contains("parts.jsonl:1: ") && e.contains("messages[0].content"), "{e}");
}

/// Qwen 3.6's template: Qwen 3.5's with `preserve_thinking` (earlier turns keep their reasoning)
/// and every non-string tool argument printed with `| tojson` (`true`, not `True`).
#[test]
fn qwen3_6_preserve_thinking_keeps_and_trains_earlier_reasoning() {
    let cases = cases();
    let tok = tokenizer("qwen3");
    let runs = |name: &str, kwargs: &str| {
        trained_runs(&tok, &encode(find(&cases, "qwen3", Some("qwen3_6.jinja"), name, kwargs), &tok, |_| {}))
    };
    assert_eq!(
        runs("reasoning_multi_turn", "{}"),
        ["2+2 is 4.<|im_end|>", "Three and three is six.\n</think>\n\n6<|im_end|>"]
    );
    assert_eq!(
        runs("reasoning_multi_turn", "{\"preserve_thinking\":true}"),
        [
            "Two plus two makes four.\n</think>\n\n2+2 is 4.<|im_end|>",
            "Three and three is six.\n</think>\n\n6<|im_end|>"
        ]
    );
    let case = find(&cases, "qwen3", Some("qwen3_6.jinja"), "tool_call_typed_arguments", "{}");
    assert!(
        case.text.contains("<parameter=hourly>\ntrue\n</parameter>")
            && case.text.contains("<parameter=ratio>\n0.5\n</parameter>")
    );
}
