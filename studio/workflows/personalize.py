"""Personalization workflows: ``personalize`` (textual inversion) and ``generate`` (text-to-image with
learned tokens), shared by ``studio personalize`` / ``studio generate`` and the app."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.diffusers_prior import is_pipeline, pipeline_source
from models.latent_prior import open_sd_pipeline
from models.registry import TEXT_TO_IMAGE, default_model, resolve_model_path
from studio.core.config import merge_overrides
from studio.core.errors import StudioError
from studio.training.textual_inversion import (
    TextualInversionConfig,
    add_learned_tokens,
    expand_prompt,
    load_into,
    read_embedding_file,
    train_textual_inversion,
)
from studio.training.neti import sample_neti
from studio.training.xti import sample_per_layer

Tensor = torch.Tensor
#: the personalization methods (``studio personalize --method``, the app's method list): the
#: textual-inversion options each sets
METHODS = {"ti": {}, "cross-init": {"cross_init": True}, "xti": {"per_layer": True}, "neti": {"neti": True},
           "core": {"core": True}}
METHOD_TITLES = {"ti": "textual inversion", "cross-init": "Cross-Initialization",
                 "xti": "XTI (one token per cross-attention layer)",
                 "neti": "NeTI (a mapper from timestep and layer to the token)",
                 "core": "textual inversion + CoRe (context regularization)"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def load_sd_pipeline(model=None, device: str | None = None):
    """A ``StableDiffusionPipeline``-style pipeline by registered name, folder or cached hub id (on
    ``device``, CPU when None); a loaded pipeline object is checked and used as it is (moved only to a given
    ``device``, in place, as ``pipe.to`` does)."""
    loaded = is_pipeline(model)
    pipe, _ = open_sd_pipeline(model if loaded else model or default_model(TEXT_TO_IMAGE))  # bars already off
    return pipe if loaded and device is None else pipe.to(device or "cpu")


def image_files(paths: list[str]) -> list[Path]:
    """Files and folders → the image files (sorted); a clear error for anything else."""
    if not paths:
        raise StudioError("no training images given")
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise StudioError(f"training image {p} does not exist")
    if not out:
        raise StudioError(f"no images found in {', '.join(paths)}")
    return out


def make_config(overrides: dict) -> TextualInversionConfig:
    """Textual-inversion options checked against :class:`TextualInversionConfig` (unknown keys and values
    of the wrong type raise, naming the key); a single template string counts as a one-template list (for
    ``templates`` and ``core_templates``)."""
    options = dict(overrides)
    for key in ("templates", "core_templates"):
        if isinstance(options.get(key), str):
            options[key] = (options[key],)
    values = merge_overrides(
        TextualInversionConfig, None, options, "personalization options",
        unknown=lambda key, known: f"unknown personalization option {key!r} "
                                   f"(known: {', '.join(sorted(known))})")
    return TextualInversionConfig(**values)


# for a model that declares no prompt template in its card.json (emoji-sd declares "{}": it is trained on
# bare captions, and with "a picture of a {}", a prefix it never saw, its init-word samples were noise)
DEFAULT_TEMPLATE = "a picture of a {}"


def prompt_template(model=None) -> str:
    """The template prompts with a learned token are built from: the model's own, else
    :data:`DEFAULT_TEMPLATE`."""
    return model_prompt_template(model) or DEFAULT_TEMPLATE


def model_prompt_template(model=None) -> str | None:
    """The prompt template a model folder declares in its ``card.json`` (``"prompt_template"``), else
    ``None``.

    ``emoji-sd`` declares ``"{}"``: it was trained on bare captions, so prefixes such as "a photo of a" are
    words it never saw, and prompts built from them give noise."""
    name = pipeline_source(model) if is_pipeline(model) else model or default_model(TEXT_TO_IMAGE)
    card = Path(resolve_model_path(name)) / "card.json"  # a pipeline: the folder it was loaded from, if any
    if not card.is_file():
        return None
    try:
        template = json.loads(card.read_text()).get("prompt_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    return template if isinstance(template, str) and template.count("{}") == 1 else None


def personalize(images, *, model=None, device: str | None = None, resume: bool = True,
                quiet: bool = False, callback=None, method: str = "ti", **options) -> dict:
    """Learn a token from ``images`` (paths/folders or an (N,3,H,W) [0,1] tensor); ``options`` are
    :class:`TextualInversionConfig` fields. Returns the training summary (path of the embedding file).

    ``method`` (a name of :data:`METHODS`) sets the options of that method; ``cross_init=True`` or
    ``per_layer=True`` among ``options`` do the same.

    ``model``: a name, folder or hub id, or a loaded ``StableDiffusionPipeline``: trained in place, as
    diffusers' textual-inversion script does (its tokenizer gains the new token, its text encoder the new
    embedding rows; the UNet and VAE are used as they are, cast only to the ``mixed_precision`` dtype).

    Without ``templates``, a model that declares a prompt template (:func:`model_prompt_template`) trains
    on that one; otherwise the object/style templates of ``learnable_property`` are used.

    Images of any size are center-cropped and resized to the model's training size
    (:func:`~studio.training.textual_inversion.prepare_images`); the summary's ``images`` names the sizes
    found and the size used."""
    if method not in METHODS:
        raise StudioError(f"unknown personalization method {method!r} (known: {', '.join(METHODS)})")
    against = [k for k, v in METHODS[method].items() if k in options and options[k] != v]
    if against:
        key = against[0]
        raise StudioError(f"method {method!r} sets {key}={METHODS[method][key]}, the options say "
                          f"{key}={options[key]}")
    options = {**METHODS[method], **options}
    if not options.get("templates") and (template := model_prompt_template(model)):
        options = {**options, "templates": (template,)}
    cfg = make_config(options)
    pipe = load_sd_pipeline(model, device)
    if isinstance(images, (str, Path)):
        images = [images]  # one file or folder, not its characters
    data = images if isinstance(images, Tensor) else [str(p) for p in image_files(list(images))]
    return train_textual_inversion(pipe, data, cfg, resume=resume, quiet=quiet, callback=callback)


@torch.no_grad()
def generate(prompt: str, *, model=None, embeddings: list[str] = (),
             tokens: list[str] | None = None, n: int = 4, steps: int = 20, guidance: float = 3.0,
             seed: int = 0, negative_prompt: str = "", device: str | None = None, pipe=None,
             truncation: int | None = None) -> Tensor:
    """Images in [0, 1] (n, 3, H, W) for ``prompt``; learned tokens from ``embeddings`` files are added
    first (textual inversion's with diffusers' loader; per-layer XTI ones, when the prompt names them, are
    sampled with per-layer conditioning; a NeTI one with its mapper, ``truncation`` keeping the first k
    dimensions of its nested-dropout vector: smaller is more editable, None all). ``model`` may be a loaded
    pipeline (as ``pipe``)."""
    if not isinstance(steps, int) or steps <= 0:
        raise StudioError(f"steps must be a positive integer, got {steps!r}")
    if n < 1:
        raise StudioError(f"n must be >= 1, got {n}")
    pipe = pipe or load_sd_pipeline(model, device)
    prompt, per_layer, mappers = _add_embeddings(pipe, prompt, embeddings, tokens)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    per_layer = {name: layers for name, layers in per_layer.items() if name in prompt}
    mappers = {name: mapper for name, mapper in mappers.items() if name in prompt}
    if mappers:
        if len(mappers) > 1 or per_layer:
            raise StudioError("a prompt can name one NeTI concept and no per-layer (XTI) one: each "
                              "conditions every cross-attention layer on its own")
        name, mapper = next(iter(mappers.items()))
        return sample_neti(pipe, prompt, name, mapper, n=n, steps=steps, guidance=guidance, generator=g,
                           negative_prompt=negative_prompt, size=size, truncation=truncation)
    if per_layer:
        return sample_per_layer(pipe, prompt, per_layer, n=n, steps=steps, guidance=guidance, generator=g,
                                negative_prompt=negative_prompt, size=size)
    out = pipe([prompt] * n, negative_prompt=[negative_prompt] * n if negative_prompt else None,
               num_inference_steps=steps, guidance_scale=guidance, generator=g, height=size, width=size,
               output_type="pt")
    return out.images.float().cpu().clamp(0, 1)


def _add_embeddings(pipe, prompt: str, embeddings, tokens) -> tuple[str, dict[str, int], dict]:
    """Add the learned tokens of ``embeddings`` files to ``pipe``; returns the prompt with multi-vector
    tokens expanded, the per-layer (XTI) concepts ({name: layers}) and the NeTI ones ({name: mapper})."""
    per_layer: dict[str, int] = {}
    mappers: dict = {}
    for i, path in enumerate(embeddings):
        token = tokens[i] if tokens and i < len(tokens) else None
        learned = read_embedding_file(path, token)
        if learned.layers is not None or learned.mapper is not None:
            add_learned_tokens(pipe, learned)
            if learned.mapper is not None:
                mappers[learned.name] = learned.mapper
            else:
                per_layer[learned.name] = len(learned.layers)
            continue
        if learned.name not in pipe.tokenizer.get_vocab():
            load_into(pipe, path, token)
        prompt = expand_prompt(prompt, learned.name, learned.rows.shape[0])
    return prompt, per_layer, mappers
