"""Check `temper merge` against PEFT where users deploy merged models: transformers.

For each case, runs the temper binary to merge a fixture PEFT adapter into a fixture base,
loads the merged folder with `AutoModelForCausalLM.from_pretrained`, and compares it with
`PeftModel.from_pretrained(base, adapter).merge_and_unload()`:
  - logits on the fixture input_ids (both forwards in float32),
  - every weight tensor of the two state dicts.
Writes tests/fixtures/merge/report.json (small; committed). Run by hand, never by CI:

    cargo build --no-default-features
    python scripts/reference/make_merge_fixtures.py --temper target/debug/temper
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import tempfile
from pathlib import Path

from common import FIXTURES, setup_determinism, versions  # sets offline env first

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

# (case, base model, adapter, temper --dtype, torch dtype the base is loaded in for PEFT)
CASES = [
    ("llama_f32", "models/llama", "peft/llama/adapter", "auto", torch.float32),
    ("llama_rslora_f32", "models/llama", "peft/llama_rslora/adapter", "auto", torch.float32),
    ("phi3_f32", "models/phi3", "peft/phi3/adapter", "auto", torch.float32),
    ("qwen2_tied_f32", "models/qwen2", "peft/qwen2/adapter", "auto", torch.float32),
    ("llama_sharded_f32", "models/llama_sharded", "peft/llama/adapter", "auto", torch.float32),
    ("llama_bf16", "models/llama_bf16", "peft/llama/adapter", "auto", torch.bfloat16),
]
F32_REL_TOL = 1e-5


def logits(model, ids):
    with torch.no_grad():
        return model.float()(input_ids=ids).logits


def run_case(temper: str, case, ids, work: Path) -> dict:
    name, base, adapter, dtype, torch_dtype = case
    out = work / name
    cmd = [temper, "merge", "--model", str(FIXTURES / base), "--adapter", str(FIXTURES / adapter),
           "--out", str(out), "--dtype", dtype]
    subprocess.run(cmd, check=True, capture_output=True)
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype, attn_implementation="eager")
    base_model = AutoModelForCausalLM.from_pretrained(FIXTURES / base, dtype=torch_dtype, attn_implementation="eager")
    peft_merged = PeftModel.from_pretrained(copy.deepcopy(base_model), FIXTURES / adapter).merge_and_unload()
    ours_sd, peft_sd = ours.state_dict(), peft_merged.state_dict()
    assert set(ours_sd) == set(peft_sd), f"{name}: state dict keys differ"
    worst_rel, worst_key, ulp_off = 0.0, None, 0
    for key, want in peft_sd.items():
        got = ours_sd[key]
        assert got.dtype == want.dtype, f"{name}: {key} dtype {got.dtype} vs {want.dtype}"
        diff = (got.float() - want.float()).abs()
        rel = (diff / want.float().abs().clamp(min=1.0)).max().item()
        if rel > worst_rel:
            worst_rel, worst_key = rel, key
        if torch_dtype == torch.bfloat16:
            # PEFT on CPU adds a bf16-rounded delta in bf16; temper adds in f32 and rounds once.
            ulp = torch.ldexp(torch.ones_like(want.float()), torch.frexp(want.float()).exponent - 8)
            ulp_off += int((diff > ulp).sum())
    l_ours, l_peft = logits(ours, ids), logits(peft_merged, ids)
    l_base = logits(base_model, ids)
    max_abs = (l_ours - l_peft).abs().max().item()
    rel = ((l_ours - l_peft).abs() / l_peft.abs().clamp(min=1.0)).max().item()
    files = sorted(p.name for p in out.iterdir())
    result = {
        "base_model": base, "adapter": adapter, "dtype": dtype, "files": files,
        "max_abs_logit_diff_vs_peft_merge": max_abs,
        "max_rel_logit_diff_vs_peft_merge": rel,
        "max_abs_logit_delta_vs_base": (l_peft - l_base).abs().max().item(),
        "max_rel_weight_diff_vs_peft_merge": worst_rel, "worst_weight": worst_key,
    }
    if torch_dtype == torch.float32:
        result["within_f32_rel_tol"] = rel <= F32_REL_TOL and worst_rel <= F32_REL_TOL
    else:
        result["weights_more_than_one_bf16_ulp_off"] = ulp_off
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--temper", required=True, help="path to the temper binary")
    args = ap.parse_args()
    setup_determinism()
    ids = load_file(str(FIXTURES / "peft/llama/reference.safetensors"))["input_ids"]
    report = {"generator": "scripts/reference/make_merge_fixtures.py", "versions": versions(),
              "f32_rel_tol": F32_REL_TOL, "input_ids_from": "peft/llama/reference.safetensors", "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            report["cases"][case[0]] = run_case(args.temper, case, ids, Path(tmp))
            print(case[0], json.dumps(report["cases"][case[0]]))
    out = FIXTURES / "merge" / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    bad = [n for n, c in report["cases"].items() if c.get("within_f32_rel_tol") is False]
    if bad:
        raise SystemExit(f"outside the f32 tolerance: {bad}")


if __name__ == "__main__":
    main()
