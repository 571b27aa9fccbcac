"""Inpainting: keep the observed pixels (mask 1 = observed, see :mod:`studio.core.conventions`)."""

from __future__ import annotations

from typing import Any

import torch

from studio.core.errors import StudioError
from studio.core.operators.base import (
    MAX_LIST_ENTRIES,
    SVD,
    Device,
    LinearOperator,
    Shape,
    Tensor,
    as_tensor,
    check_input,
    diagonal_svd,
)
from studio.core.operators.registry import register_operator


@register_operator("inpaint")
class Inpainting(LinearOperator):
    """y = m ⊙ x with an observed mask m (1 = observed) of shape (H, W), (1, H, W) or (C, H, W).

    A^T = A^† = A; SVD with U = V = I and s = m broadcast over channels.
    """

    name = "inpaint"

    def __init__(self, mask: Any) -> None:
        super().__init__()
        m = as_tensor("inpainting mask", mask)
        if m.dim() == 2:
            m = m.unsqueeze(0)
        if m.dim() != 3 or m.shape[-1] == 0 or m.shape[-2] == 0:
            raise StudioError(f"inpainting mask must have shape (H, W) or (C, H, W), got {tuple(m.shape)}")
        bad = m[(m != 0) & (m != 1)]
        if bad.numel():
            raise StudioError(f"inpainting mask must contain only 0 and 1, found {bad[0].item():g}")
        self.register_buffer("mask", m.to(torch.float32))

    def _mask_for(self, x: Tensor) -> Tensor:
        c, h, w = self.mask.shape
        if x.shape[-2:] != (h, w) or (c != 1 and x.shape[-3] != c):
            raise StudioError(
                f"inpainting mask is {c}x{h}x{w} (CxHxW) but the image is "
                f"{x.shape[-3]}x{x.shape[-2]}x{x.shape[-1]}"
            )
        return self.mask.to(device=x.device, dtype=x.dtype)

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        check_input(self, x)
        return self._mask_for(x) * x

    def A_adjoint(self, y: Tensor, x_shape: Shape | None = None) -> Tensor:  # noqa: N802
        return self._mask_for(y) * y

    def A_dagger(self, y: Tensor, x_shape: Shape | None = None, **kwargs: Any) -> Tensor:  # noqa: N802
        return self._mask_for(y) * y

    def observed(self, y: Tensor) -> Tensor:
        return self._mask_for(y) * y

    def output_shape(self, x_shape: Shape) -> tuple[int, ...]:
        return tuple(x_shape)

    def num_measurements(self, x_shape: Shape) -> int:
        mask = self._mask_for(torch.zeros(1, *x_shape))  # checks the size
        return int(mask.expand(*x_shape).sum().item())

    def svd(self, x_shape: Shape, device: Device = None, dtype: torch.dtype | None = None) -> SVD:
        probe = torch.zeros(1, *x_shape)
        s = self._mask_for(probe).expand(*x_shape).reshape(-1)
        return diagonal_svd(s.to(device=device, dtype=dtype or torch.get_default_dtype()), tuple(x_shape))

    def params(self) -> dict:
        if self.mask.numel() <= MAX_LIST_ENTRIES:
            return {"mask": self.mask.tolist()}
        return {}

    def tensors(self) -> dict[str, Tensor]:
        if self.mask.numel() <= MAX_LIST_ENTRIES:
            return {}
        return {"mask": self.mask}
