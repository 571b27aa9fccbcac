"""Where the project's own files are: configs, held-out examples, shipped weights, caches.

A source checkout keeps them at the repository root (``configs/``, ``examples/``, ``models/weights/``); a
wheel carries ``configs/`` and ``examples/`` inside the package as ``studio/configs`` and
``studio/examples`` (``pyproject.toml`` maps them), and the weights inside ``models``. Every lookup goes
through this module, so the code runs the same from a checkout, an editable install or a wheel, from any
working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_CONFIG_DIR = "STUDIO_CONFIG_DIR"
ENV_CACHE_DIR = "STUDIO_CACHE_DIR"

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # studio/
SOURCE_ROOT = PACKAGE_DIR.parent  # the checkout root, or site-packages for a wheel


def _shipped(name: str) -> Path:
    """``<checkout>/<name>`` when running from a source tree, else the copy packaged as ``studio/<name>``."""
    in_checkout = SOURCE_ROOT / name
    packaged = PACKAGE_DIR / name
    if (SOURCE_ROOT / "pyproject.toml").is_file() and in_checkout.is_dir():
        return in_checkout
    return packaged


def config_dir() -> Path:
    """The YAML configs (``task/``, ``solver/``, ``edits.yaml``); ``$STUDIO_CONFIG_DIR`` overrides."""
    override = os.environ.get(ENV_CONFIG_DIR)
    return Path(override) if override else _shipped("configs")


def examples_dir() -> Path:
    """The shipped held-out images (``examples/``: ``emoji/`` with ``captions.json``, ``coffee-32.png``)."""
    return _shipped("examples")


def weights_dir() -> Path:
    """The embedded models' folders (``models/weights/<name>``)."""
    return SOURCE_ROOT / "models" / "weights"  # `models` is studio's sibling in a checkout and a wheel


def cache_dir() -> Path:
    """Where derived files (the fitted Gaussian demo prior) are cached: ``$STUDIO_CACHE_DIR``, else
    ``runs/cache`` in a checkout, else ``~/.cache/diffusion-studio``."""
    override = os.environ.get(ENV_CACHE_DIR)
    if override:
        return Path(override)
    if (SOURCE_ROOT / "pyproject.toml").is_file():
        return SOURCE_ROOT / "runs" / "cache"
    return Path.home() / ".cache" / "diffusion-studio"


def resolve_shipped(path: str | os.PathLike) -> Path:
    """A path as given if it exists (or is absolute), else the same relative path among the shipped files
    (``examples/emoji`` → the packaged examples), so documented relative paths work from any directory."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    parts = p.parts
    if parts and parts[0] in ("examples", "configs"):
        return _shipped(parts[0]).joinpath(*parts[1:])
    if parts[:2] == ("models", "weights"):
        return weights_dir().joinpath(*parts[2:])
    return SOURCE_ROOT / p
