#!/usr/bin/env bash
# Builds the CPU kernels for aarch64 (where NEON is the baseline and the fused kernels run their
# portable instance only: network/src/kernels/isa.rs) and runs their unit tests under qemu user
# emulation: Debian's qemu-user and the aarch64 cross gcc (linker), rustup's aarch64 std.
# Run as root on Debian/Ubuntu; about 4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
packages=(qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  apt-get install -y --no-install-recommends "${packages[@]}" \
    || { apt-get update && apt-get install -y --no-install-recommends "${packages[@]}"; }
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# A target directory of its own: the host build's artefacts stay untouched.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_AARCH64:-target/aarch64}"
cargo test --release --target "$target" -p maskdiff-network --lib
