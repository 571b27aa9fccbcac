"""Colorization: the measurement is the BT.601 luma of an RGB image."""

from __future__ import annotations

from typing import Any

import torch

from studio.core.errors import StudioError
from studio.core.operators.base import SVD, Device, LinearOperator, Shape, Tensor, check_input
from studio.core.operators.registry import register_operator

# ITU-R BT.601 luma weights; they sum to 1, so a grey image keeps its value.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _needs_rgb(channels: int) -> None:
    if channels != 3:
        raise StudioError(f"colorization needs 3-channel (RGB) images, got {channels} channel(s)")


@register_operator("colorize")
class Colorization(LinearOperator):
    """y = w · x over channels (BT.601 luma, y shape (B, 1, H, W)); needs C = 3.

    SVD per pixel: V = orthonormal basis whose first vector is w/|w|, s = |w| on channel 0, 0 on 1 and 2.
    """

    name = "colorize"

    def __init__(self) -> None:
        super().__init__()
        w = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)
        # QR of [w e2 e3] gives an orthonormal basis whose first column is ±w/|w|; fix the sign.
        e2 = torch.tensor([0.0, 1, 0], dtype=torch.float64)
        e3 = torch.tensor([0.0, 0, 1], dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.stack([w, e2, e3], dim=1))
        # first column positive along w; other columns keep orthogonality
        q = q * torch.sign(q[:, :1].T @ w)[0]
        self._w64 = w
        self._q64 = q  # columns are the basis vectors
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _wq(self, t: Tensor) -> tuple[Tensor, Tensor]:
        key = (t.device, t.dtype)
        if key not in self._cache:
            self._cache[key] = (self._w64.to(device=t.device, dtype=t.dtype),
                                self._q64.to(device=t.device, dtype=t.dtype))
        return self._cache[key]

    def _check(self, x: Tensor) -> None:
        check_input(self, x)
        _needs_rgb(x.shape[1])

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        self._check(x)
        w, _ = self._wq(x)
        return torch.einsum("c,bchw->bhw", w, x).unsqueeze(1)

    def A_adjoint(self, y: Tensor, x_shape: Shape | None = None) -> Tensor:  # noqa: N802
        w, _ = self._wq(y)
        return y * w.view(1, 3, 1, 1)

    def A_dagger(self, y: Tensor, x_shape: Shape | None = None, **kwargs: Any) -> Tensor:  # noqa: N802
        # w^T w = |w|^2, so A^† y = w y / |w|^2 (the grey image whose luma is y)
        w, _ = self._wq(y)
        return y * (w / (w @ w)).view(1, 3, 1, 1)

    def input_shape(self, y_shape: tuple[int, ...]) -> Shape:
        return (3, int(y_shape[-2]), int(y_shape[-1]))

    def output_shape(self, x_shape: Shape) -> tuple[int, ...]:
        _needs_rgb(x_shape[0])
        return (1, x_shape[1], x_shape[2])

    def svd(self, x_shape: Shape, device: Device = None, dtype: torch.dtype | None = None) -> SVD:
        _, h, w_ = self.output_shape(x_shape)
        s = torch.zeros(3, h, w_, dtype=dtype or torch.get_default_dtype(), device=device)
        s[0] = float(torch.linalg.norm(self._w64))

        def vt(x: Tensor) -> Tensor:
            _, q = self._wq(x)
            return torch.einsum("ck,bchw->bkhw", q, x).reshape(x.shape[0], -1)

        def v(z: Tensor) -> Tensor:
            _, q = self._wq(z)
            return torch.einsum("ck,bkhw->bchw", q, z.reshape(z.shape[0], 3, h, w_))

        def ut(y: Tensor) -> Tensor:
            z = torch.zeros(y.shape[0], 3, h, w_, device=y.device, dtype=y.dtype)
            z[:, 0] = y[:, 0]
            return z.reshape(y.shape[0], -1)

        def u(z: Tensor) -> Tensor:
            return z.reshape(z.shape[0], 3, h, w_)[:, :1]

        return SVD(s.reshape(-1), vt, v, ut, u)
