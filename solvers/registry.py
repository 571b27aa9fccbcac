"""The solver registry: each solver module registers its function with :func:`register_solver`.

``SOLVERS`` maps names to functions and what they need from the operator, so the CLI, the app and the
benchmark can offer only the solvers that support a task. Registering a solver also makes its signature the
schema of its config (:func:`studio.core.config.register_solver_schema`): the parameter defaults live in the
signature, ``configs/solver/<name>.yaml`` holds only per-task defaults.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from omegaconf import DictConfig

from models.flow_prior import FlowMatchingPrior
from models.loading import as_prior
from studio.core import config
from studio.core.errors import StudioError


@dataclass(frozen=True)
class SolverInfo:
    """A registered solver and what the CLI, the app and the bench say about it.

    ``min_steps``: below it the solver's output is unreliable on the embedded models (measured: the step
    sweeps in ``docs/bench/app-steps``); the app warns there. ``step_cost``: the time of one step in forward
    passes of the model (measured on the emoji bench), for the app's time estimate before a first run."""

    fn: Callable
    needs_linear: bool  # needs A_adjoint / A_dagger
    needs_svd: bool  # needs operator.svd()
    summary: str
    latent: bool = False  # runs on a latent (Stable-Diffusion-style) prior
    title: str = ""  # the human name (the app's solver list)
    min_steps: int = 1
    step_cost: float = 1.0
    baseline: bool = False  # ignores the measurement (listed last, labelled as the baseline)
    noiseless: bool = False  # copies measurement noise into the result (MCG's projection): wants sigma 0
    flow: bool = False  # also runs on a flow-matching (SD3-style) latent prior through its VP view
    needs_prompt: bool = False  # steered by a text description of the solution (the bench passes captions)

    @property
    def takes_prompt(self) -> bool:
        """Whether the solver conditions on a text prompt (a ``prompt`` parameter)."""
        return "prompt" in inspect.signature(self.fn).parameters


SOLVERS: dict[str, SolverInfo] = {}


def register_solver(name: str, *, needs_linear: bool = False, needs_svd: bool = False, latent: bool = False,
                    summary: str, title: str = "", min_steps: int = 1, step_cost: float = 1.0,
                    baseline: bool = False, noiseless: bool = False, flow: bool = False,
                    needs_prompt: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: add the solver function to :data:`SOLVERS` under ``name`` (and its config schema).

    What is registered (and what the decorator returns) is the function wrapped by :func:`accepting_models`:
    its ``prior`` may also be a loaded diffusers pipeline or a model name; its signature is the original's."""

    def register(fn: Callable) -> Callable:
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is registered twice")
        wrapped = accepting_models(fn, latent=latent, flow_ok=flow, name=name)
        SOLVERS[name] = SolverInfo(wrapped, needs_linear, needs_svd, summary, latent, title or name,
                                   min_steps, step_cost, baseline, noiseless, flow, needs_prompt)
        config.register_solver_schema(name, wrapped)
        return wrapped

    return register


def accepting_models(fn: Callable, latent: bool | None, position: int = 2, flow_ok: bool = True,
                     name: str = "") -> Callable:
    """``fn`` with its prior argument (positional ``position``, or the keyword ``prior``) passed through
    :func:`models.loading.as_prior`: a prior is unchanged, a loaded diffusers pipeline is wrapped (same
    modules, no copy), a name / folder / hub id is loaded. ``inspect.signature`` still gives ``fn``'s
    signature (``functools.wraps``), which is the config schema. A flow-matching prior is refused with one
    line unless ``flow_ok`` (the solver only uses the VP view: ``predict``, ``encode``, ``decode``)."""

    def checked(obj):
        prior = as_prior(obj, latent=latent)
        if not flow_ok and isinstance(prior, FlowMatchingPrior):
            able = [k for k, info in SOLVERS.items() if info.flow] if name in SOLVERS else []
            raise StudioError(f"{name} does not run on a flow-matching (Stable Diffusion 3 style) model"
                              + (f"; solvers that do: {', '.join(able)}" if able else ""))
        return prior

    @functools.wraps(fn)
    def with_prior(*args, **kwargs):
        if len(args) > position:
            args = (*args[:position], checked(args[position]), *args[position + 1:])
        elif "prior" in kwargs:
            kwargs["prior"] = checked(kwargs["prior"])
        return fn(*args, **kwargs)

    return with_prior


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
