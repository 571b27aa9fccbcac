"""Pieces every solver shares: timestep grids, the DDIM/DDPM step, the run record and the step loop's
progress / callback / NaN guard.

Solver calling convention (DeepInverse ``Reconstructor``-like, k-diffusion-plain):

    result = solver(y, operator, prior, *, noise_sigma=..., steps=..., seed=..., callback=...)

* ``y`` is the measurement in [0, 1] image units, batch B (one sample per row; repeat y for several).
* ``operator`` acts on [0, 1] images (``studio.core.operators``); ``noise_sigma`` is in [0, 1] units.
* ``callback(step, total, x_t, x0_hat)`` is called once per step with detached model-space tensors;
  returning ``False`` cancels the solve (:class:`~studio.core.errors.SolveCancelled`).
* The result holds the model-space sample, the [0, 1] image and a JSON-ready record
  (NFE, backward passes, wall time, final residual ‖A x − y‖ per sample).
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from models.base import Prediction
from studio.core.conventions import to_image
from studio.core.errors import SolveCancelled, SolverDivergedError, StudioError

Tensor = torch.Tensor
StepCallback = Callable[[int, int, Tensor, Tensor], "bool | None"]


@dataclass
class SolveResult:
    x: Tensor  # model space [-1, 1] (unclamped)
    image: Tensor  # [0, 1] image (clamped for image priors)
    record: dict = field(default_factory=dict)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded generator on ``device`` (seed None → a random seed, recorded by the caller)."""
    g = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    g.manual_seed(int(seed))
    return g


def timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading") -> list[int]:
    """Descending timesteps for a ``steps``-step sampler.

    leading  (DDIM paper, DDRM, CDIM): t = k·(T // steps), k = steps-1 … 0, e.g. 980, 960, …, 0.
    trailing (better for few steps):   t = round(T - k·T/steps) - 1, starts at T-1.
    """
    if not isinstance(steps, int) or steps <= 0:
        raise StudioError(f"steps must be a positive integer, got {steps!r}")
    if steps > num_train_timesteps:
        raise StudioError(f"steps={steps} exceeds the model's {num_train_timesteps} training timesteps")
    if spacing == "leading":
        ts = [k * (num_train_timesteps // steps) for k in range(steps)]
    elif spacing == "trailing":
        ts = [round(num_train_timesteps - k * num_train_timesteps / steps) - 1 for k in range(steps)]
    else:
        raise StudioError(f"unknown timestep spacing {spacing!r} (leading, trailing)")
    return sorted(set(ts), reverse=True)


def alpha_bar_at(prior, t: int, like: Tensor) -> Tensor:
    """ᾱ_t as a 0-d tensor in ``like``'s dtype; t < 0 means the clean end, ᾱ = 1."""
    if t < 0:
        return torch.ones((), dtype=like.dtype, device=like.device)
    return prior.alphas_cumprod[t].to(device=like.device, dtype=like.dtype)


def ddim_step(
    x_t: Tensor,
    eps: Tensor,
    x0: Tensor,
    alpha_bar_t: Tensor,
    alpha_bar_prev: Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    log_variance: Tensor | None = None,
) -> Tensor:
    """DDIM update (Song et al. 2021, eq. 12):

        x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ²) ε̂ + σ z,
        σ = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev).

    η = 0 is deterministic DDIM; η = 1 is exactly the DDPM ancestral step with the posterior variance
    β̃ (``fixed_small``) on the respaced schedule. DPS/MCG run their 1000-step DDPM with this step; their
    official runs instead use the ADM checkpoints' *learned* variance (``learned_range``), which a model
    without a variance head does not have. For those, pass ``log_variance``
    (:func:`learned_log_variance`) with η = 1: the mean stays the DDPM posterior mean and the noise takes
    the model's variance, as the official ``p_sample`` does.
    """
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t)
                   * (1 - alpha_bar_t / alpha_bar_prev)).clamp_min(0).sqrt()
    x_prev = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp_min(0).sqrt() * eps
    if eta > 0 and float(sigma) > 0:
        noise_scale = sigma if log_variance is None else (0.5 * log_variance).exp()
        x_prev = x_prev + noise_scale * torch.randn(x_t.shape, generator=generator, device=x_t.device,
                                                    dtype=x_t.dtype)
    return x_prev


def learned_log_variance(prior, pred, alpha_bar_t: Tensor, alpha_bar_prev: Tensor) -> Tensor | None:
    """log σ² of the step t → prev from a learned-variance model's output, on the respaced schedule
    (β = 1 − ᾱ_t/ᾱ_prev, β̃ = β (1 − ᾱ_prev)/(1 − ᾱ_t), as guided-diffusion's ``SpacedDiffusion``);
    None when the model has no learned variance.

    ``learned_range`` (ADM, Nichol & Dhariwal 2021 eq. 15): log σ² = f log β + (1 − f) log β̃ with
    f = (v + 1)/2; ``learned``: log σ² = v. β̃ is floored at 1e-20 (it is 0 only on the last step, which
    adds no noise).
    """
    v = getattr(pred, "variance_logit", None)
    if v is None or not getattr(prior, "learned_variance", False):
        return None
    if getattr(prior, "variance_type", "learned_range") == "learned":
        return v
    beta = 1 - alpha_bar_t / alpha_bar_prev
    beta_tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    frac = (v + 1) / 2
    return frac * beta.clamp_min(1e-20).log() + (1 - frac) * beta_tilde.clamp_min(1e-20).log()


def initial_noise(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def signal_shape(y: Tensor, operator, prior, x_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The (B, C, H, W) of the unknown image: given, else from Aᵀy (linear A), else the prior's size;
    refused when the prior cannot take that size (:meth:`~models.base.DiffusionPrior.check_image_size`)."""
    if x_shape is not None:
        shape = tuple(x_shape) if len(x_shape) == 4 else (y.shape[0], *x_shape)
    elif getattr(operator, "linear", False):
        shape = (y.shape[0], *operator.input_shape(tuple(y.shape[1:])))
    elif prior.sample_shape is not None:
        shape = (y.shape[0], *prior.sample_shape)
    else:
        raise StudioError("cannot infer the image size for a nonlinear operator: pass x_shape=(C, H, W)")
    if hasattr(prior, "check_image_size"):
        prior.check_image_size(*shape[-2:])
    if x_shape is not None or not getattr(operator, "linear", False):  # Aᵀy's shape fits y by construction
        check_measurement(operator, y, shape)
    return shape


def check_measurement(operator, y: Tensor, shape: tuple[int, ...]) -> None:
    """One line, before the first step, when ``y`` is not what ``operator`` makes of an image of ``shape``
    (otherwise the first residual fails deep inside the solver with a broadcasting error)."""
    c, h, w = shape[-3:]
    try:
        with torch.no_grad():
            expected = tuple(operator.A(torch.zeros(1, c, h, w, device=y.device, dtype=y.dtype)).shape[1:])
    except (RuntimeError, ValueError, IndexError, StudioError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StudioError(f"the operator cannot take a {c}x{h}x{w} image: {reason}") from None
    if expected != tuple(y.shape[1:]):
        raise StudioError(f"measurement has shape {tuple(y.shape[1:])} but the operator maps a {c}x{h}x{w} "
                          f"image to {expected}: pass the measurement it made, or the size of its image")


def clamp_x0(prior, x0: Tensor) -> Tensor:
    """x̂_0 clamped to [-1, 1] when the prior's data is bounded (image priors), unchanged otherwise."""
    return x0.clamp(-1.0, 1.0) if getattr(prior, "clip_denoised", False) else x0


def guidance_per_step(scale: float, prior, steps_taken: int) -> float:
    """The gradient step of a DPS-family solver run with ``steps_taken`` steps, for a ``scale`` stated at
    the official step count (one step per training timestep, 1000 for the DDPM models the papers use).

    The guidance a run applies in total is (number of steps) × (step), so a run with fewer steps takes
    proportionally larger ones: the total matches the official run's, as an ODE integrated on a coarser
    grid does. Without this, ``--steps 200`` at the official scale guided 5× less than the 1000-step run
    and lost to bicubic on SR ×4 (15.97 vs 16.88 dB on 12 held-out emoji).
    """
    return float(scale) * prior.num_train_timesteps / steps_taken


def is_count(value, low: int) -> bool:
    """An integer (not a bool; numpy integers too) >= ``low``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def is_number(value, low: float, strict: bool = False) -> bool:
    """A real number (not a bool, not NaN; numpy scalars too) > ``low`` (``strict``) or >= ``low``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    return value > low if strict else value >= low  # NaN fails both


def check_params(solver: str, checks: list[tuple[str, object, bool, str]]) -> None:
    """One line naming the first bad parameter: ``checks`` holds (name, value, ok, what it must be)."""
    for name, value, ok, need in checks:
        if not ok:
            raise StudioError(f"{solver}: {name} must be {need}, got {value!r}")


def per_sample_norm(r: Tensor) -> Tensor:
    """‖r_b‖₂ for each sample of a batch (DPS's official code uses one norm for the whole batch)."""
    return torch.linalg.vector_norm(r.reshape(r.shape[0], -1), dim=1)


class StepLoop:
    """Progress bar, callback, cancellation, NaN guard and counters for one solve."""

    def __init__(self, name: str, total: int, callback: StepCallback | None, progress: bool, params: dict):
        self.name, self.total, self.callback, self.params = name, total, callback, params
        self.nfe = 0  # model evaluations
        self.grad_nfe = 0  # of which with a backward pass
        self.extra: dict = {}
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=name, disable=not progress, leave=False, dynamic_ncols=True)

    def count(self, n: int = 1, grad: bool = False) -> None:
        self.nfe += n
        if grad:
            self.grad_nfe += n

    def step(self, i: int, x_t: Tensor, x0: Tensor) -> None:
        """Call after step ``i`` (0-based): checks for NaN, updates the bar, runs the callback."""
        if not torch.isfinite(x_t).all():
            self.bar.close()
            hint = ", ".join(f"{k}={v}" for k, v in self.params.items() if k in ("scale", "step_size"))
            raise SolverDivergedError(
                f"{self.name}: NaN/Inf appeared at step {i + 1} of {self.total}"
                + (f" ({hint}); try a smaller step size" if hint else "")
            )
        self.bar.update(1)
        if self.callback is not None and self.callback(i, self.total, x_t.detach(), x0.detach()) is False:
            self.bar.close()
            raise SolveCancelled(f"{self.name}: cancelled at step {i + 1} of {self.total}")

    def finish(self, x: Tensor, y: Tensor, operator, prior, image: Tensor | None = None) -> SolveResult:
        """The result; latent solvers pass the decoded ``image`` ([0, 1]) of their final latent ``x``."""
        self.bar.close()
        if not torch.isfinite(x).all():
            raise SolverDivergedError(f"{self.name}: the result contains NaN/Inf")
        if image is None:
            image = to_image(x.detach())
            if getattr(prior, "clip_denoised", False):
                image = image.clamp(0.0, 1.0)
        image = image.detach()
        with torch.no_grad():
            residual = per_sample_norm(operator.observed(operator.A(image)) - y)
        record = {
            "solver": self.name,
            "params": dict(self.params),
            "nfe": self.nfe,
            "grad_nfe": self.grad_nfe,
            "wall_time_s": time.perf_counter() - self.start,
            "residual": residual.tolist(),
            "relative_residual": (residual / per_sample_norm(y).clamp_min(1e-12)).tolist(),
            **self.extra,
        }
        return SolveResult(x=x.detach(), image=image, record=record)


def conjugate_gradient(apply, b: Tensor, x0: Tensor, iters: int = 10, tol: float = 1e-10) -> Tensor:
    """Solve ``apply(x) = b`` for a symmetric positive-definite linear map, per sample, from ``x0``."""
    dims = tuple(range(1, b.dim()))
    x = x0.clone()
    r = b - apply(x)
    p = r.clone()
    rs = (r * r).sum(dims, keepdim=True)
    for _ in range(iters):
        if float(rs.max()) <= tol:
            break
        ap = apply(p)
        alpha = rs / (p * ap).sum(dims, keepdim=True).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(dims, keepdim=True)
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return x


def latent_image_shape(y: Tensor, operator, prior, x_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """(B, 3, H, W) of the unknown image for a latent prior: given, else from Aᵀy, else the model's size."""
    if x_shape is not None or getattr(operator, "linear", False):
        return signal_shape(y, operator, prior, x_shape)
    return (y.shape[0], 3, prior.image_size, prior.image_size)


def model_residual(operator, y: Tensor, x: Tensor) -> Tensor:
    """A(x) − y per entry for a model-space image x ([-1, 1]), in model units: 2 × the [0, 1] residual, as
    the pixel DPS measures it, so step sizes mean the same thing in pixel and latent solvers. A(x) goes
    through ``operator.observed`` (the measured entries; for the shipped operators A already masks, so this
    changes no value, but an operator whose A does not is still compared on its measured entries only)."""
    return 2.0 * (operator.observed(operator.A(to_image(x))) - y)


def decoded_residual_norm(prior, operator, y: Tensor, z0: Tensor) -> tuple[Tensor, Tensor]:
    """x̂_0 = D(ẑ_0) (model units) and the per-sample ‖A x̂_0 − y‖ in model units (:func:`model_residual`)."""
    x0 = prior.decode(z0)
    return x0, per_sample_norm(model_residual(operator, y, x0))


def latent_dps_gradient(predict: Callable[[Tensor], Prediction], prior, operator, y: Tensor,
                        z: Tensor) -> tuple[Prediction, Tensor, Tensor]:
    """The latent DPS gradient ∇_z Σ_b ‖y_b − A(D(ẑ_0(z_b)))‖ (per-sample norms in model units) through the
    denoiser ``predict`` (z ↦ its :class:`~models.base.Prediction`: the prompt's, or a given embedding's) and
    the decoder. Returns the prediction (detached), D(ẑ_0) (detached) and the gradient; the caller takes its
    DDIM step from the prediction and subtracts its own multiple of the gradient."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        pred = predict(z)
        x0, norm = decoded_residual_norm(prior, operator, y, pred.x0)
        (grad,) = torch.autograd.grad(norm.sum(), z)
    return Prediction(pred.eps.detach(), pred.x0.detach()), x0.detach(), grad
