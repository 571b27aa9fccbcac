"""Solver library: one module per method, each a plain function ``solver(y, operator, prior, **params)``.

``SOLVERS`` maps names to functions and what they need from the operator, so the CLI, the app and the
benchmark can offer only the solvers that support a task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from solvers.cdim import cdim
from solvers.common import SolveResult
from solvers.ddim import ddim
from solvers.ddrm import ddrm
from solvers.dps import dps
from solvers.latent_dps import latent_dps
from solvers.mcg import mcg
from solvers.p2l import p2l
from solvers.psld import psld
from studio.core.errors import StudioError


@dataclass(frozen=True)
class SolverInfo:
    fn: Callable[..., SolveResult]
    needs_linear: bool  # needs A_adjoint / A_dagger
    needs_svd: bool  # needs operator.svd()
    summary: str
    latent: bool = False  # runs on a latent (Stable-Diffusion-style) prior


SOLVERS: dict[str, SolverInfo] = {
    "ddim": SolverInfo(ddim, False, False, "unconditional DDIM sample (ignores y): the no-guidance baseline"),
    "dps": SolverInfo(dps, False, False, "Diffusion Posterior Sampling (official unsquared-norm rule)"),
    "mcg": SolverInfo(mcg, True, False, "Manifold Constrained Gradient: DPS step + projection (noiseless y)"),
    "cdim": SolverInfo(cdim, True, False, "Constrained DIM: DDIM with residual-band projections"),
    "ddrm": SolverInfo(ddrm, True, True, "Denoising Diffusion Restoration Models (operators with an SVD)"),
    "latent-dps": SolverInfo(latent_dps, False, False, "DPS on a latent prior, gradient through the decoder",
                             latent=True),
    "psld": SolverInfo(psld, True, False, "Posterior Sampling with Latent Diffusion (DPS + gluing)", latent=True),
    "p2l": SolverInfo(p2l, False, False, "Prompt-tuning latent DPS + encoder-range projection", latent=True),
}


def get_solver(name: str) -> SolverInfo:
    try:
        return SOLVERS[name]
    except KeyError:
        raise StudioError(f"unknown solver {name!r} (available: {', '.join(SOLVERS)})") from None


def supports(name: str, operator, x_shape: tuple[int, int, int] | None = None) -> bool:
    """Whether solver ``name`` can run on ``operator`` (SVD checked for ``x_shape`` when given)."""
    info = get_solver(name)
    if info.needs_linear and not getattr(operator, "linear", False):
        return False
    if info.needs_svd:
        return x_shape is not None and operator.svd(tuple(x_shape)) is not None
    return True


__all__ = ["SOLVERS", "SolverInfo", "SolveResult", "get_solver", "supports", "cdim", "ddim", "ddrm", "dps", "mcg",
           "latent_dps", "psld", "p2l"]
