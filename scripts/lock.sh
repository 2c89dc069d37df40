#!/usr/bin/env bash
# Re-resolve requirements/lock.txt, the pinned environment scripts/setup.sh installs, within pyproject.toml's ranges.
#   bash scripts/lock.sh              # keep every pin that still fits the ranges (after editing pyproject.toml)
#   bash scripts/lock.sh --upgrade    # the newest versions the ranges allow
# One lock for every machine and Python >= 3.10 (uv's universal resolution, markers where versions differ).
# torch and its CUDA libraries are left out: setup.sh installs the build that fits the machine (CPU torch==2.13.0,
# or the default CUDA build), and the lock pins everything around it. After an upgrade, rerun `dvc repro`:
# models/base records the transformers version, so its hash in dvc.lock follows the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null 2>&1 || python3 -m pip install -q 'uv>=0.5'
cuda=(cuda-bindings cuda-pathfinder cuda-toolkit nvidia-cublas nvidia-cuda-cccl nvidia-cuda-cupti nvidia-cuda-nvrtc
      nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
      nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx)
exclude=()
for p in torch triton "${cuda[@]}"; do exclude+=(--no-emit-package "$p"); done
uv pip compile pyproject.toml --extra dev --extra gpu --universal --python-version 3.10 "${exclude[@]}" \
  --custom-compile-command "bash scripts/lock.sh" -o requirements/lock.txt "$@"
