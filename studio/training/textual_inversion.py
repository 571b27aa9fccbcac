"""Textual inversion (Gal et al., "An Image is Worth One Word", ICLR 2023), with Cross-Initialization
(Pang et al., CVPR 2024) and multi-vector tokens as options.

A new token's embedding v* is learned from a few images while the VAE, UNet and the rest of the text
encoder stay frozen, by the diffusion loss on prompts built from templates ("a photo of a <tok>"):

    v* = argmin_v  E_{x, t, ε} ‖ε − ε_θ(z_t, t, τ_θ(prompt(v)))‖²        (target v for v-prediction models)

Training follows the diffusers example (``examples/textual_inversion``): the token-embedding matrix is the
only trainable tensor (AdamW, β 0.9/0.999, weight decay 1e-2), and after every step all rows except the
new ones are restored from a copy, because weight decay touches every row; so the rest of the table stays
bit-identical. The embedding is trained in float32 (fp16 training turns the new rows into NaN, diffusers
#1438); mixed precision, when asked for on a GPU, applies to the frozen UNet/VAE only.

Initialisation:

* plain: every new row = the input embedding of ``initializer`` (which must be one token);
* Cross-Init (``cross_init=True``): each new row starts at the text encoder's *output* at its own position
  and the loss adds a pull back towards it; the paper reports it reaches a given loss in far fewer steps.

  The official code (github lyuPang/CrossInitialization: ``utils.py::token_cross_init``, used by
  ``train_cross_init.py``) takes n initializer tokens for n vectors, encodes ``"w_1 … w_n"`` with bos/eos
  (no padding) and gives vector k the final-layer-norm output at position k (bos dropped); it writes those
  rows into the table and adds ``reg_weight · mean_k ‖v_k − t_k‖₂`` (``F.pairwise_distance``, p=2, so the
  unsquared distance, averaged over vectors; ``--reg_weight`` default 1e-5) to the mean-MSE diffusion loss.
  We do the same: our initializer is one word, so it stands for each of the ``num_vectors`` vectors, as
  ``--initialize_tokens w w … w`` would there; the targets (:func:`cross_init_target`, shape
  ``(num_vectors, D)``) are the encoder's outputs for ``"w w … w"`` at positions 1…n (CLIP's causal mask
  makes ``t_1`` the output for ``"w"`` alone; later ones differ by position and what precedes them); the
  loss adds ``cross_init_reg · mean_k ‖v_k − t_k‖₂`` with ``cross_init_reg`` = 1e-5 by default. The distance
  is ``F.pairwise_distance``'s, as there: its 1e-6 added to the difference makes it differentiable at the
  start, where ``v_k = t_k``. Not followed: their other initialisation, the mean input embedding of a list of
  celebrity names (``celeb_names_cross_init``), which only suits faces.

``num_vectors > 1`` adds ``<tok>``, ``<tok>_1``, …; prompts mentioning ``<tok>`` are expanded to all of them
(diffusers' ``maybe_convert_prompt`` does the same when loading). Files: ``learned_embeds.safetensors``
``{token: [num_vectors, hidden]}`` with metadata ``{"format": "pt"}`` — what ``pipe.load_textual_inversion``
reads. Multi-process training goes through ``accelerate`` (``accelerate launch -m studio.cli personalize``).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.diffusers_prior import MODULE_BUILD_LOCK, to_device
from models.layer_conditioning import cross_attention_layers, layer_key, per_layer_conditioning
from models.latent_prior import open_sd_pipeline
from models.neti import (NETI_METHOD, NetiConfig, NetiMapper, NetiStates, check_layers,
                         initial_mapper, mapper_from_tensors, neti_conditioning)
from studio.core.errors import StudioError
from studio.core.io import load_image
from studio.training.loop import remove_stale_temporaries, write_json
from studio.training.objective import diffusion_target, forward_process
from studio.training import core
from studio.training.sampling import save_grid
from studio.training.neti import (MapperCheckpoint, prompt_ids, sample_neti, save_neti_file, token_id,
                                  unwrapped)
from studio.training.xti import XTI_METHOD, encode_prompts, layer_prompts, layer_tokens, sample_per_layer

Tensor = torch.Tensor

OBJECT_TEMPLATES = (
    "a picture of a {}",
    "an image of a {}",
    "a {}",
    "the {}",
    "a small {}",
    "a large {}",
    "a drawing of a {}",
    "a clean {}",
    "an icon of a {}",
    "a {} on white",
)
STYLE_TEMPLATES = (
    "a picture in the style of {}",
    "an image in the style of {}",
    "a drawing in the style of {}",
    "an icon in the style of {}",
    "art in the style of {}",
)


@dataclass
class TextualInversionConfig:
    placeholder: str = "<concept>"
    initializer: str = "face"
    num_vectors: int = 1
    cross_init: bool = False
    cross_init_reg: float = 1e-5  # Cross-Init's regulariser weight (the official --reg_weight)
    per_layer: bool = False  # XTI (P+): one embedding per cross-attention layer (studio.training.xti)
    neti: bool = False  # NeTI: a mapper from (timestep, layer) to the embedding (studio.training.neti)
    core: bool = False  # CoRe's context regularisation (studio.training.core); combines with the above
    core_templates: tuple[str, ...] = field(default_factory=tuple)  # empty: core.CONTEXT_TEMPLATES
    core_rescale_start: float = 0.4  # CoRe holds the rows at their norm of this fraction of the run...
    core_rescale_end: float = 0.6  # ... up to this one (the official 120-180 of 300 steps)
    learnable_property: str = "object"  # object | style
    lr: float = 5e-3
    weight_decay: float = 1e-2
    steps: int = 300
    batch_size: int = 4
    hflip: float = 0.0  # probability of a horizontal flip (0.5 in diffusers; emoji are not mirror-symmetric)
    seed: int = 0
    checkpoint_every: int = 50
    validate_every: int = 100
    validation_prompt: str = "a picture of a {}"
    mixed_precision: str = "no"  # no | fp16 | bf16 (frozen UNet/VAE only; fp16 needs CUDA)
    output_dir: str = "runs/personalize/concept"
    templates: tuple[str, ...] = field(default_factory=tuple)  # empty: by learnable_property


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def expand_prompt(prompt: str, placeholder: str, num_vectors: int) -> str:
    """``"a <tok>"`` → ``"a <tok> <tok>_1 …"`` for multi-vector tokens."""
    if num_vectors == 1:
        return prompt
    return prompt.replace(placeholder, " ".join(placeholder_tokens(placeholder, num_vectors)))


def concept_tokens(cfg: TextualInversionConfig, unet) -> list[str]:
    """The new tokens: the placeholder and its extra vectors, or (``per_layer``) one token per
    cross-attention layer of ``unet``."""
    if cfg.per_layer:
        return layer_tokens(cfg.placeholder, len(cross_attention_layers(unet)))
    return placeholder_tokens(cfg.placeholder, cfg.num_vectors)


def add_tokens(tokenizer, text_encoder, cfg: TextualInversionConfig,
               tokens: list[str] | None = None) -> list[int]:
    """Add the placeholder token(s) (``tokens``; default: the placeholder and its extra vectors); returns
    their ids. Errors if a token already exists."""
    tokens = tokens or placeholder_tokens(cfg.placeholder, cfg.num_vectors)
    vocab = tokenizer.get_vocab()
    # taken: literally in the vocabulary, or a word the tokenizer already reads as one token
    # ("red" → "red</w>")
    taken = [t for t in tokens if t in vocab or t.lower() + "</w>" in vocab]
    if taken:
        raise StudioError(f"placeholder token {taken[0]!r} already exists in the vocabulary; choose another "
                          f"(e.g. '<my-{cfg.placeholder.strip('<>')}>')")
    if cfg.num_vectors < 1:
        raise StudioError(f"num_vectors must be >= 1, got {cfg.num_vectors}")
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise StudioError(f"could not add the placeholder tokens {tokens}")
    with MODULE_BUILD_LOCK:  # builds a new embedding module: not during another thread's model load
        text_encoder.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(tokens)


def initializer_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise StudioError(f"initializer {word!r} is {len(ids)} tokens for this tokenizer; choose a word "
                          f"that is one token")
    return ids[0]


@torch.no_grad()
def cross_init_target(tokenizer, text_encoder, word: str, num_vectors: int = 1) -> Tensor:
    """Cross-Initialization's start and regulariser target, ``(num_vectors, D)``: the text encoder's output
    for ``word`` repeated ``num_vectors`` times (``"w w … w"``, with bos/eos, unpadded), row k at the k-th
    word's position (the official ``token_cross_init`` with ``word`` as every initializer token)."""
    text = " ".join([word] * num_vectors)
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    if ids.shape[1] != num_vectors + 2:
        raise StudioError(f"Cross-Init: {text!r} is {ids.shape[1] - 2} tokens for this tokenizer, expected "
                          f"{num_vectors} (one per vector, with bos and eos within "
                          f"{tokenizer.model_max_length})")
    out = text_encoder(ids.to(text_encoder.device))[0][0]  # (n + 2, D): [bos, w, …, w, eos]
    return out[1:1 + num_vectors].float()


def cross_init_regulariser(rows: Tensor, target: Tensor, weight: float) -> Tensor:
    """``weight · mean_k ‖rows_k − target_k‖₂`` (unsquared; ``F.pairwise_distance``, as the official code)."""
    return weight * torch.nn.functional.pairwise_distance(rows, target.to(rows), p=2).mean()


#: how far a training image may be upscaled: its shorter side must be at least 1/MAX_UPSCALE of the model's
#: size (a 16-px thumbnail blown up to 512 px shows the model blur, not the concept)
MAX_UPSCALE = 8
MIN_SIDE = 8  # and never under 8 px, whatever the model's size


def prepare_images(images, size: int) -> tuple[Tensor, dict]:
    """Training images → ``((N,3,size,size) in [-1,1], what was done to them)``.

    Images of any size are taken as users of diffusers' textual-inversion script expect (its
    ``--center_crop`` and ``--resolution``): each is center-cropped to a square and resized (bicubic,
    antialiased) to the model's training size, so a folder of photos of mixed sizes trains instead of
    failing to stack. The second value names the sizes found and the size used (``note`` is the line to
    show, empty when nothing was changed). Refused with one line: no images, and an image whose shorter
    side is under :func:`min_side` (an upscaled thumbnail)."""
    items = _image_list(images)
    if not items:
        raise StudioError("no training images given")
    least = min_side(size)
    for name, im in items:
        h, w = im.shape[-2:]
        if min(h, w) < least:
            raise StudioError(f"training image {name} is {w}x{h}: too small for this model's {size}x{size} "
                              f"training size (the shorter side must be at least {least} px); use a larger "
                              f"image")
    batch = torch.stack([_center_square(im, size) for _, im in items])
    return batch * 2 - 1, _size_report([tuple(im.shape[-2:]) for _, im in items], size)


def min_side(size: int) -> int:
    """The shortest image side accepted for a model trained at ``size``."""
    return max(MIN_SIDE, math.ceil(size / MAX_UPSCALE))


def _image_list(images) -> list[tuple[str, Tensor]]:
    """``(name, (3,H,W) [0,1] image)`` for an (N,3,H,W) batch, or a list of paths and image tensors."""
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise StudioError(f"training images must be an (N,3,H,W) tensor, got shape {tuple(images.shape)}")
        return [(f"#{i}", im) for i, im in enumerate(images)]
    out = []
    for i, item in enumerate(images):
        if isinstance(item, Tensor):
            im = item[0] if item.dim() == 4 and item.shape[0] == 1 else item
            if im.dim() != 3 or im.shape[0] != 3:
                raise StudioError(f"training image #{i} must be a (3,H,W) tensor, "
                                  f"got shape {tuple(item.shape)}")
            out.append((f"#{i}", im))
        else:
            out.append((f"'{item}'", load_image(str(item))[0]))  # raises a clear error on non-images
    return out


def _center_square(image: Tensor, size: int) -> Tensor:
    """The largest centered square of a (3,H,W) image, resized to (3,size,size); unchanged at that size."""
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[:, top:top + side, left:left + side].float()
    if side == size:
        return square
    out = torch.nn.functional.interpolate(square[None], size=(size, size), mode="bicubic", antialias=True)
    return out[0].clamp(0, 1)


def _size_report(shapes: list[tuple[int, int]], size: int) -> dict:
    """The sizes found (``"WxH": count``), the size used and the line saying so when images were changed."""
    found: dict[str, int] = {}
    for h, w in shapes:
        found[f"{w}x{h}"] = found.get(f"{w}x{h}", 0) + 1
    changed = sum(1 for shape in shapes if shape != (size, size))
    listed = ", ".join(f"{k} ({n})" if n > 1 else k for k, n in found.items())
    note = (f"training images: {len(shapes)} of sizes {listed}; {changed} center-cropped to a square and "
            f"resized to {size}x{size}, the model's training size" if changed else "")
    return {"count": len(shapes), "sizes": found, "size": f"{size}x{size}", "changed": changed, "note": note}


def _load_images(images, size: int) -> Tensor:
    """Paths or image tensors → (N,3,size,size) in [-1,1], as :func:`prepare_images` makes them."""
    return prepare_images(images, size)[0]


def save_embeddings(path: Path, placeholder: str, rows: Tensor, layers: list[str] | None = None) -> Path:
    """``learned_embeds.safetensors`` in diffusers' layout: ``{token: [num_vectors, hidden]}``; per-layer
    (XTI) rows ``[layers, hidden]`` add ``method`` and the ``layers``' names to the metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"format": "pt"} if layers is None else {"format": "pt", "method": XTI_METHOD,
                                                     "layers": json.dumps(layers)}
    save_file({placeholder: rows.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class LearnedEmbedding:
    """A learned token read from a file: its name, its rows and, for a per-layer (XTI) one, the names of the
    cross-attention layers its rows belong to (None: textual inversion's vectors); a NeTI one holds its
    ``mapper`` (its row only registers the token)."""

    name: str
    rows: Tensor
    layers: tuple[str, ...] | None = None
    mapper: NetiMapper | None = None


def read_embeddings(path: str | Path, token: str | None = None) -> tuple[str, Tensor]:
    """Read our/diffusers (``{token: tensor}``) or A1111 (``string_to_param``) safetensors files."""
    learned = read_embedding_file(path, token)
    return learned.name, learned.rows


def read_embedding_file(path: str | Path, token: str | None = None) -> LearnedEmbedding:
    """Read our/diffusers (``{token: tensor}``; ours may be per-layer XTI rows) or A1111
    (``string_to_param``) safetensors files."""
    path = Path(path)
    if path.is_dir():
        path = path / "learned_embeds.safetensors"
    if path.suffix != ".safetensors":
        raise StudioError(f"{path}: only .safetensors embeddings are read (no pickled .bin/.pt files)")
    if not path.is_file():
        raise StudioError(f"embedding file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - corrupt file
        raise StudioError(f"{path} is not a readable safetensors file ({type(err).__name__})") from None
    if meta.get("method") == NETI_METHOD:
        return _neti_embedding(path, tensors, meta, token)
    if "string_to_param.*" in tensors:  # A1111 layout flattened by safetensors
        name, rows = meta.get("name", path.stem), tensors["string_to_param.*"]
    elif "emb_params" in tensors:  # A1111 safetensors variant
        name, rows = meta.get("name", path.stem), tensors["emb_params"]
    elif len(tensors) == 1:
        name, rows = next(iter(tensors.items()))
    else:
        raise StudioError(f"{path}: unknown embedding layout with keys {keys[:5]}")
    rows = rows if rows.dim() == 2 else rows[None]
    layers = None
    if meta.get("method") == XTI_METHOD:
        try:
            layers = tuple(json.loads(meta["layers"]))
        except (KeyError, ValueError, TypeError):
            raise StudioError(f"{path}: a per-layer (XTI) file without a readable list of layers") from None
        if len(layers) != rows.shape[0]:
            raise StudioError(f"{path}: {rows.shape[0]} rows for {len(layers)} layers")
    return LearnedEmbedding(token or name, rows, layers)


def _neti_embedding(path: Path, tensors: dict, meta: dict, token: str | None) -> LearnedEmbedding:
    """A NeTI file (:mod:`studio.training.neti`'s schema) → its token, row and mapper."""
    names = [k for k in tensors if not k.startswith("neti.")]
    try:
        config = NetiConfig.from_json(meta["neti_config"])
    except (KeyError, ValueError, TypeError):
        raise StudioError(f"{path}: a NeTI file without a readable mapper config") from None
    if len(names) != 1:
        raise StudioError(f"{path}: a NeTI file holds one token row, found {len(names)}")
    rows = tensors[names[0]]
    return LearnedEmbedding(token or names[0], rows if rows.dim() == 2 else rows[None],
                            mapper=mapper_from_tensors(config, tensors))


def load_into(pipe, path: str | Path, token: str | None = None) -> str:
    """Add a learned token to ``pipe`` (our, diffusers or A1111 file) with diffusers' own loader; a
    per-layer (XTI) file is added with :func:`add_learned_tokens` (diffusers has no loader for it)."""
    learned = read_embedding_file(path, token)
    if learned.layers is not None or learned.mapper is not None:
        kind = "per-layer (XTI) embeddings" if learned.mapper is None else "a NeTI mapper"
        raise StudioError(f"{path} holds {kind}, which diffusers' textual-inversion "
                          "loader cannot use: generate with `studio generate --embeddings` or "
                          "studio.workflows.personalize.generate")
    pipe.load_textual_inversion(learned.rows if learned.rows.shape[0] > 1 else learned.rows[0],
                                token=learned.name)
    return learned.name


def add_learned_tokens(pipe, learned: LearnedEmbedding) -> None:
    """Add a per-layer (XTI) or NeTI concept's tokens and rows to ``pipe``'s tokenizer and text encoder (in
    place, as diffusers' loader does for textual inversion); a no-op when they are there."""
    tokens = layer_tokens(learned.name, len(learned.layers)) if learned.layers else [learned.name]
    if all(t in pipe.tokenizer.get_vocab() for t in tokens):
        return
    layers = [layer_key(n) for n in cross_attention_layers(pipe.unet)]
    theirs = [layer_key(n) for n in learned.layers or ()]
    if learned.mapper is not None:
        check_layers(learned.mapper, pipe.unet, repr(learned.name), pipe.text_encoder)
    elif layers != theirs:
        raise StudioError(f"'{learned.name}' was learned for {len(theirs)} cross-attention layers ("
                          f"{theirs[0] if theirs else '?'}, ...), this model's UNet has {len(layers)} ("
                          f"{layers[0]}, ...): it belongs to another model")
    if pipe.text_encoder.get_input_embeddings().weight.shape[1] != learned.rows.shape[1]:
        raise StudioError(f"'{learned.name}' has {learned.rows.shape[1]}-dim rows, this model's text encoder "
                          f"{pipe.text_encoder.get_input_embeddings().weight.shape[1]}: another model's")
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, TextualInversionConfig(placeholder=learned.name),
                     tokens)
    embedding = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embedding[ids] = learned.rows.to(embedding)


class _Checkpoint:
    """Resumable state: new rows, their AdamW moments, the step. Safetensors + JSON, no pickle."""

    def __init__(self, folder: Path):
        self.path = folder / "checkpoint.safetensors"

    def save(self, rows: Tensor, opt: torch.optim.Optimizer, ids: list[int], step: int,
             history: list, norms: Tensor | None = None) -> None:
        state = opt.state[opt.param_groups[0]["params"][0]]
        tensors = {"rows": rows.detach().float().cpu().contiguous()}
        if norms is not None:  # CoRe's recorded row norms
            tensors["core_norms"] = norms.float().cpu().contiguous()
        if state:
            tensors["exp_avg"] = state["exp_avg"][ids].float().cpu().contiguous()
            tensors["exp_avg_sq"] = state["exp_avg_sq"][ids].float().cpu().contiguous()
            tensors["adam_step"] = torch.as_tensor(state["step"]).float().reshape(1)
        tmp = self.path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"step": str(step), "history": json.dumps(history)})
        tmp.replace(self.path)

    def load(self, embedding: torch.nn.Parameter, opt: torch.optim.Optimizer,
             ids: list[int]) -> tuple[int, list, Tensor | None]:
        with safe_open(str(self.path), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()
        if "rows" not in t:
            raise StudioError(f"{self.path} is not a textual-inversion checkpoint (a NeTI run's?); start in "
                              "a new output folder or without resume")
        with torch.no_grad():
            embedding[ids] = t["rows"].to(embedding.dtype)
        if "exp_avg" in t:
            state = opt.state[embedding]
            state["step"] = torch.tensor(float(t["adam_step"][0]))
            state["exp_avg"] = torch.zeros_like(embedding)
            state["exp_avg_sq"] = torch.zeros_like(embedding)
            state["exp_avg"][ids] = t["exp_avg"].to(embedding.dtype)
            state["exp_avg_sq"][ids] = t["exp_avg_sq"].to(embedding.dtype)
        return int(meta["step"]), json.loads(meta.get("history", "[]")), t.get("core_norms")


def diffusion_loss(unet, noising, latents: Tensor, cond: Tensor, t: Tensor, noise: Tensor,
                   per_sample: bool = False) -> Tensor:
    """MSE between the UNet output and its target (ε, v or x0, by the scheduler's ``prediction_type``) at
    timesteps ``t``; ``noising`` is the model's forward process (:func:`forward_process` of its scheduler's
    config). ``per_sample``: one MSE per batch row instead of their mean."""
    z_t = noising.add_noise(latents, noise, t)
    out = unet(z_t.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample.float()
    prediction_type = noising.config.get("prediction_type", "epsilon")
    target = diffusion_target(prediction_type, noising, latents, noise, t)
    if per_sample:
        return (out - target.float()).square().flatten(1).mean(1)
    return torch.nn.functional.mse_loss(out, target.float())


def check_config(cfg: TextualInversionConfig) -> None:
    """One line naming the first bad setting of ``cfg`` (before any token is added or step taken)."""
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise StudioError(f"mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise StudioError("fp16 training needs a CUDA GPU (CPU has no fp16 kernels); "
                          "use mixed_precision=no or bf16")
    if cfg.steps < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise StudioError(f"need steps >= 1, batch_size >= 1 and lr > 0; "
                          f"got {cfg.steps}, {cfg.batch_size}, {cfg.lr}")
    if not 0 <= cfg.core_rescale_start <= cfg.core_rescale_end <= 1:
        raise StudioError(f"core_rescale_start and core_rescale_end must be fractions of the run with start "
                          f"<= end, got {cfg.core_rescale_start} and {cfg.core_rescale_end}")
    bad = [t for t in cfg.core_templates if t.count("{}") != 1]
    if bad:
        raise StudioError(f"core_templates must each hold one '{{}}' for the token, got {bad[0]!r}")
    if cfg.per_layer and cfg.num_vectors != 1:
        raise StudioError(f"per-layer (XTI) tokens have one vector per layer: num_vectors must be 1, got "
                          f"{cfg.num_vectors}")
    if cfg.neti:
        _check_neti(cfg)


def _check_neti(cfg: TextualInversionConfig) -> None:
    """NeTI learns a mapper, not rows: the options that shape rows do not apply."""
    other = [name for name, on in (("per_layer", cfg.per_layer), ("cross_init", cfg.cross_init)) if on]
    if other:
        raise StudioError(f"NeTI learns a mapper, not embedding rows: it does not combine with {other[0]} "
                          "(Cross-Init and XTI initialise and shape the rows NeTI replaces)")
    if cfg.num_vectors != 1:
        raise StudioError(f"a NeTI token is one token whose embedding the mapper gives: num_vectors must be "
                          f"1, got {cfg.num_vectors}")


def _add_concept_rows(pipe, cfg: TextualInversionConfig):
    """Add the placeholder rows, initialised (plain or Cross-Init); returns ``(ids, Cross-Init's per-vector
    targets (num_vectors, D) or None, a mask of the rows to keep unchanged, their original values)``."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    init_id = initializer_id(tokenizer, cfg.initializer)
    target = (cross_init_target(tokenizer, text_encoder, cfg.initializer, cfg.num_vectors)
              if cfg.cross_init else None)
    tokens = concept_tokens(cfg, pipe.unet)
    if target is not None and cfg.per_layer:  # every layer's row starts at (and is pulled to) the same output
        target = target.expand(len(tokens), -1).clone()
    ids = add_tokens(tokenizer, text_encoder, cfg, tokens)
    embedding = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embedding[ids] = (target if target is not None else embedding[init_id].clone()).to(embedding.dtype)
    original = embedding.detach().clone()
    keep = torch.ones(len(embedding), dtype=torch.bool)
    keep[ids] = False
    return ids, target, keep, original


def _freeze_all_but_embeddings(pipe, device, weight_dtype, train_rows: bool = True) -> torch.nn.Parameter:
    """Freeze the UNet, VAE and text encoder except its token-embedding matrix (trained in float32; frozen
    too unless ``train_rows``)."""
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    embedding = pipe.text_encoder.get_input_embeddings().weight
    embedding.requires_grad_(train_rows)
    to_device(pipe.unet, device, weight_dtype)
    to_device(pipe.vae, device, weight_dtype)
    pipe.text_encoder.to(device)
    pipe.text_encoder.train()
    return embedding


def _template_prompt_ids(tokenizer, cfg: TextualInversionConfig, tokens: list[str]) -> Tensor:
    """Token ids of the training prompts: every template with the (expanded) placeholder, (templates,
    length); per-layer (XTI) ``tokens``: once per layer with that layer's token, (layers, templates,
    length)."""
    templates = cfg.templates or (OBJECT_TEMPLATES if cfg.learnable_property == "object" else STYLE_TEMPLATES)
    words = tokens if cfg.per_layer else [expand_prompt(cfg.placeholder, cfg.placeholder, cfg.num_vectors)]
    ids = [prompt_ids(tokenizer, [tpl.format(w) for tpl in templates]) for w in words]
    return torch.stack(ids) if cfg.per_layer else ids[0]


def train_textual_inversion(pipe, images, cfg: TextualInversionConfig, *, resume: bool = True,
                            quiet: bool = False, callback=None, mapper: NetiMapper | None = None) -> dict:
    """Learn ``cfg.placeholder`` on ``pipe`` (a loaded StableDiffusionPipeline, trained in place: no module is
    copied; or a registered name, folder or hub id) from ``images``; returns a summary. NeTI (``cfg.neti``)
    trains ``mapper`` in place when one is given (default: :func:`models.neti.initial_mapper` of the
    initializer word and ``cfg.seed``).

    ``callback(step, total, loss)`` is called after every step (return False to stop early, checkpointed).
    Runs under ``accelerate`` when launched with ``accelerate launch``: each process takes its share of
    every batch and gradients are averaged.
    """
    from accelerate import Accelerator

    check_config(cfg)
    pipe, _ = open_sd_pipeline(pipe)  # a pipeline object is only checked (unet, vae, text encoder, ...)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    size = pipe.unet.config.sample_size * (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    data, found = prepare_images(images, size)
    if found["note"] and not quiet and accelerator.is_main_process:
        print(found["note"], flush=True)
    if len(data) < cfg.batch_size:
        raise StudioError(f"batch_size {cfg.batch_size} is larger than the {len(data)} training images; "
                          f"use batch_size <= {len(data)} or add images")
    ids, target, keep, original = _add_concept_rows(pipe, cfg)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    embedding = _freeze_all_but_embeddings(pipe, device, weight_dtype, train_rows=not cfg.neti)
    if cfg.neti:
        mapper = (mapper or initial_mapper(pipe, initializer_id(pipe.tokenizer, cfg.initializer), cfg.seed))
        mapper = mapper.to(device)
    elif mapper is not None:
        raise StudioError("a mapper is trained only by NeTI (neti=True)")
    opt = torch.optim.AdamW(mapper.parameters() if mapper is not None else [embedding], lr=cfg.lr,
                            betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    ckpt, step, history, norms = _resume(cfg, resume, embedding, opt, ids, mapper)
    if mapper is None:
        text_encoder, opt = accelerator.prepare(pipe.text_encoder, opt)
    else:  # NeTI: the mapper is what trains (and what multi-process training averages)
        text_encoder, (mapper, opt) = pipe.text_encoder, accelerator.prepare(mapper, opt)
        mapper.train()
    with torch.no_grad():
        dist = pipe.vae.encode(data.to(device, dtype=weight_dtype)).latent_dist
    run = _Run(pipe, cfg, accelerator, text_encoder, opt, ckpt, ids, target, keep, original,
               dist.mean.float(), dist.std.float(),
               _template_prompt_ids(pipe.tokenizer, cfg, pipe.tokenizer.convert_ids_to_tokens(ids)))
    run.core_norms, run.mapper = norms, mapper
    start = time.perf_counter()
    step = run.loop(step, history, quiet, callback)
    accelerator.wait_for_everyone()
    pipe.text_encoder = accelerator.unwrap_model(text_encoder).eval()
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # leave together (a rank exiting with gloo alive can abort)
    out_dir = Path(cfg.output_dir)
    return {"step": step, "steps": cfg.steps,
            "final_loss": float(np.mean(history[-10:])) if history else None,
            "wall_time_s": time.perf_counter() - start, "token_ids": ids,
            "processes": accelerator.num_processes, "main_process": accelerator.is_main_process,
            "embeddings": str(out_dir / "learned_embeds.safetensors"), "loss_history": history,
            "images": found}


def _resume(cfg: TextualInversionConfig, resume: bool, embedding, opt, ids: list[int], mapper):
    """The run's checkpoint and what it holds: ``(checkpoint, step, history, CoRe norms)``; a fresh start
    when there is none or ``resume`` is off."""
    folder = Path(cfg.output_dir)
    ckpt = MapperCheckpoint(folder) if mapper is not None else _Checkpoint(folder)
    if not (resume and ckpt.path.is_file()):
        return ckpt, 0, [], None
    if mapper is not None:
        return (ckpt, *ckpt.load(mapper, opt), None)
    return (ckpt, *ckpt.load(embedding, opt, ids))


@dataclass
class _Run:
    """One textual-inversion training run: the state its steps share."""

    pipe: object
    cfg: TextualInversionConfig
    accelerator: object
    text_encoder: torch.nn.Module  # prepared by accelerate
    opt: torch.optim.Optimizer
    ckpt: _Checkpoint
    ids: list[int]  # the new rows
    target: Tensor | None  # Cross-Init's per-vector targets (num_vectors, D), None for plain init
    keep: Tensor  # mask of the rows restored after every step
    original: Tensor  # their values
    lat_mean: Tensor  # VAE posterior of the training images
    lat_std: Tensor
    prompt_ids: Tensor  # the template prompts (templates, length); per layer: (layers, templates, length)

    def __post_init__(self):
        self.noising = forward_process(self.pipe.scheduler.config)
        self.scale = float(self.pipe.vae.config.scaling_factor)
        self.per_process = max(1, self.cfg.batch_size // self.accelerator.num_processes)
        self.out_dir = Path(self.cfg.output_dir)
        self.layers = ([layer_key(n) for n in cross_attention_layers(self.pipe.unet)] if self.cfg.per_layer
                       else None)
        self.core_norms: Tensor | None = None  # CoRe: the rows' norms recorded when its window opens
        self.mapper = None  # NeTI's mapper (prepared by accelerate): then the rows stay as they are
        self.context = None
        if self.cfg.core:
            word = expand_prompt(self.cfg.placeholder, self.cfg.placeholder, self.cfg.num_vectors)
            self.context = core.ContextPrompts(self.pipe.tokenizer,
                                               self.cfg.core_templates or core.CONTEXT_TEMPLATES, word,
                                               self.cfg.initializer)

    def rows(self) -> Tensor:
        return self.accelerator.unwrap_model(self.text_encoder).get_input_embeddings().weight[self.ids]

    def loss(self, step: int) -> Tensor:
        """The step's loss on its own draws (generator seeded by seed, step and process)."""
        cfg, n, device = self.cfg, self.per_process, self.accelerator.device
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + self.accelerator.process_index)
        idx = torch.randint(len(self.lat_mean), (n,), generator=g)
        mean, std = self.lat_mean[idx].cpu(), self.lat_std[idx].cpu()
        lat = (mean + std * torch.randn(self.lat_mean[idx].shape, generator=g)) * self.scale
        flip = torch.rand(n, generator=g) < cfg.hflip
        lat = torch.where(flip[:, None, None, None], lat.flip(-1), lat)
        t = torch.randint(len(self.noising.alphas_cumprod), (n,), generator=g)
        noise = torch.randn(lat.shape, generator=g)
        which = torch.randint(self.prompt_ids.shape[-2], (n,), generator=g)
        with self.accelerator.autocast():
            if cfg.per_layer:  # each layer's prompt encoded once, all layers in one text-encoder batch
                tok = self.prompt_ids[:, which].flatten(0, 1)
                states = self.text_encoder(tok.to(device))[0].unflatten(0, (-1, n))
                with per_layer_conditioning(self.pipe.unet, list(states)):
                    loss = diffusion_loss(self.pipe.unet, self.noising, lat.to(device), states[0],
                                          t.to(device), noise.to(device))
            elif self.mapper is not None:
                ids = self.prompt_ids[which].to(device)
                # every cross-attention layer reads the mapper's states instead: only the shape counts
                cond = torch.zeros(n, ids.shape[1], self.original.shape[1], device=device)
                with neti_conditioning(self.pipe.unet, self.text_encoder, self.mapper, ids, self.ids[0],
                                       generator=g):
                    loss = diffusion_loss(self.pipe.unet, self.noising, lat.to(device), cond, t.to(device),
                                          noise.to(device))
            else:
                cond = self.text_encoder(self.prompt_ids[which].to(device))[0]
                loss = diffusion_loss(self.pipe.unet, self.noising, lat.to(device), cond, t.to(device),
                                      noise.to(device))
            if self.context is not None:
                loss = loss + self.core_loss(step, self.noising.add_noise(lat.to(device), noise.to(device),
                                                                          t.to(device)), t.to(device))
        if self.target is not None and cfg.cross_init_reg > 0:  # float32 rows and targets, outside autocast
            loss = loss + cross_init_regulariser(self.rows(), self.target, cfg.cross_init_reg)
        return loss

    def core_loss(self, step: int, z_t: Tensor, t: Tensor) -> Tensor:
        """CoRe's context-embedding and context-attention terms (:mod:`studio.training.core`) for the step's
        drawn template, on the step's own noisy latents ``z_t``."""
        rng = random.Random(self.cfg.seed * 1_000_003 + step)  # a template per step, the same on resume
        tok, ref, pos_tok, pos_ref = self.context.draw(rng)
        device, n = self.accelerator.device, len(z_t)
        if self.mapper is not None:
            return self._neti_core_loss(step, z_t, t, tok, ref, pos_tok, pos_ref)
        if self.layers is not None:  # XTI: the token prompt once per layer, with that layer's token
            tok = torch.stack([torch.where(tok == self.ids[0], i, tok) for i in self.ids])
        else:
            tok = tok[None]
        states = self.text_encoder(tok.to(device))[0]  # (layers or 1, length, D)
        with torch.no_grad():
            reference = self.text_encoder(ref[None].to(device))[0]
            ref_mass = core.attention_masses(self.pipe.unet, z_t, t, reference.expand(n, -1, -1))
        per_layer = [s.expand(n, -1, -1) for s in states] if self.layers is not None else None
        tok_mass = core.attention_masses(self.pipe.unet, z_t, t, states[0].expand(n, -1, -1), per_layer)
        return (core.embedding_loss(states, reference, pos_tok, pos_ref)
                + core.attention_loss(tok_mass, ref_mass, pos_tok, pos_ref))

    def _neti_core_loss(self, step: int, z_t: Tensor, t: Tensor, tok: Tensor, ref: Tensor, pos_tok: Tensor,
                        pos_ref: Tensor) -> Tensor:
        """CoRe with a NeTI token: the token prompt is encoded with the mapper's rows for each sample's
        timestep and each layer; the embedding term averages over all of them, and each layer's attention
        mass is taken on its own keys. Deviation: the attention pass conditions every layer on its keys
        only (values as keys, no bypass), since the mass depends on the keys and the recorder wraps a
        processor that reads one context."""
        device, n = self.accelerator.device, len(z_t)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 101 + 7)  # its dropout draws
        # the unwrapped mapper: a second forward of the DDP module in one step would confuse its reducer
        keys, _ = NetiStates(self.text_encoder, unwrapped(self.mapper), tok[None].expand(n, -1).to(device),
                             self.ids[0], None, g).states(t)  # (layers, n, length, D)
        with torch.no_grad():
            reference = self.text_encoder(ref[None].to(device))[0]
            ref_mass = core.attention_masses(self.pipe.unet, z_t, t, reference.expand(n, -1, -1))
        tok_mass = core.attention_masses(self.pipe.unet, z_t, t, keys[0], list(keys))
        return (core.embedding_loss(keys.flatten(0, 1), reference, pos_tok, pos_ref)
                + core.attention_loss(tok_mass, ref_mass, pos_tok, pos_ref))

    def hold_norms(self, step: int) -> None:
        """CoRe: record the rows' norms when its window opens (after ``step`` updates), then hold them."""
        window = (self.cfg.core_rescale_start, self.cfg.core_rescale_end)
        phase = core.rescale_window(step, self.cfg.steps, window)
        if phase is None:
            return
        with torch.no_grad():
            emb = self.accelerator.unwrap_model(self.text_encoder).get_input_embeddings().weight
            norms = emb[self.ids].float().norm(dim=-1)
            if phase == "record":
                self.core_norms = norms.cpu()
            elif self.core_norms is not None:
                factor = (self.core_norms.to(norms) / norms)[:, None]
                emb[self.ids] = (emb[self.ids].float() * factor).to(emb.dtype)

    def loop(self, step: int, history: list, quiet: bool, callback) -> int:
        cfg, accelerator = self.cfg, self.accelerator
        if accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out_dir, self.out_dir / "validation")  # what a killed run left
            write_json(self.out_dir / "config.json", asdict(cfg), indent=1)
            if step >= cfg.steps:  # resumed at the end: a kill may have come between checkpoint and file
                self.save_file()
        while step < cfg.steps:
            loss = self.loss(step)
            accelerator.backward(loss)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():  # weight decay touched every row: restore all but the new ones
                emb = accelerator.unwrap_model(self.text_encoder).get_input_embeddings().weight
                emb[self.keep] = self.original[self.keep].to(emb.dtype)
            step += 1
            if self.context is not None and self.mapper is None:  # NeTI's output norm is fixed already
                self.hold_norms(step)
            value = float(accelerator.reduce(loss.detach(), reduction="mean"))
            history.append(value)
            stop = callback is not None and callback(step, cfg.steps, value) is False
            self.after_step(step, history, quiet, stop)
            if stop:
                break
        return step

    def save_file(self) -> None:
        path = self.out_dir / "learned_embeds.safetensors"
        if self.mapper is not None:
            save_neti_file(path, self.cfg.placeholder, self.rows(), self.mapper)
        else:
            save_embeddings(path, self.cfg.placeholder, self.rows(), self.layers)

    def after_step(self, step: int, history: list, quiet: bool, stop: bool) -> None:
        """Validation grid, checkpoint and progress line of the main process.

        The grid comes first: a run killed before the step's checkpoint takes the step again, grid
        included, so a checkpoint never stands for a step whose grid is missing."""
        cfg = self.cfg
        if not self.accelerator.is_main_process:
            return
        if cfg.validate_every and step % cfg.validate_every == 0:
            _validate(self.pipe, cfg, self.out_dir / "validation" / f"step-{step:05d}.png", self.mapper)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
            if self.mapper is not None:
                self.ckpt.save(self.mapper, self.opt, step, history)
            else:
                self.ckpt.save(self.rows(), self.opt, self.ids, step, history, self.core_norms)
            self.save_file()
        if not quiet and (step % 10 == 0 or step == cfg.steps):
            print(f"step {step}/{cfg.steps} loss {np.mean(history[-10:]):.4f}", flush=True)


@torch.no_grad()
def _validate(pipe, cfg: TextualInversionConfig, path: Path, mapper=None, n: int = 4) -> None:
    prompt = expand_prompt(cfg.validation_prompt.format(cfg.placeholder), cfg.placeholder, cfg.num_vectors)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    g = torch.Generator().manual_seed(cfg.seed)
    was_training = pipe.text_encoder.training
    pipe.text_encoder.eval()
    if mapper is not None:
        images = sample_neti(pipe, prompt, cfg.placeholder, unwrapped(mapper), n=n, steps=20, guidance=3.0,
                             generator=g, size=size)
        unwrapped(mapper).train()
    elif cfg.per_layer:
        concepts = {cfg.placeholder: len(cross_attention_layers(pipe.unet))}
        images = sample_per_layer(pipe, prompt, concepts, n=n, steps=20, guidance=3.0, generator=g, size=size)
    else:
        images = pipe([prompt] * n, num_inference_steps=20, guidance_scale=3.0, generator=g, height=size,
                      width=size, output_type="pt").images
    pipe.text_encoder.train(was_training)
    save_grid(images.cpu(), path, nrow=n)


@torch.no_grad()
def concept_latents(pipe, images) -> Tensor:
    """Paths or an (N,3,H,W) [0,1] tensor → the scaled VAE latents (encoder mean) the diffusion loss is
    taken on."""
    data = _load_images(images, pipe.unet.config.sample_size * pipe.vae_scale_factor)
    lat = pipe.vae.encode(data.to(pipe.unet.device, pipe.vae.dtype)).latent_dist.mean.float()
    return lat * pipe.vae.config.scaling_factor


@torch.no_grad()
def prompt_condition(pipe, prompt: str | list[str], n: int) -> Tensor:
    """Text-encoder states for ``n`` images: one prompt for all, or a list with one prompt per image."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(prompts) not in (1, n):
        raise StudioError(f"concept_loss: {len(prompts)} prompts for {n} images (give 1 or one per image)")
    return encode_prompts(pipe, prompts).to(pipe.unet.device).expand(n, -1, -1)


@torch.no_grad()
def concept_loss(pipe, images: Tensor, prompt: str | list[str], seed: int = 0, samples: int = 64,
                 per_layer: dict[str, int] | None = None,
                 neti: tuple[str, NetiMapper] | None = None) -> float:
    """The mean diffusion loss of ``images`` under ``prompt`` over fixed (t, ε) draws (the issue's measure).

    ``prompt`` is one prompt for every image, or a list with one prompt per image (e.g. each image's own
    caption); the draws depend only on ``seed`` and the number of images, so losses are paired across
    prompts. ``per_layer``: the XTI concepts ({placeholder: layers}) the prompt names, which condition each
    cross-attention layer on its own encoding. ``neti``: ``(token, mapper)`` of the NeTI concept the prompt
    names (the mapper is used in eval mode and left so)."""
    lat = concept_latents(pipe, images)
    if neti is not None:
        return _neti_loss(pipe, lat, prompt, neti, seed, samples)
    if not per_layer:
        return _paired_loss(pipe, lat, prompt_condition(pipe, prompt, len(lat)), seed, samples)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    by_layer = zip(*(layer_prompts(p, per_layer) for p in prompts))  # per layer: the prompt(s)
    states = [prompt_condition(pipe, list(layer), len(lat)) for layer in by_layer]
    with per_layer_conditioning(pipe.unet, states):
        return _paired_loss(pipe, lat, states[0], seed, samples)


def _neti_loss(pipe, lat: Tensor, prompt: str | list[str], neti: tuple[str, NetiMapper], seed: int,
               samples: int) -> float:
    token, mapper = neti
    prompts = [prompt] * len(lat) if isinstance(prompt, str) else list(prompt)
    ids = prompt_ids(pipe.tokenizer, prompts)
    tid = token_id(pipe.tokenizer, token, ids)
    plain = prompt_condition(pipe, prompts, len(lat))  # replaced in every cross-attention layer
    with neti_conditioning(pipe.unet, pipe.text_encoder, mapper.eval(), ids.to(pipe.unet.device), tid):
        return _paired_loss(pipe, lat, plain, seed, samples)


def _paired_loss(pipe, lat: Tensor, cond: Tensor, seed: int, samples: int) -> float:
    """The diffusion loss of latents ``lat`` under ``cond``, over draws fixed by ``seed``."""
    device = pipe.unet.device
    noising = forward_process(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(math.ceil(samples / len(lat))):
        t = torch.randint(len(noising.alphas_cumprod), (len(lat),), generator=g).to(device)
        noise = torch.randn(lat.shape, generator=g).to(device)
        losses.append(float(diffusion_loss(pipe.unet, noising, lat, cond, t, noise)))
    return float(np.mean(losses))
