#!/usr/bin/env python
"""4-bit quantization references from bitsandbytes (issue 10; run by hand, never in CI).

    pip install -r scripts/reference/requirements.txt "bitsandbytes==0.50.2"
    python scripts/reference/make_quant_fixtures.py
    python scripts/reference/make_quant_fixtures.py --only double_quant   # bnb4bit_dq.safetensors alone

tests/fixtures/quant/bnb4bit.safetensors, per case NAME (in its metadata, with shape, dtype,
quant_type and blocksize):
    NAME.input     the weight as given to quantize_4bit (f32, bf16 or f16)
    NAME.packed    the uint8 codes quantize_4bit returns (flattened)
    NAME.absmax    its per-block absmax (f32)
    NAME.dequant   the dequantized weight in f32, from bitsandbytes' reference formula
                   (backends/default/ops.py `_dequantize_4bit_compute`, the CUDA kernel's math)

Note: bitsandbytes 0.50.2's CPU `dequantize_4bit` kernel (backends/cpu/ops.py, the C library)
disagrees with its own quantize_4bit when the last dimension is not a multiple of the block
size (it seems to block each row separately): for a [64, 48] weight, 2,717 of 3,072 values
differ and the round-trip error is 0.068 instead of 0.020. It agrees when the last dimension is
a multiple of the block (every real model). The references here use the reference formula.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FIXTURES  # noqa: E402

import torch  # noqa: E402
import bitsandbytes  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402
from bitsandbytes.backends.utils import _get_4bit_code  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

# (name, shape, dtype, quant_type, blocksize, seed): row counts and sizes that are not multiples
# of the block (a short last block, an odd number of values), tiny and exact-code values.
CASES = [
    ("nf4_64x48_f32", (64, 48), torch.float32, "nf4", 64, 1),
    ("nf4_7x37_f32", (7, 37), torch.float32, "nf4", 64, 2),
    ("nf4_33x40_bf16", (33, 40), torch.bfloat16, "nf4", 64, 3),
    ("nf4_19x24_f16", (19, 24), torch.float16, "nf4", 64, 4),
    ("nf4_40x50_block128", (40, 50), torch.float32, "nf4", 128, 5),
    ("nf4_24x128_f32", (24, 128), torch.float32, "nf4", 64, 9),
    ("fp4_64x48_f32", (64, 48), torch.float32, "fp4", 64, 6),
    ("fp4_7x37_f32", (7, 37), torch.float32, "fp4", 64, 7),
    ("fp4_33x40_bf16", (33, 40), torch.bfloat16, "fp4", 64, 8),
]


def weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    flat = w.view(-1)
    # Values on the code book and on the midpoints' neighbourhood, a zero block start, outliers.
    flat[:16] = torch.linspace(-1, 1, 16) * flat[:64].abs().max()
    flat[16] = 0.0
    flat[17] = -flat[17]
    flat[-1] = flat.abs().max() * 3
    return w.to(dtype)


# Double quantization (compress_statistics=True): (name, shape, dtype, quant_type, seed). Absmax
# counts of 4 (the scalar mean path), 96, 512 (two nested blocks) and 938 (a short last nested
# block); all under torch's 32,768-value threshold for a multi-threaded sum.
DQ_CASES = [
    ("dq_nf4_128x256_f32", (128, 256), torch.float32, "nf4", 11),
    ("dq_nf4_300x200_bf16", (300, 200), torch.bfloat16, "nf4", 12),
    ("dq_nf4_96x64_f16", (96, 64), torch.float16, "nf4", 13),
    ("dq_fp4_5x40_f32", (5, 40), torch.float32, "fp4", 14),
]


def double_quant_cases() -> dict:
    """tests/fixtures/quant/bnb4bit_dq.safetensors, per case NAME: NAME.input, NAME.packed (the
    4-bit codes), NAME.absmax_codes (u8), NAME.nested_absmax (f32 per 256 codes), NAME.offset
    (f32 [1], the mean subtracted before the 8-bit quantization) and NAME.absmax (the
    dequantized absmax bitsandbytes computes with: dequantize_blockwise + offset)."""
    tensors, meta = {}, {}
    for name, shape, dtype, qt, seed in DQ_CASES:
        w = weight(shape, dtype, seed)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=True)
        assert state.nested
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        tensors[f"{name}.input"] = w.contiguous()
        tensors[f"{name}.packed"] = packed.reshape(-1).contiguous()
        tensors[f"{name}.absmax_codes"] = state.absmax.contiguous()
        tensors[f"{name}.nested_absmax"] = state.state2.absmax.float().contiguous()
        tensors[f"{name}.offset"] = state.offset.reshape(1).float().contiguous()
        tensors[f"{name}.absmax"] = absmax.float().contiguous()
        meta[name] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "quant_type": qt, "blocksize": 64,
                      "nested_blocksize": state.state2.blocksize, "blocks": int(state.absmax.numel())}
    save_file(tensors, str(FIXTURES / "quant" / "bnb4bit_dq.safetensors"), metadata={"cases": json.dumps(meta), "bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__})
    return meta


def bnb_checkpoints() -> dict:
    """The llama fixture quantized by transformers + bitsandbytes and saved as the Hub ships
    *-bnb-4bit checkpoints (nf4 with and without double quantization, fp4), plus every quantized
    projection dequantized by bitsandbytes: its dequantize_blockwise for a nested absmax (+ the
    offset), then the reference 4-bit formula."""
    import shutil

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = {}
    for name, qt, dq in [("llama_bnb_nf4", "nf4", False), ("llama_bnb_nf4_dq", "nf4", True), ("llama_bnb_fp4", "fp4", False)]:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(str(FIXTURES / "models" / "llama"), quantization_config=cfg, device_map="cpu", dtype=torch.float32)
        dest = FIXTURES / "quant" / name
        if dest.exists():
            shutil.rmtree(dest)
        model.save_pretrained(str(dest))
        (dest / "generation_config.json").unlink(missing_ok=True)
        deq = {}
        for module in model.modules():
            w = getattr(module, "weight", None)
            state = getattr(w, "quant_state", None)
            if state is None:
                continue
            absmax = state.absmax
            if state.nested:
                absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
            code = _get_4bit_code(state.quant_type, w.device)
            full = _dequantize_4bit_compute(w.data.reshape(-1), absmax.float(), code, state.blocksize, state.shape, torch.float32)
            key = next(n for n, m in model.named_modules() if m is module)
            deq[f"{key}.weight"] = full.contiguous()
        with safe_open(str(dest / "model.safetensors"), "pt") as fh:
            assert all(k in fh.keys() for k in deq), name
        save_file(deq, str(dest / "dequantized.safetensors"), metadata={"note": "bitsandbytes' dequantization of every 4-bit weight, f32"})
        out[name] = {"quant_type": qt, "double_quant": dq, "weights": len(deq)}
    return out


def bnb_logit_fixtures() -> dict:
    """A 2-layer Llama whose projections are multiples of 64 wide (bitsandbytes' CPU kernels are
    exact there), quantized by transformers + bitsandbytes (nf4, nf4 + double quantization, fp4)
    and saved, with the logits transformers + bitsandbytes compute on the CPU in f32."""
    import shutil

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    base = FIXTURES / "quant" / "llama64"
    if base.exists():
        shutil.rmtree(base)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1101)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1.0 + torch.randn_like(p) * 0.1 if p.dim() == 1 else torch.randn_like(p) * 0.15)
    model.save_pretrained(str(base))
    (base / "generation_config.json").unlink(missing_ok=True)
    g = torch.Generator().manual_seed(6101)
    ids = torch.randint(3, 512, (2, 13), generator=g)
    out = {}
    for name, qt, dq in [("llama64_nf4", "nf4", False), ("llama64_nf4_dq", "nf4", True), ("llama64_fp4", "fp4", False)]:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=torch.float32)
        m = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=q, device_map="cpu", dtype=torch.float32, attn_implementation="eager")
        m.eval()
        dest = FIXTURES / "quant" / name
        if dest.exists():
            shutil.rmtree(dest)
        # Saved before any forward: on an AVX512-BF16 CPU, bitsandbytes 0.50's first eval forward
        # repacks the weight into a CPU-only layout (absmax rounded to bf16), and its inverse on
        # save does not restore the standard layout (the saved weights dequantize up to 0.39 off).
        m.save_pretrained(str(dest))
        # The reference forward takes bitsandbytes' standard path (dequantize in f32, then the
        # matmul), as on a CUDA device; the CPU-only repacking is switched off.
        for mod in m.modules():
            if hasattr(mod, "support_avx512bf16_for_cpu"):
                mod.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            logits = m(input_ids=ids).logits.float()
        (dest / "generation_config.json").unlink(missing_ok=True)
        save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, str(dest / "reference.safetensors"))
        out[name] = {"quant_type": qt, "double_quant": dq, "max_abs_logit": float(logits.abs().max())}
    return out


def bnb_peft_fixtures() -> dict:
    """PEFT LoRA (r 4, alpha 8, all seven projections, A and B random) on each 4-bit llama64
    model: logits, loss and every LoRA gradient for one batch, in train mode so bitsandbytes
    takes its standard dequantize-then-matmul path (MatMul4Bit, backward dx = dy . dequant(W))."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i, name in enumerate(["llama64_nf4", "llama64_nf4_dq", "llama64_fp4"]):
        d = FIXTURES / "quant" / name
        base = AutoModelForCausalLM.from_pretrained(str(d), device_map="cpu", dtype=torch.float32, attn_implementation="eager")
        ref = load_file(str(d / "reference.safetensors"))
        ids = ref["input_ids"]
        labels = ids.clone()
        labels[0, :4] = -100
        torch.manual_seed(3301 + i)
        cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(base, cfg)
        model.train()
        outp = model(input_ids=ids, labels=labels)
        outp.loss.backward()
        adir = d / "peft_adapter"
        if adir.exists():
            import shutil
            shutil.rmtree(adir)
        model.save_pretrained(str(adir))
        (adir / "README.md").unlink(missing_ok=True)
        tensors = {"input_ids": ids, "labels": labels, "logits": outp.logits.detach().float().contiguous()}
        for n, p in model.named_parameters():
            if "lora_" in n:
                key = n.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
                tensors[f"grad.{key}"] = p.grad.detach().float().contiguous()
        save_file(tensors, str(d / "peft_reference.safetensors"))
        out[name] = {"loss": float(outp.loss), "lora_tensors": sum(1 for k in tensors if k.startswith("grad."))}
    return out


def bnb_train_fixture() -> None:
    """A 10-step PEFT + bitsandbytes training curve on the nf4 base (train mode: bitsandbytes'
    standard path), recorded as `llama64_nf4_train` in the manifest's train section."""
    import make_peft_fixtures
    from common import load_manifest, update_manifest

    entry = make_peft_fixtures.build_train("llama64_nf4", 4101, base_dir="quant/llama64_nf4")
    train = dict(load_manifest().get("train", {}))
    train["llama64_nf4_train"] = entry
    update_manifest({"train": train})
    print("llama64_nf4_train losses", [round(x, 4) for x in entry["losses"]])


def main() -> None:
    if sys.argv[1:] == ["--only", "double_quant"]:
        print(json.dumps(double_quant_cases(), indent=1))
        return
    torch.manual_seed(0)
    tensors, meta = {}, {}
    for name, shape, dtype, qt, bs, seed in CASES:
        w = weight(shape, dtype, seed)
        packed, state = F.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=False)
        deq = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, _get_4bit_code(qt, packed.device), bs, state.shape, torch.float32)
        if shape[-1] % bs == 0:
            assert torch.equal(deq, F.dequantize_4bit(packed, state).float()), name
        tensors[f"{name}.input"] = w.contiguous()
        tensors[f"{name}.packed"] = packed.reshape(-1).contiguous()
        tensors[f"{name}.absmax"] = state.absmax.float().contiguous()
        tensors[f"{name}.dequant"] = deq.reshape(-1).contiguous()
        meta[name] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "quant_type": qt, "blocksize": bs}
    out = FIXTURES / "quant"
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "bnb4bit.safetensors"), metadata={"cases": json.dumps(meta), "bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__})
    print(json.dumps(meta, indent=1))
    print(json.dumps(double_quant_cases(), indent=1))
    print(json.dumps(bnb_checkpoints(), indent=1))
    print(json.dumps(bnb_logit_fixtures(), indent=1))
    print(json.dumps(bnb_peft_fixtures(), indent=1))
    bnb_train_fixture()


if __name__ == "__main__":
    main()
