"""Registered model names → folders: the embedded default models shipped in ``models/weights/``.

Every CLI command, the app and the Python API accept a registered name in place of a hub id or folder.
"""

from __future__ import annotations

from pathlib import Path

from studio.core import paths

WEIGHTS_DIR = paths.weights_dir()

#: name → folder (relative to ``models/weights``); see each folder's README.md (model card).
REGISTERED: dict[str, str] = {
    "emoji-pixel": "emoji-pixel",  # DDPM UNet2DModel, 32x32 RGB emoji (DDPMPipeline)
    "emoji-sd": "emoji-sd",  # tiny Stable-Diffusion-style text-to-image, 64x64 (StableDiffusionPipeline)
}
DEFAULT_PIXEL_MODEL = "emoji-pixel"
DEFAULT_TEXT_TO_IMAGE_MODEL = "emoji-sd"


def registered_models() -> dict[str, Path]:
    """Registered names whose folder is present on disk."""
    return {n: WEIGHTS_DIR / p for n, p in REGISTERED.items() if (WEIGHTS_DIR / p).is_dir()}


def resolve_model_path(name_or_path: str) -> str:
    """A registered name → its folder; anything else is returned unchanged (folder or hub id)."""
    if name_or_path in REGISTERED:
        folder = WEIGHTS_DIR / REGISTERED[name_or_path]
        if not (folder / "model_index.json").is_file():
            from studio.core.errors import ModelLoadError

            raise ModelLoadError(
                f"registered model '{name_or_path}' has no weights in {folder}; restore them with "
                f"`git checkout -- models/weights` or retrain (see {folder}/README.md)"
            )
        return str(folder)
    return name_or_path
