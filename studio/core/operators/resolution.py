"""Super-resolution: the measurement is a downsampled image (block means or antialiased bicubic)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from studio.core.errors import StudioError
from studio.core.operators.base import Tensor, as_int
from studio.core.operators.registry import register_operator
from studio.core.operators.separable import SeparableOperator


@register_operator("super_resolution")
class SuperResolution(SeparableOperator):
    """Downsampling y = D_h X D_w^T by ``factor`` in {2, 4, 8}; rows of D sum to 1.

    avgpool: block means, m = ceil(n / f) (a partial last block is averaged over the pixels it has).
    bicubic: D = torch's antialiased bicubic resize (align_corners=False) applied to I_n, m = n // f.
    ``svd_threshold`` (default 3e-2, DDRM's for its bicubic operator): 1-D singular values below it (× the
    largest) are unobserved; block means have none that small.
    """

    name = "super_resolution"
    FACTORS = (2, 4, 8)
    MODES = ("avgpool", "bicubic")

    DEFAULT_SVD_THRESHOLD = 3e-2

    def __init__(self, factor: int = 4, mode: str = "avgpool", svd_threshold: float | None = None) -> None:
        super().__init__(svd_threshold)
        f = as_int("super_resolution factor", factor)
        if f not in self.FACTORS:
            raise StudioError(f"super_resolution factor must be one of {self.FACTORS}, got {factor!r}")
        if mode not in self.MODES:
            raise StudioError(f"super_resolution mode must be one of {self.MODES}, got {mode!r}")
        self.factor, self.mode = f, mode

    def out_size(self, n: int) -> int:
        if self.mode == "avgpool":
            return -(-n // self.factor)
        if n < self.factor:
            raise StudioError(f"bicubic x{self.factor} super-resolution needs images of at least "
                              f"{self.factor} pixels per side, got {n}")
        return n // self.factor

    def in_size(self, m: int) -> int:
        return m * self.factor

    def matrix_1d(self, n: int, axis: int) -> Tensor:
        m = self.out_size(n)
        if self.mode == "avgpool":
            d = torch.zeros(m, n, dtype=torch.float64)
            block = torch.arange(n) // self.factor
            d[block, torch.arange(n)] = 1.0
            return d / d.sum(dim=1, keepdim=True)
        # resize I_n (an n×n image) to m×n: rows are resized, columns left alone (n -> n is exact), giving D.
        # (Resizing e_k as n×1 images instead is wrong: torch's antialiased path mishandles width-1 inputs.)
        eye = torch.eye(n, dtype=torch.float64)[None, None]
        d = F.interpolate(eye, size=(m, n), mode="bicubic", antialias=True, align_corners=False)
        return d[0, 0].contiguous()

    def params(self) -> dict:
        return {"factor": self.factor, "mode": self.mode, "svd_threshold": self.svd_threshold}
