"""Latent diffusion priors: any Stable-Diffusion-style pipeline (VAE + CLIP text encoder + conditional UNet).

The diffusion runs on latents z = s · E(x) (s = ``vae.config.scaling_factor``, E the encoder *mean*, so
encode/decode are deterministic, as the range projections of PSLD/P2L need). The same
:class:`~models.base.DiffusionPrior` interface as the pixel priors applies, over latents:
``predict(z_t, t)`` gives ε̂ and ẑ_0 under the *current* text conditioning (:meth:`set_prompt`), with
classifier-free guidance (Ho & Salimans 2022)

    ε̂ = ε_θ(z_t, t, ∅) + w · (ε_θ(z_t, t, c) − ε_θ(z_t, t, ∅)),

computed as one batched UNet call when w ≠ 1. Solvers that optimise the text embedding (P2L) call
:meth:`predict_with` with an explicit embedding instead.

Images at the API are in model units [-1, 1] here (solvers convert with ``studio.core.conventions``). Memory
options for real SD models on a GPU: the UNet in float16/bfloat16 with the VAE kept in float32
(``vae_dtype``), gradient checkpointing, attention slicing.
"""

from __future__ import annotations

import torch

from models.base import DiffusionPrior, Prediction, split_prediction
from models.diffusers_prior import is_pipeline, to_device, use_or_open_pipeline
from models.flow_prior import is_flow_pipeline, load_sd3_prior
from models.latent_space import LatentSpace
from models.registry import TEXT_TO_IMAGE, default_model
from studio.core.errors import ModelLoadError

Tensor = torch.Tensor


class LatentDiffusionPrior(LatentSpace, DiffusionPrior):

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, source: str = "<in memory>",
                 vae_dtype: torch.dtype | None = None):
        super().__init__(torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64))
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.source = source
        self.scheduler_config = dict(scheduler.config)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.scaling_factor = float(vae.config.scaling_factor)
        self.factor = self.size_multiple = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(unet.config.in_channels)
        self.vae_dtype = vae_dtype or next(vae.parameters()).dtype
        size = unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        self.sample_shape = (self.latent_channels, size, size)
        self.image_size = size * self.factor
        for m in (unet, vae, text_encoder):
            m.requires_grad_(False).eval()
        self.set_prompt("")

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    # ------------------------------------------------------------------ text

    def embed(self, prompts: str | list[str]) -> Tensor:
        """Prompt(s) → CLIP hidden states (B, L, D), padded to the tokenizer's max length (as SD does)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return self.text_encoder(ids)[0].to(self.unet_dtype)

    # ------------------------------------------------------------------ denoiser

    def model_output(self, z_t: Tensor, t: int | Tensor, cond: Tensor, uncond: Tensor | None = None,
            guidance: float = 1.0) -> Tensor:
        """Model output (ε, v or x0 per the scheduler) with optional classifier-free guidance."""
        b = z_t.shape[0]
        cond = (cond.expand(b, -1, -1) if cond.shape[0] == 1 else cond).to(self.unet_dtype)
        t_in = torch.as_tensor(t, device=z_t.device).expand(b) if torch.as_tensor(t).dim() == 0 else t
        if uncond is None or guidance == 1.0:
            return self.unet(z_t.to(self.unet_dtype), t_in, encoder_hidden_states=cond).sample.to(z_t.dtype)
        uncond = (uncond.expand(b, -1, -1) if uncond.shape[0] == 1 else uncond).to(self.unet_dtype)
        out = self.unet(torch.cat([z_t, z_t]).to(self.unet_dtype), torch.cat([t_in, t_in]),
                        encoder_hidden_states=torch.cat([uncond, cond])).sample.to(z_t.dtype)
        out_u, out_c = out.chunk(2)
        return out_u + guidance * (out_c - out_u)

    def predict_with(self, z_t: Tensor, t: int | Tensor, cond: Tensor, uncond: Tensor | None = None,
                     guidance: float = 1.0) -> Prediction:
        """ε̂ and ẑ_0 for an explicit text embedding (differentiable in ``cond`` and ``z_t``)."""
        out = self.model_output(z_t, t, cond, uncond, guidance)
        ab = self.alpha_bar(t, z_t)
        return split_prediction(out, z_t, ab, self.prediction_type)

    def _predict(self, x_t: Tensor, t: int | Tensor) -> Prediction:
        return self.predict_with(x_t, t, self.cond, self.uncond, self.guidance)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "source": self.source,
            "latent": True,
            "vae_factor": self.factor,
            "latent_channels": self.latent_channels,
            "scaling_factor": self.scaling_factor,
            "prediction_type": self.prediction_type,
            "scheduler": self.scheduler_config.get("_class_name"),
            "prompt": self.prompt,
            "guidance": self.guidance,
            "unet_dtype": str(self.unet_dtype).replace("torch.", ""),
            "vae_dtype": str(self.vae_dtype).replace("torch.", ""),
        }


def _memory_options(pipe, denoiser, gradient_checkpointing: bool, attention_slicing: bool) -> None:
    if attention_slicing and hasattr(pipe, "enable_attention_slicing"):
        pipe.enable_attention_slicing()
    if gradient_checkpointing:
        for m in (denoiser, pipe.vae):
            if getattr(m, "_supports_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()


SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def open_sd_pipeline(name_or_path):
    """A Stable-Diffusion-style pipeline (by name, folder or cached hub id; a loaded pipeline object is used
    as it is) and its source; a clear :class:`ModelLoadError` when a component is missing."""
    pipe, source = use_or_open_pipeline(name_or_path)
    missing = [k for k in SD_COMPONENTS if getattr(pipe, k, None) is None]
    if missing:
        raise ModelLoadError(f"'{source}' is not a Stable-Diffusion-style pipeline: no {', '.join(missing)} "
                             f"(it is a {type(pipe).__name__})")
    return pipe, source


def load_latent_prior(
    name_or_path=None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = False,
    attention_slicing: bool = False,
) -> LatentDiffusionPrior:
    """A ``StableDiffusionPipeline``-compatible folder, registered name or (cached) hub id as a prior (None:
    the default text-to-image model), or an already loaded ``StableDiffusionPipeline`` (any pipeline with
    unet, vae, text_encoder, tokenizer and scheduler), whose modules the prior uses as they are (no copy).

    ``dtype`` applies to the UNet and text encoder (float16 on a GPU halves memory); the VAE stays in
    ``vae_dtype`` (float32 by default: SD's decoder overflows in float16). None: CPU, float32 and a float32
    VAE for a name or folder; for a pipeline object, its modules' own device and dtypes (an explicit one
    moves them in place, as ``pipe.to`` does). ``gradient_checkpointing`` trades compute for memory in the
    backward passes of DPS/PSLD/P2L; ``attention_slicing`` computes attention in slices (512x512 SD on small
    GPUs).
    """
    loaded = is_pipeline(name_or_path)
    model = name_or_path if loaded else name_or_path or default_model(TEXT_TO_IMAGE)
    pipe, source = use_or_open_pipeline(model)
    if not loaded:
        device, dtype, vae_dtype = device or "cpu", dtype or torch.float32, vae_dtype or torch.float32
    if is_flow_pipeline(pipe):  # Stable Diffusion 3 style: a flow-matching transformer
        _memory_options(pipe, pipe.transformer, gradient_checkpointing, attention_slicing)
        return load_sd3_prior(pipe, source, device, dtype, vae_dtype)
    pipe, _ = open_sd_pipeline(pipe)  # the components an SD pipeline needs, or one clear error
    parts = {k: getattr(pipe, k) for k in SD_COMPONENTS}
    if getattr(parts["unet"].config, "cross_attention_dim", None) is None:
        raise ModelLoadError(f"'{source}' has an unconditional UNet: use it as a pixel prior instead")
    _memory_options(pipe, parts["unet"], gradient_checkpointing, attention_slicing)
    unet = to_device(parts["unet"], device, dtype)
    text_encoder = to_device(parts["text_encoder"], device, dtype)
    vae = to_device(parts["vae"], device, vae_dtype)
    return LatentDiffusionPrior(unet, vae, text_encoder, parts["tokenizer"], parts["scheduler"],
                                source=source, vae_dtype=vae_dtype)
