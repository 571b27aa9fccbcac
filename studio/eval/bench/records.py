"""Bench records: the row layout (:data:`ROW_FIELDS`), ``results.jsonl`` (appended run by run, read back to
resume), run keys, settings ids, output paths and the machine description."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import diffusers
import psutil
import torch

from studio.core.io import to_jsonable


ROW_FIELDS = (
    "task", "solver", "image", "seed", "kind", "status", "psnr", "ssim", "nfe", "grad_nfe", "wall_time_s",
    "loop_time_s", "peak_memory_mb", "memory_kind", "overhead_ratio", "overhead_ratio_calibrated",
    "network_time_s", "network_grad_time_s", "t_fwd_s", "t_fwd_grad_s", "t_fwdbwd_s", "relative_residual",
    "residual", "clean_residual", "residual_trace", "trace_time_s", "solver_base", "solver_overrides",
    "solver_extra", "params", "output", "error", "settings",
)


def make_row(task: str, solver: str, image: str, seed: int, settings: str, **values) -> dict:
    row = {k: None for k in ROW_FIELDS}
    row.update(
        task=task,
        solver=solver,
        image=image,
        seed=seed,
        settings=settings,
        kind="classical" if solver.startswith("classical:") else "diffusion",
    )
    row.update(values)
    return row


def safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)



def output_path(out: Path, task: str, image: str, seed: int, solver: str) -> Path:
    return out / "outputs" / f"{safe_name(task)}-{safe_name(image)}-s{seed}" / f"{safe_name(solver)}.png"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of ``results.jsonl``; a torn last line (a crash mid-write) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row and flush it to disk (so a crash loses at most the run in progress)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(to_jsonable(row)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_key(row: dict) -> tuple:
    return (row["task"], row["solver"], row["image"], int(row["seed"]))


def machine_info(device: str) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def settings_id(model: str, task_over: list[str], device: str, steps: int | dict | None) -> str:
    """A row's settings: model, task overrides, device and the ``--steps`` given for its solver (None: the
    configured steps, or a baseline). Only the solver's own steps count, so ``--steps ddim=2`` and
    ``--steps ddim=2,cdim=2`` give ddim rows the same id. (Rows written before ids were per solver carry
    the id of the whole ``--steps`` dict; resume still accepts those.)"""
    text = json.dumps(
        {"model": model, "task_overrides": task_over, "steps": steps, "device": device}, sort_keys=True
    )
    return hashlib.sha1(text.encode()).hexdigest()[:12]
