"""Diffusion priors behind one interface (:class:`models.base.DiffusionPrior`)."""

import studio  # noqa: F401  (sets HF_HUB_OFFLINE before diffusers / huggingface_hub are imported)

from models.analytic import GaussianMixturePrior, GaussianPrior, gaussian_posterior
from models.base import DiffusionPrior, Prediction
from models.diffusers_prior import DiffusersPixelPrior, load_pixel_prior
from models.loading import as_prior, load_prior

__all__ = [
    "DiffusionPrior",
    "Prediction",
    "GaussianPrior",
    "GaussianMixturePrior",
    "gaussian_posterior",
    "DiffusersPixelPrior",
    "load_pixel_prior",
    "as_prior",
    "load_prior",
]
