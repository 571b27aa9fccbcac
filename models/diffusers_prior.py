"""Pixel-space priors from diffusers: any ``UNet2DModel`` with its scheduler.

Loading follows ``DDPMPipeline.from_pretrained``: a hub id or a local folder holding ``model_index.json``,
``unet/`` and ``scheduler/``. Nothing is downloaded when ``HF_HUB_OFFLINE=1`` (the project's default, see
:func:`load_pixel_prior`); a model that is not on disk gives a :class:`~studio.core.errors.ModelLoadError`
with one line saying what to do, not a traceback.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

from models.base import DiffusionPrior, Prediction, split_prediction
from models.registry import resolve_model_path
from studio.core.errors import ModelLoadError

Tensor = torch.Tensor

# diffusers and transformers load weights by building modules on the meta device inside accelerate's
# ``init_empty_weights``, which patches ``nn.Module.register_parameter`` for the whole process while it
# lasts: a module built in another thread meanwhile (a second load in the web app, a token embedding
# resized by a training run) gets meta tensors. Every load in this project holds this lock; code that
# builds modules beside a running app (the tests' fixtures) takes it too.
MODULE_BUILD_LOCK = threading.RLock()


class DiffusersPixelPrior(DiffusionPrior):
    """Wraps ``UNet2DModel`` + scheduler. The UNet's learned-variance channels, if any, are dropped."""

    clip_denoised = True

    def __init__(self, unet: torch.nn.Module, scheduler, source: str = "<in memory>"):
        super().__init__(torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64))
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler.config)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.source = source
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        h, w = (size, size) if isinstance(size, int) else size
        self.sample_shape = (cfg.in_channels, h, w)
        self.learned_variance = learned_variance_of(unet, scheduler)
        self.variance_type = str(scheduler.config.get("variance_type", "fixed_small"))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def trained_image_size(self) -> tuple[int, int]:
        return tuple(self.sample_shape[1:])

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the UNet accepts are multiples of this (one halving per down block)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def _predict(self, x_t: Tensor, t: int | Tensor) -> Prediction:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        h, w = x_t.shape[-2:]
        k = self.size_multiple
        pad_h, pad_w = (-h) % k, (-w) % k
        inp = x_t.to(self.dtype)
        if pad_h or pad_w:
            # Odd sizes: replicate-pad to the UNet's multiple and crop back. The padded border is an
            # approximation (it is not a sample of the forward process), confined to the last rows/cols.
            inp = torch.nn.functional.pad(inp, (0, pad_w, 0, pad_h), mode="replicate")
        out = self.unet(inp, t).sample[..., :h, :w].to(x_t.dtype)
        c = x_t.shape[1]
        pred = split_prediction(out[:, :c], x_t, self.alpha_bar(t, x_t), self.prediction_type)
        if self.learned_variance:  # 2C output channels: the mean part, then the variance interpolation
            pred.variance_logit = out[:, c:2 * c]
        return pred

    def describe(self) -> dict:
        return {
            **super().describe(),
            "source": self.source,
            "prediction_type": self.prediction_type,
            "sample_shape": list(self.sample_shape),
            "scheduler": self.scheduler_config.get("_class_name"),
        }


def learned_variance_of(unet, scheduler) -> bool:
    """Whether the UNet's extra output channels are guided-diffusion's learned variance: twice the input
    channels and a scheduler that says ``learned`` / ``learned_range`` (a converted ADM checkpoint)."""
    variance_type = str(scheduler.config.get("variance_type", ""))
    doubled = int(unet.config.out_channels) == 2 * int(unet.config.in_channels)
    return doubled and variance_type.startswith("learned")


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def open_pipeline(name_or_path: str):
    """``DiffusionPipeline.from_pretrained`` by registered name, local folder or hub id, offline, safetensors
    only; every failure becomes a one-line :class:`ModelLoadError`. Returns ``(pipeline, source)``."""
    source = resolve_model_path(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        raise ModelLoadError(
            f"model path '{source}' is a file; give the pipeline folder (with model_index.json)"
        )
    if not path.exists() and not _is_hub_id(source):
        raise ModelLoadError(f"model folder '{source}' does not exist")
    if path.is_dir() and not (path / "model_index.json").exists():
        raise ModelLoadError(f"'{source}' is not a diffusers pipeline folder: model_index.json is missing")
    try:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        from transformers.utils import logging as transformers_logging

        # "Loading pipeline components" / "Loading weights" bars would clutter the one-line CLI output
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        try:
            with MODULE_BUILD_LOCK:
                pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else source,
                                                         use_safetensors=True, **absent_components(path))
        finally:
            diffusers_logging.enable_progress_bar()
            transformers_logging.enable_progress_bar()
    except (OSError, EnvironmentError) as err:
        if not path.exists():
            raise ModelLoadError(
                f"cannot load '{source}': not found locally and the hub is unreachable offline "
                f"(download it on a connected machine and pass the folder)"
            ) from err
        raise ModelLoadError(f"cannot load '{source}': {str(err).splitlines()[0]}") from err
    except Exception as err:  # corrupt safetensors, bad config JSON, ...
        raise ModelLoadError(
            f"cannot load '{source}': {type(err).__name__}: {str(err).splitlines()[0]}"
        ) from err
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe, str(source)


def absent_components(path: Path) -> dict:
    """Components a saved folder lists as [null, null] (e.g. an SD3 pipeline saved without its optional T5
    encoder): diffusers saves them that way but refuses to load them unless each is passed as None."""
    index = path / "model_index.json"
    try:
        listed = json.loads(index.read_text()) if index.is_file() else {}
    except (OSError, ValueError):
        return {}  # from_pretrained reports the broken file
    return {k: None for k, v in listed.items() if isinstance(v, list) and v and all(x is None for x in v)}


def is_pipeline(obj) -> bool:
    """A loaded diffusers pipeline (``DDPMPipeline``, ``StableDiffusionPipeline``, ...) or any object holding
    its components as attributes: not a name, a path or a prior."""
    if obj is None or isinstance(obj, (str, os.PathLike)) or hasattr(obj, "alphas_cumprod"):
        return False
    return isinstance(getattr(obj, "components", None), dict) or hasattr(obj, "unet")


def pipeline_source(pipe) -> str:
    """What a loaded pipeline came from: its config's ``_name_or_path`` when set, else its class name."""
    config = getattr(pipe, "config", None)
    name = config.get("_name_or_path") if hasattr(config, "get") else None
    return str(name) if name else type(pipe).__name__


def use_or_open_pipeline(model):
    """``(pipeline, source)``: a loaded pipeline as it is (nothing copied, nothing moved), or
    :func:`open_pipeline` for a registered name, folder or hub id."""
    if is_pipeline(model):
        return model, pipeline_source(model)
    return open_pipeline(model)


def load_pixel_prior(
    name_or_path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> DiffusersPixelPrior:
    """Load a pixel prior by registered name, local folder or hub id (offline unless HF_HUB_OFFLINE=0), or
    wrap an already loaded pipeline (``DDPMPipeline``, ``DDIMPipeline``, any pipeline with a ``unet`` and a
    DDPM-type ``scheduler``).

    ``device`` / ``dtype`` None: CPU and float32 for a name or folder; for a pipeline object, keep its
    modules where and as they are (the prior uses the very same UNet, no copy). An explicit device or dtype
    moves the UNet in place, as ``pipe.to`` does.

    Raises:
        ModelLoadError: the folder is missing or incomplete, the weights are corrupt, the hub id is
            not in the local cache (no machine here reaches a model hub), or the pipeline has no
            unconditional pixel UNet + scheduler.
    """
    loaded = is_pipeline(name_or_path)
    pipe, source = use_or_open_pipeline(name_or_path)
    if not loaded:
        device, dtype = device or "cpu", dtype or torch.float32
    unet, scheduler = getattr(pipe, "unet", None), getattr(pipe, "scheduler", None)
    if unet is None or scheduler is None or not hasattr(scheduler, "alphas_cumprod"):
        raise ModelLoadError(f"'{source}' has no unet + DDPM-type scheduler (it is a {type(pipe).__name__})")
    if getattr(unet.config, "in_channels", None) is None or hasattr(unet.config, "cross_attention_dim"):
        raise ModelLoadError(f"'{source}' is not an unconditional pixel-space UNet2DModel pipeline (a "
                             f"text-to-image model works with the latent solvers: p2l, psld, latent-dps)")
    return DiffusersPixelPrior(to_device(unet, device, dtype), scheduler, source=str(source))


def to_device(module: torch.nn.Module, device, dtype: torch.dtype | None) -> torch.nn.Module:
    """Move ``module`` in place, only where it differs (diffusers warns on a no-op cast); ``device`` or
    ``dtype`` None keeps that as it is."""
    current = next(module.parameters())
    change = {}
    if device is not None and torch.device(device) != current.device:
        change["device"] = device
    if dtype is not None and dtype != current.dtype:
        change["dtype"] = dtype
    return module.to(**change) if change else module
