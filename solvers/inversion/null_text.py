"""Null-text inversion (Mokady, Hertz, Aberman, Pritch, Cohen-Or; CVPR 2023; ``google/prompt-to-prompt``).

DDIM inversion with w = 1 gives a pivot trajectory z*_0 … z*_T. Regenerating from z*_T with classifier-free
guidance w > 1 drifts away from it, so the unconditional ("null-text") embedding ∅_t is optimised *per
timestep* to pull the guided trajectory back onto the pivots:

    for each step t → s (descending), starting from z̄_T = z*_T:
        ∅_t ← argmin  ‖ DDIM_s(z̄_t, ε_∅t + w (ε_c − ε_∅t)) − z*_s ‖²        (Adam, ≤ inner_steps)
        z̄_s = DDIM_s(z̄_t, ε with the optimised ∅_t)

Defaults are the official notebook's: w = 7.5, Adam lr 1e-2 · (1 − i/100) at step i, 10 inner iterations,
early stop when the loss < 1e-5 + i · 2e-5, ∅_t initialised from the previous step's optimum. The
reconstruction then uses the list of ∅_t with guidance w (:func:`solvers.inversion.ddim.regenerate`).
It is the slow high-fidelity reference: about ``inner_steps`` forward+backward UNet passes per step.
Work in float32 (the reference notes fp16 breaks the optimisation).
"""

from __future__ import annotations

import time

import torch

from models.base import split_prediction
from solvers.common import alpha_bar_at, ddim_step
from solvers.inversion.ddim import Inversion, ddim_inversion
from solvers.inversion.registry import register_inverter
from studio.core.errors import StudioError

Tensor = torch.Tensor


@register_inverter("null-text", default_guidance=7.5)
def null_text_inversion(
    prior,
    z0: Tensor,
    *,
    prompt: str = "",
    guidance: float = 7.5,
    steps: int = 50,
    strength: float = 1.0,
    inner_steps: int = 10,
    lr: float = 1e-2,
    spacing: str = "leading",
) -> Inversion:
    """Pivots by DDIM inversion (w = 1), then per-step optimisation of the unconditional embedding."""
    if inner_steps < 1 or not lr > 0:
        raise StudioError(f"null-text inversion: need inner_steps >= 1 and lr > 0, got {inner_steps}, {lr}")
    start = time.perf_counter()
    pivot = ddim_inversion(prior, z0, prompt=prompt, guidance=1.0, steps=steps, strength=strength,
                           spacing=spacing)
    grid = pivot.grid
    targets = list(reversed(pivot.trajectory))  # targets[i] = latent at grid[i]; targets[-1] = z0
    cond = prior.embed(prompt).float()
    null = prior.embed("").float()
    z = pivot.z_start
    nfe, grad_nfe, losses = pivot.record["nfe"], 0, []
    null_embeddings: list[Tensor] = []
    for i, t in enumerate(grid):
        s = grid[i + 1] if i + 1 < len(grid) else -1
        ab_s = alpha_bar_at(prior, s, z)
        target = targets[i + 1]
        null = null.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([null], lr=lr * max(1 - i / 100, 0.1))
        ab_t = alpha_bar_at(prior, t, z)
        with torch.no_grad():
            out_cond = prior.model_output(z, t, cond)  # fixed during the inner loop
        nfe += 1
        for j in range(inner_steps):
            with torch.enable_grad():
                out_null = prior.model_output(z, t, null)
                guided = out_null + guidance * (out_cond - out_null)
                pred = split_prediction(guided, z, ab_t, prior.prediction_type)
                loss = torch.nn.functional.mse_loss(ddim_step(z, pred.eps, pred.x0, ab_t, ab_s), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            nfe += 1
            grad_nfe += 1
            if loss.item() < 1e-5 + i * 2e-5:
                break
        losses.append(float(loss.detach()))
        null = null.detach()
        null_embeddings.append(null.to(prior.unet_dtype))
        with torch.no_grad():
            pred = prior.predict_with(z, t, cond, null, guidance)
            z = ddim_step(z, pred.eps, pred.x0, ab_t, ab_s)
        nfe += 2
    record = {"method": "null-text", "steps": steps, "inverted_steps": len(grid), "strength": strength,
              "guidance": guidance, "inner_steps": inner_steps, "lr": lr, "nfe": nfe, "grad_nfe": grad_nfe,
              "wall_time_s": time.perf_counter() - start, "final_losses": losses}
    return Inversion(z_start=pivot.z_start, trajectory=pivot.trajectory, grid=grid, prompt=prompt,
                     guidance=guidance, null_embeddings=null_embeddings, record=record)
