"""The operator base classes, the SVD container, composition, and the argument checks every family uses.

:class:`Operator` is ``y = A(x)`` (possibly nonlinear); :class:`LinearOperator` adds the exact adjoint
``A_adjoint``, the pseudo-inverse ``A_dagger`` (from :meth:`LinearOperator.svd`, or CGLS where there is no
SVD) and the projection onto ``{A x = y}``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import numpy as np
import torch

from studio.core.errors import StudioError

Tensor = torch.Tensor
Shape = tuple[int, int, int]

# Above this many entries a mask/kernel is not put into params() (JSON) but returned by tensors().
MAX_LIST_ENTRIES = 4096


# ----------------------------------------------------------------------------------------------------------
# validation helpers: raise where the bad value enters, with the value in a one-line message
# ----------------------------------------------------------------------------------------------------------


def as_int(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise StudioError(f"{what} must be an integer, got {value!r}")
    return int(value)


def as_float(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise StudioError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise StudioError(f"{what} must be finite, got {value!r}")
    return value


def odd_size(what: str, value: Any) -> int:
    n = as_int(what, value)
    if n < 1 or n % 2 == 0:
        raise StudioError(f"{what} must be a positive odd integer, got {value!r}")
    return n


_NUMERIC_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def as_tensor(what: str, value: Any) -> Tensor:
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
    if not (t.is_floating_point() or t.dtype in _NUMERIC_DTYPES):
        raise StudioError(f"{what} must be numeric, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise StudioError(f"{what} contains NaN or Inf")
    return t


def check_input(op: Operator, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise StudioError(f"{op.name}: expected a (B, C, H, W) tensor, got {shape}")


def _ratio_or_zero(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (no 0/0 on the way)."""
    positive = den > 0
    safe_den = torch.where(positive, den, torch.ones_like(den))
    return torch.where(positive, num / safe_den, torch.zeros_like(den))


# ----------------------------------------------------------------------------------------------------------
# SVD container
# ----------------------------------------------------------------------------------------------------------


class SVD:
    """``A = U diag(s) V^T`` with the N = C*H*W input coordinates flattened per sample.

    ``A x = U(s * Vt(x))``, ``A^T y = V(s * Ut(y))``, ``A^† y = V(Ut(y) / s)`` on the observed components.

    ``s`` holds the exact singular values; ``observed`` (bool, N) marks the components a solver may divide
    by: ``s > 0`` unless the operator sets a threshold below which a singular value counts as unobserved
    (DDRM's official code zeroes 1-D blur/bicubic singular values below 3e-2: in float32 ``Uᵀy / s`` on the
    ~1e-32 tail of a σ=3 Gaussian blur amplifies round-off to ~1e20). The four maps adapt to the
    device/dtype of their argument; ``s`` is on the device/dtype asked for.
    """

    def __init__(
        self,
        s: Tensor,
        vt: Callable[[Tensor], Tensor],
        v: Callable[[Tensor], Tensor],
        ut: Callable[[Tensor], Tensor],
        u: Callable[[Tensor], Tensor],
        observed: Tensor | None = None,
    ) -> None:
        self.s = s
        self.observed = (s > 0) if observed is None else observed.to(device=s.device, dtype=torch.bool)
        if self.observed.shape != s.shape:
            raise StudioError(f"SVD: observed mask has shape {tuple(self.observed.shape)}, "
                              f"s has {tuple(s.shape)}")
        self._vt, self._v, self._ut, self._u = vt, v, ut, u

    def usable(self, rcond: float | None = None, threshold: bool = True) -> Tensor:
        """The components it is safe to divide by: ``s > rcond · max(s)``, and observed (above the
        operator's threshold) unless ``threshold=False``; ``rcond`` defaults to :func:`default_rcond` of
        ``s``'s dtype (a 1e-32 singular value is "nonzero" in float32)."""
        if rcond is None:
            rcond = default_rcond(self.s.dtype, self.s.numel())
        above = self.s > rcond * self.s.max()
        return above & self.observed if threshold else above

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


def default_rcond(dtype: torch.dtype, n: int) -> float:
    """The relative cut-off below which ``A_dagger`` drops a singular value: eps(dtype) · sqrt(n).

    Round-off in ``Ut(y)`` is about eps · sqrt(n) · ‖y‖ spread over n components, so dividing by smaller
    singular values returns noise, not signal (1.3e-5 for float32 at 3×64×64, 2.5e-14 for float64).
    """
    return float(torch.finfo(dtype).eps * math.sqrt(max(n, 1)))


def diagonal_svd(s: Tensor, x_shape: Shape) -> SVD:
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
        """JSON-serialisable parameters.

        ``make_operator(self.name, **self.params(), **self.tensors())`` rebuilds the operator.
        """
        return {}

    def tensors(self) -> dict[str, Tensor]:
        """Large tensors (masks, kernels) that do not fit in params().

        Saved separately and given back to make_operator as keyword arguments.
        """
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


Device = torch.device | str | None


class LinearOperator(Operator):
    """Linear y = A x with exact adjoint A^T, pseudo-inverse A^† and (optionally) an SVD."""

    linear = True

    def input_shape(self, y_shape: tuple[int, ...]) -> Shape:
        """Shape (C, H, W) of x for a measurement of shape y_shape (without batch).

        The default preserves the shape.
        """
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

    def svd(self, x_shape: Shape, device: Device = None, dtype: torch.dtype | None = None) -> SVD | None:
        """SVD of A for inputs of shape (C, H, W), or None when there is none (then A_dagger uses CGLS)."""
        return None

    def A_dagger(  # noqa: N802
        self,
        y: Tensor,
        x_shape: Shape | None = None,
        *,
        rcond: float | None = None,
        observed_only: bool = False,
        iters: int = 200,
        tol: float = 1e-7,
    ) -> Tensor:
        """Pseudo-inverse A^† y: ``V(Ut(y) / s)`` on ``s > rcond · max(s)``, else CGLS from x = 0.

        ``rcond`` defaults to :func:`default_rcond` of y's dtype (eps · sqrt(N)): float32 round-off is
        amplified at most ~1/(eps sqrt N) (a fixed 1e-6 let it grow 1e6-fold on a σ=3 blur).
        ``observed_only`` also drops the components below the operator's ``svd_threshold`` (DDRM's rule): a
        regularised inverse, no longer a right inverse of A.
        """
        shape = self._x_shape(y, x_shape)
        dec = self.svd(shape, device=y.device, dtype=y.dtype)
        if dec is None:
            return self.cgls(y, shape, iters=iters, tol=tol)
        s = dec.s
        keep = dec.usable(rcond) if observed_only else dec.usable(rcond, threshold=False)
        inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
        return dec.V(dec.Ut(y) * inv)

    def project(self, x: Tensor, y: Tensor, observed_only: bool = False) -> Tensor:
        """Projection onto {A x = y}: ``x + A^†(y - A x)`` (onto the observed components' constraints only
        with ``observed_only``, see :meth:`A_dagger`)."""
        return x + self.A_dagger(y - self.A(x), tuple(x.shape[1:]), observed_only=observed_only)

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
            # converged samples have q = 0: give them a zero step instead of 0/0
            alpha = _ratio_or_zero(gamma, dot(q, q))
            x = x + per_sample(alpha, x) * p
            r = r - per_sample(alpha, r) * q
            s = self.A_adjoint(r, x_shape)
            gamma_new = dot(s, s)
            beta = _ratio_or_zero(gamma_new, gamma)
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
# the identity, and the adjoint check
# ----------------------------------------------------------------------------------------------------------


class Identity(LinearOperator):
    """y = x (denoising); SVD with U = V = I, s = 1."""

    name = "denoise"

    def A(self, x: Tensor) -> Tensor:  # noqa: N802
        check_input(self, x)
        return x

    def A_adjoint(self, y: Tensor, x_shape: Shape | None = None) -> Tensor:  # noqa: N802
        return y

    def A_dagger(self, y: Tensor, x_shape: Shape | None = None, **kwargs: Any) -> Tensor:  # noqa: N802
        return y

    def output_shape(self, x_shape: Shape) -> tuple[int, ...]:
        return tuple(x_shape)

    def svd(self, x_shape: Shape, device: Device = None, dtype: torch.dtype | None = None) -> SVD:
        s = torch.ones(int(math.prod(x_shape)), device=device, dtype=dtype or torch.get_default_dtype())
        return diagonal_svd(s, tuple(x_shape))


def adjointness_error(
    op: LinearOperator, x_shape: Shape, dtype: torch.dtype = torch.float64, seed: int = 0
) -> float:
    """|<A x, y> - <x, A^T y>| / (|<A x, y>| + eps) for random x, y (2 samples)."""
    g = torch.Generator().manual_seed(seed)
    device = op._device()
    x = torch.rand(2, *x_shape, generator=g, dtype=dtype).to(device)
    ax = op.A(x)
    y = torch.randn(ax.shape, generator=g, dtype=dtype).to(device)
    lhs = (ax * y).sum()
    rhs = (x * op.A_adjoint(y, tuple(x_shape))).sum()
    return float((lhs - rhs).abs() / (lhs.abs() + 1e-30))
