"""Tasks: a task config (operator + noise, ``configs/task/*.yaml``) → an operator for one image size.

Task operator names extend the operator registry with the mask-building inpainting variants:
``inpaint_box`` (box_size, top_left, margin), ``inpaint_random`` (observed_fraction) and ``inpaint_mask``
(a user mask image: 1 = fill). Random parts (box position, pixel mask, motion kernel) are drawn from
the run seed, so a (task, seed, size) triple always rebuilds the same operator.

Sizes in pixels that should follow the image (a blur's kernel and sigma) are written ``null`` in the task
config and derived from its ``scaled_from`` block (:func:`scaled_sizes`): the papers' setting at their image
side (61 taps, sigma 3 px at 256), scaled by the image's shorter side, with floors. A value the user gives
(``operator.sigma=2``) is taken as it is, in pixels of the image restored.
"""

from __future__ import annotations

import math
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
    scaled = scaled_sizes(spec.pop("scaled_from", None), (height, width))
    given = {k: v for k, v in spec.items() if v is not None}
    spec = {**scaled, **given}
    if "kernel_size" not in given and spec.get("sigma") is not None and "kernel_size" in spec:
        # a derived kernel still spans +-3 sigma when the user chose a larger sigma
        spec["kernel_size"] = max(spec["kernel_size"], 2 * math.ceil(3 * float(spec["sigma"])) + 1)
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


def scaled_sizes(rule: dict[str, Any] | None, image_size: tuple[int, int]) -> dict[str, Any]:
    """The pixel sizes of a ``scaled_from`` rule for an image of ``image_size`` = (H, W).

    ``rule`` = ``{side: S, <key>: value at side S, ..., min: {<key>: floor}}``: each key becomes
    ``value * min(H, W) / S``, at least its floor; ``kernel_size`` is rounded to an odd integer (a centred
    kernel), other keys kept as floats. ``{side: 256, kernel_size: 61, sigma: 3.0, min: {sigma: 1.0,
    kernel_size: 7}}`` gives 61 / 3.0 at 256 px, 31 / 1.5 at 128 and 7 / 1.0 at 32."""
    if not rule:
        return {}
    rule = dict(rule)
    side = float(rule.pop("side", 0) or 0)
    floors = dict(rule.pop("min", None) or {})
    if side <= 0:
        raise StudioError("task config: operator.scaled_from needs a positive 'side'")
    ratio = min(image_size) / side
    sizes: dict[str, Any] = {}
    for key, value in rule.items():
        scaled = max(float(value) * ratio, float(floors.get(key, 0)))
        if key == "kernel_size":
            scaled = max(1, 2 * round((scaled - 1) / 2) + 1)
        sizes[key] = scaled
    return sizes


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
