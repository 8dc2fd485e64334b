#!/usr/bin/env bash
# Side-by-side throughput of the cpu-small MD4 transformer (vocab 27 + mask, length 256, width 256,
# 4 layers, 4 heads, GLU, batch 16, f32): maskdiff (dfdx, network/examples/throughput.rs) against
# the identical PyTorch eager model and step (bench/torch_reference.py), run alternately in one
# invocation so both see the same machine load. Ends with
#   train_ratio=X forward_ratio=Y      (maskdiff tokens/s over PyTorch tokens/s)
# Each side reports tokens/s of its fastest timed iteration; with ROUNDS > 1 the best round per
# side is used. On a shared machine other processes only ever add time (PyTorch's OpenMP threads
# degrade badly when cores are oversubscribed), so best-of is the fair comparison.
# Env: ITERS (timed iterations, default 10), WARMUP (default 2), ROUNDS (alternations, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${ITERS:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-2}

cargo build --release -p maskdiff-network --example throughput >&2
python3 -c "import torch" 2>/dev/null || python3 -m pip install --quiet torch >&2

rs_f=(); rs_t=(); py_f=(); py_t=()
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r: maskdiff (dfdx)" >&2
  line=$(./target/release/examples/throughput --iters "$ITERS" --warmup "$WARMUP" | tee /dev/stderr | tail -n 1)
  rs_f+=("$(echo "$line" | field forward_tok_s)"); rs_t+=("$(echo "$line" | field train_tok_s)")
  echo "== round $r: PyTorch" >&2
  line=$(python3 -W ignore bench/torch_reference.py --iters "$ITERS" --warmup "$WARMUP" 2>/dev/null | tee /dev/stderr | grep '^torch ')
  py_f+=("$(echo "$line" | field forward_tok_s)"); py_t+=("$(echo "$line" | field train_tok_s)")
done
best() { printf '%s\n' "$@" | sort -g | tail -n 1; }
rf=$(best "${rs_f[@]}"); rt=$(best "${rs_t[@]}"); pf=$(best "${py_f[@]}"); pt=$(best "${py_t[@]}")
echo "maskdiff: forward ${rf} tok/s, train ${rt} tok/s; PyTorch: forward ${pf} tok/s, train ${pt} tok/s"
awk -v rt="$rt" -v pt="$pt" -v rf="$rf" -v pf="$pf" \
  'BEGIN { printf "train_ratio=%.3f forward_ratio=%.3f\n", rt / pt, rf / pf }'
