"""The bench's figures: ``psnr_vs_nfe.png``, ``psnr_vs_time.png``, ``residual_vs_step.png`` and the
per-measurement strips (reference | measurement | each solver)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from studio.core.io import load_image, measurement_display, save_image
from studio.eval.bench.inputs import BenchImage
from studio.eval.bench.records import output_path, safe_name

Tensor = torch.Tensor


def write_plots(out: Path, summary: list[dict]) -> None:
    """``psnr_vs_nfe.png`` and ``psnr_vs_time.png``: one panel per task, one labelled marker per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = list(dict.fromkeys(e["task"] for e in summary))
    solvers = list(dict.fromkeys(e["solver"] for e in summary))
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(solvers)}
    for key, fname, xlabel in (
        ("nfe", "psnr_vs_nfe.png", "NFE (symlog; baselines at 0)"),
        ("wall_time_s", "psnr_vs_time.png", "wall time per image (s, log)"),
    ):
        fig, axes = plt.subplots(
            1, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 3.6), squeeze=False
        )
        for ax, task in zip(axes[0], tasks):
            for e in summary:
                if e["task"] != task or not (math.isfinite(e["psnr"]) and math.isfinite(e[key])):
                    continue
                marker = "s" if e["solver"].startswith("classical:") else "o"
                ax.scatter([e[key]], [e["psnr"]], color=colors[e["solver"]], marker=marker, label=e["solver"])
                ax.annotate(
                    e["solver"].replace("classical:", "c:"),
                    (e[key], e["psnr"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            if key == "nfe":
                ax.set_xscale("symlog", linthresh=1)
                ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            else:
                ax.set_xscale("log")
            ax.set_title(task)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("PSNR (dB)")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def write_residual_plot(out: Path, summary: list[dict]) -> Path:
    """``residual_vs_step.png``: one panel per task, one line per solver with a residual trace (mean over
    images × seeds of ‖y − A(clip(x̂_0))‖₂ per step, [0, 1] units, log-y); the dashed line is the clean
    images' mean residual (the noise level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = list(dict.fromkeys(e["task"] for e in summary))
    traced = sorted({e["solver"] for e in summary if e.get("residual_trace")})
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(traced)}
    n = max(1, len(tasks))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        entries = sorted((e for e in summary if e["task"] == task), key=lambda e: e["solver"])
        for e in entries:
            trace = e.get("residual_trace")
            if trace and all(v > 0 and math.isfinite(v) for v in trace):
                style = "-." if ":" in e["solver"] else "-"  # variants dash-dotted over their base
                steps = range(1, len(trace) + 1)
                ax.plot(steps, trace, style, color=colors[e["solver"]], label=e["solver"], lw=1.2)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        clean = [e["clean_residual"] for e in entries if math.isfinite(e.get("clean_residual", math.nan))]
        if clean and clean[0] > 0:
            ax.axhline(clean[0], color="0.4", ls="--", lw=1, label="clean image (noise)")
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("‖y − A x̂₀‖₂ ([0, 1] units)")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "residual_vs_step.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_strip(
    out: Path, task: str, bench_image: BenchImage, seed: int, y: Tensor, solvers: list[str]
) -> Path:
    """reference | measurement | each solver output that exists on disk, 2 px white gutters."""
    size = tuple(bench_image.image.shape[-2:])
    tiles = [bench_image.image, measurement_display(y, size)]
    for s in solvers:
        p = output_path(out, task, bench_image.name, seed, s)
        if p.exists():
            tiles.append(load_image(p))
    gutter = torch.ones(1, 3, size[0], 2)
    parts = [t for tile in tiles for t in (tile, gutter)][:-1]
    path = out / "strips" / f"{safe_name(task)}-{safe_name(bench_image.name)}-s{seed}.png"
    save_image(torch.cat(parts, dim=3), path)
    return path

