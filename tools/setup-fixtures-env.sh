#!/usr/bin/env bash
# Create .venv-fixtures (ignored by git) with the Python packages tools/make_fixtures.py needs:
# PyTorch (CPU use is enough), transformers, tokenizers and safetensors.
#
#   tools/setup-fixtures-env.sh            # create or update the environment
#   .venv-fixtures/bin/python tools/make_fixtures.py
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-fixtures"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Keep the environment out of version control whatever the top-level ignore file says.
printf '*\n' >"$venv/.gitignore"
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install torch transformers tokenizers safetensors jinja2 numpy
"$venv/bin/python" -c 'import torch, transformers, tokenizers, safetensors; print("torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__)'
