"""``studio bench-inversion``: how faithfully DDIM, Newton–Raphson and null-text inversion reconstruct real
images, and at what cost (what edits look like: ``studio edit-strip``, :mod:`studio.eval.edit_strip`).

For each image (default: the held-out emoji at 64x64, prompt = its caption from ``captions.json``), each
(method, guidance) setting and each step count, the image is encoded (x → z_0 = E(x)), inverted under its
prompt, regenerated with the same prompt and guidance (:func:`solvers.inversion.ddim.regenerate`; null-text
uses its per-step unconditional embeddings) and decoded. Every finished run is appended to
``results.jsonl`` at once, so an interrupted bench restarted with the same ``--out`` skips what is done.

What is measured, per run:

* **PSNR / SSIM** of the reconstruction D(regenerate(invert(E(x)))) against the input x ([0, 1] images,
  :mod:`studio.core.metrics`), and against the VAE round trip D(E(x)) — the ceiling of any latent inversion,
  so ``psnr_vs_vae`` isolates the inversion's own error. The round trip's PSNR against x is reported per
  image (``vae_psnr``).
* **NFE**: UNet evaluations actually performed in inversion + regeneration, counted by a forward hook on
  the prior's UNet (not taken from the solvers): every forward adds its batch size, so a classifier-free
  guidance step (unconditional and conditional rows in *one* batched call) counts **2** — the solvers'
  own convention, cross-checked against their records (``nfe_reported``). ``unet_calls`` counts forward
  invocations instead (a CFG step counts 1). ``grad_nfe`` counts the evaluations made with autograd on
  (null-text's inner optimisation; each is followed by one backward pass, not counted separately).
* **wall time**: inversion + regeneration in latent space (``time.perf_counter``, CUDA synchronised); the
  VAE encode/decode (the same for every method) and the metrics are excluded.
* **peak memory**: :class:`studio.eval.bench.measure.PeakMemory` (CUDA ``max_memory_allocated``; on CPU the
  sampled resident-set increase, approximate).

Guidance settings (``--guidance``): ``auto`` runs each method at its own default — DDIM and Newton at w = 1
(exact-inversion comparison: the conditional branch only), null-text at w = 7.5 (it exists to make guided
reconstruction faithful; ``studio.workflows.editing.INVERTERS``) — and a number runs every method at that w.
Null-text inversion at w = 1 is skipped: there the null embedding has no effect on the guided prediction
(its gradient is (1 − w)·∂ε_∅ = 0) and the method is DDIM inversion with extra cost.

DDIM is cheap per step, so by default it also runs at 2x, 4x and 8x the largest step count: its
PSNR-vs-NFE curve then spans Newton's NFE, and the "Newton − DDIM at equal NFE" line in ``results.md``
interpolates DDIM's mean PSNR linearly in log NFE at Newton's mean NFE.

Outputs in ``out``: ``results.jsonl``, ``results.json`` (rows + summary + machine info + command),
``results.md`` (table, conventions, goal checks), ``psnr_vs_nfe.png``, ``psnr_vs_time.png`` and
``outputs/<image>/<method>-w<g>-n<steps>.png`` (each reconstruction).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shlex
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from models.registry import TEXT_TO_IMAGE, default_model
from solvers.inversion.ddim import regenerate
from studio.core import paths
from studio.core.conventions import to_image, to_model
from studio.core.errors import StudioError
from studio.core.io import load_image, save_image, write_json_atomic
from studio.core.metrics import image_metrics
from studio.eval.bench.measure import NetworkTimer, PeakMemory, sync_device
from studio.eval.bench.records import append_jsonl, machine_info, read_jsonl, safe_name
from studio.eval.bench.report import fmt
from studio.eval.bench.summary import mean_std
from studio.training.model_card import EXAMPLES_DIR, captions_by_file
from studio.workflows.editing import INVERTERS, check_image, latent_prior_for, method_params

Tensor = torch.Tensor

DEFAULT_STEPS = (5, 10, 20, 50)
DEFAULT_METHODS = ("ddim", "newton", "null-text")
DEFAULT_SIZE = 64
DDIM_EXTRA_FACTORS = (2, 4, 8)  # "auto" DDIM step counts: these multiples of the largest step count


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class InversionImage:
    name: str
    image: Tensor  # (1, 3, H, W) in [0, 1]
    prompt: str


def load_inversion_images(folder: str | None = None, limit: int | None = None, size: int = DEFAULT_SIZE,
                          prompt: str | None = None) -> list[InversionImage]:
    """The held-out emoji at ``size`` (32 or 64) with their captions, or the PNGs of ``folder`` (sorted; the
    prompt is the file's caption from ``folder/captions.json`` when present, else empty); the first
    ``limit``. ``prompt`` replaces every caption."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise StudioError(f"--limit must be a positive integer, got {limit!r}")
    if folder is None:
        if size not in (32, 64):
            raise StudioError(f"the held-out emoji come at 32 or 64 px, got size {size!r}")
        root = paths.resolve_shipped(EXAMPLES_DIR)
        entries = json.loads((root / "captions.json").read_text(encoding="utf-8"))[:limit]
        files = [root / e["files"][str(size)] for e in entries]
        captions = [e["caption"] for e in entries]
    else:
        root = Path(folder)
        if not root.is_dir():
            raise StudioError(f"--images must be a folder of PNG images, got '{folder}'")
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".png")[:limit]
        if not files:
            raise StudioError(f"--images folder '{folder}' contains no PNG images")
        by_file = captions_by_file(root)
        captions = [by_file.get(p.name, "") for p in files]
    return [InversionImage(p.stem, load_image(p), caption if prompt is None else prompt)
            for p, caption in zip(files, captions)]


def parse_int_list(text: str | Iterable[int] | None, what: str, default: Sequence[int]) -> list[int]:
    """``"5,10,20"`` or ``[5, 10, 20]`` → positive integers (duplicates dropped, order kept)."""
    if text is None:
        return list(default)
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        if isinstance(item, bool) or not s.lstrip("+").isdigit() or int(s) <= 0:
            raise StudioError(f"{what} must be positive integers, got {item!r}")
        out.append(int(s))
    if not out:
        raise StudioError(f"{what} is empty: {text!r}")
    return list(dict.fromkeys(out))


def parse_methods(text: str | Iterable[str] | None) -> list[str]:
    if text is None:
        return list(DEFAULT_METHODS)
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s and s.strip()]
    if not items:
        raise StudioError(f"--methods is empty: {text!r}")
    for m in items:
        if m not in INVERTERS:
            raise StudioError(f"unknown inversion method {m!r} (available: {', '.join(INVERTERS)})")
    return list(dict.fromkeys(items))


def parse_guidance(text: str | float | Iterable[Any] | None) -> list[float | None]:
    """``"auto,7.5"`` → ``[None, 7.5]``: ``auto`` (None) is each method's default guidance."""
    if text is None:
        return [None]
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        items: list[Any] = [text]
    else:
        items = text.split(",") if isinstance(text, str) else list(text)
    out: list[float | None] = []
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        if item is None or s.lower() == "auto":
            out.append(None)
            continue
        try:
            w = float(s)
        except ValueError:
            raise StudioError(f"--guidance takes numbers or 'auto', got {item!r}") from None
        if not (w >= 0 and math.isfinite(w)):
            raise StudioError(f"guidance must be a finite number >= 0, got {item!r}")
        out.append(w)
    if not out:
        raise StudioError(f"--guidance is empty: {text!r}")
    return list(dict.fromkeys(out))


def method_settings(
    methods: list[str], guidances: list[float | None], notes: list[str]
) -> list[tuple[str, float]]:
    """(method, guidance) pairs to run, without duplicates (``auto`` → the method's default); null-text at
    w = 1 is dropped with a note."""
    pairs: list[tuple[str, float]] = []
    for g in guidances:
        for m in methods:
            w = float(INVERTERS[m][1] if g is None else g)
            if m == "null-text" and w == 1.0:
                note = ("null-text at guidance 1 skipped: the null embedding does not change the w = 1 "
                        "prediction, so it is DDIM inversion with extra cost")
                if note not in notes:
                    notes.append(note)
                continue
            if (m, w) not in pairs:
                pairs.append((m, w))
    if not pairs:
        raise StudioError("no (method, guidance) setting left to run")
    return pairs


def parse_method_params(overrides: Iterable[str], methods: list[str]) -> dict[str, dict]:
    """``["newton.newton_steps=3", "null-text.inner_steps=5"]`` → ``{method: {key: value}}``, each value
    checked against the method's signature (:func:`studio.workflows.editing.method_params`); unknown keys
    are rejected with the method's known parameters."""
    out: dict[str, dict] = {m: {} for m in methods}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        method, dot, param = key.partition(".")
        if "=" not in item or not dot or method not in INVERTERS or not param:
            raise StudioError(f"inversion overrides are method.key=value (methods: {', '.join(INVERTERS)}), "
                              f"got {item!r}")
        if param in ("steps", "guidance", "prompt", "strength"):
            raise StudioError(f"{key} is set by the bench itself (--steps / --guidance / captions), "
                              "not by an override")
        known = [k for k in inspect.signature(INVERTERS[method][0]).parameters if k not in ("prior", "z0")]
        if param not in known:
            raise StudioError(f"unknown {method} parameter {param!r} (known: {', '.join(known)})")
        value = method_params(method, [f"{param}={item.split('=', 1)[1]}"])[param]
        out.setdefault(method, {})[param] = value
    return out


def auto_ddim_steps(steps_list: list[int], num_train_timesteps: int) -> list[int]:
    """``steps_list`` plus :data:`DDIM_EXTRA_FACTORS` × its largest entry (up to the training timesteps)."""
    top = max(steps_list)
    extra = [f * top for f in DDIM_EXTRA_FACTORS if f * top <= num_train_timesteps]
    return sorted(set(steps_list) | set(extra))


# ----------------------------------------------------------------------------------------- measurement


def time_unet(prior, latent_shape: tuple[int, ...], device: str, repeats: int = 5) -> dict[str, float]:
    """Seconds for one UNet forward at batch 1 (``t_unet_s``) and batch 2 (``t_unet_cfg_s``, one CFG step):
    median of ``repeats`` after a warm-up, at the middle timestep (also warms the model up for the bench)."""
    z = torch.randn(1, *latent_shape[1:], generator=torch.Generator().manual_seed(0)).to(prior.device)
    cond, uncond = prior.embed("timing"), prior.embed("")
    t = prior.num_train_timesteps // 2
    out = {}
    for key, u, w in (("t_unet_s", None, 1.0), ("t_unet_cfg_s", uncond, 7.5)):
        times = []
        for i in range(repeats + 1):
            sync_device(device)
            start = time.perf_counter()
            with torch.no_grad():
                prior.model_output(z, t, cond, u, w)
            sync_device(device)
            if i:
                times.append(time.perf_counter() - start)
        out[key] = statistics.median(times)
    return out


def output_path(out: Path, image: str, method: str, guidance: float, steps: int) -> Path:
    return out / "outputs" / safe_name(image) / f"{safe_name(method)}-w{guidance:g}-n{steps}.png"


ROW_FIELDS = (
    "image", "prompt", "method", "guidance", "steps", "status", "psnr", "ssim", "psnr_vs_vae", "ssim_vs_vae",
    "vae_psnr", "vae_ssim", "nfe", "unet_calls", "grad_nfe", "inversion_nfe", "regeneration_nfe",
    "nfe_reported", "wall_time_s", "inversion_time_s", "regeneration_time_s", "peak_memory_mb", "memory_kind",
    "params", "output", "error", "settings",
)


def _row(**values) -> dict:
    row = {k: None for k in ROW_FIELDS}
    row.update(values)
    return row


def run_key(row: dict) -> tuple:
    return (row["image"], row["method"], float(row["guidance"]), int(row["steps"]))


@dataclass
class Encoded:
    """One bench image in latent space, with its VAE round trip (computed once per image)."""

    item: InversionImage
    z0: Tensor
    vae_image: Tensor  # D(E(x)) in [0, 1], on CPU
    vae_metrics: dict


def encode_image(prior, item: InversionImage) -> Encoded:
    image = check_image(item.image)
    with torch.no_grad():
        z0 = prior.encode(to_model(image.to(prior.device)))
        vae = to_image(prior.decode(z0)).clamp(0, 1).cpu()
    return Encoded(item, z0, vae, image_metrics(vae, image))


def run_one(prior, enc: Encoded, method: str, guidance: float, steps: int, params: dict, device: str,
            out: Path, settings: str) -> dict:
    """Invert + regenerate one image with one setting; metrics, counted NFE, time, memory; image saved."""
    fn = INVERTERS[method][0]
    base = dict(image=enc.item.name, prompt=enc.item.prompt, method=method, guidance=guidance, steps=steps,
                params=params, settings=settings, vae_psnr=enc.vae_metrics["psnr"],
                vae_ssim=enc.vae_metrics["ssim"])
    try:
        with PeakMemory(device) as mem, NetworkTimer(prior.unet, device) as count:
            sync_device(device)
            start = time.perf_counter()
            inv = fn(prior, enc.z0, prompt=enc.item.prompt, guidance=guidance, steps=steps, **params)
            sync_device(device)
            mid = time.perf_counter()
            inversion_nfe = count.samples
            z = regenerate(prior, inv)
            sync_device(device)
            end = time.perf_counter()
        with torch.no_grad():
            rec = to_image(prior.decode(z)).clamp(0, 1).cpu()
        metrics = image_metrics(rec, enc.item.image)
        vs_vae = image_metrics(rec, enc.vae_image)
    except StudioError as err:  # e.g. NaN in the reconstruction: recorded, the bench goes on
        return _row(**base, status="failed", error=str(err))
    path = output_path(out, enc.item.name, method, guidance, steps)
    save_image(rec, path)
    return _row(
        **base, status="ok", psnr=metrics["psnr"], ssim=metrics["ssim"], psnr_vs_vae=vs_vae["psnr"],
        ssim_vs_vae=vs_vae["ssim"], nfe=count.samples, unet_calls=count.calls, grad_nfe=count.grad_samples,
        inversion_nfe=inversion_nfe, regeneration_nfe=count.samples - inversion_nfe,
        nfe_reported=inv.record.get("nfe"), wall_time_s=end - start, inversion_time_s=mid - start,
        regeneration_time_s=end - mid, peak_memory_mb=mem.mb, memory_kind=mem.kind,
        output=str(path.relative_to(out)),
    )


# ------------------------------------------------------------------------------------------ summaries


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (method, guidance, steps): means ± stds over images; sorted by method, guidance,
    steps."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], float(r["guidance"]), int(r["steps"])), []).append(r)
    out = []
    for (method, guidance, steps), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        e: dict[str, Any] = {"method": method, "guidance": guidance, "steps": steps, "runs": len(ok),
                             "failed": len(rs) - len(ok)}
        for key in ("psnr", "ssim", "psnr_vs_vae", "ssim_vs_vae", "nfe", "unet_calls", "grad_nfe",
                    "wall_time_s", "inversion_time_s", "regeneration_time_s"):
            e[key], e[key + "_std"] = mean_std([r[key] for r in ok])
        mems = [r["peak_memory_mb"] for r in ok if r["peak_memory_mb"] is not None]
        e["peak_memory_mb"] = max(mems) if mems else math.nan
        out.append(e)
    order = {m: i for i, m in enumerate(DEFAULT_METHODS)}
    return sorted(out, key=lambda e: (order.get(e["method"], 99), e["method"], e["guidance"], e["steps"]))


def vae_ceiling(rows: list[dict]) -> dict:
    """Mean ± std over images of the VAE round trip D(E(x)) against x (one value per image)."""
    per_image = {r["image"]: (r["vae_psnr"], r["vae_ssim"]) for r in rows if r.get("vae_psnr") is not None}
    psnr, psnr_std = mean_std([v[0] for v in per_image.values()])
    ssim, ssim_std = mean_std([v[1] for v in per_image.values()])
    return {"images": len(per_image), "psnr": psnr, "psnr_std": psnr_std, "ssim": ssim, "ssim_std": ssim_std}


def markdown_table(summary: list[dict], ceiling: dict) -> str:
    lines = [
        "| method | guidance | steps | runs | NFE | UNet calls | PSNR (dB) | SSIM | PSNR vs VAE (dB) | "
        "time (s) | peak mem (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| VAE round trip (ceiling) | – | – | {ceiling['images']} | 0 | 0 | "
        f"{fmt(ceiling['psnr'], '.2f')} ± {fmt(ceiling['psnr_std'], '.2f')} | "
        f"{fmt(ceiling['ssim'], '.3f')} ± {fmt(ceiling['ssim_std'], '.3f')} | ∞ | – | – |",
    ]
    for e in summary:
        runs = str(e["runs"]) + (f" ({e['failed']} failed)" if e["failed"] else "")
        lines.append(
            f"| {e['method']} | {e['guidance']:g} | {e['steps']} | {runs} | {fmt(e['nfe'], '.0f')} | "
            f"{fmt(e['unet_calls'], '.0f')} | {fmt(e['psnr'], '.2f')} ± {fmt(e['psnr_std'], '.2f')} | "
            f"{fmt(e['ssim'], '.3f')} ± {fmt(e['ssim_std'], '.3f')} | {fmt(e['psnr_vs_vae'], '.2f')} | "
            f"{fmt(e['wall_time_s'], '.3g')} | {fmt(e['peak_memory_mb'], '.1f')} |"
        )
    return "\n".join(lines)


def _curve(summary: list[dict], method: str, guidance: float) -> list[dict]:
    return sorted((e for e in summary if e["method"] == method and e["guidance"] == guidance
                   and e["runs"] and math.isfinite(e["psnr"]) and e["nfe"] > 0), key=lambda e: e["nfe"])


def psnr_at_nfe(curve: list[dict], nfe: float) -> tuple[float, str] | None:
    """Mean PSNR of a method's curve at ``nfe``: linear in log NFE between the bracketing points; None when
    ``nfe`` is outside the measured range."""
    for lo, hi in zip(curve, curve[1:] + [None]):
        if lo["nfe"] == nfe:
            return lo["psnr"], f"measured at steps {lo['steps']}"
        if hi is not None and lo["nfe"] < nfe < hi["nfe"]:
            f = (math.log(nfe) - math.log(lo["nfe"])) / (math.log(hi["nfe"]) - math.log(lo["nfe"]))
            return lo["psnr"] + f * (hi["psnr"] - lo["psnr"]), (
                f"interpolated between steps {lo['steps']} (NFE {lo['nfe']:.0f}) and {hi['steps']} "
                f"(NFE {hi['nfe']:.0f})")
    return None


def goal_checks(summary: list[dict]) -> list[str]:
    """The issue's two goals, computed from the summary (reported, never asserted):
    Newton − DDIM PSNR at equal NFE (same guidance), and the Newton time needed to reach null-text's
    PSNR."""
    lines = []
    newton_ws = sorted({e["guidance"] for e in summary if e["method"] == "newton"})
    for w in newton_ws:
        ddim = _curve(summary, "ddim", w)
        for e in _curve(summary, "newton", w):
            head = f"Newton w={w:g} steps {e['steps']} (NFE {e['nfe']:.0f}): {e['psnr']:.2f} dB"
            at = psnr_at_nfe(ddim, e["nfe"]) if ddim else None
            if at is None:
                span = f"NFE {ddim[0]['nfe']:.0f}–{ddim[-1]['nfe']:.0f}" if ddim else "no DDIM rows"
                lines.append(f"{head}; DDIM w={w:g} not measured at this NFE ({span}): "
                             "no equal-NFE comparison")
                continue
            diff = e["psnr"] - at[0]
            lines.append(f"{head}; DDIM w={w:g} at equal NFE {at[0]:.2f} dB ({at[1]}) → Newton − DDIM = "
                         f"{diff:+.2f} dB (goal ≥ +3 dB: {'met' if diff >= 3 else 'not met'})")
    for nt in (e for e in summary if e["method"] == "null-text" and e["runs"] and math.isfinite(e["psnr"])):
        head = (f"Null-text w={nt['guidance']:g} steps {nt['steps']}: {nt['psnr']:.2f} dB in "
                f"{nt['wall_time_s']:.3g} s")
        for w in newton_ws:
            reach = [e for e in _curve(summary, "newton", w) if e["psnr"] >= nt["psnr"]]
            if reach:
                best = min(reach, key=lambda e: e["wall_time_s"])
                lines.append(f"{head}; fastest Newton w={w:g} at ≥ that PSNR: steps {best['steps']}, "
                             f"{best['psnr']:.2f} dB in {best['wall_time_s']:.3g} s = "
                             f"{100 * best['wall_time_s'] / nt['wall_time_s']:.1f}% of null-text's time")
            else:
                curve = _curve(summary, "newton", w)
                top = max(curve, key=lambda e: e["psnr"]) if curve else None
                best = (f" (best: steps {top['steps']}, {top['psnr']:.2f} dB in {top['wall_time_s']:.3g} s)"
                        if top else "")
                lines.append(f"{head}; no Newton w={w:g} setting reaches it{best}")
    return lines


CONVENTIONS = (
    "Mean ± std over images. Each run: x → z₀ = E(x) → inversion under the image's caption → regeneration"
    " with the same prompt and guidance (deterministic DDIM; null-text with its per-step null embeddings)"
    " → D(z). PSNR/SSIM against the input x ([0, 1]); *PSNR vs VAE*: against the VAE round trip D(E(x)), "
    "the ceiling of any latent inversion (its own PSNR against x is the first row). **NFE**: UNet "
    "evaluations in inversion + regeneration, counted by a forward hook on the UNet, each forward adding "
    "its batch size — a classifier-free-guidance step (unconditional + conditional in one batched call) "
    "counts 2; *UNet calls* counts forward invocations (a CFG step counts 1). Null-text's inner "
    "optimisation steps are forwards with a backward pass each (`grad_nfe` in results.json), counted "
    "once. **time**: inversion + regeneration (latent space, `perf_counter`; VAE encode/decode and "
    "metrics excluded), mean. **peak mem**: the largest over the runs; CUDA `max_memory_allocated` "
    "(weights included), on CPU the sampled resident-set increase (approximate)."
)


def _header(meta: dict) -> str:
    m = meta["machine"]
    params = "; ".join(f"{k}: {json.dumps(v)}" for k, v in meta["method_params"].items() if v)
    params = params or "method defaults"
    t = meta.get("unet_timing") or {}
    timing = (f" One UNet forward: {t['t_unet_s'] * 1e3:.1f} ms at batch 1, "
              f"{t['t_unet_cfg_s'] * 1e3:.1f} ms at batch 2 (a CFG step)." if t else "")
    return (
        f"Model: `{meta['model_name']}`; {meta['images']} images ({meta['image_source']}), prompt = "
        f"{meta['prompt_source']}; device {m['device']} ({m.get('gpu') or m['cpu']}, {m['torch_threads']} "
        f"torch threads); torch {m['torch']}, diffusers {m['diffusers']}. Guidance settings: "
        f"{', '.join(meta['guidance_settings'])}. Method parameters: {params}.{timing}"
    )


def write_markdown(path: Path, table: str, meta: dict, checks: list[str]) -> None:
    lines = [
        "# studio bench-inversion", "", _header(meta), "", table, "", CONVENTIONS, "",
        "## Goal checks (computed from the table, not asserted)", "",
        *([f"* {c}" for c in checks] or ["* (nothing to compare: needs newton and ddim or null-text rows)"]),
        "",
        *(["## Notes", "", *[f"* {n}" for n in meta["notes"]], ""] if meta["notes"] else []),
        "## Command", "", "```", shlex.join(meta["command"]), "```", "",
        "Reconstructions: `outputs/<image>/<method>-w<guidance>-n<steps>.png`.", "",
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)


def write_plots(out: Path, summary: list[dict], ceiling: dict) -> None:
    """``psnr_vs_nfe.png`` and ``psnr_vs_time.png``: one line per (method, guidance) through the mean over
    images of each step count (labelled), log x; the VAE ceiling as a dashed line (stds are in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series = list(dict.fromkeys((e["method"], e["guidance"]) for e in summary))
    for key, fname, xlabel in (
        ("nfe", "psnr_vs_nfe.png", "NFE (UNet evaluations, inversion + regeneration; log)"),
        ("wall_time_s", "psnr_vs_time.png", "wall time per image (s, log)"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for i, (method, w) in enumerate(series):
            pts = sorted((e for e in summary if (e["method"], e["guidance"]) == (method, w)
                          and math.isfinite(e["psnr"]) and math.isfinite(e[key]) and e[key] > 0),
                         key=lambda e: e[key])
            if not pts:
                continue
            color = plt.get_cmap("tab10")(i % 10)
            ax.plot([e[key] for e in pts], [e["psnr"] for e in pts], marker="o", color=color,
                    label=f"{method} (w={w:g})")
            for e in pts:
                ax.annotate(str(e["steps"]), (e[key], e["psnr"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points", color=color)
        if math.isfinite(ceiling["psnr"]):
            ax.axhline(ceiling["psnr"], color="gray", linestyle="--", linewidth=1,
                       label=f"VAE round trip ({ceiling['psnr']:.1f} dB)")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("reconstruction PSNR (dB)")
        ax.set_title("reconstruction, mean over images (labels: steps)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


# ------------------------------------------------------------------------------------ run_inversion_bench


@dataclass
class InversionBenchResult:
    out: Path
    rows: list[dict]
    summary: list[dict]
    table: str
    checks: list[str]
    notes: list[str]


def _settings_id(model: str, params: dict, device: str, size: tuple[int, ...]) -> str:
    text = json.dumps({"model": model, "params": params, "device": device, "size": list(size)},
                      sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def resolve_latent_prior(model, device: str, command: str = "bench-inversion"):
    """``model`` as a latent prior (see :func:`studio.workflows.editing.latent_prior_for`); ``command``
    names the command in the refusal."""
    return latent_prior_for(model, device, f"{command} needs a latent (Stable-Diffusion-style) model")


def model_label(model) -> str:
    """The model's name for result files: the name given, a loaded prior's source, or the default."""
    if isinstance(model, str):
        return model
    return str(model.source) if model is not None else default_model(TEXT_TO_IMAGE)


NFE_CONVENTION = ("UNet evaluations counted by a forward hook, each forward adding its batch size "
                  "(a batched CFG step = 2); unet_calls = forward invocations (a CFG step = 1)")
TIME_CONVENTION = "inversion + regeneration in latent space (perf_counter; VAE and metrics excluded)"


def run_inversion_bench(
    model: str | Any | None = None,
    images: str | list[InversionImage] | None = None,
    methods: Iterable[str] | str | None = None,
    steps_list: Iterable[int] | str | None = None,
    guidance: Iterable[Any] | str | float | None = None,
    out: str | os.PathLike | None = None,
    *,
    ddim_steps: Iterable[int] | str | None = None,
    limit: int | None = None,
    size: int = DEFAULT_SIZE,
    prompt: str | None = None,
    overrides: Iterable[str] = (),
    device: str = "cpu",
    command: list[str] | None = None,
    progress: bool = True,
) -> InversionBenchResult:
    """Run (or resume) the inversion bench and write the result files into ``out``; see the module docstring.

    ``images``: a folder of PNGs, a list of :class:`InversionImage`, or None (the held-out emoji at
    ``size``); ``methods``: subset of ddim, newton, null-text; ``steps_list``: step counts (default
    5,10,20,50); ``guidance``: ``"auto"`` (each method's default) and/or numbers; ``ddim_steps``: DDIM's
    own step counts (default: ``steps_list`` + 2x/4x/8x its largest, see :func:`auto_ddim_steps`);
    ``overrides``: ``method.key=value`` solver parameters (e.g. ``newton.newton_steps=3``).
    """
    methods = parse_methods(methods)
    steps_list = parse_int_list(steps_list, "--steps", DEFAULT_STEPS)
    guidances = parse_guidance(guidance)
    params = parse_method_params(overrides, methods)
    items, source, prompt_source = _bench_images(images, limit, size, prompt)
    notes: list[str] = []
    settings_list = method_settings(methods, guidances, notes)
    prior = resolve_latent_prior(model, device)
    ddim_list = _step_counts(steps_list, ddim_steps, prior.num_train_timesteps)
    model_name = model_label(model)
    out = Path(out) if out else Path("runs/bench-inversion") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    grid = [(m, w, s) for m, w in settings_list for s in (ddim_list if m == "ddim" else steps_list)]
    settings = _settings_id(model_name, {m: p for m, p in params.items() if p}, device,
                            tuple(items[0].image.shape[-2:]))
    latent_shape = prior.latent_shape(tuple(items[0].image.shape))
    rows, timing = _run_grid(prior, items, grid, params, device, out, settings, latent_shape, progress)
    wanted = {(item.name, m, w, s) for item in items for m, w, s in grid}
    if len(rows) > len(current := [r for r in rows if run_key(r) in wanted]):
        notes.append(f"results.jsonl also holds {len(rows) - len(current)} runs outside this grid (other "
                     "images, methods, guidance or steps); they are not in this table")
    meta = {
        "machine": machine_info(device),
        "command": command or ["run_inversion_bench(...)"],
        "model_name": model_name,
        "model": prior.describe(),
        "images": len(items),
        "image_source": source,
        "prompt_source": prompt_source,
        "methods": methods,
        "steps": steps_list,
        "ddim_steps": ddim_list,
        "guidance_settings": [f"{m} w={w:g}" for m, w in settings_list],
        "method_params": params,
        "unet_timing": timing,
        "nfe_convention": NFE_CONVENTION,
        "time_convention": TIME_CONVENTION,
        "notes": notes,
    }
    return _write_results(out, current, meta)


def _bench_images(images: str | list[InversionImage] | None, limit: int | None, size: int,
                  prompt: str | None) -> tuple[list[InversionImage], str, str]:
    """The images, and how results.md describes them and their prompts."""
    if isinstance(images, list):
        items = images[:limit] if limit else images
        if not items:
            raise StudioError("no images to benchmark")
        return items, "given in memory", "given"
    items = load_inversion_images(images, limit, size, prompt)
    source = f"folder {images}" if images else f"held-out emoji, {size}x{size}"
    prompt_source = repr(prompt) if prompt is not None else "each image's caption (captions.json)"
    return items, source, prompt_source


def _step_counts(steps_list: list[int], ddim_steps: Iterable[int] | str | None, T: int) -> list[int]:
    """DDIM's step counts (see :func:`auto_ddim_steps`), after checking every count against the model's
    ``T`` training timesteps."""
    for s in steps_list:
        if s > T:
            raise StudioError(f"--steps {s} exceeds the model's {T} training timesteps")
    ddim_list = auto_ddim_steps(steps_list, T) if ddim_steps is None or ddim_steps == "auto" \
        else parse_int_list(ddim_steps, "--ddim-steps", steps_list)
    for s in ddim_list:
        if s > T:
            raise StudioError(f"--ddim-steps {s} exceeds the model's {T} training timesteps")
    return ddim_list


def _run_grid(prior, items: list[InversionImage], grid: list[tuple[str, float, int]], params: dict,
              device: str, out: Path, settings: str, latent_shape: tuple[int, ...],
              progress: bool) -> tuple[list[dict], dict[str, float]]:
    """Every (image, method, guidance, steps) run not yet in ``results.jsonl`` (refused if the file holds
    other settings), appended as it finishes. Returns all rows and the UNet timing."""
    jsonl = out / "results.jsonl"
    rows = read_jsonl(jsonl)
    if {r.get("settings") for r in rows} - {settings}:
        raise StudioError(f"--out '{out}' holds an inversion bench with other settings (model, method "
                          "parameters, device or image size differ); use a new --out to compare them")
    done = {run_key(r) for r in rows}
    timing = time_unet(prior, latent_shape, device)  # also the warm-up before anything is timed
    bar = tqdm(total=len(grid) * len(items), desc="bench-inversion", disable=not progress, dynamic_ncols=True)
    for item in items:
        todo = [g for g in grid if (item.name, g[0], g[1], g[2]) not in done]
        bar.update(len(grid) - len(todo))
        if not todo:
            continue
        enc = encode_image(prior, item)
        for method, w, steps in todo:
            bar.set_description(f"{item.name} {method} w={w:g} n={steps}")
            row = run_one(prior, enc, method, w, steps, params.get(method, {}), device, out, settings)
            append_jsonl(jsonl, row)
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows, timing


def _write_results(out: Path, rows: list[dict], meta: dict) -> InversionBenchResult:
    """``results.json``, ``results.md`` and the plots of ``rows`` (this grid's runs)."""
    summary = summarize(rows)
    ceiling = vae_ceiling(rows)
    table = markdown_table(summary, ceiling)
    checks = goal_checks(summary)
    write_json_atomic(
        {**meta, "vae_ceiling": ceiling, "goal_checks": checks, "summary": summary, "rows": rows},
        out / "results.json",
    )
    write_markdown(out / "results.md", table, meta, checks)
    write_plots(out, summary, ceiling)
    return InversionBenchResult(out=out, rows=rows, summary=summary, table=table, checks=checks,
                                notes=meta["notes"])


__all__ = [
    "DEFAULT_METHODS", "DEFAULT_STEPS", "InversionBenchResult", "InversionImage", "auto_ddim_steps",
    "goal_checks", "load_inversion_images", "resolve_latent_prior", "markdown_table", "model_label",
    "parse_method_params", "parse_methods", "psnr_at_nfe", "run_inversion_bench", "summarize",
]
