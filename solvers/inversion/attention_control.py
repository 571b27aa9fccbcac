"""Prompt-to-prompt attention control (Hertz, Mokady, Tenenbaum, Aberman, Pritch, Cohen-Or, ICLR 2023;
official code ``google/prompt-to-prompt``, read for its defaults; this is our own implementation).

An edit regenerates the inverted latent twice, in one batch: the *source* branch with the source prompt
(it retraces the inversion, so it is the reconstruction) and the *target* branch with the target prompt.
In every attention layer of the UNet the target branch's attention probabilities are overwritten from the
source branch's, so the layout and identity stay and only what the changed words say changes:

    cross-attention:
        M_tgt ← ((M_src · A) ⊙ α + M_tgt ⊙ (1 − α)) ⊙ s
            A (L × L): which source token each target token takes its map from,
            α (L): 1 where a target token has a source counterpart (replace: all), 0 for added words,
                   and 0 for every token once its own fraction of the steps is done: ``cross_replace``,
                   or, in a word swap, ``cross_replace_edited`` for the swapped-in words (the target's
                   words that differ from the source's at the same position; the official notebooks'
                   per-word ``cross_replace_steps={'default_': .8, w: f}``),
            s (L): re-weighting scale per target token (1 except the ``reweight_words``), also only
                   within the token's own fraction, as the official equalizer acts through α;
    self-attention (for the first ``self_replace`` fraction of steps, in layers of at most
    ``self_max_side``² positions):   M_tgt ← M_src
            (with ``self_unconditional``, also in the unconditional pair of a guided batch, as MasaCtrl
            does; the official code and the default leave it alone: on emoji-sd's tuning edits after
            null-text it lowered the edit success, +0.0098 vs +0.0104, docs/bench/edit-tuning/results.md).

``replace`` (word swap: same number of words, some different) builds A word by word: equal words map token
to token; a swapped word's tokens each take the mean of the source word's token maps. ``refine`` (words
added or removed) aligns the two token sequences globally (Needleman–Wunsch; match 1, mismatch −1, gap 0,
the official scores) and takes maps for matched tokens only. ``reweight`` is ``refine`` (the identity when
both prompts are equal) with ``reweight_scale`` on ``reweight_words``; ``reweight_words`` given with
another mode scale on top of it (the official notebooks combine the equalizer with replace and refine
the same way). Only the conditional half of a
classifier-free-guidance batch is controlled, as in the official code.

Local blending keeps everything outside the edited words' region exactly on the source branch: from step
``blend_start`` on, after each step

    z_tgt ← z_src + m ⊙ (z_tgt − z_src),
    m = [maxpool₃(Σ_words M̄_src) / max > θ] ∪ [maxpool₃(Σ_words M̄_tgt) / max > θ]   (upsampled, nearest)

where M̄ is the cross-attention map summed over the steps so far, averaged over heads and over the layers
at the resolution closest to ``blend_side``² positions (16: the official 16² maps), and the words are
``blend_words`` (None: the words that differ between the prompts).
With ``blend_fill_holes`` (not official, off by default) the mask's enclosed holes join the region: on
emoji-sd's 16² maps a highlight the word does not attend to leaves a hole, where the source's colour stays
inside a recoloured object. On the 14 tuning edits it moved the edit success by −0.0002 after null-text and
by ±0.0001 after Newton and DDIM (docs/bench/edit-tuning/results.md, parts fill-*), so it stays off.

Both sizes are the official constants in positions, not fractions of the latent side: on SD's 64² latent
16² is a quarter of the side, on ``emoji-sd``'s 16² latent it is the finest level, the one whose word
maps localise best (correlation with the object's silhouette on the tuning edits: +0.58 at 16², +0.45 at
8², +0.10 at 4², ``docs/bench/edit-tuning/blend_maps.md``); a quarter of the side read the blend from the
4² maps, which are noise, and left blocks of the old colour inside colour edits.

Deviations from the official code, on purpose: the step fractions count the steps actually regenerated
(a partial inversion with ``strength`` < 1 has fewer); the blend map is min-max normalised before the
threshold (the official code divides by the max only, which on a model whose word maps are diffuse, like
``emoji-sd``'s, passes every pixel; where the maps are near zero away from the word, as on SD, the two
agree); the target branch may take its own classifier-free guidance (``target_guidance``) while the
source branch keeps the inversion's, so a Newton–Raphson or DDIM inversion at w = 1 still reconstructs
exactly while the edit is guided (the official code runs both at 7.5 after null-text inversion); a
per-word cross-replace fraction is offered for the edited words only (``cross_replace_edited``), not for
any word by name.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from models.base import split_prediction
from solvers.common import alpha_bar_at, ddim_step
from studio.core.errors import StudioError

Tensor = torch.Tensor

CONTROL_MODES = ("auto", "none", "replace", "refine", "reweight")


@dataclass
class ControlSettings:
    """Every knob of the attention control; ``configs/edit/attention_control.yaml`` holds the defaults."""

    mode: str = "auto"  # auto: replace when both prompts have as many words, else refine
    cross_replace: float = 0.8  # fraction of the steps with injected cross-attention
    cross_replace_edited: float | None = None  # ... for a word swap's swapped-in words; None: the above
    self_replace: float = 0.4  # fraction of the steps with injected self-attention
    self_max_side: int = 16  # self-attention injected in layers of at most this² positions (official 16)
    self_unconditional: bool = False  # ... also in the unconditional pair of a guided batch (MasaCtrl)
    blend_words: tuple[str, ...] | None = None  # None: the differing words; (): no local blend
    blend_threshold: float = 0.3
    blend_start: float = 0.2  # fraction of the steps before the blend starts
    blend_side: int = 16  # the blend mask is read from the attention layers closest to this² positions
    blend_fill_holes: bool = False  # the mask's enclosed holes are part of the region (not official)
    reweight_words: tuple[str, ...] = ()
    reweight_scale: float = 2.0
    pixel_blend: bool = True  # after decoding, the reconstruction's pixels outside the mask (not official)

    def __post_init__(self):
        if self.mode not in CONTROL_MODES:
            raise StudioError(f"attention control must be one of {', '.join(CONTROL_MODES)}, "
                              f"got {self.mode!r}")
        for name in ("cross_replace", "cross_replace_edited", "self_replace", "blend_start",
                     "blend_threshold"):
            value = getattr(self, name)
            if value is None and name == "cross_replace_edited":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise StudioError(f"attention control {name} must be in [0, 1], got {value}")
        for name in ("self_max_side", "blend_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StudioError(f"attention control {name} must be a whole number of positions >= 1 "
                                  f"(official 16), got {value!r}")
        for name in ("pixel_blend", "self_unconditional", "blend_fill_holes"):
            if not isinstance(getattr(self, name), bool):
                raise StudioError(f"attention control {name} must be true or false, "
                                  f"got {getattr(self, name)!r}")
        if not self.reweight_scale >= 0:
            raise StudioError(f"attention control reweight_scale must be >= 0, got {self.reweight_scale}")
        if self.blend_words is not None:
            self.blend_words = tuple(self.blend_words)
        self.reweight_words = tuple(self.reweight_words)
        if self.mode == "reweight" and not self.reweight_words:
            raise StudioError("attention control reweight needs reweight_words (the words to scale)")
        if self.mode == "none" and self.reweight_words:
            raise StudioError(f"reweight_words {list(self.reweight_words)} need attention control "
                              "(mode is none: a plain regeneration has no attention to scale)")


# ------------------------------------------------------------------------------------ token alignment


def word_spans(tokenizer, prompt: str) -> list[tuple[str, list[int], int]]:
    """Per whitespace-separated word: (word, its token ids, the position of its first token after BOS)."""
    spans, pos = [], 1
    for word in prompt.split():
        ids = tokenizer.encode(word, add_special_tokens=False)
        spans.append((word, ids, pos))
        pos += len(ids)
    full = tokenizer.encode(" ".join(prompt.split()), add_special_tokens=False)
    if [i for _, ids, _ in spans for i in ids] != full:
        raise StudioError(f"prompt {prompt!r}: its words do not tokenize separately the way the whole prompt "
                          "does; attention control cannot align its words")
    return spans


def _tail_map(mapper: Tensor, end_s: int, end_t: int) -> None:
    """End-of-text and padding: target position j ≥ end_t takes source position j − end_t + end_s."""
    length = mapper.shape[0]
    for j in range(end_t, length):
        mapper[min(j - end_t + end_s, length - 1), j] = 1.0


def _check_length(end_s: int, end_t: int, length: int) -> None:
    """End-of-text positions ``end_*`` must lie inside the encoder's ``length`` (else the prompt was cut)."""
    if max(end_s, end_t) >= length:
        raise StudioError(f"prompt too long for attention control: {max(end_s, end_t) + 1} tokens with "
                          f"start and end of text, the text encoder takes {length}")


def replace_mapper(tokenizer, source: str, target: str, length: int) -> tuple[Tensor, Tensor]:
    """(A, α) for a word swap: same word count; a swapped word's tokens take the mean of the source word's."""
    src, tgt = word_spans(tokenizer, source), word_spans(tokenizer, target)
    if len(src) != len(tgt):
        raise StudioError(f"attention control replace swaps words one for one: {source!r} has {len(src)} "
                          f"words, {target!r} has {len(tgt)}; use refine for added or removed words")
    end_s = 1 + sum(len(ids) for _, ids, _ in src)
    end_t = 1 + sum(len(ids) for _, ids, _ in tgt)
    _check_length(end_s, end_t, length)
    mapper = torch.zeros(length, length)
    mapper[0, 0] = 1.0  # BOS
    for (_, ids_s, at_s), (_, ids_t, at_t) in zip(src, tgt):
        for j in range(len(ids_t)):
            if len(ids_s) == len(ids_t):
                mapper[at_s + j, at_t + j] = 1.0
            else:
                mapper[at_s:at_s + len(ids_s), at_t + j] = 1.0 / len(ids_s)
    _tail_map(mapper, end_s, end_t)
    return mapper, torch.ones(length)


def global_alignment(a: list[int], b: list[int]) -> list[tuple[int, int]]:
    """Needleman–Wunsch over token ids (match 1, mismatch −1, gap 0): the matched (i, j) pairs, in order."""
    n, m = len(a), len(b)
    score = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if a[i - 1] == b[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j], score[i][j - 1])
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j]:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def refine_mapper(tokenizer, source: str, target: str, length: int) -> tuple[Tensor, Tensor]:
    """(A, α) for added/removed words: matched tokens take the source map, the others keep their own."""
    ids_s = [i for _, ids, _ in word_spans(tokenizer, source) for i in ids]
    ids_t = [i for _, ids, _ in word_spans(tokenizer, target) for i in ids]
    end_s, end_t = 1 + len(ids_s), 1 + len(ids_t)
    _check_length(end_s, end_t, length)
    mapper, alpha = torch.zeros(length, length), torch.zeros(length)
    mapper[0, 0], alpha[0] = 1.0, 1.0
    for i, j in global_alignment(ids_s, ids_t):
        mapper[1 + i, 1 + j], alpha[1 + j] = 1.0, 1.0
    _tail_map(mapper, end_s, end_t)
    alpha[end_t:] = 1.0
    return mapper, alpha


def word_indicator(tokenizer, prompt: str, words, length: int) -> Tensor:
    """(L,) 1 at the tokens of every word of ``prompt`` that is in ``words`` (case-insensitive)."""
    wanted = {w.lower() for w in words}
    out = torch.zeros(length)
    for word, ids, at in word_spans(tokenizer, prompt):
        if word.lower() in wanted:
            out[at:at + len(ids)] = 1.0
    return out


def resolved_mode(mode: str, source: str, target: str) -> str:
    """``auto`` → ``replace`` for prompts with as many words, else ``refine``; other modes as given."""
    if mode != "auto":
        return mode
    return "replace" if len(source.split()) == len(target.split()) else "refine"


def differing_words(source: str, target: str) -> tuple[str, ...]:
    """Words in one prompt but not the other (the default blend words)."""
    return edited_words(target, source) + edited_words(source, target)


def edited_words(source: str, target: str) -> tuple[str, ...]:
    """The target's words that the source lacks (a swapped-in or added word)."""
    s = source.lower().split()
    return tuple(w for w in target.lower().split() if w not in s)


def swapped_tokens(tokenizer, source: str, target: str, length: int) -> Tensor:
    """(L,) bool: the tokens of the target's words that differ from the source's word at the same position
    (a word swap: both prompts have as many words; "a red car and a blue house" → "a blue car and a blue
    house" swaps the first "blue" only)."""
    out = torch.zeros(length, dtype=torch.bool)
    pairs = zip(word_spans(tokenizer, source), word_spans(tokenizer, target))
    for (s_word, _, _), (t_word, ids, at) in pairs:
        if s_word.lower() != t_word.lower():
            out[at:at + len(ids)] = True
    return out


# ------------------------------------------------------------------------------------ the controller


class AttentionController:
    """Edits the attention probabilities of the last (conditional) [source, target] pair of each UNet batch.

    The regeneration loop sets :attr:`progress` (the fraction of steps done) before each UNet call and
    calls :meth:`blend` after each step; :func:`attention_processors` routes every attention layer here."""

    def __init__(self, settings: ControlSettings, tokenizer, source: str, target: str, length: int,
                 latent_hw: tuple[int, int]):
        self.settings, self.latent_hw, self.progress = settings, latent_hw, 0.0
        self.mode = mode = resolved_mode(settings.mode, source, target)
        if mode == "replace":
            self.mapper, self.alpha = replace_mapper(tokenizer, source, target, length)
        else:
            self.mapper, self.alpha = refine_mapper(tokenizer, source, target, length)
        self.scale = torch.ones(length)
        if settings.reweight_words:  # on top of any mode, as the official equalizer is
            chosen = word_indicator(tokenizer, target, settings.reweight_words, length)
            if not chosen.any():
                raise StudioError(f"reweight_words {list(settings.reweight_words)} are not in {target!r}")
            self.scale = 1 + (settings.reweight_scale - 1) * chosen
        self.cross_until = self._cross_fractions(tokenizer, source, target, length)
        controlled = (self.alpha > 0) | (self.scale != 1)
        self.cross_end = float(self.cross_until[controlled].max()) if controlled.any() else 0.0
        words = differing_words(source, target) if settings.blend_words is None else settings.blend_words
        self.blend_words = tuple(words)
        self.word_rows = torch.stack([word_indicator(tokenizer, source, words, length),
                                      word_indicator(tokenizer, target, words, length)])  # (2, L)
        if settings.blend_words and not self.word_rows.any():
            raise StudioError(f"blend words {list(words)} appear in neither prompt")
        self.maps: dict[tuple[int, int], Tensor] = {}  # (h, w) → (2, h·w, L) cross-attention, summed
        self.mask: Tensor | None = None

    def _cross_fractions(self, tokenizer, source: str, target: str, length: int) -> Tensor:
        """(L,) until which fraction of the steps each target token's cross-attention is controlled; float64,
        so that 0.4 ends at step 20 of 50 exactly (float32's 0.4 is above 0.4)."""
        until = torch.full((length,), float(self.settings.cross_replace), dtype=torch.float64)
        edited = self.settings.cross_replace_edited
        if edited is not None and self.mode == "replace":  # refine: the added words have α 0 throughout
            until[swapped_tokens(tokenizer, source, target, length)] = float(edited)
        return until

    # -------------------------------------------------------------- called by the processors

    def __call__(self, probs: Tensor, batch: int, is_cross: bool) -> Tensor:
        """``probs`` (batch·heads, queries, keys) → the same with the target row of the last pair edited."""
        p = rearrange(probs, "(b h) q k -> b h q k", b=batch)
        src, tgt = p[-2], p[-1]
        layer_hw = self.layer_hw(p.shape[2])
        if is_cross:
            if self.blending:
                self._store(torch.stack([src, tgt]), layer_hw)
            if self.progress < self.cross_end:
                tgt = self._cross(src, tgt)
        elif self._injects_self(layer_hw):
            tgt = src
            if self.settings.self_unconditional and p.shape[0] == 4:  # rows [∅_s, ∅_t, c_s, c_t]
                p = torch.stack([p[0], p[0], p[2], p[3]])
        else:
            return probs
        p = torch.cat([p[:-1], tgt[None]])
        return rearrange(p, "b h q k -> (b h) q k")

    def needs_probabilities(self, is_cross: bool, queries: int) -> bool:
        """Whether a layer's attention probabilities are read or edited now; the others run as fused
        attention, so a 512² SD edit never materialises the 4096 × 4096 self-attention of its finest layers
        outside the injected ones."""
        if is_cross:
            return self.blending or self.progress < self.cross_end
        return self._injects_self(self.layer_hw(queries))

    def _injects_self(self, layer_hw: tuple[int, int]) -> bool:
        return (self.progress < self.settings.self_replace
                and layer_hw[0] * layer_hw[1] <= self.settings.self_max_side ** 2)

    def layer_hw(self, queries: int) -> tuple[int, int]:
        """(height, width) of a layer with ``queries`` positions (the latent downsampled by a power of 2)."""
        h, w = self.latent_hw
        factor = math.sqrt(h * w / queries)
        return round(h / factor), round(w / factor)

    def _cross(self, src: Tensor, tgt: Tensor) -> Tensor:
        dev = src.device
        mapped = torch.einsum("hqs,st->hqt", src, self.mapper.to(dev, src.dtype))
        active = self.progress < self.cross_until  # per target token
        alpha = (self.alpha * active).to(dev, src.dtype)
        scale = (1 + (self.scale - 1) * active).to(dev, src.dtype)
        return (mapped * alpha + tgt * (1 - alpha)) * scale

    @property
    def blending(self) -> bool:
        return self.mode != "none" and bool(self.word_rows.any())

    def _store(self, pair: Tensor, layer_hw: tuple[int, int]) -> None:
        maps = reduce(pair.float(), "two h q k -> two q k", "mean")  # stays on its device: no sync per layer
        self.maps[layer_hw] = self.maps.get(layer_hw, 0) + maps

    # -------------------------------------------------------------- called by the loop

    def blend(self, z: Tensor) -> Tensor:
        """Local blend of the target latent (the last row) onto the source latent (the row before)."""
        if not self.blending or self.progress < self.settings.blend_start or not self.maps:
            return z
        self.mask = self.blend_mask().to(z.device, z.dtype)
        z_src, z_tgt = z[-2:-1], z[-1:]
        return torch.cat([z[:-1], z_src + self.mask * (z_tgt - z_src)])

    def word_maps(self, layer_hw: tuple[int, int]) -> Tensor:
        """(2, 1, y, x) the blend words' cross-attention stored at layer size ``layer_hw``, summed over the
        words: the source row, then the target row."""
        maps = self.maps[layer_hw]
        maps = maps * self.word_rows.to(maps.device)[:, None, :]  # (2, q, L)
        return rearrange(maps.sum(-1), "two (y x) -> two 1 y x", y=layer_hw[0])

    def blend_mask(self) -> Tensor:
        """(1, 1, h, w) mask in latent space from the stored maps (see the module docstring)."""
        h, w = self.latent_hw
        wanted = self.settings.blend_side ** 2
        layer_hw = min(self.maps, key=lambda hw: abs(math.log(hw[0] * hw[1] / wanted)))
        maps = self.word_maps(layer_hw)
        rows_used = self.word_rows.any(1).to(maps.device, maps.dtype)
        maps = F.max_pool2d(maps, 3, stride=1, padding=1)
        maps = F.interpolate(maps, size=(h, w), mode="nearest")
        low = maps.flatten(1).amin(1)[:, None, None, None]
        high = maps.flatten(1).amax(1)[:, None, None, None]
        # a flat map (e.g. a 2x2 layer after the 3x3 max-pool) cannot localise the words: all of it counts
        maps = torch.where(high - low > 1e-8, (maps - low) / (high - low).clamp_min(1e-8),
                           torch.ones_like(maps))
        # a prompt without any blend word (a word only added by refine) adds nothing to the union
        maps = maps * rows_used[:, None, None, None]
        mask = (maps > self.settings.blend_threshold).any(0, keepdim=True).float()
        return fill_holes(mask) if self.settings.blend_fill_holes else mask


def fill_holes(mask: Tensor) -> Tensor:
    """(1, 1, h, w) {0, 1} mask with every hole filled: a 0 region that no 4-connected path of 0s links to
    the border (as ``scipy.ndimage.binary_fill_holes``)."""
    free = 1 - mask
    outside = torch.zeros_like(mask)
    outside[..., [0, -1], :] = free[..., [0, -1], :]  # the border's 0s are outside
    outside[..., :, [0, -1]] = free[..., :, [0, -1]]
    while True:
        padded = F.pad(outside, (1, 1, 1, 1))
        grown = torch.maximum(outside, torch.stack([padded[..., :-2, 1:-1], padded[..., 2:, 1:-1],
                                                    padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]]).amax(0))
        grown = grown * free
        if torch.equal(grown, outside):
            return 1 - outside
        outside = grown


class ControlledAttnProcessor:
    """diffusers' plain attention computation with the probabilities passed through the controller."""

    def __init__(self, controller: AttentionController):
        self.controller = controller

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        residual, is_cross = hidden_states, encoder_hidden_states is not None
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            hidden_states = rearrange(hidden_states, "b c y x -> b (y x) c")
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:  # first: self-attention keys/values come from the normed states
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        if attn.norm_q is not None:  # per-head q/k norms act on the head dimension, the last one here too
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.controller.needs_probabilities(is_cross, query.shape[1]):
            probs = attn.get_attention_scores(query, key, attention_mask)
            mixed = torch.bmm(self.controller(probs, batch, is_cross), value)
        else:
            mixed = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                   scale=attn.scale)
        hidden_states = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(mixed)))
        if image_shape is not None:
            hidden_states = rearrange(hidden_states, "b (y x) c -> b c y x", y=image_shape[2])
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _guided_pair(prior, z: Tensor, t: int, cond: Tensor, uncond: Tensor | None, weights: Tensor):
    """Source and target rows in one UNet batch, each with its own guidance weight (rows [∅, ∅, c_s, c_t]
    with guidance, [c_s, c_t] without): the prediction of both rows."""
    if uncond is None:
        out = prior.model_output(z, t, cond)
    else:
        uncond = uncond.expand(2, -1, -1) if uncond.shape[0] == 1 else uncond
        rows = torch.cat([uncond.to(cond.dtype), cond])
        out_u, out_c = prior.model_output(torch.cat([z, z]), t, rows).chunk(2)
        out = out_u + weights.to(out_u)[:, None, None, None] * (out_c - out_u)
    return split_prediction(out, z, prior.alpha_bar(t, z), prior.prediction_type)


def controlled_regeneration(prior, inversion, target_prompt: str, settings: ControlSettings,
                            target_guidance: float | None = None,
                            controller: AttentionController | None = None
                            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Regenerate ``inversion`` under its own prompt and ``target_prompt`` in one batch with attention
    control. The source branch retraces the inversion exactly as :func:`solvers.inversion.ddim.regenerate`
    does (same grid, guidance and null-text embeddings), so it is the reconstruction; the target branch
    uses ``target_guidance`` (None: the inversion's). Returns the clean source latent, the clean target
    latent (the edit) and the last blend mask ((1, 1, h, w), None when nothing was blended). NFE: 2 per step
    (4 when either guidance ≠ 1), the same as a reconstruction plus a plain regeneration. ``controller``: one
    the caller built for these prompts (to read its stored maps afterwards); None: one from ``settings``."""
    w_src = inversion.guidance
    w_tgt = w_src if target_guidance is None else float(target_guidance)
    cond = prior.embed([inversion.prompt, target_prompt])
    guided = w_src != 1.0 or w_tgt != 1.0
    uncond_fixed = prior.embed("") if guided else None
    weights = torch.tensor([w_src, w_tgt])
    z = inversion.z_start.expand(2, *inversion.z_start.shape[1:]).clone()
    if controller is None:
        controller = AttentionController(settings, prior.tokenizer, inversion.prompt, target_prompt,
                                         cond.shape[1], tuple(z.shape[-2:]))
    grid = inversion.grid
    with torch.no_grad(), attention_processors(prior.unet, controller):
        for i, t in enumerate(grid):
            controller.progress = i / len(grid)
            s = grid[i + 1] if i + 1 < len(grid) else -1
            uncond = inversion.null_embeddings[i] if inversion.null_embeddings is not None else uncond_fixed
            pred = _guided_pair(prior, z, t, cond, uncond if guided else None, weights)
            z = ddim_step(z, pred.eps, pred.x0, alpha_bar_at(prior, t, z), alpha_bar_at(prior, s, z), eta=0.0)
            z = controller.blend(z)
    return z[:1], z[1:], controller.mask


def pixel_blend(edit: Tensor, reconstruction: Tensor, mask: Tensor) -> Tensor:
    """The local blend carried to pixels: ``reconstruction + m ⊙ (edit − reconstruction)`` with the blend
    mask ``mask`` ((1, 1, h, w) at latent size) upsampled (nearest) to the decoded images' size.

    The latent blend keeps every latent outside the mask on the source branch, but the VAE decoder spreads
    the edited latents a few pixels beyond it; on emoji-sd's 64² images, where the masks cover about 85 %
    and the background is a thin border, that spill costs several dB of background PSNR. Not in the
    official code (diffusers' inpainting pipelines paste the input back the same way, ``apply_overlay``);
    on by default (``pixel_blend`` in the settings; chosen on the tuning edits, where it kept the edit
    success to ±0.0001 and added 4.6–10.4 dB of background, ``docs/bench/edit-tuning/results.md``)."""
    m = F.interpolate(mask.float().to(edit.device), size=edit.shape[-2:], mode="nearest")
    return reconstruction + m * (edit - reconstruction)


@contextmanager
def attention_processors(unet, controller: AttentionController):
    """Install :class:`ControlledAttnProcessor` on every attention layer of ``unet`` (diffusers'
    attention-processor API) and put the UNet's own processors back afterwards, also on error."""
    added_kv = [name for name, m in unet.named_modules() if getattr(m, "add_k_proj", None) is not None]
    if added_kv:
        raise StudioError(f"attention control does not handle added key/value attention (layer "
                          f"{added_kv[0]}, as in DeepFloyd IF or UnCLIP UNets); edit with --control none")
    original = dict(unet.attn_processors)
    unet.set_attn_processor(ControlledAttnProcessor(controller))
    try:
        yield controller
    finally:
        unet.set_attn_processor(original)


__all__ = ["CONTROL_MODES", "AttentionController", "ControlSettings", "ControlledAttnProcessor",
           "attention_processors", "controlled_regeneration", "differing_words", "edited_words", "fill_holes",
           "global_alignment", "refine_mapper", "replace_mapper", "resolved_mode", "swapped_tokens",
           "word_indicator", "word_spans"]
