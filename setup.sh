#!/usr/bin/env bash
# Installs everything the project needs into ./.venv (idempotent; a second run takes seconds).
# torch is pinned to 2.13.0 (the CPU build on this machine's disk); see README "GPU install" for CUDA.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# The embedded models' training data: Noto Color Emoji (Debian, OFL-1.1). Only `studio data emoji` needs it.
FONT=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
if [ ! -f "$FONT" ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  { $SUDO apt-get install -y -q fonts-noto-color-emoji >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q fonts-noto-color-emoji >/dev/null 2>&1; }; } \
    || echo "setup.sh: could not apt-get install fonts-noto-color-emoji; \`studio data emoji\` will not work" >&2
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, diffusers, studio, solvers, models" || { echo "setup.sh: install failed" >&2; exit 1; }
