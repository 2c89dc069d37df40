#!/usr/bin/env bash
# Create .venv and install the project. Usage: bash scripts/setup.sh [--dev]
# A CPU-only machine without torch gets the CPU build torch==2.13.0 first; a machine that already has a
# torch (e.g. a CUDA build in the venv) keeps it, since the project's torch requirement has no upper bound.
# Everything else comes at the versions pinned in requirements/lock.txt (bash scripts/lock.sh re-resolves it), so
# a clean clone reproduces the committed dvc.lock, models/base included.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch            # a GPU machine: the default (CUDA) build
  else
    python -m pip install -q torch==2.13.0    # CPU-only: the CPU build
  fi
fi
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
python -m pip install -q -c requirements/lock.txt -e ".${extra}"
python -c "import torch, transformers, peft, trl; print(f'torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}')"
