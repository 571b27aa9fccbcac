"""The inverter registry: each inversion module registers its function with :func:`register_inverter`."""

from __future__ import annotations

from collections.abc import Callable

from solvers.registry import accepting_models
from studio.core.errors import StudioError

#: method → (function, default guidance). Null-text inversion exists to make guided (w = 7.5) editing
#: faithful.
INVERTERS: dict[str, tuple[Callable, float]] = {}

#: inverter arguments the editing workflows set themselves (not ``key=value`` method parameters)
WORKFLOW_ARGS = frozenset({"prompt", "guidance", "strength"})


def register_inverter(name: str, *, default_guidance: float) -> Callable[[Callable], Callable]:
    """Decorator: add the inversion function ``fn(prior, z0, *, prompt, guidance, steps, strength, ...)``
    to :data:`INVERTERS` under ``name``, with the guidance it runs at when none is given. What is registered
    (and returned) accepts a loaded ``StableDiffusionPipeline`` or a model name as ``prior`` too
    (:func:`solvers.registry.accepting_models`)."""

    def register(fn: Callable) -> Callable:
        if name in INVERTERS:
            raise ValueError(f"inversion method {name!r} is registered twice")
        wrapped = accepting_models(fn, latent=True, position=0, flow_ok=False, name=f"{name} inversion")
        INVERTERS[name] = (wrapped, float(default_guidance))
        return wrapped

    return register


def get_inverter(method: str) -> tuple[Callable, float]:
    """``(function, default guidance)`` of inversion ``method``; an unknown one raises, listing the
    methods."""
    if method not in INVERTERS:
        raise StudioError(f"unknown inversion method {method!r} (available: {', '.join(INVERTERS)})")
    return INVERTERS[method]
