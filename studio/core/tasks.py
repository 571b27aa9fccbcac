"""Tasks: a task config (operator + noise, ``configs/task/*.yaml``) → an operator for one image size.

Task operator names extend the operator registry with the mask-building inpainting variants:
``inpaint_box`` (box_size, top_left, margin), ``inpaint_random`` (observed_fraction) and ``inpaint_mask``
(a user mask image: 1 = fill). Random parts (box position, pixel mask, motion kernel) are drawn from
the run seed, so a (task, seed, size) triple always rebuilds the same operator.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from studio.core.conventions import fill_mask_to_observed
from studio.core.errors import StudioError
from studio.core.masks import box_mask, random_pixel_mask, validate_fill_mask
from studio.core.noise import NoiseModel, make_noise
from studio.core.operators import Inpainting, Operator, make_operator

Tensor = torch.Tensor
# spec (its used keys popped), (H, W), generator, user fill mask or None -> observed mask (1 = observed)
MaskBuilder = Callable[[dict, tuple[int, int], torch.Generator, Tensor | None], Tensor]


def _box(spec: dict, size: tuple[int, int], gen: torch.Generator, fill_mask: Tensor | None) -> Tensor:
    """``inpaint_box``: a box of ``box_size`` pixels (a float in (0, 1]: a fraction of the shorter side)."""
    height, width = size
    box_size = spec.pop("box_size", 0.5)
    if isinstance(box_size, float) and 0 < box_size <= 1:
        box_size = max(1, round(box_size * min(height, width)))
    top_left = spec.pop("top_left", None)
    return box_mask(height, width, box_size, tuple(top_left) if top_left is not None else None,
                    generator=gen, margin=int(spec.pop("margin", 0)))


def _random_pixels(
    spec: dict, size: tuple[int, int], gen: torch.Generator, fill_mask: Tensor | None
) -> Tensor:
    """``inpaint_random``: each pixel observed with probability ``observed_fraction``."""
    return random_pixel_mask(size[0], size[1], spec.pop("observed_fraction", 0.3), generator=gen)


def _user_mask(spec: dict, size: tuple[int, int], gen: torch.Generator, fill_mask: Tensor | None) -> Tensor:
    """``inpaint_mask``: the user's mask image (1 = fill), turned into an observed mask."""
    height, width = size
    if fill_mask is None:
        raise StudioError("task inpaint_mask needs a mask image (--mask): paint the region to fill")
    if tuple(fill_mask.shape[-2:]) != (height, width):
        raise StudioError(
            f"mask is {fill_mask.shape[-1]}x{fill_mask.shape[-2]} but the image is {width}x{height}"
        )
    return fill_mask_to_observed(validate_fill_mask(fill_mask.reshape(height, width)))


# the task-level variants of the registry's ``inpaint``: each builds the mask, then it is an Inpainting
INPAINT_VARIANTS: dict[str, MaskBuilder] = {
    "inpaint_box": _box,
    "inpaint_random": _random_pixels,
    "inpaint_mask": _user_mask,
}


def build_operator(
    spec: dict[str, Any], image_size: tuple[int, int], seed: int, fill_mask: Tensor | None = None
) -> Operator:
    """The operator of a task config's ``operator`` block for images of ``image_size`` = (H, W)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    height, width = image_size
    gen = torch.Generator().manual_seed(int(seed))
    if name in INPAINT_VARIANTS:
        mask = INPAINT_VARIANTS[name](spec, (height, width), gen, fill_mask)
        _no_extra(name, spec)
        return Inpainting(mask)
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
