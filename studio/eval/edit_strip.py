"""``studio edit-strip``: what edits look like. Each edit (an image, a prompt describing it and a target
prompt) is inverted and edited by :func:`studio.workflows.editing.edit` with every requested method; the strip
shows input | reconstruction | edited per method, one row per edit, prompts above each row and the settings
below, with a JSON sidecar holding each edit's record."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image, ImageDraw, ImageFont

from studio.core import paths
from studio.core.errors import StudioError
from studio.core.io import image_to_numpy, load_image, write_json_atomic
from studio.eval.bench.records import machine_info
from studio.eval.inversion_bench import model_label, parse_method_params, parse_methods, resolve_latent_prior
from studio.workflows import editing

DEFAULT_EDITS = "configs/edits.yaml"


@dataclass
class EditSpec:
    image: str  # path of the image
    source: str  # prompt describing it
    target: str  # prompt for the edit
    kind: str = "other"  # colour, object, expression, ...: how the edit bench groups its rows


def resolve_edit_image(path: str) -> Path:
    """An edit's image path: as given, or inside the shipped examples when not running from a checkout."""
    return paths.resolve_shipped(path)


def load_edits(path: str | None = None, extra: Iterable[str] = ()) -> list[EditSpec]:
    """Edits from a YAML file (``edits: [{image, source, target}]``; default ``configs/edits.yaml``) and/or
    ``IMAGE|SOURCE|TARGET`` strings (``--edit``; given ones replace the file unless ``path`` is set too)."""
    specs: list[EditSpec] = []
    extra = list(extra)
    if path is not None or not extra:
        f = resolve_edit_image(path or DEFAULT_EDITS)
        if not f.is_file():
            raise StudioError(f"edits file '{path or DEFAULT_EDITS}' not found")
        try:
            data = yaml.safe_load(f.read_text(encoding="utf-8"))
            entries = data["edits"]
            specs += [EditSpec(str(e["image"]), str(e["source"]), str(e["target"]),
                               str(e.get("kind", "other"))) for e in entries]
        except (yaml.YAMLError, KeyError, TypeError) as err:
            raise StudioError(f"edits file '{f}' must hold 'edits: [{{image, source, target}}, ...]': "
                              f"{err}") from None
    for item in extra:
        parts = item.split("|")
        if len(parts) != 3 or not all(p.strip() for p in parts[::2]):
            raise StudioError(f"--edit takes IMAGE|SOURCE PROMPT|TARGET PROMPT, got {item!r}")
        specs.append(EditSpec(*(p.strip() for p in parts)))
    if not specs:
        raise StudioError("no edits given")
    for s in specs:
        if not resolve_edit_image(s.image).is_file():
            raise StudioError(f"edit image '{s.image}' not found")
    return specs


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw, text: str, font, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if cur and draw.textlength(trial, font=font) > width:
            lines.append(cur)
            cur = w
        else:
            cur = trial
    return lines + ([cur] if cur else [])


def strip_layout(n_rows: int, n_cols: int, tile: int, line_h: int, footer_lines: int, gutter: int = 4,
                 caption_lines: int = 2) -> dict:
    """Pixel geometry of the edit strip: header (1 line of column labels), then per row ``caption_lines``
    lines of prompts and one row of tiles, then the footer; ``gutter`` px around every tile."""
    caption_h = caption_lines * line_h
    width = n_cols * tile + (n_cols + 1) * gutter
    header_h = line_h + gutter
    row_h = caption_h + tile + gutter
    height = header_h + n_rows * row_h + footer_lines * line_h + gutter
    return {"width": width, "height": height, "tile": tile, "gutter": gutter, "header_h": header_h,
            "row_h": row_h, "caption_h": caption_h, "line_h": line_h, "footer_lines": footer_lines}


def tile_origin(layout: dict, row: int, col: int) -> tuple[int, int]:
    """(x, y) of the top-left pixel of tile (row, col)."""
    g = layout["gutter"]
    return g + col * (layout["tile"] + g), layout["header_h"] + row * layout["row_h"] + layout["caption_h"]


def compose_strip(rows: list[dict], column_labels: list[str], footer: str, scale: int = 2):
    """One PIL image: per row ``caption`` (2 lines) above its ``tiles`` ([0, 1] (1, 3, H, W) tensors, upscaled
    ``scale``x nearest), column labels on top, ``footer`` (wrapped) below; white background."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box = probe.textbbox((0, 0), "Ag|", font=font)
    line_h = box[3] - box[1] + 4
    size = rows[0]["tiles"][0].shape[-1]
    tile = size * scale
    n_cols = len(column_labels)
    width = n_cols * tile + (n_cols + 1) * 4
    footer_lines = _wrap(probe, footer, font, width - 8)
    layout = strip_layout(len(rows), n_cols, tile, line_h, len(footer_lines))
    canvas = Image.new("RGB", (layout["width"], layout["height"]), "white")
    draw = ImageDraw.Draw(canvas)
    g = layout["gutter"]
    for c, label in enumerate(column_labels):
        x, _ = tile_origin(layout, 0, c)
        draw.text((x, g // 2), _fit(draw, label, font, tile), fill="black", font=font)
    for r, row in enumerate(rows):
        _, y_tiles = tile_origin(layout, r, 0)
        y = y_tiles - layout["caption_h"]
        for k, text in enumerate(row["caption"][:2]):
            text = _fit(draw, text, font, layout["width"] - 2 * g)
            draw.text((g, y + k * line_h), text, fill="black", font=font)
        for c, t in enumerate(row["tiles"]):
            arr = (image_to_numpy(t.clamp(0, 1)) * 255).round().astype("uint8")
            im = Image.fromarray(arr).resize((tile, tile), Image.NEAREST)
            canvas.paste(im, tile_origin(layout, r, c))
    y = layout["height"] - len(footer_lines) * line_h - g // 2
    for k, text in enumerate(footer_lines):
        draw.text((g, y + k * line_h), text, fill="dimgray", font=font)
    return canvas, layout


def _method_settings(method: str, record: dict, controlled: bool) -> str:
    """``method``'s settings as it ran, for the strip's footer; under attention control with its
    cross-attention fraction, which may differ per method (``per_method`` in
    configs/edit/attention_control.yaml)."""
    control = record["control"]
    edited = control.get("cross_replace_edited")
    cross = f", cross {control['cross_replace']:g}" if controlled else ""
    if controlled and edited is not None:
        cross += f" (edited words {edited:g})"
    return (f"{method} (steps {record['steps']}, guidance {record['guidance']:g}, edit guidance "
            f"{record['edit_guidance']:g}{cross})")


def edit_strip(
    edits: list[EditSpec],
    out: str | os.PathLike = "docs/edit-strip.png",
    *,
    model: str | Any | None = None,
    methods: Iterable[str] | str | None = "newton",
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    scale: int = 2,
    overrides: Iterable[str] = (),
    device: str = "cpu",
    command: list[str] | None = None,
    control: str = "auto",
    edit_guidance: float | None = None,
) -> dict:
    """Run :func:`studio.workflows.editing.edit` for every edit and method; write the strip PNG (rows = edits,
    columns = input | reconstruction | edited | blend mask (with attention control) per method, prompts
    above each row, settings and seed below) and a JSON sidecar with each edit's record. ``overrides``:
    ``method.key=value`` and ``control.key=value``. The methods are deterministic (DDIM η = 0); ``seed``
    seeds torch anyway."""
    overrides = list(overrides)
    control_params = [o.split(".", 1)[1] for o in overrides if o.startswith("control.")]
    methods = parse_methods(methods)
    params = parse_method_params([o for o in overrides if not o.startswith("control.")], methods)
    settings = editing.control_settings(control, control_params)
    with_mask = settings.mode != "none"
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise StudioError(f"--scale must be a positive integer, got {scale!r}")
    prior = resolve_latent_prior(model, device, "edit-strip")
    torch.manual_seed(seed)
    model_name = model_label(model)
    records, rows = [], []
    for spec in edits:
        image = load_image(resolve_edit_image(spec.image))
        if rows and image.shape != rows[0]["tiles"][0].shape:
            raise StudioError(f"edit image '{spec.image}' is {tuple(image.shape[-2:])}, the first one "
                              f"{tuple(rows[0]['tiles'][0].shape[-2:])}: the strip needs one size")
        tiles, psnrs = [image], []
        for m in methods:
            res = editing.edit(image, source_prompt=spec.source, target_prompt=spec.target, method=m,
                               steps=steps, guidance=guidance, model=prior, device=device,
                               params=params.get(m, {}), control=control, control_params=control_params,
                               edit_guidance=edit_guidance)
            tiles += [res.reconstruction, res.image]
            if with_mask:
                mask = res.mask if res.mask is not None else torch.ones_like(image[:, :1])
                tiles.append(mask.expand(1, 3, -1, -1))
            psnrs.append(f"{m} w={res.record['guidance']:g} n={res.record['steps']}: rec. "
                         f"{res.record['metrics']['psnr']:.1f} dB")
            records.append({"image": spec.image, "method": m, **res.record})
        rows.append({"tiles": tiles, "caption": [f'"{spec.source}" -> "{spec.target}"', "; ".join(psnrs)]})
    kinds = ("recon.", "edited", "mask") if with_mask else ("recon.", "edited")
    labels = ["input"] + [f"{kind} ({m})" for m in methods for kind in kinds]
    used = {r["method"]: r for r in records}  # steps and guidance as each method actually ran
    method_text = ", ".join(_method_settings(m, used[m], with_mask) for m in methods)
    control_text = ("attention control off (plain regeneration)" if not with_mask else
                    f"attention control {settings.mode} (self {settings.self_replace:g}); mask = local-blend "
                    "region, white = edited")
    footer = (f"model {model_name}; {method_text}; {control_text}; seed {seed} (deterministic DDIM, eta 0); "
              "rows: source prompt -> target prompt; recon. = regenerated with the source prompt (PSNR vs "
              "input)")
    canvas, layout = compose_strip(rows, labels, footer, scale)
    out = Path(out).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    canvas.save(tmp)
    tmp.replace(out)
    sidecar = {"kind": "edit-strip", "output": out.name, "command": command or ["edit_strip(...)"],
               "model_name": str(model_name), "methods": methods, "steps": steps, "guidance": guidance,
               "control": control, "control_params": control_params, "edit_guidance": edit_guidance,
               "seed": seed, "scale": scale, "layout": layout, "machine": machine_info(device),
               "edits": [vars(e) for e in edits], "records": records}
    write_json_atomic(sidecar, out.with_suffix(".json"))
    return sidecar


__all__ = [
    "DEFAULT_EDITS", "EditSpec", "compose_strip", "edit_strip", "load_edits", "resolve_edit_image",
    "strip_layout", "tile_origin",
]
