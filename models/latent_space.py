"""What every latent text-to-image prior adds to :class:`~models.base.DiffusionPrior`, whatever its denoiser
(a UNet for Stable Diffusion 1.x/2.x, a transformer for SD3): the VAE's latent space and the text
conditioning :meth:`predict` uses.

Latents are z = s · (mean(E(x)) − shift) with the VAE's ``scaling_factor`` s and ``shift_factor`` (0 for
SD-1.x/2.x, set for SD3); the encoder mean makes encode/decode deterministic, as the range projections of
PSLD/P2L need. A subclass sets ``denoiser``, ``vae``, ``factor`` (the VAE's downsampling), ``size_multiple``
(what an image side must divide by), ``latent_channels``, ``image_size``, ``scaling_factor``,
``shift_factor``, ``vae_dtype`` and implements ``embed``."""

from __future__ import annotations

import torch

from studio.core.errors import StudioError

Tensor = torch.Tensor


class LatentSpace:
    clip_denoised = False  # latents are unbounded
    shift_factor = 0.0

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def unet_dtype(self) -> torch.dtype:
        """The denoiser's dtype (a UNet's or a transformer's; the name is the one solvers already read)."""
        return next(self.denoiser.parameters()).dtype

    def trained_image_size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(B, C, H, W) image → (B, c, H/f, W/f) latent; H and W must be multiples of ``size_multiple``."""
        *lead, h, w = image_shape
        self.check_image_size(h, w)
        m = self.size_multiple
        if h % m or w % m:
            what = (f"this model's VAE factor {m}" if m == self.factor else
                    f"{m} (this model's VAE factor {self.factor} x its patch size {m // self.factor})")
            raise StudioError(f"image size {h}x{w} is not divisible by {what}: crop or pad to a multiple of "
                              f"{m} (e.g. {h - h % m}x{w - w % m})")
        return (*lead[:-1], self.latent_channels, h // self.factor, w // self.factor)

    def encode(self, x: Tensor) -> Tensor:
        """Model-space image [-1, 1] → s · (mean(E(x)) − shift) (deterministic)."""
        self.latent_shape(tuple(x.shape))
        z = self.vae.encode(x.to(self.vae_dtype)).latent_dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent → model-space image (float32 when the VAE is float32)."""
        latent = (z / self.scaling_factor + self.shift_factor).to(self.vae_dtype)
        return self.vae.decode(latent).sample.to(z.dtype)

    def set_prompt(self, prompt: str = "", guidance: float = 1.0, negative_prompt: str = "") -> None:
        """The conditioning :meth:`predict` uses: prompt, guidance scale w and the negative ("") prompt."""
        if not guidance >= 0 or guidance != guidance:
            raise StudioError(f"guidance scale must be >= 0, got {guidance}")
        self.prompt, self.guidance = prompt, float(guidance)
        self.cond = self.embed(prompt)
        self.uncond = self.embed(negative_prompt) if guidance != 1.0 else None


__all__ = ["LatentSpace"]
