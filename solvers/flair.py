"""FLAIR: flow-matching latent priors for inverse problems, a variational solver (Erbach, Narnhofer, Dombos,
Schiele, Lenssen, Schindler; NeurIPS 2025, arXiv 2506.02680; official code ``prs-eth/FLAIR``, read at
c4f55f7: ``src/flair/var_post_samp.py``).

The posterior is approximated by a point estimate μ of the clean latent, fitted in one descending pass over
flow times t (path x_t = (1 − t) x_0 + t ε, velocity v ≈ ε − x_0, :mod:`models.flow_prior`):

    α = 1 − t;  ε̂ = α x̂_1 + sqrt(1 − α²) z,  z ~ N(0, I)          # deterministic trajectory adjustment
    x_t = (1 − t) μ + t ε̂;   v = v_θ(x_t, t, c)                        # no gradient through the model
    x̂_1 = x_t + (1 − t) v                                              # predicted noise end, next step's ε̂
    μ ← μ − λ(t) (v − (ε̂ − μ))                                         # flow-matching regulariser, lr 1
    repeat ≤ K times, while Σ (A(D(μ)) − y)² ≥ τ · numel(y):          # hard data consistency
        μ ← μ − η λ(t) ∇_μ Σ (A(D(μ)) − y)²                            # through the decoder only

The regulariser step is the gradient of ‖v_θ(x_t) − u_t‖² with the conditional velocity u_t = ε̂ − μ held
fixed (score-distillation style); it moves μ toward the model's denoised x_t − t v. The weight is
λ(t) = ``regularizer_weight`` × w(t), w ∝ 1 / e(t) normalised to mean 1, where e(t) is the model's own
flow-matching error at t measured offline (the paper's calibrated regulariser weight;
:func:`regularizer_error_table` measures it).

Choices and deviations (the official code and the notes in ``shared/reference``):

* Time grid: t = linspace(1, t_min, steps + 2) without its ends (official: 50 steps, t_min 0.18, no schedule
  shift), each t snapped to the nearest time of the prior's own grid (:func:`models.flow_prior.flow_times`),
  so the model is evaluated exactly where it was trained. A variance-preserving model (emoji-sd) runs
  through the exact Gaussian-path equivalence; its grid ends below 1 (0.94 for SD's scaled-linear schedule),
  so its first steps start there.
* w(t): the official table is SD3.5-Medium's error on DIV2K and means nothing for another model; without
  ``error_table`` the weight is flat (w = 1). Pass a table (e(t) on t = linspace(1, 0, n)) measured with
  :func:`regularizer_error_table` on images of the model's domain to get the calibrated form.
* Data term in model units (2 × our [0, 1] residual: the official images are in [−1, 1]); a sum, as the
  official code (so ``data_lr`` scales with the number of measurements: the official 0.1 for inpainting and
  deblurring, 12 for SR ×12). The early stop is the discrepancy principle the official constant encodes
  (τ = 1e-4 = σ_y² of its σ_y = 0.01 in [−1, 1]): τ = max(``tolerance``, σ_y²) with σ_y the measurement
  noise in model units (2 × ``noise_sigma``), so a noisier measurement is not fitted into its noise.
* Initialisation, as the official ``pseudo_inv``: an operator that keeps the image size (blur, denoising)
  starts from E(y); another linear one from E(clip(A†y)) (zero-filled inpainting, SR pseudo-inverse); a
  non-linear one that changes the size from a random latent (the official ``init: random``).
* The result is D(μ) at the last t (≈ t_min), as in the official code: no integration to t = 0.
* Text: ``prompt`` with classifier-free guidance ``guidance``; the official runs use a caption ("a high
  quality photo of ...") at guidance 2. Our default is the empty prompt at guidance 1 (one model pass per
  step), as our other latent solvers.
* The official decoder is the tiny autoencoder taesd3 for speed; we use the model's own VAE.
"""

from __future__ import annotations

import math

import torch

from models.flow_prior import flow_times, flow_velocity
from solvers.common import (
    SolveResult,
    StepCallback,
    StepLoop,
    check_params,
    is_count,
    is_number,
    latent_image_shape,
    make_generator,
    model_residual,
)
from solvers.registry import register_solver
from studio.core.conventions import to_image, to_model

Tensor = torch.Tensor


def time_grid(prior, steps: int, t_min: float) -> list[int]:
    """Grid indices of the prior nearest to linspace(1, t_min, steps + 2)[1:-1], descending, no repeats."""
    s = flow_times(prior)
    wanted = torch.linspace(1.0, t_min, steps + 2, dtype=torch.float64)[1:-1]
    indices = [int((s - t).abs().argmin()) for t in wanted]
    return list(dict.fromkeys(indices))


def regularizer_weights(error_table, times: Tensor) -> Tensor:
    """w(t) at ``times``: 1 / e normalised to mean 1 over the table (flat 1 without a table)."""
    if error_table is None:
        return torch.ones_like(times)
    e = torch.as_tensor(list(error_table), dtype=torch.float64)
    w = 1.0 / (e + 1e-7)
    w = w * len(w) / w.sum()
    table_t = torch.linspace(1.0, 0.0, len(w), dtype=torch.float64)
    return w[(table_t[None] - times[:, None]).abs().argmin(1)]


def data_residual(prior, operator, y: Tensor, mu: Tensor) -> Tensor:
    """A(D(μ)) − y in model units (2 × the [0, 1] residual), per entry."""
    return model_residual(operator, y, prior.decode(mu))


def hard_data_consistency(prior, operator, y: Tensor, mu: Tensor, lr: float, max_steps: int,
                          tolerance: float) -> tuple[Tensor, int]:
    """Gradient steps on Σ (A(D(μ)) − y)² until its mean is below ``tolerance`` (or ``max_steps``); the
    gradient goes through the decoder only. Returns μ and the number of steps taken."""
    for taken in range(max_steps):
        mu = mu.detach().requires_grad_(True)
        with torch.enable_grad():
            residual = data_residual(prior, operator, y, mu)
            per_sample = residual.pow(2).flatten(1).sum(1)
            if float((per_sample.detach() / residual[0].numel()).max()) < tolerance:
                return mu.detach(), taken
            (grad,) = torch.autograd.grad(per_sample.sum(), mu)
        mu = mu.detach() - lr * grad
    return mu.detach(), max_steps


def initial_latent(prior, operator, y: Tensor, image_shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """μ_0 (see the module docstring): E(y), E(clip(A†y)) or a random latent."""
    if tuple(y.shape) == tuple(image_shape):
        start = y
    elif getattr(operator, "linear", False):
        start = operator.A_dagger(y, tuple(image_shape[1:]))
    else:
        shape = prior.latent_shape(image_shape)
        return torch.randn(shape, generator=gen, device=y.device, dtype=y.dtype)
    with torch.no_grad():
        return prior.encode(to_model(start.clamp(0, 1)))


def _check(steps: int, t_min: float, regularizer_weight: float, data_steps: int, data_lr: float) -> None:
    check_params("flair", [
        ("steps", steps, is_count(steps, 1), "a positive integer"),
        ("t_min", t_min, is_number(t_min, 0, strict=True) and t_min < 1, "in (0, 1)"),
        ("regularizer_weight", regularizer_weight, is_number(regularizer_weight, 0), "a number >= 0"),
        ("data_steps", data_steps, is_count(data_steps, 0), "an integer >= 0"),
        ("data_lr", data_lr, is_number(data_lr, 0, strict=True), "a number > 0")])


@register_solver("flair", latent=True, flow=True, title="FLAIR (flow-matching variational)", min_steps=20,
                 step_cost=8.0,
                 summary="variational point estimate under a flow-matching prior (SD3, or SD-style "
                         "through the Gaussian-path equivalence): a regulariser step and hard data "
                         "consistency per step")
def flair(
    y: Tensor,
    operator,
    prior,
    *,
    noise_sigma: float = 0.0,
    steps: int = 50,
    t_min: float = 0.18,
    regularizer_weight: float = 0.5,
    data_steps: int = 15,
    data_lr: float = 0.1,
    tolerance: float = 1e-4,
    error_table: list[float] | None = None,
    prompt: str = "",
    guidance: float = 1.0,
    seed: int | None = 0,
    x_shape: tuple[int, ...] | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> SolveResult:
    """FLAIR estimate per row of ``y`` with a latent (flow-matching or SD-style) prior."""
    _check(steps, t_min, regularizer_weight, data_steps, data_lr)
    gen = make_generator(seed, y.device)
    grid = time_grid(prior, steps, t_min)
    times = flow_times(prior)[grid]
    lam = regularizer_weight * regularizer_weights(error_table, times)
    prior.set_prompt(prompt, guidance)
    params = {"steps": steps, "t_min": t_min, "regularizer_weight": regularizer_weight,
              "data_steps": data_steps, "data_lr": data_lr, "tolerance": tolerance,
              "calibrated": error_table is not None, "prompt": prompt, "guidance": guidance,
              "seed": gen.initial_seed()}
    loop = StepLoop("flair", len(grid), callback, progress, params)
    image_shape = latent_image_shape(y, operator, prior, x_shape)
    mu = initial_latent(prior, operator, y, image_shape, gen)
    x1_hat = torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)
    model_calls, data_taken = (2 if guidance != 1.0 else 1), []
    stop_at = max(tolerance, (2.0 * noise_sigma) ** 2)  # mean squared residual, model units
    for i, k in enumerate(grid):
        t, w = float(times[i]), float(lam[i])
        a = 1.0 - t
        noise = torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)
        eps_hat = a * x1_hat + math.sqrt(max(1.0 - a * a, 0.0)) * noise
        x_t = (1.0 - t) * mu + t * eps_hat
        with torch.no_grad():
            v = flow_velocity(prior, x_t, k)
        loop.count(model_calls)
        x1_hat = x_t + (1.0 - t) * v
        mu = mu - w * (v - (eps_hat - mu))
        mu, taken = hard_data_consistency(prior, operator, y, mu, data_lr * w, data_steps, stop_at)
        data_taken.append(taken)
        with torch.no_grad():  # the callback shows images (model units): decode only for one
            shown = prior.decode(mu) if callback is not None else mu
        loop.step(i, mu, shown)
    loop.extra["data_steps_taken"] = data_taken
    loop.extra["t_first"], loop.extra["t_last"] = float(times[0]), float(times[-1])
    with torch.no_grad():
        image = to_image(prior.decode(mu)).clamp(0, 1)
    return loop.finish(mu, y, operator, prior, image=image)


def regularizer_error_table(prior, latents: Tensor, points: int = 100, draws: int = 4,
                            seed: int = 0) -> list[float]:
    """e(t) = E ‖v(x_t, t) − (ε − x_0)‖² (mean per entry) of ``prior`` under its current prompt, on clean
    ``latents`` (encoded images of the model's domain), at t = linspace(1, 0, points) snapped to the prior's
    grid: the table FLAIR's calibrated regulariser weight is the inverse of."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    s = flow_times(prior)
    table = []
    for t in torch.linspace(1.0, 0.0, points, dtype=torch.float64):
        k = int((s - t).abs().argmin())
        tk = float(s[k])
        errors = []
        for _ in range(draws):
            eps = torch.randn(latents.shape, generator=gen).to(latents)
            x_t = (1 - tk) * latents + tk * eps
            with torch.no_grad():
                errors.append(float((flow_velocity(prior, x_t, k) - (eps - latents)).pow(2).mean()))
        table.append(sum(errors) / draws)
    return table
