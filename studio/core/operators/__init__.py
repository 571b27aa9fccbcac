"""Forward operators ``y = A(x)`` for inverse problems, acting on batches of [0, 1] images ``(B, C, H, W)``.

Every linear operator has an exact adjoint ``A_adjoint`` and a pseudo-inverse ``A_dagger``; most also expose a
singular value decomposition (:class:`SVD`) so spectral solvers (DDRM, DDNM, ...) can work in the spectral
basis. Per-size matrices are built lazily in float64 on the CPU, then cached per ``(n, device, dtype)``.

Operator masks mark what is **observed** (1 = observed); see :mod:`studio.core.conventions`.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from studio.core.errors import StudioError

Tensor = torch.Tensor
Shape = tuple[int, int, int]

# Above this many entries a mask/kernel is not put into params() (JSON) but returned by tensors().
_MAX_LIST_ENTRIES = 4096


# ----------------------------------------------------------------------------------------------------------
# validation helpers: raise where the bad value enters, with the value in a one-line message
# ----------------------------------------------------------------------------------------------------------


def _as_int(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise StudioError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _as_float(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise StudioError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise StudioError(f"{what} must be finite, got {value!r}")
    return value


def _odd_size(what: str, value: Any) -> int:
    n = _as_int(what, value)
    if n < 1 or n % 2 == 0:
        raise StudioError(f"{what} must be a positive odd integer, got {value!r}")
    return n


def _as_tensor(what: str, value: Any) -> Tensor:
    """Accept a tensor, numpy array or nested list (as params() gives it back) and return a float64 tensor."""
    if isinstance(value, Tensor):
        t = value.detach().to("cpu")
    else:
        try:
            t = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as exc:
            raise StudioError(f"{what} must be an array of numbers, got {type(value).__name__}") from exc
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise StudioError(f"{what} must be numeric, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise StudioError(f"{what} contains NaN or Inf")
    return t


def _check_input(op: Operator, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise StudioError(f"{op.name}: expected a (B, C, H, W) tensor, got {shape}")


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
# SVD container
# ----------------------------------------------------------------------------------------------------------


class SVD:
    """``A = U diag(s) V^T`` with the N = C*H*W input coordinates flattened per sample.

    ``A x = U(s * Vt(x))``, ``A^T y = V(s * Ut(y))``, ``A^† y = V(Ut(y) / s)`` on ``s > threshold``.
    The four maps adapt to the device/dtype of their argument; ``s`` is on the device/dtype asked for.
    """

    def __init__(
        self,
        s: Tensor,
        vt: Callable[[Tensor], Tensor],
        v: Callable[[Tensor], Tensor],
        ut: Callable[[Tensor], Tensor],
        u: Callable[[Tensor], Tensor],
    ) -> None:
        self.s = s
        self._vt, self._v, self._ut, self._u = vt, v, ut, u

    def Vt(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N) spectral coordinates ``V^T x``."""
        return self._vt(x)

    def V(self, z: Tensor) -> Tensor:
        """(B, N) -> (B, C, H, W): ``V z``."""
        return self._v(z)

    def Ut(self, y: Tensor) -> Tensor:
        """y -> (B, N): ``U^T y`` placed at the spectral positions (0 where s_i == 0)."""
        return self._ut(y)

    def U(self, z: Tensor) -> Tensor:
        """(B, N) -> y shape: ``U z`` (entries at s_i == 0 ignored)."""
        return self._u(z)


def _diagonal_svd(s: Tensor, x_shape: Shape) -> SVD:
    """SVD with V = U = I (identity, inpainting): spectral coordinates are the pixels themselves."""
    mask = s != 0

    def flat(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)

    def unflat(z: Tensor) -> Tensor:
        return z.reshape(z.shape[0], *x_shape)

    def ut(y: Tensor) -> Tensor:
        return flat(y) * mask.to(y.device)

    def u(z: Tensor) -> Tensor:
        return unflat(z * mask.to(z.device))

    return SVD(s, flat, unflat, ut, u)


# ----------------------------------------------------------------------------------------------------------
# base classes
# ----------------------------------------------------------------------------------------------------------


class Operator(torch.nn.Module):
    """y = A(x), possibly nonlinear."""

    linear: bool = False
    name: str = "operator"

    def A(self, x: Tensor) -> Tensor:  # noqa: N802 (the maths name)
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.A(x)

    def observed(self, y: Tensor) -> Tensor:
        """Zero the parts of y that carry no measurement (identity except for inpainting)."""
        return y

    def output_shape(self, x_shape: Shape) -> tuple[int, ...]:
        """Shape (without batch) of A(x) for an input of shape (C, H, W)."""
        with torch.no_grad():
            return tuple(self.A(torch.zeros(1, *x_shape, device=self._device())).shape[1:])

    def num_measurements(self, x_shape: Shape) -> int:
        """Count of real measurements per sample for an input of shape (C, H, W)."""
        return int(math.prod(self.output_shape(tuple(x_shape))))

    def params(self) -> dict:
        """JSON-serialisable parameters: ``make_operator(self.name, **self.params(), **self.tensors())``."""
        return {}

    def tensors(self) -> dict[str, Tensor]:
        """Large tensors (masks, kernels) that do not fit in params(); saved separately, given back as kwargs."""
        return {}

    def __matmul__(self, other: Operator) -> ComposedOperator:
        """(A @ B)(x) = A(B(x))."""
        if not isinstance(other, Operator):
            return NotImplemented
        return ComposedOperator(self, other)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params().items() if not isinstance(v, (list, dict)))

    def _device(self) -> torch.device:
        for t in self.buffers():
            return t.device
        return torch.device("cpu")


class LinearOperator(Operator):
    """Linear y = A x with exact adjoint A^T, pseudo-inverse A^† and (optionally) an SVD."""

    linear = True

    def input_shape(self, y_shape: tuple[int, ...]) -> Shape:
        """Shape (C, H, W) of x for a measurement of shape y_shape (without batch); shape-preserving default."""
        return tuple(y_shape)  # type: ignore[return-value]

    def _x_shape(self, y: Tensor, x_shape: tuple[int, ...] | None) -> Shape:
        if x_shape is not None:
            return tuple(int(n) for n in x_shape[-3:])  # type: ignore[return-value]
        return self.input_shape(tuple(y.shape[1:]))

    def A_adjoint(self, y: Tensor, x_shape: Shape | None = None) -> Tensor:  # noqa: N802
        """A^T y; default: the vector-Jacobian product of A at 0 (exact for a linear A)."""
        shape = self._x_shape(y, x_shape)
        with torch.enable_grad():
            x0 = torch.zeros(y.shape[0], *shape, device=y.device, dtype=y.dtype, requires_grad=True)
            (g,) = torch.autograd.grad(self.A(x0), x0, y)
        return g

    def svd(self, x_shape: Shape, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SVD | None:
        """SVD of A for inputs of shape (C, H, W), or None when there is none (then A_dagger uses CGLS)."""
        return None

    def A_dagger(  # noqa: N802
        self,
        y: Tensor,
        x_shape: Shape | None = None,
        *,
        rcond: float = 1e-6,
        iters: int = 200,
        tol: float = 1e-7,
    ) -> Tensor:
        """Pseudo-inverse A^† y: ``V(Ut(y) / s)`` on ``s > rcond * max(s)``, else CGLS from x = 0."""
        shape = self._x_shape(y, x_shape)
        dec = self.svd(shape, device=y.device, dtype=y.dtype)
        if dec is None:
            return self.cgls(y, shape, iters=iters, tol=tol)
        s = dec.s
        keep = s > rcond * s.max()
        inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
        return dec.V(dec.Ut(y) * inv)

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        """Projection onto {A x = y}: ``x + A^†(y - A x)``."""
        return x + self.A_dagger(y - self.A(x), tuple(x.shape[1:]))

    def cgls(self, y: Tensor, x_shape: Shape, iters: int = 200, tol: float = 1e-7) -> Tensor:
        """Min-norm least squares ``argmin |A x - y|`` by CGLS from x = 0 (stays in range(A^T)), per sample.

        Stops when ``|A^T r| <= tol * |A^T y|`` for every sample.
        """
        b = y.shape[0]

        def dot(u: Tensor, v: Tensor) -> Tensor:
            return (u * v).reshape(b, -1).sum(dim=1)

        def per_sample(v: Tensor, like: Tensor) -> Tensor:
            return v.reshape(b, *([1] * (like.dim() - 1)))

        x = torch.zeros(b, *x_shape, device=y.device, dtype=y.dtype)
        r = y.clone()
        s = self.A_adjoint(r, x_shape)
        p = s
        gamma = dot(s, s)
        stop = (tol**2) * gamma
        for _ in range(iters):
            if bool((gamma <= stop).all()):
                break
            q = self.A(p)
            qq = dot(q, q)
            # converged samples have q = 0: give them a zero step instead of 0/0
            alpha = torch.where(qq > 0, gamma / torch.where(qq > 0, qq, torch.ones_like(qq)), torch.zeros_like(qq))
            x = x + per_sample(alpha, x) * p
            r = r - per_sample(alpha, r) * q
            s = self.A_adjoint(r, x_shape)
            gamma_new = dot(s, s)
            beta = torch.where(gamma > 0, gamma_new / torch.where(gamma > 0, gamma, torch.ones_like(gamma)),
                               torch.zeros_like(gamma))
            p = s + per_sample(beta, p) * p
            gamma = gamma_new
        return x


# ----------------------------------------------------------------------------------------------------------
# composition and user functions
# ----------------------------------------------------------------------------------------------------------


class ComposedOperator(Operator):
    """A = outer ∘ inner, i.e. A(x) = outer(inner(x)); linear (a LinearOperator) iff both parts are."""

    name = "composed"

    def __new__(cls, *args: Any, **kwargs: Any) -> ComposedOperator:
        # pick the linear subclass up front so isinstance(op, LinearOperator) tells the truth;
        # copy/pickle call __new__ without arguments and must get the class they ask for
        parts = list(args[:2]) + [kwargs.get(k) for k in ("outer", "inner")[len(args[:2]):]]
        if cls is ComposedOperator and all(getattr(p, "linear", False) for p in parts) and len(parts) == 2:
            cls = LinearComposedOperator
        return super().__new__(cls)

    def __init__(self, outer: Operator, inner: Operator) -> None:
        super().__init__()
        for part in (outer, inner):
            if not isinstance(part, Operator):
                raise StudioError(f"can only compose operators, got {type(part).__name__}")
        self.outer = outer
        self.inner = inner

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        return self.outer.A(self.inner.A(x))

    def observed(self, y: Tensor) -> Tensor:
        return self.outer.observed(y)

    def output_shape(self, x_shape: Shape) -> tuple[int, ...]:
        return self.outer.output_shape(self.inner.output_shape(x_shape))  # type: ignore[arg-type]

    def num_measurements(self, x_shape: Shape) -> int:
        return self.outer.num_measurements(self.inner.output_shape(x_shape))  # type: ignore[arg-type]

    def params(self) -> dict:
        return {
            "outer": {"name": self.outer.name, **self.outer.params()},
            "inner": {"name": self.inner.name, **self.inner.params()},
        }

    def tensors(self) -> dict[str, Tensor]:
        out = {f"outer.{k}": v for k, v in self.outer.tensors().items()}
        out.update({f"inner.{k}": v for k, v in self.inner.tensors().items()})
        return out


class LinearComposedOperator(ComposedOperator, LinearOperator):
    """Composition of two linear operators: A^T = inner^T outer^T; A^† by CGLS (no SVD)."""

    linear = True

    def input_shape(self, y_shape: tuple[int, ...]) -> Shape:
        return self.inner.input_shape(self.outer.input_shape(y_shape))

    def A_adjoint(self, y: Tensor, x_shape: Shape | None = None) -> Tensor:  # noqa: N802
        mid_shape = self.inner.output_shape(x_shape) if x_shape is not None else None
        return self.inner.A_adjoint(self.outer.A_adjoint(y, mid_shape), x_shape)


class FunctionOperator(Operator):
    """Wraps a user callable ``y = fn(x)`` (possibly nonlinear); only A is available (enough for DPS)."""

    linear = False

    def __init__(self, fn: Callable[[Tensor], Tensor] | None = None, name: str = "custom") -> None:
        super().__init__()
        if not callable(fn):
            raise StudioError(f"FunctionOperator needs a callable fn, got {fn!r}")
        self.fn = fn
        self.name = str(name)

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        return self.fn(x)

    # params() stays {}: a Python callable cannot be rebuilt from JSON.


# ----------------------------------------------------------------------------------------------------------
# simple operators
# ----------------------------------------------------------------------------------------------------------


class Identity(LinearOperator):
    """y = x (denoising); SVD with U = V = I, s = 1."""

    name = "denoise"

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        _check_input(self, x)
        return x

    def A_adjoint(self, y: Tensor, x_shape: Shape | None = None) -> Tensor:  # noqa: N802
        return y

    def A_dagger(self, y: Tensor, x_shape: Shape | None = None, **kwargs: Any) -> Tensor:  # noqa: N802
        return y

    def output_shape(self, x_shape: Shape) -> tuple[int, ...]:
        return tuple(x_shape)

    def svd(self, x_shape: Shape, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SVD:
        s = torch.ones(int(math.prod(x_shape)), device=device, dtype=dtype or torch.get_default_dtype())
        return _diagonal_svd(s, tuple(x_shape))


class Inpainting(LinearOperator):
    """y = m ⊙ x with an observed mask m (1 = observed) of shape (H, W), (1, H, W) or (C, H, W).

    A^T = A^† = A; SVD with U = V = I and s = m broadcast over channels.
    """

    name = "inpaint"

    def __init__(self, mask: Any) -> None:
        super().__init__()
        m = _as_tensor("inpainting mask", mask)
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
        _check_input(self, x)
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

    def svd(self, x_shape: Shape, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SVD:
        probe = torch.zeros(1, *x_shape)
        s = self._mask_for(probe).expand(*x_shape).reshape(-1)
        return _diagonal_svd(s.to(device=device, dtype=dtype or torch.get_default_dtype()), tuple(x_shape))

    def params(self) -> dict:
        if self.mask.numel() <= _MAX_LIST_ENTRIES:
            return {"mask": self.mask.tolist()}
        return {}

    def tensors(self) -> dict[str, Tensor]:
        if self.mask.numel() <= _MAX_LIST_ENTRIES:
            return {}
        return {"mask": self.mask}


# ITU-R BT.601 luma weights; they sum to 1, so a grey image keeps its value.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class Colorization(LinearOperator):
    """y = w · x over channels (BT.601 luma, y shape (B, 1, H, W)); needs C = 3.

    SVD per pixel: V = orthonormal basis whose first vector is w/|w|, s = |w| on channel 0, 0 on 1 and 2.
    """

    name = "colorize"

    def __init__(self) -> None:
        super().__init__()
        w = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)
        # QR of [w e2 e3] gives an orthonormal basis whose first column is ±w/|w|; fix the sign.
        q, _ = torch.linalg.qr(torch.stack([w, torch.tensor([0.0, 1, 0], dtype=torch.float64),
                                            torch.tensor([0.0, 0, 1], dtype=torch.float64)], dim=1))
        q = q * torch.sign(q[:, :1].T @ w)[0]  # first column positive along w; other columns keep orthogonality
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
        _check_input(self, x)
        if x.shape[1] != 3:
            raise StudioError(f"colorization needs 3-channel (RGB) images, got {x.shape[1]} channel(s)")

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
        if x_shape[0] != 3:
            raise StudioError(f"colorization needs 3-channel (RGB) images, got {x_shape[0]} channel(s)")
        return (1, x_shape[1], x_shape[2])

    def svd(self, x_shape: Shape, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SVD:
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


# ----------------------------------------------------------------------------------------------------------
# separable operators: y = Mh X Mw^T per channel, SVD from the 1-D SVDs (Kronecker structure)
# ----------------------------------------------------------------------------------------------------------


class SeparableOperator(LinearOperator):
    """y = Mh X Mw^T per channel with 1-D matrices Mh (m_h×n_h, m_h <= n_h) and Mw; A^T y = Mh^T Y Mw.

    SVD: with Mh = Uh diag(sh) Vh^T, spectral coordinates are Vh^T X Vw and S[i, j] = sh[i] sw[j] on the
    top-left m_h×m_w block, 0 elsewhere. Subclasses implement :meth:`matrix_1d`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._mat_cache: dict[tuple, Tensor] = {}
        self._svd_cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        # output size -> last input size seen by A: lets A_adjoint/A_dagger recover a size that does not
        # divide evenly (e.g. 17 -> 9 for SR x2) when the caller does not pass x_shape.
        self._size_memo: dict[tuple[int, int], tuple[int, int]] = {}

    # --- to implement -----------------------------------------------------------------------------------
    def matrix_1d(self, n: int, axis: int) -> Tensor:
        """The 1-D matrix (m×n, float64, CPU) acting along an axis of length n (axis -2: rows, -1: columns)."""
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

    def _svd1(self, n: int, axis: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
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
        _check_input(self, x)
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

    def svd(self, x_shape: Shape, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SVD:
        c, h, w = (int(n) for n in x_shape)
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or torch.get_default_dtype()
        m_h, m_w = self.out_size(h), self.out_size(w)

        _, sh, _ = self._svd1(h, -2, device, dtype)
        _, sw, _ = self._svd1(w, -1, device, dtype)
        sh_full = torch.cat([sh, sh.new_zeros(h - m_h)])
        sw_full = torch.cat([sw, sw.new_zeros(w - m_w)])
        s = torch.outer(sh_full, sw_full).expand(c, h, w).reshape(-1)

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

        return SVD(s, vt, v, ut, u)


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


class GaussianBlur(SeparableOperator):
    """y = k ∗ x with a separable Gaussian k (sum 1), y = Mh X Mw^T; boundary 'reflect' or 'circular'."""

    name = "gaussian_blur"
    BOUNDARIES = ("reflect", "circular")

    def __init__(self, kernel_size: int = 61, sigma: float = 3.0, boundary: str = "reflect") -> None:
        super().__init__()
        self.kernel_size = _odd_size("gaussian_blur kernel_size", kernel_size)
        self.sigma = _as_float("gaussian_blur sigma", sigma)
        if self.sigma <= 0:
            raise StudioError(f"gaussian_blur sigma must be > 0, got {sigma!r}")
        if boundary not in self.BOUNDARIES:
            raise StudioError(f"gaussian_blur boundary must be one of {self.BOUNDARIES}, got {boundary!r}")
        self.boundary = boundary
        self.taps = gaussian_kernel_1d(self.kernel_size, self.sigma)

    def matrix_1d(self, n: int, axis: int) -> Tensor:
        return correlation_matrix_1d(self.taps, n, self.boundary)

    def params(self) -> dict:
        return {"kernel_size": self.kernel_size, "sigma": self.sigma, "boundary": self.boundary}


class SuperResolution(SeparableOperator):
    """Downsampling y = D_h X D_w^T by ``factor`` in {2, 4, 8}; rows of D sum to 1.

    avgpool: block means, m = ceil(n / f) (a partial last block is averaged over the pixels it has).
    bicubic: D = torch's antialiased bicubic resize (align_corners=False) applied to I_n, m = n // f.
    """

    name = "super_resolution"
    FACTORS = (2, 4, 8)
    MODES = ("avgpool", "bicubic")

    def __init__(self, factor: int = 4, mode: str = "avgpool") -> None:
        super().__init__()
        f = _as_int("super_resolution factor", factor)
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
        return {"factor": self.factor, "mode": self.mode}


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
    size = _odd_size("motion kernel size", size)
    intensity = _as_float("motion blur intensity", intensity)
    if not 0.0 <= intensity <= 1.0:
        raise StudioError(f"motion blur intensity must be in [0, 1], got {intensity!r}")
    if size == 1:
        return torch.ones(1, 1, dtype=dtype)
    steps, momentum = 64, 0.7
    g = generator
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

    # 16 samples per step, uniform in time: density ∝ exposure time at each place
    t = np.linspace(0.0, steps, 16 * steps + 1)
    path = np.stack([np.interp(t, np.arange(steps + 1), pts[:, i]) for i in range(2)], axis=1)
    path -= path.mean(axis=0)
    extent = np.abs(path).max()
    radius = (size - 1) / 2 * (0.5 + 0.5 * intensity)
    if extent > 0:
        path *= radius / extent
    path += (size - 1) / 2  # kernel centre; coordinates stay within [0, size-1]

    kernel = np.zeros((size, size))
    x0 = np.clip(np.floor(path[:, 0]).astype(int), 0, size - 2)
    y0 = np.clip(np.floor(path[:, 1]).astype(int), 0, size - 2)
    fx, fy = path[:, 0] - x0, path[:, 1] - y0
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        np.add.at(kernel, (y0 + dy, x0 + dx), wgt)
    kernel = torch.from_numpy(np.clip(kernel, 0.0, None)).to(dtype)
    return kernel / kernel.sum()


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
            self.kernel_size = _odd_size("motion_blur kernel_size", kernel_size)
            self.intensity = _as_float("motion_blur intensity", intensity)
            self.seed = _as_int("motion_blur seed", seed)
            g = torch.Generator().manual_seed(self.seed)
            k = motion_kernel(self.kernel_size, self.intensity, g, dtype=torch.float64)
            self._explicit = False
        else:
            k = _as_tensor("motion_blur kernel", kernel)
            if k.dim() != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
                raise StudioError(f"motion_blur kernel must be 2-D with odd sides, got shape {tuple(k.shape)}")
            if k.sum() <= 0:
                raise StudioError(f"motion_blur kernel must have a positive sum, got {k.sum().item():g}")
            k = k / k.sum()
            self.kernel_size, self.intensity, self.seed = int(k.shape[0]), None, None
            self._explicit = True
        self.register_buffer("kernel", k.to(torch.float32))
        self._k64 = k
        self._cache: dict[tuple, Tensor] = {}

    def _weight(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in self._cache:
            # conv2d correlates; flipping the kernel makes it a true convolution
            self._cache[key] = torch.flip(self._k64, dims=(0, 1)).to(device=x.device, dtype=x.dtype)[None, None]
        c = x.shape[1]
        return self._cache[key].expand(c, 1, -1, -1)

    def _pad_index(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        rh, rw = self._k64.shape[0] // 2, self._k64.shape[1] // 2
        ih = reflect_index(torch.arange(-rh, h + rh, device=device), h)
        iw = reflect_index(torch.arange(-rw, w + rw, device=device), w)
        return ih, iw

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        _check_input(self, x)
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
        if self._k64.numel() <= _MAX_LIST_ENTRIES:
            return {"kernel": self._k64.tolist()}
        return {}

    def tensors(self) -> dict[str, Tensor]:
        if self._explicit and self._k64.numel() > _MAX_LIST_ENTRIES:
            return {"kernel": self._k64}
        return {}


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------

OPERATORS: dict[str, type] = {
    "denoise": Identity,
    "inpaint": Inpainting,
    "gaussian_blur": GaussianBlur,
    "motion_blur": MotionBlur,
    "super_resolution": SuperResolution,
    "colorize": Colorization,
    "composed": ComposedOperator,
    "custom": FunctionOperator,
}


def _composed_part(which: str, spec: Any, tensors: dict[str, Any]) -> Operator:
    if isinstance(spec, Operator):
        return spec
    if not isinstance(spec, dict) or "name" not in spec:
        raise StudioError(f"composed operator needs {which}={{'name': ..., <params>}}, got {spec!r}")
    spec = dict(spec)
    name = spec.pop("name")
    prefix = f"{which}."
    spec.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return make_operator(name, **spec)


def make_operator(name: str, **params: Any) -> Operator:
    """Build a registered operator: ``make_operator("gaussian_blur", kernel_size=61, sigma=3.0)``."""
    if name not in OPERATORS:
        raise StudioError(f"unknown operator {name!r}; known: {', '.join(sorted(OPERATORS))}")
    if name == "composed":
        outer, inner = params.pop("outer", None), params.pop("inner", None)
        unknown = [k for k in params if not k.startswith(("outer.", "inner."))]
        if unknown:
            raise StudioError(f"unknown parameter {unknown[0]!r} for operator 'composed'")
        return ComposedOperator(_composed_part("outer", outer, params), _composed_part("inner", inner, params))
    cls = OPERATORS[name]
    accepted = inspect.signature(cls.__init__).parameters
    for key in params:
        if key not in accepted or key == "self":
            known = [p for p in accepted if p != "self"]
            raise StudioError(f"unknown parameter {key!r} for operator {name!r}; accepted: {known}")
    return cls(**params)


def adjointness_error(op: LinearOperator, x_shape: Shape, dtype: torch.dtype = torch.float64, seed: int = 0) -> float:
    """|<A x, y> - <x, A^T y>| / (|<A x, y>| + eps) for random x, y (2 samples)."""
    g = torch.Generator().manual_seed(seed)
    device = op._device()
    x = torch.rand(2, *x_shape, generator=g, dtype=dtype).to(device)
    ax = op.A(x)
    y = torch.randn(ax.shape, generator=g, dtype=dtype).to(device)
    lhs = (ax * y).sum()
    rhs = (x * op.A_adjoint(y, tuple(x_shape))).sum()
    return float((lhs - rhs).abs() / (lhs.abs() + 1e-30))
