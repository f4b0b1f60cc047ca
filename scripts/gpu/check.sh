#!/usr/bin/env bash
# One prepared check of Temper's GPU paths (issue 9). Run by hand on a machine with a GPU,
# never in CI; it needs no Rust toolchain, only a stripped release binary built elsewhere:
#
#   CARGO_TARGET_DIR=target/gpu-build cargo build --release --no-default-features --features cuda
#   strip -o target/gpu/temper target/gpu-build/release/temper   # 57 MiB; with wgpu too: 68 MiB,
#                                                                # over the 64 MiB a carry allows
#   cp -r ../shared/models/stories260K target/gpu/stories260K     # the tiny model with a tokenizer
#   scripts/gpu/check.sh --device cuda --temper target/gpu/temper --model target/gpu/stories260K
#
# It reads the repository's tests/fixtures, benches/configs and datasets (run it from the
# repository root) and writes one JSON summary, $OUT/summary.json (OUT defaults to
# target/gpu-check). Parts, each recorded even when another fails:
#   selftest   logits and loss of every fixture model against transformers: f32 (1e-4) and
#              bf16 on CUDA (4% of the largest logit, 0.02 on the loss; wgpu runs in f32 only),
#              and the CPU in f32;
#   curve      a 10-step training run (stories260K, dropout on) on the device and on the CPU,
#              f32: the largest step-loss difference (same masks on every device, so ~1e-5);
#   bench      `temper bench` on benches/configs/llama-3.2-1b.json at seq 512 and 2048, bf16,
#              with and without gradient checkpointing: tokens/s, TFLOP/s, MFU (against
#              PEAK_TFLOPS, or the known dense bf16 peak of the GPU nvidia-smi names), peak
#              device memory;
#   peft       if a PyTorch with CUDA, transformers and peft import: the same configs through
#              scripts/bench/vs_peft.py on the GPU in bfloat16.
# --quick (the dry run on lavapipe, Mesa's software Vulkan device): bench on the fixture config
# tests/fixtures/models/llama at seq 64 for one step in f32, the curve at seq 64 with micro-batches
# of 2, and no PyTorch, so that every part runs in minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."

DEVICE=cuda
TEMPER=target/release/temper
MODEL=../shared/models/stories260K
OUT=${OUT:-target/gpu-check}
QUICK=0
PYTHON=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --temper) TEMPER=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ ! -x "$TEMPER" ]; then echo "error: no temper binary at $TEMPER (--temper)" >&2; exit 2; fi
if [ ! -f "$MODEL/tokenizer.json" ]; then echo "error: $MODEL has no tokenizer.json (--model: stories260K)" >&2; exit 2; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/check.log"
: > "$LOG"
start_all=$(date +%s)
say() { echo "== $*" | tee -a "$LOG" >&2; }

# Run a command whose stdout is one JSON object; print it, or a JSON error object.
json_of() {
  local out err rc
  err=$(mktemp)
  out=$("$@" 2>"$err")
  rc=$?
  cat "$err" >> "$LOG"
  if [ $rc -eq 0 ] && [ -n "$out" ]; then
    echo "$out"
  else
    printf '{"error": "exit %s: %s"}\n' "$rc" "$(tail -n 3 "$err" | tr '"\\\n' "'/ " | cut -c1-400)"
  fi
  rm -f "$err"
}

half=bf16
if [ "$DEVICE" = wgpu ]; then half=f16; fi

say "selftest on $DEVICE (f32, $half) and cpu (f32)"
st_dev_f32=$(json_of "$TEMPER" selftest --fixtures tests/fixtures --device "$DEVICE" --precision f32 --json)
if [ "$DEVICE" = wgpu ]; then
  # refused by temper: f16 crashes Burn 0.21's kernel fusion on wgpu (src/cli/device.rs)
  st_dev_half='"skipped: wgpu runs in f32 only (temper selftest --precision f16 says why)"'
else
  st_dev_half=$(json_of "$TEMPER" selftest --fixtures tests/fixtures --device "$DEVICE" --precision "$half" --json)
fi
st_cpu=$(json_of "$TEMPER" selftest --fixtures tests/fixtures --device cpu --precision f32 --json)

say "10-step training curve on $DEVICE and cpu (f32, lora_dropout 0.05)"
curve_sets=""
if [ $QUICK -eq 1 ]; then curve_sets="--set data.seq_len=64 --set train.micro_batch_size=2"; fi
curve_run() {
  local dev=$1 dir="$OUT/curve-$1"
  rm -rf "$dir"
  "$TEMPER" train recipes/quickstart.yaml --device "$dev" \
    --set "base_model=$MODEL" --set train.max_steps=10 --set train.precision=f32 \
    --set train.eval_steps=100 --set train.save_steps=100 --set "output.dir=$dir" $curve_sets >> "$LOG" 2>&1 || return 1
  # step losses, one per line, from metrics.jsonl's train lines
  grep '"kind":"train"' "$dir/metrics.jsonl" | sed 's/.*"loss":\([-0-9.eE+]*\).*/\1/'
}
curve_dev=$(curve_run "$DEVICE" | tr '\n' ' ')
curve_cpu=$(curve_run cpu | tr '\n' ' ')
list() { echo $1 | sed 's/ /, /g'; }
diff=$(awk -v a="$curve_dev" -v b="$curve_cpu" 'BEGIN {
  n = split(a, x, " "); m = split(b, y, " "); d = 0
  for (i = 1; i <= n && i <= m; i++) { e = x[i] - y[i]; if (e < 0) e = -e; if (e > d) d = e }
  if (n == 10 && m == 10) printf "%.3g", d; else printf "null" }')
curve="{\"device_losses\": [$(list "$curve_dev")], \"cpu_losses\": [$(list "$curve_cpu")], \"max_abs_loss_diff\": ${diff:-null}}"

peak=${PEAK_TFLOPS:-}
gpu_name=""
if command -v nvidia-smi > /dev/null 2>&1; then
  gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  if [ -z "$peak" ]; then
    # dense bf16 tensor-core peaks from the vendor's data sheets (TFLOP/s)
    case "$gpu_name" in
      *H200*|*H100*SXM*|*"H100 80GB HBM3"*) peak=989 ;;
      *H100*PCIe*|*"H100 PCIe"*) peak=756 ;;
      *A100*) peak=312 ;;
      *L40S*) peak=362 ;;
      *"RTX 4090"*) peak=165 ;;
      *L4*) peak=121 ;;
    esac
  fi
fi

if [ $QUICK -eq 1 ]; then
  bench_cfg=tests/fixtures/models/llama/config.json; seqs="64"; steps=1; bench_prec=f32
else
  bench_cfg=benches/configs/llama-3.2-1b.json; seqs="512 2048"; steps=5; bench_prec=bf16
fi
say "bench on $DEVICE: $bench_cfg, seq $seqs, $bench_prec"
bench="["
peft="["
have_torch=0
if [ $QUICK -eq 0 ] && "$PYTHON" -c 'import torch, transformers, peft; assert torch.cuda.is_available()' > /dev/null 2>&1; then
  have_torch=1
fi
sep=""
for seq in $seqs; do
  for ckpt in "" --gradient-checkpointing; do
    b=$(json_of "$TEMPER" bench --model "$bench_cfg" --seq-len "$seq" --batch 1 --steps "$steps" --rank 16 \
      --device "$DEVICE" --precision "$bench_prec" --json $ckpt)
    if [ -n "$peak" ]; then
      mfu=$(echo "$b" | sed -n 's/.*"achieved_tflops":\([-0-9.eE+]*\).*/\1/p' | awk -v p="$peak" '{ printf "%.4f", $1 / p }')
      b=$(echo "$b" | sed "s/}\$/, \"peak_tflops\": $peak, \"mfu\": ${mfu:-null}}/")
    fi
    bench="$bench$sep$b"
    if [ $have_torch -eq 1 ]; then
      p=$(json_of "$PYTHON" scripts/bench/vs_peft.py --config "$bench_cfg" --seq-len "$seq" --batch 1 --steps "$steps" \
        --rank 16 --threads 8 --torch-device cuda --torch-dtype bfloat16 --skip-temper --json $ckpt)
      peft="$peft$sep$p"
    fi
    sep=", "
  done
done
bench="$bench]"
peft="$peft]"
if [ $have_torch -eq 0 ]; then peft='"skipped: no PyTorch with CUDA, transformers and peft here"'; fi

elapsed=$(( $(date +%s) - start_all ))
cat > "$OUT/summary.json" <<EOF
{"device": "$DEVICE", "gpu": "$gpu_name", "temper": "$("$TEMPER" --version 2>/dev/null)", "quick": $QUICK, "elapsed_s": $elapsed,
 "selftest": {"device_f32": $st_dev_f32, "device_$half": $st_dev_half, "cpu_f32": $st_cpu},
 "curve": $curve,
 "bench": $bench,
 "peft": $peft}
EOF
say "wrote $OUT/summary.json in ${elapsed} s"
cat "$OUT/summary.json"
# exit status: every selftest passed and the curves agree within 1e-4
fail=0
for s in "$st_dev_f32" "$st_dev_half" "$st_cpu"; do
  case "$s" in *'"pass":true}'*|'"skipped: '*) ;; *) fail=1 ;; esac
done
echo "$curve" | awk '{ if (match($0, /"max_abs_loss_diff": [0-9.eE+-]+/)) { v = substr($0, RSTART + 21, RLENGTH - 21); exit !(v + 0 <= 1e-4) } exit 1 }' || fail=1
exit $fail
