#!/usr/bin/env bash
# The sampler frontier (issue 16): for each sampler and budget, draw N_SAMPLES text samples from
# MODEL, score them under JUDGE (a model that did not generate them: the autoregressive one,
# `maskdiff train --model block --block-size 1` on the same data), and record the network calls
# per sample, the judge's generative perplexity, the samples' unigram entropy and the wall time.
# Writes OUT/frontier.jsonl (one JSON object per point), OUT/frontier.md (a table) and
# OUT/frontier.png (calls against perplexity, one line per sampler).
#
#   bash bench/frontier.sh MODEL_RUN JUDGE_RUN OUT_DIR
#   STEPS="16 32 64 128 256" TAU=0.9 ETA=0.02 N_SAMPLES=64 bash bench/frontier.sh ...
# The threshold sampler reveals at least ⌈#masked / steps left⌉ per call, so --steps bounds its
# calls from above and τ lowers them further when the model is sure.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 3 ]; then
  echo "usage: bench/frontier.sh MODEL_RUN JUDGE_RUN OUT_DIR" >&2
  exit 2
fi
model=$1 judge=$2 out=$3
STEPS=${STEPS:-"16 32 64 128 256"}
TAU=${TAU:-0.9}
ETA=${ETA:-0.02}
N_SAMPLES=${N_SAMPLES:-64}
SEED=${SEED:-0}
cargo build --release -p maskdiff-cli >&2
bin=target/release/maskdiff
mkdir -p "$out"
points="$out/frontier.jsonl"
: > "$points"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)" \
  | tee "$out/machine.txt" >&2

# point LABEL FILE_TAG [sample flags...]: sample, judge, append one JSON line.
point() {
  local label=$1 tag=$2
  shift 2
  local txt="$out/samples-$tag.txt" log="$out/sample-$tag.log" json="$out/judge-$tag.json"
  local t0 t1
  t0=$(date +%s.%N)
  "$bin" sample "$model" -n "$N_SAMPLES" --seed "$SEED" -o "$txt" "$@" > /dev/null 2> "$log"
  t1=$(date +%s.%N)
  local nfe
  nfe=$(sed -n 's/.*network calls per sample: \([0-9.]*\).*/\1/p' "$log" | tail -n 1)
  "$bin" eval "$judge" --samples "$txt" --json "$json" > "$out/judge-$tag.txt"
  python3 - "$label" "$tag" "$nfe" "$t0" "$t1" "$json" "$@" >> "$points" <<'EOF'
import json, sys
label, tag, nfe, t0, t1, path = sys.argv[1:7]
j = json.load(open(path))
r = j["result"]
print(json.dumps({
    "sampler": label, "tag": tag, "flags": " ".join(sys.argv[7:]), "nfe": float(nfe),
    "gen_perplexity": j["gen_perplexity"], "judge_bits": r["bits_per_token"],
    "judge_stderr_bits": r["stderr_bits"], "unigram_entropy": j["unigram_entropy"],
    "wall_s": float(t1) - float(t0), "samples": j["samples"],
}))
EOF
  tail -n 1 "$points" >&2
}

for t in $STEPS; do
  point ancestral "ancestral-$t" --sampler ancestral --steps "$t"
  point "remdm cap $ETA" "remdm-$t" --sampler remdm --remdm-strategy cap --eta "$ETA" --steps "$t"
  point "threshold $TAU" "threshold-$t" --sampler threshold --tau "$TAU" --steps "$t"
done
# The reference: the judge on held-out real text of the same length (what a perfect sampler's
# samples would score), and that text's unigram entropy.
"$bin" eval "$judge" --max-sequences "$N_SAMPLES" > "$out/judge-test.txt"

python3 - "$points" > "$out/frontier.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| sampler | flags | calls per sample | generative perplexity | judge bits/token | unigram entropy (bits) | wall (s) |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['sampler']} | `{r['flags']}` | {r['nfe']:.1f} | {r['gen_perplexity']:.3f} | "
          f"{r['judge_bits']:.4f} ± {r['judge_stderr_bits']:.4f} | {r['unigram_entropy']:.3f} | {r['wall_s']:.1f} |")
EOF
"$bin" plot frontier "$points" -o "$out/frontier.png"
cat "$out/frontier.md"
echo "judge on $N_SAMPLES held-out test sequences:" && head -n 3 "$out/judge-test.txt"
