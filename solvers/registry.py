"""The solver registry: each solver module registers its function with :func:`register_solver`.

``SOLVERS`` maps names to functions and what they need from the operator, so the CLI, the app and the
benchmark can offer only the solvers that support a task. Registering a solver also makes its signature the
schema of its config (:func:`studio.core.config.register_solver_schema`): the parameter defaults live in the
signature, ``configs/solver/<name>.yaml`` holds only per-task defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from omegaconf import DictConfig

from studio.core import config
from studio.core.errors import StudioError


@dataclass(frozen=True)
class SolverInfo:
    fn: Callable
    needs_linear: bool  # needs A_adjoint / A_dagger
    needs_svd: bool  # needs operator.svd()
    summary: str
    latent: bool = False  # runs on a latent (Stable-Diffusion-style) prior


SOLVERS: dict[str, SolverInfo] = {}


def register_solver(name: str, *, needs_linear: bool = False, needs_svd: bool = False, latent: bool = False,
                    summary: str) -> Callable[[Callable], Callable]:
    """Decorator: add the solver function to :data:`SOLVERS` under ``name`` (and its config schema)."""

    def register(fn: Callable) -> Callable:
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is registered twice")
        SOLVERS[name] = SolverInfo(fn, needs_linear, needs_svd, summary, latent)
        config.register_solver_schema(name, fn)
        return fn

    return register


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


def solver_config(name: str, task: str | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Solver ``name``'s params for ``task``: signature defaults ← ``tasks.<task>`` of its YAML ← overrides
    (checked: unknown keys and bad values raise, naming the key). An unknown solver raises as
    :func:`get_solver` does."""
    get_solver(name)
    return config.load_solver(name, task, overrides)
