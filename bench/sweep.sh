#!/usr/bin/env bash
# Training-cost sweep of the cpu-small MD4 transformer: batch ∈ {8, 16, 32} × length ∈ {128, 256,
# 512}, one training step (masking, forward, MD4 loss, backward, norm, AdamW, EMA) timed by
# network/examples/throughput.rs (fastest of ITERS steps). Prints a Markdown table with tokens/s,
# seconds per step, the step time relative to the same length at batch 8 (linear in batch ⇒ ≈
# B/8) and relative to the same batch at length 128 (at most quadratic in length ⇒ ≤ (N/128)²;
# linear layers alone would give N/128), and the train phase's peak RSS.
# Env: ITERS (default 3), WARMUP (default 1), BATCHES, LENGTHS (space-separated), THREADS,
#      DEVICE (cpu | cuda; cuda needs a build with --features cuda, see bench/gpu.sh),
#      PRESET (default cpu-small), BIN (a prebuilt throughput binary; skips cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${ITERS:-3}
WARMUP=${WARMUP:-1}
BATCHES=${BATCHES:-"8 16 32"}
LENGTHS=${LENGTHS:-"128 256 512"}
DEVICE=${DEVICE:-cpu}
PRESET=${PRESET:-cpu-small}
BIN=${BIN:-}
if [ -n "${THREADS:-}" ]; then export RAYON_NUM_THREADS=$THREADS; fi
if [ -z "$BIN" ]; then
  cargo build --release -p maskdiff-train --example throughput >&2
  BIN=./target/release/examples/throughput
fi
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
declare -A step
echo "| batch | length | train tok/s | s/step | step ÷ step(batch ${BATCHES%% *}) | step ÷ step(length ${LENGTHS%% *}) | peak RSS (MB) |"
echo "|---|---|---|---|---|---|---|"
b0=${BATCHES%% *}; n0=${LENGTHS%% *}
for n in $LENGTHS; do
  for b in $BATCHES; do
    line=$("$BIN" --no-forward --preset "$PRESET" --device "$DEVICE" --batch "$b" --len "$n" \
      --iters "$ITERS" --warmup "$WARMUP" | tail -n 1)
    tok=$(echo "$line" | field train_tok_s); mem=$(echo "$line" | field train_peak_rss_mb)
    s=$(awk -v t="$tok" -v b="$b" -v n="$n" 'BEGIN { printf "%.4f", b * n / t }')
    step[$b,$n]=$s
    rb=$(awk -v s="$s" -v r="${step[$b0,$n]}" -v b="$b" -v b0="$b0" 'BEGIN { printf "%.2f (linear: %.2f)", s / r, b / b0 }')
    rn=$(awk -v s="$s" -v r="${step[$b,$n0]:-$s}" -v n="$n" -v n0="$n0" 'BEGIN { printf "%.2f (N: %.0f, N²: %.0f)", s / r, n / n0, (n / n0)^2 }')
    echo "| $b | $n | $tok | $s | $rb | $rn | $mem |"
  done
done
