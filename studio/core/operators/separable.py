"""Separable operators: y = Mh X Mw^T per channel, SVD from the 1-D SVDs (Kronecker structure).

Per-size matrices are built lazily in float64 on the CPU, then cached per ``(n, axis, device, dtype)``.
"""

from __future__ import annotations

import torch

from studio.core.errors import StudioError
from studio.core.operators.base import SVD, Device, LinearOperator, Shape, Tensor, as_float, check_input


class SeparableOperator(LinearOperator):
    """y = Mh X Mw^T per channel with 1-D matrices Mh (m_h×n_h, m_h <= n_h) and Mw; A^T y = Mh^T Y Mw.

    SVD: with Mh = Uh diag(sh) Vh^T, spectral coordinates are Vh^T X Vw and S[i, j] = sh[i] sw[j] on the
    top-left m_h×m_w block, 0 elsewhere. Subclasses implement :meth:`matrix_1d`.

    ``svd_threshold``: a 1-D singular value below ``svd_threshold · max`` of its axis counts as unobserved,
    and so does every 2-D component built from it (``SVD.observed``); DDRM, CDIM's and MCG's projections
    (through ``A_dagger``) only divide by observed ones. This is the official DDRM rule (``ZERO = 3e-2`` on
    the 1-D singular values of its blur and bicubic operators, whose largest 1-D value is 1); ``A`` itself
    stays the exact operator.
    """

    DEFAULT_SVD_THRESHOLD = 0.0

    def __init__(self, svd_threshold: float | None = None) -> None:
        super().__init__()
        if svd_threshold is None:
            svd_threshold = self.DEFAULT_SVD_THRESHOLD
        threshold = as_float(f"{self.name} svd_threshold", svd_threshold)
        if not 0.0 <= threshold < 1.0:
            raise StudioError(f"{self.name} svd_threshold must be in [0, 1), got {svd_threshold!r}")
        self.svd_threshold = threshold
        self._mat_cache: dict[tuple, Tensor] = {}
        self._svd_cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        # output size -> last input size seen by A: lets A_adjoint/A_dagger recover a size that does not
        # divide evenly (e.g. 17 -> 9 for SR x2) when the caller does not pass x_shape.
        self._size_memo: dict[tuple[int, int], tuple[int, int]] = {}

    # --- to implement -----------------------------------------------------------------------------------
    def matrix_1d(self, n: int, axis: int) -> Tensor:
        """The 1-D matrix (m×n, float64, CPU) along an axis of length n (axis -2: rows, -1: columns)."""
        raise NotImplementedError

    def out_size(self, n: int) -> int:
        return n

    def in_size(self, m: int) -> int:
        return m

    # --- cached matrices ------------------------------------------------------------------------------
    def _mat64(self, n: int, axis: int) -> Tensor:
        key = (n, axis, "cpu", torch.float64)
        if key not in self._mat_cache:
            self._mat_cache[key] = self.matrix_1d(n, axis)
        return self._mat_cache[key]

    def _mat(self, n: int, axis: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (n, axis, device, dtype)
        if key not in self._mat_cache:
            self._mat_cache[key] = self._mat64(n, axis).to(device=device, dtype=dtype)
        return self._mat_cache[key]

    def matrices(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(Mh, Mw) for an H×W image on the given device/dtype (built lazily, cached)."""
        return self._mat(h, -2, device, dtype), self._mat(w, -1, device, dtype)

    def _svd1(
        self, n: int, axis: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(U, s, V) of the 1-D matrix, full SVD computed once in float64."""
        key = (n, axis, device, dtype)
        if key not in self._svd_cache:
            base = (n, axis, torch.device("cpu"), torch.float64)
            if base not in self._svd_cache:
                u, s, vh = torch.linalg.svd(self._mat64(n, axis), full_matrices=True)
                self._svd_cache[base] = (u, s, vh.T.contiguous())
            self._svd_cache[key] = tuple(t.to(device=device, dtype=dtype) for t in self._svd_cache[base])
        return self._svd_cache[key]

    # --- operator -------------------------------------------------------------------------------------
    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        check_input(self, x)
        h, w = x.shape[-2:]
        mh, mw = self.matrices(h, w, x.device, x.dtype)
        self._size_memo[(mh.shape[0], mw.shape[0])] = (h, w)
        return mh @ x @ mw.T

    def A_adjoint(self, y: Tensor, x_shape: Shape | None = None) -> Tensor:  # noqa: N802
        c, h, w = self._x_shape(y, x_shape)
        mh, mw = self.matrices(h, w, y.device, y.dtype)
        if (mh.shape[0], mw.shape[0]) != tuple(y.shape[-2:]):
            raise StudioError(
                f"{self.name}: measurement is {y.shape[-2]}x{y.shape[-1]} but an image of {h}x{w} maps to "
                f"{mh.shape[0]}x{mw.shape[0]}"
            )
        return mh.T @ y @ mw

    def input_shape(self, y_shape: tuple[int, ...]) -> Shape:
        c, m_h, m_w = (int(n) for n in y_shape[-3:])
        h, w = self._size_memo.get((m_h, m_w), (self.in_size(m_h), self.in_size(m_w)))
        return (c, h, w)

    def output_shape(self, x_shape: Shape) -> tuple[int, ...]:
        return (x_shape[0], self.out_size(x_shape[1]), self.out_size(x_shape[2]))

    def svd(self, x_shape: Shape, device: Device = None, dtype: torch.dtype | None = None) -> SVD:
        c, h, w = (int(n) for n in x_shape)
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or torch.get_default_dtype()
        m_h, m_w = self.out_size(h), self.out_size(w)

        _, sh, _ = self._svd1(h, -2, device, dtype)
        _, sw, _ = self._svd1(w, -1, device, dtype)
        sh_full = torch.cat([sh, sh.new_zeros(h - m_h)])
        sw_full = torch.cat([sw, sw.new_zeros(w - m_w)])
        s = torch.outer(sh_full, sw_full).expand(c, h, w).reshape(-1)
        kept_h = sh_full > self.svd_threshold * sh.max()
        kept_w = sw_full > self.svd_threshold * sw.max()
        observed = torch.outer(kept_h, kept_w).expand(c, h, w).reshape(-1)

        def factors(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            uh, _, vh = self._svd1(h, -2, t.device, t.dtype)
            uw, _, vw = self._svd1(w, -1, t.device, t.dtype)
            return uh, vh, uw, vw

        def vt(x: Tensor) -> Tensor:
            _, vh, _, vw = factors(x)
            return (vh.T @ x @ vw).reshape(x.shape[0], -1)

        def v(z: Tensor) -> Tensor:
            _, vh, _, vw = factors(z)
            return vh @ z.reshape(z.shape[0], c, h, w) @ vw.T

        def ut(y: Tensor) -> Tensor:
            uh, _, uw, _ = factors(y)
            z = y.new_zeros(y.shape[0], c, h, w)
            z[..., :m_h, :m_w] = uh.T @ y @ uw
            return z.reshape(y.shape[0], -1)

        def u(z: Tensor) -> Tensor:
            uh, _, uw, _ = factors(z)
            return uh @ z.reshape(z.shape[0], c, h, w)[..., :m_h, :m_w] @ uw.T

        return SVD(s, vt, v, ut, u, observed=observed)
