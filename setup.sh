#!/usr/bin/env bash
# Create .venv and install this project with its test tools. Safe to run again (fast when done).
# On a CPU machine pip takes the CPU build of torch 2.13.0; on a GPU machine install the CUDA
# build of torch 2.13.0 into .venv first (see README) and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import torch, gpt; print(f'ready: torch {torch.__version__}, python in .venv')"
