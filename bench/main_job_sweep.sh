#!/usr/bin/env bash
# One trial of the main-job sweep (README, "The main job: what learns fastest"): train the main job's
# config (configs/cpu-small-english.toml) with some settings changed, evaluate the test NELBO
# with the EMA and with the raw parameters, and append one line to a results file.
#
#   bench/main_job_sweep.sh NAME [KEY=VALUE ...] [-- TRAIN FLAGS ...]
#
# KEY=VALUE replaces (or adds) `KEY = VALUE` in the config's [optim] or [model] section, e.g.
# optim.schedule='"constant"' optim.decay_steps=2400 model.embed_dim=0; TRAIN FLAGS go to
# `maskdiff train` (--lr 3e-3 --clip-norm 1 --batch-size 16 --steps 600 --seed 1 ...).
# Env: RESULTS (default runs/sweep/results.tsv), BASE (default configs/cpu-small-english.toml),
# EVAL_SEQS (default 1024), RAW (default 1).
# Result columns: name, test bits (EMA) ± SE, test bits (raw) ± SE, training seconds,
# mean train tokens/s from metrics.jsonl, load average at the end, settings.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1; shift
BASE=${BASE:-configs/cpu-small-english.toml}
RESULTS=${RESULTS:-runs/sweep/results.tsv}
EVAL_SEQS=${EVAL_SEQS:-1024}   # test sequences evaluated (the main job's 1024; fewer to screen)
RAW=${RAW:-1}                  # 0: skip the evaluation of the raw (non-EMA) parameters
BIN=target/release/maskdiff
OUT=runs/sweep/$NAME
mkdir -p runs/sweep
rm -rf "$OUT"
CFG=runs/sweep/$NAME.toml
cp "$BASE" "$CFG"
SETTINGS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  key=${1%%=*}; val=${1#*=}; sec=${key%%.*}; field=${key#*.}
  python3 - "$CFG" "$sec" "$field" "$val" <<'PY'
import re, sys
path, sec, field, val = sys.argv[1:]
lines = open(path).read().split("\n")
out, cur, done = [], None, False
for i, l in enumerate(lines):
    m = re.match(r"\[(\w+)\]", l)
    if m:
        if cur == sec and not done:
            out.append(f"{field} = {val}"); done = True
        cur = m.group(1)
    if cur == sec and re.match(rf"{field}\s*=", l):
        out.append(f"{field} = {val}"); done = True; continue
    out.append(l)
if not done:
    if cur != sec:
        out.append(f"[{sec}]")
    out.append(f"{field} = {val}")
open(path, "w").write("\n".join(out))
PY
  SETTINGS+=("$1"); shift
done
[ "${1:-}" = "--" ] && shift
"$BIN" train --config "$CFG" --out "$OUT" --no-progress --eval-every 0 "$@" > "$OUT.train.log" 2>&1
"$BIN" eval "$OUT" --max-sequences "$EVAL_SEQS" --json "$OUT/test.json" > "$OUT/test.txt"
if [ "$RAW" = 1 ]; then
  "$BIN" eval "$OUT" --max-sequences "$EVAL_SEQS" --no-ema --json "$OUT/test-raw.json" > "$OUT/test-raw.txt"
else
  cp "$OUT/test.json" "$OUT/test-raw.json"
fi
python3 - "$OUT" "$NAME" "${SETTINGS[*]} $*" "$RESULTS" <<'PY'
import json, os, sys
out, name, settings, results = sys.argv[1:]
def bits(f):
    j = json.load(open(f))
    def find(d):
        if isinstance(d, dict):
            if "bits_per_token" in d and "stderr_bits" in d:
                return d["bits_per_token"], d["stderr_bits"]
            for v in d.values():
                r = find(v)
                if r: return r
        return None
    return find(j)
e, r = bits(f"{out}/test.json"), bits(f"{out}/test-raw.json")
recs = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
train = [x for x in recs if x.get("split") == "train"]
tps = [x["tokens_per_sec"] for x in train if x.get("tokens_per_sec")]
secs = max(x.get("elapsed_s", 0) for x in recs)
load = os.getloadavg()[0]
line = f"{name}\t{e[0]:.4f} ± {e[1]:.4f}\t{r[0]:.4f} ± {r[1]:.4f}\t{secs:.0f}\t{sum(tps)/len(tps):.0f}\t{load:.1f}\t{settings}"
print(line)
with open(results, "a") as f:
    f.write(line + "\n")
PY
