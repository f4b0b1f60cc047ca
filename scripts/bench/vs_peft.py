#!/usr/bin/env python3
"""Side-by-side LoRA step benchmark: PyTorch + transformers + peft against `temper bench`.

Run by hand, never in CI. Tested with (scripts/bench/requirements.txt):
    torch 2.15.0 (+cu132 wheel from plain PyPI, run on CPU), transformers 5.25.0, peft 0.22.0,
    safetensors 0.8.0, numpy 2.4.6, psutil 7.2.2, Python 3.11.7

    python3 -m venv /work/venv-bench
    /work/venv-bench/bin/pip install -r scripts/bench/requirements.txt
    /work/venv-bench/bin/python scripts/bench/vs_peft.py --config benches/configs/llama-100m.json \
        --seq-len 256 --batch 4 --steps 5 --rank 16 --threads 2 [--forward-only] \
        [--gradient-checkpointing] [--temper target/release/temper] [--device cpu] [--json]
        [--torch-device cuda --torch-dtype bfloat16]   # the GPU side by side (scripts/gpu/check.sh)
        [--load-in-4bit [--double-quant]]   # QLoRA: needs bitsandbytes==0.50.2 in the venv too

The PyTorch side mirrors src/cli/bench.rs:
  * model built from the config with random weights, float32, attention "sdpa" (the
    transformers default a user gets), `use_cache=False`;
  * training: LoRA r, lora_alpha = 2r, dropout 0 on q/k/v/o/gate/up/down_proj of every decoder
    layer (not lm_head); AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0, global
    gradient-norm clipping at 1.0 (temper's TrainConfig defaults); one step is forward with
    labels = input_ids, backward, clip, opt.step(), opt.zero_grad(set_to_none=True);
  * `--forward-only`: model.eval() under torch.no_grad(), forward to the logits, and, like
    `temper bench --forward-only`, no LoRA is injected;
  * input ids uniform in [0, vocab); one warm-up step, then `--steps` timed steps; the median
    is sorted(times)[len // 2] and tokens/s = batch * seq_len / median, as temper computes it;
  * `--load-in-4bit` (QLoRA): the random model is saved to a temporary folder by a separate
    process, then loaded with transformers' BitsAndBytesConfig(load_in_4bit, nf4, blocks of 64,
    compute dtype = --torch-dtype, double quantization with --double-quant), as a user loads a
    Hub checkpoint; `temper bench --load-in-4bit [--double-quant]` draws its random weights
    straight into NF4. Both keep embeddings, norms and lm_head unquantized;
  * peak memory is VmHWM of /proc/self/status (temper's peak_host_rss_mib), measured in a
    child process of this script (`--torch-worker`) so that it is PyTorch's alone.
Then, unless --skip-temper, `TEMPER bench ... --json` runs with RAYON_NUM_THREADS=threads.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Temper's `all-linear`: every decoder projection, on Qwen 3.5 / Qwen3-Next the gated delta nets'
# in_proj_qkv, in_proj_z and out_proj too, on DeepSeek / Kimi / Moonlight the MLA projections
# (names a model lacks match nothing; PEFT only refuses a list that matches no module at all).
TARGET_MODULES = [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj_qkv", "in_proj_z", "out_proj",
    "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
]
ATTENTION = "sdpa"


class BenchError(Exception):
    """A failure reported as one clear message, without a traceback."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("benches/configs/llama-100m.json"), help="an HF config.json (or a folder with one)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up step")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and RAYON_NUM_THREADS")
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--temper", type=Path, default=Path("target/release/temper"), help="the temper binary")
    p.add_argument("--temper-args", default="", help="extra arguments appended to `temper bench` (one string, shell-split)")
    p.add_argument("--device", default="cpu", help="passed to `temper bench --device`")
    p.add_argument("--torch-device", default="cpu", choices=["cpu", "cuda"], help="where the PyTorch side runs")
    p.add_argument("--torch-dtype", default="float32", choices=["float32", "bfloat16"], help="the PyTorch base model's dtype (PEFT keeps the LoRA weights in float32)")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: the base's decoder projections in NF4 on both sides")
    p.add_argument("--double-quant", action="store_true", help="with --load-in-4bit: bitsandbytes' double quantization on both sides")
    p.add_argument("--save-random-to", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--skip-temper", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text lines")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("seq_len", "batch", "steps", "rank", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def mode_name(args: argparse.Namespace) -> str:
    if args.forward_only:
        return "forward"
    return "train+checkpointing" if args.gradient_checkpointing else "train"


def config_file(p: Path) -> Path:
    return p / "config.json" if p.is_dir() else p


def peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def current_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- PyTorch worker


def torch_worker(args: argparse.Namespace) -> dict:
    """Runs in its own process; returns the report printed as one JSON line."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    peft = None
    if not args.forward_only:
        import peft
        from peft import LoraConfig, get_peft_model

    torch.set_num_threads(args.threads)
    # What the imports alone hold (library pages included): the wheel from plain PyPI is the
    # CUDA build, whose libraries (and triton, pulled in by peft) count here even on CPU.
    rss_import = current_rss_mib()
    path = config_file(args.config)
    with open(path) as f:
        raw = json.load(f)
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    cfg.use_cache = False
    dtype = getattr(torch, args.torch_dtype)
    device = torch.device(args.torch_device)

    if args.load_in_4bit:
        import tempfile

        import bitsandbytes
        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as tmp:
            # The random f32 model is made and saved by another process, so that this one's peak
            # memory is the 4-bit load and the training alone.
            prep = [sys.executable, str(Path(__file__).resolve()), "--torch-worker", "--config", str(args.config), "--save-random-to", tmp]
            done = subprocess.run(prep, env=thread_env(args.threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                raise BenchError(f"saving the random model failed:\n{tail(done.stderr)}")
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=args.double_quant, bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, device_map=args.torch_device, dtype=dtype, attn_implementation=ATTENTION)
        model.config.use_cache = False
        bnb_version = bitsandbytes.__version__
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTENTION, dtype=torch.float32)
        model = model.to(device=device, dtype=dtype)
        bnb_version = None
    attn = getattr(model.config, "_attn_implementation", ATTENTION)
    parameters = sum(p.numel() for p in model.parameters())

    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g, dtype=torch.long).to(device)
    labels = input_ids.clone()

    trainable = 0
    times: list[float] = []
    if args.forward_only:
        model.eval()
        with torch.no_grad():
            for s in range(args.steps + 1):
                t0 = time.perf_counter()
                logits = model(input_ids=input_ids, use_cache=False).logits
                _ = logits[0, 0, 0].item()
                dt = time.perf_counter() - t0
                del logits
                if s > 0:
                    times.append(dt)
    else:
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        # A mixture-of-experts model: LoRA on the experts too (target_parameters), as
        # `temper bench` does. PEFT >= 0.19 would rewrite that config for the qwen2_moe
        # conversion family (gate_up at rank 2r, peft/utils/transformers_weight_conversion.py);
        # the rewrite is switched off so both sides train the same rank-r adapter.
        moe = getattr(model.config, "num_experts", None) or getattr(model.config, "num_local_experts", None)
        params = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if moe else None
        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGET_MODULES, target_parameters=params, bias="none", task_type="CAUSAL_LM")
        # autocast_adapter_dtype (PEFT's default) keeps the LoRA weights in float32 on a
        # bfloat16 base, as temper does.
        if moe:
            import peft.utils.transformers_weight_conversion as twc

            twc.convert_peft_config_for_transformers = lambda *a, **k: None
        model = get_peft_model(model, lora)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        for s in range(args.steps + 1):
            t0 = time.perf_counter()
            out = model(input_ids=input_ids, labels=labels, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = out.loss.item()
            dt = time.perf_counter() - t0
            del out
            if s > 0:
                times.append(dt)
        if not (loss == loss):
            raise BenchError(f"PyTorch training loss is {loss}")

    median = sorted(times)[len(times) // 2]
    return {
        "side": "pytorch+peft",
        "mode": mode_name(args),
        "device": args.torch_device,
        "dtype": args.torch_dtype,
        "peak_device_mib": torch.cuda.max_memory_reserved() / 1048576.0 if device.type == "cuda" else None,
        "attention": attn,
        "threads": torch.get_num_threads(),
        "parameters": parameters,
        "trainable_parameters": trainable,
        "lora": not args.forward_only,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "steps": len(times),
        "step_times_s": times,
        "median_step_s": median,
        "tokens_per_s": args.batch * args.seq_len / median,
        "peak_host_rss_mib": peak_rss_mib(),
        "rss_after_import_mib": rss_import,
        "load_in_4bit": "nf4" + (" + double quantization" if args.double_quant else "") if args.load_in_4bit else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__ if peft else None, "bitsandbytes": bnb_version, "python": sys.version.split()[0]},
    }


def save_random(args: argparse.Namespace) -> None:
    """The random f32 model (seed 0) saved as safetensors, for --load-in-4bit."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(config_file(args.config)) as f:
        raw = json.load(f)
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(args.save_random_to))


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[k] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def tail(text: str, n: int = 20) -> str:
    lines = text.strip().splitlines()
    return "\n".join("    " + l for l in lines[-n:]) if lines else "    (nothing)"


def run_torch(args: argparse.Namespace, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--torch-worker", *argv]
    proc = subprocess.run(cmd, env=thread_env(args.threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    report = last_json_line(proc.stdout) if proc.returncode == 0 else None
    if report is None:
        raise BenchError(f"the PyTorch worker failed (exit {proc.returncode}); its last output:\n{tail(proc.stderr + proc.stdout)}")
    return report


# --------------------------------------------------------------------------- temper


def resolve_temper(p: Path) -> Path:
    for cand in (p, REPO_ROOT / p) if not p.is_absolute() else (p,):
        if cand.is_file():
            if not os.access(cand, os.X_OK):
                raise BenchError(f"the temper binary {cand} is not executable")
            return cand
    raise BenchError(f"the temper binary {p} does not exist: build it with `cargo build --release` or pass --temper PATH (or --skip-temper)")


def run_temper(args: argparse.Namespace) -> dict:
    binary = resolve_temper(args.temper)
    cmd = [str(binary), "bench", "--model", str(args.config), "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.steps), "--rank", str(args.rank)]
    if args.forward_only:
        cmd.append("--forward-only")
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.load_in_4bit:
        cmd.append("--load-in-4bit")
    if args.double_quant:
        cmd.append("--double-quant")
    cmd += ["--device", args.device, "--json", *shlex.split(args.temper_args)]
    try:
        proc = subprocess.run(cmd, env=thread_env(args.threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise BenchError(f"could not run {binary}: {e}") from None
    if proc.returncode != 0:
        raise BenchError(f"`{shlex.join(cmd)}` failed (exit {proc.returncode}):\n{tail(proc.stderr + proc.stdout)}")
    report = last_json_line(proc.stdout)
    if report is None or not isinstance(report.get("tokens_per_s"), (int, float)) or not isinstance(report.get("median_step_s"), (int, float)):
        raise BenchError(f"`{shlex.join(cmd)}` printed no JSON report with tokens_per_s and median_step_s; its stdout:\n{tail(proc.stdout)}")
    report["side"] = "temper"
    report["command"] = shlex.join(cmd)
    return report


# --------------------------------------------------------------------------- output


def fmt_mib(v) -> str:
    return f"{v:.0f} MiB" if isinstance(v, (int, float)) else "n/a"


def line(label: str, mode: str, r: dict, note: str) -> str:
    shape = f"{r.get('batch')}x{r.get('seq_len')}"
    return f"{label:<13} {mode}  {shape}  {r['tokens_per_s']:.1f} tok/s  median {r['median_step_s']:.3f} s  peak RSS {fmt_mib(r.get('peak_host_rss_mib'))}  ({note})"


def ratios(pt: dict, tm: dict) -> dict:
    mem = None
    if isinstance(pt.get("peak_host_rss_mib"), (int, float)) and isinstance(tm.get("peak_host_rss_mib"), (int, float)) and pt["peak_host_rss_mib"] > 0:
        mem = tm["peak_host_rss_mib"] / pt["peak_host_rss_mib"]
    return {"speed": tm["tokens_per_s"] / pt["tokens_per_s"], "peak_memory": mem}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.torch_worker and args.save_random_to:
        save_random(args)
        return 0
    if args.torch_worker:
        print(json.dumps(torch_worker(args)), flush=True)
        return 0
    if args.double_quant and not args.load_in_4bit:
        raise BenchError("--double-quant needs --load-in-4bit")
    if args.load_in_4bit and args.forward_only:
        raise BenchError("--load-in-4bit measures QLoRA training; drop --forward-only")

    cfg = config_file(args.config)
    if not cfg.is_file():
        raise BenchError(f"no config at {cfg}")
    if args.device not in ("cpu", "ndarray") and args.torch_device == "cpu" and not args.skip_temper:
        print(f"note: temper runs on --device {args.device}; the PyTorch side runs on CPU in {args.torch_dtype} (--torch-device)", file=sys.stderr)
    if not args.skip_temper:
        resolve_temper(args.temper)  # fail before the (slow) PyTorch run, not after it

    pt = run_torch(args, argv)
    tm = None if args.skip_temper else run_temper(args)
    ratio = ratios(pt, tm) if tm else None
    mode = mode_name(args)

    if args.json:
        print(json.dumps({"config": str(cfg), "mode": mode, "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps, "rank": args.rank, "threads": args.threads, "pytorch": pt, "temper": tm, "ratio": ratio}))
        return 0
    v = pt["versions"]
    libs = f"torch {v['torch']}, transformers {v['transformers']}" + (f", peft {v['peft']}" if v["peft"] else ", no LoRA")
    tm_mode = str(tm.get("mode", mode)) if tm else mode
    width = max(len(mode), len(tm_mode))
    base = f", {fmt_mib(pt['rss_after_import_mib'])} after imports" if pt.get("rss_after_import_mib") else ""
    print(line("pytorch+peft", mode.ljust(width), pt, f"{libs}, {pt['attention']}, {pt['threads']} threads{base}"))
    if tm:
        print(line("temper", tm_mode.ljust(width), tm, str(tm.get("device", args.device))))
        mem = f"{ratio['peak_memory']:.2f}x" if ratio["peak_memory"] is not None else "n/a"
        print(f"ratio temper/pytorch: speed {ratio['speed']:.2f}x, peak memory {mem}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
