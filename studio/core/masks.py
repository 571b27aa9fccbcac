"""Inpainting mask helpers. Masks are float32 tensors of shape (H, W).

Operator masks mark what is **observed** (1 = observed); user masks mark what to **fill** (1 = fill, painted
white / opaque). Convert with :func:`studio.core.conventions.fill_mask_to_observed`.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from PIL import Image

from studio.core.conventions import fill_mask_to_observed
from studio.core.errors import StudioError

Tensor = torch.Tensor


def _positive_int(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise StudioError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _pair(what: str, value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise StudioError(f"{what} must be an int or a (height, width) pair, got {value!r}")
        return _positive_int(what, value[0]), _positive_int(what, value[1])
    n = _positive_int(what, value)
    return n, n


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def box_mask(
    height: int,
    width: int,
    box_size: int | tuple[int, int],
    top_left: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    margin: int = 0,
) -> Tensor:
    """Observed mask (1 = observed) with a zero box of ``box_size`` (h, w) at ``top_left`` (row, col).

    With ``top_left=None`` the box is placed uniformly at random (seeded by ``generator``) at least
    ``margin`` pixels from every border.
    """
    height, width = _positive_int("mask height", height), _positive_int("mask width", width)
    bh, bw = _pair("box_size", box_size)
    if isinstance(margin, bool) or not isinstance(margin, numbers.Integral) or margin < 0:
        raise StudioError(f"margin must be a non-negative integer, got {margin!r}")
    if top_left is None:
        if bh + 2 * margin > height or bw + 2 * margin > width:
            raise StudioError(
                f"a {bh}x{bw} box with margin {margin} does not fit in a {height}x{width} image"
            )
        top = _randint(margin, height - margin - bh, generator)
        left = _randint(margin, width - margin - bw, generator)
    else:
        if (
            not isinstance(top_left, (tuple, list))
            or len(top_left) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in top_left)
        ):
            raise StudioError(f"top_left must be a (row, col) pair of integers, got {top_left!r}")
        top, left = (int(v) for v in top_left)
        if top < 0 or left < 0 or top + bh > height or left + bw > width:
            raise StudioError(
                f"a {bh}x{bw} box at (row {top}, col {left}) does not fit in a {height}x{width} image"
            )
    mask = torch.ones(height, width)
    mask[top : top + bh, left : left + bw] = 0.0
    return mask


def random_pixel_mask(
    height: int, width: int, observed_fraction: float, generator: torch.Generator | None = None
) -> Tensor:
    """Observed mask with exactly round(fraction · H · W) observed pixels at random positions."""
    height, width = _positive_int("mask height", height), _positive_int("mask width", width)
    if isinstance(observed_fraction, bool) or not isinstance(observed_fraction, numbers.Real) or not (
        0.0 < float(observed_fraction) < 1.0
    ):
        raise StudioError(f"observed_fraction must be in (0, 1), got {observed_fraction!r}")
    n = height * width
    count = int(round(float(observed_fraction) * n))
    mask = torch.zeros(n)
    mask[torch.randperm(n, generator=generator)[:count]] = 1.0
    return mask.reshape(height, width)


def _to_array(img: Any) -> np.ndarray:
    """PIL image / numpy array / tensor → float array in [0, 1], shape (H, W) or (H, W, bands)."""
    if isinstance(img, Image.Image):
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode not in ("L", "LA", "RGB", "RGBA", "1"):
            img = img.convert("RGBA" if "A" in img.getbands() else "L")
        arr = np.asarray(img)
    elif isinstance(img, Tensor):
        arr = img.detach().cpu().numpy()
    elif isinstance(img, np.ndarray):
        arr = img
    else:
        raise StudioError(f"mask must be a PIL image or an array, got {type(img).__name__}")
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    elif np.issubdtype(arr.dtype, np.integer):
        # integer images are 0..255 (uint16 images: 0..65535)
        arr = arr.astype(np.float64) / (65535.0 if arr.dtype == np.uint16 else 255.0)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    else:
        raise StudioError(f"mask array must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (2, 3, 4)):
        raise StudioError(f"mask image must be HxW, HxWx3 (RGB) or HxWx4 (RGBA), got shape {arr.shape}")
    return arr


def fill_mask_from_image(img: Any, size: tuple[int, int] | None = None) -> Tensor:
    """Fill mask (1 = fill) from a mask image as a user paints it.

    With an alpha channel that is actually used (not fully opaque), alpha > 0 marks painted pixels;
    otherwise luminance > 0.5 does (white = fill, the diffusers convention). ``size`` is the image's
    (width, height), as PIL's ``Image.size``; a different mask size raises (no silent resize).
    """
    arr = _to_array(img)
    if arr.ndim == 3 and arr.shape[-1] in (2, 4) and (arr[..., -1] < 1.0).any():
        painted = arr[..., -1] > 0
    else:
        if arr.ndim == 2:
            lum = arr
        elif arr.shape[-1] in (3, 4):
            lum = arr[..., :3] @ np.array([0.299, 0.587, 0.114])  # BT.601 luma
        else:  # grey + alpha
            lum = arr[..., 0]
        painted = lum > 0.5
    h, w = painted.shape
    if size is not None:
        want_w, want_h = (int(v) for v in size)
        if (want_w, want_h) != (w, h):
            raise StudioError(f"mask is {w}x{h} but the image is {want_w}x{want_h}")
    return torch.from_numpy(painted.astype(np.float32))


def validate_fill_mask(fill: Tensor) -> Tensor:
    """Raise StudioError when a fill mask marks nothing or everything; return it unchanged otherwise."""
    painted = fill > 0.5
    if not bool(painted.any()):
        raise StudioError("mask is empty: paint the region to fill")
    if bool(painted.all()):
        raise StudioError("mask covers the whole image: nothing is observed")
    return fill


def observed_mask_from_image(img: Any, size: tuple[int, int] | None = None) -> Tensor:
    """User mask image → validated operator mask (1 = observed)."""
    return fill_mask_to_observed(validate_fill_mask(fill_mask_from_image(img, size)))
