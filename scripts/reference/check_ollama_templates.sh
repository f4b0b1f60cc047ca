#!/usr/bin/env bash
# Run by hand (never in CI): renders the Ollama TEMPLATE that `temper export --format ollama`
# writes for each chat format it translates with Go's text/template (the engine Ollama uses) and
# compares it with transformers' apply_chat_template(add_generation_prompt=True) on the real
# templates (tests/fixtures/chat_templates and ../shared/tokenizers), the leading BOS left out
# (llama.cpp adds it when tokenising). Needs: Debian's golang-go, the reference venv
# (pip install -r scripts/reference/requirements.txt), and a built temper (cargo build).
#
#   bash scripts/reference/check_ollama_templates.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
TEMPER="${TEMPER:-${CARGO_TARGET_DIR:-target}/debug/temper}"
command -v go > /dev/null || { echo "needs Go: apt-get install golang-go" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. The Modelfile TEMPLATE of each format, from temper itself (one export per base).
python - "$work" "$TEMPER" <<'PY'
import json, shutil, subprocess, sys
from pathlib import Path
from transformers import AutoTokenizer

work, temper = Path(sys.argv[1]), sys.argv[2]
root = Path.cwd()
fx = root / "tests" / "fixtures"
shared = root.parent / "shared" / "tokenizers"
# (name, tokenizer dir, template file or None for the tokenizer's own)
CASES = [
    ("llama3", "llama3", None),
    ("qwen3", "qwen3", None),
    ("gemma3", "llama3", "gemma3.jinja"),
    ("phi4_mini", "llama3", "phi4_mini.jinja"),
    ("mistral_small3_1", "mistral", "mistral_small3_1.jinja"),
]
CONVS = {
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello! What is 2+2?"},
        {"role": "assistant", "content": "2+2 is 4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    "no_system": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye."}],
}
out = []
for name, tok_dir, tfile in CASES:
    base = work / f"base_{name}"
    base.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(fx / "models" / "llama" / f, base / f)
    tok = AutoTokenizer.from_pretrained(str(shared / tok_dir))
    template = (fx / "chat_templates" / tfile).read_text() if tfile else tok.chat_template
    tok.chat_template = template
    tok.save_pretrained(str(base))
    dest = work / f"ollama_{name}"
    subprocess.run([temper, "export", "--adapter", str(fx / "peft/llama/adapter"), "--format", "ollama", "--base", "x",
                    "--model", str(base), "--out", str(dest)], check=True, capture_output=True)
    modelfile = (dest / "Modelfile").read_text()
    go_template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for conv_name, msgs in CONVS.items():
        if name == "mistral_small3_1":
            # Its template reads a system message's content as a list of text blocks only.
            msgs = [dict(m, content=[{"type": "text", "text": m["content"]}]) if m["role"] == "system" else m for m in msgs]
            if conv_name == "no_system":
                continue  # it prints today's date then
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=template)
        bos = tok.bos_token or ""
        if bos and want.startswith(bos):
            want = want[len(bos):]
        plain = [{"Role": m["role"], "Content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]} for m in msgs]
        out.append({"name": f"{name}/{conv_name}", "template": go_template, "messages": plain, "want": want})
(work / "cases.json").write_text(json.dumps(out))
PY

# 2. Render them with Go's text/template.
cat > "$work/render.go" <<'GO'
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct{ Role, Content string }
type Case struct {
	Name     string    `json:"name"`
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	Want     string    `json:"want"`
}

func main() {
	data, _ := os.ReadFile(os.Args[1])
	var cases []Case
	if err := json.Unmarshal(data, &cases); err != nil {
		panic(err)
	}
	bad := 0
	for _, c := range cases {
		t, err := template.New(c.Name).Parse(c.Template)
		if err != nil {
			fmt.Printf("%-28s parse error: %v\n", c.Name, err)
			bad++
			continue
		}
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"Messages": c.Messages}); err != nil {
			fmt.Printf("%-28s render error: %v\n", c.Name, err)
			bad++
			continue
		}
		if b.String() == c.Want {
			fmt.Printf("%-28s identical\n", c.Name)
		} else {
			fmt.Printf("%-28s DIFFERS\n  ollama: %q\n  hf:     %q\n", c.Name, b.String(), c.Want)
			bad++
		}
	}
	os.Exit(bad)
}
GO
(cd "$work" && go run render.go cases.json)
