"""Loads adapters *exported by temper* (tests/fixtures/temper_export/<name>/adapter) with
`PeftModel.from_pretrained` and records PEFT's logits for the fixture batch, so a Rust test can
check temper's logits with the same adapter bytes against them.

Run by hand after regenerating the exported adapters:
    python scripts/reference/check_temper_export.py
"""
import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from common import FIXTURES, load_fixture_model, setup_determinism

# The vision-language ones check that PEFT takes Temper's model.language_model.* keys and regex
# target on the full Gemma3ForConditionalGeneration / Mistral3ForConditionalGeneration.
NAMES = ["llama", "phi3", "qwen3", "gemma3_vlm", "mistral3_vlm"]


def main() -> int:
    setup_determinism()
    report = {}
    for name in NAMES:
        root = FIXTURES / "temper_export" / name
        base = load_fixture_model(name)
        model = PeftModel.from_pretrained(base, root / "adapter")
        model.eval()
        # Every tensor in the file must have landed in the model, unchanged.
        file_tensors = load_file(root / "adapter" / "adapter_model.safetensors")
        state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
        missing = [k for k in file_tensors if k not in state]
        assert not missing, f"{name}: PEFT did not load {missing}"
        assert len(state) == len(file_tensors), f"{name}: PEFT made {len(state)} LoRA tensors, file has {len(file_tensors)}"
        for k, v in file_tensors.items():
            assert torch.equal(state[k], v), f"{name}: {k} changed on load"
        ids = load_file(FIXTURES / "reference" / f"{name}.safetensors")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        save_file({"input_ids": ids, "logits": logits.contiguous()}, root / "peft_logits.safetensors")
        scalings = {n: float(m.scaling["default"]) for n, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
        report[name] = {"lora_tensors": len(file_tensors), "scalings": dict(sorted(scalings.items())[:3]), "distinct_scalings": sorted(set(scalings.values()))}
    (FIXTURES / "temper_export" / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
