#!/usr/bin/env python
"""Qwen 3.5 / Qwen3-Next (Gated DeltaNet hybrid) reference fixtures.

transformers 5.25.0 + peft 0.22.0 + torch 2.15.0 on the CPU; run by hand, never in CI.

    python3 -m venv /work/venv-q35
    /work/venv-q35/bin/pip install -r scripts/reference/requirements-qwen35.txt
    /work/venv-q35/bin/python scripts/reference/make_qwen35_fixtures.py            # everything (a few minutes)
    /work/venv-q35/bin/python scripts/reference/make_qwen35_fixtures.py --only ops # one part (repeatable):
        ops | <model name> (model + its references) | peft | train

Everything goes to tests/fixtures/qwen35/ with its own manifest.json (layout, tensor names and conventions
in tests/fixtures/qwen35/README.md). Goldens come from transformers' pure-torch path: the script refuses to
run when `fla` (flash-linear-attention) or `causal_conv1d` is importable.

tests/fixtures/qwen35/models/<name>/          config.json + model.safetensors (save_pretrained; see README)
tests/fixtures/qwen35/reference/<name>.safetensors
tests/fixtures/qwen35/ops/gated_delta_rule.safetensors
tests/fixtures/qwen35/peft/<name>/            adapter/ + reference.safetensors (+ merged.safetensors)
tests/fixtures/qwen35/peft/qwen3_5_text_train{,_gc}/  initial_adapter/, final_adapter/, reference.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

# (`kernels`, the Hub-kernels client, is a dependency of transformers 5.25; it is only used when a model is
# loaded with use_kernels=True / kernelize(), which this script never does, and it could not download anything.)
for _mod in ("fla", "causal_conv1d"):
    if importlib.util.find_spec(_mod) is not None:
        raise SystemExit(f"{_mod} is importable: goldens must come from transformers' pure-torch path")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FIXTURES, REPO_ROOT, setup_determinism, versions, write_json  # noqa: E402

# The PEFT conventions (training loop constants, key naming) are shared with the other fixtures.
from make_peft_fixtures import (  # noqa: E402
    MAX_GRAD_NORM,
    OPT,
    TRAIN_STEPS,
    WARMUP,
    adapter_key,
    lora_params,
    n_loss_tokens,
    scalings,
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import peft.utils.transformers_weight_conversion as peft_twc  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import ParamWrapper  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    get_linear_schedule_with_warmup,
)
from transformers.models.qwen3_5 import modeling_qwen3_5 as mq35  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()

OUT = FIXTURES / "qwen35"
MANIFEST = OUT / "manifest.json"

VOCAB = 128
ID_LOW, ID_HIGH = 3, 120  # input ids are uniform in [3, 120): 0 = pad, 1 = bos, 2 = eos, 120..127 unused
PAD_ID = 0
# the VLM special tokens sit inside the tiny vocabulary but are never used in inputs
VLM_TOKENS = dict(vision_start_token_id=122, vision_end_token_id=123, image_token_id=124, video_token_id=125)

BATCH_T = 100  # 2 rows of 100: not a multiple of 64, two chunks
LONG_T = 150  # one row of 150: three chunks
PAD_T, PAD_REAL = 150, (150, 97)  # left-padded batch: row 0 has 150 real tokens, row 1 has 97 (53 pads first)
GEN_PROMPT, GEN_NEW = 70, 20

ROPE = {
    "rope_type": "default",
    "rope_theta": 1e7,
    "partial_rotary_factor": 0.25,
    "mrope_section": [1, 1, 0],
    "mrope_interleaved": True,
}
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    rope_parameters=ROPE,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    attention_dropout=0.0,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=8,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=64,
    num_position_embeddings=16,
)
LIN, FULL = "linear_attention", "full_attention"


def _no_intermediate(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "intermediate_size"}


# name -> spec. "weights_from": the VLM wrappers reuse the text model's weights (their text-only logits are
# then those of the text model), plus a random vision tower.
SPECS = {
    "qwen3_5_text": dict(model_type="qwen3_5_text", kwargs=dict(TEXT, tie_word_embeddings=True), seed=3501),
    "qwen3_5_text_r3": dict(
        model_type="qwen3_5_text",
        kwargs=dict(
            TEXT,
            linear_num_value_heads=6,
            num_hidden_layers=5,
            layer_types=[LIN, FULL, LIN, LIN, FULL],
            tie_word_embeddings=False,
        ),
        seed=3502,
    ),
    "qwen3_5": dict(
        model_type="qwen3_5",
        kwargs=dict(text_config=dict(TEXT, tie_word_embeddings=True), vision_config=VISION, tie_word_embeddings=True, **VLM_TOKENS),
        seed=3503,
        weights_from="qwen3_5_text",
        mtp={
            # a 1-layer MTP head as the Hub checkpoints carry one (names as in the Hub files; shapes for H=64)
            "mtp.fc.weight": [64, 128],
            "mtp.pre_fc_norm_embedding.weight": [64],
            "mtp.pre_fc_norm_hidden.weight": [64],
            "mtp.layers.0.input_layernorm.weight": [64],
            "mtp.layers.0.self_attn.q_proj.weight": [128, 64],
            "mtp.layers.0.mlp.up_proj.weight": [48, 64],
            "mtp.norm.weight": [64],
        },
    ),
    "qwen3_5_moe_text": dict(
        model_type="qwen3_5_moe_text",
        kwargs=dict(_no_intermediate(TEXT), tie_word_embeddings=True, **MOE),
        seed=3504,
    ),
    "qwen3_5_moe": dict(
        model_type="qwen3_5_moe",
        kwargs=dict(
            text_config=dict(_no_intermediate(TEXT), tie_word_embeddings=True, **MOE),
            vision_config=VISION,
            tie_word_embeddings=True,
            **VLM_TOKENS,
        ),
        seed=3505,
        weights_from="qwen3_5_moe_text",
        fuse_experts=True,
        mtp={
            "mtp.fc.weight": [64, 128],
            "mtp.layers.0.mlp.shared_expert.up_proj.weight": [32, 64],
            "mtp.norm.weight": [64],
        },
    ),
    "qwen3_next": dict(
        model_type="qwen3_next",
        kwargs=dict(
            TEXT,
            rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            tie_word_embeddings=False,
            **MOE,
        ),
        seed=3506,
    ),
}
MODEL_NAMES = list(SPECS)
VLMS = {"qwen3_5", "qwen3_5_moe"}
MOES = {"qwen3_5_moe_text", "qwen3_5_moe", "qwen3_next"}
HIDDEN_STORED = {"qwen3_5_text"}  # size budget

WEIGHT_STD = 0.15
EMBED_STD = 0.15
BIAS_STD = 0.1
ROUTER_STD = 0.3
CONV_STD = 0.5
NORM1P_STD = 0.2  # (1+w) RMSNorms (zero-init in transformers): w ~ N(0, 0.2)
GATED_NORM_STD = 0.2  # the GDN gated norm (plain w, ones-init): 1 + N(0, 0.2)
DT_RANGE = (0.001, 0.1)  # softplus(dt_bias): FLA's dt_min / dt_max
A_RANGE = (0.01, 16.0)

# k-th vs (k+1)-th router LOGIT must differ by more than this for every token of every stored forward.
# (The moe fixtures bound the probability gap by 1e-3; with 650 tokens x 4 layers per model that almost never
# passes, and a probability gap of 1e-5 between two small probabilities is still a logit gap of ~1e-2. Top-k
# over softmax probabilities is top-k over logits, so the logit gap is what a routing flip needs to overcome.)
MARGIN = 1e-3
MAX_ATTEMPTS = 100
ROUNDTRIP_TOL = 1e-6
MIN_LOGIT_DELTA = 0.5

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
GDN = ["in_proj_qkv", "in_proj_z", "out_proj"]
TEXT10 = ATTN + MLP + GDN
TEXT_ONLY_RE = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|in_proj_qkv|in_proj_z|out_proj)"
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# adapter name -> base model, LoraConfig kwargs, seed, what to store
PEFT_SPECS = {
    "qwen3_5_text": dict(
        base="qwen3_5_text",
        cfg=dict(r=8, lora_alpha=16, target_modules=TEXT10, rank_pattern={"in_proj_z": 4}, alpha_pattern={"o_proj": 8}),
        seed=3521,
        merged=True,
    ),
    "qwen3_5_text_ab": dict(
        base="qwen3_5_text",
        cfg=dict(r=4, lora_alpha=16, target_modules=TEXT10 + ["in_proj_a", "in_proj_b"]),
        seed=3522,
    ),
    # the VLM adapter carries the qwen3_5_text adapter's LoRA weights under the VLM module paths (same ranks and
    # scalings, regex targets that skip the vision tower): its logits and merged weights equal the text adapter's
    "qwen3_5": dict(
        base="qwen3_5",
        cfg=dict(r=8, lora_alpha=16, target_modules=TEXT_ONLY_RE, rank_pattern={"in_proj_z": 4}, alpha_pattern={"o_proj": 8}),
        seed=3523,
        merged=True,
        copy_from="qwen3_5_text",
    ),
    "qwen3_5_moe_text": dict(
        base="qwen3_5_moe_text",
        cfg=dict(
            r=4,
            lora_alpha=16,
            target_modules=ATTN + GDN + ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"],
            target_parameters=EXPERT_PARAMS,
        ),
        seed=3524,
    ),
    "qwen3_next": dict(
        base="qwen3_next",
        cfg=dict(r=8, lora_alpha=16, target_modules=ATTN + ["in_proj_qkvz", "in_proj_ba", "out_proj"]),
        seed=3525,
    ),
}
TRAIN_BASE = "qwen3_5_text"
TRAIN_SEED = 3531
TRAIN_T = 100
TRAIN_TARGETS = TEXT10


def rel(path: Path) -> str:
    return str(Path(path).resolve().relative_to(OUT.resolve()))


def scrub(text: str) -> str:
    text = str(text).replace(str(OUT.resolve()) + "/", "").replace(str(REPO_ROOT.resolve()) + "/", "")
    site = str(Path(torch.__file__).resolve().parents[1]) + "/"
    return text.replace(site, "site-packages/")


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


def disk_keys(path: Path) -> dict:
    keys = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                keys[k] = {"shape": list(sl.get_shape()), "dtype": sl.get_dtype()}
    return dict(sorted(keys.items()))


# ---------------------------------------------------------------------------------------------------
# inputs


def rand_ids(seed: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(ID_LOW, ID_HIGH, shape, generator=g, dtype=torch.int64)


def make_inputs(seed: int) -> dict:
    batch = rand_ids(seed + 5000, (2, BATCH_T))
    long = rand_ids(seed + 5001, (1, LONG_T))
    padded = rand_ids(seed + 5002, (2, PAD_T))
    mask = torch.ones(2, PAD_T, dtype=torch.int64)
    for row, real in enumerate(PAD_REAL):
        padded[row, : PAD_T - real] = PAD_ID
        mask[row, : PAD_T - real] = 0
    return {"batch": batch, "long": long, "padded": padded, "padded_mask": mask}


def make_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """As make_peft_fixtures.make_labels: labels = input_ids, labels[0,:4] = labels[1,-2:] = -100."""
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, -2:] = -100
    return labels


# ---------------------------------------------------------------------------------------------------
# models


def make_config(name: str):
    s = SPECS[name]
    return AutoConfig.for_model(s["model_type"], **copy.deepcopy(s["kwargs"]))


def text_config(config):
    return getattr(config, "text_config", None) or config


def new_model(name: str, config):
    kw = dict(attn_implementation="eager", dtype=torch.float32)
    if name in MOES:
        kw["experts_implementation"] = "eager"
    if name in VLMS:
        return AutoModelForImageTextToText.from_config(config, **kw)
    return AutoModelForCausalLM.from_config(config, **kw)


def load_model(name: str, path: Path | None = None, causal_lm: bool = False):
    path = path or OUT / "models" / name
    kw = dict(dtype=torch.float32, attn_implementation="eager", local_files_only=True)
    if name in MOES:
        kw["experts_implementation"] = "eager"
    auto = AutoModelForImageTextToText if (name in VLMS and not causal_lm) else AutoModelForCausalLM
    model = auto.from_pretrained(str(path), **kw)
    model.eval()
    return model


def reinit_weights(model, seed: int) -> dict:
    """Seeded random values for every parameter; returns the A (= exp(A_log)) values per layer."""
    torch.manual_seed(seed)
    a_values = {}
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are yielded once
            visual = ".visual." in name or name.startswith("visual.")
            if name.endswith(".A_log"):
                n = p.numel()
                lo, hi = math.log(A_RANGE[0]), math.log(A_RANGE[1])
                a = torch.exp(torch.linspace(lo, hi, n))[torch.randperm(n)]
                p.copy_(torch.log(a))
                a_values[name] = [float(x) for x in a]
            elif name.endswith(".dt_bias"):
                # As FLA / Mamba-2 initialise it for training (and as trained checkpoints keep it):
                # softplus(dt_bias) = dt log-uniform in [DT_RANGE], i.e. dt_bias = dt + log(-expm1(-dt)).
                # transformers' own init (ones) gives decays of e^-20 per token with A = 16, where the
                # f32 chunked form's cumulative sums lose 1e-4 and the fixture stops telling a bug
                # from rounding (transformers' chunked and recurrent logits then differ by 1.2e-4).
                lo, hi = math.log(DT_RANGE[0]), math.log(DT_RANGE[1])
                dt = torch.exp(torch.rand_like(p) * (hi - lo) + lo)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * BIAS_STD)
            elif name.endswith("linear_attn.norm.weight"):  # gated RMSNorm: y = w * norm(x) * silu(z)
                p.copy_(1.0 + torch.randn_like(p) * GATED_NORM_STD)
            elif p.dim() == 1 and visual:  # vision LayerNorms (plain w)
                p.copy_(1.0 + torch.randn_like(p) * 0.1)
            elif p.dim() == 1:  # every other text RMSNorm is (1 + w), zero-init in transformers
                p.copy_(torch.randn_like(p) * NORM1P_STD)
            elif name.endswith("conv1d.weight"):
                p.copy_(torch.randn_like(p) * CONV_STD)
            elif "embed_tokens" in name or name.endswith("lm_head.weight"):
                p.copy_(torch.randn_like(p) * EMBED_STD)
            elif name.endswith(".mlp.gate.weight"):
                p.copy_(torch.randn_like(p) * ROUTER_STD)
            else:
                p.copy_(torch.randn_like(p) * WEIGHT_STD)
    return a_values


def decoder(model):
    """The text decoder (`.layers`, `.norm`), for causal LMs, VLMs and PEFT wrappers."""
    m = model
    if isinstance(m, PeftModel):
        m = m.base_model.model
    m = m.model
    return getattr(m, "language_model", m)


def routers(model) -> dict:
    out = {}
    for i, layer in enumerate(decoder(model).layers):
        if hasattr(layer.mlp, "experts"):
            out[i] = layer.mlp.gate
    return out


@contextlib.contextmanager
def capture_routers(model):
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


def min_margin(k: int, calls: dict) -> dict:
    score_gap, logit_gap = math.inf, math.inf
    for per_layer in calls.values():
        for logits, _, _ in per_layer:
            s = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True).values
            score_gap = min(score_gap, float((s[:, k - 1] - s[:, k]).min()))
            ls = logits.float().sort(dim=-1, descending=True).values
            logit_gap = min(logit_gap, float((ls[:, k - 1] - ls[:, k]).min()))
    return {"score": score_gap, "logit": logit_gap}


def forward_all(model, inputs: dict, hidden: bool = False) -> dict:
    """The three stored forwards (no position_ids passed anywhere)."""
    out = {}
    captured = {}
    hooks = []
    if hidden:
        dec = decoder(model)
        for i, layer in enumerate(dec.layers):
            hooks.append(
                layer.register_forward_hook(
                    lambda mod, inp, o, i=i: captured.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach().clone())
                )
            )
        hooks.append(dec.norm.register_forward_hook(lambda mod, inp, o: captured.__setitem__("norm", o.detach().clone())))
        hooks.append(dec.embed_tokens.register_forward_hook(lambda mod, inp, o: captured.__setitem__("embed", o.detach().clone())))
    with torch.no_grad():
        out["batch"] = model(input_ids=inputs["batch"]).logits.float()
        captured.clear()
        long = model(input_ids=inputs["long"], labels=inputs["long"])
        for h in hooks:
            h.remove()
        out["long"] = long.logits.float()
        out["long_loss"] = float(long.loss)
        out["padded"] = model(input_ids=inputs["padded"], attention_mask=inputs["padded_mask"]).logits.float()
    out["hidden"] = captured
    return out


def forwards_with_margin(model, inputs: dict, k: int, hidden: bool = False):
    with capture_routers(model) as calls:
        out = forward_all(model, inputs, hidden)
    return out, min_margin(k, calls)


@contextlib.contextmanager
def recurrent_instead_of_chunk(model):
    """Run every GDN layer through torch_recurrent_gated_delta_rule (the definition) instead of the chunked form."""
    mod = sys.modules[type(decoder(model).layers[0]).__module__]
    orig = mod.torch_chunk_gated_delta_rule
    rec = mod.torch_recurrent_gated_delta_rule

    def as_recurrent(q, k, v, g, beta, chunk_size=64, **kw):
        return rec(q, k, v, g=g, beta=beta, **kw)

    mod.torch_chunk_gated_delta_rule = as_recurrent
    try:
        yield
    finally:
        mod.torch_chunk_gated_delta_rule = orig


def add_mtp(path: Path, mtp: dict, seed: int) -> dict:
    """Append fake MTP tensors to model.safetensors (the loader must ignore them, a merge must copy them)."""
    f = path / "model.safetensors"
    with safe_open(str(f), "pt") as fh:
        meta = fh.metadata()
    sd = load_file(str(f))
    g = torch.Generator().manual_seed(seed)
    for k, shape in mtp.items():
        sd[k] = (torch.randn(shape, generator=g) * 0.1).contiguous()
    save_file(dict(sorted(sd.items())), str(f), metadata=meta)
    return {k: list(v) for k, v in mtp.items()}


def fuse_experts_on_disk(path: Path, num_experts: int) -> dict:
    """Rewrite per-expert keys (what save_pretrained writes) into the fused Hub layout of Qwen3.5-MoE:
    mlp.experts.gate_up_proj [E, 2I, H] (gate rows first, then up) and mlp.experts.down_proj [E, H, I]."""
    f = path / "model.safetensors"
    with safe_open(str(f), "pt") as fh:
        meta = fh.metadata()
    sd = load_file(str(f))
    out, prefixes = {}, set()
    for k, v in sd.items():
        if ".mlp.experts." in k:
            prefixes.add(k.split(".mlp.experts.")[0])
        else:
            out[k] = v
    for p in sorted(prefixes):
        gate = [sd[f"{p}.mlp.experts.{e}.gate_proj.weight"] for e in range(num_experts)]
        up = [sd[f"{p}.mlp.experts.{e}.up_proj.weight"] for e in range(num_experts)]
        down = [sd[f"{p}.mlp.experts.{e}.down_proj.weight"] for e in range(num_experts)]
        out[f"{p}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([g_, u_]) for g_, u_ in zip(gate, up)]).contiguous()
        out[f"{p}.mlp.experts.down_proj"] = torch.stack(down).contiguous()
    save_file(dict(sorted(out.items())), str(f), metadata=meta)
    return {"layers": len(prefixes)}


def dims(config) -> dict:
    tc = text_config(config)
    d = {
        "vocab_size": tc.vocab_size,
        "hidden_size": tc.hidden_size,
        "num_hidden_layers": tc.num_hidden_layers,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": tc.head_dim,
        "q_proj_rows": 2 * tc.num_attention_heads * tc.head_dim,
        "rotary_dim": int(tc.head_dim * tc.rope_parameters.get("partial_rotary_factor", 1.0)),
        "rms_norm_eps": tc.rms_norm_eps,
        "linear_num_key_heads": tc.linear_num_key_heads,
        "linear_num_value_heads": tc.linear_num_value_heads,
        "gva_ratio_r": tc.linear_num_value_heads // tc.linear_num_key_heads,
        "linear_key_head_dim": tc.linear_key_head_dim,
        "linear_value_head_dim": tc.linear_value_head_dim,
        "linear_conv_kernel_dim": tc.linear_conv_kernel_dim,
        "conv_dim": 2 * tc.linear_num_key_heads * tc.linear_key_head_dim + tc.linear_num_value_heads * tc.linear_value_head_dim,
    }
    if hasattr(tc, "intermediate_size"):
        d["intermediate_size"] = tc.intermediate_size
    for f in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
              "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef"):
        if hasattr(tc, f):
            d[f] = getattr(tc, f)
    return d


FAMILY_NOTES = {
    "qwen3_5_text": {
        "norms": "input_layernorm, post_attention_layernorm, model.norm, self_attn.q_norm, self_attn.k_norm: "
        "RMSNorm (1+w): (x_f32 * rsqrt(mean(x^2)+eps) * (1 + w_f32)).type_as(x), w zero-init; "
        "linear_attn.norm: gated RMSNorm with plain w (ones-init): w * (x * rsqrt(mean(x^2)+eps)) * silu(z), over dv per v-head",
        "attention_gate": "q_proj rows per head h: [2*hd*h, 2*hd*h+hd) = q, [2*hd*h+hd, 2*hd*(h+1)) = gate; "
        "o_proj(attn * sigmoid(gate)) with gate flattened head-major",
        "gdn_projections": "in_proj_qkv [2*Hk*dk + Hv*dv, H] rows [q all heads | k all heads | v all heads]; in_proj_z [Hv*dv, H]; "
        "in_proj_b [Hv, H]; in_proj_a [Hv, H]; conv1d [conv_dim, 1, K] over the in_proj_qkv channels, no bias, then SiLU",
        "gdn_gva": "v-head j uses k-head j // r (repeat_interleave)",
        "decay": "g = -exp(A_log) * softplus(a + dt_bias) (fp32), beta = sigmoid(b)",
    },
    "qwen3_next": {
        "norms": "same as qwen3_5: (1+w) RMSNorms (zero-init) everywhere except linear_attn.norm (plain w, ones-init, gated)",
        "attention_gate": "same per-head interleave as qwen3_5: view(..., heads, 2*hd) then chunk(2): [q_h | gate_h] per head",
        "gdn_projections": "in_proj_qkvz [2*Hk*dk + 2*Hv*dv, H] grouped per k-head g: rows of group g = "
        "[q_g (dk) | k_g (dk) | v_g (r*dv) | z_g (r*dv)], groups in order g = 0..Hk-1; in_proj_ba [2*Hv, H] grouped per k-head: "
        "[b_g (r) | a_g (r)]; v-heads of group g are g*r .. g*r+r-1; conv1d channels are [q all | k all | v all] after regrouping",
        "decay": "g = -exp(A_log) * softplus(a + dt_bias) (fp32), beta = sigmoid(b)",
        "moe": "softmax router over num_experts, top-k, renormalised when norm_topk_prob (default true); "
        "shared expert scaled by sigmoid(shared_expert_gate(x)); experts per-expert on disk (mlp.experts.{e}.{gate,up,down}_proj.weight)",
    },
}


def build_model(name: str, models_done: dict) -> dict:
    spec = SPECS[name]
    seed = spec["seed"]
    config = make_config(name)
    tc = text_config(config)
    # the VLM wrappers run the inputs of the text model they take their weights from
    inputs = make_inputs(SPECS[spec.get("weights_from", name)]["seed"])
    k = int(getattr(tc, "num_experts_per_tok", 0) or 0)
    tried = []
    a_values = {}
    for attempt in range(MAX_ATTEMPTS if name in MOES and "weights_from" not in spec else 1):
        wseed = seed + 1000 * attempt
        model = new_model(name, config)
        a_values = reinit_weights(model, wseed)
        if "weights_from" in spec:
            src = load_model(spec["weights_from"])
            missing, unexpected = model.model.language_model.load_state_dict(src.model.state_dict(), strict=True)
            a_values = {f"model.language_model.{k_.removeprefix('model.')}": v for k_, v in models_done[spec["weights_from"]]["A"].items()}
        model.eval()
        if name in MOES:
            out, margin = forwards_with_margin(model, inputs, k)
            tried.append({"seed": wseed, "min_logit_margin": margin["logit"]})
            if margin["logit"] > MARGIN:
                break
        else:
            tried.append({"seed": wseed})
            break
    else:
        raise SystemExit(f"{name}: no seed with router margin > {MARGIN}: {tried}")

    out_dir = OUT / "models" / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(str(out_dir))
    gen_cfg = out_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    saved_keys = disk_keys(out_dir)
    with torch.no_grad():
        mem_logits = model(input_ids=inputs["batch"]).logits
    entry = {}
    if spec.get("fuse_experts"):
        entry["per_expert_keys_written_by_save_pretrained"] = sorted(
            k_ for k_ in saved_keys if ".layers.0.mlp.experts." in k_
        )
        fuse_experts_on_disk(out_dir, tc.num_experts)
    if spec.get("mtp"):
        entry["mtp_tensors_added"] = add_mtp(out_dir, spec["mtp"], seed + 7000)

    # Reference outputs come from the files on disk.
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        ref = load_model(name)
    msd, rsd = model.state_dict(), ref.state_dict()
    assert sorted(msd) == sorted(rsd), set(msd) ^ set(rsd)
    for kk in msd:
        assert torch.equal(msd[kk], rsd[kk]), kk
    if name in MOES:
        res, margin = forwards_with_margin(ref, inputs, k, hidden=name in HIDDEN_STORED)
        assert margin["logit"] > MARGIN, margin
    else:
        res, margin = forward_all(ref, inputs, hidden=name in HIDDEN_STORED), None
    roundtrip = float((res["batch"] - mem_logits).abs().max())
    assert roundtrip <= ROUNDTRIP_TOL, roundtrip

    tensors = {
        "input_ids": inputs["batch"],
        "logits": res["batch"].contiguous(),
        "long.input_ids": inputs["long"],
        "long.logits": res["long"].contiguous(),
        "padded.input_ids": inputs["padded"],
        "padded.attention_mask": inputs["padded_mask"],
        "padded.logits": res["padded"].contiguous(),
    }
    if "weights_from" in spec:
        # the text-only logits equal the text model's: only the first batch is stored here
        src_ref = load_file(str(OUT / "reference" / f"{spec['weights_from']}.safetensors"))
        for part in ("", "long.", "padded."):
            assert torch.equal(src_ref[f"{part}input_ids"] if part else src_ref["input_ids"], tensors[f"{part}input_ids"]), part
        eq = {
            part or "batch": float((src_ref[f"{part}logits"] - tensors[f"{part}logits"]).abs().max())
            for part in ("", "long.", "padded.")
        }
        entry["max_abs_logit_diff_vs_text_model"] = eq
        entry["text_model"] = spec["weights_from"]
        for kk in ("long.input_ids", "long.logits", "padded.input_ids", "padded.attention_mask", "padded.logits"):
            del tensors[kk]
        # loading the VLM folder with AutoModelForCausalLM gives the text class (drops visual and mtp)
        with warnings.catch_warnings(record=True) as ws2:
            warnings.simplefilter("always")
            as_text = load_model(name, causal_lm=True)
        with torch.no_grad():
            lt = as_text(input_ids=inputs["batch"]).logits
        entry["auto_model_for_causal_lm"] = {
            "class": type(as_text).__name__,
            "max_abs_logit_diff": float((lt - res["batch"]).abs().max()),
            "warnings": sorted({scrub(f"{w.category.__name__}: {w.message}").splitlines()[0][:300] for w in ws2}),
        }
    for key, h in res["hidden"].items():
        if key == "embed":
            tensors["hidden.embed"] = h.float().contiguous()
        elif key == "norm":
            tensors["hidden.final_norm"] = h.float().contiguous()
        else:
            tensors[f"hidden.layer.{key}"] = h.float().contiguous()

    # padded batch checks: row 0 alone, and row 1's 97 real tokens alone (positions from 0 there)
    mask = inputs["padded_mask"]
    with torch.no_grad():
        row0 = ref(input_ids=inputs["padded"][:1]).logits
        n_pad = PAD_T - PAD_REAL[1]
        row1 = ref(input_ids=inputs["padded"][1:, n_pad:]).logits
    pad_checks = {
        "row0_vs_alone_max_abs_diff": float((row0[0] - res["padded"][0]).abs().max()),
        "row1_real_vs_unpadded_max_abs_diff": float((row1[0] - res["padded"][1, n_pad:]).abs().max()),
        "row1_pad_positions": [0, n_pad],
    }

    with recurrent_instead_of_chunk(ref), torch.no_grad():
        rec_long = ref(input_ids=inputs["long"]).logits
    chunk_vs_rec = float((rec_long - res["long"]).abs().max())

    gen = None
    if name == "qwen3_5_text":
        gen, gen_tensors = generation_check(ref, seed)
        tensors.update(gen_tensors)

    ref_dir = OUT / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(ref_dir / f"{name}.safetensors"), metadata={"fixture": f"qwen35/{name}"})

    keys = disk_keys(out_dir)
    cfg_json = json.loads((out_dir / "config.json").read_text())
    lt_ = list(tc.layer_types)
    first_lin, first_full = lt_.index(LIN), lt_.index(FULL)
    prefix = "model.language_model.layers" if name in VLMS else "model.layers"
    entry.update({
        "model_type": config.model_type,
        "text_model_type": tc.model_type,
        "architectures": cfg_json.get("architectures"),
        "class": type(ref).__name__,
        "dtype": "float32",
        "path": rel(out_dir),
        "reference": rel(ref_dir / f"{name}.safetensors"),
        "files": sorted(p.name for p in out_dir.iterdir()),
        "num_tensors": len(keys),
        "num_parameters": int(sum(p.numel() for p in ref.parameters())),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "text_config_tie_word_embeddings": bool(tc.tie_word_embeddings),
        "lm_head_on_disk": "lm_head.weight" in keys,
        "seed": tried[-1]["seed"],
        "seeds_tried": tried,
        "input_ids_seeds": {p_: SPECS[spec.get("weights_from", name)]["seed"] + 5000 + i for i, p_ in enumerate(("batch", "long", "padded"))},
        "dims": dims(config),
        "layer_types": lt_,
        "linear_attention_layers": [i for i, t in enumerate(lt_) if t == LIN],
        "full_attention_layers": [i for i, t in enumerate(lt_) if t == FULL],
        "layer_types_in_config_json": "layer_types" in (cfg_json.get("text_config") or cfg_json),
        "rope_parameters": dict(tc.rope_parameters),
        "A_values": a_values,
        "loss_long": res["long_loss"],
        "loss_long_tokens": LONG_T - 1,
        "padded_checks": pad_checks,
        "long_max_abs_logit_diff_recurrent_vs_chunk": chunk_vs_rec,
        "max_abs_logit_diff_roundtrip": roundtrip,
        "reference_tensors": sorted(tensors),
        "disk_keys_first_linear_attention_layer": {
            k_: v["shape"] for k_, v in keys.items() if k_.startswith(f"{prefix}.{first_lin}.")
        },
        "disk_keys_first_full_attention_layer": {
            k_: v["shape"] for k_, v in keys.items() if k_.startswith(f"{prefix}.{first_full}.")
        },
        "disk_keys_outside_layers": {k_: v["shape"] for k_, v in keys.items() if ".layers." not in k_ and ".blocks." not in k_},
        "load_warnings": sorted({scrub(f"{w.category.__name__}: {w.message}").splitlines()[0][:300] for w in ws}),
    })
    if name in VLMS:
        entry["disk_key_prefixes"] = sorted({".".join(k_.split(".")[:2]) for k_ in keys})
        entry["vision_config"] = dict(VISION)
        entry["special_tokens"] = dict(VLM_TOKENS)
    if name in MOES:
        entry["moe_layers"] = sorted(routers(ref))
        entry["dense_layers"] = [i for i in range(tc.num_hidden_layers) if i not in routers(ref)]
        entry["min_router_score_margin"] = margin["score"]
        entry["min_router_logit_margin"] = margin["logit"]
        entry["expert_disk_keys_layer0"] = {k_: v["shape"] for k_, v in keys.items() if ".layers.0.mlp." in k_}
        entry["expert_memory_params_layer0"] = {
            n: list(p.shape) for n, p in ref.named_parameters() if ".layers.0.mlp." in n
        }
    if gen is not None:
        entry["generate"] = gen
    entry["family_notes"] = FAMILY_NOTES["qwen3_next" if tc.model_type == "qwen3_next" else "qwen3_5_text"]
    entry["_A"] = a_values
    return entry


def generation_check(model, seed: int):
    prompt = rand_ids(seed + 6000, (1, GEN_PROMPT))
    with torch.no_grad():
        g = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=GEN_NEW,
            min_new_tokens=0,
            do_sample=False,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=PAD_ID,
        )
    seq = g.sequences
    assert seq.shape == (1, GEN_PROMPT + GEN_NEW), seq.shape
    step_logits = torch.cat([x.float() for x in g.logits], dim=0)  # [20, V]
    # the same logits from full (chunked, no cache) forwards over the prefix
    with torch.no_grad():
        full = model(input_ids=seq[:, :-1]).logits[0, GEN_PROMPT - 1 :]
    greedy_nocache = full.argmax(-1)
    top2 = step_logits.topk(2, dim=-1).values
    info = {
        "prompt_seed": seed + 6000,
        "max_new_tokens": GEN_NEW,
        "call": "model.generate(input_ids=prompt, attention_mask=ones, max_new_tokens=20, do_sample=False, use_cache=True, "
        "output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)",
        "new_tokens": [int(x) for x in seq[0, GEN_PROMPT:]],
        "max_abs_diff_decode_logits_vs_full_forward": float((step_logits - full).abs().max()),
        "greedy_equal_without_cache": bool(torch.equal(greedy_nocache, seq[0, GEN_PROMPT:])),
        "min_top1_top2_logit_gap": float((top2[:, 0] - top2[:, 1]).min()),
        "path": "step 0 = prefill of the 70-token prompt (chunked delta rule, conv state and recurrent state cached); "
        "steps 1..19 = single-token decode (torch_recurrent_gated_delta_rule + causal_conv1d_update; KV cache on the "
        "full-attention layer)",
    }
    return info, {
        "generate.prompt_ids": prompt,
        "generate.new_ids": seq[:, GEN_PROMPT:].contiguous(),
        "generate.logits": step_logits.contiguous(),
    }


# ---------------------------------------------------------------------------------------------------
# op-level golden


def build_ops() -> dict:
    seed = 3541
    g = torch.Generator().manual_seed(seed)
    B, T, Hk, Hv, dk, dv = 1, 150, 2, 4, 16, 16
    q = torch.randn(B, T, Hk, dk, generator=g)
    k = torch.randn(B, T, Hk, dk, generator=g)
    v = torch.randn(B, T, Hv, dv, generator=g)
    # decays as the model makes them: g = -A * softplus(a + dt_bias), one A per head spanning [0.01, 16]
    A = torch.tensor([0.01, 0.3, 2.0, 16.0])
    a = torch.randn(B, T, Hv, generator=g)
    dt_bias = torch.randn(Hv, generator=g)
    gate = -A * F.softplus(a + dt_bias)
    beta = torch.sigmoid(torch.randn(B, T, Hv, generator=g) * 2)
    R = torch.randn(B, T, Hv, dv, generator=g)

    results, tensors = {}, {"q": q, "k": k, "v": v, "g": gate, "beta": beta, "R": R}
    for kind, fn in (("chunk", mq35.torch_chunk_gated_delta_rule), ("recurrent", mq35.torch_recurrent_gated_delta_rule)):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, gate, beta)]
        kw = dict(chunk_size=64) if kind == "chunk" else {}
        out, state = fn(*leaves[:3], g=leaves[3], beta=leaves[4], initial_state=None, output_final_state=True,
                        use_qk_l2norm_in_kernel=True, **kw)
        (out * R).sum().backward()
        tensors[f"out_{kind}"] = out.detach().contiguous()
        tensors[f"final_state_{kind}"] = state.detach().contiguous()
        for nm, leaf in zip(("q", "k", "v", "g", "beta"), leaves):
            tensors[f"grad_{kind}.{nm}"] = leaf.grad.detach().contiguous()
        results[kind] = out.detach()
    diffs = {
        "max_abs_diff_out_chunk_vs_recurrent": float((tensors["out_chunk"] - tensors["out_recurrent"]).abs().max()),
        "max_abs_diff_final_state_chunk_vs_recurrent": float(
            (tensors["final_state_chunk"] - tensors["final_state_recurrent"]).abs().max()
        ),
    }
    for nm in ("q", "k", "v", "g", "beta"):
        diffs[f"max_abs_diff_grad_{nm}_chunk_vs_recurrent"] = float(
            (tensors[f"grad_chunk.{nm}"] - tensors[f"grad_recurrent.{nm}"]).abs().max()
        )
    for nm in ("q", "k", "v", "g", "beta"):  # equal to the chunk gradients within the diffs above (size budget)
        del tensors[f"grad_recurrent.{nm}"]
    odir = OUT / "ops"
    odir.mkdir(parents=True, exist_ok=True)
    path = odir / "gated_delta_rule.safetensors"
    save_file(dict(sorted(tensors.items())), str(path), metadata={"fixture": "qwen35/ops/gated_delta_rule"})
    return {
        "path": rel(path),
        "seed": seed,
        "functions": "transformers.models.qwen3_5.modeling_qwen3_5.torch_chunk_gated_delta_rule (chunk_size=64) and "
        "torch_recurrent_gated_delta_rule, both with use_qk_l2norm_in_kernel=True, initial_state=None, output_final_state=True",
        "shapes": {k_: list(v_.shape) for k_, v_ in sorted(tensors.items())},
        "layout": "q, k [B, T, Hk, dk] (before L2 norm; the kernel L2-normalises with eps 1e-6 and scales q by dk^-0.5); "
        "v [B, T, Hv, dv]; g, beta [B, T, Hv]; outputs [B, T, Hv, dv]; final_state [B, Hv, dk, dv]; GVA inside the kernel: "
        "q/k heads repeat_interleave(Hv // Hk, dim=2), so v-head j uses k-head j // 2",
        "inputs": "q, k, v, R ~ N(0, 1); g = -A[h] * softplus(a + dt_bias[h]) with A = [0.01, 0.3, 2, 16], a ~ N(0, 1), "
        "dt_bias ~ N(0, 1); beta = sigmoid(2 * N(0, 1))",
        "A_per_head": [float(x) for x in A],
        "dt_bias": [float(x) for x in dt_bias],
        "loss": "sum(out * R); grad_chunk.<x> = d loss / d x through torch_chunk_gated_delta_rule (torch autograd, fp32); "
        "the recurrent function's gradients are not stored (their difference from grad_chunk is recorded below)",
        **diffs,
    }


# ---------------------------------------------------------------------------------------------------
# PEFT


@contextlib.contextmanager
def no_v4_target_conversion():
    """As in make_moe_fixtures.py: PEFT's v4->v5 MoE target rewrite is disabled while the adapter is made."""
    orig = peft_twc.convert_peft_config_for_transformers
    peft_twc.convert_peft_config_for_transformers = lambda *a, **k: None
    try:
        yield
    finally:
        peft_twc.convert_peft_config_for_transformers = orig


def stock_conversion(cfg: LoraConfig, base) -> dict | None:
    c = copy.deepcopy(cfg)
    try:
        peft_twc.convert_peft_config_for_transformers(c, model=base, conversions=None)
    except Exception as e:  # noqa: BLE001
        return {"error": scrub(f"{type(e).__name__}: {e}")[:500]}

    def norm(x):
        return sorted(x) if isinstance(x, (set, list, tuple)) else x

    before = {k: norm(getattr(cfg, k)) for k in ("target_modules", "target_parameters", "rank_pattern", "alpha_pattern")}
    after = {k: norm(getattr(c, k)) for k in before}
    for k in ("rank_pattern", "alpha_pattern", "target_parameters"):
        before[k] = before[k] or ({} if k != "target_parameters" else [])
        after[k] = after[k] or ({} if k != "target_parameters" else [])
    return None if before == after else after


def save_adapter(peft_model, out_dir: Path, base_name: str) -> dict:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    readme = out_dir / "README.md"
    if readme.exists():
        readme.unlink()
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("target_modules", "target_parameters"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    cfg["base_model_name_or_path"] = f"models/{base_name}"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return cfg


def lora_config_dict(cfg: LoraConfig) -> dict:
    tm = cfg.target_modules
    return {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": tm if isinstance(tm, str) else sorted(tm),
        "target_parameters": sorted(cfg.target_parameters or []),
        "rank_pattern": dict(cfg.rank_pattern or {}),
        "alpha_pattern": dict(cfg.alpha_pattern or {}),
        "use_rslora": cfg.use_rslora,
        "init_lora_weights": cfg.init_lora_weights,
        "bias": cfg.bias,
    }


def wrappers(peft_model) -> dict:
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


def try_stock_load(base_name: str, adapter_dir: Path, logits_expected, input_ids) -> dict:
    base = load_model(base_name)
    res = {}
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        try:
            pm = PeftModel.from_pretrained(base, str(adapter_dir))
            pm.eval()
            with torch.no_grad():
                lo = pm(input_ids=input_ids).logits
            res["loaded"] = True
            res["max_abs_logit_diff"] = float((lo - logits_expected).abs().max())
            res["lora_tensors_after_load"] = len(lora_params(pm))
        except Exception as e:  # noqa: BLE001
            res["loaded"] = False
            res["error"] = scrub(f"{type(e).__name__}: {e}")[:1500]
    msgs = []
    for w in ws:
        m = scrub(f"{w.category.__name__}: {w.message}").splitlines()[0][:300]
        if m not in msgs:
            msgs.append(m)
    res["warnings"] = msgs
    return res


def build_merged(base_name: str, model, logits, input_ids, pdir: Path) -> dict:
    merged = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    with torch.no_grad():
        mlogits = merged(input_ids=input_ids).logits
    base_sd = load_file(str(OUT / "models" / base_name / "model.safetensors"))
    with tempfile.TemporaryDirectory() as d:
        merged.save_pretrained(d)
        msd = load_file(str(Path(d) / "model.safetensors"))
    only_base = sorted(set(base_sd) - set(msd))
    only_merged = sorted(set(msd) - set(base_sd))
    assert not only_merged, only_merged
    changed = {k: v.float().contiguous() for k, v in msd.items() if not torch.equal(v, base_sd[k])}
    save_file(dict(sorted(changed.items())), str(pdir / "merged.safetensors"), metadata={"fixture": f"qwen35/peft/{pdir.name}/merged"})
    return {
        "path": rel(pdir / "merged.safetensors"),
        "max_abs_logit_diff_merged_vs_peft": float((mlogits - logits).abs().max()),
        "changed_disk_keys": len(changed),
        "changed_disk_keys_list": sorted(changed),
        "unchanged_disk_keys": len(msd) - len(changed),
        "base_keys_not_written_by_save_pretrained": only_base,
        "note": "merge_and_unload() then save_pretrained: every tensor that differs from the base model.safetensors, "
        "under its disk key. base_keys_not_written_by_save_pretrained are in the base file but not in a transformers "
        "save of the merged model (the mtp.* tensors): a merge should copy them byte for byte",
    }


def build_peft(name: str) -> dict:
    spec = PEFT_SPECS[name]
    base_name = spec["base"]
    ref = load_file(str(OUT / "reference" / f"{base_name}.safetensors"))
    input_ids = ref["input_ids"]
    labels = make_labels(input_ids)
    k = None
    tried = []
    for attempt in range(MAX_ATTEMPTS if base_name in MOES else 1):
        seed = spec["seed"] + 1000 * attempt
        base = load_model(base_name)
        with torch.no_grad():
            base_logits = base(input_ids=input_ids).logits
        assert float((base_logits - ref["logits"]).abs().max()) <= ROUNDTRIP_TOL
        torch.manual_seed(seed)
        cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False, **copy.deepcopy(spec["cfg"]))
        stock = stock_conversion(cfg, base)
        if stock is None:
            model = get_peft_model(base, cfg)
        else:
            with no_v4_target_conversion():
                model = get_peft_model(base, cfg)
        model.eval()
        for n, p in model.named_parameters():
            assert p.requires_grad == ("lora_" in n), (n, p.requires_grad)
        for n, _ in lora_params(model):
            assert ".visual." not in n and ".mlp.gate." not in n and "shared_expert_gate" not in n, n
        if spec.get("copy_from"):
            src = load_file(str(OUT / "peft" / spec["copy_from"] / "adapter" / "adapter_model.safetensors"))
            copied = 0
            with torch.no_grad():
                for n, p in lora_params(model):
                    sk = adapter_key(n).replace("base_model.model.model.language_model.", "base_model.model.model.")
                    p.copy_(src[sk])
                    copied += 1
            assert copied == len(src), (copied, len(src))
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        delta = float((logits - base_logits).abs().max())
        b_scale = 1.0
        if delta < MIN_LOGIT_DELTA and not spec.get("copy_from"):
            b_scale = 4.0
            with torch.no_grad():
                for n, p in lora_params(model):
                    if ".lora_B." in n:
                        p.mul_(b_scale)
                logits = model(input_ids=input_ids).logits
            delta = float((logits - base_logits).abs().max())
        model.zero_grad(set_to_none=True)
        if base_name in MOES:
            k = int(text_config(model.base_model.model.config).num_experts_per_tok)
            with capture_routers(model) as calls:
                out = model(input_ids=input_ids, labels=labels)
            margin = min_margin(k, calls)
            tried.append({"seed": seed, "min_logit_margin": margin["logit"]})
            if margin["logit"] > MARGIN:
                break
        else:
            out = model(input_ids=input_ids, labels=labels)
            margin = None
            tried.append({"seed": seed})
            break
    else:
        raise SystemExit(f"peft {name}: no seed with router margin > {MARGIN}: {tried}")
    out.loss.backward()
    loss = float(out.loss.detach())
    assert torch.equal(out.logits.detach(), logits)

    pdir = OUT / "peft" / name
    if pdir.exists():
        shutil.rmtree(pdir)
    saved_cfg = save_adapter(model, pdir / "adapter", base_name)
    key_shapes = {}
    with safe_open(str(pdir / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        file_keys = set(fh.keys())
        for n, p in lora_params(model):
            t = fh.get_tensor(adapter_key(n))
            assert torch.equal(t, p.detach()), n
            key_shapes[adapter_key(n)] = list(t.shape)
    assert set(key_shapes) == file_keys, set(key_shapes) ^ file_keys
    tensors = {"input_ids": input_ids, "labels": labels, "logits": logits.float().contiguous()}
    for n, p in lora_params(model):
        assert p.grad is not None, n
        tensors[f"grad.{adapter_key(n)}"] = p.grad.detach().float().contiguous()
    save_file(tensors, str(pdir / "reference.safetensors"), metadata={"fixture": f"qwen35/peft/{name}"})

    prefixes = sorted({k_.split(".layers.")[0] for k_ in key_shapes})
    entry = {
        "base_model": f"models/{base_name}",
        "adapter": rel(pdir / "adapter"),
        "reference": rel(pdir / "reference.safetensors"),
        "seed": tried[-1]["seed"],
        "seeds_tried": tried,
        "lora_config": lora_config_dict(cfg),
        "adapter_config_target_modules": saved_cfg.get("target_modules"),
        "adapter_config_target_parameters": saved_cfg.get("target_parameters"),
        "adapter_key_prefixes": prefixes,
        "loss": loss,
        "loss_tokens": n_loss_tokens(labels),
        "labels_masking": "labels = input_ids with labels[0,:4] = labels[1,-2:] = -100",
        "lora_B_scaled_by": b_scale,
        "max_abs_logit_delta_vs_base": delta,
        "scalings": scalings(model),
        "adapter_keys": dict(sorted(key_shapes.items())),
        "grad_keys": len(key_shapes),
        "stock_peft_would_convert_config_to": stock,
        "stock_peft_load": try_stock_load(base_name, pdir / "adapter", logits, input_ids),
        "reference_tensors": sorted(tensors),
    }
    if margin is not None:
        entry["min_router_score_margin"] = margin["score"]
        entry["min_router_logit_margin"] = margin["logit"]
        wr = wrappers(model)
        entry["param_wrappers"] = wr
        pats = {}
        for wname, info in wr.items():
            layer = wname.split(".layers.")[1].split(".")[0]
            pat = wname.replace(f".layers.{layer}.", ".layers.{L}.").removeprefix("base_model.model.")
            pats.setdefault(info["parameter"], {"lora_A": f"base_model.model.{pat}.lora_A.weight", "lora_B": f"base_model.model.{pat}.lora_B.weight"})
        entry["expert_lora_keys"] = pats
    if spec.get("copy_from"):
        src_dir = OUT / "peft" / spec["copy_from"]
        src_ref = load_file(str(src_dir / "reference.safetensors"))
        entry["weights_copied_from"] = f"peft/{spec['copy_from']}"
        entry["max_abs_logit_diff_vs_copied_adapter"] = float((src_ref["logits"] - logits).abs().max())
        entry["max_abs_grad_diff_vs_copied_adapter"] = max(
            float((src_ref[k_.replace("base_model.model.model.language_model.", "base_model.model.model.")] - v).abs().max())
            for k_, v in tensors.items() if k_.startswith("grad.")
        )
    if spec.get("copy_from"):
        # the gradients equal the copied adapter's (checked above): not stored again (size budget)
        tensors = {k_: v for k_, v in tensors.items() if not k_.startswith("grad.")}
        save_file(tensors, str(pdir / "reference.safetensors"), metadata={"fixture": f"qwen35/peft/{name}"})
        entry["reference_tensors"] = sorted(tensors)
        entry["grads_stored_as"] = (
            f"not stored (size budget): equal to peft/{spec['copy_from']}/reference.safetensors grad.* with "
            "base_model.model.model.layers. renamed to base_model.model.model.language_model.layers."
        )
    if spec.get("merged"):
        entry["merged"] = build_merged(base_name, model, logits, input_ids, pdir)
        if spec.get("copy_from"):
            src_m = load_file(str(OUT / "peft" / spec["copy_from"] / "merged.safetensors"))
            mine = load_file(str(pdir / "merged.safetensors"))
            renamed = {k_.replace("model.language_model.", "model.", 1): v for k_, v in mine.items()}
            assert sorted(renamed) == sorted(src_m), set(renamed) ^ set(src_m)
            entry["merged"]["max_abs_diff_vs_copied_adapter_merged"] = max(float((renamed[k_] - src_m[k_]).abs().max()) for k_ in src_m)
            (pdir / "merged.safetensors").unlink()
            entry["merged"]["path"] = None
            entry["merged"]["stored_as"] = (
                f"not stored (size budget): equal to peft/{spec['copy_from']}/merged.safetensors with the key prefix "
                "model.layers. renamed to model.language_model.layers. (max_abs_diff_vs_copied_adapter_merged)"
            )
    return entry


# ---------------------------------------------------------------------------------------------------
# training curve


def train_batches(seed: int):
    """make_peft_fixtures.train_batches with this vocabulary and T = 100 (two delta-rule chunks)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(ID_LOW, ID_HIGH, (TRAIN_STEPS, 2, TRAIN_T), generator=g, dtype=torch.int64)
    labels = input_ids.clone()
    for s in range(TRAIN_STEPS):
        labels[s, 0, : (s % 3) + 1] = -100
        labels[s, 1, TRAIN_T - ((s % 2) + 1):] = -100
    return input_ids, labels


def run_train(checkpointing: bool):
    base = load_model(TRAIN_BASE)
    torch.manual_seed(TRAIN_SEED)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TRAIN_TARGETS), init_lora_weights=True)
    model = get_peft_model(base, cfg)
    gc_info = None
    if checkpointing:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            model.gradient_checkpointing_enable()
        gc_info = {
            "call": "peft_model.gradient_checkpointing_enable() (no kwargs; transformers 5.25 then uses use_reentrant=False)",
            "layers_checkpointed": sum(bool(getattr(m, "gradient_checkpointing", False)) for m in decoder(model).layers),
            "warnings": sorted({scrub(f"{w.category.__name__}: {w.message}").splitlines()[0][:300] for w in ws}),
        }
    for n, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in n), n
    initial = {n: p.detach().clone() for n, p in lora_params(model)}
    input_ids, labels = train_batches(TRAIN_SEED + 1)
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
    return model, cfg, initial, (input_ids, labels), dict(losses=losses, grad_norms=norms, lrs=lrs, loss_tokens=tokens, final_losses_per_batch=final_losses), gc_info


def build_train() -> dict:
    out = {}
    runs = {}
    for checkpointing in (False, True):
        name = f"{TRAIN_BASE}_train" + ("_gc" if checkpointing else "")
        tdir = OUT / "peft" / name
        if tdir.exists():
            shutil.rmtree(tdir)
        model, cfg, initial, (input_ids, labels), curve, gc_info = run_train(checkpointing)
        runs[checkpointing] = (initial, curve, {n: p.detach().clone() for n, p in lora_params(model)})
        # the initial adapter: the PEFT init, saved before any step (same seed, so equal for both runs)
        trained = {n: p.detach().clone() for n, p in lora_params(model)}
        if not checkpointing:  # the _gc run starts from the same initial adapter (asserted below)
            with torch.no_grad():
                for n, p in lora_params(model):
                    p.copy_(initial[n])
            save_adapter(model, tdir / "initial_adapter", TRAIN_BASE)
        with torch.no_grad():
            for n, p in lora_params(model):
                p.copy_(trained[n])
        save_adapter(model, tdir / "final_adapter", TRAIN_BASE)
        if not checkpointing:
            save_file({"input_ids": input_ids, "labels": labels}, str(tdir / "reference.safetensors"), metadata={"fixture": f"qwen35/peft/{name}"})
        entry = {
            "base_model": f"models/{TRAIN_BASE}",
            "initial_adapter": rel(OUT / "peft" / f"{TRAIN_BASE}_train" / "initial_adapter"),
            "final_adapter": rel(tdir / "final_adapter"),
            "reference": rel(OUT / "peft" / f"{TRAIN_BASE}_train" / "reference.safetensors"),
            "gradient_checkpointing": checkpointing,
            "seed": TRAIN_SEED,
            "data_seed": TRAIN_SEED + 1,
            "lora_config": {
                "r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
                "target_modules": sorted(TRAIN_TARGETS),
                "init_lora_weights": True,
                "note": "PEFT default init: lora_A kaiming-uniform(a=sqrt(5)), lora_B zeros",
            },
            "steps": TRAIN_STEPS,
            "micro_batch": [2, TRAIN_T],
            **curve,
            "optimizer": {
                "name": "torch.optim.AdamW",
                "lr": OPT["lr"],
                "betas": list(OPT["betas"]),
                "eps": OPT["eps"],
                "weight_decay": OPT["weight_decay"],
                "amsgrad": False,
                "maximize": False,
                "foreach": False,
                "params": "only lora_A/lora_B weights (one param group)",
                "grad_clip": {"fn": "torch.nn.utils.clip_grad_norm_", "max_norm": MAX_GRAD_NORM, "norm_type": 2.0},
            },
            "schedule": "transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)",
            "loop": "identical to tests/fixtures/manifest.json train.*.loop (make_peft_fixtures.build_train); batches "
            "input_ids/labels [10, 2, 100] uniform in [3, 120), labels[s,0,:(s%3)+1] = labels[s,1,100-((s%2)+1):] = -100",
        }
        if gc_info:
            entry["checkpointing"] = gc_info
        out[name] = entry
    (i0, c0, f0), (i1, c1, f1) = runs[False], runs[True]
    assert all(torch.equal(i0[n], i1[n]) for n in i0)
    out[f"{TRAIN_BASE}_train_gc"]["vs_no_checkpointing"] = {
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(c0["losses"], c1["losses"])),
        "max_abs_grad_norm_diff": max(abs(a - b) for a, b in zip(c0["grad_norms"], c1["grad_norms"])),
        "max_abs_final_weight_diff": max(float((f0[n] - f1[n]).abs().max()) for n in f0),
        "initial_adapters_equal": True,
    }
    return out


# ---------------------------------------------------------------------------------------------------

DESCRIPTION = (
    "Qwen 3.5 / Qwen3-Next (Gated DeltaNet hybrid) reference fixtures: tiny random checkpoints (text, r=3 GVA, "
    "VLM wrapper with MTP tensors, MoE text, MoE VLM in the fused Hub expert layout, Qwen3-Next), golden logits for "
    "a 2x100 batch, a 150-token row and a left-padded batch, losses, a cached greedy generation, an op-level golden "
    "of transformers' torch chunked / recurrent gated delta rule with gradients, PEFT 0.22 adapters with logits and "
    "LoRA gradients, merged weights and two 10-step training curves. See README.md."
)

CONVENTIONS = {
    "dtype": "float32 on CPU, attn_implementation=eager, experts_implementation=eager (MoE), 1 thread, deterministic; "
    "fla / causal_conv1d not installed (kernels, a transformers dependency, is never enabled): transformers' pure-torch GDN path (torch_chunk_gated_delta_rule with "
    "torch.linalg.solve_triangular, F.conv1d)",
    "input_ids": "uniform in [3, 120); 0 = pad (only in padded.*), 1 = bos, 2 = eos (never in inputs); VLM special tokens 122..125 never in inputs",
    "logits": "model(input_ids=...).logits, no position_ids passed: transformers uses position_ids = arange(T) for every "
    "row (also for the left-padded rows) and, for text-only input, the same position on all 3 M-RoPE rows",
    "padded": "padded.input_ids [2,150]: row 0 has 150 real tokens; row 1 has 53 pads (id 0, attention_mask 0) then 97 "
    "real tokens at positions 53..149. Compare only positions with attention_mask == 1. transformers zeroes the GDN layer "
    "inputs at masked positions (x * mask before in_proj) and masks pad keys in the full-attention layers",
    "loss_long": "model(input_ids=long, labels=long).loss: mean next-token cross-entropy over 149 tokens",
    "hidden.layer.<i>": "output of decoder layer i (residual stream after the layer) for the long row; hidden.embed = "
    "embeddings; hidden.final_norm = after model.norm",
    "router": "every stored forward of a MoE model (batch, long, padded incl. pad positions, and the PEFT forward) has "
    "(k-th - (k+1)-th router logit) > 1e-3 for every token (top-k over softmax probabilities = top-k over logits)",
}

TOLERANCES = {"logits_f32_abs": 1e-4, "roundtrip_abs": ROUNDTRIP_TOL}


def write_manifest(m: dict) -> None:
    order = {n: i for i, n in enumerate(MODEL_NAMES)}
    porder = {n: i for i, n in enumerate(PEFT_SPECS)}
    models = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in m.get("models", {}).items()}
    write_json(
        MANIFEST,
        {
            "description": DESCRIPTION,
            "generator": "scripts/reference/make_qwen35_fixtures.py",
            "versions": versions(),
            "tolerances": TOLERANCES,
            "conventions": CONVENTIONS,
            "models": {k: models[k] for k in sorted(models, key=lambda k: order.get(k, 99))},
            "ops": m.get("ops", {}),
            "peft": {k: m["peft"][k] for k in sorted(m.get("peft", {}), key=lambda k: porder.get(k, 99))},
            "train": m.get("train", {}),
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="ops | <model name> | peft | train (repeatable)")
    args = ap.parse_args()
    setup_determinism()
    t0 = time.time()
    if args.only:
        m = load_manifest()
        for sec in ("models", "peft", "train", "ops"):
            m.setdefault(sec, {})
        # A values are needed by the VLM wrappers
        for n, e in m["models"].items():
            e["_A"] = e.get("A_values", {})
        parts = args.only
    else:
        for sub in ("models", "reference", "peft", "ops"):
            if (OUT / sub).exists():
                shutil.rmtree(OUT / sub)
        m = {"models": {}, "peft": {}, "train": {}, "ops": {}}
        parts = ["ops", *MODEL_NAMES, "peft", "train"]
    for part in parts:
        t = time.time()
        if part == "ops":
            m["ops"] = {"gated_delta_rule": build_ops()}
        elif part in SPECS:
            e = build_model(part, {k: {"A": v["_A"]} for k, v in m["models"].items()})
            m["models"][part] = e
        elif part == "peft":
            for name in PEFT_SPECS:
                print(f"[qwen35]   peft {name}", flush=True)
                m["peft"][name] = build_peft(name)
        elif part == "train":
            m["train"] = build_train()
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(f"[qwen35] {part}: {time.time() - t:.1f}s", flush=True)
    write_manifest(m)
    print(f"[qwen35] done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
