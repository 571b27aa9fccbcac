"""Flow-matching priors (rectified flow, Stable Diffusion 3) behind the one prior interface.

A flow-matching model learns the straight Gaussian path and predicts its velocity:

    x_s = (1 − s) x_0 + s ε,   s ∈ [0, 1],   v_θ(x_s, s) ≈ E[ε − x_0 | x_s]     (diffusers'
    ``FlowMatchEulerDiscreteScheduler``: x_{s'} = x_s + (s' − s) v)

This is the variance-preserving path x_t = α x_0 + σ ε (α = sqrt(ᾱ), σ = sqrt(1 − ᾱ)) up to a per-time
scale: dividing by α + σ,

    x_t / (α + σ) = (α x_0 + σ ε) / (α + σ) = (1 − s) x_0 + s ε     with   s = σ / (α + σ),

and back, ᾱ = (1 − s)² / ((1 − s)² + s²). The same x_0 and ε sit under both, so a denoiser of one is the
denoiser of the other, exactly (no approximation, no retraining):

    VP view of a flow model:   x_s = x_t / (α + σ);  v = v_θ(x_s, s);  x̂_0 = x_s − s v;  ε̂ = x_s + (1 − s) v
    flow view of a VP model:   x_t = (α + σ) x_s;    ε̂, x̂_0 = prior(x_t, t);  v = ε̂ − x̂_0

:class:`FlowMatchingPrior` is the VP view: every solver written against :class:`~models.base.DiffusionPrior`
(ᾱ on an integer grid, :meth:`predict` giving ε̂ and x̂_0) runs on a flow model unchanged. Its grid is the
scheduler's training grid, s_k = shift·u / (1 + (shift − 1) u) with u = (k + 1)/T (SD3: shift 3, T 1000),
so uniform timestep spacing reproduces the model's own sampling schedule. :func:`flow_velocity` is the
flow view of any prior at its grid (what FLAIR steps on), for flow and VP models alike.

:class:`SD3LatentPrior` loads a Stable-Diffusion-3-style pipeline: ``SD3Transformer2DModel``, its VAE with
``shift_factor`` and ``scaling_factor`` (latents z = (E(x) − shift) · scale), its text encoders through the
pipeline's own ``encode_prompt`` (CLIP-L, CLIP-G and the optional T5), classifier-free guidance as SD3
does (v = v_∅ + w (v_c − v_∅)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from models.base import DiffusionPrior, Prediction
from models.diffusers_prior import to_device
from models.latent_space import LatentSpace
from studio.core.errors import ModelLoadError

Tensor = torch.Tensor


# ------------------------------------------------------------------------ the Gaussian-path equivalence


def flow_time(alpha_bar: Tensor) -> Tensor:
    """VP ᾱ → flow time s = σ / (α + σ)."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return s / (a + s)


def vp_alpha_bar(s: Tensor) -> Tensor:
    """Flow time s → VP ᾱ = (1 − s)² / ((1 − s)² + s²)."""
    return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)


def vp_to_flow_scale(alpha_bar: Tensor) -> Tensor:
    """α + σ: x_flow = x_vp / (α + σ)."""
    return alpha_bar.sqrt() + (1 - alpha_bar).sqrt()


def flow_velocity(prior, x_flow: Tensor, t: int) -> Tensor:
    """v(x_s, s_t) = E[ε − x_0 | x_s] of any prior at its grid index ``t`` (s_t = flow_time(ᾱ_t)): the
    network's own velocity for a flow model, the reparametrised ε̂ − x̂_0 for a variance-preserving one."""
    if isinstance(prior, FlowMatchingPrior):
        return prior.velocity(x_flow, t)
    ab = prior.alpha_bar(t, x_flow)
    pred = prior.predict(vp_to_flow_scale(ab) * x_flow, t, clip=False)
    return pred.eps - pred.x0


def flow_times(prior) -> Tensor:
    """s_t of every grid index of ``prior`` (float64, ascending with t)."""
    return flow_time(prior.alphas_cumprod)


# ------------------------------------------------------------------------ flow models as VP priors


class FlowMatchingPrior(DiffusionPrior):
    """The VP view of a velocity model on a flow-time grid ``sigmas`` (s_k, ascending, in (0, 1]).
    Subclasses implement :meth:`velocity` (x_s, grid index) → v."""

    prediction_type = "flow"

    def __init__(self, sigmas: Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if sigmas.dim() != 1 or not ((sigmas > 0) & (sigmas <= 1)).all() or (sigmas.diff() <= 0).any():
            raise ValueError("flow sigmas must be ascending values in (0, 1]")
        super().__init__(vp_alpha_bar(sigmas))
        self.register_buffer("sigmas", sigmas, persistent=False)

    def velocity(self, x_flow: Tensor, t: int | Tensor) -> Tensor:
        raise NotImplementedError

    def _predict(self, x_t: Tensor, t: int | Tensor) -> Prediction:
        ab = self.alpha_bar(t, x_t)
        s = self.sigmas[torch.as_tensor(t, device=self.sigmas.device)].to(x_t.dtype)
        s = s.reshape(-1, *([1] * (x_t.dim() - 1)))
        x_flow = x_t / vp_to_flow_scale(ab)
        v = self.velocity(x_flow, t)
        return Prediction(eps=x_flow + (1 - s) * v, x0=x_flow - s * v)


def training_sigmas(num_train_timesteps: int, shift: float) -> Tensor:
    """The flow-time grid of diffusers' ``FlowMatchEulerDiscreteScheduler``: u = k/T for k = 1 … T, shifted
    to s = shift·u / (1 + (shift − 1) u) (ascending)."""
    u = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return shift * u / (1 + (shift - 1) * u)


class TextCondition(NamedTuple):
    """SD3's conditioning: the token states (B, L, D) and the pooled CLIP projections (B, P)."""

    hidden: Tensor
    pooled: Tensor


class SD3LatentPrior(LatentSpace, FlowMatchingPrior):
    """A Stable-Diffusion-3-style pipeline as a prior on its latents (see the module docstring)."""

    def __init__(self, pipe, source: str = "<in memory>", vae_dtype: torch.dtype | None = None):
        scheduler = pipe.scheduler
        if scheduler.config.get("use_dynamic_shifting", False):
            raise ModelLoadError("this flow model shifts its schedule by image size (use_dynamic_shifting); "
                              "only a fixed shift (Stable Diffusion 3) is supported")
        self.num_flow_timesteps = int(scheduler.config.num_train_timesteps)
        super().__init__(training_sigmas(self.num_flow_timesteps, float(scheduler.config.get("shift", 1.0))))
        self.pipe, self.transformer, self.vae = pipe, pipe.transformer, pipe.vae
        self.source, self.scheduler_config = source, dict(scheduler.config)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.get("shift_factor") or 0.0)
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.patch_size = int(self.transformer.config.patch_size)
        self.size_multiple = self.factor * self.patch_size
        self.latent_channels = int(self.transformer.config.in_channels)
        self.vae_dtype = vae_dtype or next(self.vae.parameters()).dtype
        size = int(self.transformer.config.sample_size)
        self.sample_shape = (self.latent_channels, size, size)
        self.image_size = size * self.factor
        for m in pipe.components.values():
            if isinstance(m, torch.nn.Module):
                m.requires_grad_(False).eval()
        self.set_prompt("")

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def embed(self, prompts: str | list[str]) -> TextCondition:
        """Prompt(s) → SD3's (token states, pooled projections) from the pipeline's ``encode_prompt``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with torch.no_grad():
            hidden, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.device,
                                                           do_classifier_free_guidance=False)
        return TextCondition(hidden.to(self.unet_dtype), pooled.to(self.unet_dtype))

    def _transformer(self, x: Tensor, t: int | Tensor, cond: TextCondition) -> Tensor:
        b = x.shape[0]
        hidden, pooled = (c.expand(b, *c.shape[1:]) if c.shape[0] == 1 else c for c in cond)
        s = self.sigmas[torch.as_tensor(t, device=self.sigmas.device)].to(x.device, torch.float32)
        timestep = (s * self.num_flow_timesteps).reshape(-1).expand(b)  # diffusers: sigma · T
        return self.transformer(hidden_states=x.to(self.unet_dtype), timestep=timestep,
                                encoder_hidden_states=hidden, pooled_projections=pooled,
                                return_dict=False)[0].to(x.dtype)

    def velocity(self, x_flow: Tensor, t: int | Tensor) -> Tensor:
        """v_θ under the current prompt and guidance (one batched call when w ≠ 1)."""
        if self.uncond is None or self.guidance == 1.0:
            return self._transformer(x_flow, t, self.cond)
        b = x_flow.shape[0]
        pair = TextCondition(*(torch.cat([u.expand(b, *u.shape[1:]), c.expand(b, *c.shape[1:])])
                               for u, c in zip(self.uncond, self.cond)))
        t2 = t if torch.as_tensor(t).dim() == 0 else torch.cat([t, t])
        v_u, v_c = self._transformer(torch.cat([x_flow, x_flow]), t2, pair).chunk(2)
        return v_u + self.guidance * (v_c - v_u)

    def describe(self) -> dict:
        return {**super().describe(), "source": self.source, "latent": True, "flow": True,
                "vae_factor": self.factor, "patch_size": self.patch_size,
                "latent_channels": self.latent_channels, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "prediction_type": self.prediction_type,
                "scheduler": self.scheduler_config.get("_class_name"),
                "schedule_shift": self.scheduler_config.get("shift", 1.0), "prompt": self.prompt,
                "guidance": self.guidance, "transformer_dtype": str(self.unet_dtype).replace("torch.", ""),
                "vae_dtype": str(self.vae_dtype).replace("torch.", "")}


def is_flow_pipeline(pipe) -> bool:
    """A Stable-Diffusion-3-style pipeline: a transformer denoiser, a VAE and a flow-matching scheduler."""
    scheduler = getattr(pipe, "scheduler", None)
    return (getattr(pipe, "transformer", None) is not None and getattr(pipe, "vae", None) is not None
            and "FlowMatch" in type(scheduler).__name__)


def load_sd3_prior(pipe, source: str, device=None, dtype: torch.dtype | None = None,
                   vae_dtype: torch.dtype | None = None) -> SD3LatentPrior:
    """An opened SD3-style pipeline as a prior: its transformer and text encoders moved to ``device`` /
    ``dtype`` (None: as they are), the VAE to ``vae_dtype``."""
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            to_device(module, device, dtype)
    to_device(pipe.vae, device, vae_dtype)
    return SD3LatentPrior(pipe, source=source, vae_dtype=vae_dtype)


__all__ = ["FlowMatchingPrior", "SD3LatentPrior", "TextCondition", "flow_time", "flow_times",
           "flow_velocity", "is_flow_pipeline", "load_sd3_prior", "training_sigmas", "vp_alpha_bar",
           "vp_to_flow_scale"]
