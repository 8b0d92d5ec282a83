#!/usr/bin/env bash
# Create .venv and install this project with its test tools. Safe to run again (fast when done).
# Where a CPU build of torch 2.13.0 lies on local disk (the CI machines) pip takes it; elsewhere
# on Linux PyPI's torch 2.13.0 is a CUDA build. A torch 2.13.0 already in .venv (a CUDA build of
# your choice, see the README's "On a GPU machine") is kept.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# A .venv without pip is one whose creation failed half-way (Debian and Ubuntu without the
# python3-venv package): made again from scratch, or every later run would fail the same way.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m venv --clear .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import torch, gpt; print(f'ready: torch {torch.__version__}, python in .venv')"
