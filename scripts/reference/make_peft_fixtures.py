#!/usr/bin/env python
"""Phase 2: PEFT LoRA fixtures (run after phase 1; make_fixtures.py runs it too).

    python scripts/reference/make_peft_fixtures.py                  # everything
    python scripts/reference/make_peft_fixtures.py --only olmo3     # one adapter (or NAME_train) fixture

tests/fixtures/peft/<name>/adapter/           adapter_config.json + adapter_model.safetensors
tests/fixtures/peft/<name>/reference.safetensors
    input_ids [2,13] i64, labels [2,13] i64 (-100 = ignored), logits [2,13,512] f32,
    grad.<adapter key> f32 for every lora_A/lora_B weight,
    merged.<hf key> f32 for every base weight changed by merge_and_unload()
tests/fixtures/peft/<name>_train/             initial_adapter/, final_adapter/, reference.safetensors
    (input_ids [10,2,13], labels [10,2,13]); curves in manifest.json "train".
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BATCH,
    FIXTURES,
    SEQ,
    VOCAB,
    load_fixture_model,
    load_manifest,
    rel,
    setup_determinism,
    update_manifest,
)

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3 = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

BASES = ["llama", "llama_tied_bias", "llama_linear_rope", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]
# Added with issue 12 (seeds 3201...): every new model type, vision-language ones on their text
# decoder only (a regex target, as a list of names would also match the vision tower).
BASES_2026 = ["granite", "smollm3", "phi3_longrope", "olmo2", "olmo3", "gemma3_text", "gemma3_vlm", "mistral3_vlm"]
TEXT_ONLY = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# name -> (base fixture, LoraConfig kwargs, seed)
PEFT_SPECS = {}
for _i, _b in enumerate(BASES):
    PEFT_SPECS[_b] = (
        _b,
        dict(r=4, lora_alpha=8, target_modules=PHI3 if _b == "phi3" else ALL7),
        3001 + _i,
    )
for _i, _b in enumerate(BASES_2026):
    _targets = PHI3 if _b.startswith("phi3") else TEXT_ONLY if _b.endswith("_vlm") else ALL7
    PEFT_SPECS[_b] = (_b, dict(r=4, lora_alpha=8, target_modules=_targets), 3201 + _i)
PEFT_SPECS["llama_rslora"] = (
    "llama",
    dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"o_proj": 4},
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        layers_to_transform=[1],
    ),
    3100,
)

TRAIN_BASES = ["llama", "qwen2", "phi3", "gemma2", "gemma3_text"]
TRAIN_STEPS = 10
OPT = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
WARMUP = 2
MAX_GRAD_NORM = 1.0

# merged.<hf key> tensors are stored only for these (size budget); merge math is identical for the
# others, whose merged-model logits are checked against the PEFT logits instead (see manifest).
MERGED_STORED = {"llama", "llama_rslora", "phi3"}

# If a random init gives a small adapter effect, B is scaled up so logits move noticeably.
MIN_LOGIT_DELTA = 0.5


def adapter_key(param_name: str) -> str:
    return param_name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def lora_params(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def save_adapter(peft_model, out_dir: Path, base_name: str) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    readme = out_dir / "README.md"  # auto-generated model card, not needed
    if readme.exists():
        readme.unlink()
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    # peft writes target_modules from a set (hash-order dependent): sort for determinism.
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["base_model_name_or_path"] = f"models/{base_name}"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def make_labels(input_ids: torch.Tensor) -> torch.Tensor:
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, -2:] = -100
    return labels


def n_loss_tokens(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != -100).sum())


def scalings(peft_model) -> dict:
    out = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "scaling") and isinstance(getattr(mod, "scaling"), dict) and "default" in mod.scaling:
            key = name.removeprefix("base_model.model.")
            out[key] = {
                "r": int(mod.r["default"]),
                "alpha": float(mod.lora_alpha["default"]),
                "scaling": float(mod.scaling["default"]),
            }
    return dict(sorted(out.items()))


def build_peft(name: str) -> dict:
    base_name, lkw, seed = PEFT_SPECS[name]
    ref_base = load_file(str(FIXTURES / "reference" / f"{base_name}.safetensors"))
    input_ids = ref_base["input_ids"]
    labels = make_labels(input_ids)

    base = load_fixture_model(base_name)
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
    # Bit-equal with the torch build that made phase 1; another build (CPU vs CUDA wheel) may differ
    # in the last bits, which the tolerance allows.
    phase1_diff = float((base_logits - ref_base["logits"]).abs().max())
    assert phase1_diff <= 1e-5, f"base model does not reproduce phase-1 logits ({phase1_diff})"
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}

    torch.manual_seed(seed)
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False, **lkw)
    model = get_peft_model(base, cfg)
    model.eval()

    for n, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in n), (n, p.requires_grad)

    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    delta = float((logits - base_logits).abs().max())
    b_scale = 1.0
    if delta < MIN_LOGIT_DELTA:
        b_scale = 4.0
        with torch.no_grad():
            for n, p in lora_params(model):
                if ".lora_B." in n:
                    p.mul_(b_scale)
            logits = model(input_ids=input_ids).logits
        delta = float((logits - base_logits).abs().max())

    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels)
    out.loss.backward()
    loss = float(out.loss.detach())
    with torch.no_grad():
        logits2 = out.logits
    assert torch.equal(logits2, logits)

    pdir = FIXTURES / "peft" / name
    save_adapter(model, pdir / "adapter", base_name)
    with safe_open(str(pdir / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        file_keys = set(fh.keys())
        for n, p in lora_params(model):
            assert torch.equal(fh.get_tensor(adapter_key(n)), p.detach()), n

    tensors = {"input_ids": input_ids, "labels": labels, "logits": logits.float().contiguous()}
    grad_keys = []
    for n, p in lora_params(model):
        assert p.grad is not None, n
        k = adapter_key(n)
        grad_keys.append(k)
        tensors[f"grad.{k}"] = p.grad.detach().float().contiguous()
    assert set(grad_keys) == file_keys, (set(grad_keys) ^ file_keys)

    # merge_and_unload on a copy; keep every weight that changed
    merged = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=input_ids).logits
    merged_sd = merged.state_dict()
    changed = []
    for k, v in merged_sd.items():
        if k not in base_sd or not torch.equal(v, base_sd[k]):
            changed.append(k)
            if name in MERGED_STORED:
                tensors[f"merged.{k}"] = v.detach().float().contiguous()
    expected = {f"{m}.weight" for m in scalings(model)}
    assert set(changed) == expected, set(changed) ^ expected

    save_file(tensors, str(pdir / "reference.safetensors"), metadata={"fixture": f"peft/{name}"})

    lcfg = {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules),
        "use_rslora": cfg.use_rslora,
        "rank_pattern": cfg.rank_pattern,
        "alpha_pattern": cfg.alpha_pattern,
        "layers_to_transform": cfg.layers_to_transform,
        "init_lora_weights": cfg.init_lora_weights,
        "bias": cfg.bias,
    }
    return {
        "base_model": f"models/{base_name}",
        "adapter": rel(pdir / "adapter"),
        "reference": rel(pdir / "reference.safetensors"),
        "seed": seed,
        "lora_config": lcfg,
        "loss": loss,
        "loss_tokens": n_loss_tokens(labels),
        "labels_masking": "labels = input_ids with labels[0,:4] = labels[1,-2:] = -100",
        "lora_B_scaled_by": b_scale,
        "max_abs_logit_delta_vs_base": delta,
        "max_abs_logit_diff_merged_vs_peft": float((merged_logits - logits).abs().max()),
        "scalings": scalings(model),
        "grad_keys": len(grad_keys),
        "merged_keys": sorted(changed),
        "merged_stored": name in MERGED_STORED,
    }


def train_batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (TRAIN_STEPS, BATCH, SEQ), generator=g, dtype=torch.int64)
    labels = input_ids.clone()
    for s in range(TRAIN_STEPS):
        labels[s, 0, : (s % 3) + 1] = -100
        labels[s, 1, SEQ - ((s % 2) + 1):] = -100
    return input_ids, labels


def build_train(base_name: str, seed: int, base_dir: str | None = None) -> dict:
    """`base_dir` (relative to tests/fixtures): a base outside models/, e.g. a 4-bit checkpoint."""
    name = f"{base_name}_train"
    tdir = FIXTURES / "peft" / name
    if tdir.exists():
        shutil.rmtree(tdir)
    if base_dir is None:
        base = load_fixture_model(base_name)
    else:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(FIXTURES / base_dir), device_map="cpu", dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(seed)
    targets = PHI3 if base_name == "phi3" else ALL7
    cfg = LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=True
    )
    model = get_peft_model(base, cfg)
    for n, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in n), n
    save_adapter(model, tdir / "initial_adapter", base_name)
    if base_dir is not None:
        cfg_path = tdir / "initial_adapter" / "adapter_config.json"
        c = json.loads(cfg_path.read_text())
        c["base_model_name_or_path"] = base_dir
        cfg_path.write_text(json.dumps(c, indent=2, sort_keys=True))

    input_ids, labels = train_batches(seed + 1)
    params = [p for _, p in lora_params(model)]
    opt = torch.optim.AdamW(params, foreach=False, **OPT)
    sched = get_linear_schedule_with_warmup(opt, WARMUP, TRAIN_STEPS)
    model.train()
    losses, norms, lrs, tokens = [], [], [], []
    for s in range(TRAIN_STEPS):
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids[s], labels=labels[s])
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        lrs.append(float(opt.param_groups[0]["lr"]))
        losses.append(float(out.loss.detach()))
        norms.append(float(gn))
        tokens.append(n_loss_tokens(labels[s]))
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        final_losses = [float(model(input_ids=input_ids[s], labels=labels[s]).loss) for s in range(TRAIN_STEPS)]
    save_adapter(model, tdir / "final_adapter", base_name)
    base_model = base_dir or f"models/{base_name}"
    save_file(
        {"input_ids": input_ids, "labels": labels},
        str(tdir / "reference.safetensors"),
        metadata={"fixture": f"peft/{name}"},
    )
    return {
        "base_model": base_model,
        "initial_adapter": rel(tdir / "initial_adapter"),
        "final_adapter": rel(tdir / "final_adapter"),
        "reference": rel(tdir / "reference.safetensors"),
        "seed": seed,
        "lora_config": {
            "r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "target_modules": sorted(targets),
            "init_lora_weights": True,
            "note": "PEFT default init: lora_A kaiming-uniform(a=sqrt(5)), lora_B zeros",
        },
        "steps": TRAIN_STEPS,
        "micro_batch": [BATCH, SEQ],
        "losses": losses,
        "grad_norms": norms,
        "lrs": lrs,
        "loss_tokens": tokens,
        "final_losses_per_batch": final_losses,
        "optimizer": {
            "name": "torch.optim.AdamW",
            "lr": OPT["lr"],
            "betas": list(OPT["betas"]),
            "eps": OPT["eps"],
            "weight_decay": OPT["weight_decay"],
            "amsgrad": False,
            "maximize": False,
            "params": "only lora_A/lora_B weights (one param group)",
            "update": "p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; "
            "p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps); t counts every step incl. lr=0 steps",
            "grad_clip": {
                "fn": "torch.nn.utils.clip_grad_norm_",
                "max_norm": MAX_GRAD_NORM,
                "norm_type": 2.0,
                "rule": "total = L2 norm over all lora grads; g *= min(1, max_norm/(total+1e-6))",
            },
        },
        "schedule": (
            "transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10): "
            "lr(s) = base_lr*s/2 for s<2 else base_lr*max(0,(10-s)/8), s = 0-based step index; "
            "recorded lrs are those used by each step's optimizer update"
        ),
        "loop": "per step: zero_grad; loss = model(input_ids[s], labels=labels[s]).loss (HF mean over non -100 "
        "shifted labels); backward; grad_norm = clip_grad_norm_ (pre-clip); optimizer.step(); scheduler.step(). "
        "losses are before the update of that step.",
    }


def main_only(names) -> None:
    """Rebuild only the named fixtures (adapter names, or NAME_train); keep everything else."""
    setup_determinism()
    m = load_manifest()
    peft_entries, train_entries = dict(m.get("peft", {})), dict(m.get("train", {}))
    for name in names:
        if name in PEFT_SPECS:
            print(f"[phase2] peft {name}", flush=True)
            peft_entries[name] = build_peft(name)
        elif name.removesuffix("_train") in TRAIN_BASES:
            base = name.removesuffix("_train")
            print(f"[phase2] train {base}", flush=True)
            train_entries[name] = build_train(base, 4001 + 10 * TRAIN_BASES.index(base))
        else:
            raise SystemExit(f"unknown fixture {name!r}: one of {[*PEFT_SPECS, *(b + '_train' for b in TRAIN_BASES)]}")
    order = list(PEFT_SPECS)
    peft_entries = {k: peft_entries[k] for k in sorted(peft_entries, key=lambda k: order.index(k) if k in order else len(order))}
    update_manifest({"peft": peft_entries, "train": train_entries})


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="rebuild only this fixture (repeatable)")
    args, _ = ap.parse_known_args()
    if args.only:
        main_only(args.only)
        return
    setup_determinism()
    pdir = FIXTURES / "peft"
    if pdir.exists():
        shutil.rmtree(pdir)
    peft_entries = {}
    for name in PEFT_SPECS:
        print(f"[phase2] peft {name}", flush=True)
        peft_entries[name] = build_peft(name)
    train_entries = {}
    for i, b in enumerate(TRAIN_BASES):
        print(f"[phase2] train {b}", flush=True)
        train_entries[f"{b}_train"] = build_train(b, 4001 + 10 * i)
    assert "models" in load_manifest(), "run phase 1 first"
    update_manifest({"peft": peft_entries, "train": train_entries})


if __name__ == "__main__":
    main()
