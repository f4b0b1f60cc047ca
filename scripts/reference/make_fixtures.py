#!/usr/bin/env python
"""Regenerate every reference fixture under tests/fixtures/.

    pip install -r scripts/reference/requirements.txt
    python scripts/reference/make_fixtures.py            # everything
    python scripts/reference/make_fixtures.py --phase 1  # decoder parity only
    python scripts/reference/make_fixtures.py --only llama_deep  # one phase-1 fixture, nothing else

Phase 1 (this file): tiny randomly initialised decoder models saved in HF
layout + reference logits/losses, eval-set losses, and the real stories260K
model's eval loss and greedy generation.
Phase 2 (make_peft_fixtures.py): PEFT LoRA adapters, logits, gradients,
merged weights and a short AdamW training curve.
Phase 3 (make_chat_fixtures.py): chat-template and tokenizer encodings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BATCH,
    FIXTURES,
    SEQ,
    STORIES260K,
    VOCAB,
    load_fixture_model,
    load_manifest,
    rel,
    setup_determinism,
    update_manifest,
    write_json,
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    AutoModelForImageTextToText,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GraniteConfig,
    LlamaConfig,
    Mistral3Config,
    MistralConfig,
    Olmo2Config,
    Olmo3Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

COMMON = dict(
    vocab_size=VOCAB,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    num_hidden_layers=2,
    max_position_embeddings=64,
    attention_dropout=0.0,
)

LLAMA_BASE = dict(
    hidden_size=48,
    num_attention_heads=6,
    num_key_value_heads=2,
    intermediate_size=76,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    rope_scaling=None,
)

# name -> (config class, kwargs, seed, extra options)
SPECS = {
    "llama": (LlamaConfig, dict(LLAMA_BASE), 1001, {}),
    "llama_tied_bias": (
        LlamaConfig,
        dict(
            hidden_size=40,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=12,
            intermediate_size=53,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        1002,
        {},
    ),
    "llama_linear_rope": (
        LlamaConfig,
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=45,
            tie_word_embeddings=False,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
        1003,
        {},
    ),
    "mistral": (
        MistralConfig,
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            intermediate_size=61,
            sliding_window=6,
            tie_word_embeddings=False,
        ),
        1004,
        {},
    ),
    "qwen2": (
        Qwen2Config,
        dict(
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=59,
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
        1005,
        {},
    ),
    "qwen3": (
        Qwen3Config,
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=57,
            tie_word_embeddings=False,
            use_sliding_window=False,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        ),
        1006,
        {},
    ),
    "gemma": (
        GemmaConfig,
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=55,
            hidden_act="gelu_pytorch_tanh",
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        ),
        1007,
        {"gemma_norm": True},
    ),
    "gemma2": (
        Gemma2Config,
        dict(
            num_hidden_layers=3,
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=51,
            hidden_act="gelu_pytorch_tanh",
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=6,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=16,
            tie_word_embeddings=True,
        ),
        1008,
        # large embeddings (tied => lm_head) and q/k so both soft-caps bite
        {"gemma_norm": True, "embed_std": 0.8, "qk_std": 0.6},
    ),
    "phi3": (
        Phi3Config,
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            tie_word_embeddings=False,
            rope_scaling=None,
            original_max_position_embeddings=64,
        ),
        1009,
        {},
    ),
    # Granite: every multiplier away from 1 (and q.k scaled by attention_multiplier, not
    # 1/sqrt(head_dim)), biases on attention and MLP.
    "granite": (
        GraniteConfig,
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=62,
            attention_bias=True,
            mlp_bias=True,
            embedding_multiplier=3.5,
            attention_multiplier=0.09,
            residual_multiplier=0.4,
            logits_scaling=2.5,
            tie_word_embeddings=False,
        ),
        1014,
        {},
    ),
    # SmolLM3: RoPE skipped on every 2nd layer (layers 1, 3 of 4 are NoPE), tied head.
    "smollm3": (
        SmolLM3Config,
        dict(
            num_hidden_layers=4,
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=58,
            no_rope_layer_interval=2,
            tie_word_embeddings=True,
            rope_theta=5000.0,
        ),
        1015,
        {},
    ),
    # Phi-4-mini-style: LongRoPE with a partial rotary factor; the 13-token inputs pass the
    # original context of 8, so the long factors apply (the eval texts too).
    "phi3_longrope": (
        Phi3Config,
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=70,
            partial_rotary_factor=0.75,
            tie_word_embeddings=True,
            original_max_position_embeddings=8,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 3.0],
                "long_factor": [1.0, 1.5, 2.5, 4.0, 7.0, 11.0],
            },
        ),
        1016,
        {},
    ),
    # Dynamic NTK: the inputs (13 tokens) pass max_position_embeddings 8, so theta grows.
    "llama_dynamic_rope": (
        LlamaConfig,
        dict(LLAMA_BASE, max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 3.0}),
        1017,
        {},
    ),
    # OLMo 2: norms on the attention / MLP outputs only, q/k norms over the whole projection
    # (GQA, so the two differ in size), attention biases.
    "olmo2": (
        Olmo2Config,
        dict(
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=66,
            attention_bias=True,
            tie_word_embeddings=False,
            rope_theta=20000.0,
        ),
        1018,
        {},
    ),
    # Gemma 3: q/k norms, sandwich norms, layers sliding / sliding / global / sliding with a window
    # (5) shorter than the text, the local layers on their own RoPE (theta 100) and the global
    # ones on a linearly scaled one (theta 10000, factor 4), head_dim 18 (not hidden / heads),
    # query_pre_attn_scalar 20 (not head_dim), final soft-capping, tied head.
    "gemma3_text": (
        Gemma3TextConfig,
        dict(
            num_hidden_layers=4,
            hidden_size=40,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=18,
            intermediate_size=57,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_theta=10000.0,
            rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            query_pre_attn_scalar=20,
            final_logit_softcapping=25.0,
            tie_word_embeddings=True,
        ),
        1019,
        {"gemma_norm": True, "embed_std": 0.6},
    ),
    # OLMo 3: OLMo 2's norms plus the default pattern (3 sliding layers, then a global one) with a
    # window of 5; YaRN on the global layer only, the sliding ones unscaled; untied head.
    "olmo3": (
        Olmo3Config,
        dict(
            num_hidden_layers=4,
            hidden_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=50,
            sliding_window=5,
            rope_theta=20000.0,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
            tie_word_embeddings=False,
        ),
        1020,
        {},
    ),
    # Gemma 3 4B-style vision-language checkpoint (Gemma3ForConditionalGeneration): a tiny SigLIP
    # tower and projector that Temper leaves alone, and a Gemma 3 text decoder whose config keeps
    # only the keys that differ from Gemma3TextConfig's defaults, as transformers writes it.
    "gemma3_vlm": (
        Gemma3Config,
        dict(
            text_config=dict(
                vocab_size=VOCAB,
                num_hidden_layers=3,
                hidden_size=32,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                intermediate_size=45,
                sliding_window=4,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                rope_scaling={"rope_type": "linear", "factor": 2.0},
                max_position_embeddings=64,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
            vision_config=dict(
                hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
            ),
            mm_tokens_per_image=4,
            image_token_index=VOCAB + 10,
            boi_token_index=VOCAB + 11,
            eoi_token_index=VOCAB + 12,
        ),
        1021,
        {"gemma_norm": True, "embed_std": 0.6, "composite": True},
    ),
    # Mistral Small 3.1-style (Mistral3ForConditionalGeneration): a tiny Pixtral tower, a Mistral
    # text decoder with an untied head.
    "mistral3_vlm": (
        Mistral3Config,
        dict(
            text_config=dict(
                model_type="mistral",
                vocab_size=VOCAB,
                num_hidden_layers=2,
                hidden_size=48,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=14,
                intermediate_size=52,
                sliding_window=None,
                max_position_embeddings=64,
                rope_theta=1000000.0,
                tie_word_embeddings=False,
                bos_token_id=1,
                eos_token_id=2,
            ),
            vision_config=dict(
                model_type="pixtral", hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                image_size=28, patch_size=14, head_dim=8,
            ),
            image_token_index=VOCAB + 10,
            spatial_merge_size=2,
        ),
        1022,
        {"composite": True},
    ),
    "llama_bf16": (LlamaConfig, dict(LLAMA_BASE), 1010, {"save_dtype": torch.bfloat16}),
    "llama_f16": (LlamaConfig, dict(LLAMA_BASE), 1011, {"save_dtype": torch.float16}),
    "llama_sharded": (LlamaConfig, dict(LLAMA_BASE), 1012, {"max_shard_size": "100KB"}),
    # Numerical-accuracy fixture: deep (30 layers) and a large vocabulary, f16 weights, tied
    # embeddings, like a real small Llama checkpoint. Built by build_deep_fixture (own inputs
    # [2,128] and a different reference layout, see DEEP_* below).
    "llama_deep": (
        LlamaConfig,
        dict(
            vocab_size=32768,
            num_hidden_layers=30,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            max_position_embeddings=256,
            rope_theta=10000.0,
            rope_scaling=None,
        ),
        1013,
        {"save_dtype": torch.float16, "deep": True},
    ),
}

WEIGHT_STD = 0.15
EMBED_STD = 0.15
BIAS_STD = 0.1
NORM_STD = 0.1

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

EVAL_TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.",
    "Tom had a red ball.",
    "One day, a small dog found a big bone in the park. The dog was very happy and wagged its tail. "
    "He ran home to show his mom.",
    "The cat sat on the mat and looked at the bird.",
    "Sam and Mia went to the beach. They built a big sand castle. Then a wave came and the castle fell down, "
    "but they laughed and built another one.",
    "The sun was hot. Ben wanted some cold water.",
]


def reinit_weights(model, opts: dict) -> None:
    """Overwrite every parameter with seeded random values (no zero/one defaults)."""
    gemma_norm = opts.get("gemma_norm", False)
    embed_std = opts.get("embed_std", EMBED_STD)
    qk_std = opts.get("qk_std", WEIGHT_STD)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied params are yielded once
            if p.dim() == 1 and name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * BIAS_STD)
            elif p.dim() == 1:  # RMSNorm weights (incl. q_norm/k_norm)
                if gemma_norm:  # Gemma RMSNorm computes x * (1 + w)
                    p.copy_(torch.randn_like(p) * NORM_STD)
                else:
                    p.copy_(1.0 + torch.randn_like(p) * NORM_STD)
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p) * embed_std)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(torch.randn_like(p) * qk_std)
            else:
                p.copy_(torch.randn_like(p) * WEIGHT_STD)


def make_input_ids(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=g, dtype=torch.int64)


def eval_texts_tokenized(tok):
    rows = []
    for text in EVAL_TEXTS:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id == 1, ids[:3]
        rows.append(ids)
    return rows


@torch.no_grad()
def eval_loss(model, rows) -> dict:
    total = 0.0  # float64 accumulation
    tokens = 0
    per_row = []
    for ids in rows:
        t = torch.tensor([ids], dtype=torch.int64)
        loss = float(model(input_ids=t, labels=t).loss)
        n = len(ids) - 1
        total += loss * n
        tokens += n
        per_row.append({"tokens": n, "loss": loss})
    mean = total / tokens
    return {"loss": mean, "tokens": tokens, "perplexity": math.exp(mean), "rows": per_row}


def gemma2_softcap_stats(model, input_ids) -> dict:
    """Max |raw| attention score and final logit, before soft-capping."""
    import transformers.models.gemma2.modeling_gemma2 as mg

    orig = mg.eager_attention_forward
    raw_max = []

    def spy(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        k = mg.repeat_kv(key, module.num_key_value_groups)
        s = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            s = s.masked_fill(attention_mask[:, :, :, : k.shape[-2]] < -1, 0.0)
        raw_max.append(float(s.abs().max()))
        return orig(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kw)

    mg.eager_attention_forward = spy
    try:
        with torch.no_grad():
            h = model.model(input_ids=input_ids).last_hidden_state
            raw = model.lm_head(h)
    finally:
        mg.eager_attention_forward = orig
    cap = model.config.final_logit_softcapping
    return {
        "max_abs_raw_final_logit": float(raw.abs().max()),
        "frac_raw_final_logits_above_cap": float((raw.abs() > cap).float().mean()),
        "max_abs_raw_attn_score_per_layer": raw_max,
        "attn_scores_above_cap": any(v > model.config.attn_logit_softcapping for v in raw_max),
    }


def new_model(name: str):
    """The fixture's config and a freshly seeded f32 model (eager attention), before reinit."""
    cls, kwargs, seed, opts = SPECS[name]
    # Vision-language configs take the decoder's settings in text_config only.
    cfg_kwargs = {} if opts.get("composite") else dict(COMMON)
    cfg_kwargs.update(kwargs)
    config = cls(**cfg_kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if opts.get("composite") else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model, seed, opts


def text_decoder(model):
    """The decoder stack (`*.layers`, `*.norm`) of a causal LM or of a vision-language model."""
    return getattr(model.model, "language_model", model.model)


def build_fixture(name: str, tok_rows) -> dict:
    model, seed, opts = new_model(name)
    reinit_weights(model, opts)
    model.eval()

    save_dtype = opts.get("save_dtype", torch.float32)
    out_dir = FIXTURES / "models" / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    to_save = model.to(save_dtype)
    save_kwargs = {"safe_serialization": True}
    if "max_shard_size" in opts:
        save_kwargs["max_shard_size"] = opts["max_shard_size"]
    to_save.save_pretrained(str(out_dir), **save_kwargs)
    # generation_config.json is not needed by the Rust side; keep the fixture minimal.
    gen_cfg = out_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()

    # Reference outputs are always computed from the files on disk, upcast to f32.
    ref = load_fixture_model(name)
    if save_dtype == torch.float32:
        for (n1, p1), (n2, p2) in zip(sorted(model.state_dict().items()), sorted(ref.state_dict().items())):
            assert n1 == n2 and torch.equal(p1, p2), n1
    else:
        for (n1, p1), (n2, p2) in zip(sorted(model.state_dict().items()), sorted(ref.state_dict().items())):
            assert n1 == n2 and torch.equal(p1.float(), p2), n1

    input_ids = make_input_ids(seed + 5000)
    captured = {}
    hooks = []
    for i, layer in enumerate(text_decoder(ref).layers):
        hooks.append(
            layer.register_forward_hook(
                lambda mod, inp, o, i=i: captured.__setitem__(f"hidden.layer.{i}", o[0] if isinstance(o, tuple) else o)
            )
        )
    hooks.append(text_decoder(ref).norm.register_forward_hook(lambda mod, inp, o: captured.__setitem__("hidden.final_norm", o)))
    with torch.no_grad():
        out = ref(input_ids=input_ids, labels=input_ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    logits = out.logits.float().contiguous()
    loss = float(out.loss)
    assert torch.equal(out.hidden_states[-1], captured["hidden.final_norm"])

    tensors = {"input_ids": input_ids.contiguous(), "logits": logits}
    tensors["hidden.embed"] = out.hidden_states[0].float().contiguous()
    for k, v in captured.items():
        tensors[k] = v.float().contiguous()
    ref_dir = FIXTURES / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(ref_dir / f"{name}.safetensors"), metadata={"fixture": name})

    saved_files = sorted(p.name for p in out_dir.iterdir())
    keys = set()
    from safetensors import safe_open

    for f in out_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys.update(fh.keys())
    tied = bool(ref.config.get_text_config().tie_word_embeddings)
    head_keys = {"lm_head.weight", "language_model.lm_head.weight"}
    assert bool(head_keys & keys) == (not tied), (name, tied)

    entry = {
        "model_type": ref.config.model_type,
        "dtype": DTYPE_NAMES[save_dtype],
        "path": rel(out_dir),
        "reference": rel(ref_dir / f"{name}.safetensors"),
        "files": saved_files,
        "num_tensors": len(keys),
        "num_parameters": int(sum(p.numel() for p in ref.parameters())),
        "tie_word_embeddings": tied,
        "seed": seed,
        "input_ids_seed": seed + 5000,
        "loss": loss,
        "loss_tokens": BATCH * (SEQ - 1),
        "reference_tensors": sorted(tensors),
        "eval": eval_loss(ref, tok_rows),
    }
    if save_dtype != torch.float32:
        entry["notes"] = (
            f"weights stored as {DTYPE_NAMES[save_dtype]}; reference logits/losses computed by upcasting "
            "those exact weights to float32 and running in float32"
        )
    if "max_shard_size" in opts:
        shards = [f for f in saved_files if f.startswith("model-") and f.endswith(".safetensors")]
        assert len(shards) >= 2 and "model.safetensors.index.json" in saved_files, saved_files
        entry["shards"] = len(shards)
        entry["max_shard_size"] = opts["max_shard_size"]

    if name == "mistral":
        # Does the eager path honour sliding_window? Compare against a full-causal copy.
        nowin = load_fixture_model(name)
        nowin.config.sliding_window = None
        with torch.no_grad():
            l2 = nowin(input_ids=input_ids).logits
        diff = float((l2 - logits).abs().max())
        first_diff_pos = int(((l2 - logits).abs().amax(dim=(0, 2)) > 0).nonzero()[0])
        entry["sliding_window"] = ref.config.sliding_window
        entry["sliding_window_applied"] = diff > 1e-4
        entry["max_abs_logit_diff_vs_no_window"] = diff
        entry["first_position_affected_by_window"] = first_diff_pos
        entry["window_semantics"] = (
            "query at position q attends to keys k with q - sliding_window < k <= q "
            "(i.e. itself plus the previous sliding_window-1 tokens)"
        )
        assert diff > 1e-4, "mistral eager path ignored sliding_window"
        assert first_diff_pos == ref.config.sliding_window, first_diff_pos
    if name == "gemma2":
        stats = gemma2_softcap_stats(ref, input_ids)
        entry.update(stats)
        entry["layer_types"] = list(ref.config.layer_types)
        entry["sliding_window"] = ref.config.sliding_window
        assert stats["max_abs_raw_final_logit"] > ref.config.final_logit_softcapping, stats
        assert stats["attn_scores_above_cap"], stats
    if name == "qwen3":
        entry["rope_attention_factor"] = float(ref.model.rotary_emb.attention_scaling)
        entry["notes"] = (
            "yarn: cos/sin are multiplied by attention_factor = 0.1*ln(factor)+1 (so q.k scores scale by its "
            "square); inv_freq blends interpolated/extrapolated frequencies with beta_fast=32, beta_slow=1, "
            "truncate=True, original_max_position_embeddings=16"
        )
    if name == "llama_tied_bias":
        entry["rope_inv_freq"] = [float(x) for x in ref.model.rotary_emb.inv_freq]
    if opts.get("composite"):
        entry["text_model_type"] = ref.config.get_text_config().model_type
        entry["layout"] = sorted({k.split(".layers.")[0] for k in keys if ".layers." in k})
        entry["notes"] = (
            "vision-language checkpoint: reference logits from the full model on text-only input_ids "
            "(no pixel_values); only the text decoder is Temper's"
        )
    if name in ("gemma3_text", "olmo3", "gemma3_vlm"):
        cfg = ref.config.get_text_config()
        entry["layer_types"] = list(cfg.layer_types)
        entry["sliding_window"] = cfg.sliding_window
    if name == "llama_linear_rope":
        entry["rope_inv_freq"] = [float(x) for x in ref.model.rotary_emb.inv_freq]
    return entry


# llama_deep: inputs, init and reference layout.
DEEP_BATCH = 2
DEEP_SEQ = 128
DEEP_LAST = 4  # reference logits are stored for the last DEEP_LAST positions of each row only
DEEP_EMBED_STD = 0.4
DEEP_EMBED_BOOST = 2.0  # embedding row v is scaled by 1 + DEEP_EMBED_BOOST * exp(-v / DEEP_EMBED_DECAY)
DEEP_EMBED_DECAY = 2048.0
DEEP_QK_STD = 0.2
DEEP_WEIGHT_STD = 0.1
DEEP_NORM_STD = 0.1


def reinit_deep(model) -> None:
    """Seeded init that keeps a 30-layer, hidden-32 residual stream O(1) and lets every layer matter.

    Embedding rows get larger norms at low ids (like frequent tokens of a real vocabulary), so the
    largest logits sit early in the vocabulary: a naive left-to-right f32 sum over the vocab then
    adds many small terms to an already large partial sum, which is where it loses precision.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied params are yielded once
            if p.dim() == 1:  # RMSNorm weights
                p.copy_(1.0 + torch.randn_like(p) * DEEP_NORM_STD)
            elif "embed_tokens" in name:
                v = torch.arange(p.shape[0], dtype=torch.float32)
                scale = 1.0 + DEEP_EMBED_BOOST * torch.exp(-v / DEEP_EMBED_DECAY)
                p.copy_(torch.randn_like(p) * DEEP_EMBED_STD * scale[:, None])
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(torch.randn_like(p) * DEEP_QK_STD)
            else:
                p.copy_(torch.randn_like(p) * DEEP_WEIGHT_STD)


def sequential_f32_sum(x: torch.Tensor) -> torch.Tensor:
    """Left-to-right float32 sum over the last dim (one rounding per element, no pairwise tree)."""
    acc = torch.zeros(x.shape[:-1], dtype=torch.float32)
    for i in range(x.shape[-1]):
        acc = acc + x[..., i]
    return acc


def float64_llama(model):
    """model.double(), with RMSNorm and RoPE also in float64 (transformers computes both in f32).

    The attention softmax, also f32 in transformers, needs f64_attention() around the forward.
    """
    import types

    def norm64(self, h):
        var = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))

    def rope64(self, x, position_ids):
        dim = self.inv_freq.shape[0] * 2
        base = self.config.rope_theta
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = (inv[None, :, None] @ position_ids[:, None, :].double()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    model = model.double()
    for mod in model.modules():
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = types.MethodType(norm64, mod)
    model.model.rotary_emb.forward = types.MethodType(rope64, model.model.rotary_emb)
    return model


@contextlib.contextmanager
def f64_attention():
    """Llama eager attention with the softmax in the query dtype (f64) instead of f32."""
    import transformers.models.llama.modeling_llama as ml

    orig = ml.eager_attention_forward

    def eager64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = ml.repeat_kv(key, module.num_key_value_groups)
        v = ml.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask[:, :, :, : k.shape[-2]]
        w = torch.softmax(w, dim=-1)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    ml.eager_attention_forward = eager64
    try:
        yield
    finally:
        ml.eager_attention_forward = orig


def build_deep_fixture(name: str, tok_rows) -> dict:
    model, seed, opts = new_model(name)
    reinit_deep(model)
    model.eval()

    save_dtype = opts["save_dtype"]
    out_dir = FIXTURES / "models" / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.to(save_dtype).save_pretrained(str(out_dir), safe_serialization=True)
    gen_cfg = out_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    # Real f16 checkpoints (saved by transformers < 4.56) spell the dtype key "torch_dtype";
    # transformers 4.57 writes "dtype". Use the older spelling here (4.57 reads both).
    cfg_path = out_dir / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json = {("torch_dtype" if k == "dtype" else k): v for k, v in cfg_json.items()}
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")

    # Reference outputs come from the f16 files on disk, upcast to f32 (as Temper loads them).
    from transformers import AutoConfig

    declared = AutoConfig.from_pretrained(str(out_dir), local_files_only=True).dtype
    assert declared == torch.float16, declared
    ref = load_fixture_model(name)
    for (n1, p1), (n2, p2) in zip(sorted(model.state_dict().items()), sorted(ref.state_dict().items())):
        assert n1 == n2 and p2.dtype == torch.float32 and torch.equal(p1.float(), p2), n1

    vocab = ref.config.vocab_size
    g = torch.Generator().manual_seed(seed + 5000)
    input_ids = torch.randint(3, vocab, (DEEP_BATCH, DEEP_SEQ), generator=g, dtype=torch.int64)
    labels = input_ids[:, 1:]
    tokens = DEEP_BATCH * (DEEP_SEQ - 1)
    with torch.no_grad():
        out = ref(input_ids=input_ids, labels=input_ids, output_hidden_states=True)
    logits = out.logits.float()
    loss_f32 = float(out.loss)
    assert math.isfinite(loss_f32) and loss_f32 > 1.0, loss_f32
    flat_logits = logits[:, :-1].reshape(-1, vocab)
    nll = F.cross_entropy(flat_logits, labels.reshape(-1), reduction="none").view(DEEP_BATCH, DEEP_SEQ - 1)
    rows_f32 = [float(F.cross_entropy(logits[r, :-1], labels[r])) for r in range(DEEP_BATCH)]
    assert abs(float(nll.double().mean()) - loss_f32) < 1e-5, (float(nll.mean()), loss_f32)

    # What a naive backend would get: the same f32 logits, but log-sum-exp with a sequential
    # f32 sum of exp(x - max) over the vocabulary.
    mx = flat_logits.max(-1).values
    lse_seq = mx + torch.log(sequential_f32_sum(torch.exp(flat_logits - mx[:, None])))
    nll_seq = lse_seq - flat_logits.gather(1, labels.reshape(-1, 1))[:, 0]
    loss_seq = float(nll_seq.double().mean())
    loss_f32_logits_f64_ce = float(F.cross_entropy(flat_logits.double(), labels.reshape(-1)))

    # transformers' own model.double(): matmuls etc. in f64, but RMSNorm, RoPE cos/sin and the
    # attention softmax are computed in f32 inside, and its labels= loss upcasts logits to f32
    # (so the cross-entropy here is taken by hand, in f64).
    plain64 = load_fixture_model(name).double()
    with torch.no_grad():
        lg = plain64(input_ids=input_ids).logits
    loss_plain64 = float(F.cross_entropy(lg[:, :-1].reshape(-1, vocab), labels.reshape(-1)))
    del plain64, lg
    # Everything in f64 (RMSNorm, RoPE, attention softmax and the cross-entropy included).
    m64 = float64_llama(load_fixture_model(name))
    with torch.no_grad(), f64_attention():
        lg64 = m64(input_ids=input_ids).logits
    assert lg64.dtype == torch.float64
    loss_f64 = float(F.cross_entropy(lg64[:, :-1].reshape(-1, vocab), labels.reshape(-1)))
    rows_f64 = [float(F.cross_entropy(lg64[r, :-1], labels[r])) for r in range(DEEP_BATCH)]
    max_logit_diff_f32_f64 = float((logits.double() - lg64).abs().max())
    del m64, lg64

    last = logits[:, -DEEP_LAST:, :].contiguous()
    hidden_last = out.hidden_states[-1][:, -DEEP_LAST:, :].float().contiguous()
    tensors = {
        "input_ids": input_ids.contiguous(),
        "logits": last,
        "hidden.final_norm": hidden_last,
        "nll": nll.float().contiguous(),
    }
    ref_dir = FIXTURES / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(ref_dir / f"{name}.safetensors"), metadata={"fixture": name})

    resid_rms = [float(h.double().pow(2).mean().sqrt()) for h in out.hidden_states[:-1]]
    logit_std = float(logits.double().std())
    assert logit_std > 0.5, logit_std

    saved_files = sorted(p.name for p in out_dir.iterdir())
    from safetensors import safe_open

    keys = set()
    for f in out_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys.update(fh.keys())
    assert "lm_head.weight" not in keys

    return {
        "model_type": ref.config.model_type,
        "dtype": DTYPE_NAMES[save_dtype],
        "path": rel(out_dir),
        "reference": rel(ref_dir / f"{name}.safetensors"),
        "files": saved_files,
        "num_tensors": len(keys),
        "num_parameters": int(sum(p.numel() for p in ref.parameters())),
        "tie_word_embeddings": True,
        "num_hidden_layers": ref.config.num_hidden_layers,
        "vocab_size": vocab,
        "seed": seed,
        "input_ids_seed": seed + 5000,
        "input_ids_shape": [DEEP_BATCH, DEEP_SEQ],
        "input_ids_range": [3, vocab],
        "loss": loss_f32,
        "loss_tokens": tokens,
        "loss_rows": rows_f32,
        "loss_f64": loss_f64,
        "loss_rows_f64": rows_f64,
        "loss_f32_minus_f64": loss_f32 - loss_f64,
        "loss_transformers_double": loss_plain64,
        "loss_f32_logits_f64_cross_entropy": loss_f32_logits_f64_ce,
        "loss_f32_cross_entropy_f64_mean": float(nll.double().mean()),
        "loss_sequential_f32_vocab_sum": loss_seq,
        "max_abs_logit_diff_f32_vs_f64": max_logit_diff_f32_f64,
        "logits_std": logit_std,
        "logits_max_abs": float(logits.abs().max()),
        "residual_rms_per_layer_input": resid_rms,
        "reference_tensors": sorted(tensors),
        "eval": eval_loss(ref, tok_rows),
        "notes": (
            "numerical-accuracy fixture (30 layers, vocab 32768, f16 weights, tied; config.json spells the dtype "
            "'torch_dtype'). loss / loss_rows / eval: transformers in float32 on the f16 weights upcast to f32 "
            "(labels=input_ids, mean over the 254 shifted tokens; loss_rows: the same per row). loss_f64 / "
            "loss_rows_f64: the same weights with everything in float64 (model.double() plus RMSNorm, RoPE, the "
            "attention softmax and the cross-entropy in f64). loss_transformers_double: plain model.double() "
            "(transformers keeps RMSNorm, RoPE cos/sin and the attention softmax in f32), cross-entropy in f64. "
            "loss_f32_logits_f64_cross_entropy: the f32 logits with an f64 cross-entropy. "
            "loss_f32_cross_entropy_f64_mean: torch's f32 per-token cross-entropy (its f32 log_softmax) averaged in "
            "f64. loss_sequential_f32_vocab_sum: the f32 logits with log-sum-exp taken by a left-to-right f32 sum of "
            "exp(x - max) over the vocabulary (what a naive backend gets). reference: input_ids i64 [2,128] (uniform "
            "in [3,32768)), logits f32 [2,4,32768] = positions 124..127 of each row only, hidden.final_norm f32 "
            "[2,4,32] (same positions), nll f32 [2,127] (torch's f32 per-token cross-entropy of the shifted labels). "
            "Init: embeddings N(0,0.4) times 1+2*exp(-id/2048) per row (large logits early in the vocab, like "
            "frequent tokens), q/k N(0,0.2), other matrices N(0,0.1), RMSNorm 1+N(0,0.1)."
        ),
    }


def stories260k_reference() -> dict:
    tok = AutoTokenizer.from_pretrained(str(STORIES260K), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(STORIES260K), dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    model.eval()
    rows = eval_texts_tokenized(tok)
    ev = eval_loss(model, rows)
    prompt = "Once upon a time"
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=40,
            pad_token_id=model.config.eos_token_id,
        )
    full = gen[0].tolist()
    prompt_ids = enc["input_ids"][0].tolist()
    new_ids = full[len(prompt_ids):]
    text = tok.decode(full, skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text
    return {
        "path": "shared/models/stories260K (read from $TEMPER_SHARED or <repo>/../shared; not copied)",
        "eval": ev,
        "greedy": {
            "prompt": prompt,
            "prompt_ids": prompt_ids,
            "max_new_tokens": 40,
            "do_sample": False,
            "generated_ids": new_ids,
            "output_ids": full,
            "text": text,
            "new_text": tok.decode(new_ids, skip_special_tokens=True),
            "stopped_on_eos": bool(new_ids and new_ids[-1] == model.config.eos_token_id),
        },
        "eval_token_ids": rows,
    }


def build_one(name: str, tok_rows) -> dict:
    builder = build_deep_fixture if SPECS[name][3].get("deep") else build_fixture
    return builder(name, tok_rows)


def phase1_only(names) -> None:
    """Rebuild only the named phase-1 fixtures; every other file and manifest entry is kept."""
    setup_determinism()
    tok = AutoTokenizer.from_pretrained(str(STORIES260K), local_files_only=True)
    rows = eval_texts_tokenized(tok)
    models = dict(load_manifest().get("models", {}))
    for name in names:
        print(f"[phase1] {name}", flush=True)
        models[name] = build_one(name, rows)
    models = {k: models[k] for k in [*SPECS, *models] if k in models}  # SPECS order, extras last
    update_manifest({"models": models})


def phase1() -> None:
    setup_determinism()
    for sub in ("models", "reference"):
        d = FIXTURES / sub
        if d.exists():
            shutil.rmtree(d)
    (FIXTURES / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in EVAL_TEXTS))
    tok = AutoTokenizer.from_pretrained(str(STORIES260K), local_files_only=True)
    rows = eval_texts_tokenized(tok)

    models = {}
    for name in SPECS:
        print(f"[phase1] {name}", flush=True)
        models[name] = build_one(name, rows)
    print("[phase1] stories260K", flush=True)
    stories = stories260k_reference()

    update_manifest(
        {
            "description": (
                "Reference fixtures for Temper, generated with HF transformers/PEFT on CPU in float32 with eager "
                "attention. models/<name>: tiny random HF checkpoints (vocab 512, usable with the stories260K "
                "tokenizer); reference/<name>.safetensors: input_ids [2,13] int64, logits [2,13,512] f32 and "
                "hidden.* activations; eval.jsonl: eval texts; peft/: LoRA adapters with "
                "logits/grads/merged weights; chat/: chat-template and tokenizer encodings."
            ),
            "tolerances": {
                "logits_f32_abs": 1e-4,
                "loss_abs": 1e-5,
                "grad_f32_abs": 1e-5,
                "train_loss_abs": 1e-4,
            },
            "conventions": {
                "loss": "transformers ForCausalLMLoss: logits[:, :-1] vs labels[:, 1:], cross-entropy, mean over "
                "labels != -100",
                "eval": "each eval.jsonl row tokenised separately with the stories260K tokenizer (BOS prepended), "
                "no padding/packing; loss = sum_rows(loss_row*(len_row-1))/sum_rows(len_row-1) accumulated in "
                "float64; tokens = sum_rows(len_row-1); perplexity = exp(loss)",
                "hidden": "reference/<name>.safetensors also holds [2,13,hidden] f32 activations for layer-by-layer "
                "debugging: hidden.embed = embedding output fed to layer 0 (Gemma/Gemma2: already multiplied by "
                "sqrt(hidden_size) in f32), hidden.layer.<i> = residual stream after decoder layer i, "
                "hidden.final_norm = output of the final norm (input of lm_head)",
                "tokenizer": "stories260K tokenizer (transformers AutoTokenizer, add_bos_token=true)",
            },
            "models": models,
            "stories260K": stories,
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", type=int, action="append", choices=[1, 2, 3], help="run only these phases")
    ap.add_argument(
        "--only",
        action="append",
        choices=list(SPECS),
        help="rebuild only this phase-1 fixture (repeatable); other fixtures and phases are left untouched",
    )
    args = ap.parse_args()
    if args.only:
        if args.phase:
            ap.error("--only and --phase are exclusive")
        phase1_only(args.only)
        return
    phases = args.phase or [1, 2, 3]
    if 1 in phases:
        phase1()
    if 2 in phases:
        import make_peft_fixtures

        make_peft_fixtures.main()
    if 3 in phases:
        import make_chat_fixtures

        make_chat_fixtures.main()


if __name__ == "__main__":
    main()
