"""Load a prior by registered name, folder or hub id: the one entry point the workflows use."""

from __future__ import annotations

from models.diffusers_prior import load_pixel_prior
from models.fitted import load_demo_prior
from models.latent_prior import load_latent_prior
from models.registry import PIXEL, TEXT_TO_IMAGE, default_model


def load_prior(model: str | None = None, device: str = "cpu", latent: bool = False):
    """A prior by name: a registered name (``gaussian-demo`` is built in code), a folder or a hub id;
    None gives the default of its kind. ``latent=True`` loads a Stable-Diffusion-style pipeline (for the
    latent solvers, inversion and personalization)."""
    if model is None:
        model = default_model(TEXT_TO_IMAGE if latent else PIXEL)
    if latent:
        return load_latent_prior(model, device=device)
    if model == "gaussian-demo":
        return load_demo_prior().to(device)
    return load_pixel_prior(model, device=device)
