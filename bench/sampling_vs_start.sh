#!/usr/bin/env bash
# Sampling wall time against the start of issue 13 (commit ce880e1), in one invocation:
# builds that commit's `network/train/examples/sampling` (in a git worktree under $WORK, with
# its own target directory under $WORK, first seeded with a copy of this checkout's release
# build so that the dependencies are not rebuilt — cargo names a workspace's own crates by
# their path relative to the workspace root, so two checkouts must not share one target
# directory) and the current one,
# then runs them alternately ROUNDS times — start (its ancestral row is the baseline; that
# binary also runs its cached and first-hitting samplers: it is stopped once its ancestral row is out), then the current
# cached and first-hitting samplers (`--only`) at each precision of PRECISIONS. Prints a
# Markdown table and the line
#   best_exact_over_start_ancestral=X
# (best of rounds of the fastest exact sampler — cached or first-hitting, any precision run —
# over the best of rounds of the start's ancestral sampler), and the same for f32 alone.
#
# Environment: ROUNDS (2), STEPS (256), SAMPLES (16), LEN (256), PRECISIONS (f32,bf16 where the
# CPU has avx512_bf16, else f32), START (ce880e1), WORK (${TMPDIR:-/tmp}/maskdiff-vs-start),
# CARGO_TARGET_DIR (this checkout's target/), NICE (10: niceness of builds and runs).
# Nothing is written inside the repository but build products in its target directory; the
# start's worktree stays registered in git (`git worktree remove "$WORK/start-$START"`).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-256}
SAMPLES=${SAMPLES:-16}
LEN=${LEN:-256}
START=${START:-ce880e1}
WORK=${WORK:-${TMPDIR:-/tmp}/maskdiff-vs-start}
NICE=${NICE:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "${PRECISIONS:-}" ]; then
    if grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null; then PRECISIONS=f32,bf16; else PRECISIONS=f32; fi
fi
mkdir -p "$WORK"

# the path of the example binary that `cargo build` (run in $1) produces
build_example() {
    (cd "$1" && nice -n "$NICE" cargo build --release -p maskdiff-train --example sampling \
        --message-format=json-render-diagnostics) |
        grep '"reason":"compiler-artifact"' | grep '"executable":"' |
        sed 's/.*"executable":"\([^"]*\)".*/\1/' | grep '/examples/sampling' | tail -1
}

START_DIR="$WORK/start-$START"
if [ ! -e "$START_DIR/.git" ]; then
    git -C "$ROOT" worktree add --detach "$START_DIR" "$START" >&2
fi
START_TARGET="$WORK/target"
if [ ! -d "$START_TARGET/release" ] && [ -d "$CARGO_TARGET_DIR/release" ]; then
    echo "seeding $START_TARGET with a copy of $CARGO_TARGET_DIR/release ..." >&2
    mkdir -p "$START_TARGET/release"
    for d in deps build .fingerprint; do
        cp -r "$CARGO_TARGET_DIR/release/$d" "$START_TARGET/release/"
    done
    # only the dependencies: the workspace's own crates are rebuilt from the start's sources
    rm -rf "$START_TARGET"/release/deps/*maskdiff* "$START_TARGET"/release/.fingerprint/maskdiff-* \
        "$START_TARGET"/release/build/maskdiff-*
fi
echo "building the start ($START) ..." >&2
start_exe=$(CARGO_TARGET_DIR="$START_TARGET" build_example "$START_DIR")
cp "$start_exe" "$WORK/start-sampling"
echo "building the current checkout ..." >&2
new_exe=$(build_example "$ROOT")
cp "$new_exe" "$WORK/new-sampling"
new_commit=$(git -C "$ROOT" rev-parse --short HEAD)
dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no | grep -q . && echo "+changes" || true)

args=(--steps "$STEPS" --samples "$SAMPLES" --len "$LEN")
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
results="$WORK/results.txt"
: >"$results"
# wall time (column 3) of the table row whose sampler cell starts with $1
row() { awk -F'|' -v s="$1" 'index($2, " " s) == 1 { gsub(/ /, "", $3); print $3; exit }'; }
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r: start ancestral ..." >&2
    # the start binary runs ancestral, cached and first-hitting; it prints (line-buffered) the
    # ancestral row first: stop it there
    log="$WORK/start-round$r.txt"
    : >"$log" # emptied before the start, which runs concurrently with the polling below
    nice -n "$NICE" "$WORK/start-sampling" "${args[@]}" >>"$log" &
    pid=$!
    until [ -n "$(row 'ancestral' <"$log")" ] || ! kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    t=$(row 'ancestral' <"$log")
    [ -n "$t" ] || { echo "the start binary printed no ancestral row:" >&2; cat "$log" >&2; exit 1; }
    echo "$r start ancestral f32 $t" >>"$results"
    echo "round $r: current cached, first-hitting at $PRECISIONS ..." >&2
    out=$(nice -n "$NICE" "$WORK/new-sampling" "${args[@]}" --only cached,first-hitting \
        --precisions "$PRECISIONS")
    for p in ${PRECISIONS//,/ }; do
        for s in cached first-hitting; do
            echo "$r new $s $p $(echo "$out" | row "$s, $p")" >>"$results"
        done
    done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1) (family $(lscpu | sed -n 's/^CPU family: *//p' | head -1), model $(lscpu | sed -n 's/^Model: *//p' | head -1))"
feats=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' |
    grep -xE 'avx2|fma|avx512f|avx512_bf16|amx_bf16|amx_tile' | sort -u | tr '\n' ' ')
threads=${RAYON_NUM_THREADS:-$(nproc)}
echo
echo "CPU: $cpu, $(nproc) cores; features: ${feats:-none of avx2/avx512}; threads: $threads"
echo "start: $START; current: $new_commit$dirty; $SAMPLES × $LEN tokens, T = $STEPS, cosine grid,"
echo "time-free cpu-small, batch $SAMPLES; load average before: $load_before, after: $load_after"
echo
awk -v rounds="$ROUNDS" -v precs="$PRECISIONS" '
    { key = ($2 == "start") ? "start" : $3 ", " $4; t[$1, key] = $5 }
    END {
        np = split(precs, p, ",")
        n = 0
        for (i = 1; i <= np; i++) { cols[++n] = "cached, " p[i]; cols[++n] = "first-hitting, " p[i] }
        hdr = "| round | start: ancestral, f32 (s)"
        sep = "|---|---"
        for (c = 1; c <= n; c++) { hdr = hdr " | current: " cols[c] " (s)"; sep = sep "|---" }
        print hdr " | best / start ancestral |"
        print sep "|---|"
        bs = 1e30; bn = 1e30; bf = 1e30
        for (r = 1; r <= rounds; r++) {
            s = t[r, "start"]; line = "| " r " | " s; best = 1e30
            if (s < bs) bs = s
            for (c = 1; c <= n; c++) {
                x = t[r, cols[c]]; line = line " | " x
                if (x < best) best = x
                if (x < bn) bn = x
                if (cols[c] ~ /f32$/ && x < bf) bf = x
            }
            printf "%s | %.3f× |\n", line, best / s
        }
        print ""
        printf "best_exact_over_start_ancestral=%.3f\n", bn / bs
        printf "best_exact_f32_over_start_ancestral=%.3f\n", bf / bs
    }' "$results"
