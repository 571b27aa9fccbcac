"""Latent DPS: Diffusion Posterior Sampling with a latent diffusion prior (the "LDPS" baseline of PSLD/P2L).

DPS (Chung et al., ICLR 2023) run on latents z, with the likelihood taken through the decoder D:

    ε̂, ẑ_0 = prior(z_i, i)                                    # Tweedie on latents, text-conditioned
    z'_{i-1} = DDIM(ẑ_0, ε̂; η)
    z_{i-1}  = z'_{i-1} − ρ ∇_{z_i} ‖y − A(D(ẑ_0(z_i)))‖₂       # gradient through the UNet and the decoder

As in our pixel DPS: the unsquared residual norm (the official DPS rule), measured per sample and in model
units, so ρ means the same thing as DPS's ``scale``. The P2L re-implementation in the TReg repository uses
ρ = 1 with 200 DDIM steps (η = 0); those are our defaults. The text conditioning is the ``prompt`` (empty
by default) with classifier-free guidance ``guidance`` (1 = conditional branch only, no extra UNet pass).
"""

from __future__ import annotations

import torch

from solvers.common import (
    SolveResult,
    StepCallback,
    StepLoop,
    alpha_bar_at,
    ddim_step,
    latent_dps_gradient,
    initial_noise,
    latent_image_shape,
    make_generator,
    timesteps,
)
from solvers.registry import register_solver
from studio.core.conventions import to_image
from studio.core.errors import StudioError

Tensor = torch.Tensor


@register_solver("latent-dps", latent=True, flow=True, title="Latent DPS", min_steps=100, step_cost=5.0,
                 summary="DPS in a latent (Stable-Diffusion-style) model, the gradient through the "
                         "decoder: slow (100-200 steps, a decoder backward each)")
def latent_dps(
    y: Tensor,
    operator,
    prior,
    *,
    noise_sigma: float = 0.0,
    steps: int = 200,
    scale: float = 1.0,
    eta: float = 0.0,
    prompt: str = "",
    guidance: float = 1.0,
    spacing: str = "leading",
    seed: int | None = 0,
    x_shape: tuple[int, ...] | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> SolveResult:
    """Posterior sample per row of ``y`` with a :class:`~models.latent_prior.LatentDiffusionPrior`."""
    if not scale > 0:
        raise StudioError(f"latent-dps: scale must be > 0, got {scale}")
    gen = make_generator(seed, y.device)
    ts = timesteps(prior.num_train_timesteps, steps, spacing)
    prior.set_prompt(prompt, guidance)
    params = {"steps": steps, "scale": scale, "eta": eta, "prompt": prompt, "guidance": guidance,
              "spacing": spacing, "seed": gen.initial_seed()}
    loop = StepLoop("latent-dps", len(ts), callback, progress, params)
    z = initial_noise(prior.latent_shape(latent_image_shape(y, operator, prior, x_shape)), gen, y)
    unet_calls = 2 if guidance != 1.0 else 1
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        pred, x0, grad = latent_dps_gradient(lambda v: prior.predict(v, t), prior, operator, y, z)
        loop.count(unet_calls, grad=True)
        with torch.no_grad():
            ab_t, ab_prev = alpha_bar_at(prior, t, z), alpha_bar_at(prior, t_prev, z)
            z = ddim_step(z, pred.eps, pred.x0, ab_t, ab_prev, eta, gen) - scale * grad
        loop.step(i, z, x0)
    with torch.no_grad():
        image = to_image(prior.decode(z)).clamp(0, 1)
    return loop.finish(z, y, operator, prior, image=image)
