"""``studio bench-edit``: do edits follow the target words, and does the rest of the image stay?

For every edit of ``configs/edits.yaml`` (an image, its caption as the source prompt, a target prompt with
one colour, object or expression word changed) and every inversion method, the image is inverted once per
attention control (``none``: plain regeneration under the target prompt, what ``studio edit`` did before
prompt-to-prompt; ``auto``: the attention-controlled default) and edited. Both run the inversion, then
one source and one target pass per step (the reconstruction and the edit); by default the controlled
edit also uses the configured edit guidance (guided passes cost 2 NFE), so the default comparison is
control plus its guidance against today's plain edit; ``--edit-guidance W`` runs both at W.

What is measured, per edit:

* **edit success**: L(edit | source) − L(edit | target), the model's own diffusion loss of the edited image
  under the source prompt minus under the target prompt, over the same fixed (t, ε) draws for both prompts
  (paired, as ``studio personalize-eval`` scores concepts). Positive: the model reads the edit as closer
  to the target words than to the source ones. The same score of the *input* is reported as the reference
  (``input_success``, usually negative).
* **background**: PSNR / SSIM of the edit against the input outside the local-blend mask of the controlled
  run with the same inversion (the same pixels for both controls); ``mask_fraction`` is the mask's share.
* **reconstruction**: PSNR of the source-prompt regeneration against the input.

Outputs in ``out``: ``results.jsonl`` (one line per edit, method and control, appended as each (edit,
method) pair finishes, so a restarted bench skips what is done), ``results.json`` (rows, summary, machine,
command), ``results.md`` and ``outputs/<image>-to-<target>/<method>-<control>.png`` (+ ``-mask.png``).
"""

from __future__ import annotations

import json
import shlex
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from studio.core.conventions import to_model
from studio.core.errors import StudioError
from studio.core.io import load_image, save_image, write_json_atomic
from studio.core.metrics import masked_metrics
from studio.eval.bench.records import machine_info, safe_name
from studio.eval.edit_strip import EditSpec, load_edits, resolve_edit_image
from studio.eval.inversion_bench import model_label, parse_methods, resolve_latent_prior
from studio.training.objective import forward_process
from studio.training.textual_inversion import diffusion_loss
from studio.workflows import editing

CONTROLS = ("none", "auto")
DEFAULT_METHODS = ("newton", "ddim", "null-text")

Tensor = torch.Tensor


@torch.no_grad()
def prompt_loss_draws(prior, image: Tensor, prompts: list[str], seed: int = 0, samples: int = 64) -> Tensor:
    """(prompts, samples): the diffusion loss of ``image`` ((1, 3, H, W) in [0, 1]) under each prompt at
    each of ``samples`` (t, ε) draws, the same draws for every prompt and, for one ``seed``, every image (so
    differences between prompts, and between edits of one image, are paired)."""
    z0 = prior.encode(to_model(image.to(prior.device))).float()
    noising = forward_process(prior.scheduler_config)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(len(noising.alphas_cumprod), (samples,), generator=g).to(prior.device)
    noise = torch.randn((samples, *z0.shape[1:]), generator=g).to(prior.device)
    latents = z0.expand(samples, *z0.shape[1:])
    conds = [prior.embed(p).expand(samples, -1, -1) for p in prompts]
    return torch.stack([diffusion_loss(prior.unet, noising, latents, cond, t, noise, per_sample=True).cpu()
                        for cond in conds])


def prompt_losses(prior, image: Tensor, prompts: list[str], seed: int = 0, samples: int = 64) -> list[float]:
    """The mean over the draws of :func:`prompt_loss_draws`, per prompt."""
    return prompt_loss_draws(prior, image, prompts, seed, samples).mean(1).tolist()


def success(losses: list[float]) -> float:
    """L(· | source) − L(· | target) from ``prompt_losses(..., [source, target])``."""
    return losses[0] - losses[1]


def paired_difference(rows: list[dict], control: str, baseline: str) -> dict | None:
    """Mean over the edits of edit success(``control``) − edit success(``baseline``) with two standard errors.

    ``se``: over the score's (t, ε) draws. Every image of one bench is scored on the same draws, so the gap
    is averaged over the edits draw by draw and the error taken over those per-draw means (the edits' gaps
    are correlated through the shared draws; treating them as independent misstates the error). Whether a
    gap between the controls, on these edits, is larger than the score's own noise.

    ``se_edits``: over the edits, from the spread of their own gaps (None for one edit). Whether the gap
    would hold on other edits of the same kind: a few edits that disagree make it large however many draws
    score them. None without per-draw scores."""
    by_edit: dict[tuple, dict] = {}
    for r in rows:
        by_edit.setdefault((r["image"], r["target"], r["method"]), {})[r["control"]] = r.get("success_draws")
    diffs = [torch.tensor(c[control], dtype=torch.float64) - torch.tensor(c[baseline], dtype=torch.float64)
             for c in by_edit.values() if c.get(control) is not None and c.get(baseline) is not None]
    if not diffs or len(diffs) != len(by_edit) or len({len(d) for d in diffs}) != 1 or len(diffs[0]) < 2:
        return None
    difference, se = _mean_and_se(torch.stack(diffs).mean(0))
    _, se_edits = _mean_and_se(torch.stack([d.mean() for d in diffs]))
    return {"difference": difference, "se": se, "se_edits": se_edits, "edits": len(diffs)}


def _mean_and_se(per_draw: Tensor) -> tuple[float, float | None]:
    """The mean of per-draw values and its standard error (None from a single draw)."""
    n = len(per_draw)
    return float(per_draw.mean()), (float(per_draw.std() / n ** 0.5) if n > 1 else None)


def _edit_key(spec: EditSpec) -> str:
    """The outputs folder of one edit: several edits of one image (the orange heart's colours) each keep
    their own."""
    return f"{Path(spec.image).stem}-to-{safe_name(spec.target)}"


def _run_pair(prior, spec: EditSpec, image: Tensor, method: str, controls: list[str], steps: int | None,
              control_params, edit_guidance: float | None, input_success: float, seed: int, samples: int,
              out: Path) -> list[dict]:
    """Every control for one (edit, method): the rows, with the background scored outside the first
    controlled run's mask."""
    results = {c: editing.edit(image, source_prompt=spec.source, target_prompt=spec.target, method=method,
                               steps=steps, model=prior, control=c, control_params=control_params,
                               edit_guidance=edit_guidance)
               for c in controls}
    mask = next((r.mask for r in results.values() if r.mask is not None), None)
    prompts = [spec.source, spec.target]
    folder = out / "outputs" / _edit_key(spec)
    rows = []
    for control, res in results.items():
        save_image(res.image, folder / f"{method}-{control}.png")
        if res.mask is not None:
            save_image(res.mask.expand(1, 3, -1, -1), folder / f"{method}-{control}-mask.png")
        background = (masked_metrics(res.image, image, 1 - mask) if mask is not None
                      else {"psnr": None, "ssim": None, "pixels": 0})
        rec = res.record
        rows.append({
            "image": spec.image, "kind": spec.kind, "source": spec.source, "target": spec.target,
            "method": method, "control": control, "control_mode": rec["control"]["mode"],
            **_scored(prior, res.image, prompts, seed, samples),
            "input_success": input_success, "background_psnr": background["psnr"],
            "background_ssim": background["ssim"],
            "mask_fraction": None if mask is None else float(mask.mean()),
            "reconstruction_psnr": rec["metrics"]["psnr"], "steps": rec["steps"], "guidance": rec["guidance"],
            "edit_guidance": rec["edit_guidance"],
            "nfe": rec["nfe"] + rec["edit_nfe"], "time_s": rec["total_time_s"],
        })
    return rows


def _scored(prior, image: Tensor, prompts: list[str], seed: int, samples: int) -> dict:
    draws = prompt_loss_draws(prior, image, prompts, seed, samples)
    per_draw = draws[0] - draws[1]
    mean, se = _mean_and_se(per_draw)
    return {"edit_success": mean, "edit_success_se": se,
            "success_draws": [round(v, 7) for v in per_draw.tolist()]}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(rows: list[dict]) -> list[dict]:
    """Per (method, control, edit kind or "all"): means over edits."""
    out = []
    for kind in ["all"] + sorted({r["kind"] for r in rows}):
        for method in dict.fromkeys(r["method"] for r in rows):
            for control in dict.fromkeys(r["control"] for r in rows):
                sel = [r for r in rows if r["method"] == method and r["control"] == control
                       and kind in ("all", r["kind"])]
                if sel:
                    out.append({"kind": kind, "method": method, "control": control, "edits": len(sel),
                                **{k: _mean(r[k] for r in sel) for k in (
                                    "edit_success", "input_success", "background_psnr", "background_ssim",
                                    "mask_fraction", "reconstruction_psnr", "nfe", "time_s")}})
                    if control != "none":
                        out[-1]["vs_none"] = paired_difference(
                            [r for r in rows if r["method"] == method and kind in ("all", r["kind"])],
                            control, "none")
    return out


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _vs_none(paired: dict | None) -> str:
    return "—" if paired is None else f"{paired['difference']:+.4f} ± {paired['se']:.4f}"


def _se_edits(paired: dict | None) -> str:
    return "—" if paired is None else _fmt(paired.get("se_edits"), ".4f")


def markdown(summary: list[dict], rows: list[dict], meta: dict) -> str:
    lines = [f"# Edit bench: {meta['model']}", "", f"Command: `{meta['command']}`", "",
             "Edit success = L(edit | source) − L(edit | target) (model's own diffusion loss, paired draws; "
             "higher = closer to the target words); input = the same score of the unedited input. Background "
             "= edit vs input outside the controlled run's blend mask. NFE: inversion + reconstruction + "
             "edit. − none: the controlled edit's success minus the plain one's, mean over the edits ± its "
             "standard error over the score's (t, ε) draws (both scored on the same draws): a gap within "
             "about two of these is the score's noise on these edits. SE over edits: the same mean's "
             "standard error from the spread of the edits' own gaps: a gap within about two of these may "
             "not hold on other edits of the kind.",
             "", "| edits | method | control | edit success | − none | SE over edits | input | "
             "background PSNR | background SSIM | mask | recon. PSNR | NFE | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['kind']} ({s['edits']}) | {s['method']} | {s['control']} | "
                     f"{_fmt(s['edit_success'], '+.4f')} | {_vs_none(s.get('vs_none'))} | "
                     f"{_se_edits(s.get('vs_none'))} | "
                     f"{_fmt(s['input_success'], '+.4f')} | "
                     f"{_fmt(s['background_psnr'], '.2f')} | {_fmt(s['background_ssim'], '.3f')} | "
                     f"{_fmt(s['mask_fraction'], '.2f')} | {_fmt(s['reconstruction_psnr'], '.2f')} | "
                     f"{_fmt(s['nfe'], '.0f')} | {_fmt(s['time_s'], '.1f')} |")
    lines += ["", "Per edit (edit success ± its standard error over the draws):", "",
              "| image | source → target | method | control | edit success | background PSNR |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        se = r.get("edit_success_se")
        lines.append(f"| {Path(r['image']).stem} | {r['source']} → {r['target']} | {r['method']} | "
                     f"{r['control']} ({r['control_mode']}) | {r['edit_success']:+.4f}"
                     f"{'' if se is None else f' ± {se:.4f}'} | {_fmt(r['background_psnr'], '.2f')} |")
    return "\n".join(lines) + "\n"


def _done(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _earlier_wall_time(out: Path, settings: dict) -> float:
    """The wall time of the runs this one resumes (a re-run that only rewrites the tables adds ~0 s)."""
    try:
        earlier = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0.0
    return float(earlier.get("wall_time_s", 0.0)) if earlier.get("settings") == settings else 0.0


def run_edit_bench(edits: list[EditSpec] | None = None, out: str | Path = "runs/bench-edit", *,
                   methods: Iterable[str] | str | None = DEFAULT_METHODS, controls: Iterable[str] = CONTROLS,
                   steps: int | None = None, model: str | Any | None = None, device: str = "cpu",
                   control_params=(), edit_guidance: float | None = None, seed: int = 0,
                   samples: int = 64, command: list[str] | None = None) -> dict:
    """Run (or resume) the edit bench and write its results to ``out``; returns the results dict."""
    methods = parse_methods(list(methods) if not isinstance(methods, str) else methods)
    controls = list(dict.fromkeys(controls))
    if not controls or any(c not in editing.CONTROL_MODES for c in controls):
        raise StudioError(f"--controls must be among {', '.join(editing.CONTROL_MODES)}, got {controls}")
    if not isinstance(samples, int) or samples < 1:
        raise StudioError(f"--samples must be a positive integer, got {samples!r}")
    edits = edits if edits is not None else load_edits()
    editing.control_settings("auto", control_params)  # bad overrides fail before any work
    prior = resolve_latent_prior(model, device, "bench-edit")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    settings = {"model": model_label(model), "controls": controls, "steps": steps, "seed": seed,
                "samples": samples, "edit_guidance": edit_guidance,
                "control_params": sorted(control_params) if not isinstance(control_params, dict)
                else sorted(f"{k}={v}" for k, v in control_params.items())}
    rows = _done(jsonl)
    if any(r.get("settings") != settings for r in rows):
        raise StudioError(f"'{out}' holds edit-bench results made with other settings: choose another --out")
    done = {(r["image"], r["target"], r["method"]) for r in rows}
    start = time.perf_counter()
    for spec in edits:
        image = load_image(resolve_edit_image(spec.image))
        input_success = None  # the unedited input's score: once per edit, shared by every method
        for method in methods:
            if (spec.image, spec.target, method) in done:
                continue
            torch.manual_seed(seed)
            if input_success is None:
                input_losses = prompt_losses(prior, image, [spec.source, spec.target], seed, samples)
                input_success = success(input_losses)
            new = _run_pair(prior, spec, image, method, controls, steps, control_params, edit_guidance,
                            input_success, seed, samples, out)
            new = [{**r, "settings": settings} for r in new]
            with jsonl.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
            rows += new
    summary = summarize(rows)
    meta = {"model": model_label(model), "command": shlex.join(command or ["run_edit_bench(...)"]),
            "machine": machine_info(device), "settings": settings,
            "wall_time_s": _earlier_wall_time(out, settings) + time.perf_counter() - start}
    result = {"kind": "edit-bench", **meta, "summary": summary, "rows": rows}
    write_json_atomic(result, out / "results.json")
    tmp = out / "results.md.tmp"
    tmp.write_text(markdown(summary, rows, meta), encoding="utf-8")
    tmp.replace(out / "results.md")
    return result


__all__ = ["CONTROLS", "DEFAULT_METHODS", "markdown", "prompt_losses", "run_edit_bench", "success",
           "summarize"]
