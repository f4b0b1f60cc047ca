#!/usr/bin/env python
"""Mixture-of-Experts reference fixtures (transformers 5 / PEFT 0.21; run by hand, never in CI).

    python3 -m venv /work/venv-moe
    /work/venv-moe/bin/pip install -r scripts/reference/requirements-moe.txt
    /work/venv-moe/bin/python scripts/reference/make_moe_fixtures.py                   # everything
    /work/venv-moe/bin/python scripts/reference/make_moe_fixtures.py --only qwen3_moe  # one model + its adapters
    /work/venv-moe/bin/python scripts/reference/make_moe_fixtures.py --only qwen3_moe_train

Everything goes to tests/fixtures/moe/ (layout in its README.md) with its own manifest.json;
the main tests/fixtures/manifest.json (transformers 4.57) is never touched.

tests/fixtures/moe/models/<name>/           config.json + model.safetensors (save_pretrained = Hub layout)
tests/fixtures/moe/reference/<name>.safetensors
    input_ids [2,13] i64, logits [2,13,512] f32, hidden.embed / hidden.layer.<i> / hidden.final_norm
    [2,13,H] f32, per MoE layer i: router.<i>.logits [26,E] f32, router.<i>.experts [26,k] i64,
    router.<i>.weights [26,k] f32
tests/fixtures/moe/peft/<name>/             adapter/ + reference.safetensors (input_ids, labels, logits,
                                            grad.<adapter key>); qwen3_moe also merged.safetensors
tests/fixtures/moe/peft/<name>_per_expert/  adapter/ (format (a), 2-D per expert) + reference.safetensors
tests/fixtures/moe/peft/qwen3_moe_train/    initial_adapter/, final_adapter/, reference.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BATCH, FIXTURES, REPO_ROOT, SEQ, VOCAB, setup_determinism, versions, write_json  # noqa: E402

# The PEFT conventions (labels, training loop constants, key naming) are shared with the dense fixtures.
from make_peft_fixtures import (  # noqa: E402
    MAX_GRAD_NORM,
    MIN_LOGIT_DELTA,
    OPT,
    TRAIN_STEPS,
    WARMUP,
    adapter_key,
    lora_params,
    make_labels,
    n_loss_tokens,
    scalings,
    train_batches,
)

import torch  # noqa: E402
import peft.utils.transformers_weight_conversion as peft_twc  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, get_linear_schedule_with_warmup  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()

MOE = FIXTURES / "moe"
MANIFEST = MOE / "manifest.json"
TOKENS = BATCH * SEQ

COMMON = dict(
    vocab_size=VOCAB,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    num_hidden_layers=4,
    max_position_embeddings=64,
    attention_dropout=0.0,
)

# name -> (model_type, config kwargs, seed, init options)
SPECS = {
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=20,
            intermediate_size=40,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
        1101,
        {},
    ),
    "qwen3_moe_nonorm": (
        "qwen3_moe",
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            num_experts=5,
            num_experts_per_tok=3,
            moe_intermediate_size=20,
            intermediate_size=40,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            # decoder_sparse_step=2 alone makes layers 0 and 2 dense; qwen3_moe's mlp_only_layers=[1]
            # on top would leave a single MoE layer, so this variant has none.
            mlp_only_layers=[],
            use_sliding_window=False,
            tie_word_embeddings=True,
        ),
        1102,
        {},
    ),
    "mixtral": (
        "mixtral",
        dict(
            hidden_size=40,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=10,
            num_local_experts=5,
            num_experts_per_tok=2,
            intermediate_size=28,
            sliding_window=6,
            tie_word_embeddings=False,
        ),
        1103,
        {},
    ),
    "olmoe": (
        "olmoe",
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=3,
            intermediate_size=16,
            norm_topk_prob=False,
            clip_qkv=2.0,
            tie_word_embeddings=False,
        ),
        1104,
        # 8 experts, top-3: the 3rd/4th probabilities sit mid-distribution, where a wider router
        # spread makes gaps < MARGIN more (not less) likely; 0.2 passes the margin check far more often
        {"router_std": 0.2},
    ),
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            qkv_bias=True,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=20,
            shared_expert_intermediate_size=36,
            intermediate_size=40,
            decoder_sparse_step=1,
            mlp_only_layers=[2],
            norm_topk_prob=False,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
        1105,
        {},
    ),
    "gpt_oss": (
        "gpt_oss",
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=24,
            sliding_window=5,
            # layer_types: the config default (sliding on even layers, full on odd ones)
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 16,
            },
            swiglu_limit=7.0,
            tie_word_embeddings=False,
        ),
        1106,
        # gate_up_proj std: pre-activations x.W reach past the +-7 clamp for a few % of values
        # gpt_oss selects on raw logits, so a larger router std is safe there
        {"gate_up_std": 0.6, "sinks_std": 1.0, "router_std": 0.5},
    ),
}
MODEL_NAMES = list(SPECS)

WEIGHT_STD = 0.15
EMBED_STD = 0.15
BIAS_STD = 0.1
NORM_STD = 0.1
# Router weights get a larger std than other matrices so routing is decisive (mean top-1 probability
# ~0.6), but not so large that the k-th and (k+1)-th probabilities are both ~0 (then they differ by
# < MARGIN although their logits are far apart, and nearly every seed fails the margin check).
ROUTER_STD = 0.3

# k-th vs (k+1)-th router score (the values top-k is taken over) must differ by more than this for
# every token, in every forward pass stored here; otherwise the weights are re-seeded (seed + 1000 j).
MARGIN = 1e-3
MAX_ATTEMPTS = 200
ROUNDTRIP_TOL = 1e-6

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
DENSE = ["gate_proj", "up_proj", "down_proj"]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Dense MLP projections exist only where a model has dense layers or a shared expert.
PEFT_TARGETS = {
    "qwen3_moe": ATTN + DENSE,  # dense layer 1
    "qwen3_moe_nonorm": ATTN + DENSE,  # dense layers 0 and 2
    "mixtral": ATTN,
    "olmoe": ATTN,
    "qwen2_moe": ATTN + DENSE,  # shared_expert.* in every MoE layer + dense layer 2
    "gpt_oss": ATTN,
}
PEFT_SEEDS = {name: 1121 + i for i, name in enumerate(MODEL_NAMES)}
PER_EXPERT = {"qwen3_moe", "mixtral"}
MERGED_STORED = {"qwen3_moe"}
TRAIN_BASE = "qwen3_moe"
TRAIN_SEED = 1131


def rel(path: Path) -> str:
    return str(Path(path).resolve().relative_to(MOE.resolve()))


def scrub(text: str) -> str:
    """Exception/warning text with machine paths removed."""
    text = str(text).replace(str(MOE.resolve()) + "/", "").replace(str(REPO_ROOT.resolve()) + "/", "")
    site = str(Path(torch.__file__).resolve().parents[1]) + "/"
    return text.replace(site, "site-packages/")


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


# ---------------------------------------------------------------------------------------------------
# models


def make_input_ids(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=g, dtype=torch.int64)


def make_config(name: str, **overrides):
    model_type, kwargs, _, _ = SPECS[name]
    return AutoConfig.for_model(model_type, **{**COMMON, **kwargs, **overrides})


def new_model(config, seed: int):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    return model


def is_router_weight(name: str) -> bool:
    return name.endswith((".mlp.gate.weight", ".mlp.router.weight"))


def reinit_weights(model, opts: dict) -> None:
    """Overwrite every parameter with seeded random values (make_fixtures.py's scheme + MoE extras)."""
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied params are yielded once
            if name.endswith(("bias", "_bias")):  # attention/router/expert biases, incl. 2-D expert biases
                p.copy_(torch.randn_like(p) * BIAS_STD)
            elif name.endswith(".sinks"):
                p.copy_(torch.randn_like(p) * opts.get("sinks_std", 1.0))
            elif p.dim() == 1:  # RMSNorm weights (incl. q_norm/k_norm)
                p.copy_(1.0 + torch.randn_like(p) * NORM_STD)
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p) * EMBED_STD)
            elif is_router_weight(name):
                p.copy_(torch.randn_like(p) * opts.get("router_std", ROUTER_STD))
            elif name.endswith(".experts.gate_up_proj"):
                p.copy_(torch.randn_like(p) * opts.get("gate_up_std", WEIGHT_STD))
            else:
                p.copy_(torch.randn_like(p) * WEIGHT_STD)


def load_model(name: str, config=None):
    kw = {} if config is None else {"config": config}
    model = AutoModelForCausalLM.from_pretrained(
        str(MOE / "models" / name),
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
        local_files_only=True,
        **kw,
    )
    model.eval()
    return model


def decoder(model):
    """The HF decoder (`.layers`) of a causal LM, also when wrapped by PEFT."""
    m = model
    if isinstance(m, PeftModel):
        m = m.base_model.model
    return m.model


def routers(model) -> dict:
    """layer index -> router module, for the MoE layers only."""
    out = {}
    for i, layer in enumerate(decoder(model).layers):
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            out[i] = mlp.router if hasattr(mlp, "router") else mlp.gate
    return out


@contextlib.contextmanager
def capture_routers(model):
    """Record (logits, weights, experts) of every router call, per layer, in call order."""
    calls = {i: [] for i in routers(model)}
    hooks = []
    for i, r in routers(model).items():

        def hook(mod, inp, out, i=i):
            logits, weights, experts = out
            calls[i].append((logits.detach().clone(), weights.detach().clone(), experts.detach().clone()))

        hooks.append(r.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def selection_scores(model_type: str, logits: torch.Tensor) -> torch.Tensor:
    """What transformers takes top-k over: softmax probabilities, or raw logits for gpt_oss."""
    if model_type == "gpt_oss":
        return logits.float()
    return torch.softmax(logits.float(), dim=-1)


def min_margin(model_type: str, k: int, calls: dict) -> dict:
    """Smallest gap between the k-th and (k+1)-th selection score, and the same in logits."""
    score_gap, logit_gap = math.inf, math.inf
    for per_layer in calls.values():
        for logits, _, experts in per_layer:
            s = selection_scores(model_type, logits).sort(dim=-1, descending=True).values
            score_gap = min(score_gap, float((s[:, k - 1] - s[:, k]).min()))
            l_sorted = logits.float().sort(dim=-1, descending=True).values
            logit_gap = min(logit_gap, float((l_sorted[:, k - 1] - l_sorted[:, k]).min()))
    return {"score": score_gap, "logit": logit_gap}


def topk(model) -> int:
    return int(model.config.num_experts_per_tok)


def n_experts(config) -> int:
    return int(getattr(config, "num_local_experts", None) or config.num_experts)


def forward_with_captures(model, input_ids):
    captured = {}
    hooks = []
    dec = decoder(model)
    for i, layer in enumerate(dec.layers):
        hooks.append(
            layer.register_forward_hook(
                lambda mod, inp, o, i=i: captured.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach().clone())
            )
        )
    hooks.append(dec.norm.register_forward_hook(lambda mod, inp, o: captured.__setitem__("norm", o.detach().clone())))
    try:
        with capture_routers(model) as calls, torch.no_grad():
            out = model(input_ids=input_ids, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return out, captured, calls


def disk_keys(path: Path) -> dict:
    keys = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                keys[k] = {"shape": list(sl.get_shape()), "dtype": sl.get_dtype()}
    return dict(sorted(keys.items()))


def olmoe_clip_stats(model, input_ids) -> dict:
    clip = float(model.config.clip_qkv)
    counts = {"q_proj": [0, 0], "k_proj": [0, 0], "v_proj": [0, 0]}
    hooks = []
    for layer in decoder(model).layers:
        for pn in counts:

            def hook(mod, inp, out, pn=pn):
                counts[pn][0] += int((out.abs() > clip).sum())
                counts[pn][1] += out.numel()

            hooks.append(getattr(layer.self_attn, pn).register_forward_hook(hook))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    for h in hooks:
        h.remove()
    noclip = load_model("olmoe", config=AutoConfig.from_pretrained(str(MOE / "models" / "olmoe")))
    noclip.config.clip_qkv = None
    with torch.no_grad():
        l2 = noclip(input_ids=input_ids).logits
    total_c = sum(c for c, _ in counts.values())
    total_n = sum(n for _, n in counts.values())
    return {
        "clip_qkv": clip,
        "frac_clipped_qkv": total_c / total_n,
        "frac_clipped": {k: c / n for k, (c, n) in counts.items()},
        "values_clipped": total_c,
        "values_total": total_n,
        "max_abs_logit_diff_vs_no_clip": float((l2 - logits).abs().max()),
        "semantics": "q, k, v projection outputs clamped to [-clip_qkv, clip_qkv] before q_norm/k_norm and RoPE",
    }


def gpt_oss_stats(model, input_ids, logits) -> dict:
    limit = float(model.config.swiglu_limit)
    recs = []
    origs = []
    for layer in decoder(model).layers:
        ex = layer.mlp.experts
        orig = ex._apply_gate

        def spy(gate_up, orig=orig):
            recs.append(gate_up.detach().clone())
            return orig(gate_up)

        ex._apply_gate = spy
        origs.append((ex, orig))
    with torch.no_grad():
        l1 = model(input_ids=input_ids).logits
    for ex, _ in origs:
        del ex._apply_gate  # back to the class method
    assert torch.equal(l1, logits)
    gu = torch.cat([r.reshape(-1, r.shape[-1]) for r in recs])
    gate, up = gu[:, ::2], gu[:, 1::2]
    gate_c = int((gate > limit).sum())
    up_c = int((up.abs() > limit).sum())
    stats = {
        "swiglu_limit": limit,
        "swiglu_alpha": float(model.config.swiglu_alpha),
        "gate_up_proj_init_std": SPECS["gpt_oss"][3]["gate_up_std"],
        "clamp_rows": int(gu.shape[0]),
        "frac_gate_above_limit": gate_c / gate.numel(),
        "frac_up_outside_limit": up_c / up.numel(),
        "frac_clamped": (gate_c + up_c) / gu.numel(),
        "max_abs_gate_up_preactivation": float(gu.abs().max()),
        "frac_gate_below_minus_limit_not_clamped": float((gate < -limit).float().mean()),
        "clamp_semantics": "gate = gu[..., ::2].clamp(max=limit) (no lower bound), up = gu[..., 1::2].clamp(-limit, "
        "limit), out = (up + 1) * gate * sigmoid(alpha * gate); gu = x @ gate_up_proj[e] + gate_up_proj_bias[e] "
        "over routed (token, expert) rows",
    }
    # sliding window on the sliding layers
    cfg = AutoConfig.from_pretrained(str(MOE / "models" / "gpt_oss"))
    cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    nowin = load_model("gpt_oss", config=cfg)
    with torch.no_grad():
        l2 = nowin(input_ids=input_ids).logits
    d = (l2 - logits).abs().amax(dim=(0, 2))
    stats["max_abs_logit_diff_vs_no_window"] = float(d.max())
    stats["max_abs_logit_diff_vs_no_window_per_position"] = [float(x) for x in d]
    stats["first_position_affected_by_window"] = int((d > 1e-4).nonzero()[0])
    assert stats["first_position_affected_by_window"] == model.config.sliding_window, d.tolist()
    # YaRN vs plain RoPE with the same theta
    cfg = AutoConfig.from_pretrained(str(MOE / "models" / "gpt_oss"))
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
    noyarn = load_model("gpt_oss", config=cfg)
    with torch.no_grad():
        l3 = noyarn(input_ids=input_ids).logits
    stats["max_abs_logit_diff_vs_plain_rope"] = float((l3 - logits).abs().max())
    rot = decoder(model).rotary_emb
    stats["rope_attention_factor"] = float(rot.attention_scaling)
    stats["rope_inv_freq"] = [float(x) for x in rot.inv_freq]
    return stats


def mixtral_window_stats(model, input_ids, logits) -> dict:
    cfg = AutoConfig.from_pretrained(str(MOE / "models" / "mixtral"))
    cfg.sliding_window = None
    nowin = load_model("mixtral", config=cfg)
    with torch.no_grad():
        l2 = nowin(input_ids=input_ids).logits
    d = (l2 - logits).abs().amax(dim=(0, 2))
    # Positions before the window edge can differ in the last bits: the eager experts batch a
    # different set of rows per expert matmul once the later rows change.
    first = int((d > 1e-4).nonzero()[0])
    assert float(d.max()) > 1e-4 and first == model.config.sliding_window, (float(d.max()), first, d.tolist())
    return {
        "max_abs_logit_diff_vs_no_window": float(d.max()),
        "max_abs_logit_diff_vs_no_window_per_position": [float(x) for x in d],
        "first_position_affected_by_window": first,
        "window_semantics": "key k visible to query q iff q - sliding_window < k <= q",
    }


def experts_impl_diffs(name: str, input_ids, logits) -> dict:
    """How far the other experts implementations are from the eager goldens (informational)."""
    out = {}
    for impl in ("batched_mm", "grouped_mm"):
        try:
            m = AutoModelForCausalLM.from_pretrained(
                str(MOE / "models" / name),
                dtype=torch.float32,
                attn_implementation="eager",
                experts_implementation=impl,
                local_files_only=True,
            ).eval()
            with torch.no_grad():
                lo = m(input_ids=input_ids).logits
            out[impl] = {"resolved": m.config._experts_implementation, "max_abs_logit_diff": float((lo - logits).abs().max())}
        except Exception as e:  # noqa: BLE001
            out[impl] = {"error": scrub(f"{type(e).__name__}: {e}").splitlines()[0]}
    return out


def build_model(name: str) -> dict:
    model_type, _, seed, opts = SPECS[name]
    input_ids = make_input_ids(seed + 5000)
    config = make_config(name)
    k = int(config.num_experts_per_tok)
    tried = []
    for attempt in range(MAX_ATTEMPTS):
        wseed = seed + 1000 * attempt
        model = new_model(config, wseed)
        reinit_weights(model, opts)
        model.eval()
        _, _, calls = forward_with_captures(model, input_ids)
        margin = min_margin(model_type, k, calls)
        tried.append({"seed": wseed, "min_score_margin": margin["score"]})
        if margin["score"] > MARGIN:
            break
    else:
        raise SystemExit(f"{name}: no seed with router margin > {MARGIN}: {tried}")
    assert model.config._experts_implementation == "eager" and model.config._attn_implementation == "eager"

    out_dir = MOE / "models" / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(str(out_dir))
    gen_cfg = out_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    with torch.no_grad():
        mem_logits = model(input_ids=input_ids).logits

    # Reference outputs come from the files on disk.
    ref = load_model(name)
    msd, rsd = model.state_dict(), ref.state_dict()
    assert sorted(msd) == sorted(rsd), set(msd) ^ set(rsd)
    for kk in msd:
        assert torch.equal(msd[kk], rsd[kk]), kk
    out, hidden, calls = forward_with_captures(ref, input_ids)
    logits = out.logits.float().contiguous()
    roundtrip = float((logits - mem_logits).abs().max())
    assert roundtrip <= ROUNDTRIP_TOL, roundtrip
    assert torch.equal(out.hidden_states[-1], hidden["norm"])
    margin = min_margin(model_type, k, calls)
    assert margin["score"] > MARGIN, margin

    tensors = {"input_ids": input_ids.contiguous(), "logits": logits, "hidden.embed": out.hidden_states[0].contiguous()}
    for i in range(ref.config.num_hidden_layers):
        tensors[f"hidden.layer.{i}"] = hidden[i].float().contiguous()
    tensors["hidden.final_norm"] = hidden["norm"].float().contiguous()
    E = n_experts(ref.config)
    for i, per_layer in calls.items():
        assert len(per_layer) == 1, (i, len(per_layer))
        rl, rw, re_ = per_layer[0]
        assert rl.shape == (TOKENS, E) and rw.shape == (TOKENS, k) and re_.shape == (TOKENS, k)
        tensors[f"router.{i}.logits"] = rl.float().contiguous()
        tensors[f"router.{i}.experts"] = re_.to(torch.int64).contiguous()
        tensors[f"router.{i}.weights"] = rw.float().contiguous()
    ref_dir = MOE / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(ref_dir / f"{name}.safetensors"), metadata={"fixture": f"moe/{name}"})

    # losses: LM loss alone, and with the load-balancing aux loss
    with torch.no_grad():
        lm = ref(input_ids=input_ids, labels=input_ids)
        withaux = ref(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    coef = float(ref.config.router_aux_loss_coef)
    lm_loss, total, aux = float(lm.loss), float(withaux.loss), float(withaux.aux_loss)
    assert lm.aux_loss is None
    assert abs(total - (lm_loss + coef * aux)) < 1e-6, (total, lm_loss, coef, aux)
    assert torch.equal(withaux.logits, out.logits)

    keys = disk_keys(out_dir)
    tied = bool(ref.config.tie_word_embeddings)
    assert ("lm_head.weight" in keys) == (not tied)
    layer0 = {kk: v["shape"] for kk, v in keys.items() if kk.startswith("model.layers.0.")}
    mem_layer0 = {n: list(p.shape) for n, p in ref.named_parameters() if n.startswith("model.layers.0.")}
    cfg_json = json.loads((out_dir / "config.json").read_text())
    entry = {
        "model_type": ref.config.model_type,
        "architectures": cfg_json.get("architectures"),
        "dtype": "float32",
        "path": rel(out_dir),
        "reference": rel(ref_dir / f"{name}.safetensors"),
        "files": sorted(p.name for p in out_dir.iterdir()),
        "num_tensors": len(keys),
        "num_parameters": int(sum(p.numel() for p in ref.parameters())),
        "tie_word_embeddings": tied,
        "seed": tried[-1]["seed"],
        "seeds_tried": tried,
        "input_ids_seed": seed + 5000,
        "num_experts": E,
        "num_experts_per_tok": k,
        "moe_layers": sorted(calls),
        "dense_layers": [i for i in range(ref.config.num_hidden_layers) if i not in calls],
        "router_init_std": opts.get("router_std", ROUTER_STD),
        "min_router_score_margin": margin["score"],
        "min_router_logit_margin": margin["logit"],
        "loss": lm_loss,
        "aux_loss": aux,
        "router_aux_loss_coef": coef,
        "loss_with_aux": total,
        "loss_tokens": BATCH * (SEQ - 1),
        "aux_loss_layers": len(withaux.router_logits),
        "max_abs_logit_diff_roundtrip": roundtrip,
        "experts_implementation": ref.config._experts_implementation,
        "other_experts_implementations": experts_impl_diffs(name, input_ids, logits),
        "reference_tensors": sorted(tensors),
        "disk_keys_layer0": layer0,
        "memory_params_layer0": mem_layer0,
    }
    if hasattr(ref.config, "layer_types") and ref.config.layer_types is not None:
        entry["layer_types"] = list(ref.config.layer_types)
    if getattr(ref.config, "rope_parameters", None) is not None:
        entry["rope_parameters"] = dict(ref.config.rope_parameters)
    if name == "mixtral":
        entry.update(mixtral_window_stats(ref, input_ids, logits))
        entry["sliding_window"] = ref.config.sliding_window
    if name == "olmoe":
        entry["clip"] = olmoe_clip_stats(ref, input_ids)
        assert entry["clip"]["frac_clipped_qkv"] > 0.001 and entry["clip"]["max_abs_logit_diff_vs_no_clip"] > 1e-4
    if name == "gpt_oss":
        st = gpt_oss_stats(ref, input_ids, logits)
        assert st["frac_clamped"] > 0.001, st
        assert st["max_abs_logit_diff_vs_no_window"] > 1e-4 and st["max_abs_logit_diff_vs_plain_rope"] > 1e-4, st
        entry["gpt_oss"] = st
        entry["sliding_window"] = ref.config.sliding_window
    return entry


# ---------------------------------------------------------------------------------------------------
# PEFT


@contextlib.contextmanager
def no_v4_target_conversion():
    """PEFT >= 0.19 on transformers 5 rewrites target_modules for the "qwen2_moe" conversion family
    (qwen3_moe, olmoe, deepseek, ...): gate_proj/up_proj/down_proj are taken OUT of target_modules and
    replaced by target_parameters gate_up_proj/down_proj with rank 2r / alpha 2a on gate_up
    (peft/utils/transformers_weight_conversion.py:409-483, called from tuners/tuners_utils.py:840-845).
    That would silently drop LoRA from the dense MLPs (mlp_only_layers, decoder_sparse_step) and double
    the experts' gate_up rank. These fixtures want the adapter exactly as specified, so the rewrite is
    disabled while the adapter is created; what stock PEFT does is recorded in the manifest."""
    orig = peft_twc.convert_peft_config_for_transformers
    peft_twc.convert_peft_config_for_transformers = lambda *a, **k: None
    try:
        yield
    finally:
        peft_twc.convert_peft_config_for_transformers = orig


def stock_conversion(cfg: LoraConfig, base) -> dict | None:
    """What stock PEFT 0.21 would have turned this config into (None: unchanged)."""
    c = copy.deepcopy(cfg)
    peft_twc.convert_peft_config_for_transformers(c, model=base, conversions=None)

    def norm(x):
        return sorted(x) if isinstance(x, (set, list, tuple)) else x

    before = {k: norm(getattr(cfg, k)) for k in ("target_modules", "target_parameters", "rank_pattern", "alpha_pattern")}
    after = {k: norm(getattr(c, k)) for k in before}
    before["rank_pattern"] = before["rank_pattern"] or {}
    before["alpha_pattern"] = before["alpha_pattern"] or {}
    if before == after:
        return None
    return after


def save_adapter(peft_model, out_dir: Path, base_name: str) -> dict:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    readme = out_dir / "README.md"
    if readme.exists():
        readme.unlink()
    return fix_adapter_config(out_dir, base_name)


def fix_adapter_config(out_dir: Path, base_name: str) -> dict:
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    # peft writes these from sets (hash-order dependent): sort for determinism.
    for key in ("target_modules", "target_parameters"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    cfg["base_model_name_or_path"] = f"models/{base_name}"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return cfg


def wrappers(peft_model) -> dict:
    """adapter key prefix -> the expert parameter its ParamWrapper adapts, with in/out features."""
    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, ParamWrapper):
            out[name] = {
                "parameter": mod.parameter_name,
                "num_experts": int(mod.num_experts),
                "in_features": int(mod.in_features),
                "out_features": int(mod.out_features),
            }
    return dict(sorted(out.items()))


def expert_key_names(peft_model) -> dict:
    """Adapter key (layer 0 of the first MoE layer, as a pattern) for each fused expert parameter."""
    out = {}
    for name, info in wrappers(peft_model).items():
        layer = name.split(".layers.")[1].split(".")[0]
        pat = name.replace(f".layers.{layer}.", ".layers.{L}.")
        out.setdefault(info["parameter"], {"lora_A": f"{pat}.lora_A.weight", "lora_B": f"{pat}.lora_B.weight"})
    return out


def assert_no_router_lora(peft_model) -> None:
    for n, _ in lora_params(peft_model):
        assert ".mlp.gate." not in n and ".mlp.router." not in n and "shared_expert_gate" not in n, n


def try_stock_load(name: str, adapter_dir: Path, logits_expected: torch.Tensor, input_ids) -> dict:
    """Load an adapter with plain PeftModel.from_pretrained (stock conversion on) and compare."""
    base = load_model(name)
    res = {}
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        try:
            pm = PeftModel.from_pretrained(base, str(adapter_dir))
            pm.eval()
            with torch.no_grad():
                lo = pm(input_ids=input_ids).logits
            c = pm.peft_config["default"]
            res["loaded"] = True
            res["max_abs_logit_diff"] = float((lo - logits_expected).abs().max())
            res["config_after_load"] = {
                "target_modules": sorted(c.target_modules) if not isinstance(c.target_modules, str) else c.target_modules,
                "target_parameters": sorted(c.target_parameters or []),
                "rank_pattern": dict(c.rank_pattern or {}),
                "alpha_pattern": dict(c.alpha_pattern or {}),
            }
            res["lora_tensors_after_load"] = len(lora_params(pm))
            res["_logits"] = lo
            res["_model"] = pm
        except Exception as e:  # noqa: BLE001
            res["loaded"] = False
            res["error"] = scrub(f"{type(e).__name__}: {e}")[:1500]
    msgs = []
    for w in ws:
        m = scrub(f"{w.category.__name__}: {w.message}").splitlines()[0][:400]
        if "is_gradient_checkpointing" in m or m in msgs:
            continue
        msgs.append(m)
    res["warnings"] = msgs
    return res


def public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def lora_config_dict(cfg: LoraConfig) -> dict:
    return {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.target_modules),
        "target_parameters": sorted(cfg.target_parameters or []),
        "rank_pattern": dict(cfg.rank_pattern or {}),
        "alpha_pattern": dict(cfg.alpha_pattern or {}),
        "use_rslora": cfg.use_rslora,
        "init_lora_weights": cfg.init_lora_weights,
        "bias": cfg.bias,
    }


def make_lora_config(name: str, init_lora_weights) -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        init_lora_weights=init_lora_weights,
        target_modules=list(PEFT_TARGETS[name]),
        target_parameters=list(EXPERT_PARAMS),
    )


def build_peft(name: str) -> dict:
    model_type = SPECS[name][0]
    ref = load_file(str(MOE / "reference" / f"{name}.safetensors"))
    input_ids = ref["input_ids"]
    labels = make_labels(input_ids)
    tried = []
    for attempt in range(MAX_ATTEMPTS):
        seed = PEFT_SEEDS[name] + 1000 * attempt
        base = load_model(name)
        with torch.no_grad():
            base_logits = base(input_ids=input_ids).logits
        assert float((base_logits - ref["logits"]).abs().max()) <= ROUNDTRIP_TOL
        k = topk(base)
        torch.manual_seed(seed)
        cfg = make_lora_config(name, init_lora_weights=False)
        stock = stock_conversion(cfg, base)
        with no_v4_target_conversion():
            model = get_peft_model(base, cfg)
        model.eval()
        for n, p in model.named_parameters():
            assert p.requires_grad == ("lora_" in n), (n, p.requires_grad)
        assert_no_router_lora(model)
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
        with capture_routers(model) as calls:
            out = model(input_ids=input_ids, labels=labels)
        margin = min_margin(model_type, k, calls)
        tried.append({"seed": seed, "min_score_margin": margin["score"]})
        if margin["score"] > MARGIN:
            break
    else:
        raise SystemExit(f"peft {name}: no seed with router margin > {MARGIN}: {tried}")
    out.loss.backward()
    loss = float(out.loss.detach())
    assert torch.equal(out.logits.detach(), logits)

    pdir = MOE / "peft" / name
    if pdir.exists():
        shutil.rmtree(pdir)
    saved_cfg = save_adapter(model, pdir / "adapter", name)
    key_shapes = {}
    with safe_open(str(pdir / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        file_keys = set(fh.keys())
        for n, p in lora_params(model):
            t = fh.get_tensor(adapter_key(n))
            assert torch.equal(t, p.detach()), n
            key_shapes[adapter_key(n)] = list(t.shape)
    tensors = {"input_ids": input_ids, "labels": labels, "logits": logits.float().contiguous()}
    for n, p in lora_params(model):
        assert p.grad is not None, n
        tensors[f"grad.{adapter_key(n)}"] = p.grad.detach().float().contiguous()
    assert set(key_shapes) == file_keys, set(key_shapes) ^ file_keys
    save_file(tensors, str(pdir / "reference.safetensors"), metadata={"fixture": f"moe/peft/{name}"})

    wr = wrappers(model)
    layer_delta_err = {}
    for wname, info in wr.items():
        w = dict(model.named_modules())[wname]
        E = info["num_experts"]
        A = w.lora_A["default"].weight
        B = w.lora_B["default"].weight
        Ae = A.reshape(E, -1, A.shape[-1])
        Be = B.reshape(B.shape[0], -1, E).permute(2, 0, 1)
        with torch.no_grad():
            expect = w.scaling["default"] * (Be @ Ae)
            got = w.get_delta_weight("default")
        if model.base_model.model.config.model_type == "gpt_oss":
            # gpt_oss stores [E, in, out] (is_transposed=True): the delta is in the parameter's layout.
            # (Shapes alone can't tell: gate_up_proj is [4, 48, 48] here, as 2 * intermediate == hidden.)
            expect = expect.transpose(1, 2)
        assert got.shape == expect.shape
        layer_delta_err[wname] = float((got - expect).abs().max())
    assert max(layer_delta_err.values()) <= 1e-6, layer_delta_err

    stock_load = try_stock_load(name, pdir / "adapter", logits, input_ids)
    entry = {
        "base_model": f"models/{name}",
        "adapter": rel(pdir / "adapter"),
        "reference": rel(pdir / "reference.safetensors"),
        "seed": tried[-1]["seed"],
        "seeds_tried": tried,
        "lora_config": lora_config_dict(cfg),
        "adapter_config_target_modules": saved_cfg.get("target_modules"),
        "adapter_config_target_parameters": saved_cfg.get("target_parameters"),
        "loss": loss,
        "loss_tokens": n_loss_tokens(labels),
        "labels_masking": "labels = input_ids with labels[0,:4] = labels[1,-2:] = -100",
        "output_router_logits": False,
        "lora_B_scaled_by": b_scale,
        "max_abs_logit_delta_vs_base": delta,
        "min_router_score_margin": margin["score"],
        "min_router_logit_margin": margin["logit"],
        "scalings": scalings(model),
        "param_wrappers": wr,
        "expert_lora_keys": expert_key_names(model),
        "max_abs_err_delta_vs_reshape_formula": max(layer_delta_err.values()),
        "adapter_keys": dict(sorted(key_shapes.items())),
        "grad_keys": len(key_shapes),
        "stock_peft_would_convert_config_to": stock,
        "stock_peft_load": public(stock_load),
    }
    if name in PER_EXPERT:
        entry["per_expert"] = build_per_expert(name, model, saved_cfg, logits, input_ids, labels)
    if name in MERGED_STORED:
        entry["merged"] = build_merged(name, model, logits, input_ids, pdir)
    return entry


def to_per_expert(name: str, sd3: dict, config) -> dict:
    """Format (b) (3-D ParamWrapper) adapter state -> format (a) (2-D per expert), exactly."""
    E = n_experts(config)
    I = int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)
    if config.model_type == "mixtral":
        block, gname, uname, dname = "block_sparse_moe", "w1", "w3", "w2"
    else:
        block, gname, uname, dname = "mlp", "gate_proj", "up_proj", "down_proj"
    out = {}
    for k, v in sd3.items():
        if ".mlp.experts." not in k:
            out[k] = v.clone().contiguous()
            continue
        prefix, rest = k.split(".mlp.experts.")
        if rest in ("base_layer.lora_A.weight", "base_layer.lora_B.weight"):  # gate_up_proj
            kind = "gate_up"
        elif rest in ("lora_A.weight", "lora_B.weight"):  # down_proj
            kind = "down"
        else:
            raise AssertionError(k)
        ab = rest.split(".")[-2]
        for e in range(E):
            ek = f"{prefix}.{block}.experts.{e}"
            if ab == "lora_A":
                Ae = v.reshape(E, -1, v.shape[-1])[e].clone().contiguous()  # [r, in]
                if kind == "gate_up":
                    out[f"{ek}.{gname}.lora_A.weight"] = Ae
                    out[f"{ek}.{uname}.lora_A.weight"] = Ae.clone()
                else:
                    out[f"{ek}.{dname}.lora_A.weight"] = Ae
            else:
                Be = v.reshape(v.shape[0], -1, E)[:, :, e].clone().contiguous()  # [out, r]
                if kind == "gate_up":
                    assert Be.shape[0] == 2 * I
                    out[f"{ek}.{gname}.lora_B.weight"] = Be[:I].clone().contiguous()
                    out[f"{ek}.{uname}.lora_B.weight"] = Be[I:].clone().contiguous()
                else:
                    out[f"{ek}.{dname}.lora_B.weight"] = Be
    return dict(sorted(out.items()))


def build_per_expert(name: str, model, saved_cfg: dict, logits3d, input_ids, labels) -> dict:
    config = model.base_model.model.config
    sd3 = load_file(str(MOE / "peft" / name / "adapter" / "adapter_model.safetensors"))
    sd2 = to_per_expert(name, sd3, config)
    pdir = MOE / "peft" / f"{name}_per_expert"
    if pdir.exists():
        shutil.rmtree(pdir)
    adir = pdir / "adapter"
    adir.mkdir(parents=True)
    save_file(sd2, str(adir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = dict(saved_cfg)
    expert_names = ["w1", "w2", "w3"] if config.model_type == "mixtral" else DENSE
    cfg["target_modules"] = sorted(set(PEFT_TARGETS[name]) | set(expert_names))
    cfg["target_parameters"] = None
    (adir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))

    # exactness of the conversion: per-expert deltas == the ParamWrapper deltas
    conv_err = 0.0
    E = n_experts(config)
    for wname, info in wrappers(model).items():
        w = dict(model.named_modules())[wname]
        with torch.no_grad():
            got = w.get_delta_weight("default")  # [E, out, in]
        prefix = "base_model.model." + wname.removeprefix("base_model.model.").split(".mlp.experts")[0]
        block = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"
        s = w.scaling["default"]
        for e in range(E):
            ek = f"{prefix}.{block}.experts.{e}"
            if info["parameter"] == "gate_up_proj":
                g, u = ("w1", "w3") if block == "block_sparse_moe" else ("gate_proj", "up_proj")
                d = torch.cat(
                    [s * sd2[f"{ek}.{g}.lora_B.weight"] @ sd2[f"{ek}.{g}.lora_A.weight"],
                     s * sd2[f"{ek}.{u}.lora_B.weight"] @ sd2[f"{ek}.{u}.lora_A.weight"]]
                )
            else:
                dn = "w2" if block == "block_sparse_moe" else "down_proj"
                d = s * sd2[f"{ek}.{dn}.lora_B.weight"] @ sd2[f"{ek}.{dn}.lora_A.weight"]
            conv_err = max(conv_err, float((d - got[e]).abs().max()))
    assert conv_err <= 1e-6, conv_err

    res = try_stock_load(name, adir, logits3d, input_ids)
    entry = {
        "adapter": rel(adir),
        "reference": rel(pdir / "reference.safetensors"),
        "target_modules": cfg["target_modules"],
        "num_keys": len(sd2),
        "keys_layer0": {k: list(v.shape) for k, v in sd2.items() if ".layers.0." in k and ".experts.0." in k},
        "max_abs_err_delta_vs_3d": conv_err,
        "conversion": "expert e: A_e = A.reshape(E, r, in)[e], B_e = B.reshape(out, r, E)[:, :, e]; gate_up: "
        "gate_proj/w1 gets B_e[:I], up_proj/w3 gets B_e[I:], both the same A_e; scaling alpha/r unchanged",
        "peft_load": public(res),
    }
    meta = {"fixture": f"moe/peft/{name}_per_expert"}
    tensors = {"input_ids": input_ids, "labels": labels}
    if res.get("loaded"):
        lo = res["_logits"]
        pm = res["_model"]
        pl = entry["peft_load"]
        diff = float((lo - logits3d).abs().max())
        pl["max_abs_logit_diff_vs_3d"] = diff
        loaded_wr = wrappers(pm)
        pl["param_wrappers_after_load_layer0"] = {k: v for k, v in loaded_wr.items() if ".layers.0." in k}
        pl["scalings_after_load_layer0"] = {k: v for k, v in scalings(pm).items() if k.startswith("model.layers.0.")}
        loaded_keys = {adapter_key(n) for n, _ in lora_params(pm)}
        missing = sorted(k for k in sd2 if ".experts." not in k and k not in loaded_keys)
        pl["adapter_keys_not_loaded"] = missing
        with torch.no_grad():
            deltas = [
                float((dict(pm.named_modules())[w].get_delta_weight("default") - dict(model.named_modules())[w].get_delta_weight("default")).abs().max())
                for w in loaded_wr
            ]
        pl["max_abs_err_expert_delta_after_load"] = max(deltas) if deltas else None
        if missing:
            # Is the dropped LoRA the whole difference? Zero it in the 3-D adapter and compare.
            m2 = copy.deepcopy(model)
            with torch.no_grad():
                for n, p in lora_params(m2):
                    if adapter_key(n) in missing and ".lora_B." in n:
                        p.zero_()
                l2 = m2(input_ids=input_ids).logits
            pl["max_abs_logit_diff_vs_3d_with_unloaded_keys_zeroed"] = float((lo - l2).abs().max())
        if diff <= 1e-5:
            tensors["logits"] = lo.float().contiguous()
        else:
            # Not the adapter's logits: kept under another name so no test mistakes them for the golden.
            tensors["logits_peft"] = lo.float().contiguous()
            entry["note"] = (
                "PEFT dropped LoRA tensors on load (peft_load.adapter_keys_not_loaded), so its logits are stored "
                "as logits_peft, not logits; the adapter's true logits are those of the 3-D adapter "
                f"(peft/{name}/reference.safetensors logits)"
            )
    else:
        entry["note"] = "PEFT could not load the adapter (peft_load.error)"
    # one metadata key only: safetensors writes the metadata map in hash order (not reproducible)
    save_file(tensors, str(pdir / "reference.safetensors"), metadata=meta)
    entry["reference_tensors"] = sorted(tensors)
    return entry


def build_merged(name: str, model, logits, input_ids, pdir: Path) -> dict:
    merged = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    with torch.no_grad():
        mlogits = merged(input_ids=input_ids).logits
    base_sd = load_file(str(MOE / "models" / name / "model.safetensors"))
    with tempfile.TemporaryDirectory() as d:
        merged.save_pretrained(d)
        msd = load_file(str(Path(d) / "model.safetensors"))
    assert sorted(msd) == sorted(base_sd), set(msd) ^ set(base_sd)
    changed = {k: v.float().contiguous() for k, v in msd.items() if not torch.equal(v, base_sd[k])}
    save_file(dict(sorted(changed.items())), str(pdir / "merged.safetensors"), metadata={"fixture": f"moe/peft/{name}/merged"})
    unchanged = sorted(k for k in msd if k not in changed)
    return {
        "path": rel(pdir / "merged.safetensors"),
        "max_abs_logit_diff_merged_vs_peft": float((mlogits - logits).abs().max()),
        "changed_disk_keys": len(changed),
        "changed_disk_keys_layer0": sorted(k for k in changed if k.startswith("model.layers.0.")),
        "unchanged_disk_keys": unchanged,
        "note": "merge_and_unload() then save_pretrained (per-expert Hub layout); every disk tensor that differs "
        "from models/<name>/model.safetensors, under its disk key",
    }


# ---------------------------------------------------------------------------------------------------
# training curve


def build_train(base_name: str, seed: int) -> dict:
    name = f"{base_name}_train"
    model_type = SPECS[base_name][0]
    tdir = MOE / "peft" / name
    if tdir.exists():
        shutil.rmtree(tdir)
    base = load_model(base_name)
    k = topk(base)
    torch.manual_seed(seed)
    cfg = make_lora_config(base_name, init_lora_weights=True)
    with no_v4_target_conversion():
        model = get_peft_model(base, cfg)
    for n, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in n), n
    assert_no_router_lora(model)
    save_adapter(model, tdir / "initial_adapter", base_name)

    input_ids, labels = train_batches(seed + 1)
    params = [p for _, p in lora_params(model)]
    opt = torch.optim.AdamW(params, foreach=False, **OPT)
    sched = get_linear_schedule_with_warmup(opt, WARMUP, TRAIN_STEPS)
    model.train()
    losses, norms, lrs, tokens, margins = [], [], [], [], []
    for s in range(TRAIN_STEPS):
        opt.zero_grad(set_to_none=True)
        with capture_routers(model) as calls:
            out = model(input_ids=input_ids[s], labels=labels[s])
        margins.append(min_margin(model_type, k, calls))
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        lrs.append(float(opt.param_groups[0]["lr"]))
        losses.append(float(out.loss.detach()))
        norms.append(float(gn))
        tokens.append(n_loss_tokens(labels[s]))
        opt.step()
        sched.step()
    model.eval()
    final_losses = []
    with torch.no_grad(), capture_routers(model) as calls:
        for s in range(TRAIN_STEPS):
            final_losses.append(float(model(input_ids=input_ids[s], labels=labels[s]).loss))
    final_margin = min_margin(model_type, k, calls)
    save_adapter(model, tdir / "final_adapter", base_name)
    save_file({"input_ids": input_ids, "labels": labels}, str(tdir / "reference.safetensors"), metadata={"fixture": f"moe/peft/{name}"})
    return {
        "base_model": f"models/{base_name}",
        "initial_adapter": rel(tdir / "initial_adapter"),
        "final_adapter": rel(tdir / "final_adapter"),
        "reference": rel(tdir / "reference.safetensors"),
        "seed": seed,
        "lora_config": {
            **lora_config_dict(cfg),
            "note": "PEFT default init: lora_A kaiming-uniform(a=sqrt(5)), lora_B zeros (also for the ParamWrapper "
            "expert LoRA); PEFT's v4->v5 target rewrite disabled as for the peft/ fixtures",
        },
        "steps": TRAIN_STEPS,
        "micro_batch": [BATCH, SEQ],
        "losses": losses,
        "grad_norms": norms,
        "lrs": lrs,
        "loss_tokens": tokens,
        "final_losses_per_batch": final_losses,
        "output_router_logits": False,
        # Not re-seeded (the loop is fixed): the smallest top-k gaps seen while training, for judging
        # how close a routing flip is (a flip changes the curve from that step on).
        "min_router_score_margin_per_step": [m["score"] for m in margins],
        "min_router_logit_margin_per_step": [m["logit"] for m in margins],
        "min_router_score_margin_final_eval": final_margin["score"],
        "min_router_logit_margin_final_eval": final_margin["logit"],
        "optimizer": {
            "name": "torch.optim.AdamW",
            "lr": OPT["lr"],
            "betas": list(OPT["betas"]),
            "eps": OPT["eps"],
            "weight_decay": OPT["weight_decay"],
            "amsgrad": False,
            "maximize": False,
            "params": "only lora_A/lora_B weights (one param group)",
            "grad_clip": {"fn": "torch.nn.utils.clip_grad_norm_", "max_norm": MAX_GRAD_NORM, "norm_type": 2.0},
        },
        "schedule": "transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)",
        "loop": "identical to tests/fixtures/manifest.json train.*.loop (make_peft_fixtures.build_train)",
    }


# ---------------------------------------------------------------------------------------------------


DESCRIPTION = (
    "Mixture-of-Experts reference fixtures: tiny random MoE checkpoints in Hub layout (save_pretrained of "
    "transformers 5.24), golden logits / hidden states / routing, losses with and without the load-balancing "
    "aux loss, PEFT 0.21 LoRA adapters with fused-expert LoRA (target_parameters), a per-expert (format a) "
    "conversion, merged weights and a 10-step training curve. See README.md."
)

CONVENTIONS = {
    "dtype": "float32 on CPU, attn_implementation=eager, experts_implementation=eager, 1 thread, deterministic",
    "tokens": "router tensors are over the flattened batch: row t = batch t // 13, position t % 13",
    "router.<i>.logits": "raw router logits x @ W_router^T (+ bias for gpt_oss), as the router module returns them",
    "router.<i>.experts": "expert ids in torch.topk order: descending selection score (softmax prob; gpt_oss: logit)",
    "router.<i>.weights": "the routing weights the experts are multiplied by, in the same order as experts: "
    "softmax(logits)[topk] (/ their sum when norm_topk_prob; mixtral always), gpt_oss softmax over the k logits",
    "router_margin": "every stored forward has (k-th - (k+1)-th selection score) > 1e-3 for every token",
    "hidden.layer.<i>": "output of decoder layer i (residual stream after the layer)",
    "loss": "LM loss alone (labels=input_ids, output_router_logits off); aux_loss = model output aux_loss with "
    "output_router_logits=True; loss_with_aux = loss + router_aux_loss_coef * aux_loss",
}

TOLERANCES = {"logits_f32_abs": 1e-4, "roundtrip_abs": ROUNDTRIP_TOL}


def write_manifest(models: dict, peft_entries: dict, train: dict) -> None:
    order = {n: i for i, n in enumerate(MODEL_NAMES)}
    write_json(
        MANIFEST,
        {
            "description": DESCRIPTION,
            "generator": "scripts/reference/make_moe_fixtures.py",
            "versions": versions(),
            "tolerances": TOLERANCES,
            "conventions": CONVENTIONS,
            "models": {k: models[k] for k in sorted(models, key=lambda k: order.get(k, 99))},
            "peft": {k: peft_entries[k] for k in sorted(peft_entries, key=lambda k: order.get(k, 99))},
            "train": train,
        },
    )


def build_all_for(name: str, models: dict, peft_entries: dict, train: dict) -> None:
    if name == f"{TRAIN_BASE}_train":
        print(f"[moe] train {TRAIN_BASE}", flush=True)
        train[name] = build_train(TRAIN_BASE, TRAIN_SEED)
        return
    if name not in SPECS:
        raise SystemExit(f"unknown fixture {name!r}: one of {MODEL_NAMES + [TRAIN_BASE + '_train']}")
    t = time.time()
    print(f"[moe] model {name}", flush=True)
    models[name] = build_model(name)
    print(f"[moe] peft {name}", flush=True)
    peft_entries[name] = build_peft(name)
    print(f"[moe]   {name}: {time.time() - t:.1f}s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="rebuild only this model (+ its adapters) or NAME_train (repeatable)")
    args = ap.parse_args()
    setup_determinism()
    t0 = time.time()
    if args.only:
        m = load_manifest()
        models, peft_entries, train = dict(m.get("models", {})), dict(m.get("peft", {})), dict(m.get("train", {}))
        for name in args.only:
            build_all_for(name, models, peft_entries, train)
    else:
        for sub in ("models", "reference", "peft"):
            if (MOE / sub).exists():
                shutil.rmtree(MOE / sub)
        models, peft_entries, train = {}, {}, {}
        for name in MODEL_NAMES + [f"{TRAIN_BASE}_train"]:
            build_all_for(name, models, peft_entries, train)
    write_manifest(models, peft_entries, train)
    print(f"[moe] done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
