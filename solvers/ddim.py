"""DDIM: unconditional sampling (Song, Meng, Ermon, ICLR 2021). The baseline and the loop the others reuse.

    x_T ~ N(0, I)
    for t in timesteps (descending), t_prev the next one (-1 at the end, where ᾱ = 1):
        ε̂, x̂_0 = prior(x_t, t)
        x_prev  = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ_t²) ε̂ + σ_t z            (eq. 12)

η = 0 gives the deterministic ODE sampler, η = 1 the DDPM ancestral sampler. The measurement is ignored:
``ddim`` takes ``y`` and ``operator`` only to share the solver signature (and to report the residual),
so it is the "no data consistency" reference in the benchmarks.
"""

from __future__ import annotations

import torch

from solvers.common import (
    SolveResult,
    StepCallback,
    StepLoop,
    alpha_bar_at,
    ddim_step,
    initial_noise,
    make_generator,
    signal_shape,
    timesteps,
)
from solvers.registry import register_solver

Tensor = torch.Tensor


@register_solver("ddim", title="DDIM (unconditional baseline)", baseline=True, min_steps=10, step_cost=1.0,
                 summary="an unconditional sample that ignores the image: the no-guidance baseline")
@torch.no_grad()
def ddim(
    y: Tensor,
    operator,
    prior,
    *,
    noise_sigma: float = 0.0,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "leading",
    seed: int | None = 0,
    x_shape: tuple[int, ...] | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> SolveResult:
    """Unconditional DDIM sample of the shape of the unknown image (one per row of ``y``)."""
    gen = make_generator(seed, y.device)
    ts = timesteps(prior.num_train_timesteps, steps, spacing)
    loop = StepLoop("ddim", len(ts), callback, progress, {"steps": steps, "eta": eta, "spacing": spacing,
                                                          "seed": gen.initial_seed()})
    x = initial_noise(signal_shape(y, operator, prior, x_shape), gen, y)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        pred = prior.predict(x, t)
        loop.count()
        x = ddim_step(x, pred.eps, pred.x0, alpha_bar_at(prior, t, x), alpha_bar_at(prior, t_prev, x), eta,
                      gen)
        loop.step(i, x, pred.x0)
    return loop.finish(x, y, operator, prior)
