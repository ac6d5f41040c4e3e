#!/usr/bin/env bash
# One-command set-up: a CPU build of PyTorch where no torch is installed yet, then rndpo with its
# test extras, editable. Usage: bash scripts/setup.sh   (PYTHON=python3.11 bash scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # A bare `torch` requirement would pull a multi-GB CUDA build; take the CPU wheel first.
    # (On other machines, install the torch build you want before running this script.)
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
"$PY" -c "import rndpo, torch, monai; print(f'rndpo {rndpo.__version__} ready (torch {torch.__version__}, monai {monai.__version__})')"
