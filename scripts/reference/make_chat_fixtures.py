#!/usr/bin/env python
"""Phase 3: chat-template and plain tokenizer encodings (make_fixtures.py runs it too).

    python scripts/reference/make_chat_fixtures.py

tests/fixtures/chat/<tok>.json = {
  "tokenizer": "shared/tokenizers/<tok>", "class": ..., "notes": [...],
  "chat": [{"name", "messages", "add_generation_prompt", "kwargs", "text", "input_ids"}],
  "encodings": [{"text", "ids", "ids_no_special", "tokens", "decoded"}]
}
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FIXTURES, REPO_ROOT, STORIES260K, TOKENIZERS, rel, setup_determinism, update_manifest, write_json  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
U1 = {"role": "user", "content": "Hello! What is 2+2?"}
A1 = {"role": "assistant", "content": "2+2 is 4."}
U2 = {"role": "user", "content": "And 3+3?  Answer briefly.\n"}
A2 = {"role": "assistant", "content": "6"}

CONVERSATIONS = {
    "single_user": [U1],
    "system_user_assistant": [SYSTEM, U1, A1],
    "multi_turn": [SYSTEM, U1, A1, U2, A2],
    "multi_turn_open": [SYSTEM, U1, A1, U2],
}

TEXTS = [
    "Hello, world!",
    "Once upon a time, there was a little girl named Lily.",
    "",
    " ",
    " leading space",
    "trailing space ",
    "multiple   spaces  inside",
    "tabs\tand\nnewlines\n\nend",
    "\n\n\n",
    "café naïve résumé Ünïcödé",
    "emoji 🦀🔥 and 👍🏽",
    "你好，世界。こんにちは",
    "Здравствуйте, мир!",
    "numbers 1234567890 3.14159 -42",
    'code: fn main() { println!("hi"); }',
    "don't won't it's I'm",
]

SPECIAL_IN_TEXT = {
    "llama3": "<|begin_of_text|>hi<|eot_id|>",
    "qwen3": "<|im_start|>user\nhi<|im_end|>",
    "llama2": "<s>hi</s>",
    "mistral": "<s>[INST] hi [/INST]",
    "stories260K": "<s>hi</s>",
}


def encodings(tok, name: str):
    out = []
    for text in TEXTS + [SPECIAL_IN_TEXT[name]]:
        ids = tok(text)["input_ids"]
        out.append(
            {
                "text": text,
                "ids": ids,
                "ids_no_special": tok(text, add_special_tokens=False)["input_ids"],
                "tokens": tok.convert_ids_to_tokens(ids),
                "decoded": tok.decode(ids, skip_special_tokens=True),
            }
        )
    return out


def chat_cases(tok, name: str):
    cases = []
    variants = [{}]
    if name == "qwen3":
        variants.append({"enable_thinking": False})
    for kwargs in variants:
        for conv_name, messages in CONVERSATIONS.items():
            for agp in (False, True):
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp, **kwargs)
                ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=agp, **kwargs)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                ids = [int(i) for i in ids]
                assert ids == tok(text, add_special_tokens=False)["input_ids"], (name, conv_name)
                cases.append(
                    {
                        "name": conv_name,
                        "messages": messages,
                        "add_generation_prompt": agp,
                        "kwargs": kwargs,
                        "text": text,
                        "input_ids": ids,
                    }
                )
    return cases


# Reasoning and tool-calling conversations (issue 14): tests/fixtures/chat/agent.json.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        # Keys deliberately not in sorted order: templates print tools with tojson, which keeps
        # the row's key order (Python dicts), so the Rust side must too.
        "parameters": {
            "type": "object",
            "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}, "city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "Local time in a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


U_PRIME = {"role": "user", "content": "What is the largest prime below 8?"}
U_WEATHER = {"role": "user", "content": "What's the weather in Paris?"}
U_THANKS = {"role": "user", "content": "Thanks! And should I take an umbrella?"}
TOOL_RESULT = {"role": "tool", "content": '{"temperature": 18, "condition": "cloudy"}'}

AGENT = {
    "reasoning_single": [U1, {"role": "assistant", "content": "<think>\nTwo plus two makes four.\n</think>\n\n2+2 is 4."}],
    "reasoning_multi_turn": [
        SYSTEM,
        U1,
        {"role": "assistant", "content": "<think>\nTwo plus two makes four.\n</think>\n\n2+2 is 4."},
        U2,
        {"role": "assistant", "content": "<think>\nThree and three is six.\n</think>\n\n6"},
    ],
    "reasoning_content_field": [U_PRIME, {"role": "assistant", "reasoning_content": "Small primes: 2, 3, 5, 7.", "content": "7"}],
    "reasoning_content_multi_turn": [
        U_PRIME,
        {"role": "assistant", "reasoning_content": "Small primes: 2, 3, 5, 7.", "content": "7"},
        {"role": "user", "content": "And below 12?"},
        {"role": "assistant", "reasoning_content": "11 is prime.", "content": "11"},
    ],
    "tool_call": [
        SYSTEM,
        U_WEATHER,
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", unit="celsius", city="Paris")]},
        dict(TOOL_RESULT, tool_call_id="call_1", name="get_weather"),
        {"role": "assistant", "content": "It is 18 °C and cloudy in Paris."},
    ],
    "tool_call_reasoning_multi_step": [
        U_WEATHER,
        {"role": "assistant", "reasoning_content": "I need the weather tool.", "content": "", "tool_calls": [call("get_weather", city="Paris")]},
        TOOL_RESULT,
        {"role": "assistant", "reasoning_content": "18 and cloudy.", "content": "It is 18 °C and cloudy."},
        U_THANKS,
        {"role": "assistant", "reasoning_content": "Cloudy, no rain in the result.", "content": "Not needed, but it is cloudy."},
    ],
    "parallel_tool_calls": [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "Let me check both.", "tool_calls": [call("get_weather", city="Paris"), call("get_time", city="Paris")]},
        TOOL_RESULT,
        {"role": "tool", "content": "14:05"},
        {"role": "assistant", "content": "18 °C, cloudy, and it is 14:05."},
    ],
}

# The issue-14 conversations (the Qwen3 run renders each of them).
ISSUE_14_CASES = list(AGENT)

# Plain conversations for the issue-12 families' templates.
AGENT["plain_multi_turn"] = [SYSTEM, U1, A1, U2, A2]
AGENT["plain_no_system"] = [U1, A1, U2, A2]
# Mistral Small 3.1's template reads the system content as a list of text blocks only.
AGENT["plain_system_blocks"] = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]}, U1, A1, U2, A2]

# Issue 11 (gpt-oss's harmony template, Mixtral). gpt-oss reads reasoning from `thinking` (the
# analysis channel), renders a `system` or `developer` first message as the developer message,
# and takes one tool call per assistant message.
AGENT["plain_multi_turn_open"] = [SYSTEM, U1, A1, U2]
AGENT["developer_message"] = [{"role": "developer", "content": "Answer in one short sentence."}, U1, A1]
AGENT["thinking_multi_turn"] = [
    SYSTEM,
    U1,
    {"role": "assistant", "thinking": "Two plus two makes four.", "content": "2+2 is 4."},
    U2,
    {"role": "assistant", "thinking": "Three and three is six.", "content": "6"},
]
AGENT["tool_call_thinking_multi_step"] = [
    U_WEATHER,
    {"role": "assistant", "content": "", "thinking": "I need the weather tool.", "tool_calls": [call("get_weather", city="Paris")]},
    TOOL_RESULT,
    {"role": "assistant", "thinking": "18 and cloudy.", "content": "It is 18 °C and cloudy."},
    U_THANKS,
    {"role": "assistant", "thinking": "Cloudy, no rain in the result.", "content": "Not needed, but it is cloudy."},
]
# A tool call still waiting for its answer: its analysis message is kept, then the prompt.
AGENT["tool_call_pending"] = [
    SYSTEM,
    U_WEATHER,
    {"role": "assistant", "content": "", "thinking": "I need the weather tool.", "tool_calls": [call("get_weather", city="Paris")]},
    TOOL_RESULT,
]
# Qwen 3.5 / 3.6 (tests/fixtures/chat_templates/qwen3_5.jinja, qwen3_6.jinja): content given as a
# list of text parts (the template joins their text; image / video parts are out of scope for a
# text trainer), and tool calls whose arguments are not all strings (the template prints strings
# and numbers with `| string`, objects and lists with `| tojson`; Qwen 3.6 prints every non-string
# with `| tojson`).
AGENT["text_parts"] = [
    {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
    {"role": "user", "content": [{"type": "text", "text": "Hello! "}, {"type": "text", "text": "What is 2+2?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "2+2 is 4."}]},
    U2,
    {"role": "assistant", "content": [{"type": "text", "text": "<think>\nThree and three is six.\n</think>\n\n"}, {"type": "text", "text": "6"}]},
]
AGENT["tool_call_typed_arguments"] = [
    SYSTEM,
    {"role": "user", "content": "Hourly weather in Paris for 3 days?"},
    {
        "role": "assistant",
        "reasoning_content": "The tool takes typed arguments.",
        "content": "",
        "tool_calls": [call("get_weather", city="Paris", days=3, hourly=True, ratio=0.5, at={"lat": 48.85, "lon": 2.35}, fields=["temp", "rain"])],
    },
    dict(TOOL_RESULT, tool_call_id="call_1", name="get_weather"),
    {"role": "assistant", "reasoning_content": "Cloudy.", "content": "Cloudy, 18 °C."},
]
AGENT["tool_call_reasoning_pending"] = [
    SYSTEM,
    U_WEATHER,
    {"role": "assistant", "reasoning_content": "I need the weather tool.", "content": "", "tool_calls": [call("get_weather", city="Paris")]},
    TOOL_RESULT,
]
QWEN3_5_CASES = ISSUE_14_CASES + [
    "plain_multi_turn",
    "plain_no_system",
    "plain_multi_turn_open",
    "text_parts",
    "tool_call_typed_arguments",
    "tool_call_reasoning_pending",
]

# Rendered with add_generation_prompt=True (every other case: False).
GENERATION_PROMPT_CASES = {"plain_multi_turn_open", "tool_call_pending", "tool_call_reasoning_pending"}

GPT_OSS_CASES = [
    "plain_multi_turn",
    "plain_no_system",
    "plain_multi_turn_open",
    "developer_message",
    "thinking_multi_turn",
    "reasoning_content_field",
    "tool_call",
    "tool_call_thinking_multi_step",
    "tool_call_pending",
    "parallel_tool_calls",
]
HARMONY_TOKENS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"]
# gpt-oss's system message prints strftime_now("%Y-%m-%d"): a macro of that name put before the
# template (the same text on both sides) pins the date, as date_string does for Llama 3.2.
TEMPLATE_PREFIX = {"gpt_oss.jinja": "{%- macro strftime_now(format) %}2025-08-05{% endmacro -%}"}

# (tokenizer, template file or None for the tokenizer's own, cases, tools, extra kwargs variants)
AGENT_RUNS = [
    ("qwen3", None, ISSUE_14_CASES, [{}, {"enable_thinking": False}]),
    ("llama3", None, ["reasoning_single", "reasoning_multi_turn", "tool_call"], [{}]),
    # Llama 3.2 Instruct's own template (tests/fixtures/chat_templates/llama3_2.jinja), with the
    # Llama-3 tokenizer (the same vocabulary). date_string fixed: the template otherwise prints today.
    ("llama3", "llama3_2.jinja", ["reasoning_single", "reasoning_multi_turn", "tool_call"], [{"date_string": "26 Jul 2024"}]),
    # A template with {% generation %} blocks: transformers' return_assistant_tokens_mask is the reference.
    ("llama3", "llama3_generation.jinja", ["reasoning_multi_turn", "tool_call"], [{}]),
    # Issue 12: the real templates of Gemma 3, OLMo 2 / 3, Granite 3.3, Phi-4-mini and Mistral Small
    # 3.1 (tests/fixtures/chat_templates/README.md), each with a tokenizer of ../shared plus the
    # family's turn markers added as special tokens (as its own tokenizer has them: one token
    # each), so end-of-turn masking is tested on the real token boundaries. Cases without a
    # system message are left out where the template then prints today's date (Granite, Mistral).
    ("llama3", "gemma3.jinja", ["plain_multi_turn", "plain_no_system"], [{}], ["<start_of_turn>", "<end_of_turn>"]),
    ("llama3", "olmo2.jinja", ["plain_multi_turn", "plain_no_system"], [{}], []),
    ("qwen3", "olmo3.jinja", ["plain_multi_turn", "plain_no_system", "tool_call"], [{}], []),
    ("llama3", "granite3.jinja", ["plain_multi_turn", "tool_call"], [{}], ["<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"]),
    ("llama3", "phi4_mini.jinja", ["plain_multi_turn", "plain_no_system", "tool_call"], [{}], ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"]),
    ("mistral", "mistral_small3_1.jinja", ["plain_system_blocks"], [{}], ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]),
    # Issue 11: gpt-oss's harmony template (tests/fixtures/chat_templates/gpt_oss.jinja) with the
    # Llama-3 tokenizer (tiktoken-style BPE like o200k) plus the harmony markers as special
    # tokens, and Mixtral-8x7B-Instruct's template with the Mistral-7B tokenizer (the same 32k
    # vocabulary; its [INST] markers are plain text there too).
    ("llama3", "gpt_oss.jinja", GPT_OSS_CASES, [{}], HARMONY_TOKENS),
    ("llama3", "gpt_oss.jinja", ["plain_no_system"], [{"reasoning_effort": "high", "model_identity": "You are a test model.", "builtin_tools": ["browser", "python"]}], HARMONY_TOKENS),
    ("mistral", "mixtral_8x7b.jinja", ["plain_multi_turn", "plain_no_system", "plain_multi_turn_open"], [{}], []),
    # Qwen 3.5's template (thinking on by default: the generation prompt ends with `<think>\n`) and
    # Qwen 3.6's (the same, plus `preserve_thinking`), with Qwen3's tokenizer as a stand-in for Qwen
    # 3.5's 248k one (not available offline): the same special-token strings, other ids. See
    # tests/fixtures/chat_templates/README.md.
    ("qwen3", "qwen3_5.jinja", QWEN3_5_CASES, [{}, {"enable_thinking": False}]),
    ("qwen3", "qwen3_6.jinja", ["reasoning_multi_turn", "tool_call_typed_arguments", "plain_multi_turn_open"], [{}, {"preserve_thinking": True}]),
]
TEMPLATES = REPO_ROOT / "tests" / "fixtures" / "chat_templates"


def agent_cases():
    out = []
    toks = {}
    for tok_name, template_file, names, variants, *extra in AGENT_RUNS:
        added = extra[0] if extra else []
        if added:
            tok = AutoTokenizer.from_pretrained(str(TOKENIZERS / tok_name), local_files_only=True)
            tok.add_special_tokens({"additional_special_tokens": added})
        else:
            tok = toks.setdefault(tok_name, AutoTokenizer.from_pretrained(str(TOKENIZERS / tok_name), local_files_only=True))
        template = (TEMPLATES / template_file).read_text() if template_file else None
        prefix = TEMPLATE_PREFIX.get(template_file)
        if prefix:
            template = prefix + template
        for kwargs in variants:
            for name in names:
                messages = AGENT[name]
                tools = [WEATHER_TOOL, TIME_TOOL] if "tool" in name else None
                agp = name in GENERATION_PROMPT_CASES
                common = dict(chat_template=template, tools=tools, **kwargs)
                if agp:
                    common["add_generation_prompt"] = True
                text = tok.apply_chat_template(messages, tokenize=False, **common)
                enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=template_file == "llama3_generation.jinja", **common)
                ids = [int(i) for i in enc["input_ids"]]
                assert ids == tok(text, add_special_tokens=False)["input_ids"], (tok_name, name)
                case = {
                    "name": name,
                    "tokenizer": tok_name,
                    "template": template_file,
                    "messages": messages,
                    "tools": tools,
                    "kwargs": kwargs,
                    "text": text,
                    "input_ids": ids,
                }
                if agp:
                    case["add_generation_prompt"] = True
                if prefix:
                    case["template_prefix"] = prefix
                if added:
                    case["added_special_tokens"] = {t: int(tok.convert_tokens_to_ids(t)) for t in added}
                if "assistant_masks" in enc:
                    case["assistant_masks"] = [int(m) for m in enc["assistant_masks"]]
                out.append(case)
    return out


NOTES = {
    "llama3": [
        "This tokenizer_config.json carries the original Llama-3 template, which ALWAYS appends "
        "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' (it ignores add_generation_prompt), so the "
        "add_generation_prompt=true/false texts are identical.",
        "The template trims message content (Jinja | trim) and prepends bos_token to the first message.",
        "input_ids = tokenizer(text, add_special_tokens=False): apply_chat_template(tokenize=True) does not add a "
        "second BOS.",
        "Plain tokenizer(text) prepends <|begin_of_text|> (post-processor).",
    ],
    "qwen3": [
        "Default call (enable_thinking not passed): add_generation_prompt appends '<|im_start|>assistant\\n' only. "
        "Cases with kwargs {enable_thinking: false} additionally append '<think>\\n\\n</think>\\n\\n' after it.",
        "Assistant turns after the last user message get an (empty) '<think>\\n\\n</think>\\n\\n' block when they "
        "are the last message; earlier assistant turns are rendered without it (and any '<think>...</think>' in "
        "their content is stripped).",
        "No BOS token; plain tokenizer(text) adds no special tokens.",
        "Special-token strings in plain text (e.g. '<|im_start|>') are parsed as special tokens by default.",
    ],
    "llama2": ["No chat template in this tokenizer_config.json: encodings only. BOS <s>=1 prepended by default."],
    "mistral": ["No chat template in this tokenizer_config.json: encodings only. BOS <s>=1 prepended by default."],
    "stories260K": ["The stories260K model's own tokenizer (512 vocab); no chat template; BOS prepended."],
}


def main() -> None:
    setup_determinism()
    cdir = FIXTURES / "chat"
    if cdir.exists():
        shutil.rmtree(cdir)
    summary = {}
    dirs = {n: TOKENIZERS / n for n in ("llama3", "qwen3", "llama2", "mistral")}
    dirs["stories260K"] = STORIES260K
    for name, d in dirs.items():
        print(f"[phase3] {name}", flush=True)
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        has_template = bool(getattr(tok, "chat_template", None))
        obj = {
            "tokenizer": f"shared/{d.relative_to(d.parents[1])}",
            "class": type(tok).__name__,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "notes": NOTES[name],
            "chat": chat_cases(tok, name) if has_template else [],
            "encodings": encodings(tok, name),
        }
        write_json(cdir / f"{name}.json", obj)
        summary[name] = {
            "file": rel(cdir / f"{name}.json"),
            "chat_cases": len(obj["chat"]),
            "encodings": len(obj["encodings"]),
            "notes": NOTES[name],
        }
    agent = agent_cases()
    write_json(cdir / "agent.json", {
        "notes": [
            "Reasoning and tool-calling conversations rendered by apply_chat_template(messages, tools=...) "
            "(tokenize=False for text, tokenize=True for input_ids).",
            "template null: the tokenizer's own chat template; otherwise a file in tests/fixtures/chat_templates.",
            "assistant_masks: transformers' return_assistant_tokens_mask, only for templates with {% generation %} blocks.",
            "add_generation_prompt: true when rendered with it (absent: false). template_prefix: text put before the "
            "template file (gpt-oss: a strftime_now macro that pins the date).",
        ],
        "cases": agent,
    })
    summary["agent"] = {"file": rel(cdir / "agent.json"), "cases": len(agent)}
    update_manifest({"chat": summary})


if __name__ == "__main__":
    main()
