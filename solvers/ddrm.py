"""DDRM: Denoising Diffusion Restoration Models (Kawar, Elad, Ermon, Song; NeurIPS 2022).

Works in the spectral space of A = U diag(s) Vᵀ with the variance-exploding scaling

    x̄_t = Vᵀ x_t / sqrt(ᾱ_t),   σ_t = sqrt(1 − ᾱ_t) / sqrt(ᾱ_t),   ȳ_i = (Uᵀ y)_i / s_i,

and σ_y the measurement noise std in model units. From the denoiser's x̄_0 = Vᵀ x̂_0 and
ε̄ = Vᵀ ε̂, each component i moves to the next level σ' (paper eq. 7–8, η = ``eta``, η_b = ``eta_b``):

    s_i = 0 (unobserved):         x̄'_i = x̄_0,i + sqrt(1 − η²) σ' ε̄_i + η σ' z
    s_i σ' < σ_y (below y's noise): x̄'_i = x̄_0,i + sqrt(1 − η²) σ' (ȳ_i − x̄_0,i) / (σ_y / s_i) + η σ' z
    s_i σ' ≥ σ_y (above y's noise): x̄'_i = η_b ȳ_i + (1 − η_b) x̄_0,i + sqrt(σ'² − η_b² σ_y² / s_i²) z

then x_{t'} = sqrt(ᾱ_{t'}) V x̄'. Components with s_i σ' > σ_y start at x̄_T = ȳ + sqrt(σ_T² − σ_y²/s_i²) z.
The last step goes to ᾱ = 1 and its x̄' (x̂_0 for unobserved components) is the output, as in the
official code. Defaults are the official ones: 20 steps on the leading grid, η = 0.85, η_b = 1, and x̂_0 is
**not** clamped (``clip_x0=False``; the official code never clips, only the saved image is clamped).

Observed components are those the operator's SVD marks observed (``SVD.usable``): singular values below
the operator's ``svd_threshold`` (3e-2 of the largest 1-D value for blur and bicubic SR, as the official
``ZERO``) or below eps(dtype)·sqrt(N) count as unobserved. Dividing by every nonzero one instead turned a
noiseless float32 Gaussian deblur into NaN (1-D singular values down to ~1e-16, 2-D to ~1e-32).

**Not an exact posterior sampler.** The kernels above have the right marginals when x_0 is the *true*
image; sampling substitutes x̂_0. Below y's noise level the update pulls towards ȳ only through the
sqrt(1 − η²) term (with η = 1 it ignores y), so the bias grows with the number of steps. Measured on a
Gaussian prior whose covariance is diagonal in V (blur, σ = 0.05): ‖mean − posterior mean‖ / ‖prior mean
− posterior mean‖ = 0.24 at 20 steps, 0.53 at 100, 0.59 at 1000 (η = 1). Keep the official ~20 steps.

Conventions: ``noise_sigma`` is in [0, 1] image units and converted to model units (× 2, which is the
official code's ``sigma_0 = 2 * sigma_0``). Needs an operator that exposes ``svd()``; motion blur with a
general kernel has none (as in the official code).
"""

from __future__ import annotations

import torch

from solvers.common import (
    SolveResult,
    StepCallback,
    StepLoop,
    alpha_bar_at,
    make_generator,
    signal_shape,
    timesteps,
)
from solvers.mcg import measurement_in_model_units
from solvers.registry import register_solver
from studio.core.conventions import sigma_to_model
from studio.core.errors import StudioError

Tensor = torch.Tensor


@register_solver("ddrm", needs_linear=True, needs_svd=True, title="DDRM (restoration in the SVD basis)",
                 min_steps=5, step_cost=1.0,
                 summary="restoration in the operator's SVD basis: the fastest (10-20 steps), needs an "
                         "operator with an SVD (inpainting, Gaussian blur, SR, denoising, colorization)")
@torch.no_grad()
def ddrm(
    y: Tensor,
    operator,
    prior,
    *,
    noise_sigma: float = 0.0,
    steps: int = 20,
    eta: float = 0.85,
    eta_b: float = 1.0,
    clip_x0: bool = False,
    spacing: str = "leading",
    seed: int | None = 0,
    x_shape: tuple[int, ...] | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> SolveResult:
    """Posterior sample by DDRM for an operator with an SVD and Gaussian noise of std ``noise_sigma``."""
    if noise_sigma < 0:
        raise StudioError(f"ddrm: noise_sigma must be >= 0, got {noise_sigma}")
    if not 0 <= eta <= 1 or not 0 <= eta_b <= 1:
        raise StudioError(f"ddrm: eta and eta_b must be in [0, 1], got eta={eta}, eta_b={eta_b}")
    shape = signal_shape(y, operator, prior, x_shape)
    svd = None
    if getattr(operator, "linear", False):
        svd = operator.svd(tuple(shape[1:]), device=y.device, dtype=y.dtype)
    if svd is None:
        raise StudioError(
            f"ddrm needs an operator with an SVD; '{getattr(operator, 'name', operator)}' has none"
        )
    gen = make_generator(seed, y.device)
    ts = timesteps(prior.num_train_timesteps, steps, spacing)
    params = {"steps": steps, "eta": eta, "eta_b": eta_b, "clip_x0": clip_x0, "spacing": spacing,
              "seed": gen.initial_seed()}
    loop = StepLoop("ddrm", len(ts), callback, progress, params)

    sigma_y = sigma_to_model(noise_sigma)
    s = svd.s.to(device=y.device, dtype=y.dtype)[None]  # (1, N)
    observed = svd.usable().to(y.device)[None]  # below the operator's svd_threshold: unobserved
    s_safe = torch.where(observed, s, torch.ones_like(s))
    y_bar = torch.where(observed, svd.Ut(measurement_in_model_units(y, operator, shape)) / s_safe, 0.0)

    def noise() -> Tensor:
        return torch.randn(y_bar.shape, generator=gen, device=y.device, dtype=y.dtype)

    def sigma_of(t: int) -> Tensor:
        ab = alpha_bar_at(prior, t, y)
        return ((1 - ab) / ab).sqrt()

    # Initialisation at the first (noisiest) level.
    sigma_T = sigma_of(ts[0])
    above = observed & (s * sigma_T > sigma_y)
    x_bar = torch.where(
        above, y_bar + (sigma_T**2 - sigma_y**2 / s_safe**2).clamp_min(0).sqrt() * noise(), sigma_T * noise()
    )
    x = alpha_bar_at(prior, ts[0], y).sqrt() * svd.V(x_bar)
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        pred = prior.predict(x, t, clip=clip_x0)
        loop.count()
        sig = sigma_of(t_next) if t_next >= 0 else torch.zeros((), dtype=y.dtype, device=y.device)
        x0_bar, eps_bar = svd.Vt(pred.x0), svd.Vt(pred.eps)
        # unobserved components: DDIM-like move with the model's own noise direction
        new = x0_bar + (1 - eta**2) ** 0.5 * sig * eps_bar + eta * sig * noise()
        if sigma_y > 0:
            below = observed & (s * sig < sigma_y)
            towards_y = (x0_bar + (1 - eta**2) ** 0.5 * sig * (y_bar - x0_bar) * s_safe / sigma_y
                         + eta * sig * noise())
            new = torch.where(below, towards_y, new)
        above = observed & (s * sig > sigma_y)
        from_y = (eta_b * y_bar + (1 - eta_b) * x0_bar
                  + (sig**2 - eta_b**2 * sigma_y**2 / s_safe**2).clamp_min(0).sqrt() * noise())
        x_bar = torch.where(above, from_y, new)
        x = alpha_bar_at(prior, t_next, y).sqrt() * svd.V(x_bar)
        loop.step(i, x, pred.x0)
    return loop.finish(x, y, operator, prior)
