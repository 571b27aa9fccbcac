"""Measured evaluation of personalization on a held-out concept (issues 6 and 25): plain textual
inversion, Cross-Init, XTI, NeTI and TI + CoRe.

One concept of the held-out examples (``examples/emoji/captions.json``: all variants of one emoji concept,
e.g. the six skin tones of "man with white cane", none of which the embedded model saw in training) is
learned once per run of ``runs``, with the same seed, steps, learning rate and batch: from the initializer
word's input embedding (``plain``), with Cross-Initialization (``cross-init``), and as extended textual
inversion, one embedding per cross-attention layer (``xti``; :mod:`studio.training.xti`), as NeTI's mapper
from timestep and layer to the embedding (``neti``; :mod:`models.neti`; its step 0 is the seeded initial
mapper, whose output is not the init word's row) and with CoRe's context regularisation (``core``).

What is measured, and how:

* **Concept loss** ``L(prompt)``: :func:`studio.training.textual_inversion.concept_loss`, the mean ε-MSE of
  the concept images under ``prompt`` over fixed (t, ε) draws (``seed``; ``ceil(samples / N) · N`` draws for
  N images). The draws are the same for every prompt and every step, so differences are paired.
  ``prompt = template.format(x)`` with x the token (``<concept>``) or the initializer word. Training uses
  the same template (``templates=(template,)``; by default the model's declared one, see
  :func:`studio.workflows.personalize.model_prompt_template`) unless ``templates`` is passed as an option, so
  the measured loss is the trained objective.
* **Reference prompts** (same draws, so paired): the empty prompt, and each concept image under its own
  caption (the words the model never saw with these images). They tell how much any prompt can lower the
  loss on this model; neither is a goal.
* **Noise of that estimate**: the same loss with ``std_seeds`` different seeds (``seed, seed+1, …``) for the
  initializer word and for each final token; the std (ddof 1) over seeds is reported next to the drop, and
  the std of the paired drop too. The curves use the fixed ``seed`` only.
* **Loss curve**: ``L(token)`` at step 0 (the initialised token, before any update) and every
  ``eval_every`` steps (plus the last step if ``steps`` is not a multiple), for both runs. Plain init at
  step 0 equals the initializer-word loss by construction (same input embedding).
* **Relative drop** = ``100 · (L(init word) − L(token at the last step)) / L(init word)``; the issue's goal
  is ≥ 30 %.
* **Steps to a common target**: the first curve step at which a run's loss is ≤ the target, for two
  targets: ``plain_final`` = the plain run's final loss, and ``70%_of_plain_drop`` = ``L(init word) −
  0.7 · (L(init word) − plain final loss)``. Resolution is ``eval_every`` steps; ``None`` = not reached.
* **Editability** (:func:`_editability`): how well an edit word still works next to the token, measured
  by the model itself on samples of ``template(edit(token))`` against the same for the init word.
* **Resemblance**: ``n_samples`` images (one seeded generator, ``seed``, so the k-th sample starts from the
  same latent noise for every prompt) with each token prompt and with the initializer-word prompt; for
  each sample the max over the concept images of PSNR and of SSIM (:mod:`studio.core.metrics`), averaged over
  the samples.

The concept images are both the training images and the evaluation images: what is held out is the
concept from the *model's* training, as the issue asks; nothing here measures generalisation to unseen
images of the concept.

Outputs (``out``): ``results.json``, ``results.md`` (tables + goal lines, computed), ``loss_curves.png``,
``samples.png`` (rows: concept images | each run's token | init-word samples, labelled), and each run's
``learned_embeds.safetensors`` under ``<run>/``.
"""

from __future__ import annotations

import json
import math
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from models.layer_conditioning import cross_attention_layers
from models.neti import NetiMapper, initial_mapper
from models.registry import TEXT_TO_IMAGE, default_model
from studio.core import paths
from studio.core.errors import StudioError
from studio.core.io import write_json_atomic
from studio.core.metrics import psnr, ssim
from studio.training.emoji_data import concept_of
from studio.training.textual_inversion import (
    TextualInversionConfig,
    _load_images,
    add_tokens,
    check_config,
    concept_loss,
    cross_init_target,
    expand_prompt,
    initializer_id,
    train_textual_inversion,
)
from studio.workflows.personalize import generate, load_sd_pipeline, make_config, prompt_template

Tensor = torch.Tensor

MIN_IMAGES = 3
DEFAULT_EXAMPLES = "examples/emoji"
GOAL_DROP_PERCENT = 30.0
#: the runs the evaluation can make, and the textual-inversion options each sets
RUN_OPTIONS = {"plain": {}, "cross-init": {"cross_init": True}, "xti": {"per_layer": True},
               "neti": {"neti": True}, "core": {"core": True}, "neti-core": {"neti": True, "core": True}}
DEFAULT_RUNS = ("plain", "cross-init")
#: edits for the editability score: the token (or the init word) inside these, within the template
DEFAULT_EDITS = ("{}: dark skin tone", "{} running")
_STOPWORDS = {"a", "an", "and", "at", "by", "for", "from", "in", "of", "on", "or", "the", "to", "with"}
_TONE_RE = re.compile(r"\b(?:medium-light|medium-dark|light|medium|dark) skin tone\b")
# options set by evaluate_personalization itself (every run shares them; the run's method is what differs)
_FIXED_OPTIONS = {"placeholder", "initializer", "cross_init", "per_layer", "neti", "core", "steps", "lr",
                  "batch_size", "seed", "output_dir", "validate_every", "checkpoint_every"}


# ----------------------------------------------------------------------------------------------- concepts


@dataclass
class Concept:
    name: str
    captions: list[str]
    files: list[Path]


def concept_name(caption: str) -> str:
    """``"man with white cane: medium skin tone"`` → ``"man with white cane"`` (tones removed, CLDR style)."""
    return _TONE_RE.sub("", caption).strip().rstrip(":,").strip()


def _concept_key(entry: dict) -> str:
    if "concept" in entry:
        return entry["concept"]
    if "sequence" in entry:
        return concept_of(entry["sequence"])
    return concept_name(entry["caption"])


def list_concepts(examples: str | Path = DEFAULT_EXAMPLES, size: int | None = None) -> list[Concept]:
    """The concepts of an examples folder (``captions.json`` + PNGs), in file order.

    A concept groups the entries whose sequence is equal after removing skin tones, variation selectors
    and gender signs (:func:`studio.training.emoji_data.concept_of`; an entry's ``concept`` key wins if
    present).
    Entries marked ``held_out: false`` are skipped. ``size`` picks the file of that size when the entry
    has one (else the largest).
    """
    folder = paths.resolve_shipped(examples)
    index = folder / "captions.json"
    if not index.is_file():
        raise StudioError(f"examples folder {folder} has no captions.json")
    try:
        entries = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise StudioError(f"{index} is not valid JSON ({err.msg} at line {err.lineno})") from None
    groups: dict[str, Concept] = {}
    for entry in entries:
        if not entry.get("held_out", True):
            continue
        files = entry.get("files") or {}
        if not files:
            raise StudioError(f"{index}: entry {entry.get('caption')!r} lists no image files")
        key = str(size) if size is not None and str(size) in files else max(files, key=int)
        concept = groups.setdefault(_concept_key(entry), Concept(concept_name(entry["caption"]), [], []))
        concept.captions.append(entry["caption"])
        concept.files.append(folder / files[key])
        if len(concept_name(entry["caption"])) < len(concept.name):  # the plainest caption names it
            concept.name = concept_name(entry["caption"])
    return list(groups.values())


def pick_concept(concepts: list[Concept], name: str | None) -> Concept:
    """``name`` (case-insensitive), or the concept with the most images (first in file order on a tie)."""
    eligible = [c for c in concepts if len(c.files) >= MIN_IMAGES]
    choices = ", ".join(f"'{c.name}' ({len(c.files)})" for c in eligible) or "none"
    if name is None:
        if not eligible:
            raise StudioError(f"no concept has >= {MIN_IMAGES} images; concepts: "
                              + ", ".join(f"'{c.name}' ({len(c.files)})" for c in concepts))
        return max(eligible, key=lambda c: len(c.files))  # max keeps the first of equal counts
    match = [c for c in concepts if c.name.lower() == name.strip().lower()]
    if not match:
        raise StudioError(f"unknown concept {name!r}; concepts with >= {MIN_IMAGES} images (count): "
                          f"{choices}")
    if len(match[0].files) < MIN_IMAGES:
        raise StudioError(f"concept {name!r} has {len(match[0].files)} image(s), need >= {MIN_IMAGES}; "
                          f"choices: {choices}")
    return match[0]


def pick_init_word(tokenizer, concept: Concept, word: str | None) -> str:
    """``word`` if the tokenizer reads it as one token; by default the first word of the concept's name
    (stop words skipped) that is one token."""
    if word is not None:
        initializer_id(tokenizer, word)  # raises "... is N tokens ...; choose a word that is one token"
        return word
    words = [w for w in re.findall(r"[a-z]+", concept.name.lower()) if w not in _STOPWORDS]
    counts = {w: len(tokenizer(w, add_special_tokens=False).input_ids) for w in words}
    for w in words:
        if counts[w] == 1:
            return w
    listed = ", ".join(f"{w}: {n} tokens" for w, n in counts.items())
    raise StudioError(f"no word of the concept name {concept.name!r} is one token for this tokenizer "
                      f"({listed}); pass --init-word with a one-token word close to the concept (e.g. a word "
                      "of the model's training captions)")


# ----------------------------------------------------------------------------------------------- measures


def token_prompt(template: str, cfg) -> str:
    """The prompt with the token, expanded to all its vectors (``<concept> <concept>_1 …``) for multi-vector
    tokens, as training builds it."""
    return expand_prompt(template.format(cfg.placeholder), cfg.placeholder, cfg.num_vectors)


def loss_with_std(pipe, images: Tensor, prompt: str, seed: int, samples: int, std_seeds: int,
                  **conditioning) -> list[float]:
    """``concept_loss`` for seeds ``seed … seed+std_seeds-1`` (the first is the fixed-seed estimate);
    ``conditioning``: :func:`run_conditioning`'s."""
    return [concept_loss(pipe, images, prompt, seed=seed + i, samples=samples, **conditioning)
            for i in range(std_seeds)]


def run_conditioning(pipe, cfg, mapper=None) -> dict:
    """What :func:`concept_loss` needs besides the prompt for a run's token: ``per_layer`` ({placeholder:
    layers}) for XTI, ``neti`` ((placeholder, mapper)) for NeTI, nothing for the others."""
    if cfg.per_layer:
        return {"per_layer": {cfg.placeholder: len(cross_attention_layers(pipe.unet))}}
    return {"neti": (cfg.placeholder, mapper)} if cfg.neti else {}


def neti_start(pipe, cfg) -> NetiMapper:
    """The mapper a NeTI run starts from (:func:`models.neti.initial_mapper`, as training makes it)."""
    return initial_mapper(pipe, initializer_id(pipe.tokenizer, cfg.initializer), cfg.seed)


def resemblance(samples: Tensor, references: Tensor) -> dict:
    """Per sample the max over ``references`` of PSNR and of SSIM; their means over samples."""
    best_psnr = [max(psnr(s, r) for r in references) for s in samples]
    best_ssim = [max(ssim(s, r) for r in references) for s in samples]
    return {"psnr": float(np.mean(best_psnr)), "ssim": float(np.mean(best_ssim)),
            "psnr_per_sample": best_psnr, "ssim_per_sample": best_ssim}


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    """The first curve step whose loss is <= ``target`` (``None`` if none is)."""
    return next((p["step"] for p in curve if p["loss"] <= target), None)


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _initial_token_losses(pipe, images: Tensor, cfg_kwargs: dict, init_word: str, template: str, seed: int,
                          samples: int, std_seeds: int) -> tuple[dict, list[float]]:
    """The init-word losses (``std_seeds`` seeds) and the step-0 token loss of both initialisations; the token
    is added to ``pipe`` with the helpers training uses (so ``pipe`` cannot train it again afterwards)."""
    cfg = TextualInversionConfig(**{**cfg_kwargs, "initializer": init_word})
    # first: a taken token name fails before any work
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, cfg)
    init_losses = loss_with_std(pipe, images, template.format(init_word), seed, samples, std_seeds)
    weight = pipe.text_encoder.get_input_embeddings().weight
    init_row = weight[initializer_id(pipe.tokenizer, init_word)].clone()
    cross_row = cross_init_target(pipe.tokenizer, pipe.text_encoder, init_word, cfg.num_vectors)
    out = {}
    for name, row in (("plain", init_row), ("cross-init", cross_row)):
        with torch.no_grad():
            weight[ids] = row.to(weight.dtype)
        out[name] = concept_loss(pipe, images, token_prompt(template, cfg), seed=seed, samples=samples)
    # XTI starts with every layer's row at the init word's: every layer reads the plain token's states;
    # CoRe starts as plain textual inversion
    out["xti"] = out["core"] = out["plain"]
    neti_cfg = TextualInversionConfig(**{**cfg_kwargs, "initializer": init_word, "neti": True})
    out["neti"] = concept_loss(pipe, images, token_prompt(template, cfg), seed=seed, samples=samples,
                               **run_conditioning(pipe, neti_cfg, neti_start(pipe, neti_cfg)))
    out["neti-core"] = out["neti"]  # the same initial mapper
    return out, init_losses


def _train_run(model: str, device: str, images: Tensor, cfg, template: str, seed: int, samples: int,
               eval_every: int, step0_loss: float, quiet: bool):
    """Train one token on a fresh pipeline, recording ``concept_loss`` every ``eval_every`` steps; returns
    the pipeline, the curve, the summary and the conditioning of the trained token."""
    pipe = load_sd_pipeline(model, device)
    mapper = neti_start(pipe, cfg) if cfg.neti else None
    prompt, conditioning = token_prompt(template, cfg), run_conditioning(pipe, cfg, mapper)
    curve = [{"step": 0, "loss": step0_loss, "train_loss": None}]
    eval_time = [0.0]

    def record(step: int, total: int, loss: float) -> None:
        if step % eval_every:
            return
        t0 = time.perf_counter()
        was_training = pipe.text_encoder.training
        pipe.text_encoder.eval()
        curve.append({"step": step, "train_loss": loss,
                      "loss": concept_loss(pipe, images, prompt, seed=seed, samples=samples, **conditioning)})
        pipe.text_encoder.train(was_training)
        if mapper is not None:  # concept_loss left it in eval mode; training goes on with nested dropout
            mapper.train()
        eval_time[0] += time.perf_counter() - t0
        if not quiet:
            print(f"  step {step}/{total}: concept loss {curve[-1]['loss']:.5f}", flush=True)

    summary = train_textual_inversion(pipe, images, cfg, resume=False, quiet=True, callback=record,
                                      mapper=mapper)
    summary["train_time_s"] = summary["wall_time_s"] - eval_time[0]
    summary["curve_eval_time_s"] = eval_time[0]
    return pipe, curve, summary, conditioning


# ------------------------------------------------------------------------------------------------ outputs


def _fmt(v, spec: str = ".5f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def write_loss_plot(path: Path, res: dict) -> Path:
    """Left: concept loss vs step of every run, the init-word level (± its std over seeds) and the −30 %
    goal. Right: the same curves as drop (%) from the init-word loss, zoomed to the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    init = res["init_word"]
    colors = ("tab:blue", "tab:orange", "tab:purple", "tab:red", "tab:brown")
    for name, color in zip(res["runs"], colors):
        curve = res["runs"][name]["curve"]
        x, y = [p["step"] for p in curve], [p["loss"] for p in curve]
        ax.plot(x, y, "o-", ms=3, color=color, label=f"{name} token")
        zoom.plot(x, [100 * (init["loss"] - v) / init["loss"] for v in y], "o-", ms=3, color=color,
                  label=f"{name} token")
    ax.axhline(init["loss"], color="k", lw=1.2, label=f"init word '{init['word']}'")
    zoom.axhline(0, color="k", lw=1.2, label=f"init word '{init['word']}'")
    if math.isfinite(init["std"]):
        ax.axhspan(init["loss"] - init["std"], init["loss"] + init["std"], color="k", alpha=0.08,
                   label=f"± std over {res['settings']['std_seeds']} seeds")
    ax.axhline(init["loss"] * (1 - GOAL_DROP_PERCENT / 100), color="tab:green", ls=":",
               label=f"goal: −{GOAL_DROP_PERCENT:g}%")
    ax.set_ylabel("concept loss (ε-MSE, fixed draws)")
    zoom.set_ylabel("drop from the init-word loss (%)")
    ax.set_title(f"'{res['concept']['name']}': {res['settings']['draws']} (t, ε) draws, seed "
                 f"{res['settings']['seed']}", fontsize=9)
    zoom.set_title("the same, as drop (%), zoomed", fontsize=9)
    for a in (ax, zoom):
        a.set_xlabel("training step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sample_grid(path: Path, rows: list[tuple[str, Tensor]], header: str) -> Path:
    """Labelled rows of [0,1] images (N,3,H,W) with 2-pixel white gutters and a header line."""
    font = ImageFont.load_default()
    h, w = rows[0][1].shape[-2:]
    ncol = max(len(t) for _, t in rows)
    pad, label_w, head_h = 2, 8 + 6 * max(len(label) for label, _ in rows), 16
    label_w = max(label_w, 60)
    width, height = label_w + ncol * (w + pad) + pad, head_h + len(rows) * (h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), header, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        y0 = head_h + pad + r * (h + pad)
        draw.text((4, y0 + h // 2 - 6), label, fill="black", font=font)
        arr = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255 + 0.5).astype(np.uint8)
        for c, a in enumerate(arr):
            canvas.paste(Image.fromarray(a), (label_w + pad + c * (w + pad), y0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _closer(tok: dict, ini: dict) -> str:
    better = [k.upper() for k in ("psnr", "ssim") if tok[k] > ini[k]]
    return "yes (both)" if len(better) == 2 else f"{better[0]} only" if better else "no"


def _fastest(steps: dict[str, int | None]) -> str:
    reached = {k: v for k, v in steps.items() if v is not None}
    if not reached:
        return "none reached it"
    best = min(reached.values())
    first = [k for k, v in reached.items() if v == best]
    return "all the same" if len(first) == len(steps) else f"{', '.join(first)} first"


def _goal_lines(res: dict) -> list[str]:
    runs, init, goal = res["runs"], res["init_word"], GOAL_DROP_PERCENT
    lines = []
    for name in runs:
        d, sd = runs[name]["drop_percent"], _fmt(runs[name]["drop_std"], ".2f")
        lines.append(f"- loss drop ≥ {goal:g}% ({name}): {d:.1f}% (std over seeds {sd} points) → "
                     f"**{'met' if d >= goal else 'not met'}**")
    ini = init["resemblance"]
    for name in runs:
        tok = runs[name]["resemblance"]
        lines.append(f"- {name} token samples resemble the concept more than init-word samples: PSNR "
                     f"{tok['psnr']:.2f} vs {ini['psnr']:.2f} dB (Δ {tok['psnr'] - ini['psnr']:+.2f}), SSIM "
                     f"{tok['ssim']:.3f} vs {ini['ssim']:.3f} (Δ {tok['ssim'] - ini['ssim']:+.3f}) → "
                     f"**{_closer(tok, ini)}**")
    for t in res["targets"]:
        each = ", ".join(f"{k} {v}" for k, v in t["steps"].items())
        lines.append(f"- steps to {t['name']} (loss ≤ {t['loss']:.5f}): {each} → "
                     f"**{_fastest(t['steps'])}** (resolution {res['settings']['eval_every']} steps)")
    settings = res["settings"]
    drops = ", ".join(f"{_fmt(r['drop_std'], '.2f')} points ({k})" for k, r in runs.items())
    lines.append(f"- estimate noise ({settings['draws']} draws, {settings['std_seeds']} seeds): "
                 f"std of L(init word) {_fmt(init['std'])} ({_fmt(100 * init['std'] / init['loss'], '.2f')}% "
                 f"of it); std of the paired drop {drops}")
    return lines


def _edit_note(init: dict) -> str:
    if "edits" not in init:
        return ""
    edits = ", ".join(f"`{e}`" for e in init["edits"]["edits"])
    return (f"Edit gain: for the edits {edits}, samples of the prompt with the edit are scored by the model: "
            "L(samples | prompt without the edit) − L(samples | prompt with the edit), init word in both "
            "scoring prompts, same draws; mean over the edits. Editability = a token's gain / the init "
            "word's (1: the edit shows as with the plain word).")


def write_markdown(path: Path, res: dict) -> Path:
    s, c, init, runs = res["settings"], res["concept"], res["init_word"], res["runs"]
    out = [f"# Textual inversion on the held-out concept '{c['name']}'", "",
           f"Model `{res['model']}`, {len(c['files'])} concept images at {s['size']}×{s['size']}, "
           f"initializer '{init['word']}', token `{s['token']}`; every run: {s['steps']} steps, "
           f"lr {s['lr']}, batch {s['batch_size']}, seed {s['seed']}. Concept loss: prompt template "
           f"`{s['template']}`, {s['draws']} fixed (t, ε) draws (seed {s['seed']}); std over "
           f"{s['std_seeds']} seeds. "
           f"Device {s['device']}, total {res['wall_time_s']:.0f} s.", "",
           "| prompt | concept loss | std over seeds | drop vs init word (%, ± std over seeds) | "
           "PSNR max-over-concept (dB) | SSIM | edit gain | editability |",
           "|---|---:|---:|---:|---:|---:|---:|---:|",
           f"| init word `{init['prompt']}` | {init['loss']:.5f} | {_fmt(init['std'])} | 0 | "
           f"{init['resemblance']['psnr']:.2f} | {init['resemblance']['ssim']:.3f} | "
           f"{_fmt(init.get('edits', {}).get('gain'))} | 1 |"]
    for name, r in runs.items():
        edits = r.get("edits", {})
        out.append(f"| {name} token (step {r['steps_done']}) | {r['final_loss']:.5f} | "
                   f"{_fmt(r['final_std'])} | {r['drop_percent']:.2f} ± {_fmt(r['drop_std'], '.2f')} | "
                   f"{r['resemblance']['psnr']:.2f} | {r['resemblance']['ssim']:.3f} | "
                   f"{_fmt(edits.get('gain'))} | {_fmt(edits.get('editability'), '.2f')} |")
    for name, r in res["references"].items():
        out.append(f"| reference, {name}: {r['prompt']} | {r['loss']:.5f} | — | {r['drop_percent']:.2f} "
                   "| — | — | — | — |")
    out += ["", "References (same draws, so paired; not goals): the template with no word, and each concept "
                "image under its own caption, words the model never saw with these images. They show how far "
                "any prompt lowers this loss on this model.", "",
            _edit_note(init), "",
            "Steps to a common target (first curve point at or below it):", "",
            "| target | loss | " + " | ".join(runs) + " |", "|---|---:|" + "---:|" * len(runs)]
    for t in res["targets"]:
        out.append(f"| {t['name']} | {t['loss']:.5f} | " + " | ".join(str(v) for v in t["steps"].values())
                   + " |")
    out += ["", f"Samples: {s['n_samples']} per prompt, DDIM {s['sample_steps']} steps, guidance "
                f"{s['guidance']}, seed {s['seed']} (same starting noise for every prompt).", "",
            "## Goals (computed)", "",
            *_goal_lines(res), "", "![loss curves](loss_curves.png)", "", "![samples](samples.png)", "",
            "Command: `" + " ".join(res["command"]) + "`" if res.get("command") else ""]
    path.write_text("\n".join(out) + "\n")
    return path


# ------------------------------------------------------------------------------------------------- driver


@dataclass
class _Setup:
    """What the two runs share (built once by :func:`evaluate_personalization`)."""

    model: str | None
    device: str
    images: Tensor  # the concept images, [0, 1]
    template: str
    word: str  # the initializer word
    base: dict  # TextualInversionConfig fields of both runs (without initializer / cross_init)
    seed: int
    samples: int
    std_seeds: int
    eval_every: int
    out: Path
    quiet: bool
    runs: tuple[str, ...] = DEFAULT_RUNS  # names of RUN_OPTIONS


def _check_settings(options: dict, template: str | None, model: str | None, **counts: int) -> str:
    """Options the evaluation sets itself are refused; the counts must be integers with their minimum
    (``std_seeds`` >= 2, the rest >= 1) and ``eval_every`` <= ``steps``. Returns the prompt template (by
    default the model's), checked to hold one ``{}``."""
    fixed = sorted(_FIXED_OPTIONS & set(options))
    if fixed:
        raise StudioError(f"option {fixed[0]!r} is set by the evaluation itself (use its own argument)")
    for name, value in counts.items():
        low = 2 if name == "std_seeds" else 1
        if not isinstance(value, int) or value < low:
            raise StudioError(f"{name} must be an integer >= {low}, got {value!r}")
    if counts["eval_every"] > counts["steps"]:
        raise StudioError(f"eval_every {counts['eval_every']} is larger than steps {counts['steps']}; the "
                          "curve would have no point")
    if template is None:
        template = prompt_template(model)
    if template.count("{}") != 1:
        raise StudioError(f"template must contain one '{{}}' for the token/word, got {template!r}")
    return template


def _check_runs(runs, edits) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The runs (names of :data:`RUN_OPTIONS`, at least one, no repeats) and the edit templates (one ``{}``
    each), checked."""
    runs = tuple(runs)
    unknown = [r for r in runs if r not in RUN_OPTIONS]
    if not runs or unknown or len(set(runs)) != len(runs):
        raise StudioError(f"runs must be distinct names of {', '.join(RUN_OPTIONS)}, got {', '.join(runs)}")
    if isinstance(edits, str):
        raise StudioError(f"edits must be a list of templates, got the string {edits!r}")
    for e in edits:
        try:
            ok = e.count("{}") == 1 and bool(e.format("x"))
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise StudioError(f"each edit must contain one '{{}}' for the token/word, got {e!r}")
    return runs, tuple(edits)


def _concept_images(pipe, examples: str | Path, concept: str | None,
                    init_word: str | None) -> tuple[int, Concept, str, Tensor]:
    """The model's image size, the chosen concept, the initializer word and the concept images ([0, 1],
    preprocessed as training does)."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    chosen = pick_concept(list_concepts(examples, size), concept)
    word = pick_init_word(pipe.tokenizer, chosen, init_word)
    images = (_load_images([str(p) for p in chosen.files], size) + 1) / 2
    return size, chosen, word, images


def _reference_losses(pipe, setup: _Setup, captions: list[str]) -> dict:
    """The loss under the template with no word, and under each image's own caption (same draws)."""
    template, images, seed, samples = setup.template, setup.images, setup.seed, setup.samples
    no_word, own = template.format("").strip(), [template.format(c) for c in captions]
    return {"no word": {"prompt": repr(no_word),
                        "loss": concept_loss(pipe, images, no_word, seed=seed, samples=samples)},
            "own captions": {"prompt": f"each image's caption in `{template}`",
                             "loss": concept_loss(pipe, images, own, seed=seed, samples=samples)}}


def _train_runs(setup: _Setup, step0: dict, init_losses: list[float]) -> tuple[dict, dict]:
    """Every run of ``setup.runs`` (plain, Cross-Init, XTI): their curves, final losses (``std_seeds``
    seeds), drops and timings; and their trained pipelines."""
    res_runs, pipes = {}, {}
    for name in setup.runs:
        if not setup.quiet:
            print(f"{name}: training {setup.base['steps']} steps", flush=True)
        cfg = make_config({**setup.base, "initializer": setup.word, **RUN_OPTIONS[name],
                           "output_dir": str(setup.out / name)})
        pipe, curve, summary, conditioning = _train_run(
            setup.model, setup.device, setup.images, cfg, setup.template, setup.seed, setup.samples,
            setup.eval_every, step0[name], setup.quiet)
        t1 = time.perf_counter()
        finals = loss_with_std(pipe, setup.images, token_prompt(setup.template, cfg), setup.seed,
                               setup.samples, setup.std_seeds, **conditioning)
        drops = [100 * (a - b) / a for a, b in zip(init_losses, finals)]
        if curve[-1]["step"] != summary["step"]:  # steps not a multiple of eval_every: close the curve
            curve.append({"step": summary["step"], "loss": finals[0],
                          "train_loss": summary["loss_history"][-1]})
        pipes[name] = pipe
        res_runs[name] = {
            "cross_init": cfg.cross_init, "per_layer": cfg.per_layer, "neti": cfg.neti, "config": asdict(cfg),
            "curve": curve,
            "steps_done": summary["step"],
            "final_loss": finals[0], "final_losses_by_seed": finals, "final_std": _std(finals),
            "drop_percent": drops[0], "drop_std": _std(drops), "train_loss_history": summary["loss_history"],
            "train_time_s": summary["train_time_s"], "curve_eval_time_s": summary["curve_eval_time_s"],
            "final_eval_time_s": time.perf_counter() - t1, "embeddings": summary["embeddings"]}
    return res_runs, pipes


def _targets(init: dict, res_runs: dict) -> list[dict]:
    """The steps each run needs to reach the first run's (plain's) final loss and 70 % of its drop."""
    first = next(iter(res_runs))
    final = res_runs[first]["final_loss"]
    targets = []
    for name, value in ((f"{first}_final", final),
                        (f"70%_of_{first}_drop", init["loss"] - 0.7 * (init["loss"] - final))):
        targets.append({"name": name, "loss": value,
                        "steps": {r: steps_to_reach(res_runs[r]["curve"], value) for r in res_runs}})
    return targets


def _sample_rows(setup: _Setup, pipes: dict, token_text: str, token: str, init: dict, res_runs: dict,
                 gen: dict) -> tuple[list[tuple[str, Tensor]], float]:
    """Samples of each run's token prompt and of the init-word prompt (their resemblance stored into
    ``res_runs`` / ``init``): the rows of ``samples.png``, and the time taken."""
    start = time.perf_counter()
    grid_rows = [(f"concept ({len(setup.images)})", setup.images)]
    for name in res_runs:
        imgs = generate(token_text, pipe=pipes[name], embeddings=_own_file(res_runs[name]), **gen)
        res_runs[name]["resemblance"] = resemblance(imgs, setup.images)
        grid_rows.append((f"{name} {token}", imgs))
    first = pipes[next(iter(res_runs))]  # the token's rows do not affect a prompt without it
    imgs = generate(init["prompt"], pipe=first, **gen)
    init["resemblance"] = resemblance(imgs, setup.images)
    grid_rows.append((f"init word '{setup.word}'", imgs))
    return grid_rows, time.perf_counter() - start


def _samples_and_edits(setup: _Setup, pipes: dict, cfg, init: dict, res_runs: dict, gen: dict,
                       edits: tuple[str, ...]) -> tuple[list[tuple[str, Tensor]], float]:
    """:func:`_sample_rows` and (with ``edits``) :func:`_editability`: the grid rows and their time."""
    token_text = token_prompt(setup.template, cfg)
    grid_rows, seconds = _sample_rows(setup, pipes, token_text, cfg.placeholder, init, res_runs, gen)
    if edits:
        token_word = expand_prompt(cfg.placeholder, cfg.placeholder, cfg.num_vectors)
        seconds += _editability(setup, pipes, token_word, init, res_runs, gen, edits)
    return grid_rows, seconds


def _own_file(run: dict) -> list[str]:
    """A per-layer (XTI) or NeTI run's embedding file, which :func:`generate` needs to sample it per layer;
    [] for the others (their token is already in the pipeline's tokenizer)."""
    return [run["embeddings"]] if run["per_layer"] or run.get("neti") else []


def _editability(setup: _Setup, pipes: dict, token_word: str, init: dict, res_runs: dict, gen: dict,
                 edits: tuple[str, ...]) -> float:
    """The editability score of every run (stored into ``res_runs`` / ``init``); returns the time taken.

    For an edit E (``"{}: dark skin tone"``) samples are made with ``template(E(token))`` and, as the
    reference, ``template(E(init word))``. The edit's *gain* on samples S is how much the edit's words lower
    the model's own diffusion loss of S: L(S | template(word)) − L(S | template(E(word))), over the same
    fixed draws (the scoring prompts hold no learned token, so the base model scores every run alike). A
    run's editability = its mean gain / the init word's mean gain: 1 means the edit shows as well as with
    the plain word, 0 that the token ignores it."""
    start, first = time.perf_counter(), pipes[next(iter(res_runs))]

    def gain(samples: Tensor, e: str) -> float:
        return edit_gain(first, samples, setup.template, setup.word, e, setup.seed, setup.samples)

    word_gains = [gain(generate(setup.template.format(e.format(setup.word)), pipe=first, **gen), e)
                  for e in edits]
    init["edits"] = {"edits": list(edits), "gains": word_gains, "gain": float(np.mean(word_gains))}
    for name, run in res_runs.items():
        gains = [gain(generate(setup.template.format(e.format(token_word)), pipe=pipes[name],
                               embeddings=_own_file(run), **gen), e) for e in edits]
        run["edits"] = {"gains": gains, "gain": float(np.mean(gains)),
                        "editability": float(np.mean(gains) / init["edits"]["gain"])
                        if init["edits"]["gain"] > 0 else float("nan")}
    return time.perf_counter() - start


def edit_gain(pipe, samples: Tensor, template: str, word: str, edit: str, seed: int, draws: int) -> float:
    """How much ``edit``'s words lower ``pipe``'s diffusion loss of ``samples``: L(template(word)) −
    L(template(edit(word))), over the draws fixed by ``seed`` (the prompts name no learned token)."""
    def loss(prompt: str) -> float:
        return concept_loss(pipe, samples, prompt, seed=seed, samples=draws)
    return loss(template.format(word)) - loss(template.format(edit.format(word)))


def _goal(init: dict, res_runs: dict) -> dict:
    return {"drop_percent": GOAL_DROP_PERCENT,
            "drop_met": {r: res_runs[r]["drop_percent"] >= GOAL_DROP_PERCENT for r in res_runs},
            "psnr_above_init": {r: res_runs[r]["resemblance"]["psnr"] > init["resemblance"]["psnr"]
                                for r in res_runs},
            "ssim_above_init": {r: res_runs[r]["resemblance"]["ssim"] > init["resemblance"]["ssim"]
                                for r in res_runs}}


def _results(model: str | None, chosen: Concept, settings: dict, init: dict, res_runs: dict,
             targets: list[dict], references: dict) -> dict:
    """The results dict, up to the timings, machine and command (added last, in that order)."""
    return {
        "kind": "personalization-eval", "model": model or default_model(TEXT_TO_IMAGE),
        "concept": {"name": chosen.name, "captions": chosen.captions,
                    "files": [str(p) for p in chosen.files]},
        "settings": settings,
        "init_word": init, "runs": res_runs, "targets": targets,
        "references": {k: {**v, "drop_percent": 100 * (init["loss"] - v["loss"]) / init["loss"]}
                       for k, v in references.items()},
        "goal": _goal(init, res_runs),
    }


def _machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()}


def _write_outputs(out: Path, res: dict, grid_rows: list[tuple[str, Tensor]], start: float) -> None:
    s = res["settings"]
    out.mkdir(parents=True, exist_ok=True)
    write_loss_plot(out / "loss_curves.png", res)
    write_sample_grid(out / "samples.png", grid_rows, f"seed {s['seed']}, DDIM {s['sample_steps']} steps, "
                      f"guidance {s['guidance']:g}, prompt '{s['template']}'")
    res["wall_time_s"] = time.perf_counter() - start
    write_json_atomic(res, out / "results.json")
    write_markdown(out / "results.md", res)


def evaluate_personalization(
    model: str | None = None,
    concept: str | None = None,
    *,
    examples: str | Path = DEFAULT_EXAMPLES,
    init_word: str | None = None,
    token: str = "<concept>",
    steps: int = 300,
    lr: float = 5e-3,
    batch_size: int | None = None,
    eval_every: int = 25,
    samples: int = 240,
    std_seeds: int = 3,
    n_samples: int = 8,
    sample_steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
    template: str | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
    quiet: bool = True,
    options: dict | None = None,
    command: list[str] | None = None,
    runs: tuple[str, ...] | list[str] = DEFAULT_RUNS,
    edits: tuple[str, ...] | list[str] = DEFAULT_EDITS,
) -> dict:
    """Train ``token`` on the concept once per run of ``runs`` (names of :data:`RUN_OPTIONS`) and measure
    loss drop, resemblance and editability (``edits``: templates with one ``{}``; empty: no score).

    ``batch_size`` defaults to the number of concept images. ``options`` are further
    :class:`~studio.training.textual_inversion.TextualInversionConfig` fields (``cross_init_reg``,
    ``hflip``, …), shared by every run. Returns the results dict that is also written to
    ``out/results.json``.
    """
    options = dict(options or {})
    runs, edits = _check_runs(runs, edits)
    template = _check_settings(options, template, model, steps=steps, eval_every=eval_every, samples=samples,
                               std_seeds=std_seeds, n_samples=n_samples, sample_steps=sample_steps)
    start = time.perf_counter()
    pipe0 = load_sd_pipeline(model, device)  # tokenizer, image size, init-word and step-0 losses
    size, chosen, word, images = _concept_images(pipe0, examples, concept, init_word)
    batch = batch_size or len(images)
    out = Path(out or f"runs/personalize-eval/{re.sub(r'[^a-z0-9]+', '-', chosen.name.lower()).strip('-')}")
    base = {"placeholder": token, "steps": steps, "lr": lr, "batch_size": batch, "seed": seed,
            "validate_every": 0, "checkpoint_every": steps, "templates": (template,), **options}
    cfg0 = make_config({**base, "initializer": word})  # unknown options fail here, before any training
    for run in runs:  # and every run's own settings (XTI with num_vectors 2, bad CoRe templates, ...)
        check_config(make_config({**base, "initializer": word, **RUN_OPTIONS[run]}))
    draws = math.ceil(samples / len(images)) * len(images)
    if not quiet:
        print(f"personalize-eval: concept '{chosen.name}' ({len(images)} images), init word '{word}', "
              f"{draws} draws per loss", flush=True)
    setup = _Setup(model, device, images, template, word, base, seed, samples, std_seeds, eval_every, out,
                   quiet, runs)

    t0 = time.perf_counter()
    step0, init_losses = _initial_token_losses(pipe0, images, base, word, template, seed, samples, std_seeds)
    # after the token is added (a taken token name fails before any work); neither prompt contains it
    references = _reference_losses(pipe0, setup, chosen.captions)
    del pipe0
    init = {"word": word, "prompt": template.format(word), "loss": init_losses[0],
            "losses_by_seed": init_losses, "std": _std(init_losses), "eval_time_s": time.perf_counter() - t0}
    res_runs, pipes = _train_runs(setup, step0, init_losses)
    targets = _targets(init, res_runs)

    gen = dict(n=n_samples, steps=sample_steps, guidance=guidance, seed=seed)
    grid_rows, sample_time = _samples_and_edits(setup, pipes, cfg0, init, res_runs, gen, edits)

    settings = {"token": token, "steps": steps, "lr": lr, "batch_size": batch, "seed": seed,
                "eval_every": eval_every, "samples": samples, "draws": draws, "std_seeds": std_seeds,
                "template": template, "n_samples": n_samples, "sample_steps": sample_steps,
                "guidance": guidance, "size": size, "device": device, "threads": torch.get_num_threads(),
                "options": options, "runs": list(runs), "edits": list(edits)}
    res = _results(model, chosen, settings, init, res_runs, targets, references)
    res["sample_time_s"], res["wall_time_s"] = sample_time, time.perf_counter() - start
    res["machine"], res["command"] = _machine(), command
    _write_outputs(out, res, grid_rows, start)
    res["out"] = str(out)
    return res
