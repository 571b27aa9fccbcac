"""MCG: Manifold Constrained Gradients (Chung, Sim, Ryu, Ye; NeurIPS 2022).

DPS's gradient step followed by a hard projection onto the (noised) measurement set:

    ε̂, x̂_0    = prior(x_i, i)
    x'_{i-1}  = DDPM ancestral step (DDIM with η = 1)
    x''_{i-1} = x'_{i-1} − α ∇_{x_i} ‖y − A x̂_0(x_i)‖₂                     (manifold-constrained gradient)
    y_{i-1}   = sqrt(ᾱ_{i-1}) y + sqrt(1 − ᾱ_{i-1}) A z,  z ~ N(0, I)       (y diffused to the next level)
    x_{i-1}   = x''_{i-1} + A^†(y_{i-1} − A x''_{i-1})                       (projection onto {A x = y_{i-1}})

As in the official inpainting code, the loss is the *unsquared* norm with α = 1 and 1000 DDPM steps, and
x̂_0 is clamped to [-1, 1] (``clip_x0``, the official ``clip_denoised=True``).
Choices and differences, stated:

* ``scale`` is α at the official 1000 steps; with N steps each step takes ``scale · 1000 / N``
  (``scale_with_steps``), the same total guidance, as in :func:`solvers.dps.dps`;
* the projection uses y diffused to the **next** level i−1, where the official code uses level i (an
  off-by-one); at the last step ᾱ = 1, so the output satisfies A x = y exactly for noiseless y;
* y is diffused with A z (noise pushed through the operator), which is the exact law of A x_{i-1}; for
  inpainting this equals the official ``q_sample(y)`` on the observed pixels;
* the official code masks the gradient to the unobserved region; the projection overwrites the
  observed (row-space) component anyway, so this makes no difference and is not done;
* the DDPM step takes the model's learned variance when it has one (``learned_variance``, the official
  ``learned_range``), β̃ otherwise, as in :func:`solvers.dps.dps`;
* ``A^†`` comes from the operator (SVD when it has one, CGLS otherwise), so MCG runs on every linear
  operator, not only inpainting / colorization / CT.

**Limits with noisy y.** The projection forces A x = y at the end, so measurement noise is copied into
the observed components unchanged (and amplified by A^† for ill-conditioned A such as blur). MCG is a
method for noiseless measurements; with σ > 0 prefer DPS, DDRM or CDIM (DPS paper, Table 1).
"""

from __future__ import annotations

import torch

from solvers.common import (
    SolveResult,
    StepCallback,
    StepLoop,
    alpha_bar_at,
    ddim_step,
    guidance_per_step,
    learned_log_variance,
    initial_noise,
    make_generator,
    per_sample_norm,
    signal_shape,
    timesteps,
)
from solvers.registry import register_solver
from studio.core.conventions import to_image
from studio.core.errors import StudioError

Tensor = torch.Tensor


def measurement_in_model_units(y: Tensor, operator, x_shape: tuple[int, ...]) -> Tensor:
    """y_m with A x_m = y_m for x_m = 2 x − 1: since A is linear, y_m = 2 y − A(1)."""
    ones = torch.ones(x_shape, dtype=y.dtype, device=y.device)
    return 2.0 * y - operator.A(ones)


@register_solver("mcg", needs_linear=True, noiseless=True, title="MCG (manifold constrained gradient)",
                 min_steps=50, step_cost=2.3,
                 summary="a DPS step plus a projection onto the measurement: linear operators, noiseless y "
                         "(the projection copies noise into the result), slow (50-1000 steps)")
def mcg(
    y: Tensor,
    operator,
    prior,
    *,
    noise_sigma: float = 0.0,
    steps: int = 1000,
    scale: float = 1.0,
    eta: float = 1.0,
    scale_with_steps: bool = True,
    clip_x0: bool = True,
    learned_variance: bool = True,
    spacing: str = "leading",
    seed: int | None = 0,
    x_shape: tuple[int, ...] | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> SolveResult:
    """Posterior sample by MCG. Needs a linear operator (A, A^†)."""
    if not getattr(operator, "linear", False):
        raise StudioError("mcg needs a linear operator with a pseudo-inverse; use dps for nonlinear A")
    if scale < 0:
        raise StudioError(f"mcg: scale must be >= 0, got {scale}")
    gen = make_generator(seed, y.device)
    ts = timesteps(prior.num_train_timesteps, steps, spacing)
    step = guidance_per_step(scale, prior, len(ts)) if scale_with_steps else float(scale)
    params = {"steps": steps, "scale": scale, "step": step, "eta": eta, "clip_x0": clip_x0,
              "learned_variance": learned_variance and bool(getattr(prior, "learned_variance", False)),
              "spacing": spacing, "seed": gen.initial_seed()}
    loop = StepLoop("mcg", len(ts), callback, progress, params)
    shape = signal_shape(y, operator, prior, x_shape)
    y_model = measurement_in_model_units(y, operator, shape)
    x = initial_noise(shape, gen, y)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x = x.detach().requires_grad_(scale > 0)
        with torch.enable_grad():
            pred = prior.predict(x, t, clip=clip_x0)
            if scale > 0:
                norm = per_sample_norm(2.0 * (operator.A(to_image(pred.x0)) - y))
                (grad,) = torch.autograd.grad(norm.sum(), x)
        loop.count(grad=scale > 0)
        with torch.no_grad():
            ab_t, ab_prev = alpha_bar_at(prior, t, x), alpha_bar_at(prior, t_prev, x)
            log_var = learned_log_variance(prior, pred, ab_t, ab_prev) if params["learned_variance"] else None
            x = ddim_step(x, pred.eps.detach(), pred.x0.detach(), ab_t, ab_prev, eta, gen,
                          None if log_var is None else log_var.detach())
            if scale > 0:
                x = x - step * grad
            z = torch.randn(shape, generator=gen, device=x.device, dtype=x.dtype)
            y_prev = ab_prev.sqrt() * y_model + (1 - ab_prev).sqrt() * operator.A(z)
            x = operator.project(x, y_prev)
        loop.step(i, x, pred.x0)
    return loop.finish(x, y, operator, prior)
