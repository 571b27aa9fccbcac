"""Inversion and prompt-based editing workflows (``studio invert``, ``studio edit`` and the app call these).

``invert`` encodes an image, inverts it with DDIM, Newton–Raphson or null-text inversion under a source
prompt, and regenerates it with the same prompt and guidance to measure how faithful the inversion is.
``edit`` inverts under the source prompt and regenerates with the *target* prompt from the same latent,
with the same schedule, strength and guidance handling (and, for null-text inversion, the same per-step
unconditional embeddings). By default the edit is attention-controlled (prompt-to-prompt,
:mod:`solvers.inversion.attention_control`): the reconstruction and the edit run as one batch and the edit
takes the reconstruction's attention maps, so layout and identity stay and only what the changed words say
changes; ``control="none"`` is the plain regeneration. ``interpolate`` regenerates from a spherical
interpolation of two inverted latents. Images at the API are (1, 3, H, W) in [0, 1]; H and W must be
multiples of the VAE factor.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from models.latent_prior import LatentDiffusionPrior
from models.loading import as_prior
from solvers.inversion import INVERTERS, WORKFLOW_ARGS, get_inverter
from solvers.inversion.attention_control import (CONTROL_MODES, ControlSettings, controlled_regeneration,
                                                 pixel_blend, resolved_mode)
from solvers.inversion.ddim import Inversion, regenerate
from studio.core.config import load_params, merge_overrides, solver_schema
from studio.core.conventions import to_image, to_model
from studio.core.errors import StudioError
from studio.core.io import json_file, load_image, png_file, save_image, write_json_atomic, write_set
from studio.core.metrics import image_metrics
from studio.workflows.restoration import refuse_overwriting_inputs

Tensor = torch.Tensor

__all__ = ["CONTROL_MODES", "INVERTERS", "Edited", "Inverted", "control_settings", "default_edit_guidance",
           "edit", "edit_files",
           "interpolate", "invert", "invert_files", "method_params", "save_inversion", "slerp"]


@dataclass
class Inverted:
    inversion: Inversion
    reconstruction: Tensor  # [0, 1]
    record: dict


@dataclass
class Edited:
    image: Tensor  # [0, 1]
    reconstruction: Tensor  # [0, 1], regenerated with the source prompt
    record: dict
    mask: Tensor | None = None  # (1, 1, H, W) local-blend mask (1 = edited region); None without a blend


def latent_prior_for(model, device: str | None = None,
                     refusal: str = "inversion and editing need a latent (Stable-Diffusion-style) model"):
    """``model`` (a name, a path, a loaded ``StableDiffusionPipeline`` whose modules are used as they are, or
    an already loaded prior; None: the default text-to-image model) as a latent prior; anything else is
    refused with ``refusal``. ``device`` None: CPU for a name, where the pipeline is for a pipeline."""
    prior = as_prior(model, latent=True, device=device)
    if not isinstance(prior, LatentDiffusionPrior):
        raise StudioError(refusal)
    return prior


def check_image(image: Tensor) -> Tensor:
    """One RGB image (1, 3, H, W) with finite values, as float in [0, 1]; anything else raises."""
    if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[:2] != (1, 3):
        shape = tuple(getattr(image, 'shape', ()))
        raise StudioError(f"expected one RGB image of shape (1, 3, H, W), got {shape}")
    if not torch.isfinite(image).all():
        raise StudioError("the image contains NaN or Inf values")
    return image.float().clamp(0, 1)


def _inverted(prior, image: Tensor, prompt: str, method: str, steps: int | None, guidance: float | None,
              strength: float, params: dict | None) -> tuple[Inversion, Tensor]:
    """The inversion of ``image`` (checked) under ``prompt``, and its clean latent E(x)."""
    fn, default_guidance = get_inverter(method)
    guidance = default_guidance if guidance is None else float(guidance)
    kwargs = dict(params or {})
    if steps is not None:
        if not isinstance(steps, int) or steps <= 0:
            raise StudioError(f"steps must be a positive integer, got {steps!r}")
        kwargs["steps"] = steps
    with torch.no_grad():
        z0 = prior.encode(to_model(image.to(prior.device)))
    try:
        return fn(prior, z0, prompt=prompt, guidance=guidance, strength=strength, **kwargs), z0
    except TypeError as err:
        raise StudioError(f"{method} inversion: {err}") from None


def _record(prior, inv: Inversion, z0: Tensor, reconstruction: Tensor, image: Tensor, start: float) -> dict:
    with torch.no_grad():
        vae_only = to_image(prior.decode(z0)).clamp(0, 1).cpu()
    return {
        **inv.record,
        "prompt": inv.prompt,
        "model": prior.describe(),
        "total_time_s": time.perf_counter() - start,
        "metrics": image_metrics(reconstruction, image.cpu()),
        "vae_roundtrip_metrics": image_metrics(vae_only, image.cpu()),  # the ceiling any inversion can reach
    }


def _decoded(prior, z: Tensor) -> Tensor:
    with torch.no_grad():
        return to_image(prior.decode(z)).clamp(0, 1).cpu()


def invert(image: Tensor, *, prompt: str = "", method: str = "newton", steps: int | None = None,
           guidance: float | None = None, strength: float = 1.0, model: str | Any | None = None,
           device: str | None = None, params: dict | None = None) -> Inverted:
    """Invert ``image`` under ``prompt``; the record holds NFE, time and reconstruction PSNR/SSIM."""
    prior = latent_prior_for(model, device)
    image = check_image(image)
    start = time.perf_counter()
    inv, z0 = _inverted(prior, image, prompt, method, steps, guidance, strength, params)
    rec = _decoded(prior, regenerate(prior, inv))
    return Inverted(inversion=inv, reconstruction=rec, record=_record(prior, inv, z0, rec, image, start))


def control_settings(control: str | None = "auto", overrides=(),
                     method: str | None = None) -> ControlSettings:
    """The attention control for an edit: ``configs/edit/attention_control.yaml``'s ``params`` ← its
    ``per_method`` settings for inversion ``method`` (None: none) ← ``control`` (the mode; None keeps the
    file's) ← ``overrides`` (``key=value`` strings or a mapping), checked."""
    defaults = load_params("edit", "attention_control")
    if method is not None:
        per_method = load_params("edit", "attention_control", "per_method").get(method) or {}
        defaults = merge_overrides(ControlSettings, defaults, per_method,
                                   f"configs/edit/attention_control.yaml per_method.{method}")
    values = merge_overrides(ControlSettings, defaults, overrides or (), "attention control")
    if control is not None:
        values["mode"] = control
    return ControlSettings(**values)


def describe_injection(control: dict) -> str:
    """How long the edit took the source's attention, from a record's ``control`` settings, for the CLI's
    and the app's summaries."""
    edited = control.get("cross_replace_edited")
    words = "" if edited is None else f" (the edited words {edited:.0%})"
    return (f"cross-attention from the source for {control['cross_replace']:.0%} of the steps{words}, "
            f"self-attention for {control['self_replace']:.0%}")


def default_edit_guidance(method: str) -> float | None:
    """The edit branch's guidance under attention control for inversion ``method``, from
    ``configs/edit/attention_control.yaml`` (``edit_guidance``); None: the inversion's own guidance."""
    value = load_params("edit", "attention_control", "edit_guidance").get(method)
    if value is not None and not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
        raise StudioError(f"configs/edit/attention_control.yaml: edit_guidance.{method} must be a number "
                          f">= 0, got {value!r}")
    return None if value is None else float(value)


def edit(image: Tensor, *, source_prompt: str, target_prompt: str, method: str = "newton",
         steps: int | None = None, guidance: float | None = None, strength: float = 1.0,
         model: str | Any | None = None, device: str | None = None, params: dict | None = None,
         control: str | None = "auto", control_params=(), edit_guidance: float | None = None) -> Edited:
    """Invert under ``source_prompt``, then regenerate the reconstruction (source prompt, the inversion's
    guidance) and the edit (``target_prompt``, guidance ``edit_guidance``; None: the inversion's) from the
    same latent; with attention ``control`` other than ``"none"`` both run in one batch and the edit takes
    the source branch's attention (prompt-to-prompt, see :mod:`solvers.inversion.attention_control`).
    ``control_params``: overrides of its settings. Under attention control ``edit_guidance`` None is
    :func:`default_edit_guidance` (the config's per-method value); without it, the inversion's guidance
    (a plain regeneration at a higher guidance loses the image: docs/bench/edit-tuning)."""
    if edit_guidance is not None and not (0 <= float(edit_guidance) < float("inf")):
        raise StudioError(f"edit guidance must be a finite number >= 0, got {edit_guidance}")
    prior = latent_prior_for(model, device)
    image = check_image(image)
    settings = control_settings(control, control_params, method)
    if edit_guidance is None and settings.mode != "none":
        get_inverter(method)  # an unknown method: its own error first
        edit_guidance = default_edit_guidance(method)
    start = time.perf_counter()
    inv, z0 = _inverted(prior, image, source_prompt, method, steps, guidance, strength, params)
    edit_start = time.perf_counter()
    mask = None
    if settings.mode == "none":
        z_rec = regenerate(prior, inv)
        z_edit = regenerate(prior, inv, prompt=target_prompt, guidance=edit_guidance)
        mode = "none"
    else:
        z_rec, z_edit, mask = controlled_regeneration(prior, inv, target_prompt, settings, edit_guidance)
        mode = resolved_mode(settings.mode, source_prompt, target_prompt)
    rec, edited = _decoded(prior, z_rec), _decoded(prior, z_edit)
    if mask is not None and settings.pixel_blend:
        edited = pixel_blend(edited, rec, mask)
    if mask is not None:
        mask = torch.nn.functional.interpolate(mask.float().cpu(), size=image.shape[-2:], mode="nearest")
    w_edit = inv.guidance if edit_guidance is None else float(edit_guidance)
    if mode == "none":
        nfe = len(inv.grid) * ((2 if inv.guidance != 1.0 else 1) + (2 if w_edit != 1.0 else 1))
    else:  # one batch of both rows: guided rows for both when either branch is guided
        nfe = len(inv.grid) * (4 if inv.guidance != 1.0 or w_edit != 1.0 else 2)
    record = {**_record(prior, inv, z0, rec, image, start), "source_prompt": source_prompt,
              "target_prompt": target_prompt, "edit_guidance": w_edit,
              "edit_time_s": time.perf_counter() - edit_start,
              "edit_nfe": nfe,  # reconstruction + edit
              "control": {**asdict(settings), "mode": mode},
              "mask_fraction": None if mask is None else float(mask.mean())}
    return Edited(image=edited, reconstruction=rec, record=record, mask=mask)


def slerp(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """Spherical interpolation (Shoemake 1985), the usual path between Gaussian latents."""
    cos = float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    if theta < 1e-4:
        return (1 - alpha) * a + alpha * b
    return (math.sin((1 - alpha) * theta) * a + math.sin(alpha * theta) * b) / math.sin(theta)


def interpolate(first: Inverted, second: Inverted, alphas=(0.0, 0.25, 0.5, 0.75, 1.0), *,
                prompt: str | None = None, model: str | Any | None = None,
                device: str | None = None) -> list[Tensor]:
    """Regenerate from slerp(z_a, z_b, α) for each α (both inverted with the same method and grid)."""
    prior = latent_prior_for(model, device)
    a, b = first.inversion, second.inversion
    if a.grid != b.grid or a.null_embeddings is not None or b.null_embeddings is not None:
        raise StudioError(
            "interpolate needs two DDIM/Newton inversions made with the same steps and strength"
        )
    out = []
    for alpha in alphas:
        mixed = Inversion(z_start=slerp(a.z_start, b.z_start, alpha), trajectory=[], grid=a.grid,
                          prompt=a.prompt if prompt is None else prompt, guidance=a.guidance)
        with torch.no_grad():
            out.append(to_image(prior.decode(regenerate(prior, mixed))).clamp(0, 1).cpu())
    return out


# ---------------------------------------------------------------------------------------- files (CLI)


def method_params(method: str, overrides) -> dict:
    """``key=value`` overrides of inversion ``method``'s parameters (``newton_steps=3``), checked against its
    signature (unknown keys and bad values raise, naming the key) → the keyword arguments it is called with.

    Prompt, guidance and strength are the workflow's own arguments, not overrides."""
    fn, _ = get_inverter(method)
    return merge_overrides(solver_schema(fn, WORKFLOW_ARGS), None, overrides or (), f"inversion {method}",
                           unknown=lambda key, known: f"unknown {method} parameter {key!r} "
                                                      f"(known: {', '.join(known)})")


def save_inversion(inv: Inversion, path: Path) -> None:
    tensors = {"z_start": inv.z_start.detach().cpu().contiguous()}
    for i, e in enumerate(inv.null_embeddings or []):
        tensors[f"null.{i}"] = e.detach().float().cpu().contiguous()
    meta = {"grid": ",".join(map(str, inv.grid)), "prompt": inv.prompt, "guidance": str(inv.guidance)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def invert_files(input_path: str, output: str, *, prompt: str = "", method: str = "newton",
                 steps: int | None = None, guidance: float | None = None, strength: float = 1.0,
                 model: str | None = None,
                 device: str = "cpu", overrides=(), argv: list[str] | None = None) -> dict:
    """Writes the reconstruction PNG, the inverted latent (.safetensors) and a JSON sidecar."""
    out = Path(output).with_suffix(".png")
    image = load_image(input_path)
    res = invert(image, prompt=prompt, method=method, steps=steps, guidance=guidance, strength=strength,
                 model=model, device=device, params=method_params(method, overrides))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_inversion(res.inversion, out.with_suffix(".safetensors"))
    save_image(res.reconstruction, out)
    record = {"kind": "inversion", "input": input_path, "output": out.name,
              "latent": out.with_suffix(".safetensors").name, "command": argv, **res.record}
    write_json_atomic(record, out.with_suffix(".json"))
    return record


def edit_files(input_path: str, output: str, *, source_prompt: str, target_prompt: str,
               method: str = "newton", steps: int | None = None, guidance: float | None = None,
               strength: float = 1.0, model: str | None = None, device: str = "cpu", overrides=(),
               control: str | None = "auto", control_params=(), edit_guidance: float | None = None,
               argv: list[str] | None = None) -> dict:
    """Writes, as one set, the edit PNG, the source-prompt reconstruction (``.reconstruction.png``), the
    local-blend mask (``.mask.png``, white = edited region; when the control blends) and a JSON sidecar."""
    out = Path(output).with_suffix(".png")
    names = {"reconstruction": out.with_name(out.stem + ".reconstruction.png"),
             "mask": out.with_name(out.stem + ".mask.png"), "record": out.with_suffix(".json")}
    refuse_overwriting_inputs([out, *names.values()], {"input image": input_path})
    image = load_image(input_path)
    res = edit(image, source_prompt=source_prompt, target_prompt=target_prompt, method=method, steps=steps,
               guidance=guidance, strength=strength, model=model, device=device,
               params=method_params(method, overrides), control=control, control_params=control_params,
               edit_guidance=edit_guidance)
    record = {"kind": "edit", "input": input_path, "output": out.name,
              "reconstruction": names["reconstruction"].name,
              "mask": names["mask"].name if res.mask is not None else None, "command": argv, **res.record}
    files = [png_file(res.image, out), png_file(res.reconstruction, names["reconstruction"])]
    if res.mask is not None:
        files.append(png_file(res.mask.expand(1, 3, -1, -1), names["mask"]))
    write_set(files + [json_file(record, names["record"])])
    return record
