"""``studio restore-batch``: restore a folder of measurements with one solver, over several processes.

Inputs are the PNGs in a folder that carry a ``studio degrade`` sidecar (``kind: measurement``), or, with
``simulate``, every PNG as a clean image to degrade first. Each input ``<stem>.png`` becomes
``<output_dir>/<stem>.png`` + ``.json`` through :func:`studio.workflows.restoration.restore_files` (atomic
writes), so an input whose two outputs exist is skipped: a killed batch resumes where it stopped.

A kill (SIGKILL included) at any moment leaves only whole files under the output names: an input counts as
done when its PNG is there and its sidecar carries the ``batch`` record, which is written last (a sidecar
without it is the solve's own, from a batch killed between the two writes: that input is restored again).
The temporaries a killed writer left beside an input's outputs are deleted by the process that owns the
input, before it restores or skips it. A worker that dies makes the pool stop the others; the summary then
reads from disk which of their inputs were finished, and the rest are ``failed`` until the next run.

Work split: the inputs are sorted and cut into ``N`` contiguous chunks, the first ``len % N`` one item
longer (accelerate's ``PartialState.split_between_processes``); process ``k`` restores chunk ``k``. The
processes come either from ``accelerate launch --multi_gpu --num_processes N -m studio.cli restore-batch``
(rank, world size, split and the final gather from accelerate) or from ``processes=N``, which spawns
``N`` worker processes itself with the same split. Each process loads the model once. Every image is
solved with the same ``seed``, so a result does not depend on ``N``. The main process writes
``<output_dir>/batch.json``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

from models.loading import load_prior
from models.registry import PIXEL, TEXT_TO_IMAGE, default_model
from solvers import SolverInfo, get_solver, solver_config
from studio.core.config import load_task
from studio.core.errors import StudioError
from studio.core.io import staged_temporary_pattern, write_json_atomic
from studio.workflows import restoration
from studio.workflows.restoration import software_versions, split_overrides

SUMMARY_NAME = "batch.json"


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs (picklable: sent to spawned processes)."""

    input_dir: str
    output_dir: str
    solver: str
    task: str | None
    model: str
    latent: bool
    steps: int | None
    seed: int
    overrides: tuple[str, ...]
    simulate: bool
    device: str
    progress: bool
    argv: list[str] | None = None
    threads: int | None = None  # torch CPU threads in a spawned worker


# ---------------------------------------------------------------------------------------------- inputs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return _UNREADABLE


_UNREADABLE = object()


def find_inputs(input_dir: str | os.PathLike, simulate: bool = False) -> tuple[list[Path], int]:
    """The sorted input PNGs of ``input_dir`` and how many PNGs were left out (not measurements).

    A PNG is a measurement when its ``.json`` sidecar says ``kind: measurement``; a PNG whose sidecar
    cannot be read is kept (its restore then fails with a clear message). With ``simulate`` every PNG
    is an input.
    """
    d = Path(input_dir)
    if not d.exists():
        raise StudioError(f"input folder '{d}' does not exist")
    if not d.is_dir():
        raise StudioError(f"input folder '{d}' is not a folder")
    pngs = sorted((p for p in d.iterdir() if p.suffix.lower() == ".png" and p.is_file()),
                  key=lambda p: p.name)
    if not pngs:
        raise StudioError(f"no PNG images in '{d}'")
    seen: dict[str, Path] = {}
    for p in pngs:
        if p.stem in seen:
            raise StudioError(f"'{seen[p.stem].name}' and '{p.name}' in '{d}' would both be restored to "
                              f"'{p.stem}.png'; rename one")
        seen[p.stem] = p
    if simulate:
        return pngs, 0
    inputs = []
    for p in pngs:
        side = p.with_suffix(".json")
        if not side.is_file():
            continue
        meta = _read_json(side)
        if meta is _UNREADABLE or (isinstance(meta, dict) and meta.get("kind") == "measurement"):
            inputs.append(p)
    if not inputs:
        raise StudioError(f"none of the {len(pngs)} PNG(s) in '{d}' is a measurement (a PNG with the .json "
                          f"sidecar `studio degrade` writes); use --simulate --task T to degrade clean "
                          f"images first")
    return inputs, len(pngs) - len(inputs)


def _outputs(job: _Job, name: str) -> tuple[Path, Path]:
    out = Path(job.output_dir) / (Path(name).stem + ".png")
    return out, out.with_suffix(".json")


def _output_names(job: _Job, name: str) -> list[str]:
    """Every file restoring ``name`` writes: PNG, sidecar and, with ``simulate``, the measurement PNG."""
    png, side = _outputs(job, name)
    return [png.name, side.name] + ([f"{png.stem}.measurement.png"] if job.simulate else [])


def _finished(job: _Job, name: str) -> dict | None:
    """The sidecar of an input this batch finished (PNG present, sidecar with its ``batch`` record), else
    ``None``: a PNG alone, or with the solve's sidecar before the batch's, is a run killed in between."""
    png, side = _outputs(job, name)
    if not png.is_file():
        return None
    meta = _read_json(side)
    return meta if isinstance(meta, dict) and isinstance(meta.get("batch"), dict) else None


def _done(job: _Job, name: str) -> bool:
    return _finished(job, name) is not None


def _remove_temporaries(folder: Path, *names: str) -> None:
    """Delete what a killed :func:`studio.core.io.write_set` left for ``names``: ``.<name>.<random>.tmp``.
    Only the process that writes ``names`` calls this, so no write in flight is touched."""
    wanted = re.compile(f"^{staged_temporary_pattern(names)}$")
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if wanted.match(entry.name):
            Path(entry.path).unlink(missing_ok=True)


def _share(names: list[str], rank: int, world: int) -> list[str]:
    """Process ``rank``'s contiguous chunk of ``names``: the split accelerate's
    ``PartialState.split_between_processes`` makes (the first ``len % world`` chunks are one item longer),
    for the spawned workers, which run without a launcher."""
    per, extra = divmod(len(names), world)
    start = rank * per + min(rank, extra)
    return names[start:start + per + (1 if rank < extra else 0)]


def _record(job: _Job, name: str, rank: int, **fields: Any) -> dict:
    """The start of an input's record in the summary: names, process, then ``fields`` (status, ...)."""
    return {"input": name, "output": _outputs(job, name)[0].name, "process": rank, **fields}


# ---------------------------------------------------------------------------------------------- worker


def _error_text(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, StudioError) else f"{type(err).__name__}: {text}"


def _restore_share(job: _Job, mine: list[str], rank: int, world: int) -> list[dict]:
    """Restore ``mine``, process ``rank``'s share of the inputs; one record each.

    The model is loaded once, at the first input that is not already done. A failing input is recorded
    and the share goes on; a model that cannot be loaded raises (it would fail every input)."""
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    records: list[dict] = []
    prior = None
    bar = tqdm(total=len(mine), desc=f"restore [{rank}]", position=rank, leave=True, dynamic_ncols=True,
               disable=not job.progress)
    try:
        for name in mine:
            _remove_temporaries(Path(job.output_dir), *_output_names(job, name))
            if _done(job, name):
                records.append(_record(job, name, rank, status="skipped"))
            else:
                if prior is None:
                    prior = load_prior(job.model, job.device, latent=job.latent)
                records.append(_restore_one(job, name, prior, rank, world, bar))
            bar.update(1)
    finally:
        bar.close()
    return records


def _restore_one(job: _Job, name: str, prior: Any, rank: int, world: int, bar: tqdm) -> dict:
    """Restore one input with the loaded ``prior``; its record (``failed`` with the error, not raised)."""
    png, side_path = _outputs(job, name)
    rec = _record(job, name, rank)
    start = time.perf_counter()
    try:
        side = restoration.restore_files(
            str(Path(job.input_dir) / name), str(png), task=job.task, solver=job.solver, model=prior,
            seed=job.seed, steps=job.steps, overrides=list(job.overrides), simulate=job.simulate,
            device=job.device, progress=False, argv=job.argv)
        # restore_files names a prior object by its type: keep the model's name, add the batch
        side = {**side, "model_name": job.model,
                "batch": {"process": rank, "processes": world, "wall_time_s": time.perf_counter() - start}}
        write_json_atomic(side, side_path)
    except Exception as err:  # one bad input must not stop the batch
        rec.update(status="failed", error=_error_text(err), wall_time_s=time.perf_counter() - start)
        if job.progress:
            bar.write(f"studio: failed {name}: {rec['error']}")
        return rec
    return _restored(rec, side, time.perf_counter() - start)


def _restored(rec: dict, side: dict, wall: float) -> dict:
    """``rec`` of a restored input, completed from its sidecar ``side``."""
    rec.update(status="restored", wall_time_s=wall, solve_time_s=side.get("total_time_s"),
               nfe=side.get("nfe"))
    if isinstance(side.get("metrics"), dict):
        rec["metrics"] = {k: side["metrics"][k] for k in ("psnr", "ssim") if k in side["metrics"]}
    return rec


def _after_broken_pool(job: _Job, name: str, rank: int, done_before: bool, error: str) -> dict:
    """The record of an input whose worker's pool broke (a worker died): what is on disk says whether it was
    finished (before this run: skipped; in it: restored) or not (failed with ``error``)."""
    side = _finished(job, name)
    if side is None:
        return _record(job, name, rank, status="failed", error=error)
    if done_before:
        return _record(job, name, rank, status="skipped")
    return _restored(_record(job, name, rank), side, float(side["batch"].get("wall_time_s") or 0.0))


def _spawned_worker(job: _Job, mine: list[str], rank: int, world: int) -> list[dict]:
    """Entry point of a worker spawned by ``processes=N`` (module level: picklable)."""
    return _restore_share(job, mine, rank, world)


# ---------------------------------------------------------------------------------------------- launch


def _launched_world() -> int:
    """The world size an ``accelerate launch`` (torchrun) set, read without importing accelerate; 1 when
    not launched."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _validate(job: _Job, inputs: list[Path]) -> None:
    """Config errors shared by every input (task, overrides, steps) fail once, before any work."""
    task_over, solver_over = split_overrides(job.overrides)
    if job.steps is not None:
        solver_over = [*solver_over, f"steps={job.steps}"]
    for t in sorted(_tasks_of(job, inputs)):
        load_task(t, task_over)
        steps = solver_config(job.solver, t, solver_over).get("steps", None)
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0):
            raise StudioError(f"steps must be a positive integer, got {steps!r}")


def _tasks_of(job: _Job, inputs: list[Path]) -> set[str]:
    """The batch's task, else the known tasks the measurements' sidecars name (an input naming an
    unknown task fails on its own)."""
    if job.task:
        return {job.task}
    tasks: set[str] = set()
    for p in inputs:
        meta = _read_json(p.with_suffix(".json"))
        if isinstance(meta, dict) and isinstance(meta.get("task"), str) and meta["task"] not in tasks:
            try:
                load_task(meta["task"])
            except StudioError:
                continue
            tasks.add(meta["task"])
    return tasks


def _check_arguments(solver: str, processes: Any, steps: Any, simulate: bool, task: str | None,
                     device: str) -> SolverInfo:
    """Argument errors, before any file is read; the solver's registry entry."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise StudioError(f"--processes must be a positive integer, got {processes!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise StudioError(f"--steps must be a positive integer, got {steps!r}")
    info = get_solver(solver)
    if simulate and task is None:
        raise StudioError("--simulate needs --task")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise StudioError(f"--device {device}: no CUDA device is available")
    return info


def _check_output_dir(out_dir: Path, input_dir: str | os.PathLike) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise StudioError(f"output folder '{out_dir}' is a file")
    if out_dir.resolve() == Path(input_dir).resolve():
        raise StudioError("--output-dir must differ from --input-dir (outputs are named like the inputs)")


def restore_batch(input_dir: str | os.PathLike, output_dir: str | os.PathLike, *, solver: str,
                  task: str | None = None, model: str | None = None, steps: int | None = None, seed: int = 0,
                  overrides: Iterable[str] = (), processes: int = 1, device: str = "cpu",
                  simulate: bool = False, progress: bool = True, argv: list[str] | None = None) -> dict:
    """Restore every measurement in ``input_dir`` into ``output_dir`` (see the module docstring).

    Returns the summary written to ``<output_dir>/batch.json`` (counts ``inputs``, ``restored``,
    ``skipped``, ``failed``; ``failures`` with the error of each failed input; ``items`` with one
    record per input, per-image wall time included), plus ``main_process`` (False on the other ranks
    of an ``accelerate launch``, which write nothing).

    Raises:
        StudioError: missing folder or no inputs, ``processes < 1``, unknown solver/task, bad overrides,
            ``simulate`` without ``task``, a model that cannot be loaded, or CUDA asked for but absent.
    """
    t0 = time.perf_counter()
    info = _check_arguments(solver, processes, steps, simulate, task, device)
    inputs, ignored = find_inputs(input_dir, simulate)
    out_dir = Path(output_dir)
    _check_output_dir(out_dir, input_dir)
    if model is None:
        model = default_model(TEXT_TO_IMAGE if info.latent else PIXEL)
    job = _Job(input_dir=str(input_dir), output_dir=str(out_dir), solver=solver, task=task, model=str(model),
               latent=info.latent, steps=steps, seed=int(seed), overrides=tuple(overrides), simulate=simulate,
               device=str(device), progress=progress, argv=argv)
    _validate(job, inputs)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StudioError(f"cannot create output folder '{out_dir}': {err.strerror or err}") from err
    names = [p.name for p in inputs]

    if _launched_world() > 1:
        if processes != 1:
            raise StudioError("use either `accelerate launch --num_processes N` or --processes N, not both")
        records, rank, processes, launcher = _run_distributed(job, names)
    else:
        rank, launcher = 0, ("spawn" if processes > 1 else "single")
        records = _run_spawned(job, names, processes) if processes > 1 else _restore_share(job, names, 0, 1)
    summary = _summary(job, names, records, ignored, processes, launcher, time.perf_counter() - t0)
    if rank == 0:
        _remove_temporaries(out_dir, SUMMARY_NAME)
        write_json_atomic(summary, out_dir / SUMMARY_NAME)
    return {**summary, "main_process": rank == 0}


def _run_distributed(job: _Job, names: list[str]) -> tuple[list[dict], int, int, str]:
    """One rank of ``accelerate launch``: restore this rank's chunk of ``names``
    (``split_between_processes``), then gather every rank's records (``gather_object``)."""
    from accelerate import PartialState  # lazy: optional package, needed only under `accelerate launch`
    from accelerate.utils import gather_object

    # cpu=True gives gloo (without it, a CPU-only `--multi_gpu` launch yields N independent world-size-1
    # states); a long timeout: ranks wait for the slowest share at the final gather
    cpu = not (job.device.startswith("cuda") and torch.cuda.is_available())
    state = PartialState(cpu=cpu, timeout=timedelta(days=7))
    if state.num_processes != _launched_world():
        raise StudioError(f"accelerate started {_launched_world()} processes but they did not form one "
                          f"group (distributed type {state.distributed_type})")
    rank, world = state.process_index, state.num_processes
    device = job.device
    if device == "cuda" and state.device.type == "cuda":
        device = str(state.device)  # cuda:<local rank>
    with state.split_between_processes(names) as mine:
        records = _restore_share(replace(job, device=device), mine, rank, world)
    records = gather_object(records)
    # leave the group together: a rank exiting with gloo's threads still alive aborts
    # ("terminate called without an active exception", seen on a clean CI run)
    state.wait_for_everyone()
    state.destroy_process_group()
    return records, rank, world, "accelerate"


def _run_spawned(job: _Job, names: list[str], processes: int) -> list[dict]:
    """``processes`` worker processes (spawn), each with cpu_count // N torch threads and, on several
    GPUs, its own ``cuda:k``. Shares already fully restored are skipped here without a worker."""
    shares = [_share(names, k, processes) for k in range(processes)]
    done_before = {n for n in names if _done(job, n)}
    records: list[dict] = []
    todo = []
    for k, mine in enumerate(shares):
        if all(n in done_before for n in mine):
            records += [_record(job, n, k, status="skipped") for n in mine]
        else:
            todo.append(k)
    if not todo:
        return records
    threads = max(1, _cpu_count() // processes)
    n_gpu = torch.cuda.device_count() if job.device == "cuda" else 0
    errors: list[BaseException] = []
    with ProcessPoolExecutor(max_workers=len(todo), mp_context=mp.get_context("spawn")) as pool:
        futures = {}
        for k in todo:
            device = f"cuda:{k % n_gpu}" if n_gpu > 1 else job.device
            futures[k] = pool.submit(_spawned_worker, replace(job, device=device, threads=threads), shares[k],
                                     k, processes)
        for k, fut in futures.items():
            try:
                records += fut.result()
            except StudioError as err:  # e.g. the model cannot be loaded: every worker says the same
                errors.append(err)
            except BrokenProcessPool as err:  # a worker died (killed?); the pool stopped the others
                msg = f"worker process {k} stopped: {' '.join(str(err).split())}"
                records += [_after_broken_pool(job, n, k, n in done_before, msg) for n in shares[k]]
    if errors:
        raise errors[0]
    return records


def _summary(job: _Job, names: list[str], records: list[dict], ignored: int, processes: int, launcher: str,
             wall: float) -> dict:
    by_name = {r["input"]: r for r in records}
    items = [by_name.get(n, {"input": n, "status": "failed", "error": "not processed"}) for n in names]
    count = {s: sum(1 for r in items if r["status"] == s) for s in ("restored", "skipped", "failed")}
    restored_times = [r["wall_time_s"] for r in items if r["status"] == "restored"]
    return {
        "kind": "restore_batch",
        "input_dir": job.input_dir,
        "output_dir": job.output_dir,
        "solver": job.solver,
        "task": job.task,
        "model": job.model,
        "steps": job.steps,
        "seed": job.seed,
        "overrides": list(job.overrides),
        "simulate": job.simulate,
        "device": job.device,
        "processes": processes,
        "launcher": launcher,
        "inputs": len(names),
        **count,
        "ignored_pngs": ignored,
        "failures": [{"input": r["input"], "error": r.get("error", "")} for r in items
                     if r["status"] == "failed"],
        "total_wall_time_s": wall,
        "mean_image_time_s": sum(restored_times) / len(restored_times) if restored_times else None,
        "items": items,
        "command": job.argv,
        "versions": software_versions(),
    }


__all__ = ["restore_batch", "find_inputs", "SUMMARY_NAME"]
