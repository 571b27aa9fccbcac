"""The one prior interface every solver uses.

A prior is a variance-preserving (DDPM) diffusion model on ``x`` in [-1, 1] model space:

    x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε,   ε ~ N(0, I),   t = 0 … T-1.

It exposes the discrete schedule ``alphas_cumprod`` (ᾱ_t, a float64 tensor of length T) and one
prediction method, :meth:`DiffusionPrior.predict`, returning the noise ε̂(x_t, t) and the Tweedie
estimate x̂_0(x_t, t) = E[x_0 | x_t] = (x_t - sqrt(1-ᾱ_t) ε̂) / sqrt(ᾱ_t).

Network priors convert whatever their model outputs (``prediction_type`` ``epsilon``, ``v_prediction``
or ``sample``) into that pair; analytic priors compute it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.core.errors import StudioError

Tensor = torch.Tensor


@dataclass
class Prediction:
    """ε̂ and x̂_0 at one timestep, both shaped like x_t.

    ``variance_logit``: for models with a learned variance (guided-diffusion's ``learn_sigma``, 2C output
    channels), the raw extra channels v ∈ [-1, 1]: the step's log-variance is the interpolation
    ((v+1)/2) log β_t + (1 − (v+1)/2) log β̃_t (Nichol & Dhariwal 2021, eq. 15; ``learned_range``);
    None for every other model.
    """

    eps: Tensor
    x0: Tensor
    variance_logit: Tensor | None = None


def linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """ᾱ_t for the DDPM linear β schedule (the DPS/DDRM/CDIM default), float64."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def split_prediction(
    model_output: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction_type: str
) -> Prediction:
    """Turn a raw model output into (ε̂, x̂_0). ``alpha_bar`` broadcasts against ``x_t``.

    epsilon:       ε̂ = out,                         x̂_0 = (x_t - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ)
    v_prediction:  x̂_0 = sqrt(ᾱ) x_t - sqrt(1-ᾱ) v,  ε̂ = sqrt(ᾱ) v + sqrt(1-ᾱ) x_t
    sample:        x̂_0 = out,                        ε̂ = (x_t - sqrt(ᾱ) x̂_0) / sqrt(1-ᾱ)
    """
    a, s = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return Prediction(eps=model_output, x0=(x_t - s * model_output) / a)
    if prediction_type == "v_prediction":
        return Prediction(eps=a * model_output + s * x_t, x0=a * x_t - s * model_output)
    if prediction_type == "sample":
        return Prediction(eps=(x_t - a * model_output) / s, x0=model_output)
    raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon, v_prediction, sample)")


class DiffusionPrior(torch.nn.Module):
    """Base class: schedule + :meth:`predict`. Subclasses implement :meth:`_predict`.

    Attributes:
        alphas_cumprod: ᾱ_t, float64, shape (T,).
        sample_shape: (C, H, W) of one sample at the model's native size (``None`` if any size works).
        clip_denoised: the data lives in [-1, 1] (image priors), so :meth:`predict` may clamp x̂_0 to it;
            ε̂ is then recomputed from the clamped x̂_0 so the pair stays consistent (guided-diffusion
            convention). Whether to clamp is each solver's choice (``clip``): DPS and MCG clamp as their
            official code does, DDRM and CDIM's inner Tweedie estimate do not.
        learned_variance: the model also predicts its step variance (``Prediction.variance_logit``), as
            the guided-diffusion checkpoints of DPS/MCG/DDRM do.
    """

    clip_denoised: bool = False
    sample_shape: tuple[int, int, int] | None = None
    learned_variance: bool = False  # predictions carry ``variance_logit``

    def __init__(self, alphas_cumprod: Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def alpha_bar(self, t: int | Tensor, like: Tensor) -> Tensor:
        """ᾱ_t as a tensor broadcastable to ``like`` (per-sample when ``t`` is a (B,) tensor)."""
        ab = self.alphas_cumprod[torch.as_tensor(t, device=self.alphas_cumprod.device)]
        return ab.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def predict(self, x_t: Tensor, t: int | Tensor, clip: bool = True) -> Prediction:
        """ε̂ and x̂_0 for x_t (model space) at integer timestep ``t`` (an int or a (B,) tensor); x̂_0 is
        clamped to [-1, 1] when ``clip`` and the prior's data is bounded (``clip_denoised``)."""
        pred = self._predict(x_t, t)
        if clip and self.clip_denoised:
            ab = self.alpha_bar(t, x_t)
            x0 = pred.x0.clamp(-1.0, 1.0)
            pred = Prediction(eps=(x_t - ab.sqrt() * x0) / (1.0 - ab).sqrt(), x0=x0,
                              variance_logit=pred.variance_logit)
        return pred

    #: an image side more than this many times the model's trained side is refused (see check_image_size)
    max_size_ratio: float = 2.0

    def trained_image_size(self) -> tuple[int, int] | None:
        """(H, W) of the images the network was trained on; None when any size is the model's own."""
        return None

    def check_image_size(self, height: int, width: int) -> None:
        """Refuse, with one line naming the size the model wants, an image whose side exceeds
        ``max_size_ratio`` × the trained side: a UNet runs at any size, but a 32² model on a 512² photo
        (or a 2000² one: minutes per step, GBs) gives neither a restoration nor an error the user reads.
        Smaller images and moderate mismatches (SD-1.5 at 768²) run as they are."""
        trained = self.trained_image_size()
        if trained is None:
            return
        th, tw = trained
        if height > self.max_size_ratio * th or width > self.max_size_ratio * tw:
            raise StudioError(
                f"this model was trained on {tw}x{th} images and the image is {width}x{height} (more than "
                f"{self.max_size_ratio:g}x larger): resize or crop it to about {tw}x{th}, or use a model "
                f"trained at that size"
            )

    def timestep_for_sigma(self, sigma: float) -> int:
        """The timestep whose noise-to-signal ratio sqrt((1-ᾱ_t)/ᾱ_t) is closest to ``sigma``
        (model units)."""
        ratio = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        return int((ratio - float(sigma)).abs().argmin())

    @torch.no_grad()
    def denoise(self, y: Tensor, sigma: float) -> Tensor:
        """Tweedie/MMSE denoiser for ``y = x + sigma * n`` in model units: E[x | y] from x̂_0.

        ``y`` is a point of the variance-preserving chain once scaled: x_t = sqrt(ᾱ_t) y with
        (1-ᾱ_t)/ᾱ_t = sigma², so x̂_0(x_t, t) is the denoised image (at the nearest trained t).
        """
        t = self.timestep_for_sigma(sigma)
        ab = self.alpha_bar(t, y)
        return self.predict(ab.sqrt() * y, t).x0

    def _predict(self, x_t: Tensor, t: int | Tensor) -> Prediction:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-serialisable description for run sidecars."""
        return {"class": type(self).__name__, "num_train_timesteps": self.num_train_timesteps}
