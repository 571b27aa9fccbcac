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
    place of the last ``len(states)`` rows of the context it is given (see the batch rule above).

    With ``values`` (NeTI's textual bypass, :mod:`models.neti`) the layer's keys come from ``states`` and
    its values from ``values``; the attention is then computed here, as diffusers' ``AttnProcessor`` does,
    since a processor reads keys and values from one context: the layer's own processor (SDPA, slicing,
    an adapter's) is not called for it, and its ``cross_attention_kwargs`` are not used."""

    def __init__(self, inner, states: Tensor, values: Tensor | None = None):
        self.inner, self.states, self.values = inner, states, values

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, *args,
                 **kwargs):
        if encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        keys = _replace_last_rows(encoder_hidden_states, self.states)
        if self.values is None:
            return self.inner(attn, hidden_states, keys, *args, **kwargs)
        values = _replace_last_rows(encoder_hidden_states, self.values)
        mask = kwargs.get("attention_mask", args[0] if args else None)
        return attend(attn, hidden_states, keys, values, mask, kwargs.get("temb"))


def _replace_last_rows(context: Tensor, own: Tensor) -> Tensor:
    n, total = own.shape[0], context.shape[0]
    if total < n or total % n:
        raise StudioError(f"per-layer conditioning holds {n} prompts, the UNet was called with a batch of "
                          f"{total}")
    own = own.to(context.dtype)
    return torch.cat([context[:total - n], own]) if total > n else own


def attend(attn, hidden_states: Tensor, key_context: Tensor, value_context: Tensor,
           attention_mask: Tensor | None = None, temb: Tensor | None = None) -> Tensor:
    """Cross-attention of a diffusers ``Attention`` module with keys from ``key_context`` and values from
    ``value_context`` (diffusers' ``AttnProcessor`` otherwise: norms, 4-D inputs, residual, rescale)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    four_d = hidden_states.ndim == 4
    if four_d:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch, length, _ = hidden_states.shape
    attention_mask = attn.prepare_attention_mask(attention_mask, key_context.shape[1], batch)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        key_context = attn.norm_encoder_hidden_states(key_context)
        value_context = attn.norm_encoder_hidden_states(value_context)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(key_context))
    value = attn.head_to_batch_dim(attn.to_v(value_context))
    probs = attn.get_attention_scores(query, key, attention_mask)
    out = attn.batch_to_head_dim(torch.bmm(probs, value))
    out = attn.to_out[1](attn.to_out[0](out))
    if four_d:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


@contextmanager
def per_layer_conditioning(unet, states: Sequence[Tensor], values: Sequence[Tensor] | None = None):
    """Inside the block every cross-attention layer l of ``unet`` reads ``states[l]`` ((n, tokens, D), in
    :func:`cross_attention_layers` order; with ``values``, its keys from ``states[l]`` and its values from
    ``values[l]``); the UNet's own processors are back afterwards, also on error."""
    layers = cross_attention_layers(unet)
    if len(states) != len(layers):
        raise StudioError(f"per-layer conditioning needs one state per cross-attention layer: the UNet has "
                          f"{len(layers)}, got {len(states)}")
    original = dict(unet.attn_processors)
    values = values if values is not None else [None] * len(layers)
    swapped = {**original, **{name: LayerConditionedProcessor(original[name], s, v)
                              for name, s, v in zip(layers, states, values)}}
    unet.set_attn_processor(swapped)
    try:
        yield layers
    finally:
        unet.set_attn_processor(original)


__all__ = ["LayerConditionedProcessor", "attend", "cross_attention_layers", "layer_key",
           "per_layer_conditioning"]
