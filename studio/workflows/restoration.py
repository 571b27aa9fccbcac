"""Workflows shared by the CLI and the app: ``degrade`` (make a measurement) and ``restore`` (solve).

Both take [0, 1] image tensors and return tensors plus a JSON-ready record; the ``*_files`` variants
read and write PNGs with a JSON sidecar (atomically) and are what ``studio degrade`` / ``studio restore``
run. A measurement written by ``degrade_files`` carries a sidecar (task config, seed, image size) and an
exact float copy (``.safetensors``), so ``restore_files`` rebuilds the very same operator from it.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from models.diffusers_prior import is_pipeline
from models.loading import as_prior, load_prior
from models.registry import PIXEL, TEXT_TO_IMAGE, default_model
from solvers import SolverInfo, get_solver, solver_config, supports
from studio.core.config import flatten, load_task, to_plain
from studio.core.errors import StudioError
from studio.core.io import json_file, load_image, open_image, png_file, safetensors_file, write_set
from studio.core.masks import fill_mask_from_image, validate_fill_mask
from studio.core.metrics import image_metrics
from studio.core.noise import measure
from studio.core.tasks import build_noise, build_operator, noise_sigma_of

Tensor = torch.Tensor
log = logging.getLogger(__name__)


def split_overrides(overrides: Iterable[str]) -> tuple[list[str], list[str]]:
    """``operator.*`` / ``noise.*`` keys go to the task, everything else to the solver."""
    task, solver = [], []
    for item in overrides:
        (task if item.split("=", 1)[0].strip().startswith(("operator.", "noise.")) else solver).append(item)
    return task, solver


def _image_size_for(task_cfg, y_shape: tuple[int, ...]) -> tuple[int, int]:
    h, w = y_shape[-2:]
    if task_cfg.operator.name == "super_resolution":
        f = int(task_cfg.operator.factor)
        return h * f, w * f
    return h, w


def _check_image(x: Tensor, what: str) -> Tensor:
    if x.dim() != 4 or x.shape[0] != 1:
        raise StudioError(f"{what} must be one image of shape (1, C, H, W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise StudioError(f"{what} contains NaN or Inf values")
    return x


@dataclass
class Degraded:
    y: Tensor
    operator: Any
    task: dict
    seed: int


def degrade(clean: Tensor, task: str, *, seed: int = 0, overrides: Iterable[str] = (),
            fill_mask: Tensor | None = None) -> Degraded:
    """y = noise(A(clean)) for ``task`` (config + ``operator.*``/``noise.*`` overrides), seeded."""
    clean = _check_image(clean, "input image")
    if clean.min() < -1e-6 or clean.max() > 1 + 1e-6:  # a [-1, 1] or 0-255 tensor would degrade silently
        raise StudioError(f"input image values must be in [0, 1] (the project's image convention), got "
                          f"[{clean.min().item():.3g}, {clean.max().item():.3g}]")
    cfg = load_task(task, list(overrides))
    op = build_operator(to_plain(cfg.operator), tuple(clean.shape[-2:]), seed, fill_mask)
    gen = torch.Generator().manual_seed(int(seed) + 1)  # noise stream separate from the operator's
    y = measure(clean, op, build_noise(to_plain(cfg.noise)), gen)
    return Degraded(y=y, operator=op, task=to_plain(cfg), seed=int(seed))


@dataclass
class Restored:
    image: Tensor
    record: dict = field(default_factory=dict)


def restore(
    y: Tensor,
    *,
    task: str,
    solver: str,
    model: str | Any | None = None,
    seed: int = 0,
    steps: int | None = None,
    overrides: Iterable[str] = (),
    fill_mask: Tensor | None = None,
    operator: Any = None,
    operator_seed: int | None = None,
    reference: Tensor | None = None,
    device: str | None = None,
    callback=None,
    progress: bool = False,
) -> Restored:
    """Restore measurement ``y`` ([0, 1] units) with ``solver`` under ``model``.

    ``model``: a registered name, folder or hub id (None: the default of the solver's kind), a loaded prior,
    or a loaded diffusers pipeline (``DDPMPipeline``, ``StableDiffusionPipeline``, ...), whose modules are
    used as they are (no copy; ``device`` None keeps them where they are, CPU for a name).

    ``operator`` may be given (the exact one that made y); otherwise it is rebuilt from the task config
    with ``operator_seed`` (default ``seed``). ``overrides``: ``key=value`` for solver params, and
    ``operator.*`` / ``noise.*`` for the task. ``reference``: a clean image for PSNR/SSIM.
    """
    y = _check_image(y, "measurement")
    task_over, solver_over = split_overrides(overrides)
    if steps is not None:
        solver_over.append(f"steps={steps}")
    task_cfg = load_task(task, task_over)
    info = get_solver(solver)
    params = _solver_params(solver, task, solver_over)
    image_size = _image_size_for(task_cfg, tuple(y.shape))
    if operator is None:
        op_seed = seed if operator_seed is None else operator_seed
        operator = build_operator(to_plain(task_cfg.operator), image_size, op_seed, fill_mask)
    noise = build_noise(to_plain(task_cfg.noise))
    x_shape = (3, *image_size)
    if not supports(solver, operator, x_shape):
        need = "an operator with an SVD" if info.needs_svd else "a linear operator"
        raise StudioError(f"solver {solver!r} needs {need}; task {task!r} does not provide one")
    if model is None:
        model = default_model(TEXT_TO_IMAGE if info.latent else PIXEL)
    prior = as_prior(model, latent=info.latent, device=device)
    _check_prior_fits(prior, model, solver, info, image_size)
    device = device or str(getattr(prior, "device", "cpu"))
    y_dev = y.to(device=device, dtype=torch.float32)
    start = time.perf_counter()
    result = info.fn(y_dev, operator.to(device), prior, noise_sigma=noise_sigma_of(noise), seed=seed,
                     x_shape=x_shape, callback=callback, progress=progress, **params)
    record = {
        "task": task,
        "task_config": to_plain(task_cfg),
        "solver": solver,
        "solver_params": {**params, "seed": seed},
        "model": prior.describe() if hasattr(prior, "describe") else str(model),
        "model_name": _model_name(model, prior),
        "image_size": list(image_size),
        "operator": {"name": getattr(operator, "name", "custom"), "params": _safe_params(operator)},
        "device": device,
        "total_time_s": time.perf_counter() - start,
        **{k: v for k, v in result.record.items() if k not in ("solver", "params")},
    }
    if reference is not None:
        record["metrics"] = image_metrics(result.image.cpu(), reference)
    return Restored(image=result.image.cpu(), record=record)


def _model_name(model: Any, prior: Any) -> str:
    """The record's ``model_name``: the name or path given, a pipeline's source (its ``name_or_path``, else
    its class), or the class of a prior object."""
    if isinstance(model, str):
        return model
    if is_pipeline(model):
        return str(getattr(prior, "source", type(model).__name__))
    return type(model).__name__


def _solver_params(solver: str, task: str, solver_over: list[str]) -> dict:
    """The solver's config for ``task`` with the overrides applied; ``steps`` must be a positive int."""
    params = to_plain(solver_config(solver, task, solver_over))
    if "steps" in params and (not isinstance(params["steps"], int) or params["steps"] <= 0):
        raise StudioError(f"steps must be a positive integer, got {params['steps']!r}")
    return params


def _check_prior_fits(prior: Any, model: Any, solver: str, info: SolverInfo,
                      image_size: tuple[int, int]) -> None:
    """The model kind the solver needs (latent or pixel), RGB, and an image size the model can handle."""
    is_latent = hasattr(prior, "decode") and hasattr(prior, "latent_shape")
    if info.latent != is_latent:
        kind = "a latent (Stable-Diffusion-style)" if info.latent else "a pixel-space"
        name = model if isinstance(model, str) else "this"
        raise StudioError(f"solver {solver!r} needs {kind} model; {name} is not one")
    if is_latent:
        prior.latent_shape((1, 3, *image_size))  # the VAE factor must divide the image size
    elif getattr(prior, "sample_shape", None) is not None and prior.sample_shape[0] != 3:
        raise StudioError(f"model has {prior.sample_shape[0]} channels; restoration works on RGB images")
    if not is_latent and not hasattr(prior, "unet") and prior.sample_shape is not None \
            and tuple(prior.sample_shape[1:]) != tuple(image_size):
        raise StudioError(f"the image is {image_size[1]}x{image_size[0]} but this analytic model only "
                          f"handles {prior.sample_shape[2]}x{prior.sample_shape[1]} images")


def _safe_params(op) -> dict:
    try:
        params = op.params()
    except Exception:  # user callables
        return {}
    # large masks are rebuilt from the seed: keep the sidecar small
    return {k: v for k, v in params.items() if not (isinstance(v, list) and len(str(v)) > 2000)}


def software_versions() -> dict:
    """Python, torch and diffusers versions, for a sidecar."""
    import diffusers  # lazy: heavy third-party import, only for the sidecar's version line

    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__}


def degrade_files(input_path: str, task: str, output: str, *, seed: int = 0, overrides: Iterable[str] = (),
                  mask_path: str | None = None) -> dict:
    """``studio degrade``: clean PNG → measurement PNG + exact ``.safetensors`` + JSON sidecar, written as a
    set once everything has run; an output that would replace the input or the mask is refused first."""
    out = _png_path(output)
    exact = out.with_suffix(".safetensors")
    refuse_overwriting_inputs([out, exact, out.with_suffix(".json")],
                              {"input": input_path, "mask": mask_path})
    clean = load_image(input_path)
    fill = _load_fill_mask(mask_path, clean) if mask_path else None
    d = degrade(clean, task, seed=seed, overrides=overrides, fill_mask=fill)
    sidecar = {"kind": "measurement", "clean": str(input_path), "mask": mask_path, "task": task,
               "task_config": d.task, "seed": seed, "image_size": list(clean.shape[-2:]),
               "measurement": exact.name,
               "operator": {"name": d.operator.name, "params": _safe_params(d.operator)},
               "versions": software_versions()}
    write_set([png_file(d.y.clamp(0, 1) if d.y.shape[1] in (1, 3) else d.y, out),
               safetensors_file({"y": d.y}, exact), json_file(sidecar, out.with_suffix(".json"))])
    return sidecar


def refuse_overwriting_inputs(outputs: list[Path], inputs: dict[str, Any]) -> None:
    """One line, before anything runs, when an output path is one of the inputs (``inputs``: what → path;
    None entries skipped). Compared as files (hard links and other spellings of one path included)."""
    for what, given in inputs.items():
        if not given:
            continue
        for out in outputs:
            if _same_file(out, Path(given)):
                raise StudioError(f"output '{out}' would overwrite the {what} '{given}': "
                                  "choose another output path")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return a.samefile(b)
    except OSError:
        pass
    return a.expanduser().resolve() == b.expanduser().resolve()


@dataclass
class _Measurement:
    """What ``restore_files`` hands to :func:`restore`, read from the input (or simulated from it)."""

    y: Tensor
    task: str
    task_over: list[str]
    operator_seed: int
    reference: Tensor | None
    fill: Tensor | None = None
    operator: Any = None
    source: dict = field(default_factory=dict)  # input file names for the sidecar
    outputs: list = field(default_factory=list)  # files to write with the restoration (simulated y)


def restore_files(input_path: str, output: str, *, task: str | None = None, solver: str = "cdim",
                  model: str | None = None, seed: int = 0, steps: int | None = None,
                  overrides: Iterable[str] = (), mask_path: str | None = None,
                  reference_path: str | None = None, simulate: bool = False, device: str = "cpu",
                  progress: bool = True, argv: list[str] | None = None) -> dict:
    """``studio restore``: measurement (or, with ``simulate``, a clean image) → restored PNG + sidecar (+ the
    simulated measurement PNG), written as a set once the solve has finished; nothing is written when
    anything fails, and an output that would replace an input is refused before anything runs."""
    out = _png_path(output)
    outputs = [out, out.with_suffix(".json")] + ([_simulated_path(out)] if simulate else [])
    refuse_overwriting_inputs(outputs, {"input": input_path, "mask": mask_path, "reference": reference_path,
                                        **({} if simulate else _measurement_inputs(input_path))})
    reference = load_image(reference_path) if reference_path else None
    task_over, solver_over = split_overrides(overrides)
    if simulate:
        m = _simulate_measurement(input_path, out, task, seed, task_over, mask_path, reference)
    else:
        m = _read_measurement(input_path, task, seed, task_over, mask_path, reference)
    res = restore(m.y, task=m.task, solver=solver, model=model, seed=seed, steps=steps,
                  overrides=m.task_over + solver_over,
                  fill_mask=m.fill, operator=m.operator, operator_seed=m.operator_seed, reference=m.reference,
                  device=device, progress=progress)
    sidecar = {"kind": "restoration", "input": str(input_path), **m.source, "output": out.name,
               "command": argv, **res.record, "versions": software_versions()}
    write_set([*m.outputs, png_file(res.image, out), json_file(sidecar, out.with_suffix(".json"))])
    return sidecar


def _simulated_path(out: Path) -> Path:
    return out.with_name(out.stem + ".measurement.png")


def _measurement_inputs(input_path: str) -> dict:
    """The files a measurement brings along: its ``studio degrade`` sidecar, the exact float copy and the
    clean image the sidecar names (all read by :func:`_read_measurement`)."""
    side = Path(input_path).with_suffix(".json")
    found = {"measurement's sidecar": side if side.exists() else None}
    try:
        meta = _read_measurement_sidecar(input_path)
    except StudioError:
        meta = None  # reported when it is read
    if meta:
        found["measurement's exact copy"] = Path(input_path).with_name(str(meta.get("measurement", "")))
        found["clean image of the measurement"] = meta.get("clean")
    return found


def _simulate_measurement(input_path: str, out: Path, task: str | None, seed: int, task_over: list[str],
                          mask_path: str | None, reference: Tensor | None) -> _Measurement:
    """Degrade the clean image at ``input_path`` (it is also the reference unless one is given); the
    measurement PNG goes next to ``out`` as ``<stem>.measurement.png``, written with the restoration."""
    if task is None:
        raise StudioError("--simulate needs --task")
    clean = load_image(input_path)
    fill = _load_fill_mask(mask_path, clean) if mask_path else None
    d = degrade(clean, task, seed=seed, overrides=task_over, fill_mask=fill)
    return _Measurement(y=d.y, task=task, task_over=task_over, operator_seed=seed,
                        reference=clean if reference is None else reference, fill=fill, operator=d.operator,
                        source={"simulated_measurement": _simulated_path(out).name},
                        outputs=[png_file(d.y.clamp(0, 1), _simulated_path(out))])


def _read_measurement(input_path: str, task: str | None, seed: int, task_over: list[str],
                      mask_path: str | None, reference: Tensor | None) -> _Measurement:
    """A measurement PNG; with a ``studio degrade`` sidecar, its task config, operator seed, mask, exact
    float copy (when it still matches the PNG) and clean image (as the reference) are used, so the operator
    is rebuilt exactly."""
    operator_seed = seed
    meta = _read_measurement_sidecar(input_path)
    source = {}
    if meta is not None:
        task = task or meta["task"]
        if task != meta["task"]:
            raise StudioError(f"measurement was made for task {meta['task']!r}, not {task!r}")
        operator_seed = int(meta["seed"])
        task_over = [f"{k}={_dot(v)}" for k, v in flatten(OmegaConf.create(meta["task_config"])).items()
                     if k.startswith(("operator.", "noise."))] + task_over
        mask_path = mask_path or meta.get("mask")
        y, source["measurement_source"] = _measurement_values(input_path, task, meta)
        if reference is None and meta.get("clean") and Path(meta["clean"]).exists():
            reference = load_image(meta["clean"])
    else:
        if task is None:
            raise StudioError("--task is required for a measurement without a studio sidecar")
        y = _load_measurement(input_path, task)
    size = _image_size_for(load_task(task, task_over), tuple(y.shape))
    fill = _load_fill_mask(mask_path, torch.zeros(1, 3, *size)) if mask_path else None
    if fill is not None:
        source["mask"] = str(mask_path)
    return _Measurement(y=y, task=task, task_over=task_over, operator_seed=operator_seed, reference=reference,
                        fill=fill, source=source)


def _measurement_values(input_path: str, task: str, meta: dict) -> tuple[Tensor, str]:
    """y from the measurement PNG, or from its exact float copy when that copy is what the PNG shows (each
    value rounds to the PNG's 8-bit value): a PNG replaced or edited since ``degrade`` wins, with a warning.
    Also says which was used."""
    png = _load_measurement(input_path, task)
    exact_path = Path(input_path).with_name(str(meta.get("measurement", "")))
    if not meta.get("measurement") or not exact_path.is_file():
        return png, "png"
    try:
        exact = load_file(str(exact_path))["y"].float()
    except Exception as err:  # noqa: BLE001  (any unreadable copy: the PNG is the measurement)
        log.warning("ignoring %s (unreadable: %s); using the PNG", exact_path.name, str(err).splitlines()[0])
        return png, "png (exact copy unreadable)"
    if exact.shape == png.shape and (exact.clamp(0, 1) - png).abs().max() <= 0.5 / 255 + 1e-6:
        return exact, f"exact copy {exact_path.name}"
    log.warning("%s does not match %s (the PNG was replaced or edited since `studio degrade`): using the PNG",
                exact_path.name, Path(input_path).name)
    return png, f"png ({exact_path.name} does not match it)"


def _png_path(output: str) -> Path:
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise StudioError(f"output must be a .png path, got '{output}'")
    return out


def _load_measurement(path: str, task: str) -> Tensor:
    if load_task(task).operator.name == "colorize":
        return load_image(path, mode="L")
    return load_image(path)


def _load_fill_mask(mask_path: str, image: Tensor) -> Tensor:
    h, w = image.shape[-2:]
    return validate_fill_mask(fill_mask_from_image(open_image(mask_path), size=(w, h)))


def _read_measurement_sidecar(path: str) -> dict | None:
    side = Path(path).with_suffix(".json")
    if not side.exists():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as err:
        raise StudioError(f"cannot read sidecar '{side}': {err}") from err
    return meta if isinstance(meta, dict) and meta.get("kind") == "measurement" else None


def _dot(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if not isinstance(v, str) and hasattr(v, "__iter__"):  # list, tuple, ListConfig
        return "[" + ",".join(_dot(x) for x in v) + "]"
    return str(v)


__all__ = ["degrade", "restore", "degrade_files", "restore_files", "load_prior", "Degraded", "Restored"]
