#!/usr/bin/env bash
# The whole test suite: `cargo test` (CPU backend, golden fixtures, CUDA tests skip without a
# device), then every CUDA test on the virtual GPU (tools/vgpu/test.sh: the real CUDA backend and
# kernels, compiled for the host, in forward and reverse thread order, with no skip allowed).
# Needs g++ and python3; installs the pinned CUDA headers on first use (tools/setup-cuda.sh).
# Usage: tools/test.sh [--quick]   (--quick: the virtual-GPU part in forward order only)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test
bash tools/vgpu/test.sh "$@"
