"""``studio bench-merge``: one report from bench runs split across processes (e.g. tasks on different
cores), after checking that the parts were run with the same settings."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from studio.core.errors import StudioError
from studio.eval.bench.records import run_key
from studio.eval.bench.report import BenchResult, write_report
from studio.eval.bench.summary import summarize


def _read_parts(parts: list[Path]) -> list[dict]:
    """Each part's ``results.json`` (at least two parts, each a finished bench folder)."""
    if len(parts) < 2:
        raise StudioError(f"bench-merge needs at least two result folders, got {len(parts)}")
    metas = []
    for part in parts:
        path = part / "results.json"
        if not path.is_file():
            raise StudioError(f"{part} has no results.json (not a finished `studio bench` folder)")
        metas.append(json.loads(path.read_text()))
    return metas


def _merged_steps(parts: list[Path], metas: list[dict]) -> dict:
    """The parts' common settings, checked, and their ``--steps`` merged per solver.

    Parts must share the model, the task overrides and the device; a solver's steps must agree between
    the parts that ran it. ``--steps`` entries for solvers a part did not run do not matter, so
    ``latent-dps=100,p2l=100`` and ``p2l=100`` merge when P2L ran 100 steps in both."""
    def common(m: dict) -> tuple:
        return (m["model_name"], tuple(m["task_overrides"]), m["machine"].get("device"))

    if len({common(m) for m in metas}) != 1:
        raise StudioError("bench-merge: the parts were run with different settings ("
                          + "; ".join(f"{p}: model {c[0]}, overrides {list(c[1])}, device {c[2]}"
                                      for p, c in zip(parts, map(common, metas)))
                          + "): model, task overrides and device must match")
    steps: dict[str, int] = {}
    seen: dict[str, tuple[Path, int | None]] = {}
    for part, m in zip(parts, metas):
        ran = [r["solver_base"] or r["solver"] for r in m["rows"] if r.get("kind") != "classical"]
        for base in dict.fromkeys(ran):
            n = m["steps"].get(base)
            if base in seen and seen[base][1] != n:
                raise StudioError(f"bench-merge: the parts were run with different settings: solver "
                                  f"'{base}' ran with steps {seen[base][1] or 'default'} in {seen[base][0]} "
                                  f"and {n or 'default'} in {part}")
            seen[base] = (part, n)
            if n is not None:
                steps[base] = n
    return steps


def _dedupe_classical(rows: list[dict]) -> list[dict]:
    """A classical baseline run in more than one part (each part runs them for its tasks) is kept once when
    its results agree (they are deterministic given task, image and seed); a disagreement is an error."""
    out, kept = [], {}
    for r in rows:
        key = run_key(r)
        if r.get("kind") == "classical" and key in kept:
            first = kept[key]
            if r.get("status") != first.get("status") or (
                    r.get("status") == "ok" and not np.isclose(r["psnr"], first["psnr"], rtol=0, atol=1e-6)):
                raise StudioError(f"bench-merge: baseline run {key} differs between parts "
                                  f"(PSNR {first.get('psnr')} vs {r.get('psnr')}): not the same settings")
            continue
        kept[key] = r
        out.append(r)
    return out


def merge_results(parts: Iterable[str | Path], out: str | Path,
                  command: list[str] | None = None) -> BenchResult:
    """One report from bench runs split across processes (e.g. tasks on different cores): the rows of each
    part's ``results.json``, summarised, tabled, plotted and goal-checked as one run; per-run outputs and
    strips are copied alongside. The parts must share model, task overrides and device, and agree on the
    steps of every solver that more than one of them ran (:func:`_merged_steps`); no solver run may appear
    twice, except a classical baseline with the same result (:func:`_dedupe_classical`)."""
    parts = [Path(p) for p in parts]
    metas = _read_parts(parts)
    steps = _merged_steps(parts, metas)
    rows = _dedupe_classical([r for m in metas for r in m["rows"]])
    keys = [run_key(r) for r in rows]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise StudioError(f"bench-merge: run {dup} appears in more than one part")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        for sub in ("outputs", "strips"):
            if (part / sub).is_dir():
                shutil.copytree(part / sub, out / sub, dirs_exist_ok=True)
    timings = {k: v for m in metas for k, v in m.get("timings_this_session", {}).items()}
    notes = list(dict.fromkeys(n for m in metas for n in m["notes"]))
    notes += [f"part {i + 1} of {len(parts)} ({p}): `{' '.join(m['command'])}`"
              for i, (p, m) in enumerate(zip(parts, metas))]
    meta = {**{k: metas[0][k] for k in ("machine", "model_name", "model", "task_overrides")}, "steps": steps,
            "command": command or ["merge_results(...)"], "timings_this_session": timings, "notes": notes,
            "parts": [str(p) for p in parts]}
    return write_report(out, rows, summarize(rows), meta)
