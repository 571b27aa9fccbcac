"""Compare two runs of the same `studio bench` or `studio personalize-eval` command (e.g. before and after a
refactor) field by field, timings excepted, and print a Markdown summary.

    python docs/redesign-check/compare.py bench OLD_DIR NEW_DIR
    python docs/redesign-check/compare.py personalize-eval OLD_DIR NEW_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH_FIELDS = ("psnr", "ssim", "residual", "relative_residual", "clean_residual", "nfe", "grad_nfe",
                "residual_trace", "params", "status")
TIMING_WORDS = ("time", "_s", "seconds", "memory", "mb", "overhead", "command", "out", "machine", "date")


def bench_rows(folder: Path) -> dict:
    rows = (json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip())
    return {(r["task"], r["solver"], r["image"], r["seed"]): r for r in rows}


def compare_bench(old: Path, new: Path) -> list[str]:
    a, b = bench_rows(old), bench_rows(new)
    differing = [(k, f) for k in a.keys() & b.keys() for f in BENCH_FIELDS if a[k].get(f) != b[k].get(f)]
    first = f" (first: {differing[:3]})" if differing else ""
    return [f"- rows: {len(a)} before, {len(b)} after, same keys: {a.keys() == b.keys()}",
            f"- fields compared per row: {', '.join(BENCH_FIELDS)}",
            f"- rows × fields that differ: {len(differing)}{first}"]


def strip_timings(value, path: str = ""):
    """The value with every timing-like entry (wall time, paths, machine info) removed."""
    if isinstance(value, dict):
        return {k: strip_timings(v, f"{path}.{k}") for k, v in value.items()
                if not any(w in k.lower() for w in TIMING_WORDS)}
    if isinstance(value, list):
        return [strip_timings(v, path) for v in value]
    return value


def leaves(value, path: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def compare_personalize_eval(old: Path, new: Path) -> list[str]:
    a = dict(leaves(strip_timings(json.loads((old / "results.json").read_text()))))
    b = dict(leaves(strip_timings(json.loads((new / "results.json").read_text()))))
    differing = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return [f"- values compared (timings, paths and machine info left out): {len(a)} before, {len(b)} after",
            f"- values that differ: {len(differing)}" + (f" (first: {differing[:5]})" if differing else "")]


def main(argv: list[str]) -> int:
    kind, old, new = argv[0], Path(argv[1]), Path(argv[2])
    lines = {"bench": compare_bench, "personalize-eval": compare_personalize_eval}[kind](old, new)
    print(f"**{kind}**: `{old}` vs `{new}`\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
