"""Inversion and prompt-based editing workflows (``studio invert``, ``studio edit`` and the app call these).

``invert`` encodes an image, inverts it with DDIM, Newton–Raphson or null-text inversion under a source
prompt, and regenerates it with the same prompt and guidance to measure how faithful the inversion is.
``edit`` inverts under the source prompt and regenerates with the *target* prompt from the same latent,
with the same schedule, strength and guidance handling (and, for null-text inversion, the same per-step
unconditional embeddings). ``interpolate`` regenerates from a spherical interpolation of two inverted
latents. Images at the API are (1, 3, H, W) in [0, 1]; H and W must be multiples of the VAE factor.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from models.latent_prior import LatentDiffusionPrior
from models.loading import as_prior
from solvers.inversion import INVERTERS, WORKFLOW_ARGS, get_inverter
from solvers.inversion.ddim import Inversion, regenerate
from studio.core.config import merge_overrides, solver_schema
from studio.core.conventions import to_image, to_model
from studio.core.errors import StudioError
from studio.core.io import load_image, save_image, write_json_atomic
from studio.core.metrics import image_metrics

Tensor = torch.Tensor

__all__ = ["INVERTERS", "Edited", "Inverted", "edit", "edit_files", "interpolate", "invert", "invert_files",
           "method_params", "save_inversion", "slerp"]


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


def invert(image: Tensor, *, prompt: str = "", method: str = "newton", steps: int | None = None,
           guidance: float | None = None, strength: float = 1.0, model: str | Any | None = None,
           device: str | None = None, params: dict | None = None) -> Inverted:
    """Invert ``image`` under ``prompt``; the record holds NFE, time and reconstruction PSNR/SSIM."""
    fn, default_guidance = get_inverter(method)
    guidance = default_guidance if guidance is None else float(guidance)
    prior = latent_prior_for(model, device)
    image = check_image(image)
    kwargs = dict(params or {})
    if steps is not None:
        if not isinstance(steps, int) or steps <= 0:
            raise StudioError(f"steps must be a positive integer, got {steps!r}")
        kwargs["steps"] = steps
    start = time.perf_counter()
    with torch.no_grad():
        z0 = prior.encode(to_model(image.to(prior.device)))
    try:
        inv = fn(prior, z0, prompt=prompt, guidance=guidance, strength=strength, **kwargs)
    except TypeError as err:
        raise StudioError(f"{method} inversion: {err}") from None
    with torch.no_grad():
        rec = to_image(prior.decode(regenerate(prior, inv))).clamp(0, 1).cpu()
        vae_only = to_image(prior.decode(z0)).clamp(0, 1).cpu()
    record = {
        **inv.record,
        "prompt": prompt,
        "model": prior.describe(),
        "total_time_s": time.perf_counter() - start,
        "metrics": image_metrics(rec, image.cpu()),
        "vae_roundtrip_metrics": image_metrics(vae_only, image.cpu()),  # the ceiling any inversion can reach
    }
    return Inverted(inversion=inv, reconstruction=rec, record=record)


def edit(image: Tensor, *, source_prompt: str, target_prompt: str, method: str = "newton",
         steps: int | None = None, guidance: float | None = None, strength: float = 1.0,
         model: str | Any | None = None, device: str | None = None, params: dict | None = None) -> Edited:
    """Invert under ``source_prompt``, regenerate under ``target_prompt`` from the same latent."""
    prior = latent_prior_for(model, device)
    inverted = invert(image, prompt=source_prompt, method=method, steps=steps, guidance=guidance,
                      strength=strength, model=prior, device=device, params=params)
    start = time.perf_counter()
    with torch.no_grad():
        z = regenerate(prior, inverted.inversion, prompt=target_prompt)
        edited = to_image(prior.decode(z)).clamp(0, 1).cpu()
    record = {**inverted.record, "source_prompt": source_prompt, "target_prompt": target_prompt,
              "edit_time_s": time.perf_counter() - start}
    return Edited(image=edited, reconstruction=inverted.reconstruction, record=record)


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
               argv: list[str] | None = None) -> dict:
    """Writes the edit PNG, the source-prompt reconstruction (``.reconstruction.png``) and a JSON sidecar."""
    out = Path(output).with_suffix(".png")
    image = load_image(input_path)
    res = edit(image, source_prompt=source_prompt, target_prompt=target_prompt, method=method, steps=steps,
               guidance=guidance, strength=strength, model=model, device=device,
               params=method_params(method, overrides))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(res.reconstruction, out.with_name(out.stem + ".reconstruction.png"))
    save_image(res.image, out)
    record = {"kind": "edit", "input": input_path, "output": out.name, "command": argv, **res.record}
    write_json_atomic(record, out.with_suffix(".json"))
    return record
