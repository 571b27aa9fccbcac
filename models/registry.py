"""Registered model names → folders. The embedded default models register here when they ship.

Every CLI command, the app and the Python API accept a registered name in place of a hub id or folder.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

#: name → folder (relative to ``models/weights``). Filled by the embedded-models work.
REGISTERED: dict[str, str] = {}


def registered_models() -> dict[str, Path]:
    """Registered names whose folder is present on disk."""
    return {n: WEIGHTS_DIR / p for n, p in REGISTERED.items() if (WEIGHTS_DIR / p).is_dir()}


def resolve_model_path(name_or_path: str) -> str:
    """A registered name → its folder; anything else is returned unchanged (folder or hub id)."""
    if name_or_path in REGISTERED:
        return str(WEIGHTS_DIR / REGISTERED[name_or_path])
    return name_or_path
