"""Forward operators ``y = A(x)`` for inverse problems, acting on batches of [0, 1] images ``(B, C, H, W)``.

Every linear operator has an exact adjoint ``A_adjoint`` and a pseudo-inverse ``A_dagger``; most also expose a
singular value decomposition (:class:`SVD`) so spectral solvers (DDRM, DDNM, ...) can work in the spectral
basis. Per-size matrices are built lazily in float64 on the CPU, then cached per ``(n, device, dtype)``.

Operator masks mark what is **observed** (1 = observed); see :mod:`studio.core.conventions`.

One module per family, each registering its operators in :data:`OPERATORS` where it defines them:

* :mod:`~studio.core.operators.base`: :class:`Operator`, :class:`LinearOperator`, composition,
  :class:`FunctionOperator`, :class:`Identity` (``denoise``), :class:`SVD`, :func:`adjointness_error`;
* :mod:`~studio.core.operators.registry`: :data:`OPERATORS`, :func:`register_operator`, :func:`make_operator`;
* :mod:`~studio.core.operators.inpainting` (``inpaint``), :mod:`~studio.core.operators.blur`
  (``gaussian_blur``, ``motion_blur``), :mod:`~studio.core.operators.resolution` (``super_resolution``),
  :mod:`~studio.core.operators.colour` (``colorize``); :mod:`~studio.core.operators.separable` holds the
  machinery of the separable ones (``y = Mh X Mw^T``).
"""

from __future__ import annotations

from studio.core.operators.base import (
    SVD,
    ComposedOperator,
    FunctionOperator,
    Identity,
    LinearComposedOperator,
    LinearOperator,
    Operator,
    Shape,
    Tensor,
    adjointness_error,
)
from studio.core.operators.blur import (
    GaussianBlur,
    MotionBlur,
    correlation_matrix_1d,
    gaussian_kernel_1d,
    motion_kernel,
    reflect_index,
)
from studio.core.operators.colour import LUMA_WEIGHTS, Colorization
from studio.core.operators.inpainting import Inpainting
from studio.core.operators.registry import OPERATORS, make_operator, register_operator
from studio.core.operators.resolution import SuperResolution
from studio.core.operators.separable import SeparableOperator

__all__ = [
    "LUMA_WEIGHTS",
    "OPERATORS",
    "SVD",
    "Colorization",
    "ComposedOperator",
    "FunctionOperator",
    "GaussianBlur",
    "Identity",
    "Inpainting",
    "LinearComposedOperator",
    "LinearOperator",
    "MotionBlur",
    "Operator",
    "SeparableOperator",
    "Shape",
    "SuperResolution",
    "Tensor",
    "adjointness_error",
    "correlation_matrix_1d",
    "gaussian_kernel_1d",
    "make_operator",
    "motion_kernel",
    "reflect_index",
    "register_operator",
]
