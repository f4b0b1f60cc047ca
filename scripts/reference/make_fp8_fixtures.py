#!/usr/bin/env python
"""FP8 (e4m3) checkpoint fixtures: tiny Llama checkpoints whose decoder projections are stored as
float8_e4m3fn with a `weight_scale_inv` multiplier per block (DeepSeek-V3 / Qwen 3.5 FP8 layout,
`quantization_config.quant_method = "fp8"`) or per tensor, and the references Temper is tested
against. Run by hand, never in CI (torch 2.15.0, transformers 5.25.0, safetensors 0.8.0, CPU):

    /work/venv-q35/bin/python scripts/reference/make_fp8_fixtures.py

tests/fixtures/fp8/<name>/        config.json + model.safetensors (the FP8 checkpoint)
tests/fixtures/fp8/<name>.reference.safetensors
    input_ids [1, 24], logits: LlamaForCausalLM (eager, f32) holding the dequantized weights;
    dequant.<tensor>: every dequantized projection in f32.

Models:
  block:     weight_block_size [32, 32]; every shape divisible. The dequantized weights are
             transformers 5.25's own `Fp8Dequantize._dequantize_one(..., output_dtype=float32)`.
  ragged:    weight_block_size [40, 40]: 64 and 96 are not multiples, so the edge blocks are partial
             and the scale grid is ceil(rows / 40) x ceil(cols / 40), as DeepSeek's `weight_dequant`
             reads it (transformers' Fp8Dequantize refuses such shapes: "not divisible by scale
             grid"); reference: fp8 -> f32, times the scale of block (i // 40, j // 40), in f32.
  per_tensor: weight_block_size null, one scale per tensor (shape [1]).
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "fp8"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config(block):
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": block}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16", "quantization_config": qc,
    }


def quantize(w, block):
    rows, cols = w.shape
    if block is None:
        scale = w.abs().max().clamp(min=1e-12) / 448.0
        q = (w / scale).to(torch.float8_e4m3fn)
        return q, scale.reshape(1).to(torch.float32)
    bm, bn = block
    gr, gc = -(-rows // bm), -(-cols // bn)
    scale = torch.empty(gr, gc, dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(gr):
        for j in range(gc):
            blk = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequant_ceil(q, scale, block):
    f = q.to(torch.float32)
    if block is None:
        return f * scale.reshape(())
    bm, bn = block
    rows, cols = f.shape
    s = scale.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return f * s


def main():
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    torch.manual_seed(0)
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    manifest = {"versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}, "models": {}}
    base_cfg = {k: v for k, v in config(None).items() if k != "quantization_config"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**base_cfg), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" in n else 0.08) + (1.0 if "norm" in n else 0.0))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    for name, block in (("block", [32, 32]), ("ragged", [40, 40]), ("per_tensor", None)):
        disk, deq, ref = {}, {}, {}
        for k, v in state.items():
            if any(f".{p}." in k for p in PROJ) and k.endswith(".weight"):
                q, s = quantize(v, block)
                disk[k] = q
                disk[k + "_scale_inv"] = s
                d = dequant_ceil(q, s, block)
                if name == "block":
                    tf = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)
                    assert torch.equal(tf, d), k
                deq[k] = d
                ref["dequant." + k] = d
            else:
                disk[k] = v
                deq[k] = v
        folder = OUT / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config(block), indent=2) + "\n")
        save_file(disk, str(folder / "model.safetensors"), metadata={"format": "pt"})
        model.load_state_dict(deq)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        ref["input_ids"] = ids
        ref["logits"] = logits.contiguous()
        save_file(ref, str(OUT / f"{name}.reference.safetensors"))
        manifest["models"][name] = {
            "weight_block_size": block,
            "fp8_tensors": sum(1 for k in disk if k.endswith("_scale_inv")),
            "max_abs_dequant_error_vs_f32": max((deq[k] - state[k]).abs().max().item() for k in deq if k in disk and k + "_scale_inv" in disk),
            "reference_dequant": "transformers Fp8Dequantize (equal to ceil-div blocks)" if name == "block" else "fp8 -> f32 times the block's scale (ceil-div grid)",
        }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
