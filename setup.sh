#!/usr/bin/env bash
# Installs everything the project needs into ./.venv (idempotent; a second run takes seconds).
# torch is pinned to 2.13.0 (the CPU build on this machine's disk); see README "GPU install" for CUDA.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# Debian packages: Noto Color Emoji (the embedded models' training data, OFL-1.1; `studio data emoji`) and
# chromium (the app's browser tests drive it through Playwright; Playwright cannot download browsers here).
NEED=()
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || NEED+=(fonts-noto-color-emoji)
command -v chromium >/dev/null || NEED+=(chromium)
if [ ${#NEED[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  { $SUDO apt-get install -y -q "${NEED[@]}" >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q "${NEED[@]}" >/dev/null 2>&1; }; } \
    || echo "setup.sh: could not apt-get install ${NEED[*]}; emoji rendering / browser tests will be skipped" >&2
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, diffusers, studio, solvers, models" || { echo "setup.sh: install failed" >&2; exit 1; }
