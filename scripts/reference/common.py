"""Shared helpers for the Temper reference-fixture generators.

Everything here is deterministic: fixed seeds, single-threaded CPU float32,
deterministic torch algorithms, eager attention. No network access is needed
(HF_HUB_OFFLINE=1 is forced); models/tokenizers are only loaded from local
folders.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
MANIFEST = FIXTURES / "manifest.json"

# Read-only assets provided next to the repository (never copied into it).
SHARED = Path(os.environ.get("TEMPER_SHARED", str(REPO_ROOT.parent / "shared")))
STORIES260K = SHARED / "models" / "stories260K"
TOKENIZERS = SHARED / "tokenizers"

VOCAB = 512
BATCH = 2
SEQ = 13


def setup_determinism() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)


def versions() -> dict:
    import numpy
    import peft
    import safetensors
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
    }


def load_manifest() -> dict:
    if MANIFEST.exists():
        return json.loads(MANIFEST.read_text())
    return {}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def update_manifest(sections: dict) -> None:
    """Replace the given top-level sections of manifest.json, keep the rest."""
    m = load_manifest()
    m.update(sections)
    m["generator"] = "scripts/reference/make_fixtures.py"
    m["versions"] = versions()
    order = [
        "description",
        "generator",
        "versions",
        "tolerances",
        "conventions",
        "models",
        "stories260K",
        "peft",
        "train",
        "chat",
    ]
    out = {k: m[k] for k in order if k in m}
    out.update({k: v for k, v in m.items() if k not in out})
    write_json(MANIFEST, out)


def rel(path: Path) -> str:
    return str(Path(path).resolve().relative_to(FIXTURES.resolve()))


def load_fixture_model(name: str):
    """Load a saved fixture model back from disk in float32 / eager / eval."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    path = FIXTURES / "models" / name
    composite = AutoConfig.from_pretrained(str(path), local_files_only=True).model_type in ("gemma3", "mistral3")
    auto = AutoModelForImageTextToText if composite else AutoModelForCausalLM
    model = auto.from_pretrained(
        str(FIXTURES / "models" / name),
        dtype=torch.float32,
        attn_implementation="eager",
        local_files_only=True,
    )
    model.eval()
    return model


def python_info() -> str:
    return sys.version
