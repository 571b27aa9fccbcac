"""Extended Textual Inversion (XTI; Voynov et al., "P+: Extended Textual Conditioning in Text-to-Image
Generation", 2023): a learned concept is one token embedding *per cross-attention layer* of the UNet
instead of one shared by all layers.

For a placeholder ``<tok>`` the tokenizer gains one token per layer: ``<tok>`` itself for the first layer
and ``<tok>_layer1``, ``<tok>_layer2``, … for the rest (:func:`layer_tokens`). A prompt is encoded once
per layer, with ``<tok>`` replaced by that layer's token (:func:`layer_prompts`); layer l of the UNet
reads the l-th encoding (:func:`models.layer_conditioning.per_layer_conditioning`). Training is textual
inversion's loop and loss, with this conditioning (:mod:`studio.training.textual_inversion`, option
``per_layer``): the rows of all layers are learned jointly, as in the unofficial implementations
(mkshing/prompt-plus-pytorch); the paper gives no code. Its setting: textual inversion's hyperparameters
(lr 5e-3) with 500 steps instead of 5000, because XTI converges faster.

File: ``learned_embeds.safetensors`` holding ``{<tok>: (layers, D)}`` with metadata
``{"format": "pt", "method": "xti", "layers": [processor names]}``. No diffusers or A1111 format exists
for per-layer embeddings: ``pipe.load_textual_inversion`` would read the rows as a multi-vector token, so
:func:`~studio.training.textual_inversion.load_into` refuses such a file and names what loads it.
"""

from __future__ import annotations

import torch

from models.layer_conditioning import cross_attention_layers, per_layer_conditioning
from studio.core.errors import StudioError

Tensor = torch.Tensor

XTI_METHOD = "xti"


def layer_tokens(placeholder: str, n_layers: int) -> list[str]:
    """The tokens of an XTI concept: ``placeholder`` (layer 0), ``placeholder_layer1``, …"""
    return [placeholder] + [f"{placeholder}_layer{i}" for i in range(1, n_layers)]


def layer_prompts(prompt: str, concepts: dict[str, int]) -> list[str]:
    """``prompt`` once per cross-attention layer, each XTI placeholder of ``concepts`` ({placeholder:
    number of layers}, all equal) replaced by that layer's token."""
    n_layers = next(iter(concepts.values()))
    out = []
    for layer in range(n_layers):
        text = prompt
        for placeholder, n in concepts.items():
            text = text.replace(placeholder, layer_tokens(placeholder, n)[layer])
        out.append(text)
    return out


def prompt_ids(tokenizer, prompts: list[str]) -> Tensor:
    """Padded token ids (len(prompts), max length)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(pipe, prompts: list[str]) -> Tensor:
    """The text encoder's states (len(prompts), tokens, D) of padded prompts."""
    return pipe.text_encoder(prompt_ids(pipe.tokenizer, prompts).to(pipe.text_encoder.device))[0]


@torch.no_grad()
def sample_per_layer(pipe, prompt: str, concepts: dict[str, int], *, n: int, steps: int, guidance: float,
                     generator: torch.Generator, negative_prompt: str = "",
                     size: int | None = None) -> Tensor:
    """``n`` samples of ``pipe`` (a StableDiffusionPipeline) for ``prompt`` with per-layer conditioning of
    its XTI ``concepts``; (n, 3, H, W) in [0, 1]. The pipeline's own sampler runs; every cross-attention
    layer reads its own encoding of the prompt, the negative prompt is shared (it names no concept)."""
    prompts = layer_prompts(prompt, concepts)
    layers = cross_attention_layers(pipe.unet)
    if len(prompts) != len(layers):
        raise StudioError(f"the learned per-layer (XTI) embeddings have {len(prompts)} layers, the model's "
                          f"UNet has {len(layers)} cross-attention layers: learned on another model")
    states = [encode_prompts(pipe, [p]).expand(n, -1, -1) for p in prompts]
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    with per_layer_conditioning(pipe.unet, states):
        out = pipe(prompt_embeds=states[0], negative_prompt=[negative_prompt] * n, num_inference_steps=steps,
                   guidance_scale=guidance, generator=generator, height=size, width=size, output_type="pt")
    return out.images.float().cpu().clamp(0, 1)


__all__ = ["XTI_METHOD", "encode_prompts", "prompt_ids", "layer_prompts", "layer_tokens", "sample_per_layer"]
