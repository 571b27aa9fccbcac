"""Image quality metrics (PSNR, SSIM) on [0, 1] images, computed with scikit-image."""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from studio.core.errors import StudioError

_DEFAULT_WIN = 7


def _pair(x: torch.Tensor, ref: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Validate two images (1,C,H,W)/(C,H,W) → float64 H x W x C arrays clamped to [0, 1]."""
    shapes = []
    out = []
    for name, t in (("image", x), ("reference", ref)):
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(np.asarray(t))
        shapes.append(tuple(t.shape))
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3:
            raise StudioError(f"metric {name} must have shape (1,C,H,W) or (C,H,W), got {tuple(shapes[-1])}")
        a = t.detach().to("cpu", torch.float64)
        if not torch.isfinite(a).all():
            raise StudioError(f"metric {name} contains NaN or Inf values (shape {shapes[-1]})")
        out.append(a.clamp(0.0, 1.0).permute(1, 2, 0).numpy())
    if out[0].shape != out[1].shape:
        raise StudioError(f"image shape {shapes[0]} does not match reference shape {shapes[1]}")
    return out[0], out[1]


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    a, b = _pair(x, ref)
    if np.array_equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(b, a, data_range=data_range))


def ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Structural similarity (mean over the image; 7x7 window, smaller odd window for tiny images)."""
    a, b = _pair(x, ref)
    h, w = a.shape[:2]
    win = min(_DEFAULT_WIN, h, w)
    if win % 2 == 0:
        win -= 1
    if win < 3:
        raise StudioError(f"image of shape {a.shape[2]}x{h}x{w} is too small for SSIM (needs 3x3 pixels)")
    return float(structural_similarity(b, a, data_range=1.0, channel_axis=2, win_size=win))


def image_metrics(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """``{"psnr": dB, "ssim": value}`` of ``x`` against ``ref``."""
    return {"psnr": psnr(x, ref), "ssim": ssim(x, ref)}


__all__ = ["image_metrics", "psnr", "ssim"]


def masked_metrics(x: torch.Tensor, ref: torch.Tensor, keep: torch.Tensor) -> dict[str, float | None]:
    """PSNR and SSIM of ``x`` against ``ref`` over the pixels where ``keep`` ((1,1,H,W) or (H,W)) is 1: MSE
    over those pixels (all channels), and the mean of the SSIM map over them. None when no pixel is kept."""
    a, b = _pair(x, ref)
    keep_np = torch.as_tensor(keep).detach().to("cpu", torch.float64).reshape(a.shape[:2]).numpy() > 0.5
    if not keep_np.any():
        return {"psnr": None, "ssim": None, "pixels": 0}
    mse = float(((a - b) ** 2)[keep_np].mean())
    win = min(_DEFAULT_WIN, *a.shape[:2])
    win -= 1 - win % 2
    _, ssim_map = structural_similarity(b, a, data_range=1.0, channel_axis=2, win_size=win, full=True)
    return {"psnr": math.inf if mse == 0 else 10 * math.log10(1.0 / mse),
            "ssim": float(ssim_map.mean(axis=2)[keep_np].mean()), "pixels": int(keep_np.sum())}
