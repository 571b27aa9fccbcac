"""The README's personalization-methods tables, from ``studio personalize-eval`` result folders.

    python docs/personalize-eval/methods_table.py docs/personalize-eval docs/personalize-eval-core \\
        docs/personalize-eval-neti docs/personalize-eval-hand docs/personalize-eval-hand-core \\
        docs/personalize-eval-hand-neti docs/personalize-eval-seeds/*

Folders of the same concept and seed are joined (their runs share the concept, seed, draws and init-word
losses; the script checks that the init-word loss agrees). One table per concept, one row per method. With
several seeds (``--seed`` of ``personalize-eval``: it seeds training, the loss draws and the samples), each
number is listed per seed for two seeds and is the mean ± the std (ddof 1) over three or more, the steps
always per seed; with one seed, the drop's ± is the std of the paired drop over that run's draw seeds.

Columns: the loss drop vs the init word (%), the steps to reach that seed's TI final loss (curve points
every 25 steps; "> N" not reached in N), the best-match PSNR / SSIM of the samples, and the editability
(a token's edit gain / the init word's).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

TITLES = {"plain": "TI", "cross-init": "Cross-Init", "xti": "XTI", "neti": "NeTI", "core": "TI + CoRe",
          "neti-core": "NeTI + CoRe"}


def _concepts(folders: list[str]) -> dict[str, dict[int, dict]]:
    """{concept: {seed: {"init": init-word entry, "runs": {run: entry}}}} over the folders."""
    out: dict[str, dict[int, dict]] = {}
    for folder in folders:
        res = json.loads((Path(folder) / "results.json").read_text())
        by_seed = out.setdefault(res["concept"]["name"], {})
        entry = by_seed.setdefault(res["settings"]["seed"], {"init": res["init_word"], "runs": {}})
        if abs(entry["init"]["loss"] - res["init_word"]["loss"]) > 1e-9:
            raise SystemExit(f"{folder}: init-word loss differs from another folder of its concept and seed")
        entry["runs"].update(res["runs"])
    return out


def _steps(run: dict, plain_final: float) -> str:
    steps = next((p["step"] for p in run["curve"] if p["loss"] <= plain_final), None)
    return str(steps) if steps is not None else f"> {run['steps_done']}"


def _spread(values: list[float], spec: str, one_seed_std: float | None = None) -> str:
    values = [v for v in values if v == v]  # NaN editability (no edit gain with the word) is left out
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], spec) + ("" if one_seed_std is None else f" ± {one_seed_std:{spec}}")
    if len(values) == 2:  # a std of two values says little: both are shown
        return ", ".join(format(v, spec) for v in values)
    return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):{spec}}"


def _row(title: str, entries: list[dict], run: str) -> str:
    runs = [e["runs"][run] for e in entries]
    one = runs[0]["drop_std"] if len(runs) == 1 else None
    drop = _spread([r["drop_percent"] for r in runs], ".1f", one)
    steps = ", ".join(_steps(r, e["runs"]["plain"]["final_loss"]) for r, e in zip(runs, entries))
    psnr = _spread([r["resemblance"]["psnr"] for r in runs], ".2f")
    ssim = _spread([r["resemblance"]["ssim"] for r in runs], ".3f")
    edit = _spread([r.get("edits", {}).get("editability", math.nan) for r in runs], ".2f")
    return f"| {title} | {drop} | {steps} | {psnr} | {ssim} | {edit} |"


def table(folders: list[str]) -> str:
    parts = []
    for name, by_seed in _concepts(folders).items():
        seeds = sorted(by_seed)
        entries = [by_seed[s] for s in seeds]
        init = [e["init"] for e in entries]
        parts += [f"**{name}** (init word '{init[0]['word']}'; seeds {', '.join(map(str, seeds))})", "",
                  "| method | loss drop % | steps to TI's final loss | PSNR | SSIM | editability |",
                  "|---|---|---|---|---|---|",
                  f"| init word | 0 | – | {_spread([i['resemblance']['psnr'] for i in init], '.2f')} | "
                  f"{_spread([i['resemblance']['ssim'] for i in init], '.3f')} | 1 |"]
        parts += [_row(title, entries, run) for run, title in TITLES.items()
                  if all(run in e["runs"] for e in entries)]
        parts.append("")
    return "\n".join(parts).rstrip()


if __name__ == "__main__":
    print(table(sys.argv[1:]))
