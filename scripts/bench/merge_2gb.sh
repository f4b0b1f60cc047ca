#!/usr/bin/env bash
# Peak memory and time of `temper merge` on a random 1.1 B-parameter (2.2 GB bf16, 3 shards)
# Llama model with a rank-16 adapter on all seven projections of every layer.
#   bash scripts/bench/merge_2gb.sh [WORK_DIR]      (needs ~7 GB of free disk)
set -euo pipefail
work="${1:-/tmp/temper-merge-2gb}"
cargo build --no-default-features --bin temper --example random_model
bin=target/debug
[ -f "$work/model/config.json" ] || "$bin/examples/random_model" "$work"
du -sh "$work/model" "$work/adapter"
rm -rf "$work/merged"
/usr/bin/time -v "$bin/temper" merge --model "$work/model" --adapter "$work/adapter" --out "$work/merged" 2> "$work/time.txt"
grep -E "Elapsed|Maximum resident" "$work/time.txt"
ls -l "$work/merged"
