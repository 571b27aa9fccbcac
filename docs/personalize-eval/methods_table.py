"""The README's personalization-methods table, from ``studio personalize-eval`` result folders.

    python docs/personalize-eval/methods_table.py docs/personalize-eval docs/personalize-eval-core \\
        docs/personalize-eval-hand docs/personalize-eval-hand-core

Folders of the same concept are joined (their runs share the concept, seed, draws and init-word losses;
the script checks that the init-word loss agrees); one column group per concept. Each cell: the loss drop
vs the init word (± std of the paired drop over the draw seeds), the steps to the plain run's final loss,
the best-match PSNR / SSIM of the samples and the editability (a token's edit gain / the init word's).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TITLES = {"plain": "TI", "cross-init": "Cross-Init", "xti": "XTI", "core": "TI + CoRe"}


def _concepts(folders: list[str]) -> dict[str, dict]:
    """{concept name: {"init": init-word entry, "runs": {run: entry}}} over the folders."""
    out: dict[str, dict] = {}
    for folder in folders:
        res = json.loads((Path(folder) / "results.json").read_text())
        entry = out.setdefault(res["concept"]["name"], {"init": res["init_word"], "runs": {}})
        if abs(entry["init"]["loss"] - res["init_word"]["loss"]) > 1e-9:
            raise SystemExit(f"{folder}: init-word loss differs from the concept's other folder")
        entry["runs"].update(res["runs"])
    return out


def _cell(run: dict, plain_final: float) -> str:
    steps = next((p["step"] for p in run["curve"] if p["loss"] <= plain_final), None)
    edit = run.get("edits", {}).get("editability")
    edit_text = "—" if edit is None or edit != edit else f"{edit:.2f}"
    reached = steps if steps is not None else f"> {run['steps_done']}"
    return (f"{run['drop_percent']:.1f} % ± {run['drop_std']:.1f} · {reached} · "
            f"{run['resemblance']['psnr']:.2f} / {run['resemblance']['ssim']:.3f} · {edit_text}")


def table(folders: list[str]) -> str:
    concepts = _concepts(folders)
    names = list(concepts)
    lines = ["| method | " + " | ".join(f"{n}: drop · steps to TI's final loss · PSNR / SSIM · editability"
                                          for n in names) + " |",
             "|---|" + "---|" * len(names)]
    init_cells = [f"0 · – · {c['init']['resemblance']['psnr']:.2f} / "
                  f"{c['init']['resemblance']['ssim']:.3f} · 1" for c in concepts.values()]
    lines.append(f"| init word ({', '.join(c['init']['word'] for c in concepts.values())}) | "
                 + " | ".join(init_cells) + " |")
    for run, title in TITLES.items():
        if not all(run in c["runs"] for c in concepts.values()):
            continue
        cells = [_cell(c["runs"][run], c["runs"]["plain"]["final_loss"]) for c in concepts.values()]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
