"""The one operator registry: name → class, filled by :func:`register_operator` where each class is defined.

:func:`make_operator` builds any registered operator from its name and parameters (as ``params()`` and
``tensors()`` give them back). :mod:`studio.core.tasks` adds the mask-building inpainting variants of
``inpaint`` on top (``inpaint_box``, ``inpaint_random``, ``inpaint_mask``), built from a task config.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from studio.core.errors import StudioError
from studio.core.operators.base import ComposedOperator, FunctionOperator, Identity, Operator

OPERATORS: dict[str, type] = {}

_Op = TypeVar("_Op", bound=type)


def register_operator(name: str) -> Callable[[_Op], _Op]:
    """Class decorator: ``@register_operator("gaussian_blur")`` makes the class buildable by that name."""

    def register(cls: _Op) -> _Op:
        taken = OPERATORS.get(name)
        # a reloaded module registers a new class object under the same qualified name: that is no clash
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"operator {name!r} is already registered to {taken.__qualname__}")
        OPERATORS[name] = cls
        return cls

    return register


# the generic operators of base.py; each family module registers its own operators
register_operator("denoise")(Identity)
register_operator("composed")(ComposedOperator)
register_operator("custom")(FunctionOperator)


def make_operator(name: str, **params: Any) -> Operator:
    """Build a registered operator: ``make_operator("gaussian_blur", kernel_size=61, sigma=3.0)``."""
    if name not in OPERATORS:
        raise StudioError(f"unknown operator {name!r}; known: {', '.join(sorted(OPERATORS))}")
    if name == "composed":
        return _make_composed(params)
    cls = OPERATORS[name]
    accepted = inspect.signature(cls.__init__).parameters
    for key in params:
        if key not in accepted or key == "self":
            known = [p for p in accepted if p != "self"]
            raise StudioError(f"unknown parameter {key!r} for operator {name!r}; accepted: {known}")
    return cls(**params)


def _make_composed(params: dict[str, Any]) -> Operator:
    """``composed``: outer/inner are operators or ``{'name': ..., <params>}``.

    Their large tensors come as ``outer.<key>`` / ``inner.<key>`` parameters (see ``Operator.tensors``).
    """
    outer, inner = params.pop("outer", None), params.pop("inner", None)
    unknown = [k for k in params if not k.startswith(("outer.", "inner."))]
    if unknown:
        raise StudioError(f"unknown parameter {unknown[0]!r} for operator 'composed'")
    return ComposedOperator(_composed_part("outer", outer, params), _composed_part("inner", inner, params))


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
