#!/usr/bin/env bash
# Installs everything the project needs into ./.venv (idempotent; a second run takes seconds).
# torch is pinned to 2.13.0 (the CPU build on this machine's disk); see README "GPU install" for CUDA.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, diffusers, studio, solvers, models" || { echo "setup.sh: install failed" >&2; exit 1; }
