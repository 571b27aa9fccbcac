"""The project's value conventions, written once.

* User-facing images are float tensors in **[0, 1]**, shape ``(B, C, H, W)``.
* Diffusion models work in **[-1, 1]**: ``x_model = 2 * x_image - 1``.
* Forward operators always act on **[0, 1] images**: ``y = A(x_image) + noise``. Solvers that iterate
  in model space convert ``x̂0`` back with :func:`to_image` before applying ``A``.
* Noise ``sigma`` is always given in **[0, 1] image units**. A residual measured in model units is
  twice the residual in image units, so a solver that needs the noise level in model units uses
  :func:`sigma_to_model` (``2 * sigma``). This is the factor the DDRM and CDIM codes apply silently
  (``sigma_0 = 2 * sigma_0``) and the DPS code omits (its sigma *is* in [-1, 1] units).
* An inpainting mask **from a user** marks the region to *fill* (1 = fill, like diffusers' white =
  repaint). An **operator** mask marks what is *observed* (1 = observed, like DeepInverse). Convert with
  :func:`fill_mask_to_observed`.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def to_model(x_image: Tensor) -> Tensor:
    """[0, 1] image → [-1, 1] model space."""
    return x_image * 2.0 - 1.0


def to_image(x_model: Tensor) -> Tensor:
    """[-1, 1] model space → [0, 1] image (not clamped: exact for analytic priors)."""
    return (x_model + 1.0) * 0.5


def sigma_to_model(sigma_image: float) -> float:
    """Noise std in [0, 1] image units → std in [-1, 1] model units."""
    return 2.0 * float(sigma_image)


def fill_mask_to_observed(fill_mask: Tensor) -> Tensor:
    """User mask (1 = region to fill) → operator mask (1 = observed pixel)."""
    return 1.0 - fill_mask


def observed_to_fill_mask(observed: Tensor) -> Tensor:
    """Operator mask (1 = observed) → user mask (1 = region to fill)."""
    return 1.0 - observed
