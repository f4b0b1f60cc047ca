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

from common import FIXTURES, STORIES260K, TOKENIZERS, rel, setup_determinism, update_manifest, write_json  # noqa: E402
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
    update_manifest({"chat": summary})


if __name__ == "__main__":
    main()
