"""Sample grids of the embedded models: the pixel prior's DDIM/DDPM samplers, text-to-image with
classifier-free guidance, and the PNG grid they are written as (training grids, model cards, `studio
generate`, textual-inversion validation)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image
from torch import Tensor

from studio.core.io import PendingFile, write_set


def save_grid(images: Tensor, path: Path, nrow: int = 8) -> Path:
    """``images`` in [0,1], (N,3,H,W) → one PNG grid with 2-pixel white gutters."""
    n, c, h, w = images.shape
    ncol = nrow
    nrows = math.ceil(n / ncol)
    pad = 2
    grid = np.ones((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    arr = images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    for i in range(n):
        r, cidx = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + cidx * (w + pad)
        grid[top: top + h, left: left + w] = arr[i]
    image = Image.fromarray((grid * 255 + 0.5).astype(np.uint8))
    # whole or not at all: a run killed while writing must not leave a torn grid under its name
    write_set([PendingFile(Path(path), lambda f: image.save(f, format="PNG"), binary=True)])
    return path


def ddim_sample_pixel(unet, scheduler_config: dict, n: int, size: int, steps: int, seed: int,
                      device: torch.device) -> Tensor:
    """Deterministic DDIM samples (eta 0) in [0,1] (used for the training grids and the model card)."""
    return _sample_pixel(unet, DDIMScheduler.from_config(scheduler_config), n, size, steps, seed, device,
                         eta=0.0)


def ddpm_sample_pixel(unet, scheduler_config: dict, n: int, size: int, steps: int, seed: int,
                      device: torch.device) -> Tensor:
    """DDPM ancestral samples in [0,1], as ``DDPMPipeline`` draws them with the shipped scheduler:
    x_{t-1} = mu_theta(x_t, t) + sigma_t z, with fresh noise z at every step (the model card's main grid)."""
    return _sample_pixel(unet, DDPMScheduler.from_config(scheduler_config), n, size, steps, seed, device)


@torch.no_grad()
def _sample_pixel(unet, sched, n: int, size: int, steps: int, seed: int, device: torch.device,
                  **step_kw) -> Tensor:
    sched.set_timesteps(steps)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g).to(device)
    for t in sched.timesteps:
        eps = unet(x, t.to(device)).sample
        # the step noise comes from the same CPU generator (diffusers draws it on the CPU and moves it),
        # so a seed gives the same grid on any device
        x = sched.step(eps, t, x, generator=g, **step_kw).prev_sample
    return ((x + 1) / 2).clamp(0, 1).cpu()


def assemble_sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    # local: the pipeline module loads transformers, which the rest of this module (imported with
    # textual inversion by the personalize workflow) does not need
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@torch.no_grad()
def sd_sample(pipe, prompts: list[str], steps: int = 20, guidance: float = 3.0, seed: int = 0) -> Tensor:
    """Text-to-image samples in [0,1] with classifier-free guidance, one seeded generator."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=g, height=size,
               width=size, output_type="pt")
    return out.images.cpu()
