#!/usr/bin/env bash
# GPU check and benchmarks of maskdiff with dfdx's CUDA backend (NVIDIA GPU, CUDA 13 driver), in
# two halves because the GPU machine may have no Rust toolchain and the build machine no GPU:
#
#   bench/gpu.sh build   (a machine with cargo; a GPU is not needed) builds, with
#                        `--features cuda,nccl`, the CUDA test binaries (network/train/tests/
#                        cuda.rs, and nccl.rs: the one-rank NCCL trainer step against the
#                        single-GPU step) and the throughput and sampling examples, and copies
#                        them to target/gpu-bundle/. libnccl comes from the toolkit or the system
#                        if it has one, else from the nvidia-nccl-cu13 wheel.
#                        nvcc and the CUDA headers/libraries come from CUDA_ROOT, else from a CUDA
#                        install on PATH, else from PyPI wheels installed into target/cuda-wheels
#                        (≈ 1.1 GB; see shared/docs/dfdx-notes.md "CUDA"); without a GPU the
#                        driver pieces the build needs are stubbed (nvidia-smi answering the
#                        compute capability CUDA_COMPUTE_CAP, default 90 = H100/H200; a link-time
#                        libcuda.so exporting the driver's symbols).
#   bench/gpu.sh run     (the GPU machine; carry target/gpu-bundle) runs the CUDA and NCCL tests
#                        (MASKDIFF_REQUIRE_GPU=1: no silent skip), then the
#                        md4-s (12 layers, 12 heads, width 768) training and forward benchmark for
#                        a sweep of batch × length, then sampling (16 × 256 tokens, T = 256,
#                        ancestral / cached / first-hitting), and prints one Markdown table.
#                        Budget: about 10 minutes on an H200 (each part has a timeout).
#   bench/gpu.sh         both, when cargo and a GPU are on the same machine.
#
# Env: CUDA_ROOT, CUDA_COMPUTE_CAP (default 90), BUNDLE (default target/gpu-bundle),
#      CUDA_TARGET_DIR (cargo target folder of the CUDA build, default target/cuda),
#      ITERS (timed steps, default 5), TABLE (output file for the table, default
#      $BUNDLE/gpu-table.md).
set -euo pipefail
SELF_DIR=$(cd "$(dirname "$0")" && pwd)
# inside a bundle the script runs where it lies; in the repository from the repository root
if [ ! -x "$SELF_DIR/cuda_tests" ]; then cd "$SELF_DIR/.."; fi
BUNDLE=${BUNDLE:-target/gpu-bundle}
ITERS=${ITERS:-5}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
mode=${1:-all}

log() { printf '== %s\n' "$*" >&2; }

# --- build half -------------------------------------------------------------------------------
find_toolkit() {
  if [ -n "${CUDA_ROOT:-}" ] && [ -x "$CUDA_ROOT/bin/nvcc" ]; then return; fi
  if command -v nvcc >/dev/null 2>&1; then
    CUDA_ROOT=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); return
  fi
  local wheels=target/cuda-wheels root=target/cuda-root
  if [ ! -x "$root/bin/nvcc" ]; then
    log "no CUDA toolkit found: installing CUDA 13.0 wheels from PyPI into $wheels (≈ 1.1 GB)"
    python3 -m pip install --quiet --target "$wheels" \
      "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
      "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
      "nvidia-cublas==13.0.*" "nvidia-nccl-cu13"
    # one CUDA_ROOT with bin/, include/, lib/ assembled from the wheels' folders
    mkdir -p "$root/bin" "$root/include" "$root/lib"
    local cu sub
    for cu in "$wheels"/nvidia/*/; do
      for sub in bin include lib; do
        if [ -d "$cu/$sub" ]; then cp -rsf "$(readlink -f "$cu/$sub")"/. "$root/$sub/"; fi
      done
      if [ -d "$cu/nvvm" ]; then ln -sfn "$(readlink -f "$cu/nvvm")" "$root/nvvm"; fi
    done
    local l so
    for l in nvrtc cublas cublasLt cudart nccl; do
      so=$(ls "$root"/lib/lib$l.so.* 2>/dev/null | head -n 1 || true)
      if [ -n "$so" ]; then ln -sf "$(basename "$so")" "$root/lib/lib$l.so"; fi
    done
  fi
  CUDA_ROOT=$(readlink -f "$root")
}

# Driver pieces the build needs even without a GPU: nvidia-smi (dfdx's build script asks it
# for the compute capability) and a link-time libcuda.so.
stub_driver() {
  local stub=target/cuda-stub
  mkdir -p "$stub/bin" "$stub/lib"
  if ! nvidia-smi --query-gpu=compute_cap --format=csv >/dev/null 2>&1; then
    printf '#!/bin/sh\necho compute_cap\necho %s\n' \
      "${CUDA_COMPUTE_CAP:0:1}.${CUDA_COMPUTE_CAP:1}" >"$stub/bin/nvidia-smi"
    chmod +x "$stub/bin/nvidia-smi"
    export PATH="$PWD/$stub/bin:$PATH"
  fi
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\b' && [ ! -e "$CUDA_ROOT/lib/libcuda.so" ] \
     && [ ! -e "$CUDA_ROOT/lib64/stubs/libcuda.so" ]; then
    # every cu* driver entry point the CUDA libraries and cudarc reference, as empty functions
    local syms
    cargo fetch >&2 # cudarc's sources, for the list of driver entry points
    syms=$( (nm -D --undefined-only "$CUDA_ROOT"/lib/lib{nvrtc,cublas,cublasLt}.so* 2>/dev/null || true;
             cat "$(cargo_home)"/registry/src/*/cudarc-*/src/driver/sys*.rs \
                 "$(cargo_home)"/registry/src/*/cudarc-*/src/driver/sys/*.rs 2>/dev/null || true) \
           | grep -oE '\bcu[A-Z][A-Za-z0-9_]+' | sort -u)
    if [ -z "$syms" ]; then log "no driver symbols found for the libcuda stub"; exit 1; fi
    { for s in $syms; do echo "void $s(void) {}"; done; } >"$stub/libcuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/lib/libcuda.so" "$stub/libcuda.c"
    export LIBRARY_PATH="$PWD/$stub/lib:${LIBRARY_PATH:-}"
  fi
}
cargo_home() { echo "${CARGO_HOME:-$HOME/.cargo}"; }

# libnccl for the `nccl` feature's link: the toolkit's or the system's, else the wheel's
# (nvidia-nccl-cu13 into target/cuda-wheels), linked into $CUDA_ROOT/lib if that is writable.
find_nccl() {
  local d
  for d in "$CUDA_ROOT/lib" "$CUDA_ROOT/lib64" /usr/lib/x86_64-linux-gnu /usr/local/nccl/lib; do
    if [ -e "$d/libnccl.so" ]; then export LIBRARY_PATH="$d:${LIBRARY_PATH:-}"; return; fi
  done
  local wheels=target/cuda-wheels so
  so=$(ls "$wheels"/nvidia/nccl/lib/libnccl.so.* 2>/dev/null | head -n 1 || true)
  if [ -z "$so" ]; then
    log "no libnccl found: installing the nvidia-nccl-cu13 wheel into $wheels"
    python3 -m pip install --quiet --target "$wheels" "nvidia-nccl-cu13"
    so=$(ls "$wheels"/nvidia/nccl/lib/libnccl.so.* | head -n 1)
  fi
  mkdir -p target/nccl-lib
  ln -sf "$(readlink -f "$so")" target/nccl-lib/libnccl.so
  export LIBRARY_PATH="$PWD/target/nccl-lib:${LIBRARY_PATH:-}"
}

build() {
  find_toolkit
  export CUDA_ROOT CUDA_PATH=$CUDA_ROOT PATH="$CUDA_ROOT/bin:$PATH"
  export LIBRARY_PATH="$CUDA_ROOT/lib:$CUDA_ROOT/lib64:${LIBRARY_PATH:-}"
  stub_driver
  find_nccl
  log "building with --features cuda,nccl (CUDA_ROOT=$CUDA_ROOT, compute capability $CUDA_COMPUTE_CAP)"
  # a target folder of its own, so the CPU binaries in target/release stay what they are
  export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-target/cuda}
  local args=(--release -p maskdiff-train --features cuda,nccl)
  cargo build "${args[@]}" --example throughput --example sampling >&2
  local test_bin
  test_bin=$(cargo test "${args[@]}" --test cuda --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
  [ -n "$test_bin" ] || { log "could not build the CUDA test binary"; exit 1; }
  local nccl_bin
  nccl_bin=$(cargo test "${args[@]}" --test nccl --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
  [ -n "$nccl_bin" ] || { log "could not build the NCCL test binary"; exit 1; }
  mkdir -p "$BUNDLE"
  cp "$nccl_bin" "$BUNDLE/nccl_tests"
  # libnccl travels with the bundle where the GPU machine may have none
  if [ -e target/nccl-lib/libnccl.so ]; then
    cp "$(readlink -f target/nccl-lib/libnccl.so)" "$BUNDLE/libnccl.so.2"
  fi
  cp "$CARGO_TARGET_DIR"/release/examples/{throughput,sampling} "$BUNDLE/"
  cp "$test_bin" "$BUNDLE/cuda_tests"
  # without debug info the bundle is a few MB (the device tool carries at most 64 MiB)
  strip "$BUNDLE"/{throughput,sampling,cuda_tests,nccl_tests} 2>/dev/null || true
  cp "$SELF_DIR/gpu.sh" "$BUNDLE/gpu.sh"
  log "bundle ready: $BUNDLE (carry it to the GPU machine, then: bash $BUNDLE/gpu.sh run)"
}

# --- run half ---------------------------------------------------------------------------------
cuda_libs() {
  # CUDA 13 runtime libraries: a toolkit install or the nvidia-* Python wheels (PyTorch's)
  local d dirs=()
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 \
           /usr/local/cuda/targets/x86_64-linux/lib; do
    if [ -d "$d" ]; then dirs+=("$d"); fi
  done
  local site
  for site in $(python3 -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null); do
    for d in "$site"/nvidia/*/lib; do
      if [ -d "$d" ]; then dirs+=("$d"); fi
    done
  done
  local IFS=:
  echo "${dirs[*]}"
}

run() {
  local here=$SELF_DIR
  [ -x "$here/cuda_tests" ] || here=$(readlink -f "$BUNDLE")
  [ -x "$here/cuda_tests" ] || { log "no bundle at $here: run 'bench/gpu.sh build' first"; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 \
    || { log "no NVIDIA GPU visible (nvidia-smi failed)"; exit 1; }
  export LD_LIBRARY_PATH="$(cuda_libs):$here:${LD_LIBRARY_PATH:-}"
  local table=${TABLE:-$here/gpu-table.md} out
  out=$(mktemp -d)
  log "CUDA tests (CPU vs CUDA agreement)"
  local tests="FAILED"
  if timeout 120 "$here/cuda_tests" --test-threads 1 --nocapture >"$out/tests.log" 2>&1; then
    if grep -q SKIPPED "$out/tests.log"; then tests="skipped (see log)"; else tests="passed"; fi
  fi
  sed -n '/test result/p' "$out/tests.log" >&2
  log "NCCL tests (one-rank NCCL trainer step vs single-GPU step, collectives)"
  local nccl="FAILED"
  if MASKDIFF_REQUIRE_GPU=1 timeout 180 "$here/nccl_tests" --test-threads 1 --nocapture \
       >"$out/nccl.log" 2>&1; then
    nccl="passed"
  fi
  sed -n '/test result/p;/panicked/,+3p' "$out/nccl.log" >&2
  local rows=()
  for bn in "8 256" "16 256" "32 256" "16 512" "16 1024"; do
    set -- $bn
    log "md4-s train + forward, batch $1, length $2"
    local line
    line=$(timeout 150 "$here/throughput" --device cuda --preset md4-s --vocab 27 --batch "$1" \
      --len "$2" --iters "$ITERS" --warmup 2 2>"$out/err" | tail -n 1 || true)
    local f t m
    f=$(echo "$line" | sed -n 's/.*forward_tok_s=\([0-9.]*\).*/\1/p')
    t=$(echo "$line" | sed -n 's/.*train_tok_s=\([0-9.]*\).*/\1/p')
    m=$(echo "$line" | sed -n 's/.*train_peak_rss_mb=\([0-9.]*\).*/\1/p')
    rows+=("| md4-s train / forward | $1 × $2 | ${t:-failed} tok/s | ${f:-failed} tok/s | host RSS ${m:-?} MB |")
  done
  log "sampling (time-free md4-s, 16 × 256, T = 256)"
  timeout 240 "$here/sampling" --device cuda --preset md4-s --samples 16 --len 256 --steps 256 \
    >"$out/sampling.md" 2>&1 || echo "(sampling failed or timed out)" >>"$out/sampling.md"
  {
    echo "### maskdiff on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1) (dfdx CUDA backend, f32)"
    echo
    echo "CUDA tests: $tests; NCCL tests: $nccl"
    echo
    echo "| benchmark | batch × length | train step | forward | memory |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    cat "$out/sampling.md"
  } | tee "$table"
}

case "$mode" in
  build) build ;;
  run) run ;;
  all) build; run ;;
  *) echo "usage: bench/gpu.sh [build|run|all]" >&2; exit 2 ;;
esac
