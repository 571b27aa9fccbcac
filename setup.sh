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
# Editable, with the dev tools (pytest, playwright, ruff: CI runs `.venv/bin/ruff check .`).
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# DeepInverse, only for the `deepinv-dps` peer of `studio bench` (studio/eval/deepinv_peer.py). --no-deps because
# its declared torchvision has no wheel that works beside torch 2.13.0+cpu (deepinv_peer.py stands in for it);
# natsort and h5py are the only other packages `import deepinv` needs that the project does not already have
# (torchmetrics is only imported lazily, by parts the peer does not use; einops is a project dependency). Optional: on failure the
# peer and its tests are skipped.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
  deepinv==0.5.0 natsort==8.4.0 h5py==3.16.0 >/dev/null 2>&1 \
  || echo "setup.sh: could not install deepinv; the deepinv-dps bench peer is off" >&2
# open-clip-torch only for its data file: the real CLIP BPE vocabulary of the SD replicas (models/replicas.py
# locates it without importing the package, whose __init__ needs torchvision). --no-deps for the same reason.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps open-clip-torch==3.3.0 >/dev/null 2>&1 \
  || echo "setup.sh: could not install open-clip-torch; the Stable Diffusion replicas are off" >&2
{ .venv/bin/python -c "import torch, diffusers, studio, solvers, models" && .venv/bin/ruff --version >/dev/null; } \
  || { echo "setup.sh: install failed" >&2; exit 1; }
