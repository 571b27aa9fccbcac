"""Load a prior by registered name, folder or hub id, or from an already loaded diffusers pipeline: the one
entry point the workflows and the solvers use (:func:`as_prior`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from models.base import DiffusionPrior
from models.diffusers_prior import is_pipeline, load_pixel_prior, open_pipeline
from models.fitted import load_demo_prior
from models.latent_prior import load_latent_prior
from models.registry import PIXEL, TEXT_TO_IMAGE, default_model, model_kind, resolve_model_path
from studio.core.errors import ModelLoadError


def load_prior(model=None, device=None, latent: bool = False):
    """A prior by name: a registered name (``gaussian-demo`` is built in code), a folder, a hub id or a
    loaded diffusers pipeline object (its modules used as they are); None gives the default of its kind.
    ``latent=True`` loads a Stable-Diffusion-style pipeline (for the latent solvers, inversion and
    personalization). ``device`` None: CPU for a name, the pipeline's own device for a pipeline object."""
    if model is None:
        model = default_model(TEXT_TO_IMAGE if latent else PIXEL)
    if latent:
        return load_latent_prior(model, device=device)
    if model == "gaussian-demo":
        return load_demo_prior().to(device or "cpu")
    return load_pixel_prior(model, device=device)


def is_latent_pipeline(pipe) -> bool:
    """Whether a loaded pipeline is text-to-image (a VAE and a text encoder beside its UNet)."""
    return all(getattr(pipe, k, None) is not None for k in ("vae", "text_encoder"))


def _model_index(name) -> dict | None:
    """A folder's ``model_index.json`` (its components); None when there is none or it cannot be read
    (open_pipeline reports that)."""
    index = Path(resolve_model_path(str(name))).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    try:
        components = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    return components if isinstance(components, dict) else None


def _has(components: dict, name: str) -> bool:
    return isinstance(components.get(name), list) and bool(components[name][0])


def is_latent_model(name) -> bool | None:
    """Whether a registered name, or a folder by its ``model_index.json``, is a text-to-image (latent)
    model; None when its files do not say (a hub id: its components tell once loaded)."""
    kind = model_kind(name)
    if kind is not None:
        return kind == TEXT_TO_IMAGE
    components = _model_index(name)
    return None if components is None else all(_has(components, k) for k in ("vae", "text_encoder"))


def is_flow_model(name) -> bool:
    """Whether a folder's ``model_index.json`` is a flow-matching (Stable-Diffusion-3-style) pipeline: a
    transformer denoiser and a ``FlowMatch...`` scheduler (:func:`models.flow_prior.is_flow_pipeline` on
    the files). Registered names are not; nor is what the files do not describe."""
    if model_kind(name) is not None:
        return False
    components = _model_index(name)
    if components is None or not _has(components, "transformer"):
        return False
    scheduler = components.get("scheduler")
    return isinstance(scheduler, list) and len(scheduler) == 2 and "FlowMatch" in str(scheduler[1])


def as_prior(obj=None, latent: bool | None = None, device=None):
    """``obj`` as a :class:`~models.base.DiffusionPrior`, what every solver and workflow calls on its model.

    * a prior (anything with ``predict`` and ``alphas_cumprod``) is returned unchanged;
    * a loaded diffusers pipeline (``DDPMPipeline``, ``DDIMPipeline``, ``StableDiffusionPipeline``, ...) is
      wrapped without copying or moving a weight (``device`` None);
    * a registered name, folder or hub id (None: the default model of the kind) is loaded.

    ``latent`` None decides by the components: a VAE + a text encoder make a latent (text-to-image) prior,
    anything else a pixel prior; True / False asks for one kind (the other is refused with one line).
    """
    if isinstance(obj, DiffusionPrior) or (hasattr(obj, "predict") and hasattr(obj, "alphas_cumprod")):
        return obj
    if obj is not None and not isinstance(obj, (str, os.PathLike)) and not is_pipeline(obj):
        raise ModelLoadError(f"expected a prior, a diffusers pipeline, or a model name, folder or hub id; "
                             f"got a {type(obj).__name__}")
    if latent is None and obj is not None:
        latent = is_latent_pipeline(obj) if is_pipeline(obj) else is_latent_model(obj)
        if latent is None:  # a hub id: open it once, then decide by its components
            obj, _ = open_pipeline(str(obj))
            latent = is_latent_pipeline(obj)
    return load_prior(obj, device=device, latent=bool(latent))


__all__ = ["as_prior", "is_flow_model", "is_latent_model", "is_latent_pipeline", "is_pipeline", "load_prior"]
