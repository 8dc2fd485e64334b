#!/usr/bin/env bash
# Data-parallel scaling on CPU (issue 17): training tokens/s of the `cpu-small` model on the
# English corpus for
#   1. one process, RAYON_NUM_THREADS=1,
#   2. one process, RAYON_NUM_THREADS=2,
#   3. `mpirun -np 2`, single-threaded ranks,
# all with the same global batch (BATCH sequences × SEQ tokens × 2 micro-batches per step), and
# for the MPI run the gradient all-reduce's time and bytes per step (the CLI's closing
# "data-parallel over 2 ranks: ..." line). Prints one Markdown table with the CPU and the load.
#
#   bench/dp_scaling.sh            (needs target/release/maskdiff built with --features mpi, or
#                                   builds it; data-cache/english from scripts/fetch-data.sh)
#
# Env: BIN (default target/release/maskdiff), STEPS (default 12), BATCH (per micro-batch,
#      default 4), SEQ (default 256), ROUNDS (default 2), OUT (scratch folder, default
#      target/dp-scaling).
# tokens/s = STEPS × 2 × BATCH × SEQ / the run's training seconds (elapsed_s of the final
# record in metrics.jsonl), which excludes start-up and the final validation.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/maskdiff}
STEPS=${STEPS:-12}
BATCH=${BATCH:-4}
SEQ=${SEQ:-256}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-target/dp-scaling}
log() { printf '== %s\n' "$*" >&2; }

if [ ! -x "$BIN" ]; then
  log "building $BIN with --features mpi"
  cargo build --release -p maskdiff-cli --features mpi >&2
fi
[ -d data-cache/english ] || bash scripts/fetch-data.sh data-cache english >&2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$OUT"

# One training run: prints "tokens/s all-reduce-ms MiB" (the last two "-" without MPI).
one() { # name threads launcher...
  local name=$1 threads=$2; shift 2
  local dir="$OUT/$name" log="$OUT/$name.log"
  rm -rf "$dir"
  RAYON_NUM_THREADS=$threads "$@" "$BIN" train --config configs/cpu-small-english.toml \
    --steps "$STEPS" --warmup-steps 2 --batch-size "$BATCH" --seq-len "$SEQ" --grad-accum 2 \
    --eval-every 0 --eval-batches 1 --out "$dir" >"$log" 2>&1 \
    || { log "$name failed:"; tail -n 20 "$log" >&2; exit 1; }
  local secs ar mib
  # the final validation record's elapsed_s: the training seconds, unrounded
  secs=$(python3 -c 'import json, sys
print([r for r in map(json.loads, open(sys.argv[1])) if r.get("elapsed_s") is not None][-1]["elapsed_s"])' \
    "$dir/metrics.jsonl" 2>/dev/null || true)
  [ -n "$secs" ] || { log "$name: no elapsed_s in $dir/metrics.jsonl"; tail -n 20 "$log" >&2; exit 1; }
  ar=$(sed -n 's/.*gradient all-reduce \([0-9.]*\) ms\/step.*/\1/p' "$log" | tail -n 1)
  mib=$(sed -n 's/.*ms\/step (\([0-9.]*\) MiB\/step.*/\1/p' "$log" | tail -n 1)
  awk -v s="$STEPS" -v b="$BATCH" -v n="$SEQ" -v t="$secs" -v ar="${ar:--}" -v mib="${mib:--}" \
    'BEGIN { pct = (ar == "-") ? "-" : sprintf("%.1f", 100 * ar / (1000 * t / s));
             printf "%.0f %s %s %.1f %s\n", s * 2 * b * n / t, ar, mib, t, pct }'
}

declare -A tok ar mib secs pct
for r in $(seq 1 "$ROUNDS"); do
  for cfg in p1t1 p1t2 mpi2; do
    log "round $r: $cfg (uptime: $(uptime | sed 's/.*load average/load average/'))"
    case $cfg in
      p1t1) res=$(one "$cfg" 1) ;;
      p1t2) res=$(one "$cfg" 2) ;;
      mpi2) res=$(one "$cfg" 1 mpirun --oversubscribe -np 2 -x RAYON_NUM_THREADS) ;;
    esac
    read -r t a m s p <<<"$res"
    tok[$cfg]+="${tok[$cfg]:+, }$t"; ar[$cfg]+="${ar[$cfg]:+, }$a"
    mib[$cfg]+="${mib[$cfg]:+, }$m"; secs[$cfg]+="${secs[$cfg]:+, }$s"
    pct[$cfg]+="${pct[$cfg]:+, }$p"
    log "  $t tokens/s ($s s training; all-reduce $a ms/step = $p % of a step, $m MiB/step)"
  done
done

cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)
echo "### Data-parallel scaling on CPU: cpu-small, $BATCH × $SEQ tokens × 2 micro-batches per step, $STEPS steps, $ROUNDS rounds"
echo
echo "$cpu, $(nproc) cores; load at the end: $(uptime | sed 's/.*load average: //') (shared machine: noisy)"
echo
echo "| run | tokens/s | training s | all-reduce ms/step | % of a step | MiB/step |"
echo "|---|---|---|---|---|---|"
echo "| 1 process, 1 thread | ${tok[p1t1]} | ${secs[p1t1]} | – | – | – |"
echo "| 1 process, 2 threads | ${tok[p1t2]} | ${secs[p1t2]} | – | – | – |"
echo "| \`mpirun -np 2\`, 1 thread each | ${tok[mpi2]} | ${secs[mpi2]} | ${ar[mpi2]} | ${pct[mpi2]} | ${mib[mpi2]} |"
