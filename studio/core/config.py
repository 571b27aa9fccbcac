"""Task and solver configs: OmegaConf schemas, YAML defaults and validated ``key=value`` overrides.

Layout: ``<config_dir>/task/<name>.yaml`` (operator + noise: the task's defaults, whose keys and value
types are its schema) and ``<config_dir>/solver/<name>.yaml`` (``tasks.<task>``: per-task defaults, with
comments naming the official settings they come from). A solver's parameters and their defaults live in
one place, the solver function's signature: :func:`solver_schema` turns its keyword parameters (minus the
run-time ones, :data:`RUNTIME_ARGS`) into an OmegaConf structured schema. ``solvers.registry.register_solver``
registers each solver function here (:func:`register_solver_schema`), so this layer never imports the
solvers. A solver file may still hold ``params:`` (older config folders): a layer under ``tasks``, or, for
a name with no registered function, the schema itself.

Every config is ``OmegaConf.merge(schema, defaults..., overrides)`` in struct mode: OmegaConf rejects
unknown keys and values that do not convert to the key's type, and its errors become one-line
:class:`StudioError` naming the key. Beyond OmegaConf's conversions, as before: a bool takes only
``true``/``false`` (OmegaConf would also take yes/on/1), a float must be finite and not a bool, a string
key takes the override text literally (quotes stripped, not parsed as YAML), and a key whose default is
null or a list is parsed as YAML. Value ranges are checked by the workflows.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, List

from omegaconf import (
    AnyNode,
    BooleanNode,
    DictConfig,
    FloatNode,
    IntegerNode,
    ListConfig,
    OmegaConf,
    StringNode,
)
from omegaconf.errors import OmegaConfBaseException

from studio.core import paths
from studio.core.errors import StudioError

ENV_CONFIG_DIR = paths.ENV_CONFIG_DIR

#: solver arguments set per run by the workflows, not parameters of a config
RUNTIME_ARGS = frozenset({"noise_sigma", "seed", "x_shape", "callback", "progress", "device"})

_SCALAR_TYPES = {"bool": bool, "int": int, "float": float, "str": str}
_SOLVER_FUNCTIONS: dict[str, Callable] = {}


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


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """Leaf values of a DictConfig or a plain mapping by dotted key (``operator.sigma``); an empty group is a
    leaf."""
    out: dict[str, Any] = {}
    for k in cfg.keys():
        v = cfg[k]
        if isinstance(v, Mapping) and len(v) > 0:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------------- schemas


def _field(key: str, value: Any, type_: Any, owner: str) -> tuple:
    if isinstance(value, (Mapping, DictConfig)):
        nested = _dataclass_for(value, {}, f"{owner}_{key}")
        return key, nested, dataclasses.field(default_factory=nested)
    if isinstance(value, (list, tuple, ListConfig)):
        items = list(value)
        return key, List[Any], dataclasses.field(default_factory=lambda: list(items))
    if value is None:
        return key, Any, dataclasses.field(default=None)
    return key, type_ or type(value), dataclasses.field(default=value)


def _dataclass_for(defaults: Mapping, types: Mapping[str, type], name: str) -> type:
    fields = [_field(str(k), v, types.get(k), name) for k, v in defaults.items()]
    return dataclasses.make_dataclass(name, fields)


def schema_from_defaults(defaults: Mapping, types: Mapping[str, type] | None = None,
                         name: str = "Config") -> DictConfig:
    """A struct-mode structured config with the keys, value types and defaults of ``defaults``.

    Nested mappings become nested schemas, a list or tuple a list, ``None`` a key of any type; ``types``
    overrides the type read from a default (a ``float`` parameter whose default is written ``1``)."""
    plain = to_plain(defaults) if isinstance(defaults, DictConfig) else defaults
    return OmegaConf.structured(_dataclass_for(plain, types or {}, name))


def signature_defaults(fn: Callable, exclude: Iterable[str] = RUNTIME_ARGS) -> tuple[dict, dict]:
    """``fn``'s parameters that have defaults (minus ``exclude``): ``({name: default}, {name: type})``.

    Types come from the annotations ``bool``/``int``/``float``/``str`` (strings under postponed evaluation);
    other parameters take the type of their default."""
    skip = set(exclude)
    defaults: dict[str, Any] = {}
    types: dict[str, type] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.default is inspect.Parameter.empty or p.name in skip:
            continue
        defaults[p.name] = p.default
        annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        if annotation in _SCALAR_TYPES:
            types[p.name] = _SCALAR_TYPES[annotation]
    return defaults, types


@functools.lru_cache(maxsize=None)
def solver_schema(fn: Callable, exclude: frozenset[str] = RUNTIME_ARGS) -> DictConfig:
    """The structured schema of a solver's (or inverter's) parameters, from ``fn``'s signature: keyword
    parameters with defaults, minus the run-time arguments ``exclude``. Cached: merge copies, never edit."""
    defaults, types = signature_defaults(fn, exclude)
    return schema_from_defaults(defaults, types, name=f"{fn.__name__}_params")


def register_solver_schema(name: str, fn: Callable) -> None:
    """Make ``fn``'s signature the parameter schema of solver config ``name`` (called by the solver
    registry)."""
    _SOLVER_FUNCTIONS[name] = fn


# ------------------------------------------------------------------------------------------ merging


@dataclasses.dataclass(frozen=True)
class _Setting:
    """One value to set: ``key`` (dotted) and ``value``: override text, or a typed value (file, dict)."""

    key: str
    value: Any
    text: str  # as written, for messages
    from_text: bool


def _value_text(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return value if isinstance(value, str) else repr(value)


def _typed_settings(values: Mapping) -> list[_Setting]:
    items = flatten(values)
    return [_Setting(k, v, _value_text(v), False) for k, v in items.items()]


def _text_settings(overrides: Iterable[str], what: str) -> list[_Setting]:
    if isinstance(overrides, str):
        overrides = [overrides]
    out = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise StudioError(f"malformed override '{item}' for {what}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise StudioError(f"malformed override '{item}' for {what}: empty key")
        out.append(_Setting(key, raw, raw, True))
    return out


def _settings(overrides: Iterable[str] | Mapping, what: str) -> list[_Setting]:
    """``key=value`` strings, or a mapping of typed values (nested or dotted keys)."""
    if isinstance(overrides, (Mapping, DictConfig)):
        return _typed_settings(overrides)
    return _text_settings(overrides, what)


class UnknownKeyError(StudioError):
    """An override or default names a key the schema does not have (``key``; ``valid``: the leaf keys)."""

    def __init__(self, key: str, valid: list[str], what: str):
        super().__init__(f"unknown config key '{key}' for {what} (valid: {', '.join(valid) or 'none'})")
        self.key, self.valid = key, valid


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


def _leaf_node(cfg: DictConfig, key: str, what: str) -> Any:
    """The schema node at dotted ``key``; an unknown key or a group raises, naming the key."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            raise UnknownKeyError(key, _leaf_keys(cfg), what)
        node = node._get_node(part)
    if isinstance(node, DictConfig):
        raise StudioError(
            f"config key '{key}' of {what} is a group, not a value: set one of its keys ('{key}.<name>=...')"
        )
    return node


def _default_of(node: Any) -> Any:
    if isinstance(node, ListConfig):
        return OmegaConf.to_container(node)
    return node._value()


def _expected(node: Any) -> str:
    for kind, text in ((BooleanNode, "true or false"), (IntegerNode, "an integer"), (FloatNode, "a number"),
                       (StringNode, "text"), (ListConfig, "a list like [a, b]")):
        if isinstance(node, kind):
            return text
    return "a value"


def _bad(setting: _Setting, node: Any, what: str, expected: str | None = None) -> StudioError:
    return StudioError(f"bad value '{setting.text}' for config key '{setting.key}' of {what}: "
                       f"expected {expected or _expected(node)} (default {_default_of(node)!r})")


def _parse_yaml(setting: _Setting, what: str) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={setting.value}"]))["v"]  # type: ignore[index]
    except Exception as e:  # yaml / OmegaConf grammar errors
        raise StudioError(
            f"bad value '{setting.text}' for config key '{setting.key}' of {what}: {_one_line(e)}"
        ) from e


def _prepared(setting: _Setting, node: Any, what: str) -> Any:
    """The value to merge for ``setting`` into ``node``: the checks OmegaConf's conversions do not make.

    A value is taken literally: one holding an OmegaConf interpolation (``${...}``) is refused, because
    resolving it would put other config values, or the server's environment (``${oc.env:...}``), into
    a run (and its record) from a prompt or a token typed into the web app."""
    value = setting.value
    if isinstance(value, str) and "${" in value:
        raise StudioError(f"bad value '{setting.text}' for config key '{setting.key}' of {what}: "
                          "'${' (an interpolation) is not allowed in a value")
    if isinstance(node, StringNode):
        if not isinstance(value, str):
            raise _bad(setting, node, what)
        text = value.strip() if setting.from_text else value
        if setting.from_text and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        return text
    if setting.from_text and isinstance(node, (AnyNode, ListConfig)):
        return _parse_yaml(setting, what)
    if isinstance(value, str):
        value = value.strip()
    is_bool_text = isinstance(value, str) and value.lower() in ("true", "false")
    if isinstance(node, BooleanNode):
        if not (isinstance(value, bool) or is_bool_text):
            raise _bad(setting, node, what)
        return value if isinstance(value, bool) else value.lower() == "true"
    if isinstance(node, (IntegerNode, FloatNode)) and (isinstance(value, bool) or is_bool_text):
        raise _bad(setting, node, what)
    return value


def _apply(cfg: DictConfig, settings: list[_Setting], what: str) -> DictConfig:
    """``OmegaConf.merge(cfg, settings)`` with every failure a one-line error naming the key."""
    if not settings:
        return cfg
    nodes = {s.key: _leaf_node(cfg, s.key, what) for s in settings}
    by_key = {s.key: s for s in settings}  # the last setting of a key wins
    update = OmegaConf.create()
    for s in by_key.values():
        OmegaConf.update(update, s.key, _prepared(s, nodes[s.key], what), merge=False)
    try:
        merged = OmegaConf.merge(cfg, update)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        if key in by_key:
            raise _bad(by_key[key], nodes[key], what) from None
        raise StudioError(f"bad override for {what}: {_one_line(e)}") from None
    for key, node in nodes.items():
        if isinstance(node, FloatNode) and not math.isfinite(OmegaConf.select(merged, key)):
            raise _bad(by_key[key], node, what, "a finite number")
    return merged  # type: ignore[return-value]


def _plain_config(cfg: DictConfig) -> DictConfig:
    """An ordinary (non-struct, untyped) DictConfig of the merged values, as the YAML files load."""
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def _schema_of(schema: Any) -> tuple[DictConfig, set[str]]:
    """A schema from a function (its signature), a dataclass (type or instance), a DictConfig or a mapping;
    with the keys whose defaults are tuples (given back as tuples)."""
    if isinstance(schema, DictConfig):
        return schema, set()
    if dataclasses.is_dataclass(schema):
        defaults = {f.name: _dataclass_default(schema, f) for f in dataclasses.fields(schema)}
        defaults = {k: v for k, v in defaults.items() if v is not dataclasses.MISSING}
    elif callable(schema):
        return solver_schema(schema), set()
    elif isinstance(schema, Mapping):
        defaults = dict(schema)
    else:
        raise TypeError(f"cannot build a config schema from {type(schema).__name__}")
    tuples = {k for k, v in defaults.items() if isinstance(v, tuple)}
    return schema_from_defaults(defaults), tuples


def _dataclass_default(obj: Any, f: dataclasses.Field) -> Any:
    if not isinstance(obj, type):
        return getattr(obj, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def merge_overrides(schema: Any, defaults: Mapping | None = None, overrides: Iterable[str] | Mapping = (),
                    what: str = "config", *, unknown: Callable[[str, list[str]], str] | None = None) -> dict:
    """``schema`` ← ``defaults`` ← ``overrides``, checked, as a plain dict: the one override parser.

    ``schema``: a function (its keyword parameters with defaults, minus :data:`RUNTIME_ARGS`), a dataclass
    (type or instance: its fields' defaults or values), a DictConfig or a mapping of defaults. ``defaults``:
    typed values (e.g. a saved run's settings). ``overrides``: ``key=value`` strings or a mapping of typed
    values. ``what`` names the config in errors (``"solver dps"``); ``unknown(key, valid_keys)`` gives the
    message for an unknown key instead of ``unknown config key 'x' for <what> (valid: ...)``. Keys whose
    default is a tuple come back as tuples.
    """
    cfg, tuples = _schema_of(schema)
    try:
        cfg = _apply(cfg, _typed_settings(defaults or {}), what)
        cfg = _apply(cfg, _settings(overrides, what), what)
    except UnknownKeyError as e:
        if unknown is None:
            raise
        raise StudioError(unknown(e.key, e.valid)) from None
    out = OmegaConf.to_container(cfg, resolve=True)
    return {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in out.items()}  # type: ignore


def apply_overrides(cfg: DictConfig, overrides: Iterable[str], what: str) -> DictConfig:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (dotted keys for nested values).

    ``what`` names the config in error messages, e.g. ``"solver dps"``. Unknown keys, malformed
    overrides and values whose type does not match the default raise :class:`StudioError`.
    """
    schema = schema_from_defaults(_readable(cfg, what))
    return _plain_config(_apply(schema, _text_settings(overrides, what), what))


def _readable(cfg: DictConfig, what: str) -> dict:
    try:
        return to_plain(cfg)
    except OmegaConfBaseException as e:  # e.g. an interpolation that does not resolve
        raise StudioError(f"config of {what} cannot be read: {_one_line(e)}") from e


# ------------------------------------------------------------------------------------------- files


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


def load_params(kind: str, name: str, section: str = "params") -> dict:
    """The ``section`` mapping of ``<kind>/<name>.yaml`` as plain values (e.g. ``edit/attention_control``'s
    ``params``: the defaults its owner merges with :func:`merge_overrides`); {} when absent."""
    cfg, path = _load_file(kind, name)
    params = _section(cfg, section, path, "a mapping")
    return {} if params is None else _readable(params, f"{kind} {name}")


def load_task(name: str, overrides: Iterable[str] = ()) -> DictConfig:
    """The task config ``task/<name>.yaml`` with overrides applied (e.g. ``operator.sigma=2.0``); the file's
    keys and value types are the schema."""
    cfg, _ = _load_file("task", name)
    what = f"task {name}"
    schema = schema_from_defaults(_readable(cfg, what))
    return _plain_config(_apply(schema, _text_settings(overrides, what), what))


def _section(cfg: DictConfig, key: str, path: Path, expected: str) -> DictConfig | None:
    value = cfg.get(key, None)
    if value is not None and not isinstance(value, DictConfig):
        raise StudioError(f"config '{path}': '{key}' must be {expected}")
    return value


def _solver_layers(name: str, task: str | None) -> tuple[DictConfig, list[tuple[DictConfig, str]]]:
    """The schema of solver ``name`` and its file's default layers (``params``, ``tasks.<task>``)."""
    cfg, path = _load_file("solver", name)
    what = f"solver {name}"
    params = _section(cfg, "params", path, "a mapping")
    tasks = _section(cfg, "tasks", path, "a mapping of task name to params")
    fn = _SOLVER_FUNCTIONS.get(name)
    if fn is not None:
        schema = solver_schema(fn)
    elif params is not None:
        schema, params = schema_from_defaults(_readable(params, what)), None
    else:
        raise StudioError(f"solver '{name}' has a config ({path}) but no registered solver function "
                          "(import solvers first) and no 'params'")
    layers = [(params, f"{what} (params in {path})")] if params is not None else []
    per_task = tasks.get(task, None) if task is not None and tasks is not None else None
    if per_task is not None:
        if not isinstance(per_task, DictConfig):
            raise StudioError(f"config '{path}': 'tasks.{task}' must be a mapping of params")
        layers.append((per_task, f"{what} (tasks.{task} in {path})"))
    return schema, layers


def load_solver(name: str, task: str | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Solver params: the solver function's defaults ← ``params`` (if the file has them) ← ``tasks[task]``
    (if present) ← overrides, as one DictConfig."""
    cfg, layers = _solver_layers(name, task)
    for values, where in layers:
        cfg = _apply(cfg, _typed_settings(values), where)
    what = f"solver {name}"
    return _plain_config(_apply(cfg, _text_settings(overrides, what), what))


def parse_key_values(items) -> dict:
    """``["a=1", "b=[2,3]", "c=text"]`` → ``{"a": 1, "b": (2, 3), "c": "text"}`` (JSON values, else strings).

    Unchecked; for options with a known schema use :func:`merge_overrides`."""
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


__all__ = [
    "ENV_CONFIG_DIR",
    "RUNTIME_ARGS",
    "apply_overrides",
    "config_dir",
    "flatten",
    "list_solvers",
    "list_tasks",
    "load_solver",
    "load_task",
    "merge_overrides",
    "parse_key_values",
    "register_solver_schema",
    "require",
    "schema_from_defaults",
    "signature_defaults",
    "solver_schema",
    "to_plain",
    "UnknownKeyError",
]
