"""The bench's report: the Markdown table (:func:`markdown_table`), ``results.md`` (settings, table, legend,
variant comparisons, goals, baselines note, command) and :func:`write_report`, which writes every result
file of a finished (or merged) bench."""

from __future__ import annotations

import math
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path

from solvers import SOLVERS
from studio.core.io import write_json_atomic
from studio.eval.bench.baselines import BASELINES_NOTE
from studio.eval.bench.goals import bench_goals, goals_markdown
from studio.eval.bench.plots import write_plots, write_residual_plot
from studio.eval.bench.summary import variant_comparisons


@dataclass
class BenchResult:
    out: Path
    rows: list[dict]
    summary: list[dict]
    table: str
    notes: list[str]


def fmt(v: float, spec: str) -> str:
    return "–" if v is None or not math.isfinite(v) else format(v, spec)


def _table_row(e: dict) -> str:
    if e["unsupported"]:
        return f"| {e['task']} | {e['solver']} | 0 | unsupported | | | | | | |"
    runs = str(e["runs"]) + (f" ({e['failed']} failed)" if e["failed"] else "")
    cells = [
        e["task"],
        e["solver"],
        runs,
        f"{fmt(e['psnr'], '.2f')} ± {fmt(e['psnr_std'], '.2f')}",
        f"{fmt(e['ssim'], '.3f')} ± {fmt(e['ssim_std'], '.3f')}",
        fmt(e.get("residual", math.nan), ".4g"),
        fmt(e["nfe"], ".0f"),
        fmt(e["wall_time_s"], ".3g"),
        fmt(e["peak_memory_mb"], ".1f"),
        fmt(e["overhead_ratio"], ".2f"),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(summary: list[dict]) -> str:
    """One row per task × solver (see :func:`studio.eval.bench.summary.summarize`)."""
    header = [
        "| task | solver | runs | PSNR (dB) | SSIM | residual | NFE | wall time (s) | peak mem (MB) "
        "| overhead × |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(header + [_table_row(e) for e in summary])


def _header_text(meta: dict) -> str:
    m = meta["machine"]
    steps = ", ".join(f"{k}={v}" for k, v in meta["steps"].items()) or "solver defaults"
    return (
        f"Model: `{meta['model_name']}`; device {m['device']} ({m.get('gpu') or m['cpu']}, "
        f"{m['torch_threads']} torch threads); torch {m['torch']}, diffusers {m['diffusers']}. "
        f"Task overrides: {', '.join(meta['task_overrides']) or 'none'}; steps: {steps}."
    )


def _legend_text(meta: dict, rows: list[dict]) -> str:
    cpu_note = "CPU resident-set increase during the run, sampled every 5 ms (approximate)"
    mem_note = cpu_note
    if meta["machine"]["device"].startswith("cuda"):
        mem_note = f"CUDA `max_memory_allocated` (weights included); classical baselines: {cpu_note}"
    return (
        "Mean ± std over images × seeds. Residual: the final ‖y − A x̂‖₂ over the measured entries in [0, 1] "
        f"image units (mean); the clean images' residual (the drawn noise) is {_clean_residual_text(rows)}. "
        "NFE: model evaluations; wall time: the solve only (mean, the bench's per-step residual trace "
        "subtracted); "
        f"peak memory: the largest over the runs, {mem_note}; overhead ×: wall time / model-only time, "
        "where model-only time is the time measured inside the network's forward calls during the run "
        "plus the backward passes estimated from the forward/backward calibration "
        f"{_timing_text(rows)} (the in-run measurement cancels load drift on a shared machine; "
        "`overhead_ratio_calibrated` in the JSON uses the calibration alone). "
        "`residual_vs_step.png`: ‖y − A clip(x̂₀)‖₂ of each step's denoised estimate "
        "(mean over images × seeds, log scale; dashed: the clean images' residual)."
        + (LATENT_NOTE if any(r.get("solver_base") in _latent_names() for r in rows) else "")
    )


LATENT_NOTE = (
    " Latent solvers: the timed model is the UNet on the image's latent, so the VAE decode (and its "
    "backward) of every step counts as overhead; P2L's NFE includes its prompt-update UNet passes; a "
    "`base:key=value` label is the base solver run with that parameter (e.g. `p2l:tune_prompt=false`, "
    "the frozen-prompt ablation)."
)


def _latent_names() -> set[str]:
    return {n for n, info in SOLVERS.items() if info.latent}


STRIPS_TEXT = (
    "Strips (`strips/<task>-<image>-s<seed>.png`): reference | measurement (SR: nearest-upsampled y; "
    "inpainting: y with unobserved pixels black) | each solver's output in `--solvers` order, then the "
    "classical baselines (2 px white gutters; per-run images are in `outputs/`)."
)


def write_markdown(path: Path, table: str, meta: dict, rows: list[dict], goals: list[dict] = ()) -> None:
    """``results.md``: settings line, the table, its legend, the Baselines note, notes and the command."""
    notes = ["## Notes", "", *[f"* {n}" for n in meta["notes"]], ""] if meta["notes"] else []
    lines = [
        "# studio bench",
        "",
        _header_text(meta),
        "",
        table,
        "",
        _legend_text(meta, rows),
        "",
        *_variants_section(variant_comparisons(rows)),
        *goals_markdown(list(goals)),
        "## Baselines",
        "",
        BASELINES_NOTE,
        *notes,
        "## Command",
        "",
        "```",
        shlex.join(meta["command"]),
        "```",
        "",
        STRIPS_TEXT,
        "",
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)


def _variants_section(comparisons: list[dict]) -> list[str]:
    """Markdown lines for :func:`variant_comparisons` (nothing without variants)."""
    if not comparisons:
        return []
    lines = [
        "## Variants against their base solver",
        "",
        "Paired over the same measurements (image × seed). Positive PSNR gain / negative residual change: "
        "the base solver does better than the variant (for `p2l` vs `p2l:tune_prompt=false`: prompt tuning "
        "helps).",
        "",
        "| task | base | variant | pairs | PSNR base − variant (dB) | residual base − variant "
        "| base higher PSNR | base lower residual |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in comparisons:
        keys = ("psnr_gain_db", "psnr_gain_std", "residual_change", "residual_change_std")
        gm, gs, rm, rs = (c[k] for k in keys)
        lines.append(
            f"| {c['task']} | {c['base']} | {c['variant']} | {c['pairs']} "
            f"| {fmt(gm, '+.3f')} ± {fmt(gs, '.3f')} | {fmt(rm, '+.4g')} ± {fmt(rs, '.2g')} "
            f"| {c['base_higher_psnr']}/{c['pairs']} | {c['base_lower_residual']}/{c['pairs']} |"
        )
    return [*lines, ""]


def _clean_residual_text(rows: list[dict]) -> str:
    """``task 0.123, ...``: the mean clean-image residual per task (the level of an exact fit to y)."""
    per_task: dict[str, list[float]] = {}
    for r in rows:
        if r.get("clean_residual") is not None:
            per_task.setdefault(r["task"], []).append(r["clean_residual"])
    if not per_task:
        return "not recorded"
    return ", ".join(f"{t} {statistics.fmean(v):.3g}" for t, v in per_task.items())


def _timing_text(rows: list[dict]) -> str:
    """The forward / forward+backward times the rows' ratios used (a range when sessions or sizes differ)."""
    fwd = sorted({r["t_fwd_s"] for r in rows if r.get("t_fwd_s")})
    bwd = sorted({r["t_fwdbwd_s"] for r in rows if r.get("t_fwdbwd_s")})
    if not fwd:
        return "(no model timed)"

    def span(v: list[float]) -> str:
        return f"{v[0] * 1e3:.1f} ms" if len(v) == 1 else f"{v[0] * 1e3:.1f}-{v[-1] * 1e3:.1f} ms"

    return f"(fwd {span(fwd)}, fwd+bwd {span(bwd)} at batch 1)"


def write_report(out: Path, rows: list[dict], summary: list[dict], meta: dict) -> BenchResult:
    """``results.json`` (meta, summary, variant comparisons, goals, rows), ``results.md`` and the plots."""
    table = markdown_table(summary)
    goals = bench_goals(summary)
    write_json_atomic(
        {
            **meta,
            "baselines": BASELINES_NOTE,
            "summary": summary,
            "variant_comparisons": variant_comparisons(rows),
            "goals": goals,
            "rows": rows,
        },
        out / "results.json",
    )
    write_markdown(out / "results.md", table, meta, rows, goals)
    write_plots(out, summary)
    write_residual_plot(out, summary)
    return BenchResult(out=out, rows=rows, summary=summary, table=table, notes=meta["notes"])
