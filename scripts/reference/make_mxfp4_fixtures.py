#!/usr/bin/env python
"""MXFP4 dequantization references from transformers (gpt-oss expert weights; run by hand, never in CI).

    /work/venv-moe/bin/python scripts/reference/make_mxfp4_fixtures.py

gpt-oss checkpoints store their fused expert weights as MXFP4: `*_blocks` u8 [E, rows, cols/32, 16]
(two e2m1 codes per byte) and `*_scales` u8 [E, rows, cols/32] (E8M0, bias 127), e.g.
`mlp.experts.gate_up_proj_blocks` [E, 2I, H/32, 16] and `down_proj_blocks` [E, H, I/32, 16].
transformers dequantizes them on load with `convert_moe_packed_tensors`
(transformers 5.24 `integrations/mxfp4.py:229-311`, called from `Mxfp4Dequantize.convert` through
`dequantize_convertops`, l.101-126 and 448-450) and keeps the result transposed, [E, cols, rows]
(`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]).

No quantizer is involved: the blocks and scales are random bytes (random nibbles, scales in the
realistic 115..135, plus one case with every byte value and every scale 0..255), and the reference
is transformers' own function, so the fixture tests the decoding and nothing else.

tests/fixtures/moe/mxfp4/mxfp4.safetensors, per case NAME (shapes etc. in the metadata key `mxfp4`, JSON):
    NAME.blocks       u8  [E, rows, G, 16]   (G = cols / 32)
    NAME.scales       u8  [E, rows, G]
    NAME.dequant      bf16 [E, cols, rows]   convert_moe_packed_tensors(blocks, scales), its default
                                             dtype=torch.bfloat16 (what a bf16 model loads into)
    NAME.dequant_f32  f32 [E, cols, rows]    the same with dtype=torch.float32 (a float32 model)

The script also checks that (1) the bf16 and f32 results agree bit for bit once the bf16 is widened
(every MXFP4 value is a 1-2 significant-bit number times a power of two, exact in bf16; the only
inexact results are overflows to +-inf, the same in both), (2) an independent numpy decoding
agrees, and (3) `from_pretrained` of a tiny gpt_oss MXFP4 checkpoint with
`Mxfp4Config(dequantize=True)` puts exactly `convert_moe_packed_tensors`' output into
`mlp.experts.gate_up_proj` / `down_proj` (so the [E, cols, rows] layout is the in-memory one).

Deterministic: fixed seeds, no threads involved; two runs give byte-identical files.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FIXTURES, setup_determinism  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors  # noqa: E402

OUT = FIXTURES / "moe" / "mxfp4" / "mxfp4.safetensors"

# (name, E, rows, cols, seed, scales): "realistic" = uniform 115..135 (inclusive);
# "all" = every scale 0..255 once per expert-row (rows * G must be 256), in a shuffled order.
CASES = [
    ("gate_up_e3_r10_c64", 3, 10, 64, 1, "realistic"),  # like gate_up_proj: rows 2I, cols H
    ("down_e2_r7_c96", 2, 7, 96, 2, "realistic"),  # like down_proj: rows H, cols I
    ("edge_e1_r128_c64", 1, 128, 64, 3, "all"),  # every byte, every scale: signed zeros, subnormals, inf
]


def make_case(E: int, rows: int, cols: int, seed: int, scales_kind: str):
    assert cols % 32 == 0
    G = cols // 32
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, rows, G, 16), generator=g, dtype=torch.int64).to(torch.uint8)
    if scales_kind == "realistic":
        scales = torch.randint(115, 136, (E, rows, G), generator=g, dtype=torch.int64).to(torch.uint8)
    else:
        assert E * rows * G == 256
        scales = torch.randperm(256, generator=g).to(torch.uint8).reshape(E, rows, G)
        # every byte value 0..255 appears in the first 16 blocks as well
        blocks.view(-1, 16)[:16] = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    return blocks, scales


def numpy_dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Independent decoding: out[e, c, r] = FP4[nibble] * 2**(scale - 127), where block byte
    c//2 % 16 of group c//32 holds column c in its low nibble (c even) or high nibble (c odd)."""
    E, rows, G, B = blocks.shape
    lut = np.array(FP4_VALUES, dtype=np.float64)
    lo = lut[blocks & 0x0F]
    hi = lut[blocks >> 4]
    vals = np.stack([lo, hi], axis=-1).reshape(E, rows, G, 2 * B)  # lo, hi, lo, hi, ...
    vals = vals * np.exp2(scales.astype(np.float64) - 127.0)[..., None]
    with np.errstate(over="ignore"):
        vals = vals.reshape(E, rows, G * 2 * B).astype(np.float32)
    return np.ascontiguousarray(vals.transpose(0, 2, 1))


def loader_check() -> str:
    """Load a tiny gpt_oss MXFP4 checkpoint with Mxfp4Config(dequantize=True) and compare the
    experts' in-memory parameters with convert_moe_packed_tensors' output."""
    from transformers import AutoModelForCausalLM, GptOssConfig, Mxfp4Config

    H, I, E = 64, 96, 3
    cfg = GptOssConfig(
        vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, num_local_experts=E, num_experts_per_tok=2,
        sliding_window=4, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(tmp)
        sd = load_file(f"{tmp}/model.safetensors")
        gu_b, gu_s = make_case(E, 2 * I, H, 11, "realistic")
        dn_b, dn_s = make_case(E, H, I, 12, "realistic")
        pre = "model.layers.0.mlp.experts."
        assert sd[pre + "gate_up_proj"].shape == (E, H, 2 * I), sd[pre + "gate_up_proj"].shape
        assert sd[pre + "down_proj"].shape == (E, I, H), sd[pre + "down_proj"].shape
        del sd[pre + "gate_up_proj"], sd[pre + "down_proj"]
        sd[pre + "gate_up_proj_blocks"], sd[pre + "gate_up_proj_scales"] = gu_b, gu_s
        sd[pre + "down_proj_blocks"], sd[pre + "down_proj_scales"] = dn_b, dn_s
        save_file(sd, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        conf = json.loads(Path(f"{tmp}/config.json").read_text())
        conf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": None}
        Path(f"{tmp}/config.json").write_text(json.dumps(conf))
        for dtype in (torch.bfloat16, torch.float32):
            loaded = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=dtype, quantization_config=Mxfp4Config(dequantize=True), local_files_only=True
            )
            ex = loaded.model.layers[0].mlp.experts
            for name, b, s, shape in (("gate_up_proj", gu_b, gu_s, (E, H, 2 * I)), ("down_proj", dn_b, dn_s, (E, I, H))):
                p = getattr(ex, name).detach()
                ref = convert_moe_packed_tensors(b, s, dtype=dtype)
                assert p.dtype == dtype and tuple(p.shape) == shape, (name, p.dtype, p.shape)
                assert torch.equal(p.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                   ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), name
                results.append(f"{name} {str(dtype).removeprefix('torch.')} {list(shape)}")
    return "from_pretrained(Mxfp4Config(dequantize=True)) == convert_moe_packed_tensors bit for bit: " + "; ".join(results)


def main() -> None:
    setup_determinism()
    tensors: dict[str, torch.Tensor] = {}
    meta_cases = {}
    for name, E, rows, cols, seed, scales_kind in CASES:
        blocks, scales = make_case(E, rows, cols, seed, scales_kind)
        deq_bf16 = convert_moe_packed_tensors(blocks, scales)  # default dtype=torch.bfloat16
        deq_f32 = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert deq_bf16.dtype == torch.bfloat16 and deq_f32.dtype == torch.float32
        assert tuple(deq_f32.shape) == (E, cols, rows), deq_f32.shape
        # bf16 == f32 bit for bit after widening: no bf16 rounding ever happens.
        assert torch.equal(deq_bf16.float().view(torch.int32), deq_f32.view(torch.int32)), name
        assert not deq_f32.isnan().any(), name
        ref = numpy_dequant(blocks.numpy(), scales.numpy())
        assert np.array_equal(ref.view(np.int32), deq_f32.numpy().view(np.int32)), name
        tensors[f"{name}.blocks"] = blocks.contiguous()
        tensors[f"{name}.scales"] = scales.contiguous()
        tensors[f"{name}.dequant"] = deq_bf16.contiguous()
        tensors[f"{name}.dequant_f32"] = deq_f32.contiguous()
        meta_cases[name] = {
            "E": E, "rows": rows, "cols": cols, "seed": seed, "scales": scales_kind,
            "blocks_shape": list(blocks.shape), "scales_shape": list(scales.shape),
            "dequant_shape": list(deq_f32.shape),
            "n_inf": int(deq_f32.isinf().sum()), "n_subnormal": int(((deq_f32 != 0) & (deq_f32.abs() < 2.0**-126)).sum()),
        }
        print(f"[mxfp4] {name}: blocks {list(blocks.shape)} -> dequant {list(deq_f32.shape)}", flush=True)

    loader = loader_check()
    print(f"[mxfp4] {loader}", flush=True)
    info = {
        "generator": "scripts/reference/make_mxfp4_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "function": "transformers.integrations.mxfp4.convert_moe_packed_tensors (integrations/mxfp4.py:229-311)",
        "layout": "blocks u8 [E, rows, G, 16], scales u8 [E, rows, G], G = cols/32; dequant [E, cols, rows] "
                  "(convert_moe_packed_tensors' final transpose(1, 2)); out[e, c, r] = FP4_VALUES[nibble] * "
                  "2^(scale[e, r, c/32] - 127), nibble = low 4 bits of blocks[e, r, c/32, (c%32)/2] for even c, "
                  "high 4 bits for odd c",
        "dequant": "bf16, dtype=torch.bfloat16 (the function's default)",
        "dequant_f32": "f32, dtype=torch.float32; equal bit for bit to dequant widened to f32",
        "loader_check": loader,
        "cases": meta_cases,
    }
    # One metadata key only: safetensors keeps __metadata__ in a hash map, so several keys would be
    # written in a random order and the file would not be byte-identical between runs.
    metadata = {"mxfp4": json.dumps(info, sort_keys=True)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"[mxfp4] wrote {OUT} ({OUT.stat().st_size} bytes)", flush=True)


if __name__ == "__main__":
    main()
