"""``studio bench``'s runner: :func:`run_bench` walks the grid of tasks × images × seeds and runs every
solver (:func:`run_solver`), peer (:mod:`studio.eval.bench.peers`) and classical baseline
(:func:`run_baseline`) on one shared measurement, appending each finished run to ``results.jsonl``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from models.loading import load_prior
from models.registry import PIXEL, TEXT_TO_IMAGE, default_model
from solvers import SOLVERS, supports
from studio.core.config import load_task, to_plain
from studio.core.errors import StudioError
from studio.core.io import save_image
from studio.core.metrics import image_metrics
from studio.eval.bench.baselines import baseline_names, baseline_params, baselines_for, to_chw
from studio.eval.bench.context import BenchContext
from studio.eval.bench.inputs import (
    DEFAULT_EXAMPLE_SIZE,
    BenchImage,
    SolverSpec,
    base_solver,
    check_solvers,
    check_tasks,
    is_peer,
    load_bench_images,
    parse_list,
    parse_seeds,
    parse_steps,
    task_overrides,
)
from studio.eval.bench.measure import (NetworkTimer, PeakMemory, ResidualTrace, cost_fields,
                                       measurement_residual)
from studio.eval.bench.peers import get_peer
from studio.eval.bench.plots import write_strip
from studio.eval.bench.records import append_jsonl, machine_info, make_row, output_path, read_jsonl, run_key
from studio.eval.bench.report import BenchResult, write_report
from studio.eval.bench.summary import summarize
from studio.workflows import restoration  # restoration.restore looked up per call (tests patch it)


def run_solver(
    ctx: BenchContext, task: str, solver: str, bench_image: BenchImage, seed: int, degraded
) -> dict:
    """One diffusion solve: metrics, NFE, solve wall time, peak memory, overhead ratio, residual (final and
    per step); image saved. ``solver`` is a label: a base solver or a variant (:class:`SolverSpec`)."""
    clean = bench_image.image
    spec = ctx.spec(solver)
    base = {"task": task, "solver": solver, "image": bench_image.name, "seed": seed,
            "settings": ctx.settings_for(solver), "solver_base": spec.base,
            "solver_overrides": list(spec.overrides)}
    info = SOLVERS[spec.base]
    kind = "latent" if info.latent else "pixel"
    clean_residual = measurement_residual(degraded.operator, degraded.y, clean)
    if not supports(spec.base, degraded.operator, (3, *clean.shape[-2:])):
        return make_row(
            **base,
            status="unsupported",
            clean_residual=clean_residual,
            error=f"{spec.base} needs {'an SVD' if info.needs_svd else 'a linear operator'}",
        )
    timing = ctx.timing_for(kind, tuple(clean.shape[-2:]))
    trace = ResidualTrace(degraded.operator, degraded.y)
    try:
        network_module = getattr(ctx.priors[kind], "unet", None)
        with PeakMemory(ctx.device) as mem, NetworkTimer(network_module, ctx.device) as network:
            res = restoration.restore(
                degraded.y,
                task=task,
                solver=spec.base,
                model=ctx.priors[kind],
                seed=seed,
                steps=None if spec.sets_steps else ctx.steps.get(spec.base),
                overrides=[*ctx.task_over, *caption_prompt(spec, bench_image), *spec.overrides],
                operator=degraded.operator,
                reference=clean,
                device=ctx.device,
                callback=trace,
                progress=False,
            )
    except StudioError as err:  # e.g. a diverged solve: recorded, the bench goes on
        return make_row(**base, status="failed", clean_residual=clean_residual, error=str(err))
    rec = res.record
    output = output_path(ctx.out, task, bench_image.name, seed, solver)
    save_image(res.image, output)
    wall = rec["total_time_s"] - trace.time_s  # the bench's own instrumentation is not the solver's time
    return make_row(
        **base,
        status="ok",
        psnr=rec["metrics"]["psnr"],
        ssim=rec["metrics"]["ssim"],
        nfe=rec["nfe"],
        grad_nfe=rec["grad_nfe"],
        wall_time_s=wall,
        loop_time_s=rec["wall_time_s"] - trace.time_s,
        **cost_fields(wall, rec["nfe"], rec["grad_nfe"], timing, mem, network),
        relative_residual=rec["relative_residual"][0],
        residual=rec["residual"][0],
        clean_residual=clean_residual,
        residual_trace=trace.values(),
        trace_time_s=trace.time_s,
        solver_extra={k: v for k, v in rec.items() if k not in _RECORD_KEYS},
        params=rec["solver_params"],
        output=str(output.relative_to(ctx.out)),
        **timing,
    )


def _sets_prompt(spec: SolverSpec) -> bool:
    return any(o.split("=", 1)[0] == "prompt" for o in spec.overrides)


def wants_caption(spec: SolverSpec) -> bool:
    """Whether the solver is steered by a description of the solution (``needs_prompt``: TReg) and its
    variant does not set ``prompt=`` itself."""
    info = SOLVERS.get(spec.base)
    return info is not None and info.needs_prompt and not _sets_prompt(spec)


def caption_prompt(spec: SolverSpec, bench_image: BenchImage) -> list[str]:
    """``["prompt=<the image's caption>"]`` for a solver that :func:`wants_caption`; ``[]`` otherwise (the
    other latent solvers keep their papers' empty prompt)."""
    return [f"prompt={bench_image.caption}"] if wants_caption(spec) else []


def check_captions(specs: list[SolverSpec], bench_images: list[BenchImage]) -> None:
    """Refuse, before any work, a solver that needs a description of each image when an image has none."""
    bare = [b.name for b in bench_images if not b.caption]
    for spec in specs:
        if bare and wants_caption(spec):
            named = ", ".join(bare[:3]) + (" ..." if len(bare) > 3 else "")
            raise StudioError(f"{spec.base} needs a text description of each image, and {named} has no "
                              "caption (the image folder's captions.json): add one, or give the solver a "
                              f"prompt ({spec.base}:prompt=...)")


# keys of a restore record that the row already holds (or does not need); the rest is the solver's extra
_RECORD_KEYS = {
    "task", "task_config", "solver", "solver_params", "model", "model_name", "image_size", "operator",
    "device", "total_time_s", "nfe", "grad_nfe", "wall_time_s", "residual", "relative_residual", "metrics",
}


def run_baseline(
    ctx: BenchContext,
    name: str,
    fn: Callable[[], np.ndarray],
    task: str,
    bench_image: BenchImage,
    seed: int,
    degraded=None,
) -> dict:
    """One classical baseline on the same measurement: metrics, wall time (the call), CPU peak memory, and
    with ``degraded`` (the measurement) the final and the clean image's measurement residual."""
    base = {"task": task, "solver": name, "image": bench_image.name, "seed": seed,
            "settings": ctx.settings_for(None)}
    with PeakMemory("cpu") as mem:
        start = time.perf_counter()
        estimate = fn()
        wall = time.perf_counter() - start
    image = to_chw(estimate)
    metrics = image_metrics(image, bench_image.image)
    output = output_path(ctx.out, task, bench_image.name, seed, name)
    save_image(image, output)
    residuals = {}
    if degraded is not None:
        residuals = {
            "residual": measurement_residual(degraded.operator, degraded.y, image),
            "clean_residual": measurement_residual(degraded.operator, degraded.y, bench_image.image),
        }
    return make_row(
        **residuals,
        **base,
        status="ok",
        psnr=metrics["psnr"],
        ssim=metrics["ssim"],
        nfe=0,
        grad_nfe=0,
        wall_time_s=wall,
        peak_memory_mb=mem.mb,
        memory_kind=mem.kind,
        params=baseline_params(name, degraded.operator if degraded is not None else None),
        output=str(output.relative_to(ctx.out)),
    )


def _load_priors(model: str, solvers: list[str], device: str, notes: list[str]) -> tuple[list[str], dict]:
    """Load the model once as a pixel prior and/or latent prior, as the solvers need; latent solvers are
    dropped (with a note) when the model is not a latent model."""
    priors: dict[str, Any] = {}
    is_latent = {s: not is_peer(s) and SOLVERS[base_solver(s)].latent for s in solvers}
    if any(not is_latent[s] for s in solvers):
        priors["pixel"] = load_prior(model, device)
    latent = [s for s in solvers if is_latent[s]]
    if latent:
        try:
            priors["latent"] = load_prior(model, device, latent=True)
        except StudioError as err:
            notes.append(
                f"skipped latent solvers {', '.join(latent)}: model '{model}' is not a latent "
                f"(Stable-Diffusion-style) model ({err})"
            )
            solvers = [s for s in solvers if not is_latent[s]]
    if not solvers:
        raise StudioError(f"no solver can run with model '{model}'")
    return solvers, priors


def run_bench(
    tasks: Iterable[str] | str | None = None,
    solvers: Iterable[str] | str | None = None,
    images: str | None = None,
    limit: int | None = None,
    seeds: Iterable[int] | str | None = None,
    noise_sigma: float | None = None,
    model: str | None = None,
    steps: Mapping[str, int] | Iterable[str] | None = None,
    device: str = "cpu",
    out: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    command: list[str] | None = None,
    progress: bool = True,
    example_size: int = DEFAULT_EXAMPLE_SIZE,
) -> BenchResult:
    """Run (or resume) the bench grid and write the result files into ``out``; see :mod:`studio.eval.bench`.

    ``tasks`` / ``solvers`` / ``seeds`` take lists or comma strings (defaults: :data:`DEFAULT_TASKS`, all
    pixel solvers, ``[0]``); a solver may be a variant ``base:key=value[:key=value...]``
    (:func:`parse_solver_spec`); ``images``: a folder of PNGs (default: the held-out emoji at
    ``example_size`` px, 32 or 64); ``steps``: ``{solver: N}`` or ``["solver=N", ...]`` (base solver names);
    ``overrides``: ``operator.*`` / ``noise.*`` for every task. ``model`` defaults to the embedded pixel
    model, or the embedded latent model when every solver is a latent one.
    """
    tasks = check_tasks(parse_list(tasks, "--tasks"))
    specs = check_solvers(parse_list(solvers, "--solvers"))
    seeds = parse_seeds(seeds)
    steps = parse_steps(steps)
    task_over = task_overrides(list(overrides), noise_sigma)
    task_cfgs = {t: to_plain(load_task(t, task_over)) for t in tasks}  # bad override keys raise here
    bench_images = load_bench_images(images, limit, example_size, captions=any(map(wants_caption, specs)))
    check_captions(specs, bench_images)
    all_latent = all(s.base in SOLVERS and SOLVERS[s.base].latent for s in specs)  # peers are pixel
    model = model or default_model(TEXT_TO_IMAGE if all_latent else PIXEL)
    out = Path(out) if out else Path("runs/bench") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = [f"{s.label}: prompt = each image's caption" for s in specs if wants_caption(s)]
    labels, priors = _load_priors(model, [s.label for s in specs], device, notes)
    peers = list(dict.fromkeys(base_solver(s) for s in labels if is_peer(s)))
    notes += list(dict.fromkeys(n for p in peers for n in get_peer(p).bench_notes(p)))
    ctx = BenchContext(out=out, device=device, task_over=task_over, steps=steps, model=model, priors=priors,
                       variants={s.label: s for s in specs if s.overrides})
    rows = _run_grid(ctx, tasks, task_cfgs, labels, bench_images, seeds, progress)
    return _write_results(ctx, rows, notes, command)


def _run_grid(ctx: BenchContext, tasks: list[str], task_cfgs: dict[str, dict], solvers: list[str],
              bench_images: list[BenchImage], seeds: list[int], progress: bool) -> list[dict]:
    """Every run of the grid not yet in ``results.jsonl`` (checked to hold this run's settings), appended
    as it finishes; a strip per measurement. A run recorded as failed is run again (its new row, appended
    after the old one, is the one that counts). Returns all rows, old and new, one per run."""
    jsonl = ctx.out / "results.jsonl"
    rows = latest_per_run(read_jsonl(jsonl))
    ctx.check_resume(rows)
    done = {run_key(r) for r in rows if r.get("status") != "failed"}
    per_measurement = {t: [*solvers, *baseline_names(task_cfgs[t])] for t in tasks}
    total = sum(len(names) for names in per_measurement.values()) * len(bench_images) * len(seeds)
    bar = tqdm(total=total, desc="bench", disable=not progress, dynamic_ncols=True)
    for task in tasks:
        for bench_image in bench_images:
            for seed in seeds:
                names = per_measurement[task]
                todo = [s for s in names if (task, s, bench_image.name, seed) not in done]
                bar.update(len(names) - len(todo))
                d = restoration.degrade(bench_image.image, task, seed=seed, overrides=ctx.task_over)
                baselines = baselines_for(
                    task_cfgs[task], d.operator, d.y, tuple(bench_image.image.shape[-2:]), seed
                )
                for name in todo:
                    bar.set_description(f"{task} {bench_image.name} s{seed} {name}")
                    row = _run_one(ctx, name, baselines, task, bench_image, seed, d)
                    append_jsonl(jsonl, row)
                    rows.append(row)
                    bar.update(1)
                write_strip(ctx.out, task, bench_image, seed, d.y, names)
    bar.close()
    return latest_per_run(rows)


def latest_per_run(rows: list[dict]) -> list[dict]:
    """One row per run key, the last written (a retried failed run replaces its failure), in order."""
    return list({run_key(r): r for r in rows}.values())


def _run_one(ctx: BenchContext, name: str, baselines: dict[str, Callable[[], np.ndarray]], task: str,
             bench_image: BenchImage, seed: int, degraded) -> dict:
    """One run of a classical baseline, a peer or one of our solvers."""
    if name.startswith("classical:"):
        return run_baseline(ctx, name, baselines[name], task, bench_image, seed, degraded)
    if is_peer(name):
        return get_peer(base_solver(name)).bench_row(ctx, task, name, bench_image, seed, degraded)
    return run_solver(ctx, task, name, bench_image, seed, degraded)


def _write_results(ctx: BenchContext, rows: list[dict], notes: list[str],
                   command: list[str] | None) -> BenchResult:
    prior = next(iter(ctx.priors.values()))
    meta = {
        "machine": machine_info(ctx.device),
        "command": command or ["run_bench(...)"],
        "model_name": ctx.model,
        "model": prior.describe() if hasattr(prior, "describe") else str(ctx.model),
        "task_overrides": ctx.task_over,
        "steps": ctx.steps,
        "timings_this_session": {f"{k[0]} {k[1]}x{k[2]}": v for k, v in ctx.timings.items()},
        "notes": notes,
    }
    return write_report(ctx.out, rows, summarize(rows), meta)
