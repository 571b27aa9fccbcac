"""Measurement noise models, in [0, 1] image units, and :func:`measure` (``y = observed(A(x) + n)``)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from studio.core.errors import StudioError

Tensor = torch.Tensor


def _number(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise StudioError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _gen_device(y: Tensor, generator: torch.Generator | None) -> torch.device:
    # draw on the generator's device (torch requires it) and move to y's device afterwards
    return generator.device if generator is not None else y.device


class NoiseModel:
    """y ↦ a noisy copy of y, deterministic given the generator.

    ``sigma`` is the Gaussian std in [0, 1] image units (for non-Gaussian noise: an equivalent std).
    """

    name: str = "noise"
    sigma: float = 0.0

    def __call__(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def params(self) -> dict:
        """JSON-serialisable parameters: ``make_noise(self.name, **self.params())`` rebuilds it."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class GaussianNoise(NoiseModel):
    """y + σ ε, ε ~ N(0, I), σ in [0, 1] image units."""

    name = "gaussian"

    def __init__(self, sigma: float = 0.05) -> None:
        sigma = _number("noise sigma", sigma)
        if sigma < 0:
            raise StudioError(f"noise sigma must be >= 0, got {sigma!r}")
        if sigma > 1:
            # a sigma above 1 almost always means 0..255 units
            raise StudioError(
                f"noise sigma is in [0, 1] image units, got {sigma!r} (for 0..255 units divide by 255)"
            )
        self.sigma = sigma

    def __call__(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.sigma == 0:
            return y.clone()
        eps = torch.randn(y.shape, generator=generator, device=_gen_device(y, generator), dtype=y.dtype)
        return y + self.sigma * eps.to(y.device)

    def params(self) -> dict:
        return {"sigma": self.sigma}


class PoissonNoise(NoiseModel):
    """Shot noise: y ~ Poisson(rate · max(y, 0)) / rate, rate = photon count per unit intensity.

    ``sigma`` = sqrt(0.5 / rate), the std at mid grey (the Gaussian approximation a solver may use).
    """

    name = "poisson"

    def __init__(self, rate: float = 100.0) -> None:
        rate = _number("poisson rate", rate)
        if rate <= 0:
            raise StudioError(f"poisson rate must be > 0, got {rate!r}")
        self.rate = rate
        self.sigma = math.sqrt(0.5 / rate)

    def __call__(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        lam = (self.rate * y.clamp(min=0)).to(_gen_device(y, generator))
        counts = torch.poisson(lam, generator=generator)
        return (counts / self.rate).to(device=y.device, dtype=y.dtype)

    def params(self) -> dict:
        return {"rate": self.rate}


NOISES: dict[str, type] = {"gaussian": GaussianNoise, "poisson": PoissonNoise, "none": GaussianNoise}


def make_noise(name: str, **params: Any) -> NoiseModel:
    """``make_noise("gaussian", sigma=0.05)``, ``make_noise("poisson", rate=100)``, ``make_noise("none")``."""
    if name not in NOISES:
        raise StudioError(f"unknown noise {name!r}; known: {', '.join(sorted(NOISES))}")
    if name == "none":
        if params:
            raise StudioError(f"noise 'none' takes no parameters, got {sorted(params)}")
        return GaussianNoise(0.0)
    allowed = {"gaussian": ("sigma",), "poisson": ("rate",)}[name]
    for key in params:
        if key not in allowed:
            raise StudioError(f"unknown parameter {key!r} for noise {name!r}; accepted: {list(allowed)}")
    return NOISES[name](**params)


def measure(x: Tensor, operator: Any, noise: NoiseModel, generator: torch.Generator | None = None) -> Tensor:
    """y = operator.observed(noise(operator.A(x))): noise only where something is measured."""
    return operator.observed(noise(operator.A(x), generator))
