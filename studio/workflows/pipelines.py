"""diffusers-native pipelines around the solvers: :class:`PixelRestorationPipeline`,
:class:`LatentRestorationPipeline`, :class:`FlowRestorationPipeline` (Stable-Diffusion-3-style models) and
:class:`NewtonInversionPipeline`.

Each is a ``diffusers.DiffusionPipeline`` (``from_pretrained``, ``save_pretrained``, ``from_pipe``, ``to``,
``set_progress_bar_config``) holding the usual components, and runs the project's solvers on them through the
prior interface (:func:`models.loading.as_prior`): the pipeline's UNet, VAE and text encoder are used as they
are, never copied::

    ddpm = DDPMPipeline.from_pretrained("models/weights/emoji-pixel")
    pipe = PixelRestorationPipeline.from_pipe(ddpm)          # shares ddpm.unet and ddpm.scheduler
    out = pipe(measurement=y, operator=make_operator("super_resolution", factor=2), solver="dps",
               num_inference_steps=50, generator=torch.Generator().manual_seed(0))
    out.images[0]                                            # a PIL image; out.record: NFE, residual, seed
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (AutoencoderKL, DiffusionPipeline, StableDiffusion3Pipeline, UNet2DConditionModel,
                       UNet2DModel)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import CLIPTextModel, CLIPTokenizer

from models.diffusers_prior import absent_components, pipeline_source
from models.loading import as_prior
from models.registry import resolve_model_path
from solvers import SolverInfo, get_solver, solver_config
from solvers.common import check_measurement as check_operator_measurement
from solvers.common import latent_image_shape, signal_shape
from solvers.inversion.ddim import Inversion
from studio.core.config import list_tasks, load_task, merge_overrides, to_plain
from studio.core.errors import ModelLoadError, StudioError
from studio.core.io import numpy_to_tensor
from studio.core.tasks import build_operator
from studio.workflows.editing import invert, method_params

Tensor = torch.Tensor
OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class RestorationPipelineOutput(ImagePipelineOutput):
    """diffusers' image output (``images``: PIL images, an (B, H, W, C) array or a (B, C, H, W) tensor in
    [0, 1]) and the solver's run record (NFE, wall time, residual, the seed used)."""

    record: dict | None = None


@dataclass
class InversionPipelineOutput(BaseOutput):
    """The inverted latents z_T (``latents``), the reconstruction regenerated from them (``images``), the
    full :class:`~solvers.inversion.ddim.Inversion` (to regenerate or edit with another prompt) and the
    record (NFE, time, reconstruction PSNR/SSIM)."""

    latents: Tensor
    images: Any
    inversion: Inversion
    record: dict


# ------------------------------------------------------------------------------------------ inputs


def image_tensor(image, what: str = "measurement") -> Tensor:
    """What a diffusers user passes as an image → a float32 (B, C, H, W) tensor in [0, 1]: a tensor (C, H, W)
    or (B, C, H, W) in [0, 1], a PIL image or a list of them (mode ``L`` stays one channel, anything else is
    RGB), or a numpy array (H, W), (H, W, C) or (B, H, W, C) (uint8 is divided by 255, floats are [0, 1])."""
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, PIL.Image.Image) for i in image):
        image = torch.cat([numpy_to_tensor(np.asarray(i if i.mode == "L" else i.convert("RGB")))
                           for i in image])
    elif isinstance(image, np.ndarray):
        batch = list(image) if image.ndim == 4 else [image]
        image = torch.cat([numpy_to_tensor(a) for a in batch])
    if not isinstance(image, Tensor):
        raise StudioError(f"{what} must be a tensor, a PIL image or a numpy array, "
                          f"got {type(image).__name__}")
    image = image[None] if image.dim() == 3 else image
    if image.dim() != 4:
        raise StudioError(f"{what} must be (B, C, H, W) or (C, H, W), got shape {tuple(image.shape)}")
    image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    if not torch.isfinite(image).all():
        raise StudioError(f"{what} contains NaN or Inf values")
    return image


def seed_from(generator) -> int | None:
    """The solver seed a ``torch.Generator`` stands for (the solvers take an int seed and draw all their noise
    from ``torch.Generator().manual_seed(seed)``).

    A generator fresh from ``manual_seed(s)`` gives ``s`` itself, so ``generator=torch.Generator()
    .manual_seed(0)`` reproduces ``seed=0`` of the solver functions and :func:`~studio.workflows.restore`;
    a generator that has been used gives a seed drawn from it. Either way the generator is advanced, so
    reusing one object gives a new sample each call, as in diffusers, and the same state the same result.
    None: a random seed (recorded in the output's record)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1:
            raise StudioError(f"pass one generator (the solvers take one seed per call), "
                              f"got {len(generator)}")
        generator = generator[0]
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise StudioError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    fresh = torch.Generator(device=generator.device).manual_seed(generator.initial_seed())
    if torch.equal(fresh.get_state(), generator.get_state()):
        seed = generator.initial_seed()
        torch.randint(0, 2, (1,), generator=generator, device=generator.device)  # advance it
    else:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
    return int(seed)


def task_operator(name: str, options: dict | None, y: Tensor, size: tuple[int, int] | None, seed: int | None):
    """Operator ``name`` (a task: its config's operator block, e.g. ``super_resolution`` factor 4; or any
    registered operator) with ``options`` over it, for images of ``size`` (default: y's size, times the factor
    for super-resolution); random parts (box position, pixel mask) come from ``seed``, as in ``restore``."""
    spec = to_plain(load_task(name).operator) if name in list_tasks() else {"name": name}
    spec.update(options or {})
    if size is None:
        factor = int(spec.get("factor", 1)) if spec["name"] == "super_resolution" else 1
        size = (y.shape[-2] * factor, y.shape[-1] * factor)
    return build_operator(spec, size, 0 if seed is None else seed)


def check_measurement(operator, y: Tensor, x_shape: tuple[int, ...], channels: int) -> None:
    """One line when ``y`` is not what ``operator`` makes of an image of ``x_shape`` for this model."""
    c = x_shape[-3]
    if c != channels:
        raise StudioError(f"a measurement of shape {tuple(y.shape)} comes from a {c}-channel image under "
                          f"this operator, but the model makes {channels}-channel images")
    check_operator_measurement(operator, y, x_shape)


# ---------------------------------------------------------------------------------------- restoring


def _solver_params(solver: str, info: SolverInfo, task: str | None, extra: dict) -> dict:
    """The solver's defaults for ``task`` (per-task YAML) ← the call's keyword arguments, checked."""
    defaults = to_plain(solver_config(solver, task))
    return merge_overrides(info.fn, defaults, extra, f"solver {solver}",
                           unknown=lambda key, known: f"unknown {solver} parameter {key!r} "
                                                      f"(known: {', '.join(known)})")


def postprocess(images: Tensor, output_type: str, pipe: DiffusionPipeline):
    """[0, 1] (B, C, H, W) → diffusers' ``output_type``: ``pt`` (the tensor, CPU), ``np`` (B, H, W, C)
    float32, ``pil`` (a list of PIL images)."""
    images = images.detach().float().clamp(0, 1).cpu()
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).numpy()
    return array if output_type == "np" else pipe.numpy_to_pil(array)


def with_text(solver_params: dict, prompt: str | None, guidance_scale: float | None) -> dict:
    """The solver parameters with a latent pipeline's ``prompt`` and ``guidance_scale`` (when given) as the
    solver's ``prompt`` and ``guidance``."""
    text = {"prompt": prompt, "guidance": guidance_scale}
    return {**solver_params, **{k: v for k, v in text.items() if v is not None}}


class _SharesModules:
    """``from_pipe``, ``from_pretrained`` and ``save_pretrained`` of the pipelines here (``_latent``: they
    hold a latent model's parts)."""

    _latent = False
    #: components ``from_pipe`` may take as None (SD3 without its T5 encoder)
    _may_be_none: tuple[str, ...] = ()
    #: what a saved folder's model_index.json names: these pipelines add no weights, so the folder is a plain
    #: diffusers one of that class (loadable by diffusers, ``load_pixel_prior`` and ``studio --model`` too)
    _saved_as: dict = {"_class_name": "DDPMPipeline"}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``; a registered model name (``emoji-pixel``, ``emoji-sd``) is read
        from its folder (offline, as everywhere in the project). Components the folder lists as absent (an
        SD3 folder saved without T5) load as None. The checks of :meth:`from_pipe` apply."""
        path = resolve_model_path(str(pretrained_model_name_or_path))
        kwargs = {**absent_components(Path(path)), **kwargs}
        new = super().from_pretrained(path, **kwargs)
        as_prior(new, latent=cls._latent)
        return new

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' ``save_pretrained``; the folder's ``model_index.json`` names the plain diffusers class
        (``DDPMPipeline`` / ``StableDiffusionPipeline``), so any diffusers code loads it, and
        ``from_pretrained`` of this class reads it back as this class."""
        super().save_pretrained(save_directory, **kwargs)
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        config.update(self._saved_as)
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """A new pipeline on ``pipeline``'s modules (shared, nothing loaded or copied).

        With ``torch_dtype`` this is diffusers' ``DiffusionPipeline.from_pipe``, which casts the shared
        modules in place. Without it the modules keep their dtypes: diffusers' own ``from_pipe`` casts every
        module to float32 then (in 0.42.1), which would turn a bfloat16 source pipeline into a float32 one.
        Component keyword arguments replace the source's, as in diffusers."""
        if "torch_dtype" in kwargs or "dtype" in kwargs:
            new = super().from_pipe(pipeline, **kwargs)
        else:
            expected, _ = cls._get_signature_keys(cls)
            parts = {k: kwargs.pop(k) if k in kwargs else getattr(pipeline, k, None) for k in expected}
            if kwargs:
                raise StudioError(f"{cls.__name__}.from_pipe: unexpected arguments {', '.join(kwargs)}")
            missing = [k for k, v in parts.items() if v is None and k not in cls._may_be_none]
            if missing:
                raise ModelLoadError(f"{cls.__name__}.from_pipe: '{pipeline_source(pipeline)}' has no "
                                     f"{', '.join(missing)} (it is a {type(pipeline).__name__})")
            new = cls(**parts)
            name = getattr(pipeline, "config", {}).get("_name_or_path")
            if name:
                new.register_to_config(_name_or_path=name)
        as_prior(new, latent=cls._latent)  # the checks of a loaded folder: one line if it is the wrong kind
        return new


class _Restoration(_SharesModules):
    """The call shared by the restoration pipelines."""

    def _restore(self, measurement, operator, solver: str, num_inference_steps: int | None, generator,
                 output_type: str, return_dict: bool, noise_sigma: float, height: int | None,
                 width: int | None, operator_options: dict | None, callback, params: dict):
        info = get_solver(solver)
        if info.latent != self._latent:
            want = ("LatentRestorationPipeline (or FlowRestorationPipeline for an SD3-style model)"
                    if info.latent else "PixelRestorationPipeline")
            raise StudioError(f"solver {solver!r} runs on a {'latent' if info.latent else 'pixel'} model: "
                              f"use {want}")
        if output_type not in OUTPUT_TYPES:
            raise StudioError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if (height is None) != (width is None):
            raise StudioError("give both height and width (the image size), or neither")
        y, seed = image_tensor(measurement), seed_from(generator)
        size = (int(height), int(width)) if height is not None else None
        task = operator if isinstance(operator, str) else getattr(operator, "name", None)
        if isinstance(operator, str):
            operator = task_operator(operator, operator_options, y, size, seed)
        elif operator_options:
            raise StudioError("operator_options go with an operator name, not an operator object")
        if num_inference_steps is not None:
            params = {**params, "steps": num_inference_steps}
        params = _solver_params(solver, info, task if task in list_tasks() else None, params)
        prior = as_prior(self, latent=self._latent)  # the pipeline's own modules: nothing copied or moved
        y = y.to(prior.device)
        operator = operator.to(prior.device) if hasattr(operator, "to") else operator
        shape_of = latent_image_shape if self._latent else signal_shape
        x_shape = shape_of(y, operator, prior, (y.shape[0], 3 if self._latent else prior.sample_shape[0],
                                                *size) if size else None)
        check_measurement(operator, y, x_shape, 3 if self._latent else prior.sample_shape[0])
        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        result = info.fn(y, operator, prior, noise_sigma=float(noise_sigma), seed=seed, x_shape=x_shape,
                         callback=callback, progress=progress, **params)
        self.maybe_free_model_hooks()
        images = postprocess(result.image, output_type, self)
        record = {**result.record, "model": prior.describe(), "task": task}
        return RestorationPipelineOutput(images=images, record=record) if return_dict else (images, record)


class PixelRestorationPipeline(_Restoration, DiffusionPipeline):
    r"""Restore an image from a measurement y = A(x) + noise with a pixel-space diffusion prior (a
    ``DDPMPipeline``'s UNet2DModel + scheduler) and one of the project's solvers (``dps``, ``ddrm``, ``cdim``,
    ``mcg``, ``ddim``).

    Build it from a loaded pipeline, sharing its modules (``PixelRestorationPipeline.from_pipe(ddpm_pipe)``),
    or from a folder / registered name (``from_pretrained``); ``save_pretrained`` writes a diffusers folder.

    Call arguments:
        measurement: y in [0, 1]: a (1, C, H, W) or (C, H, W) tensor (B rows restore B measurements), a PIL
            image or a numpy array (H, W, C), as diffusers pipelines take images.
        operator: the forward operator A: an operator object (``studio.core.operators.make_operator``, the
            very one that made y when you have it), or a task / operator name (``"super_resolution"``,
            ``"gaussian_blur"``, ``"inpaint_box"``, ...) built with that task's config and
            ``operator_options`` over it (``{"factor": 2}``); random parts (a box position) come from the
            seed, as ``studio.workflows.restore`` draws them.
        solver: a registered pixel solver (default ``dps``); its per-task defaults apply when the operator is
            a task's, and other keyword arguments are its parameters (``scale=0.3``, ``eta=0.85``), checked.
        num_inference_steps: the solver's ``steps`` (None: the solver's default, e.g. DPS's official 1000).
        generator: a ``torch.Generator``; a fresh ``manual_seed(s)`` one reproduces ``seed=s`` of the solver
            functions exactly (see :func:`seed_from`); None draws a random seed (in ``record["params"]``).
        noise_sigma: the Gaussian noise σ of y in [0, 1] units (DDRM, CDIM and MCG use it; default 0).
        height, width: the image size when the operator cannot tell it (nonlinear A); default Aᵀy's size,
            else the model's.
        output_type: ``"pil"`` (default), ``"np"`` or ``"pt"``, as diffusers.
        callback: ``callback(step, total, x_t, x0_hat)`` each step; returning False cancels.
        return_dict: False returns ``(images, record)``.

    Returns:
        :class:`RestorationPipelineOutput` (a ``diffusers.ImagePipelineOutput`` with ``images``, and
        ``record``). Bad input (unknown solver or parameter, a measurement the operator cannot have made, a
        latent solver here) raises a one-line :class:`~studio.core.errors.StudioError`.
    """

    model_cpu_offload_seq = "unet"
    _optional_components: list[str] = []

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def __call__(self, measurement, operator, solver: str = "dps", num_inference_steps: int | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True,
                 noise_sigma: float = 0.0, height: int | None = None, width: int | None = None,
                 operator_options: dict | None = None, callback=None, **solver_params):
        return self._restore(measurement, operator, solver, num_inference_steps, generator, output_type,
                             return_dict, noise_sigma, height, width, operator_options, callback,
                             solver_params)


class _StableDiffusionParts(_SharesModules):
    """The components (and saved form) of the pipelines over a Stable-Diffusion-style model."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _latent = True
    _optional_components: list[str] = []
    _saved_as: dict = {"_class_name": "StableDiffusionPipeline", "safety_checker": [None, None],
                       "feature_extractor": [None, None], "image_encoder": [None, None],
                       "requires_safety_checker": False}

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler)


class _TextRestoration(_Restoration):
    """The call of the restoration pipelines over text-to-image models: :class:`_Restoration`'s arguments
    plus ``prompt`` and ``guidance_scale``; the default solver is the class's ``_default_solver``."""

    _default_solver = ""

    def __call__(self, measurement, operator, solver: str | None = None, prompt: str | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True,
                 noise_sigma: float = 0.0, height: int | None = None, width: int | None = None,
                 operator_options: dict | None = None, callback=None, **solver_params):
        return self._restore(measurement, operator, solver or self._default_solver, num_inference_steps,
                             generator, output_type, return_dict, noise_sigma, height, width,
                             operator_options, callback, with_text(solver_params, prompt, guidance_scale))


class LatentRestorationPipeline(_TextRestoration, _StableDiffusionParts, DiffusionPipeline):
    r"""Restore an image from a measurement with a Stable-Diffusion-style latent prior (VAE, CLIP text encoder
    and tokenizer, conditional UNet, scheduler) and a latent solver (``latent-dps``, ``psld``, ``p2l``).

    ``LatentRestorationPipeline.from_pipe(sd_pipe)`` shares a loaded ``StableDiffusionPipeline``'s modules
    (in whatever device and dtype they are; nothing is copied); ``from_pretrained`` / ``save_pretrained`` as
    diffusers. The call takes the arguments of :class:`PixelRestorationPipeline` (the default solver is
    ``latent-dps``; H and W must be multiples of the VAE factor) and:

        prompt: the text conditioning of the solver (default ``""``); P2L tunes it.
        guidance_scale: classifier-free guidance w of the UNet calls (default 1: the conditional model only).
    """

    _default_solver = "latent-dps"


class FlowRestorationPipeline(_TextRestoration, StableDiffusion3Pipeline):
    r"""Restore an image from a measurement with a Stable-Diffusion-3-style flow-matching model (SD3
    transformer, VAE with shift and scaling factors, CLIP-L / CLIP-G and the optional T5 text encoder, a
    ``FlowMatchEulerDiscreteScheduler``) and a latent solver that runs on flow models (``flair``, the
    default, ``latent-dps``, ``psld``, ``resample``; see ``studio list``). The solvers see the model through
    the exact Gaussian-path equivalence of :mod:`models.flow_prior`.

    ``FlowRestorationPipeline.from_pipe(sd3_pipe)`` shares a loaded ``StableDiffusion3Pipeline``'s modules
    (``text_encoder_3`` may be None); ``from_pretrained`` / ``save_pretrained`` as diffusers (a saved folder
    is a plain ``StableDiffusion3Pipeline`` one). It is a ``StableDiffusion3Pipeline``, so its
    ``encode_prompt`` is diffusers' own. The call takes the arguments of :class:`LatentRestorationPipeline`
    (H and W multiples of the VAE factor × the transformer's patch size). P2L and TReg, which optimise or
    batch one text-embedding tensor, are refused with one line.
    """

    _latent = True
    _may_be_none = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
    _saved_as: dict = {"_class_name": "StableDiffusion3Pipeline"}
    _default_solver = "flair"



class NewtonInversionPipeline(_StableDiffusionParts, DiffusionPipeline):
    r"""Invert an image into the latent noise of a Stable-Diffusion-style model by regularised Newton–Raphson
    inversion (:mod:`solvers.inversion.newton`), then regenerate it from that latent.

    ``NewtonInversionPipeline.from_pipe(sd_pipe)`` shares the modules. Call with ``image`` (tensor in
    [0, 1], PIL image or numpy array; H, W multiples of the VAE factor), ``prompt``, ``num_inference_steps``
    (inversion steps, default 10), ``guidance_scale`` (default 1), ``strength`` (invert up to this fraction
    of the schedule), ``output_type`` for the reconstruction and Newton parameters as keyword arguments
    (``newton_steps=2``, ``reg_weight=0.1``, ...). Returns :class:`InversionPipelineOutput`: ``latents``
    (z_T), ``images`` (the reconstruction), ``inversion`` and ``record`` (NFE, PSNR/SSIM of the
    reconstruction). Deterministic: no generator.
    """

    def __call__(self, image, prompt: str = "", num_inference_steps: int = 10,
                 guidance_scale: float | None = None, strength: float = 1.0, output_type: str = "pil",
                 return_dict: bool = True, **newton_params):
        if output_type not in OUTPUT_TYPES:
            raise StudioError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        image = image_tensor(image, "image")
        prior = as_prior(self, latent=True)
        res = invert(image, prompt=prompt, method="newton", steps=num_inference_steps,
                     guidance=guidance_scale, strength=strength, model=prior,
                     params=method_params("newton", newton_params))
        self.maybe_free_model_hooks()
        images = postprocess(res.reconstruction, output_type, self)
        out = InversionPipelineOutput(latents=res.inversion.z_start, images=images, inversion=res.inversion,
                                      record=res.record)
        return out if return_dict else out.to_tuple()


__all__ = ["FlowRestorationPipeline", "InversionPipelineOutput", "LatentRestorationPipeline",
           "NewtonInversionPipeline", "PixelRestorationPipeline", "RestorationPipelineOutput", "image_tensor",
           "seed_from", "with_text"]
