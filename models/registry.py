"""The one registry of model names: what each name is, where its files are, and the default per kind.

Every CLI command, the app and the Python API accept a registered name in place of a hub id or folder,
and take their default model from :func:`default_model`; no other module spells a model name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from studio.core import paths
from studio.core.errors import ModelLoadError

WEIGHTS_DIR = paths.weights_dir()

PIXEL = "pixel"  # an unconditional pixel-space prior (UNet2DModel + scheduler, DDPMPipeline)
TEXT_TO_IMAGE = "text-to-image"  # a Stable-Diffusion-style latent prior (VAE + text encoder + UNet)
KINDS = (PIXEL, TEXT_TO_IMAGE)


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    kind: str  # PIXEL or TEXT_TO_IMAGE
    summary: str
    folder: str | None = None  # under models/weights; None for a prior the project builds in code


MODELS: dict[str, RegisteredModel] = {
    m.name: m
    for m in [
        RegisteredModel("emoji-pixel", PIXEL, "DDPM UNet2DModel, 32x32 RGB emoji (DDPMPipeline)",
                        "emoji-pixel"),
        RegisteredModel("emoji-sd", TEXT_TO_IMAGE,
                        "tiny Stable-Diffusion-style text-to-image model, 64x64 (StableDiffusionPipeline)",
                        "emoji-sd"),
        RegisteredModel("gaussian-demo", PIXEL,
                        "exact Gaussian prior fitted to scikit-image's photos, 32x32 "
                        "(no weights; fitted on first use)"),
    ]
}
#: the model each kind uses when none is named
DEFAULTS: dict[str, str] = {PIXEL: "emoji-pixel", TEXT_TO_IMAGE: "emoji-sd"}
#: name → folder under models/weights, for the registered models that ship weights
REGISTERED: dict[str, str] = {m.name: m.folder for m in MODELS.values() if m.folder}


def default_model(kind: str = PIXEL) -> str:
    """The registered model used when none is given, for ``kind`` ('pixel' or 'text-to-image')."""
    try:
        return DEFAULTS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r} (kinds: {', '.join(KINDS)})") from None


def model_kind(name_or_path) -> str | None:
    """The kind of a registered name; None for folders, hub ids and objects (their files tell)."""
    entry = MODELS.get(name_or_path) if isinstance(name_or_path, str) else None
    return entry.kind if entry else None


def registered_models() -> dict[str, Path]:
    """Registered names whose folder is present on disk."""
    return {n: WEIGHTS_DIR / p for n, p in REGISTERED.items() if (WEIGHTS_DIR / p).is_dir()}


def available_models() -> list[str]:
    """The registered names that can be loaded here: built in code, or with their folder present."""
    present = registered_models()
    return [name for name, entry in MODELS.items() if entry.folder is None or name in present]


def resolve_model_path(name_or_path: str) -> str:
    """A registered name → its folder; anything else is returned unchanged (folder or hub id)."""
    if name_or_path in REGISTERED:
        folder = WEIGHTS_DIR / REGISTERED[name_or_path]
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"registered model '{name_or_path}' has no weights in {folder}; restore them with "
                f"`git checkout -- models/weights` or retrain (see {folder}/README.md)"
            )
        return str(folder)
    return name_or_path
