"""Blur operators: a separable Gaussian (:class:`GaussianBlur`), a random camera shake (:class:`MotionBlur`).

Both use a whole-sample symmetric ('reflect') boundary, folded by :func:`reflect_index` so that any kernel
size works on any image size; the Gaussian blur can also wrap around ('circular').
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from studio.core.errors import StudioError
from studio.core.operators.base import (
    MAX_LIST_ENTRIES,
    LinearOperator,
    Shape,
    Tensor,
    as_float,
    as_int,
    as_tensor,
    check_input,
    odd_size,
)
from studio.core.operators.registry import register_operator
from studio.core.operators.separable import SeparableOperator


def reflect_index(idx: Tensor, n: int) -> Tensor:
    """Fold integer positions into [0, n) by whole-sample symmetric reflection (``2 1 | 0 1 .. n-1 | n-2``).

    Same as torch's 'reflect' padding, but folded repeatedly (period 2n-2) so any padding width works.
    """
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


# ----------------------------------------------------------------------------------------------------------
# Gaussian blur
# ----------------------------------------------------------------------------------------------------------


def gaussian_kernel_1d(kernel_size: int, sigma: float) -> Tensor:
    """Taps k[t] ∝ exp(-t² / 2σ²), t = -r..r, normalised to sum 1 (float64)."""
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(t**2) / (2.0 * sigma**2))
    return k / k.sum()


def correlation_matrix_1d(taps: Tensor, n: int, boundary: str) -> Tensor:
    """n×n matrix of ``y[i] = Σ_t k[t] x[b(i + t)]`` (t = -r..r) for boundary b = reflect fold or wrap."""
    r = taps.numel() // 2
    i = torch.arange(n)
    pos = i[:, None] + torch.arange(-r, r + 1)[None, :]
    cols = reflect_index(pos, n) if boundary == "reflect" else pos.remainder(n)
    m = torch.zeros(n, n, dtype=torch.float64)
    # accumulate: several taps fold onto the same pixel near the border (or everywhere if r >= n)
    m.index_put_((i[:, None].expand_as(cols), cols), taps.to(torch.float64).expand_as(cols), accumulate=True)
    return m


@register_operator("gaussian_blur")
class GaussianBlur(SeparableOperator):
    """y = k ∗ x with a separable Gaussian k (sum 1), y = Mh X Mw^T; boundary 'reflect' or 'circular'.

    ``svd_threshold`` (default 3e-2, DDRM's): 1-D singular values below it (× the largest) are unobserved.
    """

    name = "gaussian_blur"
    BOUNDARIES = ("reflect", "circular")
    DEFAULT_SVD_THRESHOLD = 3e-2

    def __init__(self, kernel_size: int = 61, sigma: float = 3.0, boundary: str = "reflect",
                 svd_threshold: float | None = None) -> None:
        super().__init__(svd_threshold)
        self.kernel_size = odd_size("gaussian_blur kernel_size", kernel_size)
        self.sigma = as_float("gaussian_blur sigma", sigma)
        if self.sigma <= 0:
            raise StudioError(f"gaussian_blur sigma must be > 0, got {sigma!r}")
        if boundary not in self.BOUNDARIES:
            raise StudioError(f"gaussian_blur boundary must be one of {self.BOUNDARIES}, got {boundary!r}")
        self.boundary = boundary
        self.taps = gaussian_kernel_1d(self.kernel_size, self.sigma)

    def matrix_1d(self, n: int, axis: int) -> Tensor:
        return correlation_matrix_1d(self.taps, n, self.boundary)

    def params(self) -> dict:
        return {"kernel_size": self.kernel_size, "sigma": self.sigma, "boundary": self.boundary,
                "svd_threshold": self.svd_threshold}


# ----------------------------------------------------------------------------------------------------------
# motion blur
# ----------------------------------------------------------------------------------------------------------


def motion_kernel(
    size: int,
    intensity: float = 0.5,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A random camera-shake kernel (size×size, ≥ 0, sum 1), deterministic for a generator.

    The path is a random walk with momentum: the heading's angular velocity is an AR(1) process
    ``ω_k = 0.7 ω_{k-1} + σ_turn ξ_k``, the speed fluctuates the same way, and rare jerks kink the path.
    ``intensity`` in [0, 1] raises σ_turn, the speed jitter, the jerk rate and the path's radius, so the
    path gets longer and more erratic. Points sampled uniformly in *time* are splatted bilinearly, so the
    camera leaves more weight where it moves slowly. The path is centred on its centroid; bilinear splatting
    keeps that centroid at the kernel centre, so blurring does not shift the image.
    """
    size = odd_size("motion kernel size", size)
    intensity = as_float("motion blur intensity", intensity)
    if not 0.0 <= intensity <= 1.0:
        raise StudioError(f"motion blur intensity must be in [0, 1], got {intensity!r}")
    if size == 1:
        return torch.ones(1, 1, dtype=dtype)
    steps = 64
    corners = _camera_walk(steps, intensity, generator)
    path = _path_in_kernel(corners, steps, size, intensity)
    kernel = torch.from_numpy(np.clip(_splat_bilinear(path, size), 0.0, None)).to(dtype)
    return kernel / kernel.sum()


def _camera_walk(steps: int, intensity: float, g: torch.Generator | None) -> np.ndarray:
    """The (steps + 1) × 2 corners of the camera's random walk with momentum, starting at the origin."""
    momentum = 0.7
    heading = float(torch.rand((), generator=g, dtype=torch.float64)) * 2 * math.pi
    turn_noise = torch.randn(steps, generator=g, dtype=torch.float64).tolist()
    speed_noise = torch.randn(steps, generator=g, dtype=torch.float64).tolist()
    jerk_draw = torch.rand(steps, generator=g, dtype=torch.float64).tolist()
    jerk_angle = torch.randn(steps, generator=g, dtype=torch.float64).tolist()

    turn_std = 0.02 + 0.08 * intensity  # radians per step
    speed_std = 0.1 + 0.3 * intensity
    jerk_prob = 0.03 * intensity
    omega, speed_dev = 0.0, 0.0
    pts = np.zeros((steps + 1, 2))
    for k in range(steps):
        omega = momentum * omega + turn_std * turn_noise[k]
        speed_dev = momentum * speed_dev + speed_std * speed_noise[k]
        heading += omega
        if jerk_draw[k] < jerk_prob:
            heading += (math.pi / 3) * jerk_angle[k]
        speed = min(max(1.0 + speed_dev, 0.2), 2.0)
        pts[k + 1] = pts[k] + speed * np.array([math.cos(heading), math.sin(heading)])
    return pts


def _path_in_kernel(pts: np.ndarray, steps: int, size: int, intensity: float) -> np.ndarray:
    """The walk sampled uniformly in time, centred on its centroid and scaled into the size×size kernel."""
    # 16 samples per step, uniform in time: density ∝ exposure time at each place
    t = np.linspace(0.0, steps, 16 * steps + 1)
    path = np.stack([np.interp(t, np.arange(steps + 1), pts[:, i]) for i in range(2)], axis=1)
    path -= path.mean(axis=0)
    extent = np.abs(path).max()
    radius = (size - 1) / 2 * (0.5 + 0.5 * intensity)
    if extent > 0:
        path *= radius / extent
    path += (size - 1) / 2  # kernel centre; coordinates stay within [0, size-1]
    return path


def _splat_bilinear(path: np.ndarray, size: int) -> np.ndarray:
    """Add each (x, y) point of the path onto its four neighbouring kernel cells with bilinear weights."""
    kernel = np.zeros((size, size))
    x0 = np.clip(np.floor(path[:, 0]).astype(int), 0, size - 2)
    y0 = np.clip(np.floor(path[:, 1]).astype(int), 0, size - 2)
    fx, fy = path[:, 0] - x0, path[:, 1] - y0
    corners = ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx))
    for dy, dx, wgt in corners:
        np.add.at(kernel, (y0 + dy, x0 + dx), wgt)
    return kernel


@register_operator("motion_blur")
class MotionBlur(LinearOperator):
    """y = k ∗ x (true convolution) with reflect boundary (index folding, any image size); no SVD.

    k comes from :func:`motion_kernel` (kernel_size, intensity, seed) or is given explicitly (normalised to
    sum 1). A^T: correlate the (flipped) kernel on the padded domain, then fold the padding back.
    """

    name = "motion_blur"

    def __init__(
        self,
        kernel_size: int = 61,
        intensity: float = 0.5,
        seed: int = 0,
        kernel: Any = None,
    ) -> None:
        super().__init__()
        if kernel is None:
            k = self._seeded_kernel(kernel_size, intensity, seed)
        else:
            k = self._given_kernel(kernel)
        self.register_buffer("kernel", k.to(torch.float32))
        self._k64 = k
        self._cache: dict[tuple, Tensor] = {}

    def _seeded_kernel(self, kernel_size: Any, intensity: Any, seed: Any) -> Tensor:
        self.kernel_size = odd_size("motion_blur kernel_size", kernel_size)
        self.intensity = as_float("motion_blur intensity", intensity)
        self.seed = as_int("motion_blur seed", seed)
        self._explicit = False
        g = torch.Generator().manual_seed(self.seed)
        return motion_kernel(self.kernel_size, self.intensity, g, dtype=torch.float64)

    def _given_kernel(self, kernel: Any) -> Tensor:
        k = as_tensor("motion_blur kernel", kernel)
        if k.dim() != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
            raise StudioError(f"motion_blur kernel must be 2-D with odd sides, got shape {tuple(k.shape)}")
        if k.sum() <= 0:
            raise StudioError(f"motion_blur kernel must have a positive sum, got {k.sum().item():g}")
        k = k / k.sum()
        self.kernel_size, self.intensity, self.seed = int(k.shape[0]), None, None
        self._explicit = True
        return k

    def _weight(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in self._cache:
            # conv2d correlates; flipping the kernel makes it a true convolution
            flipped = torch.flip(self._k64, dims=(0, 1))
            self._cache[key] = flipped.to(device=x.device, dtype=x.dtype)[None, None]
        c = x.shape[1]
        return self._cache[key].expand(c, 1, -1, -1)

    def _pad_index(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        rh, rw = self._k64.shape[0] // 2, self._k64.shape[1] // 2
        ih = reflect_index(torch.arange(-rh, h + rh, device=device), h)
        iw = reflect_index(torch.arange(-rw, w + rw, device=device), w)
        return ih, iw

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        check_input(self, x)
        ih, iw = self._pad_index(x.shape[-2], x.shape[-1], x.device)
        padded = x.index_select(2, ih).index_select(3, iw)
        return F.conv2d(padded, self._weight(x), groups=x.shape[1])

    def A_adjoint(self, y: Tensor, x_shape: Shape | None = None) -> Tensor:  # noqa: N802
        b, c, h, w = y.shape
        ih, iw = self._pad_index(h, w, y.device)
        q = F.conv_transpose2d(y, self._weight(y), groups=c)  # adjoint of the valid conv: (H+2rh, W+2rw)
        # adjoint of the gather: add every padded position back onto the pixel it was copied from
        rows = y.new_zeros(b, c, h, q.shape[-1]).index_add_(2, ih, q)
        return y.new_zeros(b, c, h, w).index_add_(3, iw, rows)

    def output_shape(self, x_shape: Shape) -> tuple[int, ...]:
        return tuple(x_shape)

    def params(self) -> dict:
        if not self._explicit:
            return {"kernel_size": self.kernel_size, "intensity": self.intensity, "seed": self.seed}
        if self._k64.numel() <= MAX_LIST_ENTRIES:
            return {"kernel": self._k64.tolist()}
        return {}

    def tensors(self) -> dict[str, Tensor]:
        if self._explicit and self._k64.numel() > MAX_LIST_ENTRIES:
            return {"kernel": self._k64}
        return {}
