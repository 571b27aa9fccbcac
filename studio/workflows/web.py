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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from models.registry import MODELS
from solvers import SOLVERS, supports
from studio.core import paths
from studio.core.config import load_task, to_plain
from studio.core.errors import StudioError
from studio.core.io import (json_file, load_image, measurement_display, open_image, png_file, write_set)
from studio.core.masks import validate_fill_mask
from studio.core.tasks import build_operator
from studio.workflows import restoration
from studio.workflows.personalize import DEFAULT_TEMPLATE, prompt_template
from studio.workflows.restoration import split_overrides

Tensor = torch.Tensor

#: Largest image the app accepts (pixels). Restoring is O(pixels x steps); beyond this a CPU job would
#: run for hours, so the upload is refused with a message instead.
MAX_PIXELS = 256 * 256
#: The tasks the Restore tab offers, with the task parameters it exposes (key → (label, default)).
TASK_PARAMS: dict[str, dict[str, tuple[str, float]]] = {
    "inpaint_mask": {},
    "inpaint_box": {"operator.box_size": ("box size (fraction of the side)", 0.5)},
    "inpaint_random": {"operator.observed_fraction": ("fraction of pixels observed", 0.3)},
    "gaussian_blur": {"operator.sigma": ("blur sigma (px)", 3.0),
                      "operator.kernel_size": ("kernel size (px)", 61)},
    "motion_blur": {"operator.kernel_size": ("kernel size (px)", 61),
                    "operator.intensity": ("intensity", 0.5)},
    "super_resolution": {"operator.factor": ("factor", 4)},
    "denoise": {},
    "colorize": {},
}
INT_PARAMS = {"operator.kernel_size", "operator.factor"}
#: The one parameter per solver the tab exposes next to steps and seed.
MAIN_PARAM = {"dps": "scale", "mcg": "scale", "cdim": "inner_steps", "ddrm": "eta", "ddim": "eta",
              "latent-dps": "scale", "psld": "omega", "p2l": "scale"}
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
    """Solver names that support ``task`` (checked on its operator) for a pixel or latent model."""
    cfg = to_plain(load_task(task, []))
    h = w = 32
    fill = torch.zeros(h, w)
    fill[8:24, 8:24] = 1
    op = build_operator(cfg["operator"], (h, w), 0, fill if task == "inpaint_mask" else None)
    latent = model_kind == "latent"
    return [n for n, i in SOLVERS.items() if i.latent == latent and supports(n, op, (3, h, w))]


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
    pending["record"] = json_file(record, folder / "restored.json")
    write_set(list(pending.values()))
    files = {k: f.path for k, f in pending.items()}
    return {"folder": folder, "files": {k: str(v) for k, v in files.items()}, "record": record,
            "restored": res.image, "measurement": shown_y, "input": job.image}


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
