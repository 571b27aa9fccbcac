"""Per-layer text conditioning of a diffusers UNet (the P+ space of Voynov et al., "P+: Extended Textual
Conditioning in Text-to-Image Generation", 2023): each cross-attention layer reads its own text-encoder
states instead of one prompt's states shared by all.

It goes through diffusers' attention-processor API, nothing is patched: :func:`per_layer_conditioning`
wraps the processor of every cross-attention layer in :class:`LayerConditionedProcessor`, which hands the
layer's own states to the processor it wraps, and puts the UNet's processors back afterwards.

The layers are ordered as the UNet runs them: the down blocks, the mid block, then the up blocks
(:func:`cross_attention_layers`); Stable Diffusion 1.x has 16. Batch rule: a layer's states of batch n
replace the *last* n rows of the context the UNet is called with: all of it for a plain call, the
conditional half of a classifier-free-guidance batch ``[unconditional; conditional]`` as diffusers'
pipelines build it (the unconditional prompt names no learned token, so it is the same in every layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from studio.core.errors import StudioError

Tensor = torch.Tensor

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def cross_attention_layers(unet) -> list[str]:
    """The processor names of ``unet``'s cross-attention layers (``...attn2.processor``), down → mid → up."""
    names = [n for n, module in unet.named_modules()
             if getattr(module, "is_cross_attention", False) and hasattr(module, "processor")]
    if not names:
        raise StudioError(f"{type(unet).__name__} has no cross-attention layers: per-layer text "
                          "conditioning needs a text-conditioned UNet")
    names.sort(key=_block_rank)  # stable: keeps the order inside a group
    return [f"{n}.processor" for n in names]


def _block_rank(name: str) -> int:
    """0 / 1 / 2 for a layer in the down / mid / up blocks (a wrapper's prefix such as ``_orig_mod.`` of a
    compiled UNet skipped), 3 elsewhere."""
    return next((_BLOCK_ORDER[part] for part in name.split(".") if part in _BLOCK_ORDER), 3)


def layer_key(name: str) -> str:
    """A layer name without a wrapper's prefix (``_orig_mod.``, ``module.``): how files name layers."""
    parts = name.split(".")
    start = next((i for i, part in enumerate(parts) if part in _BLOCK_ORDER), 0)
    return ".".join(parts[start:])


class LayerConditionedProcessor:
    """Calls ``inner`` (the layer's own processor) with ``states`` as the cross-attention context, in
    place of the last ``len(states)`` rows of the context it is given (see the batch rule above)."""

    def __init__(self, inner, states: Tensor):
        self.inner, self.states = inner, states

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, *args,
                 **kwargs):
        if encoder_hidden_states is not None:
            n, total = self.states.shape[0], encoder_hidden_states.shape[0]
            if total < n or total % n:
                raise StudioError(f"per-layer conditioning holds {n} prompts, the UNet was called with a "
                                  f"batch of {total}")
            own = self.states.to(encoder_hidden_states.dtype)
            encoder_hidden_states = torch.cat([encoder_hidden_states[:total - n], own]) if total > n else own
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


@contextmanager
def per_layer_conditioning(unet, states: Sequence[Tensor]):
    """Inside the block every cross-attention layer l of ``unet`` reads ``states[l]`` ((n, tokens, D), in
    :func:`cross_attention_layers` order); the UNet's own processors are back afterwards, also on error."""
    layers = cross_attention_layers(unet)
    if len(states) != len(layers):
        raise StudioError(f"per-layer conditioning needs one state per cross-attention layer: the UNet has "
                          f"{len(layers)}, got {len(states)}")
    original = dict(unet.attn_processors)
    swapped = {**original, **{name: LayerConditionedProcessor(original[name], s)
                              for name, s in zip(layers, states)}}
    unet.set_attn_processor(swapped)
    try:
        yield layers
    finally:
        unet.set_attn_processor(original)


__all__ = ["LayerConditionedProcessor", "cross_attention_layers", "layer_key", "per_layer_conditioning"]
