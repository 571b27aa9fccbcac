"""A Gaussian image prior the project builds itself: the demo model until the embedded models ship.

``fit_gaussian_prior`` estimates N(μ, Σ) (model space, full covariance) from 32×32 crops of the
photographs that ship inside scikit-image (CC0 / public domain), holding out ``coffee`` as the demo
image. With the exact Tweedie denoiser of :mod:`models.analytic` every solver runs on it unchanged, and
its restorations are the Bayes (Wiener-like) answers of a stationary-ish Gaussian image model: blurry
but honest. The fit is cached as safetensors (mean, eigenvalues, eigenvectors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.analytic import GaussianPrior
from studio.core import paths
from studio.core.conventions import to_model

TRAIN_IMAGES = ("astronaut", "chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field")
DEMO_IMAGE = "coffee"
CACHE_NAME = "gaussian-demo-32.safetensors"  # under studio.core.paths.cache_dir()


def skimage_rgb(name: str, short_side: int) -> np.ndarray:
    """A scikit-image sample photo as float RGB in [0, 1], resized so its short side is ``short_side``."""
    from PIL import Image
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())[..., :3]
    im = Image.fromarray(img)
    scale = short_side / min(im.size)
    im = im.resize((max(short_side, round(im.size[0] * scale)), max(short_side, round(im.size[1] * scale))),
                   Image.LANCZOS)
    return np.asarray(im, dtype=np.float32) / 255.0


def demo_image(size: int = 32) -> torch.Tensor:
    """The held-out demo photo (``coffee``), centre-cropped to size×size, (1, 3, size, size) in [0, 1]."""
    a = skimage_rgb(DEMO_IMAGE, size)
    h, w = a.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return torch.from_numpy(a[top:top + size, left:left + size].copy()).permute(2, 0, 1)[None]


def fit_gaussian_prior(size: int = 32, crops_per_image: int = 3000, seed: int = 0) -> GaussianPrior:
    rng = np.random.default_rng(seed)
    crops = []
    for name in TRAIN_IMAGES:
        for short in (2 * size, 3 * size):
            a = skimage_rgb(name, short)
            h, w = a.shape[:2]
            for _ in range(crops_per_image // 2):
                r, c = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
                crop = a[r:r + size, c:c + size]
                crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    x = to_model(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).reshape(len(crops), -1).double())
    mean = x.mean(0)
    cov = torch.cov(x.T) + 1e-4 * torch.eye(x.shape[1], dtype=torch.float64)  # shrinkage: well-posed
    evals, evecs = torch.linalg.eigh(cov)
    return GaussianPrior(mean, cov, sample_shape=(3, size, size), eig=(evals[None], evecs[None]))


def load_demo_prior(cache: Path | None = None) -> GaussianPrior:
    """The demo Gaussian prior, fitted on first use (about 20 s) and cached
    (:func:`studio.core.paths.cache_dir`)."""
    cache = Path(cache) if cache is not None else paths.cache_dir() / CACHE_NAME
    if cache.exists():
        t = load_file(str(cache))
        d = t["mean"].numel()
        cov = (t["eigvecs"] * t["eigvals"]) @ t["eigvecs"].T
        side = int(round((d // 3) ** 0.5))
        return GaussianPrior(t["mean"], cov, sample_shape=(3, side, side),
                             eig=(t["eigvals"][None], t["eigvecs"][None]))
    prior = fit_gaussian_prior()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    save_file({"mean": prior.mean.contiguous(), "eigvals": prior.eigvals[0].contiguous(),
               "eigvecs": prior.eigvecs[0].contiguous()}, str(tmp))
    tmp.replace(cache)
    return prior
