#!/usr/bin/env python
"""By hand, never in CI: PEFT 0.21 + transformers 5.24 load the MoE adapters `temper export`
writes (PEFT's 3-D `target_parameters` form and, with --format peft-per-expert, the 2-D
per-expert form) and give the fixtures' logits (issue 11).

    /work/venv-moe/bin/python scripts/reference/check_moe_export.py [--temper target/debug/temper]

For each case it runs `temper export` on a fixture adapter, loads the written folder with
`PeftModel.from_pretrained` on the fixture base (eager attention and experts, f32) and compares
the logits with `tests/fixtures/moe/peft/<name>/reference.safetensors`. qwen3_moe is left out:
stock PEFT 0.21 rewrites its target_modules when loading (drops the dense layer's LoRA; see
tests/fixtures/moe/README.md), so it cannot reproduce the reference with any adapter.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

MOE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "moe"
CASES = [("mixtral", "peft"), ("qwen2_moe", "peft"), ("olmoe", "peft"), ("gpt_oss", "peft"), ("mixtral", "peft-per-expert")]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--temper", default="target/debug/temper")
    args = p.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, fmt in CASES:
            out = Path(tmp) / f"{name}_{fmt}"
            cmd = [args.temper, "export", "--adapter", str(MOE / "peft" / name / "adapter"), "--format", fmt, "--out", str(out), "--base", str(MOE / "models" / name)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            base = AutoModelForCausalLM.from_pretrained(str(MOE / "models" / name), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
            model = PeftModel.from_pretrained(base, str(out))
            model.eval()
            ref = load_file(str(MOE / "peft" / name / "reference.safetensors"))
            with torch.no_grad():
                logits = model(input_ids=ref["input_ids"]).logits
            diff = float((logits - ref["logits"]).abs().max())
            worst = max(worst, diff)
            print(f"{name:10s} {fmt:16s} max |logit diff| {diff:.2e}")
    print(f"worst {worst:.2e} (tolerance 1e-4)")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
