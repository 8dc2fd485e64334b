#!/usr/bin/env bash
# Side-by-side throughput and memory of the cpu-small MD4 transformer (vocab 27 + mask, length
# 256, width 256, 4 layers, 4 heads, GLU, batch 16, f32): maskdiff (dfdx + fused kernels,
# network/examples/throughput.rs) against the identical PyTorch eager model and step
# (bench/torch_reference.py), run alternately in one invocation so both see the same machine
# load. Ends with
#   maskdiff: ...; PyTorch: ...            (best tokens/s per side, peak RSS of the train phase)
#   train_ratio=X forward_ratio=Y mem_ratio=Z train_ratio_bf16=.. forward_ratio_bf16=.. bf16_side=..
# It starts with the CPU model, the SIMD features the kernels can use (avx2, fma, avx512f,
# avx512_bf16, amx_bf16), the machine's f32 FMA peak by formula (cores × GHz × FMA lanes × 2 FMA
# units × 2 flops; GHz from /proc/cpuinfo "cpu MHz", 2 FMA units assumed) and as measured
# (network/train/examples/fma_peak.rs: independent FMA chains on every thread, and vdpbf16ps
# where AVX512-BF16 exists — the formula is wrong where the clock boosts above the reported
# one or the CPU has one 512-bit FMA per cycle, as AMD Zen 4), and reports each side's achieved
# GFLOP/s (analytic matmul + attention flops of the cpu-small model: 3× the forward's per train
# step) against the measured f32 peak (bf16 sides also against the measured bf16 peak: AMX
# tdpbf16ps where the CPU and OS allow tiles, as maskdiff's bf16 products then use them, else
# vdpbf16ps).
# With BF16=1 (default) PyTorch also runs with bf16 autocast and maskdiff with
# `--precision bf16` (bf16 inputs to the dense layers' and attention's products, f32
# accumulation, on AMX tiles where the CPU has them; on a CPU without AVX512-BF16 maskdiff has no bf16
# path and its f32 numbers stand in, bf16_side=f32 says so); *_ratio_bf16 = maskdiff bf16 over
# PyTorch bf16 autocast. The load average is printed before and after (shared machines).
# ratios = maskdiff over PyTorch tokens/s; mem_ratio = maskdiff over PyTorch peak resident
# memory of the train phase (whole process, Linux VmHWM; < 1 means maskdiff uses less). The
# spread (min–max over rounds) of each side is printed too, and the ratio of the two sides
# within each round with its median (less sensitive to a machine whose speed drifts).
# Each side reports tokens/s of its fastest timed iteration; with ROUNDS > 1 the best round per
# side is used. On a shared machine other processes only ever add time (PyTorch's OpenMP threads
# degrade badly when cores are oversubscribed), so best-of is the fair comparison.
# Env: ITERS (timed iterations, default 10), WARMUP (default 2), ROUNDS (alternations, default 2),
#      THREADS (threads per side, default: all cores; THREADS=1 is the least load-sensitive),
#      MODEL=transformer (default) or MODEL=unet: the `unet-small` U-Net image denoiser (spec §7.3;
#      64 channels, 4 residual blocks per side) on one Fashion-MNIST-shaped 28×28×1 image of 256
#      levels per sequence, batch 16, against the same network in bench/torch_unet.py (tokens =
#      pixels; flops: the convolutions, projections and middle attention per pixel).
#      ISA=avx2|avx512|amx: both sides held to a narrower instruction set than the CPU has, to
#      measure on one machine what a CPU without AVX-512 (avx2) or without AMX (avx512: AVX-512
#      with AVX512-BF16 where the CPU has it, as on a Zen 4 or a Cooper Lake Xeon) would see:
#      maskdiff through MASKDIFF_ISA, PyTorch through ATEN_CPU_CAPABILITY (its own kernels),
#      ONEDNN_MAX_CPU_ISA (oneDNN: the bf16 products, convolutions) and MKL_ENABLE_INSTRUCTIONS
#      (MKL: the f32 products); the peak (fma_peak) follows MASKDIFF_ISA, and with avx2 the
#      benchmark is built without gemm's AVX-512 kernels (target/gemm-avx2, network/Cargo.toml:
#      gemm detects the CPU itself, past MASKDIFF_ISA). An emulation: the
#      cores, caches and clocks stay this CPU's (on an AMX Xeon `vdpbf16ps` runs at half the
#      f32 FMA rate, where a Zen 4 runs it faster than f32). ISA=avx2 sets BF16=0 unless given
#      (no bf16 path to compare: both sides would run emulated bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${ITERS:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-}
ISA=${ISA:-}
case "$ISA" in
  "") ;;
  avx2)
    export MASKDIFF_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
    BF16=${BF16:-0} ;;
  avx512)
    export MASKDIFF_ISA=avx512 ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 MKL_ENABLE_INSTRUCTIONS=AVX512 ;;
  amx) export MASKDIFF_ISA=amx ;;
  *) echo "ISA must be avx2, avx512 or amx (got $ISA)" >&2; exit 2 ;;
esac

bin=target/release/examples
if [ "$ISA" = avx2 ]; then
  # gemm (the f32 products) picks its kernels by its own CPU detection: built without its
  # AVX-512 kernels it runs what it runs on an AVX2-only CPU (network/Cargo.toml)
  RUSTFLAGS="${RUSTFLAGS:-} --cfg maskdiff_gemm_avx2" CARGO_TARGET_DIR=target/gemm-avx2 \
    cargo build --release -p maskdiff-train --example throughput --example fma_peak >&2
  bin=target/gemm-avx2/release/examples
else
  cargo build --release -p maskdiff-train --example throughput --example fma_peak >&2
fi
python3 -c "import torch" 2>/dev/null || python3 -m pip install --quiet torch >&2
if [ -n "$THREADS" ]; then
  export RAYON_NUM_THREADS=$THREADS
  torch_threads=(--threads "$THREADS")
else
  torch_threads=()
fi

cores=$(nproc)
model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
mhz=$(sed -n 's/^cpu MHz[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
flags=$(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
feats=""
for f in avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile; do
  case " $flags " in *" $f "*) feats="$feats $f" ;; esac
done
case "$ISA" in # the features a held-back run may use
  avx2) feats=$(printf '%s\n' $feats | grep -E '^(avx2|fma)$' | tr '\n' ' ' | sed 's/^/ /; s/ $//') ;;
  avx512) feats=$(printf '%s\n' $feats | grep -v '^amx' | tr '\n' ' ' | sed 's/^/ /; s/ $//') ;;
esac
lanes=4
case " $feats " in *" avx2 "*) lanes=8 ;; esac
case " $feats " in *" avx512f "*) lanes=16 ;; esac
peak=$(awk -v c="$cores" -v m="$mhz" -v l="$lanes" 'BEGIN { printf "%.0f", c * m / 1000 * l * 2 * 2 }')
echo "CPU: $model, $cores cores at ${mhz} MHz; features:${feats:- (none of avx2/avx512)}${ISA:+ (held to ISA=$ISA on both sides)}"
echo "PyTorch: $(python3 -W ignore -c 'import torch; print(torch.__version__, "CPU capability", torch.backends.cpu.get_cpu_capability())' 2>/dev/null)"
echo "f32 FMA peak by formula ≈ $peak GFLOP/s ($cores cores × $(awk -v m="$mhz" 'BEGIN{printf "%.2f", m/1000}') GHz × $lanes lanes × 2 FMA units × 2)"
# measured with the benchmark's own thread count (RAYON_NUM_THREADS is exported above if THREADS)
# at the start of every round; the best over rounds is the peak (load only ever lowers it)
pk_f=(); pk_b=()
measure_peak() {
  local line
  line=$(./$bin/fma_peak | tee >(cat >&2) | tail -n 1)
  pk_f+=("$(echo "$line" | sed -n 's/.*peak_f32_gflops=\([0-9.]*\).*/\1/p')")
  pk_b+=("$(echo "$line" | sed -n 's/.*peak_bf16_gflops=\([0-9.]*\).*/\1/p')")
  bf16_path=$(echo "$line" | sed -n 's/.*bf16_path=\([a-z0-9]*\).*/\1/p')
}
# cpu-small, length 256: matmul flops per token 2·(L(4d² + 3dh) + dV), attention 4·n·d per layer
fwd_flop=$(awk 'BEGIN { L=4; d=256; h=704; V=27; n=256; print 2*(L*(4*d*d + 3*d*h) + d*V) + L*4*n*d }')
rust_model=(); torch_script=bench/torch_reference.py; torch_model=()
if [ "${MODEL:-transformer}" = unet ]; then
  rust_model=(--preset unet-small --vocab 256 --image 28x28x1 --batch 16)
  torch_script=bench/torch_unet.py
  torch_model=(--preset unet-small --vocab 256 --image 28x28x1 --batch 16)
  # per pixel: conv_in (e·C → ch), 6 blocks of two ch→ch convs (4 down, 2 middle), 5 up blocks
  # (2ch→ch conv, ch→ch conv, 2ch→ch skip), attention (4 projections + 4·n·ch), out conv ch→C·V
  fwd_flop=$(awk 'BEGIN { ch=64; e=32; C=1; V=256; n=784; k=2*9*ch*ch;
    print 2*9*e*C*ch + 6*2*k + 5*(2*k + k + 2*2*ch*ch) + 4*2*ch*ch + 4*n*ch + 2*9*ch*C*V }')
  echo "model: unet-small U-Net, 28x28x1 images, V = 256, batch 16"
fi
echo "flops per token: forward $(awk -v f="$fwd_flop" 'BEGIN{printf "%.2f", f/1e6}') M, train step $(awk -v f="$fwd_flop" 'BEGIN{printf "%.2f", 3*f/1e6}') M"
BF16=${BF16:-1}
rs_f=(); rs_t=(); rs_m=(); py_f=(); py_t=(); py_m=(); pb_f=(); pb_t=(); rb_f=(); rb_t=(); rb_m=()
bf16_side=f32
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg); threads per side: ${THREADS:-all ($cores)}"
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r: measured peak" >&2
  measure_peak
  echo "== round $r: maskdiff (dfdx)" >&2
  line=$(./$bin/throughput "${rust_model[@]}" --iters "$ITERS" --warmup "$WARMUP" | tee >(cat >&2) | tail -n 1)
  rs_f+=("$(echo "$line" | field forward_tok_s)"); rs_t+=("$(echo "$line" | field train_tok_s)")
  rs_m+=("$(echo "$line" | field train_peak_rss_mb)")
  echo "== round $r: PyTorch" >&2
  line=$(python3 -W ignore "$torch_script" "${torch_model[@]}" --iters "$ITERS" --warmup "$WARMUP" "${torch_threads[@]}" 2>/dev/null | tee >(cat >&2) | grep '^torch ')
  py_f+=("$(echo "$line" | field forward_tok_s)"); py_t+=("$(echo "$line" | field train_tok_s)")
  py_m+=("$(echo "$line" | field train_peak_rss_mb)")
  if [ "$BF16" = 1 ]; then
    echo "== round $r: maskdiff bf16" >&2
    line=$(./$bin/throughput "${rust_model[@]}" --iters "$ITERS" --warmup "$WARMUP" --precision bf16 | tee >(cat >&2) | tail -n 1)
    case "$line" in *precision=bf16*) bf16_side=bf16 ;; esac
    rb_f+=("$(echo "$line" | field forward_tok_s)"); rb_t+=("$(echo "$line" | field train_tok_s)")
    rb_m+=("$(echo "$line" | field train_peak_rss_mb)")
    echo "== round $r: PyTorch bf16 autocast" >&2
    line=$(python3 -W ignore "$torch_script" "${torch_model[@]}" --precision bf16 --iters "$ITERS" --warmup "$WARMUP" "${torch_threads[@]}" 2>/dev/null | tee >(cat >&2) | grep '^torch-bf16 ')
    pb_f+=("$(echo "$line" | field forward_tok_s)"); pb_t+=("$(echo "$line" | field train_tok_s)")
  fi
done
sleep 0.2 # let the tee'd copies reach stderr first
best() { printf '%s\n' "$@" | sort -g | tail -n 1; }
mpeak=$(best "${pk_f[@]}"); bpeak=$(printf '%s\n' "${pk_b[@]}" | grep . | sort -g | tail -n 1 || true)
echo "measured peak (${RAYON_NUM_THREADS:-$cores} threads, best of $ROUNDS rounds): f32 FMA ${mpeak} GFLOP/s, bf16 (${bf16_path:-none}) ${bpeak:-none} GFLOP/s"
peak=${mpeak:-$peak}
least() { printf '%s\n' "$@" | sort -g | head -n 1; }
span() { echo "$(least "$@")–$(best "$@")"; }
rf=$(best "${rs_f[@]}"); rt=$(best "${rs_t[@]}"); pf=$(best "${py_f[@]}"); pt=$(best "${py_t[@]}")
rm_=$(least "${rs_m[@]}"); pm=$(least "${py_m[@]}")
echo "spread over $ROUNDS rounds (tok/s): maskdiff forward $(span "${rs_f[@]}"), train $(span "${rs_t[@]}"); PyTorch forward $(span "${py_f[@]}"), train $(span "${py_t[@]}")"
echo "maskdiff: forward ${rf} tok/s, train ${rt} tok/s, train peak RSS ${rm_} MB; PyTorch: forward ${pf} tok/s, train ${pt} tok/s, train peak RSS ${pm} MB"
gf() { awk -v tok="$1" -v f="$fwd_flop" -v k="$2" -v p="$peak" 'BEGIN { g = tok * f * k / 1e9; printf "%.0f GFLOP/s (%.0f%% of the f32 peak)", g, 100 * g / p }'; }
# bf16 sides: also against the measured bf16 dot peak, where there is one
gfb() {
  if [ -n "$bpeak" ]; then
    awk -v tok="$1" -v f="$fwd_flop" -v k="$2" -v p="$peak" -v b="$bpeak" 'BEGIN { g = tok * f * k / 1e9; printf "%.0f GFLOP/s (%.0f%% of the f32 peak, %.0f%% of the bf16 peak)", g, 100 * g / p, 100 * g / b }'
  else gf "$@"; fi
}
echo "achieved: maskdiff f32 train $(gf "$rt" 3), forward $(gf "$rf" 1); PyTorch f32 train $(gf "$pt" 3), forward $(gf "$pf" 1)"
bf=""
if [ "$BF16" = 1 ]; then
  bt=$(best "${pb_t[@]}"); bfw=$(best "${pb_f[@]}")
  mbt=$(best "${rb_t[@]}"); mbf=$(best "${rb_f[@]}"); mbm=$(least "${rb_m[@]}")
  echo "maskdiff bf16 (--precision bf16, ran as $bf16_side): forward ${mbf} tok/s, train ${mbt} tok/s, train peak RSS ${mbm} MB (spread: forward $(span "${rb_f[@]}"), train $(span "${rb_t[@]}")); achieved train $(gfb "$mbt" 3), forward $(gfb "$mbf" 1)"
  echo "PyTorch bf16 autocast: forward ${bfw} tok/s, train ${bt} tok/s (spread: forward $(span "${pb_f[@]}"), train $(span "${pb_t[@]}")); achieved train $(gfb "$bt" 3), forward $(gfb "$bfw" 1)"
  bf=$(awk -v rt="$mbt" -v bt="$bt" -v rf="$mbf" -v bf="$bfw" -v side="$bf16_side" 'BEGIN { printf " train_ratio_bf16=%.3f forward_ratio_bf16=%.3f bf16_side=%s", rt / bt, rf / bf, side }')
fi
# paired ratios: each round's maskdiff over the same round's PyTorch. The two sides of a round
# ran back to back, so a machine whose speed drifts between minutes moves both; best-of-rounds
# can pair a fast minute of one side with a slow one of the other.
paired() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    n = split(a, x, " "); split(b, y, " "); s = ""
    for (i = 1; i <= n; i++) { r[i] = x[i] / y[i]; s = s sprintf("%s%.3f", i > 1 ? " / " : "", r[i]) }
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
    m = (n % 2) ? r[(n + 1) / 2] : (r[n / 2] + r[n / 2 + 1]) / 2
    printf "%s (median %.3f)", s, m }'
}
echo "paired per round (maskdiff / PyTorch, same round): train $(paired "${rs_t[*]}" "${py_t[*]}"), forward $(paired "${rs_f[*]}" "${py_f[*]}")"
if [ "$BF16" = 1 ]; then
  echo "paired per round, bf16 (maskdiff --precision bf16 / PyTorch autocast): train $(paired "${rb_t[*]}" "${pb_t[*]}"), forward $(paired "${rb_f[*]}" "${pb_f[*]}")"
fi
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
awk -v rt="$rt" -v pt="$pt" -v rf="$rf" -v pf="$pf" -v rm="$rm_" -v pm="$pm" -v bf="$bf" \
  'BEGIN { printf "train_ratio=%.3f forward_ratio=%.3f mem_ratio=%.3f%s\n", rt / pt, rf / pf, rm / pm, bf }'
