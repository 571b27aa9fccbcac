"""ReSample: hard data consistency with latent diffusion models (Song, Kwon, Zhang, Hu, Qu, Shen; ICLR 2024,
arXiv 2307.08123). Official code: ``soominkwon/resample`` (``ldm/models/diffusion/ddim.py``,
``resample_sampling``); we follow that code where the paper leaves a choice open.

Latent DDIM sampling (η = 0) in which, every C steps, the denoised latent is made to *fit* the measurement
("hard" data consistency, an optimisation rather than one gradient step) and the sampler then draws its next
latent near that fit ("stochastic resampling"). Per step t → t−1 of N (index k = N−1 … 0 counts down):

    ε̂, ẑ_0   = prior(z_t, t);   z' = DDIM(ẑ_0, ε̂)                     # one UNet pass (two with CFG)
    z'       ← z' − ρ ᾱ_t ∇_{z_t} ‖y − A(D(ẑ_0(z_t)))‖                 # latent DPS step, every step
    if 0 < k ≤ N − ⌊N/3⌋ and k mod C = 0:                              # the lower two thirds, every C steps
        ẑ_0  = Tweedie estimate after up to K more plain DDIM steps from z'   # "time travel" (K NFE)
        if k ≥ ⌊N/3⌋:  x* = argmin_x ‖y − A x‖² from D(ẑ_0);  ẑ_0(y) = E(x*)      # middle third: pixels
        else:          ẑ_0(y) = argmin_z ‖y − A(D(z))‖² from ẑ_0                   # last third: latents
        σ² = γ (1 − ᾱ_{t−1})/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_{t−1})
        z_{t−1} ~ N( (σ² sqrt(ᾱ_{t−1}) ẑ_0(y) + (1 − ᾱ_{t−1}) z') / (σ² + 1 − ᾱ_{t−1}),
                     σ² (1 − ᾱ_{t−1}) / (σ² + 1 − ᾱ_{t−1}) · I )                 # stochastic resampling
    else: z_{t−1} = z'
    finally z_0 ← argmin_z ‖y − A(D(z))‖² from z_0, and x = D(z_0)

Both argmins run AdamW on the mean squared residual (model units, [-1, 1]) from the given start, with the
official settings: pixels lr 1e-2, at most 2000 iterations; latents lr 5e-3, at most 500, and a plateau
rule (stop once the loss is above its value ``patience`` = 200 iterations earlier). Both stop when the
mean squared residual of every sample is below tol². Defaults: the official ones (N = 500, C = 10, K = 5,
γ = 40, ρ = 0.5); every one is a parameter. C = 0 turns the hard data consistency off, ``latent_iters``
= 0 the latent optimisations (in the loop and the final one).

The schedule, the constants, the DPS step and the time travel are read from the official code: the
paper's full text was not available to us (only its abstract), so check them against arXiv 2307.08123
(Algorithm 1 and the appendix) before quoting them as the paper's.

Choices the paper leaves open, and deviations from the official code (on purpose):

* **Tweedie.** The official ``p_sample_ddim`` returns a second estimate (z − (1 − ᾱ) ε̂)/sqrt(ᾱ) as "x̂_0 by
  Tweedie's formula" and uses it for the DPS gradient and as the start of both optimisations. Tweedie's
  formula with ε̂ = −sqrt(1 − ᾱ) ∇log p is (z − sqrt(1 − ᾱ) ε̂)/sqrt(ᾱ), the DDIM estimate, which is what we
  use; the two agree early (ᾱ ≈ 0) and the official one stays noisy late (≈ z/sqrt(ᾱ)).
* **Time travel.** The official loop evaluates the UNet at the next timesteps but steps with the alphas of
  the previous ones (one index behind); our K look-ahead steps use each timestep's own ᾱ. As there, the
  estimate is the one of the K-th UNet pass (the K-th DDIM update is not needed and not taken), and fewer
  than K steps are taken near the end of the schedule.
* **DPS step.** The official code takes ρ_t = 0.5 ᾱ_t on every step (its task configs' ``scale`` is read
  but never used) with one residual norm for the whole batch; ours is per sample, in model units, as our
  other DPS-family solvers. ρ (``scale``) is per step, not rescaled with N. ``scale`` = 0 drops it.
* **Stopping at the noise.** The official tolerance is fixed, eps = 1e-3 (RMS residual in [-1, 1] units;
  its comment: "needs tuning according to noise level"), so with noisy y the pixel fit always runs its
  2000 iterations into the noise. Our default ``tol`` = None stops at the noise level instead (discrepancy
  principle): tol = max(1e-3, 2 σ_y sqrt(m/n)), with σ_y = ``noise_sigma`` in [0, 1] image units (2 σ_y in
  model units), m the real measurements, n the entries of y (m < n for inpainting, whose unobserved zeros
  the mean includes, as the official MSE does). ``tol=0.001`` restores the official rule.
* **Timesteps.** Our ``spacing`` grid (leading: 998, 996, …, 0 at N = 500); the official LDM grid is the
  same shifted by one (999, …, 1). DDIM runs with η = 0 (official); the only noise after z_T is the
  resampling's.
* **σ_y units.** The official configs' σ = 0.01 is in [-1, 1] units, i.e. ``noise_sigma`` = 0.005 here.
* **AdamW** keeps torch's default weight decay 0.01, which the official code inherits (``weight_decay``):
  over a full 2000-iteration pixel fit it shrinks pixels that y does not constrain by about 18% toward
  mid-grey. It is not a stated part of the method; ``weight_decay=0`` gives plain Adam.
* **Batches.** One optimiser per call over the whole batch: each sample's loss and Adam moments are its
  own, but the stopping rules look at all samples (every one below tol; the plateau on the summed loss).
* **Prior.** The official prior is LDM-VQ-f4 FFHQ 256 (unconditional); ours is any Stable-Diffusion-style
  latent prior, with ``prompt`` and classifier-free ``guidance`` (1 = conditional branch only). Encoding
  uses the encoder mean (deterministic). The pixel fit is not clamped before encoding (as the official).
* **Operators.** Both fits only need A to be differentiable, so nonlinear operators are accepted (the official
  task configs include nonlinear deblurring); an operator whose output carries no gradient is refused.

NFE counts the UNet passes (the DPS step and the time-travel passes); decoder and encoder passes are not
NFE. The record also says how many data-consistency fits ran and their Adam iterations (``hard_dc``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from solvers.common import (
    SolveResult,
    StepCallback,
    StepLoop,
    alpha_bar_at,
    check_params,
    ddim_step,
    initial_noise,
    is_count,
    is_number,
    latent_dps_gradient,
    latent_image_shape,
    make_generator,
    model_residual,
    timesteps,
)
from solvers.registry import register_solver
from studio.core.conventions import to_image
from studio.core.errors import StudioError

Tensor = torch.Tensor

OFFICIAL_TOL = 1e-3  # the official eps: RMS measurement residual in [-1, 1] units


def dc_stage(index: int, total: int, every: int) -> str | None:
    """The hard data-consistency stage after the step with countdown ``index`` (N−1 … 0) of ``total``:
    ``"pixel"`` in the middle third, ``"latent"`` in the last third, None elsewhere (official schedule)."""
    split = total // 3
    if every <= 0 or index <= 0 or index > total - split or index % every:
        return None
    return "pixel" if index >= split else "latent"


def stopping_tolerance(tol: float | None, noise_sigma: float, operator, y: Tensor,
                       image_shape: tuple[int, ...]) -> float:
    """The RMS residual (model units) at which the fits stop: ``tol``, else the noise level (see above)."""
    if tol is not None:
        return float(tol)
    fraction = operator.num_measurements(tuple(image_shape[1:])) / max(y[0].numel(), 1)
    return max(OFFICIAL_TOL, 2.0 * noise_sigma * fraction**0.5)


def residual_mse(operator, y: Tensor, x: Tensor) -> Tensor:
    """Per-sample mean squared residual of a model-space image x ([-1, 1]), in model units."""
    residual = model_residual(operator, y, x)
    return residual.pow(2).reshape(residual.shape[0], -1).mean(1)


def fit_measurements(start: Tensor, forward: Callable[[Tensor], Tensor], operator, y: Tensor, *, lr: float,
                     iters: int, tol: float, weight_decay: float = 0.01,
                     patience: int | None = None) -> tuple[Tensor, int]:
    """argmin_v ‖y − A(forward(v))‖² by AdamW from ``start``; returns (v detached, iterations run).

    Stops when every sample's mean squared residual is below tol², or (``patience``) when the summed loss
    is above its value ``patience`` iterations earlier."""
    v = start.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([v], lr=lr, weight_decay=weight_decay)
    history: list[float] = []
    n = 0
    for n in range(1, iters + 1):
        with torch.enable_grad():
            mse = residual_mse(operator, y, forward(v))
            opt.zero_grad(set_to_none=True)
            mse.sum().backward()
        opt.step()
        history.append(float(mse.detach().sum()))
        if bool((mse.detach() < tol**2).all()):
            break
        if patience is not None and len(history) > patience and history[-1 - patience] < history[-1]:
            break
    return v.detach(), n


def time_travel(prior, z: Tensor, ts: list[int], i: int, ahead: int) -> tuple[Tensor, int]:
    """ẑ_0 after up to ``ahead`` plain DDIM steps from z (at level ts[i+1]); returns (ẑ_0, UNet passes)."""
    n = min(ahead, len(ts) - 1 - i)
    for j in range(n):
        t = ts[i + 1 + j]
        pred = prior.predict(z, t)
        if j < n - 1:
            ab_t, ab_next = alpha_bar_at(prior, t, z), alpha_bar_at(prior, ts[i + 2 + j], z)
            z = ddim_step(z, pred.eps, pred.x0, ab_t, ab_next)
    return pred.x0, n


def stochastic_resample(z0_y: Tensor, z_prime: Tensor, ab_t: Tensor, ab_prev: Tensor, gamma: float,
                        generator: torch.Generator) -> Tensor:
    """A draw of z_{t−1} between the measurement-consistent ẑ_0(y) and the sampler's z' (see above)."""
    var = gamma * (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    denom = var + 1 - ab_prev
    mean = (var * ab_prev.sqrt() * z0_y + (1 - ab_prev) * z_prime) / denom
    noise = torch.randn(z_prime.shape, generator=generator, device=z_prime.device, dtype=z_prime.dtype)
    return mean + (var * (1 - ab_prev) / denom).sqrt() * noise


def hard_data_consistency(stage: str, prior, operator, y: Tensor, z0: Tensor,
                          opts: dict) -> tuple[Tensor, int]:
    """ẑ_0(y): the pixel fit from D(ẑ_0) encoded back, or the latent fit from ẑ_0; and its iterations."""
    if stage == "pixel":
        with torch.no_grad():
            x = prior.decode(z0)
        x, n = fit_measurements(x, lambda v: v, operator, y, lr=opts["pixel_lr"], iters=opts["pixel_iters"],
                                tol=opts["tol"], weight_decay=opts["weight_decay"])
        with torch.no_grad():
            return prior.encode(x), n
    return fit_measurements(z0, prior.decode, operator, y, lr=opts["latent_lr"], iters=opts["latent_iters"],
                            tol=opts["tol"], weight_decay=opts["weight_decay"], patience=opts["patience"])


def guided_ddim_step(prior, operator, y: Tensor, z: Tensor, t: int, t_prev: int,
                     scale: float) -> tuple[Tensor, Tensor]:
    """The DDIM step t → t_prev minus the latent DPS step ρ ᾱ_t ∇‖y − A(D(ẑ_0))‖; returns (z', D(ẑ_0))."""
    ab_t, ab_prev = alpha_bar_at(prior, t, z), alpha_bar_at(prior, t_prev, z)
    if scale > 0:
        pred, x0, grad = latent_dps_gradient(lambda v: prior.predict(v, t), prior, operator, y, z)
    else:  # plain DDIM: no backward pass
        with torch.no_grad():
            pred = prior.predict(z, t)
            x0, grad = prior.decode(pred.x0), torch.zeros_like(z)
    with torch.no_grad():
        return ddim_step(z.detach(), pred.eps, pred.x0, ab_t, ab_prev) - scale * ab_t * grad, x0


def _check_params(noise_sigma, scale, gamma, dc_every, travel_steps, pixel_iters, pixel_lr, latent_iters,
                  latent_lr, patience, weight_decay, tol) -> None:
    """One line naming the first bad parameter."""
    check_params("resample", [
        ("noise_sigma", noise_sigma, is_number(noise_sigma, 0), "a number >= 0"),
        ("scale", scale, is_number(scale, 0), "a number >= 0"),
        ("gamma", gamma, is_number(gamma, 0, strict=True), "a number > 0"),
        ("dc_every", dc_every, is_count(dc_every, 0), "an integer >= 0 (0: no hard data consistency)"),
        ("travel_steps", travel_steps, is_count(travel_steps, 1), "an integer >= 1"),
        ("pixel_iters", pixel_iters, is_count(pixel_iters, 0), "an integer >= 0"),
        ("pixel_lr", pixel_lr, is_number(pixel_lr, 0, strict=True), "a number > 0"),
        ("latent_iters", latent_iters, is_count(latent_iters, 0), "an integer >= 0"),
        ("latent_lr", latent_lr, is_number(latent_lr, 0, strict=True), "a number > 0"),
        ("patience", patience, is_count(patience, 1), "an integer >= 1"),
        ("weight_decay", weight_decay, is_number(weight_decay, 0), "a number >= 0"),
        ("tol", tol, tol is None or is_number(tol, 0, strict=True),
         "a number > 0, or null (the noise level)")])


def check_differentiable(operator, image_shape: tuple[int, ...], like: Tensor) -> None:
    """Refuse an operator whose output carries no gradient (both fits optimise through A)."""
    probe = torch.full((1, *image_shape[1:]), 0.5, device=like.device, dtype=like.dtype, requires_grad=True)
    with torch.enable_grad():
        out = operator.A(probe)
    if not out.requires_grad:
        name = getattr(operator, "name", type(operator).__name__)
        raise StudioError(f"resample needs a differentiable operator: the output of {name} carries no "
                          "gradient (its hard data consistency optimises through A)")


@register_solver("resample", latent=True, flow=True, title="ReSample (hard data consistency)", min_steps=100,
                 step_cost=40.0,
                 summary="latent DDIM that, every 10 steps, fits the measurement by optimisation (pixels, "
                         "then latents through the decoder) and resamples near the fit: the slowest, "
                         "latent models, any differentiable operator")
def resample(
    y: Tensor,
    operator,
    prior,
    *,
    noise_sigma: float = 0.0,
    steps: int = 500,
    scale: float = 0.5,
    gamma: float = 40.0,
    dc_every: int = 10,
    travel_steps: int = 5,
    pixel_iters: int = 2000,
    pixel_lr: float = 1e-2,
    latent_iters: int = 500,
    latent_lr: float = 5e-3,
    patience: int = 200,
    weight_decay: float = 0.01,
    tol: float | None = None,
    prompt: str = "",
    guidance: float = 1.0,
    spacing: str = "leading",
    seed: int | None = 0,
    x_shape: tuple[int, ...] | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> SolveResult:
    """Posterior sample per row of ``y`` with a :class:`~models.latent_prior.LatentDiffusionPrior`."""
    _check_params(noise_sigma, scale, gamma, dc_every, travel_steps, pixel_iters, pixel_lr, latent_iters,
                  latent_lr, patience, weight_decay, tol)
    image_shape = latent_image_shape(y, operator, prior, x_shape)
    check_differentiable(operator, image_shape, y)
    gen = make_generator(seed, y.device)
    ts = timesteps(prior.num_train_timesteps, steps, spacing)
    prior.set_prompt(prompt, guidance)
    opts = {"pixel_iters": pixel_iters, "pixel_lr": pixel_lr, "latent_iters": latent_iters,
            "latent_lr": latent_lr, "patience": patience, "weight_decay": weight_decay,
            "tol": stopping_tolerance(tol, noise_sigma, operator, y, image_shape)}
    params = {"steps": steps, "scale": scale, "gamma": gamma, "dc_every": dc_every,
              "travel_steps": travel_steps, **opts, "prompt": prompt, "guidance": guidance,
              "spacing": spacing, "seed": gen.initial_seed()}
    loop = StepLoop("resample", len(ts), callback, progress, params)
    z = initial_noise(prior.latent_shape(image_shape), gen, y)
    unet_calls = 2 if guidance != 1.0 else 1
    done = {"pixel_fits": 0, "pixel_iterations": 0, "latent_fits": 0, "latent_iterations": 0}
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        z, x0 = guided_ddim_step(prior, operator, y, z, t, t_prev, scale)
        loop.count(unet_calls, grad=scale > 0)
        stage = dc_stage(len(ts) - 1 - i, len(ts), dc_every)
        if stage is not None:
            with torch.no_grad():
                z0, passes = time_travel(prior, z, ts, i, travel_steps)
            loop.count(passes * unet_calls)
            z0_y, n = hard_data_consistency(stage, prior, operator, y, z0, opts)
            done[f"{stage}_fits"] += 1
            done[f"{stage}_iterations"] += n
            with torch.no_grad():
                ab_t, ab_prev = alpha_bar_at(prior, t, z), alpha_bar_at(prior, t_prev, z)
                z = stochastic_resample(z0_y, z, ab_t, ab_prev, gamma, gen)
        loop.step(i, z, x0)
    if latent_iters > 0:  # the official final fit of the output latent
        z, n = fit_measurements(z, prior.decode, operator, y, lr=latent_lr, iters=latent_iters,
                                tol=opts["tol"], weight_decay=weight_decay, patience=patience)
        done["latent_fits"] += 1
        done["latent_iterations"] += n
    loop.extra["hard_dc"] = done
    with torch.no_grad():
        image = to_image(prior.decode(z)).clamp(0, 1)
    return loop.finish(z, y, operator, prior, image=image)
