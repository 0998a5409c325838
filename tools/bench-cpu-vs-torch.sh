#!/usr/bin/env bash
# tooln1's CPU backend against PyTorch's CPU path on the same random Qwen2 models: forward and
# forward + backward at three shapes, 1 thread and all cores, PyTorch eager and sdpa; checks
# that the outputs agree and writes the table into docs/performance.md.
#
#   tools/bench-cpu-vs-torch.sh [--runs N] [--rounds R]
#
# PyTorch and transformers come from .venv-fixtures (git-ignored), created or updated by
# tools/setup-fixtures-env.sh when it lacks them. Models and results go to target/bench-cpu.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$root/.venv-fixtures"
if ! "$venv/bin/python" -c 'import torch, transformers, safetensors' 2>/dev/null; then
    tools/setup-fixtures-env.sh
fi
cargo build --release --example bench_cpu
"$venv/bin/python" tools/bench_cpu_vs_torch.py "$@"
