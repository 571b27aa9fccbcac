"""Task and solver configs (OmegaConf YAML files) with validated ``key=value`` overrides.

Layout: ``<config_dir>/task/<name>.yaml`` (operator + noise) and ``<config_dir>/solver/<name>.yaml``
with ``params`` (defaults for every task) and optional ``tasks.<task>`` overrides of those params.
An override must name an existing key and match the type of its default (int for int; int or float
for float; ``true``/``false`` for bool; any text for str). Value ranges are checked by the workflows.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from studio.core import paths
from studio.core.errors import StudioError

ENV_CONFIG_DIR = paths.ENV_CONFIG_DIR
_MISSING = object()


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def config_dir() -> Path:
    """The config folder: ``$STUDIO_CONFIG_DIR`` if set, else the shipped ``configs/`` (see
    :mod:`studio.core.paths`)."""
    return paths.config_dir().expanduser()


def _names(kind: str) -> list[str]:
    d = config_dir() / kind
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def list_tasks() -> list[str]:
    """Names of the task configs (file stems, sorted)."""
    return _names("task")


def list_solvers() -> list[str]:
    """Names of the solver configs (file stems, sorted)."""
    return _names("solver")


def require(cond: bool, message: str) -> None:
    """Raise :class:`StudioError` with ``message`` unless ``cond`` holds."""
    if not cond:
        raise StudioError(message)


def to_plain(cfg: Any) -> dict:
    """A config (or mapping) as a plain ``dict`` with interpolations resolved."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, Mapping):
        return {k: to_plain(v) if isinstance(v, (Mapping, DictConfig)) else v for k, v in cfg.items()}
    raise TypeError(f"to_plain expects a DictConfig or mapping, got {type(cfg).__name__}")


def _load_file(kind: str, name: str) -> tuple[DictConfig, Path]:
    valid = _names(kind)
    if name not in valid:
        where = ", ".join(valid) if valid else f"none found in {config_dir() / kind}"
        raise StudioError(f"unknown {kind} '{name}' (valid: {where})")
    d = config_dir() / kind
    path = d / f"{name}.yaml"
    if not path.is_file():
        path = d / f"{name}.yml"
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError, OmegaConf errors, OSError
        raise StudioError(f"cannot read config '{path}': {_one_line(e)}") from e
    if not isinstance(cfg, DictConfig):
        raise StudioError(f"config '{path}' must be a mapping at the top level")
    return cfg, path


def _leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for k in cfg.keys():
        node = cfg._get_node(k)  # no interpolation resolution needed to know the structure
        full = f"{prefix}{k}"
        if isinstance(node, DictConfig) and len(node) > 0:
            keys.extend(_leaf_keys(node, full + "."))
        else:
            keys.append(full)
    return keys


def _convert(key: str, raw: str, default: Any, what: str) -> Any:
    """Parse override text ``raw`` for ``key`` so that it matches the type of ``default``."""

    def bad(expected: str) -> StudioError:
        return StudioError(
            f"bad value '{raw}' for config key '{key}' of {what}: expected {expected} (default {default!r})"
        )

    text = raw.strip()
    if isinstance(default, bool):
        low = text.lower()
        if low not in ("true", "false"):
            raise bad("true or false")
        return low == "true"
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise bad("an integer") from None
    if isinstance(default, float):
        if text.lower() in ("true", "false"):
            raise bad("a number")
        try:
            value = float(text)
        except ValueError:
            raise bad("a number") from None
        if not math.isfinite(value):
            raise bad("a finite number")
        return value
    if isinstance(default, str):
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        return text
    if isinstance(default, (DictConfig, Mapping)):
        raise StudioError(
            f"config key '{key}' of {what} is a group, not a value: set one of its keys ('{key}.<name>=...')"
        )
    # list or null default: parse as YAML
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]  # type: ignore[index]
    except Exception as e:
        raise StudioError(f"bad value '{raw}' for config key '{key}' of {what}: {_one_line(e)}") from e
    if isinstance(default, (ListConfig, list, tuple)) and not isinstance(value, list):
        raise bad("a list like [a, b]")
    return value


def _get(cfg: DictConfig, key: str) -> Any:
    """The current value at dotted ``key`` (None for a ``???`` value), or ``_MISSING``."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return _MISSING
        if OmegaConf.is_missing(node, part):
            return None
        node = node[part]
    return node


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(cfg: DictConfig, overrides: Iterable[str], what: str) -> DictConfig:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (dotted keys for nested values).

    ``what`` names the config in error messages, e.g. ``"solver dps"``. Unknown keys, malformed
    overrides and values whose type does not match the default raise :class:`StudioError`.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out = copy.deepcopy(cfg)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise StudioError(f"malformed override '{item}' for {what}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise StudioError(f"malformed override '{item}' for {what}: empty key")
        default = _default_for(out, key, what)
        _set(out, key, _convert(key, raw, default, what))
    return out


def _default_for(cfg: DictConfig, key: str, what: str) -> Any:
    try:
        default = _get(cfg, key)
    except OmegaConfBaseException as e:
        raise StudioError(f"config key '{key}' of {what} cannot be read: {_one_line(e)}") from e
    if default is _MISSING:
        valid = ", ".join(_leaf_keys(cfg)) or "none"
        raise StudioError(f"unknown config key '{key}' for {what} (valid: {valid})")
    return default


def _check_value(key: str, value: Any, default: Any, what: str) -> Any:
    """Type-check an already parsed YAML value (per-task params) against ``default``."""
    if isinstance(value, (bool, int, float)) or value is None:
        if value is None or isinstance(value, bool):
            text = {None: "null", True: "true", False: "false"}[value]
        else:
            text = repr(value)
        if isinstance(default, str):
            raise StudioError(
                f"bad value '{text}' for config key '{key}' of {what}: expected text (default {default!r})"
            )
        return _convert(key, text, default, what)
    if isinstance(value, str):
        if default is None or isinstance(default, str):
            return value
        return _convert(key, value, default, what)
    if isinstance(default, (ListConfig, list)) or default is None:
        if isinstance(default, (ListConfig, list)) and not isinstance(value, ListConfig):
            raise StudioError(f"bad value for config key '{key}' of {what}: expected a list")
        return value
    raise StudioError(f"bad value for config key '{key}' of {what}: expected a value like {default!r}")


def load_task(name: str, overrides: Iterable[str] = ()) -> DictConfig:
    """The task config ``task/<name>.yaml`` with overrides applied (e.g. ``operator.sigma=2.0``)."""
    cfg, _ = _load_file("task", name)
    return apply_overrides(cfg, overrides, f"task {name}")


def load_solver(name: str, task: str | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Solver params: ``params`` ← ``tasks[task]`` (if present) ← overrides, as one DictConfig."""
    cfg, path = _load_file("solver", name)
    params = cfg.get("params", None)
    if params is None:
        params = OmegaConf.create({})
    if not isinstance(params, DictConfig):
        raise StudioError(f"config '{path}': 'params' must be a mapping")
    params = copy.deepcopy(params)
    what = f"solver {name}"
    tasks = cfg.get("tasks", None)
    if tasks is not None and not isinstance(tasks, DictConfig):
        raise StudioError(f"config '{path}': 'tasks' must be a mapping of task name to params")
    if task is not None and tasks is not None and task in tasks:
        per_task = tasks[task]
        if per_task is not None:
            if not isinstance(per_task, DictConfig):
                raise StudioError(f"config '{path}': 'tasks.{task}' must be a mapping of params")
            where = f"{what} (tasks.{task} in {path})"
            for key, value in flatten(per_task).items():
                default = _default_for(params, key, where)
                _set(params, key, _check_value(key, value, default, where))
    return apply_overrides(params, overrides, what)


def flatten(cfg: DictConfig, prefix: str = "") -> dict[str, Any]:
    """Leaf values by dotted key (``operator.sigma``)."""
    out: dict[str, Any] = {}
    for k in cfg.keys():
        v = cfg[k]
        if isinstance(v, DictConfig) and len(v) > 0:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


__all__ = [
    "ENV_CONFIG_DIR",
    "apply_overrides",
    "config_dir",
    "list_solvers",
    "list_tasks",
    "load_solver",
    "load_task",
    "require",
    "to_plain",
]


def parse_key_values(items) -> dict:
    """``["a=1", "b=[2,3]", "c=text"]`` → ``{"a": 1, "b": (2, 3), "c": "text"}`` (JSON values, else strings)."""
    import json

    out = {}
    for item in items:
        if "=" not in item:
            raise StudioError(f"override '{item}' is not key=value")
        key, value = item.split("=", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out
