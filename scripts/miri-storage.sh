#!/usr/bin/env bash
# Run the CPU kernels' storage core (network/src/kernels/storage/buf.rs: the buffer handles and
# the address registry through which the fused kernels read dfdx tensors) under Miri, with
# strict provenance, under Stacked Borrows (Miri's default) and under Tree Borrows.
#
# dfdx itself does not build under the nightly toolchain Miri needs (its build script switches
# on a `nightly` feature that fails on current nightlies), so the std-only core is compiled on
# its own: a throwaway crate in a temp folder includes the file by path and runs its tests.
#
#   bash scripts/miri-storage.sh        (needs: rustup toolchain nightly with miri, rust-src)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="$(pwd)/network/src/kernels/storage/buf.rs"
if ! cargo +nightly miri --version >/dev/null 2>&1; then
  echo "installing Miri for the nightly toolchain" >&2
  rustup component add --toolchain nightly miri rust-src >&2
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/src"
cat > "$TMP/Cargo.toml" <<TOML
[package]
name = "maskdiff-storage-miri"
version = "0.0.0"
edition = "2021"
publish = false
[workspace]
TOML
cat > "$TMP/src/lib.rs" <<RS
#![allow(dead_code)]
#[path = "$SRC"]
mod buf;
RS
cd "$TMP"
echo "== Stacked Borrows, strict provenance"
MIRIFLAGS="-Zmiri-strict-provenance" cargo +nightly miri test -q
echo "== Tree Borrows, strict provenance"
MIRIFLAGS="-Zmiri-strict-provenance -Zmiri-tree-borrows" cargo +nightly miri test -q
