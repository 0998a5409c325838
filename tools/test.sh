#!/usr/bin/env bash
# The whole test suite: `cargo test` (CPU backend, golden fixtures, CUDA tests skip without a
# device), then every CUDA test on the virtual GPU (tools/vgpu/test.sh: the real CUDA backend and
# kernels, compiled for the host, in forward and reverse thread order, with no skip allowed).
# Needs g++ and python3; installs the pinned CUDA headers on first use (tools/setup-cuda.sh).
# Usage: tools/test.sh [--quick]   (--quick: the virtual-GPU part in forward order only)
# Ends with one line saying what the CUDA tests ran on, so that a green run is never read as
# "verified on a GPU" when every GPU test skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp "${TMPDIR:-/tmp}/tooln1-test.XXXXXX")
trap 'rm -f "$log"' EXIT
cargo test 2>&1 | tee "$log"
skipped=$(grep -c '^skipped: ' "$log" || true)
gpu_skipped=$(grep -c '^skipped: .*CUDA' "$log" || true)
reasons=$(grep '^skipped: ' "$log" | grep -v ' \.\.\. ' | sed 's/^skipped: //; s/ (.*//' | sort | uniq -c | sort -rn |
    head -n 4 | awk '{ n = $1; $1 = ""; printf "%s%d x%s", (NR > 1 ? "; " : ""), n, $0 }' || true)
bash tools/vgpu/test.sh "$@"
echo "test.sh: summary: cargo test skipped $skipped test(s)${reasons:+ ($reasons)}"
if [ "$gpu_skipped" -gt 0 ]; then
    echo "test.sh: summary: $gpu_skipped GPU test(s) skipped in cargo test: the CUDA code ran on" \
        "the virtual GPU only, not on a real GPU"
else
    echo "test.sh: summary: no GPU test skipped in cargo test (a CUDA device was present)"
fi
