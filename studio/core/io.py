"""Image and JSON file I/O.

Images enter the project here as float32 tensors ``(1, C, H, W)`` in [0, 1] (see
:mod:`studio.core.conventions`). Every bad file is reported as a one-line :class:`StudioError` naming
the path.

* :func:`open_image` validates and decodes a file into a :class:`PIL.Image.Image` in its own mode
  (alpha kept): use it when the alpha channel matters, e.g. for masks drawn as transparency.
* :func:`load_image` returns RGB (``mode="RGB"``) or one grey channel (``mode="L"``, used for masks);
  transparency is composited on white, 16-bit greyscale keeps its precision.
* :func:`save_image` and :func:`write_json_atomic` write through a temp file and ``os.replace``, so a
  crash never leaves a half-written output; a run with several outputs builds them first
  (:func:`png_file`, :func:`json_file`, :func:`safetensors_file`: validated and encoded, nothing written)
  and writes them together with :func:`write_set`, after everything that can fail has run.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.core.errors import StudioError

DEFAULT_MAX_PIXELS = 4096 * 4096

PathLike = str | os.PathLike


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------- reading


def open_image(path: PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, size-check and decode an image file; EXIF orientation applied, mode unchanged.

    The pixel count is checked from the header, before any pixel data is decoded.
    """
    p = Path(path)
    if not p.exists():
        raise StudioError(f"cannot read image '{p}': no such file")
    if p.is_dir():
        raise StudioError(f"cannot read image '{p}': is a directory")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise StudioError(f"cannot read image '{p}': {_one_line(e.strerror or e)}") from e
    if size == 0:
        raise StudioError(f"cannot read image '{p}': empty file (0 bytes)")
    try:
        im = Image.open(p)  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        raise StudioError(f"cannot read image '{p}': image too large ({_one_line(e)})") from e
    except UnidentifiedImageError as e:
        raise StudioError(f"cannot read image '{p}': not an image file (unrecognised format)") from e
    except OSError as e:
        raise StudioError(f"cannot read image '{p}': {_one_line(e.strerror or e)}") from e
    try:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise StudioError(f"cannot read image '{p}': empty image ({w}x{h})")
        if w * h > max_pixels:
            raise StudioError(
                f"image '{p}' is too large: {w}x{h} = {w * h} pixels (limit {max_pixels})"
            )
        try:
            im.load()
            out = ImageOps.exif_transpose(im)
        except Image.DecompressionBombError as e:
            raise StudioError(f"cannot read image '{p}': image too large ({_one_line(e)})") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise StudioError(f"cannot read image '{p}': truncated or corrupt ({_one_line(e)})") from e
    except BaseException:
        im.close()
        raise
    if out is not im:
        im.close()
    return out


def _to_float_rgb(im: Image.Image, where: str) -> np.ndarray:
    """PIL image (any mode) → HxWx3 float32 in [0, 1], transparency composited on white."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im).astype(np.float64)
        if mode.startswith("I"):
            a = a / 65535.0  # 16-bit (and 32-bit "I", which PIL uses for 16-bit data) range
        if not np.isfinite(a).all():
            raise StudioError(f"cannot read image '{where}': contains NaN or Inf pixel values")
        a = np.clip(a, 0.0, 1.0).astype(np.float32)
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "P":
        im = im.convert("RGB")
    if mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        a = np.asarray(im).astype(np.float32) / 255.0
        alpha = a[:, :, 3:4]
        return a[:, :, :3] * alpha + (1.0 - alpha)
    if im.mode != "RGB":
        im = im.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV, ...
    return np.asarray(im).astype(np.float32) / 255.0


def load_image(
    path: PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    mode: Literal["RGB", "L"] = "RGB",
) -> torch.Tensor:
    """Load an image file as a float32 tensor in [0, 1].

    ``mode="RGB"`` → ``(1, 3, H, W)``; ``mode="L"`` → ``(1, 1, H, W)`` luminance (ITU-R 601, as PIL),
    e.g. for masks. Greyscale is repeated to RGB, 16-bit data is scaled by 65535, transparency
    (RGBA, LA, palette with transparency) is composited on white, CMYK is converted to RGB.
    """
    if mode not in ("RGB", "L"):
        raise StudioError(f"load_image mode must be 'RGB' or 'L', got {mode!r}")
    im = open_image(path, max_pixels=max_pixels)
    try:
        try:
            a = _to_float_rgb(im, str(path))
        except StudioError:  # a ValueError too: pass it on unchanged
            raise
        except (OSError, ValueError) as e:
            raise StudioError(f"cannot read image '{path}': unsupported image data ({_one_line(e)})") from e
    finally:
        im.close()
    if mode == "L":
        a = (a[:, :, 0] * 0.299 + a[:, :, 1] * 0.587 + a[:, :, 2] * 0.114)[:, :, None]
        a = np.clip(a, 0.0, 1.0)
    return numpy_to_tensor(a)


# --------------------------------------------------------------------------------------------- conversion


def image_to_numpy(t: torch.Tensor) -> np.ndarray:
    """``(1, C, H, W)`` or ``(C, H, W)`` tensor → ``H x W x C`` float32 array (values unchanged)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"image_to_numpy expects a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise StudioError(f"expected one image (batch 1), got tensor of shape {tuple(t.shape)}")
        t = t[0]
    if t.dim() != 3:
        raise StudioError(f"expected image tensor (1,C,H,W) or (C,H,W), got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.float32).permute(1, 2, 0).contiguous().numpy()


def numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    """``H x W x C`` or ``H x W`` array → ``(1, C, H, W)`` float32 tensor.

    Float arrays are taken as [0, 1] values unchanged; uint8 is divided by 255, uint16 by 65535.
    """
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise StudioError(f"expected an H x W x C or H x W array, got shape {a.shape}")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    else:
        a = a.astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]


# --------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PendingFile:
    """One output, validated and encoded, not yet written: :func:`write_set` writes a run's files together."""

    path: Path
    write: Callable[[Any], None]  # write(fileobj)
    binary: bool


def _checked_target(path: PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        raise StudioError(f"cannot write '{p}': is a directory")
    return p


def write_set(files: list[PendingFile]) -> list[Path]:
    """Write a run's outputs as a set: every file to a temporary file beside it first (fsynced), then all
    renamed into place, the last one (the run's JSON sidecar, by convention) last. A failure while writing
    the temporaries leaves every target as it was; nothing half-written is ever visible under a target name.
    Returns the paths."""
    staged: list[tuple[str, Path]] = []
    try:
        for f in files:
            staged.append((_stage(f), f.path))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException as e:
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError):
            where = e.filename or (files[len(staged)].path if len(staged) < len(files) else "")
            raise StudioError(f"cannot write '{where}': {_one_line(e.strerror or e)}") from e
        raise
    return [f.path for f in files]


def staged_temporary_pattern(names: tuple[str, ...] = ()) -> str:
    """A regex (unanchored) for the temporaries :func:`_stage` creates for ``names`` (any name when empty):
    ``.<name>.<8 random characters from mkstemp>.tmp``. What a killed :func:`write_set` leaves behind."""
    name = "|".join(map(re.escape, names)) if names else ".+"
    return rf"\.(?:{name})\.[a-z0-9_]{{8}}\.tmp"


def _stage(f: PendingFile) -> str:
    """``f`` written to a temporary file next to its target; the temporary's name."""
    try:
        f.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=f.path.parent, prefix=f".{f.path.name}.", suffix=".tmp")
    except OSError as e:
        raise StudioError(f"cannot write '{f.path}': {_one_line(e.strerror or e)}") from e
    try:
        with os.fdopen(fd, "wb" if f.binary else "w", **({} if f.binary else {"encoding": "utf-8"})) as fo:
            f.write(fo)
            fo.flush()
            os.fsync(fo.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return tmp


def png_file(tensor: torch.Tensor, path: PathLike) -> PendingFile:
    """A [0, 1] image ``(1, C, H, W)`` or ``(C, H, W)`` (C = 1, 3 or 4) as a pending 8-bit PNG.

    Values are clamped to [0, 1] and rounded; NaN/Inf raises :class:`StudioError`. The path must end in
    ``.png``; parent folders are created when written."""
    p = _checked_target(path)
    if p.suffix.lower() != ".png":
        raise StudioError(f"cannot save image '{p}': only .png output is supported")
    a = image_to_numpy(tensor)
    if not np.isfinite(a).all():
        raise StudioError(f"cannot save image '{p}': image contains NaN or Inf values")
    c = a.shape[2]
    if c not in (1, 3, 4):
        raise StudioError(f"cannot save image '{p}': expected 1, 3 or 4 channels, got {c}")
    u8 = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    im = Image.fromarray(u8[:, :, 0] if c == 1 else u8)  # mode inferred: L, RGB or RGBA
    return PendingFile(p, lambda f: im.save(f, format="PNG"), binary=True)


def json_file(obj: Any, path: PathLike) -> PendingFile:
    """``obj`` as pending JSON (indent 2, key order kept). Torch/numpy scalars become numbers,
    tensors/arrays lists; non-finite floats are written as Python's ``Infinity``/``NaN`` (e.g. PSNR of
    identical images), which ``json.load`` reads back."""
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, default=_json_default) + "\n"
    return PendingFile(_checked_target(path), lambda f: f.write(text), binary=False)


def safetensors_file(tensors: dict[str, torch.Tensor], path: PathLike) -> PendingFile:
    """Tensors as a pending ``.safetensors`` file."""
    from safetensors.torch import save  # lazy: only the writers of exact measurements need it

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    return PendingFile(_checked_target(path), lambda f: f.write(data), binary=True)


def save_image(tensor: torch.Tensor, path: PathLike) -> Path:
    """Save a [0, 1] image as an 8-bit PNG, atomically (:func:`png_file`). Returns the path."""
    return write_set([png_file(tensor, path)])[0]


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        o = o.detach().cpu()
        return o.item() if o.numel() == 1 and o.dim() == 0 else o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    if isinstance(o, (DictConfig, ListConfig)):
        return OmegaConf.to_container(o, resolve=True)
    if isinstance(o, torch.dtype | torch.device):
        return str(o)
    raise TypeError(f"object of type {type(o).__name__} is not JSON serializable")


def to_jsonable(obj: Any) -> Any:
    """Convert torch/numpy scalars and arrays, paths and configs (recursively) into JSON types."""
    return json.loads(json.dumps(obj, default=_json_default))


def write_json_atomic(obj: Any, path: PathLike) -> Path:
    """Write ``obj`` as JSON (:func:`json_file`), atomically. Returns the path."""
    return write_set([json_file(obj, path)])[0]


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PendingFile",
    "json_file",
    "png_file",
    "safetensors_file",
    "write_set",
    "image_to_numpy",
    "load_image",
    "numpy_to_tensor",
    "open_image",
    "save_image",
    "to_jsonable",
    "write_json_atomic",
]


def measurement_display(y: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """A measurement shown as an RGB image of the clean image's size: grey → RGB, SR upsampled (nearest)."""
    y = y.detach().float().clamp(0, 1)
    if y.shape[1] == 1:
        y = y.expand(-1, 3, -1, -1)
    if tuple(y.shape[-2:]) != tuple(image_size):
        y = torch.nn.functional.interpolate(y, size=tuple(image_size), mode="nearest")
    return y
