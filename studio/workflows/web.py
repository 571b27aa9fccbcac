"""What the Gradio app does, without Gradio: turn UI values into workflow calls and back.

``app.py`` holds layout and wiring only; everything here is plain Python over numpy/torch so it is tested
directly. UI images arrive as numpy arrays (any of grey, RGB, RGBA, uint8/uint16/float) or as Gradio
``ImageEditor`` values ``{"background", "layers", "composite"}``; a painted mask is the union of the
layers' alpha (diffusers' convention: painted = region to fill), resized to the uploaded image.
Every job writes into its own folder under the app's output root and nowhere else. A model field accepts
a registered name or a folder inside the folders the operator allowed at launch, nothing else
(:func:`check_model`), because whoever reaches the page is not necessarily who runs the server.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from models.base import DiffusionPrior
from models.loading import as_prior, is_flow_model, is_latent_model
from models.registry import MODELS, PIXEL, TEXT_TO_IMAGE, default_model, resolve_model_path
from solvers import SOLVERS, solver_config, supports
from studio.core import paths
from studio.core.config import load_task, to_plain
from studio.core.errors import SolveCancelled, StudioError
from studio.core.io import (json_file, load_image, measurement_display, open_image, png_file, write_set)
from studio.core.masks import validate_fill_mask
from studio.core.tasks import build_operator, scaled_sizes
from studio.workflows import editing, restoration
from studio.workflows.personalize import DEFAULT_TEMPLATE, prompt_template
from studio.workflows.restoration import split_overrides

Tensor = torch.Tensor

#: Largest upload the app decodes (pixels; a decompression-bomb guard). A photo larger than the model takes
#: is not refused: it is downscaled to the model's size (:func:`fitted_size`), and the page says so on upload.
MAX_PIXELS = 4096 * 4096
#: The tasks the Restore tab offers, with the task parameters it exposes (key → (label, default)); a None
#: default follows the image (the task config's ``scaled_from``: :func:`task_param_values` fills it in).
TASK_PARAMS: dict[str, dict[str, tuple[str, float | None]]] = {
    "inpaint_mask": {},
    "inpaint_box": {"operator.box_size": ("box size (fraction of the side)", 0.5)},
    "inpaint_random": {"operator.observed_fraction": ("fraction of pixels observed", 0.3)},
    "gaussian_blur": {"operator.sigma": ("blur sigma (px)", None),
                      "operator.kernel_size": ("kernel size (px)", None)},
    "motion_blur": {"operator.kernel_size": ("kernel size (px)", None),
                    "operator.intensity": ("intensity", 0.5)},
    "super_resolution": {"operator.factor": ("factor", 4)},
    "denoise": {},
    "colorize": {},
}
INT_PARAMS = {"operator.kernel_size", "operator.factor"}
#: The one parameter per solver the tab exposes next to steps and seed.
MAIN_PARAM = {"dps": "scale", "mcg": "scale", "cdim": "inner_steps", "ddrm": "eta", "ddim": "eta",
              "latent-dps": "scale", "psld": "omega", "p2l": "scale", "resample": "scale",
              "flair": "data_lr", "treg": "guidance"}
#: The folders (os.pathsep-separated) whose model folders the app may load, when no --model-dir is given.
MODEL_DIRS_ENV = "STUDIO_MODEL_DIRS"
#: The one answer to a model the app does not offer: the same text whether the path exists or not, so the
#: field cannot be used to probe the server's disk.
UNKNOWN_MODEL = ("unknown model: choose one of the listed models, or a folder inside the model folders the "
                 "app was started with")


def to_image_tensor(value: Any, what: str = "image") -> Tensor:
    """A UI image (numpy / PIL / path / ImageEditor dict) → (1, 3, H, W) float in [0, 1]; clear errors."""
    if isinstance(value, dict):  # ImageEditor value
        value = value.get("background") if value.get("background") is not None else value.get("composite")
    if value is None:
        raise StudioError(f"no {what}: upload an image or pick an example")
    if isinstance(value, (str, Path)):  # size checked from the header, bombs and non-images refused
        return load_image(str(value), max_pixels=MAX_PIXELS)
    if isinstance(value, Image.Image):
        value = np.asarray(value)
    arr = np.asarray(value)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or min(arr.shape[:2]) < 1:
        raise StudioError(f"{what} has an unsupported shape {arr.shape}")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise StudioError(f"{what} is {arr.shape[1]}x{arr.shape[0]}; the app accepts up to {MAX_PIXELS} "
                          f"pixels (e.g. 256x256): downscale it first")
    x = _unit_float(arr, what)
    c = x.shape[2]
    if c in (2, 4):  # composite transparent pixels on white
        alpha = x[..., -1:]
        x = x[..., :-1] * alpha + (1 - alpha)
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].clamp(0, 1)


def _unit_float(arr: np.ndarray, what: str) -> np.ndarray:
    """uint8 / uint16 / float pixels → float32 in [0, 1] (floats above 1 are taken as 0..255)."""
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float32)
        x = x / 255.0 if x.max() > 1.0 else x
    else:
        raise StudioError(f"{what} has an unsupported pixel type {arr.dtype}")
    if not np.isfinite(x).all():
        raise StudioError(f"{what} contains NaN or Inf values")
    return x


def fill_mask_from_editor(value: Any, size: tuple[int, int]) -> Tensor:
    """Painted strokes (any layer's alpha > 0) → (H, W) float fill mask at ``size`` = (H, W)."""
    layers = value.get("layers") if isinstance(value, dict) else None
    if not layers:
        raise StudioError("no mask painted: paint the region to fill with the brush")
    painted = None
    for layer in layers:
        arr = _layer_array(layer)
        if arr.ndim != 3 or arr.shape[2] != 4:
            continue
        alpha = arr[..., 3] > 0
        painted = alpha if painted is None or painted.shape != alpha.shape else painted | alpha
    if painted is None:
        raise StudioError("no mask painted: paint the region to fill with the brush")
    h, w = size
    ph, pw = painted.shape
    if abs(ph / pw - h / w) > 0.02 * (h / w):
        raise StudioError(f"the mask is {pw}x{ph} but the image is {w}x{h}: paint the mask on this image")
    if painted.shape != (h, w):  # editors may rescale the canvas: bring the mask back to the image
        canvas = Image.fromarray(painted.astype(np.uint8) * 255)
        painted = np.asarray(canvas.resize((w, h), Image.Resampling.NEAREST)) > 0
    return validate_fill_mask(torch.from_numpy(painted.astype(np.float32)))


def _layer_array(layer: Any) -> np.ndarray:
    """An editor layer (a file path, or an array) as a numpy array; a file is read as RGBA."""
    if isinstance(layer, (str, Path)):
        with open_image(layer, max_pixels=MAX_PIXELS) as im:
            return np.asarray(im.convert("RGBA"))
    return np.asarray(layer)


def task_overrides(task: str, params: dict[str, Any], noise_sigma: float | None) -> list[str]:
    """UI numbers → ``operator.*`` / ``noise.*`` overrides (only the keys the task exposes)."""
    if task not in TASK_PARAMS:
        raise StudioError(f"unknown task {task!r} (available: {', '.join(TASK_PARAMS)})")
    out = []
    for key in TASK_PARAMS[task]:
        value = params.get(key)
        if value is not None:
            out.append(f"{key}={int(round(float(value))) if key in INT_PARAMS else float(value)}")
    if noise_sigma is not None:
        if not 0 <= float(noise_sigma) <= 1:
            raise StudioError(f"noise sigma must be in [0, 1], got {noise_sigma}")
        out.append(f"noise.sigma={float(noise_sigma)}")
    return out


def solvers_for(task: str, model_kind: str = "pixel") -> list[str]:
    """Solver names that support ``task`` (checked on its operator) for a pixel, latent or flow model (a
    flow model: the latent solvers that run on its VP view); the baselines that ignore the measurement
    (DDIM) last."""
    cfg = to_plain(load_task(task, []))
    h = w = 32
    fill = torch.zeros(h, w)
    fill[8:24, 8:24] = 1
    op = build_operator(cfg["operator"], (h, w), 0, fill if task == "inpaint_mask" else None)
    latent, flow = model_kind in ("latent", "flow"), model_kind == "flow"
    names = [n for n, i in SOLVERS.items()
             if i.latent == latent and (i.flow or not flow) and supports(n, op, (3, h, w))]
    return sorted(names, key=lambda n: SOLVERS[n].baseline)


def solver_choices(task: str, model_kind: str = "pixel") -> list[tuple[str, str]]:
    """(human name, solver name) for the solver list of ``task`` on a model of ``model_kind``."""
    return [(SOLVERS[n].title, n) for n in solvers_for(task, model_kind)]


def task_choices() -> list[tuple[str, str]]:
    """(human name, task name) of the tasks the Restore tab offers, as the task configs name them."""
    return [(task_text(t)[0], t) for t in TASK_PARAMS]


def task_text(task: str) -> tuple[str, str]:
    """(title, one-line description) of a task, from its config (``title`` / ``about``)."""
    cfg = to_plain(load_task(task, []))
    return str(cfg.get("title") or task), str(cfg.get("about") or "")


def task_noise_sigma(task: str) -> float:
    """The measurement noise σ the task config sets ([0, 1] units): the noise slider starts there."""
    return float(to_plain(load_task(task, []))["noise"].get("sigma", 0.0))


def task_param_values(task: str, size: tuple[int, int] | None) -> dict[str, float | None]:
    """The values the task's parameter fields show for an image of ``size`` = (H, W): the config's, with
    the sizes that follow the image (``scaled_from``) computed for it (None without an image)."""
    operator = to_plain(load_task(task, []))["operator"]
    scaled = scaled_sizes(operator.get("scaled_from"), size) if size else {}
    values = {}
    for key, (_, default) in TASK_PARAMS[task].items():
        name = key.split(".", 1)[1]
        values[key] = scaled.get(name, operator.get(name, default))
    return values


def image_label(task: str) -> str:
    """The line under the Restore tab's image for ``task``: what to give, and what to paint."""
    title = task_text(task)[0].lower()
    if task == "inpaint_mask":
        return "**Image**: paint the region to fill with the brush (the draw tool)"
    return f"**Image**: a clean image to degrade, or the degraded one ({title})"


def step_advice(solver: str, steps: int | float | None, noise_sigma: float | None = None) -> str:
    """One line on the step count (the solver's sensible range, a warning below it) and, for a solver
    that wants a noiseless measurement, a warning when the noise is not zero."""
    info = SOLVERS.get(solver)
    if info is None or steps is None:
        return ""
    default = to_plain(solver_config(solver)).get("steps")
    sensible = f"sensible: {info.min_steps} steps or more (default {default})"
    lines = [f"⚠ {int(steps)} steps is below what {info.title} needs: expect an unrelated or noisy result "
             f"({sensible})" if int(steps) < info.min_steps else sensible]
    if info.noiseless and noise_sigma:
        lines.append(f"⚠ {info.title} projects onto y and copies its noise into the result (on Gaussian "
                     "blur at noise 0.025 it gives about 5 dB at any step count): set the noise to 0, its "
                     "official setting, or choose another solver")
    return "\n\n".join(lines)


def solver_text(solver: str) -> str:
    """The one-line description shown under the solver list."""
    info = SOLVERS.get(solver)
    return f"**{info.title}**: {info.summary}." if info else ""


# ------------------------------------------------------------------------------------------ models

def model_choices() -> list[tuple[str, str]]:
    """(label, name) of every registered model, pixel models first, then text-to-image ones: the Restore
    tab's model list (its solver list follows the kind chosen)."""
    kinds = {PIXEL: "pixel model", TEXT_TO_IMAGE: "text-to-image (latent solvers)"}
    entries = sorted(MODELS.values(), key=lambda m: m.kind != PIXEL)
    return [(f"{m.name} · {kinds.get(m.kind, m.kind)}", m.name) for m in entries]


def model_kind_of(model: str | None) -> str:
    """'pixel', 'latent' or 'flow' (a flow-matching, SD3-style latent model) for a checked model field
    (:func:`check_model`); None is the pixel default."""
    if model is None:
        return "pixel"
    if is_flow_model(model):
        return "flow"
    return "latent" if is_latent_model(model) else "pixel"


@dataclass(frozen=True)
class ModelGeometry:
    """What a model takes, read from its config files (no weights loaded): the trained (H, W), the
    largest side ratio it accepts (:attr:`models.base.DiffusionPrior.max_size_ratio`) and the multiple
    its sides must be (the VAE factor of a latent model, 1 for a pixel UNet, which pads)."""

    trained: tuple[int, int]
    max_ratio: float = DiffusionPrior.max_size_ratio
    multiple: int = 1
    exact: bool = False  # only the trained size (an analytic prior)


def model_geometry(model: str | None) -> ModelGeometry | None:
    """The :class:`ModelGeometry` of a checked model field; None when its files do not say."""
    if model == "gaussian-demo":
        return ModelGeometry((32, 32), max_ratio=1.0, exact=True)
    try:
        folder = Path(resolve_model_path(model or default_model(PIXEL)))
        denoiser = "transformer" if (folder / "transformer" / "config.json").is_file() else "unet"
        config = json.loads((folder / denoiser / "config.json").read_text())
        size = config["sample_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        if (folder / "vae" / "config.json").is_file():
            vae = json.loads((folder / "vae" / "config.json").read_text())
            factor = 2 ** (len(vae["block_out_channels"]) - 1)
            patch = int(config.get("patch_size") or 1)  # an SD3 transformer takes patch x patch latents
            return ModelGeometry((size[0] * factor, size[1] * factor), multiple=factor * patch)
        return ModelGeometry((int(size[0]), int(size[1])))
    except (OSError, ValueError, KeyError, TypeError, StudioError):
        return None


def fitted_size(size: tuple[int, int], geometry: ModelGeometry | None) -> tuple[int, int]:
    """The (H, W) an image of ``size`` is restored at: unchanged when the model takes it, else scaled down
    (aspect kept) until its shorter side is the model's trained side and no side exceeds what the model
    accepts, then cut to a multiple of the model's factor. The CLI refuses such an image with the same
    limits; the app downscales it and says so on upload."""
    h, w = size
    if geometry is None:
        return size
    if geometry.exact:
        return geometry.trained
    th, tw = geometry.trained
    limit_h, limit_w = geometry.max_ratio * th, geometry.max_ratio * tw
    m = geometry.multiple
    if h <= limit_h and w <= limit_w and h % m == 0 and w % m == 0:
        return size
    if h > limit_h or w > limit_w:
        scale = min(min(th, tw) / min(h, w), limit_h / h, limit_w / w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
    return max(m, h - h % m), max(m, w - w % m)


def fit_to_size(x: Tensor, size: tuple[int, int], mask: bool = False) -> Tensor:
    """``x`` (…, H, W) resized to cover ``size`` (area-averaged, aspect kept) and centre-cropped to it; a
    mask is resized by nearest neighbour so it stays binary."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    scale = max(size[0] / h, size[1] / w)
    cover = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, h, w).float()
    mode = "nearest" if mask else ("area" if scale < 1 else "bicubic")
    out = torch.nn.functional.interpolate(flat, size=cover, mode=mode)
    top, left = (cover[0] - size[0]) // 2, (cover[1] - size[1]) // 2
    out = out[..., top:top + size[0], left:left + size[1]]
    return out.reshape(*lead, *size).clamp(0, 1).to(x.dtype)


#: measured seconds of one forward pass, per (model, H, W): the first estimate of a run's time
_FORWARD_SECONDS: dict[tuple[str, int, int], float] = {}
#: seconds per step of the runs this app finished, per (model, solver, H, W): the estimate once known
_STEP_SECONDS: dict[tuple[str, str, int, int], float] = {}


def forward_seconds(model: str | None, size: tuple[int, int]) -> float:
    """Seconds of one denoiser call of ``model`` at image ``size`` on this machine: measured once (the
    model loaded, one warm-up call, the fastest of three timed ones) and remembered for the app's
    lifetime."""
    name = model or default_model(PIXEL)
    key = (name, *size)
    if key not in _FORWARD_SECONDS:
        latent = model_kind_of(model) != "pixel"
        prior = as_prior(name, latent=latent)
        shape = prior.latent_shape((1, 3, *size)) if latent else (1, 3, *size)
        x = torch.zeros(shape, device=getattr(prior, "device", "cpu"))
        t = len(prior.alphas_cumprod) // 2
        timings = []
        with torch.no_grad():
            for _ in range(4):  # the first call warms up; the fastest of the rest is the machine's speed
                start = time.perf_counter()
                prior.predict(x, t)
                timings.append(time.perf_counter() - start)
        _FORWARD_SECONDS[key] = min(timings[1:])
    return _FORWARD_SECONDS[key]


def estimate_seconds(model: str | None, solver: str, size: tuple[int, int], steps: int) -> tuple[float, str]:
    """(seconds, how it was estimated) for ``steps`` steps of ``solver``: the step time of this app's last
    finished run of the same model, solver and size when there is one, else the measured forward pass
    times the solver's cost per step (:attr:`solvers.registry.SolverInfo.step_cost`)."""
    name = model or default_model(PIXEL)
    measured = _STEP_SECONDS.get((name, solver, *size))
    if measured is not None:
        return measured * steps, "from the last run"
    cost = SOLVERS[solver].step_cost if solver in SOLVERS else 1.0
    return forward_seconds(model, size) * cost * steps, "from a timed forward pass"


def remember_step_time(model: str | None, solver: str, size: tuple[int, int], record: dict) -> None:
    """Keep a finished run's seconds per step for the next estimate."""
    steps = (record.get("solver_params") or {}).get("steps")
    if steps and record.get("wall_time_s"):
        _STEP_SECONDS[(model or default_model(PIXEL), solver, *size)] = record["wall_time_s"] / steps


def describe_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 0.1):.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def upload_note(image: Tensor | None, model: str | None, solver: str, steps: int | float | None,
                task: str = "", mode: str = "simulate") -> str:
    """What the Restore tab says about an image before it runs: its size, what will be done to fit the
    model, and about how long the restore will take."""
    if image is None:
        return ""
    h, w = image.shape[-2:]
    solve = solve_size((h, w), task, mode)
    geometry = model_geometry(model)
    target = fitted_size(solve, geometry)
    name = model or default_model(PIXEL)
    parts = [f"{w}x{h} image"]
    if target != solve and geometry is not None:
        th, tw = geometry.trained
        parts.append(f"{name} was trained on {tw}x{th} images and takes up to "
                     f"{int(geometry.max_ratio * tw)}x{int(geometry.max_ratio * th)}"
                     + (f" in multiples of {geometry.multiple}" if geometry.multiple > 1 else "")
                     + f": it will be restored at {target[1]}x{target[0]} (downscaled)")
    if steps and solver in SOLVERS:
        try:
            seconds, how = estimate_seconds(model, solver, target, int(steps))
            parts.append(f"about {describe_duration(seconds)} for {int(steps)} {SOLVERS[solver].title} steps "
                         f"({how})")
        except Exception:  # noqa: BLE001 - an estimate must never block the upload
            pass
    return " · ".join(parts)


def solve_size(size: tuple[int, int], task: str, mode: str) -> tuple[int, int]:
    """The size the solver restores for an image of ``size``: a degraded super-resolution input is the
    small measurement, restored at ``factor`` times its size."""
    if mode == "degraded" and task == "super_resolution":
        factor = int(to_plain(load_task(task, []))["operator"]["factor"])
        return size[0] * factor, size[1] * factor
    return size


def fit_to_model(image: Tensor, fill_mask: Tensor | None, model: str | None, task: str,
                 mode: str) -> tuple[Tensor, Tensor | None, str | None]:
    """``image`` (and its painted mask) downscaled to what ``model`` takes (:func:`fitted_size`); the
    third value says what was done (None: nothing)."""
    h, w = image.shape[-2:]
    solve = solve_size((h, w), task, mode)
    target = fitted_size(solve, model_geometry(model))
    if target == solve:
        return image, fill_mask, None
    factor = solve[0] // h
    size = (target[0] // factor, target[1] // factor)
    image = fit_to_size(image, size)
    if fill_mask is not None:
        fill_mask = fit_to_size(fill_mask.float(), size, mask=True)
    return image, fill_mask, f"the {w}x{h} image was downscaled to {size[1]}x{size[0]} for the model"


# ------------------------------------------------------------------------------------------ display

def display_image(x: Tensor, side: int = 256) -> np.ndarray:
    """(1, 3, H, W) [0, 1] → uint8 (H', W', 3) enlarged by an integer factor (nearest neighbour: pixels
    stay sharp squares) until its longer side reaches ``side``: a 32-px result is readable on the page."""
    arr = image_to_numpy(x)
    k = max(1, side // max(arr.shape[:2]))
    return arr.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else arr


# ------------------------------------------------------------------------------------------ stopping

@contextmanager
def stop_when(module: torch.nn.Module, stopped: Callable[[], bool]):
    """Within the block, every forward call of ``module`` (the model's network) first checks
    ``stopped()`` and raises :class:`SolveCancelled` when it is true: a Stop that reaches inversion and
    editing loops, which take no callback. A forward pre-hook (torch's public API), removed on exit."""
    def check(_module, _inputs):
        if stopped():
            raise SolveCancelled("stopped")

    handle = module.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------ personalize

TOKEN_PATTERN = re.compile(r"<[^<>\s]+>")


def learned_tokens(embedding_file: str | Path | None) -> list[str]:
    """The tokens a textual-inversion file defines (its safetensors keys; a NeTI file's ``neti.`` weights are
    not tokens), [] without a readable file."""
    if not embedding_file:
        return []
    try:
        from safetensors import safe_open

        with safe_open(str(embedding_file), framework="pt") as f:
            return [k for k in f.keys() if not k.startswith("neti.")]
    except Exception:  # noqa: BLE001 - not a safetensors file: the generate call reports it
        return []


def follow_token(prompt: str, old: str, new: str) -> str:
    """``prompt`` with the placeholder ``old`` renamed to ``new`` (the prompt follows the token field);
    a prompt without ``old`` gets ``new`` in place of any other ``<...>`` token, or is left alone."""
    new = new.strip()
    if not new:
        return prompt
    if old and old in prompt:
        return prompt.replace(old, new)
    tokens = TOKEN_PATTERN.findall(prompt)
    return prompt.replace(tokens[0], new) if len(tokens) == 1 else prompt


def prompt_warning(prompt: str, tokens: Sequence[str]) -> str | None:
    """A warning when a prompt uses none of the learned ``tokens`` (it would sample as if nothing was
    learned) or names a ``<...>`` token that is not learned; None when the prompt is fine."""
    used = TOKEN_PATTERN.findall(prompt or "")
    unknown = [t for t in used if t not in tokens]
    if unknown:
        known = ", ".join(tokens) if tokens else "none: train a token or upload an embedding file"
        return f"{', '.join(unknown)} is not a learned token (learned: {known})"
    if tokens and not any(t in (prompt or "") for t in tokens):
        return (f"the prompt contains no learned token ({', '.join(tokens)}): the samples will not use "
                "what was learned")
    return None


def literal(text: str) -> str:
    """``text`` safe inside Markdown: ``<token>`` shows as typed instead of vanishing as an HTML tag."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def smoothed_loss(points: Sequence[tuple[int, float]], weight: float = 0.9) -> list[tuple[int, float, str]]:
    """(step, value, series) rows of the raw loss and its exponential moving average (bias-corrected, as
    TensorBoard smooths), for a two-line plot."""
    rows, average = [], 0.0
    for i, (step, loss) in enumerate(points, start=1):
        average = weight * average + (1 - weight) * float(loss)
        rows.append((int(step), float(loss), "loss"))
        rows.append((int(step), average / (1 - weight ** i), "smoothed"))
    return rows


def allowed_model_dirs(dirs: Sequence[str | Path] | None = None) -> tuple[Path, ...]:
    """The folders the app may load models from: the shipped weights, plus ``dirs`` (``--model-dir``),
    else ``$STUDIO_MODEL_DIRS``, else ``./models``. Resolved once here (symlinks, ``..``), so containment is
    checked against the real folders; the operator chooses them, a browser never does."""
    if not dirs:
        dirs = [d for d in os.environ.get(MODEL_DIRS_ENV, "").split(os.pathsep) if d.strip()] or ["models"]
    folders = [paths.weights_dir(), *(Path(d).expanduser() for d in dirs)]
    return tuple(dict.fromkeys(f.resolve() for f in folders))


def check_model(value: Any, allowed: Sequence[Path]) -> str | None:
    """A model field's value → what the app may load: None (the tab's default), a registered name, or the
    resolved folder. The app is reachable from browsers, so a typed path must neither load an arbitrary
    folder nor reveal what exists: anything else, wherever it points, gets the one :data:`UNKNOWN_MODEL`
    error. Symlinks and ``..`` are resolved before the containment check, so a link out is refused."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value in MODELS:
        return value
    folder = _resolve_quietly(value)
    # is_dir is asked only inside an allowed folder: outside, existence is never looked at
    if folder is None or not any(folder.is_relative_to(root) for root in allowed) or not folder.is_dir():
        raise StudioError(UNKNOWN_MODEL)
    return str(folder)


def _resolve_quietly(value: Any) -> Path | None:
    """``value`` as an absolute path with symlinks and ``..`` resolved; None for what is not a path (a
    number, a NUL byte, a symlink loop, a name too long): those get the same error as any other."""
    if not isinstance(value, (str, Path)):
        return None
    try:
        return Path(value).resolve()
    except (OSError, ValueError, RuntimeError):
        return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (the address the app listens on) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a hostname or "" (all interfaces): it may be reachable from the network
        return False


def network_warning(host: str, port: int, auth: bool) -> str | None:
    """The warning printed when the app listens beyond loopback; None on loopback."""
    if is_loopback(host):
        return None
    login = ("a login (--auth) is required" if auth else
             "anyone who reaches it can run jobs on this machine; add --auth USER:PASS to require a login")
    return (f"warning: the app listens on {host or 'all interfaces'}:{port} and is reachable from the "
            f"network; {login}")


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``--auth USER:PASS`` → Gradio's ``auth=(user, password)``; the password may contain ':'. A malformed
    value is refused with one line that does not repeat it (it holds a password)."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user.strip() or not password:
        raise StudioError("--auth must be USER:PASS, with a non-empty user and password")
    return user, password


def user_message(err: BaseException) -> str:
    """What the page shows for a failed request: one line, with every absolute path cut to its file name
    (an upload's server-side temporary path, a model folder) so the page does not map the server's disk."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = re.sub(r"(?<![\w.])/(?:[^\s'\"/]+/)+([^\s'\"/]*)", r"\1", text)
    return text if isinstance(err, StudioError) else f"unexpected error ({type(err).__name__}): {text}"


def unreadable_upload(err: BaseException) -> str:
    """The one line for an upload Gradio cannot decode (its own error is a multi-line dump of the payload)."""
    return f"the upload is not a readable image: {user_message(StudioError(str(err)))}"


def job_name() -> str:
    """A unique, sortable folder name for one app job."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class RestoreJob:
    """One Restore-tab request, validated."""

    image: Tensor
    task: str
    solver: str
    mode: str = "simulate"  # simulate: the image is clean, degrade it first; degraded: it is the measurement
    steps: int | None = None
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    fill_mask: Tensor | None = None
    model: str | None = None


def run_restore(job: RestoreJob, out_root: str | Path, callback: Callable | None = None) -> dict:
    """Degrade (simulate mode) and restore; writes ``<out_root>/<job id>/`` and returns paths and numbers."""
    if job.mode not in ("simulate", "degraded"):
        raise StudioError(f"unknown mode {job.mode!r} (simulate or degraded)")
    if job.task == "inpaint_mask" and job.fill_mask is None:
        raise StudioError("paint the region to fill, or choose box / random inpainting")
    task_over, solver_over = split_overrides(job.overrides)
    folder = Path(out_root) / job_name()  # created with the outputs: a failed job leaves nothing behind
    reference = None
    if job.mode == "simulate":
        deg = restoration.degrade(job.image, job.task, seed=job.seed, overrides=task_over,
                                  fill_mask=job.fill_mask)
        y, operator, reference = deg.y, deg.operator, job.image
    else:
        y, operator = job.image, None
    res = restoration.restore(y, task=job.task, solver=job.solver, model=job.model, seed=job.seed,
                              steps=job.steps, overrides=task_over + solver_over, fill_mask=job.fill_mask,
                              operator=operator, reference=reference, callback=callback)
    shown_y = measurement_display(y, tuple(job.image.shape[-2:]))
    pending = {"restored": png_file(res.image, folder / "restored.png"),
               "measurement": png_file(shown_y.clamp(0, 1), folder / "measurement.png")}
    if job.fill_mask is not None:  # keep the painted mask with the result (white = filled)
        mask_rgb = job.fill_mask.float()[None, None].expand(1, 3, -1, -1)
        pending["mask"] = png_file(mask_rgb, folder / "mask.png")
    record = {"kind": "restoration", "mode": job.mode, "app": True, **res.record}
    remember_step_time(job.model, job.solver, tuple(record["image_size"]), record)
    pending["record"] = json_file(record, folder / "restored.json")
    write_set(list(pending.values()))
    files = {k: f.path for k, f in pending.items()}
    return {"folder": folder, "files": {k: str(v) for k, v in files.items()}, "record": record,
            "restored": res.image, "measurement": shown_y, "input": job.image}


def control_params_from_fields(blend: str | None, reweight: str | None) -> dict:
    """The app's blend-words and reweight fields as attention-control settings: ``blend`` a comma list
    (empty: the default, the words that differ; ``-``: no local blend); ``reweight`` ``WORD=SCALE``."""
    params: dict = {}
    blend = (blend or "").strip()
    if blend == "-":
        params["blend_words"] = ()
    elif blend:
        params["blend_words"] = tuple(w.strip() for w in blend.split(",") if w.strip())
    if (reweight or "").strip():
        word, _, scale = reweight.partition("=")
        try:
            params.update(reweight_words=(word.strip(),), reweight_scale=float(scale))
        except ValueError:
            raise StudioError(f"reweight takes WORD=SCALE (e.g. blue=2), got {reweight!r}") from None
    return params


def run_edit(image: Tensor, *, source_prompt: str, target_prompt: str, method: str, steps: int,
             guidance: float | None, strength: float, model: str | None, out_root: str | Path,
             control: str = "auto", control_params: dict | None = None, edit_guidance: float | None = None,
             stopped: Callable[[], bool] = lambda: False) -> dict:
    """Invert ``image`` under the source prompt and edit it under the target prompt with attention
    ``control`` (:func:`studio.workflows.editing.edit`); writes ``<out_root>/<job id>/`` (edit,
    reconstruction, blend mask when there is one, JSON record) as one set. ``stopped()`` true ends the job
    at the model's next forward call."""
    settings = editing.control_settings(control, control_params or {})  # bad settings: before any work
    prior = editing.latent_prior_for(model or default_model(TEXT_TO_IMAGE))
    with stop_when(prior.unet, stopped):
        res = editing.edit(image, source_prompt=source_prompt, target_prompt=target_prompt, method=method,
                           steps=steps, guidance=guidance, strength=strength, model=prior,
                           control=settings.mode, control_params=control_params or {},
                           edit_guidance=edit_guidance)
    folder = Path(out_root) / job_name()
    record = {"kind": "edit", "app": True, "model_name": model or default_model(TEXT_TO_IMAGE), **res.record}
    pending = {"edit": png_file(res.image, folder / "edit.png"),
               "reconstruction": png_file(res.reconstruction, folder / "reconstruction.png")}
    if res.mask is not None:
        pending["mask"] = png_file(res.mask.expand(1, 3, -1, -1), folder / "mask.png")
    pending["record"] = json_file(record, folder / "edit.json")
    write_set(list(pending.values()))
    return {"folder": folder, "files": {k: str(f.path) for k, f in pending.items()}, "record": record,
            "edit": res.image, "reconstruction": res.reconstruction, "mask": res.mask}


def image_to_numpy(x: Tensor) -> np.ndarray:
    """(1, 3, H, W) [0, 1] → uint8 (H, W, 3) for display."""
    return (x[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)


def summary_markdown(record: dict) -> str:
    m = record.get("metrics")
    lines = [f"**{record['solver']}** on **{record['task']}** · NFE {record['nfe']} · "
             f"{record['wall_time_s']:.1f} s · relative residual {record['relative_residual'][0]:.3g}"]
    if m:
        lines.append(f"PSNR **{m['psnr']:.2f} dB** · SSIM **{m['ssim']:.3f}** (against the clean image)")
    return "\n\n".join(lines)


def examples(size: int = 32) -> list[tuple[str, str]]:
    """(path, caption) of the shipped held-out emoji at ``size``."""
    root = paths.examples_dir() / "emoji"
    entries = json.loads((root / "captions.json").read_text())
    return [(str(root / e["files"][str(size)]), e["caption"]) for e in entries]


def example_caption(path: str | None, size: int = 64) -> str:
    """The caption of a held-out emoji by its file name (the app gets a copy of the example file, under the
    same name); "" for any other image."""
    name = Path(path).name if path else ""
    return next((caption for p, caption in examples(size) if Path(p).name == name), "")


def starting_token_prompt(model: str, token: str) -> str:
    """The generation prompt the app starts with: ``token`` in the model's prompt template
    (:func:`studio.workflows.personalize.prompt_template`: ``"{}"`` for ``emoji-sd``, which never saw
    prefixes like "a picture of a"; the textual-inversion default "a picture of a {}" for a model that
    declares none)."""
    try:
        template = prompt_template(model)
    except StudioError:  # an unknown or missing model: the app still starts
        template = DEFAULT_TEMPLATE
    return template.format(token)
