"""DDIM inversion (Song et al. 2021; Dhariwal & Nichol 2021) and the deterministic regeneration it inverts.

Deterministic DDIM (η = 0) maps a latent at timestep t to the lower-noise timestep s < t:

    z_s = sqrt(ᾱ_s) ẑ_0(z_t) + sqrt(1 − ᾱ_s) ε(z_t, t),   ẑ_0 = (z_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)

Inverting one step means solving for z_t given z_s — an *implicit* equation, because ε is evaluated at
the unknown z_t:

    z_t = f(z_t) := sqrt(ᾱ_t / ᾱ_s) z_s + sqrt(ᾱ_t) (sqrt(1/ᾱ_t − 1) − sqrt(1/ᾱ_s − 1)) ε(z_t, t)

DDIM inversion approximates ε(z_t, t) by ε(z_s, t) (one UNet call per step; prompt-to-prompt's
``next_step``). Its error grows with the step size, so it reconstructs poorly with few steps and with
classifier-free guidance w > 1. Newton–Raphson inversion (:mod:`solvers.inversion.newton`) solves the
equation.

Conventions shared by the inversion methods:

* the grid is the sampler's: ``timesteps(T, steps, spacing)`` descending, then the clean end (ᾱ = 1), so
  regeneration with the same ``steps`` retraces exactly the inverted transitions;
* ``strength`` ∈ (0, 1] inverts only the first ⌈strength · steps⌉ transitions (from the clean end), and
  regeneration starts there (SDEdit-style partial inversion, RNRI's ``inversion_max_step``);
* ε uses the prior's text conditioning: ``prompt`` with guidance ``guidance`` (w = 1: the conditional
  branch only, the standard for inversion; w > 1 is allowed and documented as lossy for DDIM inversion).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from solvers.common import alpha_bar_at, ddim_step, timesteps
from solvers.inversion.registry import register_inverter
from studio.core.errors import StudioError

Tensor = torch.Tensor


@dataclass
class Inversion:
    """An inverted image: the latent to regenerate from and everything needed to retrace the path."""

    z_start: Tensor  # latent at the highest inverted timestep
    trajectory: list[Tensor]  # latents from the clean end upward (trajectory[0] = E(x))
    grid: list[int]  # the inverted timesteps, descending (regeneration order); the clean end is implicit
    prompt: str
    guidance: float
    null_embeddings: list[Tensor] | None = None  # per-step unconditional embeddings (null-text inversion)
    record: dict = field(default_factory=dict)


def inversion_grid(prior, steps: int, strength: float = 1.0, spacing: str = "leading") -> list[int]:
    """The descending timesteps to invert through (the top ⌈strength·steps⌉ of the sampler grid)."""
    if not 0 < strength <= 1:
        raise StudioError(f"strength must be in (0, 1], got {strength}")
    ts = timesteps(prior.num_train_timesteps, steps, spacing)
    keep = max(1, math.ceil(strength * len(ts)))
    return ts[len(ts) - keep:]


def step_coefficients(prior, t: int, s: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) with z_t = a z_s + b ε for the DDIM transition between s < t (s = −1 is the clean end)."""
    ab_t, ab_s = alpha_bar_at(prior, t, like), alpha_bar_at(prior, s, like)
    a = (ab_t / ab_s).sqrt()
    b = ab_t.sqrt() * ((1 / ab_t - 1).sqrt() - (1 / ab_s - 1).clamp_min(0).sqrt())
    return a, b


def guided_eps(prior, z: Tensor, t: int, cond: Tensor, uncond: Tensor | None, guidance: float) -> Tensor:
    """ε with classifier-free guidance (one batched call when w ≠ 1), as an ε-prediction."""
    pred = prior.predict_with(z, t, cond, uncond, guidance)
    return pred.eps


@register_inverter("ddim", default_guidance=1.0)
def ddim_inversion(
    prior,
    z0: Tensor,
    *,
    prompt: str = "",
    guidance: float = 1.0,
    steps: int = 50,
    strength: float = 1.0,
    spacing: str = "leading",
) -> Inversion:
    """Invert the clean latent ``z0`` (= ``prior.encode(x)``) with the ε(z_s) ≈ ε(z_t) approximation."""
    start = time.perf_counter()
    grid = inversion_grid(prior, steps, strength, spacing)
    cond = prior.embed(prompt)
    uncond = prior.embed("") if guidance != 1.0 else None
    z, trajectory = z0.detach(), [z0.detach()]
    path = list(reversed(grid))  # ascending
    nfe = 0
    with torch.no_grad():
        for k, t in enumerate(path):
            s = path[k - 1] if k > 0 else -1
            a, b = step_coefficients(prior, t, s, z)
            z = a * z + b * guided_eps(prior, z, t, cond, uncond, guidance)
            nfe += 2 if uncond is not None else 1
            trajectory.append(z)
    record = {"method": "ddim", "steps": steps, "inverted_steps": len(grid), "strength": strength,
              "guidance": guidance, "nfe": nfe, "wall_time_s": time.perf_counter() - start}
    return Inversion(z_start=z, trajectory=trajectory, grid=grid, prompt=prompt, guidance=guidance,
                     record=record)


def regenerate(prior, inversion: Inversion, prompt: str | None = None,
               guidance: float | None = None) -> Tensor:
    """Deterministic DDIM from ``inversion.z_start`` back to the clean latent, with ``prompt`` (default: the
    inversion's) and guidance (default: the inversion's). Null-text inversions use their per-step
    unconditional embeddings, as in prompt-to-prompt. Returns the clean latent."""
    prompt = inversion.prompt if prompt is None else prompt
    guidance = inversion.guidance if guidance is None else guidance
    cond = prior.embed(prompt)
    uncond_fixed = prior.embed("") if guidance != 1.0 else None
    z = inversion.z_start
    with torch.no_grad():
        for i, t in enumerate(inversion.grid):
            s = inversion.grid[i + 1] if i + 1 < len(inversion.grid) else -1
            uncond = inversion.null_embeddings[i] if inversion.null_embeddings is not None else uncond_fixed
            pred = prior.predict_with(z, t, cond, uncond, guidance)
            z = ddim_step(z, pred.eps, pred.x0, alpha_bar_at(prior, t, z), alpha_bar_at(prior, s, z), eta=0.0)
    return z
