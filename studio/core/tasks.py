"""Tasks: a task config (operator + noise, ``configs/task/*.yaml``) → an operator for one image size.

Task operator names extend the operator registry with the mask-building inpainting variants:
``inpaint_box`` (box_size, top_left, margin), ``inpaint_random`` (observed_fraction) and ``inpaint_mask``
(a user mask image: 1 = fill). Random parts (box position, pixel mask, motion kernel) are drawn from
the run seed, so a (task, seed, size) triple always rebuilds the same operator.
"""

from __future__ import annotations

from typing import Any

import torch

from studio.core.conventions import fill_mask_to_observed
from studio.core.errors import StudioError
from studio.core.masks import box_mask, random_pixel_mask, validate_fill_mask
from studio.core.noise import NoiseModel, make_noise
from studio.core.operators import Inpainting, Operator, make_operator

Tensor = torch.Tensor


def build_operator(
    spec: dict[str, Any], image_size: tuple[int, int], seed: int, fill_mask: Tensor | None = None
) -> Operator:
    """The operator of a task config's ``operator`` block for images of ``image_size`` = (H, W)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    height, width = image_size
    gen = torch.Generator().manual_seed(int(seed))
    if name == "inpaint_box":
        size = spec.pop("box_size", 0.5)
        if isinstance(size, float) and 0 < size <= 1:
            size = max(1, round(size * min(height, width)))
        top_left = spec.pop("top_left", None)
        mask = box_mask(height, width, size, tuple(top_left) if top_left is not None else None,
                        generator=gen, margin=int(spec.pop("margin", 0)))
        _no_extra(name, spec)
        return Inpainting(mask)
    if name == "inpaint_random":
        mask = random_pixel_mask(height, width, spec.pop("observed_fraction", 0.3), generator=gen)
        _no_extra(name, spec)
        return Inpainting(mask)
    if name == "inpaint_mask":
        if fill_mask is None:
            raise StudioError("task inpaint_mask needs a mask image (--mask): paint the region to fill")
        if tuple(fill_mask.shape[-2:]) != (height, width):
            raise StudioError(
                f"mask is {fill_mask.shape[-1]}x{fill_mask.shape[-2]} but the image is {width}x{height}"
            )
        _no_extra(name, spec)
        return Inpainting(fill_mask_to_observed(validate_fill_mask(fill_mask.reshape(height, width))))
    if name == "motion_blur":
        spec.setdefault("seed", int(seed))
    if name is None:
        raise StudioError("task config has no operator.name")
    return make_operator(name, **spec)


def build_noise(spec: dict[str, Any]) -> NoiseModel:
    spec = dict(spec)
    name = spec.pop("name", "gaussian")
    return make_noise(name, **spec)


def noise_sigma_of(noise: NoiseModel) -> float:
    """The Gaussian std the solvers are told ([0, 1] units; Poisson → its std at mid grey)."""
    return float(noise.sigma)


def _no_extra(name: str, spec: dict) -> None:
    if spec:
        raise StudioError(f"unknown parameter {next(iter(spec))!r} for task operator {name!r}")
