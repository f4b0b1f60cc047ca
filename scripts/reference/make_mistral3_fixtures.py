#!/usr/bin/env python
"""Ministral 3 / Mistral 3 (YaRN + Llama-4 query scale; llava-style VLM wrapper) reference fixtures.

transformers 5.25.0 + peft 0.22.0 + torch 2.15.0 on the CPU; run by hand, never in CI. Same venv as the
Qwen 3.5 fixtures (scripts/reference/requirements-qwen35.txt):

    /work/venv-q35/bin/python scripts/reference/make_mistral3_fixtures.py     # everything (~10 s on 1 thread)

Everything goes to tests/fixtures/mistral3/ with its own manifest.json (layout, tensor names and conventions
in tests/fixtures/mistral3/README.md). A run deletes and rewrites models/, reference/, peft/ and manifest.json.

tests/fixtures/mistral3/models/<name>/          config.json + model.safetensors (ministral3, ministral3_tied,
                                                mistral3 as save_pretrained writes it = legacy llava key layout,
                                                mistral3_tf5 = the same tensors under the transformers-5 names)
tests/fixtures/mistral3/reference/<name>.safetensors
tests/fixtures/mistral3/peft/<name>/            adapter/ + reference.safetensors (+ merged.safetensors)
"""

from __future__ import annotations

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

from common import FIXTURES, REPO_ROOT, setup_determinism, versions, write_json  # noqa: E402
from make_peft_fixtures import MIN_LOGIT_DELTA, adapter_key, lora_params, n_loss_tokens, scalings  # noqa: E402

# Key-listing, adapter-saving and config helpers of the Qwen 3.5 generator (no qwen35 paths involved).
from make_qwen35_fixtures import (  # noqa: E402
    ID_HIGH,
    ID_LOW,
    PAD_ID,
    decoder,
    disk_keys,
    lora_config_dict,
    rand_ids,
    save_adapter,
)

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText  # noqa: E402
from transformers import modeling_rope_utils as rope_utils  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()

OUT = FIXTURES / "mistral3"
MANIFEST = OUT / "manifest.json"

VOCAB = 128
IMAGE_TOKEN_ID = 124  # inside the tiny vocabulary, never used in inputs

BATCH_SHAPE = (2, 40)
LONG_T = 100  # positions 0..99: floor(pos / 16) runs 0..6, so the query scale takes 7 values
PAD_T, PAD_REAL = 100, (100, 63)  # left-padded batch: row 0 has 100 real tokens, row 1 has 37 pads then 63
PACK_SEGMENTS = (60, 40)  # packed-row check (numbers only): position_ids restart at 0 for the second segment
GEN_PROMPT, GEN_NEW = 90, 10

ROPE = {
    "type": "yarn",
    "rope_theta": 1e6,
    "factor": 16.0,
    "original_max_position_embeddings": 16,
    "max_position_embeddings": 256,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale_all_dim": 1.0,
    "mscale": 1.0,
    "llama_4_scaling_beta": 0.1,
}
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rope_parameters=ROPE,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=PAD_ID,  # Ministral3Config's default is 11 (the real tokenizer's pad); 0 is this suite's pad
    attention_dropout=0.0,
)
VISION = dict(
    model_type="pixtral",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    head_dim=16,
    image_size=32,
    patch_size=8,
)

SPECS = {
    "ministral3": dict(model_type="ministral3", kwargs=dict(TEXT, tie_word_embeddings=False), seed=3301),
    "ministral3_tied": dict(model_type="ministral3", kwargs=dict(TEXT, tie_word_embeddings=True), seed=3302),
    # the VLM wrapper holds the ministral3 weights (its text-only logits are then those of ministral3) plus a
    # random vision tower and projector. Untied like its text model: Mistral3Config's default is True.
    "mistral3": dict(
        model_type="mistral3",
        kwargs=dict(
            text_config=dict(TEXT, model_type="ministral3", tie_word_embeddings=False),
            vision_config=VISION,
            image_token_index=IMAGE_TOKEN_ID,
            tie_word_embeddings=False,
        ),
        seed=3303,
        weights_from="ministral3",
    ),
}
VLMS = {"mistral3"}
# the same tensors as models/mistral3 under the other of the two key layouts transformers reads
RENAMED = "mistral3_tf5"

WEIGHT_STD = 0.15
EMBED_STD = 0.15
NORM_STD = 0.2  # plain-w RMSNorms (ones-init): w = 1 + N(0, 0.2)
VISION_NORM_STD = 0.1
ROUNDTRIP_TOL = 1e-6

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT_ONLY_RE = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PEFT_SPECS = {
    "ministral3": dict(base="ministral3", targets=TARGETS, seed=3321, merged=True),
    # the ministral3 adapter's LoRA weights under the VLM module paths; a regex target so that the pixtral
    # tower's own q/k/v/o_proj and gate/up/down_proj are left alone
    "mistral3": dict(base="mistral3", targets=TEXT_ONLY_RE, seed=3322, copy_from="ministral3"),
}


def rel(path: Path) -> str:
    return str(Path(path).resolve().relative_to(OUT.resolve()))


def scrub(text: str) -> str:
    text = str(text).replace(str(OUT.resolve()) + "/", "").replace(str(REPO_ROOT.resolve()) + "/", "")
    site = str(Path(torch.__file__).resolve().parents[1]) + "/"
    return text.replace(site, "site-packages/")


def warn_lines(ws) -> list:
    return sorted({scrub(f"{w.category.__name__}: {w.message}").splitlines()[0][:300] for w in ws})


# ---------------------------------------------------------------------------------------------------
# inputs


def make_inputs(seed: int) -> dict:
    batch = rand_ids(seed + 5000, BATCH_SHAPE)
    long = rand_ids(seed + 5001, (1, LONG_T))
    padded = rand_ids(seed + 5002, (2, PAD_T))
    mask = torch.ones(2, PAD_T, dtype=torch.int64)
    for row, real in enumerate(PAD_REAL):
        padded[row, : PAD_T - real] = PAD_ID
        mask[row, : PAD_T - real] = 0
    # exactly what GenerationMixin._prepare_position_ids_for_generation computes for a left-padded prompt
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return {"batch": batch, "long": long, "padded": padded, "padded_mask": mask, "padded_pos": pos}


# ---------------------------------------------------------------------------------------------------
# models


def make_config(name: str):
    s = SPECS[name]
    return AutoConfig.for_model(s["model_type"], **copy.deepcopy(s["kwargs"]))


def text_config(config):
    return getattr(config, "text_config", None) or config


def new_model(name: str, config):
    auto = AutoModelForImageTextToText if name in VLMS else AutoModelForCausalLM
    return auto.from_config(config, attn_implementation="eager", dtype=torch.float32)


def load_model(name: str, path: Path | None = None):
    path = path or OUT / "models" / name
    auto = AutoModelForImageTextToText if (name in VLMS or name == RENAMED) else AutoModelForCausalLM
    model = auto.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager", local_files_only=True)
    model.eval()
    return model


def reinit_weights(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are yielded once
            vision = "vision_tower" in name or "multi_modal_projector" in name
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
            elif p.dim() == 1:  # RMSNorms (text, pixtral, projector): plain w, ones-init
                p.copy_(1.0 + torch.randn_like(p) * (VISION_NORM_STD if vision else NORM_STD))
            elif "embed_tokens" in name or name.endswith("lm_head.weight"):
                p.copy_(torch.randn_like(p) * EMBED_STD)
            else:
                p.copy_(torch.randn_like(p) * WEIGHT_STD)


def attn_config(model):
    """The config object the text attention layers read rope_parameters from (shared by all layers)."""
    cfg = decoder(model).layers[0].self_attn.config
    assert all(layer.self_attn.config is cfg for layer in decoder(model).layers)
    return cfg


def default_inv_freq(tc) -> torch.Tensor:
    base = tc.rope_parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, tc.head_dim, 2, dtype=torch.float) / tc.head_dim))


def yarn_info(model) -> dict:
    """What transformers 5.25 computes for the YaRN RoPE of this config (and what truncate=False would give)."""
    tc = attn_config(model)
    rot = decoder(model).rotary_emb
    rp = tc.rope_parameters
    dim, base, orig = tc.head_dim, rp["rope_theta"], rp["original_max_position_embeddings"]

    def corr(rot_, truncate):
        v = (dim * math.log(orig / (rot_ * 2 * math.pi))) / (2 * math.log(base))
        return (math.floor(v) if rot_ == rp["beta_fast"] else math.ceil(v)) if truncate else v

    raw = (corr(rp["beta_fast"], False), corr(rp["beta_slow"], False))
    trunc = (corr(rp["beta_fast"], True), corr(rp["beta_slow"], True))
    c2 = copy.deepcopy(tc)
    c2.rope_parameters["truncate"] = False
    inv_nt, att_nt = rope_utils.ROPE_INIT_FUNCTIONS["yarn"](c2)
    dflt = default_inv_freq(tc)
    inv = rot.inv_freq.detach().clone()
    return {
        "rope_type": rot.rope_type,
        "inv_freq": [float(x) for x in inv],
        "default_inv_freq": [float(x) for x in dflt],
        "inv_freq_over_default": [float(x) for x in inv / dflt],
        "attention_factor": float(rot.attention_scaling),
        "attention_factor_formula": "yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim) = "
        "(0.1*1*ln16+1)/(0.1*1*ln16+1) = 1.0; cos and sin are multiplied by it",
        "correction_range_untruncated": [raw[0], raw[1]],
        "correction_range_truncated": [max(trunc[0], 0), min(trunc[1], dim - 1)],
        "truncate_in_config": rp.get("truncate"),
        "truncate_default": True,
        "inv_freq_identical_with_truncate_false": bool(torch.equal(inv_nt, inv)) and att_nt == rot.attention_scaling,
        "note": "inv_freq = inv_interp * ramp + inv_extrap * (1 - ramp), inv_extrap = theta^(-2i/d), inv_interp = "
        "inv_extrap / factor, ramp_i = clamp((i - low) / (high - low), 0, 1) over i = 0..d/2-1 with [low, high] the "
        "correction range (floor / ceil when truncate, then clamped to [0, d-1]). The same inv_freq at every position "
        "(no dynamic update for yarn). At head_dim 16, theta 1e6, original 16 the range is [0, 1] with or without "
        "truncation, so only pair 0 keeps its original frequency and pairs 1..7 are divided by 16: this fixture "
        "cannot tell truncate=True from False (inv_freq_identical_with_truncate_false)",
    }


def q_scale(positions: torch.Tensor, beta: float, orig: int) -> torch.Tensor:
    return 1 + beta * torch.log(1 + torch.floor(positions / orig))


def logits_of(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float()


def forward_all(model, inputs: dict) -> dict:
    out = {}
    with torch.no_grad():
        out["batch"] = model(input_ids=inputs["batch"]).logits.float()
        long = model(input_ids=inputs["long"], labels=inputs["long"])
        out["long"] = long.logits.float()
        out["long_loss"] = float(long.loss)
        out["padded"] = model(
            input_ids=inputs["padded"], attention_mask=inputs["padded_mask"], position_ids=inputs["padded_pos"]
        ).logits.float()
    return out


def scaling_checks(name: str, res: dict, inputs: dict) -> dict:
    """Re-run the long row with each Ministral-3 delta removed (fresh models from disk each time)."""
    long = inputs["long"]
    out = {}
    m = load_model(name)
    attn_config(m).rope_parameters["llama_4_scaling_beta"] = 0.0
    no_beta = logits_of(m, long)
    out["long_max_abs_logit_diff_llama_4_scaling_beta_0"] = float((no_beta - res["long"]).abs().max())
    m = load_model(name)
    rot = decoder(m).rotary_emb
    with torch.no_grad():
        rot.inv_freq.copy_(default_inv_freq(attn_config(m)))
    rot.attention_scaling = 1.0
    default_rope = logits_of(m, long)
    out["long_max_abs_logit_diff_default_rope"] = float((default_rope - res["long"]).abs().max())
    # both removed: that is plain Mistral (RoPE theta 1e6) with the same weights
    attn_config(m).rope_parameters["llama_4_scaling_beta"] = 0.0
    neither = logits_of(m, long)
    tc = text_config(make_config(name))
    mcfg = AutoConfig.for_model(
        "mistral",
        **{k: getattr(tc, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "head_dim",
                                       "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")},
        rope_parameters={"rope_type": "default", "rope_theta": tc.rope_parameters["rope_theta"]},
        sliding_window=None,
    )
    mistral = AutoModelForCausalLM.from_config(mcfg, attn_implementation="eager", dtype=torch.float32)
    src = load_model(name)
    src_sd = src.model.language_model.state_dict() if name in VLMS else src.model.state_dict()
    mistral.model.load_state_dict(src_sd, strict=True)
    if not tc.tie_word_embeddings:
        mistral.lm_head.load_state_dict(src.lm_head.state_dict())
    mistral.eval()
    out["long_max_abs_logit_diff_beta_0_and_default_rope_vs_mistral"] = float((logits_of(mistral, long) - neither).abs().max())
    out["note"] = (
        "llama_4_scaling_beta_0: attention config rope_parameters['llama_4_scaling_beta'] set to 0 (q scale = 1 "
        "everywhere); default_rope: rotary_emb.inv_freq replaced by theta^(-2i/d) (attention factor already 1), q "
        "scale kept; vs_mistral: both removed, compared with MistralForCausalLM (rope default, theta 1e6, "
        "sliding_window None) holding the same weights"
    )
    return out


def padded_checks(model, inputs: dict, res: dict) -> dict:
    n_pad = PAD_T - PAD_REAL[1]
    ids = inputs["padded"]
    row0 = logits_of(model, ids[:1])
    row1 = logits_of(model, ids[1:, n_pad:])
    arange = logits_of(model, ids, attention_mask=inputs["padded_mask"])  # no position_ids: arange(T) per row
    return {
        "row0_vs_alone_max_abs_diff": float((row0[0] - res["padded"][0]).abs().max()),
        "row1_real_vs_unpadded_max_abs_diff": float((row1[0] - res["padded"][1, n_pad:]).abs().max()),
        "row1_real_max_abs_diff_if_no_position_ids_passed": float((arange[1, n_pad:] - res["padded"][1, n_pad:]).abs().max()),
        "row1_pad_positions": [0, n_pad],
    }


def packed_check(model, inputs: dict) -> dict:
    a, b = PACK_SEGMENTS
    ids = inputs["long"][:, : a + b]
    pos = torch.cat([torch.arange(a), torch.arange(b)]).unsqueeze(0)
    seg1 = logits_of(model, ids[:, :a])
    seg2 = logits_of(model, ids[:, a:])
    out = {"call": f"model(input_ids=long[:, :{a + b}], position_ids=[arange({a}), arange({b})], use_cache=...), no attention_mask"}
    for use_cache in (False, True):
        packed = logits_of(model, ids, position_ids=pos, use_cache=use_cache)
        out[f"use_cache_{str(use_cache).lower()}"] = {
            "segment1_vs_alone_max_abs_diff": float((packed[0, :a] - seg1[0]).abs().max()),
            "segment2_vs_alone_max_abs_diff": float((packed[0, a:] - seg2[0]).abs().max()),
        }
    out["note"] = (
        "transformers 5.25 builds a block-diagonal causal mask from restarting position_ids only when attention_mask is "
        "None AND no cache is passed or created (masking_utils: `position_ids is not None and attention_mask is None and "
        "cache is None`). use_cache defaults to config.use_cache = true, and Ministral3Model then creates a DynamicCache "
        "even in a plain forward, so the packing is NOT detected: segment 2 attends to segment 1 while its RoPE angles "
        "and query scale use the restarted positions. With use_cache=False the segments are independent (the query "
        "scale follows the restarted position_ids)"
    )
    return out


def generation_check(model, inputs: dict) -> dict:
    prompt = inputs["long"][:, :GEN_PROMPT]
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
    step_logits = torch.cat([x.float() for x in g.logits], dim=0)
    full = logits_of(model, seq[:, :-1])[0, GEN_PROMPT - 1:]
    return {
        "call": f"model.generate(input_ids=long[:, :{GEN_PROMPT}], attention_mask=ones, max_new_tokens={GEN_NEW}, "
        "do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)",
        "new_tokens": [int(x) for x in seq[0, GEN_PROMPT:]],
        "max_abs_diff_decode_logits_vs_full_forward": float((step_logits - full).abs().max()),
        "note": "decode steps get position_ids from generate (cumsum(attention_mask) - 1, then extended by 1 per step), "
        "so the query scale of a decoded token is that of its absolute position; keys are cached after RoPE and are "
        "never scaled",
    }


def rename_to_tf5(k: str) -> str:
    """Legacy llava layout (what save_pretrained writes) -> transformers 5 in-memory names."""
    if k.startswith("language_model.model."):
        return "model.language_model." + k[len("language_model.model."):]
    if k.startswith("language_model.lm_head."):
        return "lm_head." + k[len("language_model.lm_head."):]
    if k.startswith(("vision_tower.", "multi_modal_projector.")):
        return "model." + k
    raise ValueError(k)


def key_prefixes(keys, depth: int) -> list:
    return sorted({".".join(k.split(".")[:depth]) for k in keys})


def tie_default_probe() -> dict:
    """What a mistral3 config without a top-level tie_word_embeddings does (nothing saved)."""
    kw = copy.deepcopy(SPECS["mistral3"]["kwargs"])
    del kw["tie_word_embeddings"]
    cfg = AutoConfig.for_model("mistral3", **kw)
    m = AutoModelForImageTextToText.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        m.save_pretrained(d)
        keys = disk_keys(Path(d))
    return {
        "config": "the mistral3 kwargs without the top-level tie_word_embeddings (text_config.tie_word_embeddings = false)",
        "top_level_tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "text_config_tie_word_embeddings": bool(cfg.text_config.tie_word_embeddings),
        "lm_head_is_embed_tokens": m.lm_head.weight is m.model.language_model.embed_tokens.weight,
        "lm_head_on_disk": any("lm_head" in k for k in keys),
        "note": "Mistral3Config.tie_word_embeddings defaults to true and the top-level value decides: with it absent "
        "the head is tied even though text_config says false",
    }


def build_model(name: str) -> dict:
    spec = SPECS[name]
    config = make_config(name)
    tc = text_config(config)
    inputs = make_inputs(SPECS[spec.get("weights_from", name)]["seed"])
    model = new_model(name, config)
    reinit_weights(model, spec["seed"])
    if "weights_from" in spec:
        src = load_model(spec["weights_from"])
        model.model.language_model.load_state_dict(src.model.state_dict(), strict=True)
        model.lm_head.load_state_dict(src.lm_head.state_dict(), strict=True)
    model.eval()

    out_dir = OUT / "models" / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(str(out_dir))
    gen_cfg = out_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    mem_logits = logits_of(model, inputs["batch"])

    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        ref = load_model(name)
    msd, rsd = model.state_dict(), ref.state_dict()
    assert sorted(msd) == sorted(rsd), set(msd) ^ set(rsd)
    for kk in msd:
        assert torch.equal(msd[kk], rsd[kk]), kk
    res = forward_all(ref, inputs)
    roundtrip = float((res["batch"] - mem_logits).abs().max())
    assert roundtrip <= ROUNDTRIP_TOL, roundtrip

    tensors = {
        "input_ids": inputs["batch"],
        "logits": res["batch"].contiguous(),
        "long.input_ids": inputs["long"],
        "long.logits": res["long"].contiguous(),
        "padded.input_ids": inputs["padded"],
        "padded.attention_mask": inputs["padded_mask"],
        "padded.position_ids": inputs["padded_pos"],
        "padded.logits": res["padded"].contiguous(),
    }
    keys = disk_keys(out_dir)
    cfg_json = json.loads((out_dir / "config.json").read_text())
    entry = {
        "model_type": config.model_type,
        "text_model_type": tc.model_type,
        "architectures": cfg_json.get("architectures"),
        "class": type(ref).__name__,
        "dtype": "float32",
        "path": rel(out_dir),
        "reference": rel(OUT / "reference" / f"{name}.safetensors"),
        "files": sorted(p.name for p in out_dir.iterdir()),
        "num_tensors": len(keys),
        "num_parameters": int(sum(p.numel() for p in ref.parameters())),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "text_config_tie_word_embeddings": bool(tc.tie_word_embeddings),
        "lm_head_on_disk": any(k_.endswith("lm_head.weight") for k_ in keys),
        "seed": spec["seed"],
        "input_ids_seeds": {p_: SPECS[spec.get("weights_from", name)]["seed"] + 5000 + i for i, p_ in enumerate(("batch", "long", "padded"))},
        "rope_parameters_in_config_json": (cfg_json.get("text_config") or cfg_json)["rope_parameters"],
        "pad_token_id": tc.pad_token_id,
        "rms_norm_eps": tc.rms_norm_eps,
    }
    if "weights_from" in spec:
        src_ref = load_file(str(OUT / "reference" / f"{spec['weights_from']}.safetensors"))
        for kk in ("input_ids", "long.input_ids", "padded.input_ids", "padded.position_ids"):
            assert torch.equal(src_ref[kk], tensors[kk]), kk
        entry["text_model"] = spec["weights_from"]
        entry["max_abs_logit_diff_vs_text_model"] = {
            part or "batch": float((src_ref[f"{part}logits"] - tensors[f"{part}logits"]).abs().max())
            for part in ("", "long.", "padded.")
        }
        entry["loss_long"] = res["long_loss"]
        # the text-only logits equal the text model's: only the [2,40] batch is stored here (size budget)
        tensors = {k_: v for k_, v in tensors.items() if k_ in ("input_ids", "logits")}
        entry["disk_key_prefixes"] = key_prefixes(keys, 2)
        entry["disk_keys_outside_layers"] = {k_: v["shape"] for k_, v in keys.items() if ".layers." not in k_}
        entry["memory_key_prefixes"] = key_prefixes([n for n, _ in ref.named_parameters()], 2)
        entry["disk_keys_layer0_text"] = {k_: v["shape"] for k_, v in keys.items() if k_.startswith("language_model.model.layers.0.")}
        entry["disk_keys_vision_layer0"] = {k_: v["shape"] for k_, v in keys.items() if ".transformer.layers.0." in k_}
        entry["vision_config"] = dict(VISION)
        entry["image_token_index"] = IMAGE_TOKEN_ID
        entry["tie_default_probe"] = tie_default_probe()
        try:
            AutoModelForCausalLM.from_pretrained(str(out_dir), local_files_only=True)
            entry["auto_model_for_causal_lm"] = "loaded"
        except Exception as e:  # noqa: BLE001
            entry["auto_model_for_causal_lm"] = scrub(f"{type(e).__name__}: {e}").splitlines()[0][:200]
    else:
        entry["loss_long"] = res["long_loss"]
        entry["loss_long_tokens"] = LONG_T - 1
        entry["disk_keys_layer0"] = {k_: v["shape"] for k_, v in keys.items() if k_.startswith("model.layers.0.")}
        entry["disk_keys_outside_layers"] = {k_: v["shape"] for k_, v in keys.items() if ".layers." not in k_}
        entry["padded_checks"] = padded_checks(ref, inputs, res)
        entry["packed_check"] = packed_check(ref, inputs)
        rp = tc.rope_parameters
        entry["query_scale_long"] = {
            "formula": "q *= 1 + llama_4_scaling_beta * ln(1 + floor(position_ids / original_max_position_embeddings)), "
            "after RoPE, q only, all heads",
            "per_block_of_16_positions": [float(x) for x in q_scale(torch.arange(0, LONG_T, 16).float(), rp["llama_4_scaling_beta"], rp["original_max_position_embeddings"])],
        }
        entry["yarn"] = yarn_info(ref)
    entry["scaling_checks"] = scaling_checks(name, res, inputs)
    if name == "ministral3":
        entry["generate"] = generation_check(ref, inputs)
    entry["max_abs_logit_diff_roundtrip"] = roundtrip
    entry["max_abs_logit"] = {k_: float(v.abs().max()) for k_, v in (("batch", res["batch"]), ("long", res["long"]), ("padded", res["padded"]))}
    entry["logit_std_long"] = float(res["long"].std())
    entry["load_warnings"] = warn_lines(ws)
    entry["reference_tensors"] = sorted(tensors)
    ref_dir = OUT / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(ref_dir / f"{name}.safetensors"), metadata={"fixture": f"mistral3/{name}"})
    return entry


def build_renamed() -> dict:
    """models/mistral3 with every key renamed to the transformers-5 names; must load to the same model."""
    src_dir, out_dir = OUT / "models" / "mistral3", OUT / "models" / RENAMED
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    with safe_open(str(src_dir / "model.safetensors"), "pt") as fh:
        meta = fh.metadata()
    sd = load_file(str(src_dir / "model.safetensors"))
    renamed = {rename_to_tf5(k): v for k, v in sd.items()}
    save_file(dict(sorted(renamed.items())), str(out_dir / "model.safetensors"), metadata=meta)
    shutil.copy(src_dir / "config.json", out_dir / "config.json")
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        a, b = load_model("mistral3"), load_model(RENAMED, out_dir)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    equal = all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = load_file(str(OUT / "reference" / "mistral3.safetensors"))
    diff = float((logits_of(b, ids["input_ids"]) - ids["logits"]).abs().max())
    return {
        "path": rel(out_dir),
        "source": "models/mistral3: the same tensors (bytes) and config.json, keys renamed",
        "renames": {
            "language_model.model.": "model.language_model.",
            "language_model.lm_head.": "lm_head.",
            "vision_tower.": "model.vision_tower.",
            "multi_modal_projector.": "model.multi_modal_projector.",
        },
        "disk_key_prefixes": key_prefixes(renamed, 2),
        "loads_to_identical_state_dict": equal,
        "max_abs_logit_diff_vs_mistral3": diff,
        "load_warnings": warn_lines(ws),
    }


# ---------------------------------------------------------------------------------------------------
# PEFT


def try_stock_load(base_name: str, adapter_dir: Path, logits_expected, input_ids) -> dict:
    base = load_model(base_name)
    res = {}
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, str(adapter_dir))
        pm.eval()
        res["max_abs_logit_diff"] = float((logits_of(pm, input_ids) - logits_expected).abs().max())
        res["lora_tensors_after_load"] = len(lora_params(pm))
    res["warnings"] = warn_lines(ws)
    return res


def build_merged(base_name: str, model, logits, input_ids, pdir: Path) -> dict:
    merged = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    mlogits = logits_of(merged, input_ids)
    base_sd = load_file(str(OUT / "models" / base_name / "model.safetensors"))
    with tempfile.TemporaryDirectory() as d:
        merged.save_pretrained(d)
        msd = load_file(str(Path(d) / "model.safetensors"))
    assert sorted(msd) == sorted(base_sd), set(msd) ^ set(base_sd)
    changed = {k: v.float().contiguous() for k, v in msd.items() if not torch.equal(v, base_sd[k])}
    save_file(dict(sorted(changed.items())), str(pdir / "merged.safetensors"), metadata={"fixture": f"mistral3/peft/{pdir.name}/merged"})
    return {
        "path": rel(pdir / "merged.safetensors"),
        "max_abs_logit_diff_merged_vs_peft": float((mlogits - logits).abs().max()),
        "changed_disk_keys": len(changed),
        "unchanged_disk_keys": len(msd) - len(changed),
        "note": "merge_and_unload() then save_pretrained: every tensor that differs from the base model.safetensors, "
        "under its disk key (W + scaling * B @ A)",
    }


def build_peft(name: str) -> dict:
    spec = PEFT_SPECS[name]
    base_name = spec["base"]
    ref = load_file(str(OUT / "reference" / f"{SPECS[base_name].get('weights_from', base_name)}.safetensors"))
    input_ids = ref["long.input_ids"]
    labels = input_ids.clone()
    base = load_model(base_name)
    base_logits = logits_of(base, input_ids)
    assert float((base_logits - ref["long.logits"]).abs().max()) <= ROUNDTRIP_TOL
    plain_matches = None
    if isinstance(spec["targets"], str):
        probe = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS)))
        names = sorted({n.split(".lora_")[0] for n, _ in lora_params(probe)})
        plain_matches = {
            "total": len(names),
            "outside_language_model": [n.removeprefix("base_model.model.") for n in names if ".language_model." not in n],
        }
        del probe
    torch.manual_seed(spec["seed"])
    cfg = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=copy.deepcopy(spec["targets"]))
    model = get_peft_model(base, cfg)
    model.eval()
    for n, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in n), n
    for n, _ in lora_params(model):
        assert "vision_tower" not in n and "multi_modal_projector" not in n, n
    b_scale = 1.0
    if spec.get("copy_from"):
        src = load_file(str(OUT / "peft" / spec["copy_from"] / "adapter" / "adapter_model.safetensors"))
        with torch.no_grad():
            for n, p in lora_params(model):
                p.copy_(src[adapter_key(n).replace("base_model.model.model.language_model.", "base_model.model.model.")])
        assert len(lora_params(model)) == len(src)
    logits = logits_of(model, input_ids)
    delta = float((logits - base_logits).abs().max())
    if delta < MIN_LOGIT_DELTA and not spec.get("copy_from"):
        b_scale = 4.0
        with torch.no_grad():
            for n, p in lora_params(model):
                if ".lora_B." in n:
                    p.mul_(b_scale)
        logits = logits_of(model, input_ids)
        delta = float((logits - base_logits).abs().max())
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels)
    out.loss.backward()
    loss = float(out.loss.detach())
    assert torch.equal(out.logits.detach().float(), logits)

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
    grads = {f"grad.{adapter_key(n)}": p.grad.detach().float().contiguous() for n, p in lora_params(model)}
    tensors = {"input_ids": input_ids, "logits": logits.contiguous()}
    entry = {
        "base_model": f"models/{base_name}",
        "adapter": rel(pdir / "adapter"),
        "reference": rel(pdir / "reference.safetensors"),
        "seed": spec["seed"],
        "lora_config": lora_config_dict(cfg),
        "adapter_config_target_modules": saved_cfg.get("target_modules"),
        "adapter_key_prefixes": sorted({k_.split(".layers.")[0] for k_ in key_shapes}),
        "adapter_key_example": sorted(key_shapes)[0],
        "loss": loss,
        "loss_tokens": n_loss_tokens(labels),
        "labels": "labels = input_ids (the long row, no masking): mean next-token cross-entropy over 99 tokens",
        "lora_B_scaled_by": b_scale,
        "max_abs_logit_delta_vs_base": delta,
        "scalings": scalings(model),
        "adapter_keys": dict(sorted(key_shapes.items())),
        "stock_peft_load": try_stock_load(base_name, pdir / "adapter", logits, input_ids),
    }
    if plain_matches is not None:
        entry["plain_target_names_would_match"] = plain_matches
    if spec.get("copy_from"):
        src_ref = load_file(str(OUT / "peft" / spec["copy_from"] / "reference.safetensors"))
        entry["weights_copied_from"] = f"peft/{spec['copy_from']}"
        entry["loss_diff_vs_copied_adapter"] = abs(loss - MANIFEST_PEFT[spec["copy_from"]]["loss"])
        entry["max_abs_logit_diff_vs_copied_adapter"] = float((src_ref["logits"] - logits).abs().max())
        entry["max_abs_grad_diff_vs_copied_adapter"] = max(
            float((src_ref[k_.replace("base_model.model.model.language_model.", "base_model.model.model.")] - v).abs().max())
            for k_, v in grads.items()
        )
        entry["grads_stored_as"] = (
            f"not stored (size budget): equal to peft/{spec['copy_from']}/reference.safetensors grad.* with "
            "base_model.model.model.layers. renamed to base_model.model.model.language_model.layers."
        )
    else:
        tensors.update(grads)
        entry["grad_keys"] = len(grads)
    save_file(tensors, str(pdir / "reference.safetensors"), metadata={"fixture": f"mistral3/peft/{name}"})
    entry["reference_tensors"] = sorted(tensors)
    if spec.get("merged"):
        entry["merged"] = build_merged(base_name, model, logits, input_ids, pdir)
    return entry


MANIFEST_PEFT: dict = {}

# ---------------------------------------------------------------------------------------------------

DESCRIPTION = (
    "Ministral 3 / Mistral 3 reference fixtures (transformers 5.25): tiny random ministral3 text checkpoints "
    "(untied and tied), the mistral3 VLM wrapper holding the same text weights (as save_pretrained writes it, and "
    "renamed to the transformers-5 key layout), golden logits for a 2x40 batch, a 100-token row (YaRN and the "
    "Llama-4 query scale in effect from position 16) and a left-padded batch, losses, checks that each Ministral-3 "
    "delta changes the logits, and PEFT 0.22 LoRA adapters with logits, LoRA gradients and merged weights. See README.md."
)

CONVENTIONS = {
    "dtype": "float32 on CPU, attn_implementation=eager, 1 thread, deterministic algorithms, HF_HUB_OFFLINE=1",
    "input_ids": "uniform in [3, 120); 0 = pad (only in padded.*), 1 = bos, 2 = eos (never in inputs); image token 124 never in inputs",
    "logits": "model(input_ids=...).logits; batch and long: no position_ids passed, so transformers uses arange(T)",
    "padded": "padded.input_ids [2,100]: row 0 has 100 real tokens; row 1 has 37 pads (id 0, mask 0) then 63 real "
    "tokens. Passed with attention_mask AND position_ids = (cumsum(mask) - 1).masked_fill(mask == 0, 0) (what "
    "generate computes): row 1's real tokens sit at positions 0..62, its pads at 0. Compare only mask == 1 positions",
    "loss_long": "model(input_ids=long, labels=long).loss: mean next-token cross-entropy over 99 tokens",
}

TOLERANCES = {"logits_f32_abs": 1e-4, "roundtrip_abs": ROUNDTRIP_TOL}


def main() -> None:
    setup_determinism()
    t0 = time.time()
    for sub in ("models", "reference", "peft"):
        if (OUT / sub).exists():
            shutil.rmtree(OUT / sub)
    models, peft_entries = {}, {}
    for name in SPECS:
        t = time.time()
        models[name] = build_model(name)
        print(f"[mistral3] {name}: {time.time() - t:.1f}s", flush=True)
    models[RENAMED] = build_renamed()
    for name in PEFT_SPECS:
        t = time.time()
        peft_entries[name] = build_peft(name)
        MANIFEST_PEFT[name] = peft_entries[name]
        print(f"[mistral3] peft {name}: {time.time() - t:.1f}s", flush=True)
    write_json(
        MANIFEST,
        {
            "description": DESCRIPTION,
            "generator": "scripts/reference/make_mistral3_fixtures.py",
            "versions": versions(),
            "tolerances": TOLERANCES,
            "conventions": CONVENTIONS,
            "models": models,
            "peft": peft_entries,
        },
    )
    print(f"[mistral3] done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
