"""CoRe: context regularization of a learned token (Wu et al., "CoRe: Context-Regularized Text Embedding
Learning for Text-to-Image Personalization", AAAI 2025; official code pangy9/CoRe@308f55b, read for
``docs/notes/core-official-code.md``).

A token learned from a few images may fit them while spoiling the words around it: "<tok> running" no
longer reads "running". CoRe adds to the diffusion loss two terms that need no image of the context prompt.
Each step one context template is drawn (:data:`CONTEXT_TEMPLATES`); it is filled once with the token and
once with the initializer (super-category) word, and the *context* tokens of the two prompts (every token
but the token / the word, start and end of text included, padding dropped) are compared:

* context embedding: L_emb = λ_emb · (1 − mean over context tokens of cos(e_tok, e_word)) on the text
  encoder's outputs (after its final layer norm), λ_emb = 1.5e-4;
* context attention: both prompts condition the UNet on the step's own noisy latents (same t, same noise);
  at every cross-attention layer each context token's attention mass (softmax over keys, averaged over
  heads and queries) is taken, L_attn = λ_attn · Σ_b mean_layers MSE_tokens(mass_tok, mass_word),
  λ_attn = 0.05;
* and the learned rows are held at their norm of 40 % of the run for the steps up to 60 % (the official
  code records the norm at step 120 and rescales after each step up to 180 of its 300).

Deviations, stated: the cosine is taken per token over the channels, as the paper describes it (the
official code takes it along the token axis per channel, ``dim=1``); the templates are a short generic list,
not the official 50–103-line files, and a model with its own vocabulary (``emoji-sd``) gets prompts in its
words through ``core_templates``; the rescaling window is given as fractions of the run. With a multi-vector
or per-layer (XTI) token the embedding term averages over the token's vectors' prompts per layer, and the
attention pass conditions each layer on its own encoding. With a NeTI token the token prompt is encoded
with the mapper's rows at each sample's timestep and layer, the attention pass conditions each layer on its
own keys (the bypass values are left out: the mass depends on the keys), and the norm window does not apply
(the mapper's output norm is fixed).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from models.layer_conditioning import cross_attention_layers, per_layer_conditioning
from studio.core.errors import StudioError
from studio.training.xti import prompt_ids

Tensor = torch.Tensor

#: generic context prompts (the official files hold scenes, styles and compositions like these)
#: (none of them is an edit of ``personalize-eval``'s editability score, which must stay unseen)
CONTEXT_TEMPLATES = (
    "a {} in the snow", "a {} on the beach", "a painting of a {}", "a {} with a red heart",
    "a {} and a cat", "a black and white photo of a {}", "a {} next to a tree", "a small {} in a big room",
    "a {} on a blue plate", "a {} wearing a hat",
)
EMBEDDING_WEIGHT = 1.5e-4
ATTENTION_WEIGHT = 0.05


def context_positions(ids: Tensor, start: int, length: int, end_id: int) -> Tensor:
    """Positions of a prompt's context tokens: every position up to and including the end-of-text token
    except the ``length`` filled in at ``start`` (the learned token's, or the initializer's)."""
    end = int((ids == end_id).nonzero()[0, 0]) if (ids == end_id).any() else len(ids) - 1
    return torch.tensor([i for i in range(end + 1) if not start <= i < start + length], dtype=torch.long)


class ContextPrompts:
    """The drawn template filled with the token's text and with the initializer word: their token ids
    (padded) and aligned context positions (the filler's span found from the template's prefix: CLIP's
    tokenizer splits words before merging, so the prefix tokenizes alone as it does in the prompt)."""

    def __init__(self, tokenizer, templates, token_text: str, word: str):
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise StudioError(f"core_templates must be templates with one '{{}}' each, got "
                              f"{list(templates)}")
        self.tokenizer, self.templates = tokenizer, tuple(templates)
        self.token_text, self.word = token_text, word
        for template in self.templates:  # every template lines up, checked before the first step
            self._aligned(template)

    def _ids(self, text: str) -> Tensor:
        return prompt_ids(self.tokenizer, [text])[0]

    def _filled(self, template: str, filler: str) -> tuple[Tensor, Tensor]:
        """The prompt's ids and its context positions."""
        ids = self._ids(template.format(filler))
        start = 1 + len(self.tokenizer(template.split("{}")[0], add_special_tokens=False).input_ids)
        span = self.tokenizer(filler, add_special_tokens=False).input_ids
        if ids[start:start + len(span)].tolist() != span:
            raise StudioError(f"CoRe: cannot find {filler!r} in the tokens of {template.format(filler)!r}")
        return ids, context_positions(ids, start, len(span), self.tokenizer.eos_token_id)

    def draw(self, rng: random.Random) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(token prompt ids, word prompt ids, their context positions), from one drawn template."""
        return self._aligned(rng.choice(self.templates))

    def _aligned(self, template: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tok, pos_tok = self._filled(template, self.token_text)
        ref, pos_ref = self._filled(template, self.word)
        if len(pos_tok) != len(pos_ref):  # truncation cut one of them: no aligned context
            raise StudioError(f"CoRe: the context of {template!r} does not line up between the token and "
                              f"'{self.word}' (too long for the text encoder?)")
        return tok, ref, pos_tok, pos_ref


def embedding_loss(states_tok: Tensor, states_ref: Tensor, pos_tok: Tensor, pos_ref: Tensor) -> Tensor:
    """λ_emb · (1 − mean cos) over the context tokens of (…, length, D) text-encoder outputs."""
    a, b = states_tok[..., pos_tok, :].float(), states_ref[..., pos_ref, :].float()
    return EMBEDDING_WEIGHT * (1 - F.cosine_similarity(a, b, dim=-1).mean())


class AttentionMass:
    """An attention processor wrapper for the cross-attention layers that records each key token's
    attention mass (softmax probabilities averaged over heads and queries, (B, keys)) and leaves the
    layer's output to the processor it wraps."""

    def __init__(self, inner, store: list):
        self.inner, self.store = inner, store

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, *args,
                 **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(query, key, None)  # (B·heads, queries, keys)
        self.store.append(probs.unflatten(0, (hidden_states.shape[0], -1)).mean(dim=(1, 2)))
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def attention_masses(unet, z_t: Tensor, t: Tensor, context: Tensor,
                     per_layer: list[Tensor] | None = None) -> list[Tensor]:
    """Each cross-attention layer's (B, keys) attention mass when ``unet`` denoises ``z_t`` at ``t`` under
    ``context``, or under ``per_layer`` states (one per layer: XTI), the mass taken on the layer's own."""
    store: list[Tensor] = []
    original = dict(unet.attn_processors)
    layers = cross_attention_layers(unet)
    unet.set_attn_processor({**original, **{n: AttentionMass(original[n], store) for n in layers}})
    try:
        if per_layer is None:
            unet(z_t.to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype))
        else:  # the per-layer wrappers go around the recorders: each records its own layer's context
            with per_layer_conditioning(unet, per_layer):
                unet(z_t.to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype))
    finally:
        unet.set_attn_processor(original)
    return store


def attention_loss(masses_tok: list[Tensor], masses_ref: list[Tensor], pos_tok: Tensor,
                   pos_ref: Tensor) -> Tensor:
    """λ_attn · Σ_batch mean_layers MSE over the context tokens of the two prompts' attention masses."""
    per_layer = [(a[:, pos_tok].float() - b[:, pos_ref].float()).pow(2).mean(dim=1)
                 for a, b in zip(masses_tok, masses_ref)]
    return ATTENTION_WEIGHT * torch.stack(per_layer).mean(dim=0).sum()


def rescale_window(step: int, steps: int, window: tuple[float, float]) -> str | None:
    """'record' at the step where the window opens, 'rescale' inside it, None elsewhere (fractions of
    ``steps``)."""
    start, end = round(window[0] * steps), round(window[1] * steps)
    if step == start:
        return "record"
    return "rescale" if start < step <= end else None


__all__ = ["ATTENTION_WEIGHT", "AttentionMass", "CONTEXT_TEMPLATES", "ContextPrompts", "EMBEDDING_WEIGHT",
           "attention_loss", "attention_masses", "context_positions", "embedding_loss", "rescale_window"]
