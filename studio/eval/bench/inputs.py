"""The bench's arguments, parsed and checked: tasks, solvers and their variants, seeds, steps, images and
the task overrides (every error is a :class:`StudioError` naming the bad value)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from solvers import SOLVERS, get_solver, solver_config
from studio.core import paths
from studio.core.config import list_tasks, to_plain
from studio.core.errors import StudioError
from studio.core.io import load_image
from studio.eval.bench.peers import PEERS, get_peer
from studio.training.model_card import EXAMPLES_DIR, captions_by_file, load_examples

Tensor = torch.Tensor

DEFAULT_TASKS = ("inpaint_box", "gaussian_blur", "super_resolution", "denoise")
UNBENCHABLE_TASKS = {"inpaint_mask": "needs a user-drawn mask image"}
DEFAULT_EXAMPLE_SIZE = 32
EXAMPLE_SIZES = (32, 64)  # sizes of the shipped held-out emoji (examples/emoji/NNN-<size>.png)


@dataclass
class BenchImage:
    name: str
    image: Tensor  # (1, 3, H, W) in [0, 1]
    caption: str = ""  # what the image shows (captions.json): the prompt of a solver that needs one


def parse_list(text: str | Iterable[str] | None, what: str) -> list[str] | None:
    """``"a,b"`` or ``["a", "b"]`` → ``["a", "b"]`` (blanks dropped); None stays None."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    out = [s.strip() for s in items if s and s.strip()]
    if not out:
        raise StudioError(f"{what} is empty: {text!r}")
    return out


def parse_seeds(text: str | Iterable[int] | None) -> list[int]:
    """``"0,1,2"`` or ``[0, 1, 2]`` → integer seeds (default ``[0]``)."""
    if text is None:
        return [0]
    seeds = []
    for item in parse_list([str(s) for s in text] if not isinstance(text, str) else text, "--seeds"):
        try:
            seeds.append(int(item))
        except ValueError:
            raise StudioError(f"seeds must be integers, got {item!r}") from None
    return list(dict.fromkeys(seeds))


def parse_steps(items: Mapping[str, Any] | Iterable[str] | None) -> dict[str, int]:
    """``["dps=100", "ddrm=20,cdim=10"]`` or ``{"dps": 100}`` → ``{solver: steps}`` (checked)."""
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    pairs: list[tuple[str, Any]] = []
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        for item in items:
            for part in str(item).split(","):
                if not part.strip():
                    continue
                if "=" not in part:
                    raise StudioError(f"--steps takes solver=N, got {part!r}")
                name, value = part.split("=", 1)
                pairs.append((name.strip(), value.strip()))
    steps = {}
    for name, value in pairs:
        if name not in PEERS:
            get_solver(name)  # unknown names raise
        text = str(value).strip()
        if isinstance(value, (bool, float)) or not text.lstrip("+-").isdigit() or int(text) <= 0:
            raise StudioError(f"steps for {name} must be a positive integer, got {value!r}")
        n = int(text)
        steps[name] = n
    return steps


def load_bench_images(
    folder: str | None, limit: int | None, example_size: int = DEFAULT_EXAMPLE_SIZE, captions: bool = True
) -> list[BenchImage]:
    """PNGs of ``folder`` (sorted by name; captions from its ``captions.json`` when there is one), or the
    shipped held-out emoji at ``example_size`` (32 or 64 px) with their captions; first ``limit``."""
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise StudioError(f"--limit must be a positive integer, got {limit!r}")
    if folder is None:
        if example_size not in EXAMPLE_SIZES:
            raise StudioError(
                f"--example-size must be one of {', '.join(map(str, EXAMPLE_SIZES))} (the shipped held-out "
                f"emoji), got {example_size!r}"
            )
        images, captions = load_examples(example_size)
        root = paths.resolve_shipped(EXAMPLES_DIR)
        entries = json.loads((root / "captions.json").read_text())
        names = [Path(e["files"][str(example_size)]).stem for e in entries]
        out = [BenchImage(n, img[None], c) for n, img, c in zip(names, images, captions)]
    else:
        root = Path(folder)
        if not root.is_dir():
            raise StudioError(f"--images must be a folder of PNG images, got '{folder}'")
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".png")
        if not files:
            raise StudioError(f"--images folder '{folder}' contains no PNG images")
        files = files[:limit] if limit else files
        by_file = captions_by_file(root) if captions else {}  # read only when a solver needs them
        out = [BenchImage(p.stem, load_image(p), by_file.get(p.name, "")) for p in files]
    return out[:limit] if limit else out  # (the default examples are all loaded, then cut)


def check_tasks(tasks: Iterable[str] | None) -> list[str]:
    tasks = list(DEFAULT_TASKS) if tasks is None else list(dict.fromkeys(tasks))
    known = list_tasks()
    for t in tasks:
        if t in UNBENCHABLE_TASKS:
            raise StudioError(f"task {t!r} cannot be benchmarked: it {UNBENCHABLE_TASKS[t]}")
        if t not in known:
            raise StudioError(
                f"unknown task {t!r} (available: {', '.join(x for x in known if x not in UNBENCHABLE_TASKS)})"
            )
    return tasks


@dataclass(frozen=True)
class SolverSpec:
    """A bench solver: ``base`` (a name of :data:`solvers.SOLVERS`) run with ``overrides`` (``key=value``
    solver params); ``label`` names it in rows, table, plots and files (``base`` when there are none)."""

    label: str
    base: str
    overrides: tuple[str, ...] = ()

    @property
    def sets_steps(self) -> bool:
        return any(o.split("=", 1)[0] == "steps" for o in self.overrides)


def base_solver(label: str) -> str:
    """``"p2l:tune_prompt=false"`` → ``"p2l"``."""
    return label.split(":", 1)[0].strip()


def parse_solver_spec(text: str) -> SolverSpec:
    """``"p2l"`` or ``"p2l:tune_prompt=false[:key=value...]"`` → a checked :class:`SolverSpec`.

    The overrides are validated (known key, value of the default's type) by
    :func:`solvers.solver_config`, so a bad one raises :class:`StudioError` naming the key; the label
    is canonical (``key=value`` with stripped blanks, booleans lower-case), so one variant written two ways is
    one variant."""
    base, *parts = [p.strip() for p in str(text).split(":")]
    get_solver(base)  # "unknown solver 'x' (available: ...)"
    if not parts:
        return SolverSpec(base, base)
    overrides = []
    for part in parts:
        if "=" not in part or not part.split("=", 1)[0].strip():
            raise StudioError(
                f"solver variant {text!r}: expected {base}:key=value[:key=value...], got {part!r}"
            )
        key, value = (x.strip() for x in part.split("=", 1))
        overrides.append(f"{key}={value}")
    params = to_plain(solver_config(base, None, overrides))  # unknown keys / bad values raise, naming the key
    keys = [o.split("=", 1)[0] for o in overrides]
    if len(set(keys)) != len(keys):
        raise StudioError(f"solver variant {text!r} sets a key twice")
    canon = [f"{k}={str(params[k]).lower() if isinstance(params[k], bool) else o.split('=', 1)[1]}"
             for k, o in zip(keys, overrides)]
    return SolverSpec(":".join([base, *canon]), base, tuple(canon))


def check_solvers(solvers: Iterable[str] | None) -> list[SolverSpec]:
    """The bench's solvers (default: every pixel solver), variants parsed; duplicates dropped."""
    if solvers is None:
        return [SolverSpec(n, n) for n, info in SOLVERS.items() if not info.latent]
    specs = [_peer_spec(s) if is_peer(s) else parse_solver_spec(s) for s in solvers]
    return list({s.label: s for s in specs}.values())


def is_peer(label: str) -> bool:
    """Whether ``label`` (or its base) names a registered peer (:mod:`studio.eval.bench.peers`)."""
    return base_solver(label) in PEERS


def _peer_spec(text: str) -> SolverSpec:
    base, *parts = [p.strip() for p in str(text).split(":")]
    get_peer(base).check()  # e.g. "deepinv-dps needs deepinv==0.5.0, which is not installed"
    params = get_peer(base).parse_overrides(parts, base)  # bad keys / values raise, naming them
    canon = tuple(f"{k}={v}" for k, v in params.items())
    return SolverSpec(":".join([base, *canon]), base, canon)


def task_overrides(overrides: Iterable[str], noise_sigma: float | None) -> list[str]:
    """The ``operator.*`` / ``noise.*`` overrides for every task (``--noise-sigma`` last, so it wins)."""
    out = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key.startswith(("operator.", "noise.")):
            raise StudioError(f"bench overrides must be operator.* or noise.* key=value pairs, got {item!r}")
        out.append(item)
    if noise_sigma is not None:
        if not isinstance(noise_sigma, (int, float)) or not 0 <= noise_sigma <= 1:
            raise StudioError(f"--noise-sigma must be in [0, 1] image units, got {noise_sigma!r}")
        out.append(f"noise.sigma={float(noise_sigma)}")
    return out
