"""The bench's numbers over runs: per (task, solver) means and stds (:func:`summarize`) and each solver
variant against its base solver, paired over the same measurements (:func:`variant_comparisons`)."""

from __future__ import annotations

import math
import statistics

from studio.eval.bench.records import run_key


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def mean_trace(traces: list[list[float] | None]) -> list[float] | None:
    """Per-step mean of the runs' residual traces (runs without one left out; cut to the shortest)."""
    traces = [t for t in traces if t]
    if not traces:
        return None
    n = min(len(t) for t in traces)
    return [statistics.fmean(t[i] for t in traces) for i in range(n)]


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (task, solver): means/stds over images × seeds; sorted by task, then PSNR (best first).

    Peak memory is the largest over the runs; failed and unsupported runs are counted, not averaged.
    ``residual_trace`` is the per-step mean of the runs' traces; ``clean_residual`` the mean residual of the
    clean images (the drawn noise's norm) for the same measurements."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["solver"]), []).append(r)
    out = []
    for (task, solver), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        entry = {
            "task": task,
            "solver": solver,
            "runs": len(ok),
            "failed": sum(r["status"] == "failed" for r in rs),
            "unsupported": all(r["status"] == "unsupported" for r in rs),
        }
        entry["psnr"], entry["psnr_std"] = mean_std([r["psnr"] for r in ok])
        entry["ssim"], entry["ssim_std"] = mean_std([r["ssim"] for r in ok])
        entry["nfe"] = mean_std([r["nfe"] for r in ok])[0]
        entry["wall_time_s"] = mean_std([r["wall_time_s"] for r in ok])[0]
        mems = [r["peak_memory_mb"] for r in ok if r["peak_memory_mb"] is not None]
        entry["peak_memory_mb"] = max(mems) if mems else math.nan
        entry["overhead_ratio"] = mean_std([r["overhead_ratio"] for r in ok])[0]
        entry["residual"], entry["residual_std"] = mean_std([r.get("residual") for r in ok])
        entry["clean_residual"] = mean_std([r.get("clean_residual") for r in rs])[0]
        entry["residual_trace"] = mean_trace([r.get("residual_trace") for r in ok])
        out.append(entry)
    return sorted(
        out, key=lambda e: (e["task"], e["unsupported"], -(e["psnr"] if math.isfinite(e["psnr"]) else -1e9))
    )


def variant_comparisons(rows: list[dict]) -> list[dict]:
    """Each solver variant against its base solver, paired over the (task, image, seed) runs both finished:
    mean ± std of PSNR(base) − PSNR(variant) (dB) and of residual(base) − residual(variant) ([0, 1] units),
    and on how many pairs the base has the higher PSNR / the lower final residual."""
    ok = {run_key(r): r for r in rows if r.get("status") == "ok"}
    pairs: dict[tuple[str, str, str], list[tuple[dict, dict]]] = {}
    for (task, label, image, seed), r in ok.items():
        base = r.get("solver_base")
        if r.get("solver_overrides") and (task, base, image, seed) in ok:
            pairs.setdefault((task, base, label), []).append((ok[(task, base, image, seed)], r))
    out = []
    for (task, base, label), ps in sorted(pairs.items()):
        d_psnr = [b["psnr"] - v["psnr"] for b, v in ps]
        d_res = [b["residual"] - v["residual"] for b, v in ps if b.get("residual") is not None
                 and v.get("residual") is not None]
        (gain, gain_std), (change, change_std) = mean_std(d_psnr), mean_std(d_res)
        out.append({
            "task": task,
            "base": base,
            "variant": label,
            "pairs": len(ps),
            "psnr_gain_db": gain,
            "psnr_gain_std": gain_std,
            "residual_change": change,
            "residual_change_std": change_std,
            "base_higher_psnr": sum(d > 0 for d in d_psnr),
            "base_lower_residual": sum(d < 0 for d in d_res),
        })
    return out
