#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler toolchain (nvcc, nvvm, crt headers, cudart headers,
# cccl) from PyPI into the git-ignored virtual environment `.venv-cuda` at the repository root.
# build.rs finds `.venv-cuda/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc` there.
#
# The parts must be pinned together: a mismatched nvvm makes ptxas fail with
# "Unsupported .version". The target GPU machines run driver 580 (CUDA 13.0), which matches this toolchain.
#
# libnvrtc (same release) comes along so that the NVRTC fallback can be compiled and checked
# here without a GPU: LD_LIBRARY_PATH=.venv-cuda/lib/python3.*/site-packages/nvidia/cu13/lib.
#
# Usage: tools/setup-cuda.sh            (idempotent; prints the nvcc path at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-cuda
PY=${PYTHON:-python3}

find_nvcc() {
    ls "$VENV"/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n1
}

if [ -n "$(find_nvcc)" ] && "$(find_nvcc)" --version >/dev/null 2>&1 &&
    ls "$VENV"/lib/python3.*/site-packages/nvidia/cu13/lib/libnvrtc.so.13 >/dev/null 2>&1; then
    echo "setup-cuda: nvcc already installed: $(find_nvcc)"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.88" \
    "nvidia-nvvm==13.0.88" \
    "nvidia-cuda-crt==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" \
    "nvidia-cuda-cccl==13.0.85" \
    "nvidia-cuda-nvrtc==13.0.88"

NVCC=$(find_nvcc)
if [ -z "$NVCC" ]; then
    echo "setup-cuda: nvcc not found under $VENV after install" >&2
    exit 1
fi
chmod +x "$(dirname "$NVCC")"/* 2>/dev/null || true
"$NVCC" --version | tail -n2
echo "setup-cuda: nvcc at $NVCC"
