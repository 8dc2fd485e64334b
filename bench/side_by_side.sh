#!/usr/bin/env bash
# Side-by-side throughput and memory of the cpu-small MD4 transformer (vocab 27 + mask, length
# 256, width 256, 4 layers, 4 heads, GLU, batch 16, f32): maskdiff (dfdx + fused kernels,
# network/examples/throughput.rs) against the identical PyTorch eager model and step
# (bench/torch_reference.py), run alternately in one invocation so both see the same machine
# load. Ends with
#   maskdiff: ...; PyTorch: ...            (best tokens/s per side, peak RSS of the train phase)
#   train_ratio=X forward_ratio=Y mem_ratio=Z
# ratios = maskdiff over PyTorch tokens/s; mem_ratio = maskdiff over PyTorch peak resident
# memory of the train phase (whole process, Linux VmHWM; < 1 means maskdiff uses less). The
# spread (min–max over rounds) of each side is printed too.
# Each side reports tokens/s of its fastest timed iteration; with ROUNDS > 1 the best round per
# side is used. On a shared machine other processes only ever add time (PyTorch's OpenMP threads
# degrade badly when cores are oversubscribed), so best-of is the fair comparison.
# Env: ITERS (timed iterations, default 10), WARMUP (default 2), ROUNDS (alternations, default 2),
#      THREADS (threads per side, default: all cores; THREADS=1 is the least load-sensitive).
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${ITERS:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-}

cargo build --release -p maskdiff-train --example throughput >&2
python3 -c "import torch" 2>/dev/null || python3 -m pip install --quiet torch >&2
if [ -n "$THREADS" ]; then
  export RAYON_NUM_THREADS=$THREADS
  torch_threads=(--threads "$THREADS")
else
  torch_threads=()
fi

rs_f=(); rs_t=(); rs_m=(); py_f=(); py_t=(); py_m=()
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r: maskdiff (dfdx)" >&2
  line=$(./target/release/examples/throughput --iters "$ITERS" --warmup "$WARMUP" | tee >(cat >&2) | tail -n 1)
  rs_f+=("$(echo "$line" | field forward_tok_s)"); rs_t+=("$(echo "$line" | field train_tok_s)")
  rs_m+=("$(echo "$line" | field train_peak_rss_mb)")
  echo "== round $r: PyTorch" >&2
  line=$(python3 -W ignore bench/torch_reference.py --iters "$ITERS" --warmup "$WARMUP" "${torch_threads[@]}" 2>/dev/null | tee >(cat >&2) | grep '^torch ')
  py_f+=("$(echo "$line" | field forward_tok_s)"); py_t+=("$(echo "$line" | field train_tok_s)")
  py_m+=("$(echo "$line" | field train_peak_rss_mb)")
done
sleep 0.2 # let the tee'd copies reach stderr first
best() { printf '%s\n' "$@" | sort -g | tail -n 1; }
least() { printf '%s\n' "$@" | sort -g | head -n 1; }
span() { echo "$(least "$@")–$(best "$@")"; }
rf=$(best "${rs_f[@]}"); rt=$(best "${rs_t[@]}"); pf=$(best "${py_f[@]}"); pt=$(best "${py_t[@]}")
rm_=$(least "${rs_m[@]}"); pm=$(least "${py_m[@]}")
echo "spread over $ROUNDS rounds (tok/s): maskdiff forward $(span "${rs_f[@]}"), train $(span "${rs_t[@]}"); PyTorch forward $(span "${py_f[@]}"), train $(span "${py_t[@]}")"
echo "maskdiff: forward ${rf} tok/s, train ${rt} tok/s, train peak RSS ${rm_} MB; PyTorch: forward ${pf} tok/s, train ${pt} tok/s, train peak RSS ${pm} MB"
awk -v rt="$rt" -v pt="$pt" -v rf="$rf" -v pf="$pf" -v rm="$rm_" -v pm="$pm" \
  'BEGIN { printf "train_ratio=%.3f forward_ratio=%.3f mem_ratio=%.3f\n", rt / pt, rf / pf, rm / pm }'
