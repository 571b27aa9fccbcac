"""How the attention control's settings trade edit success against background preservation on emoji-sd,
measured on the TRAINING-set tuning edits (configs/edits-tuning.yaml), never on the held-out test edits.

    .venv/bin/python docs/bench/edit-tuning/sweep.py    # every setting: about an hour on 2 CPU cores
    .venv/bin/python docs/bench/edit-tuning/sweep.py --part wide --methods null-text --only \
        "plain,p2p px cr0.4 w10,p2p px cr0.4 w7.5,p2p px cr0.2 w10,p2p px ce0.4 w10,p2p px ce0.2 w10,\
p2p px ce0 w10,p2p px cr0.4 ce0.2 w10"    # all 14 edits, about 20 minutes
    .venv/bin/python docs/bench/edit-tuning/sweep.py --part wide2 --methods null-text --only \
        "p2p px cr0.4 sr0.2 w10,p2p px cr0.4 sr0.6 w10,p2p px cr0.4 t0.2 w10,p2p px cr0.4 t0.1 w10"
    .venv/bin/python docs/bench/edit-tuning/sweep.py --part su --methods null-text --only \
        "p2p px cr0.4 su w10,p2p px su w10,p2p px cr0.4 su w7.5"
    .venv/bin/python docs/bench/edit-tuning/sweep.py --part blend-only --methods null-text --only \
        "plain,p2p px cr0 sr0 w10,p2p px cr0 sr0 w7.5"    # diagnostics: the blends without the injections
    .venv/bin/python docs/bench/edit-tuning/sweep.py --part fill-nt --methods null-text --only \
        "p2p px cr0.4 fh w10"
    .venv/bin/python docs/bench/edit-tuning/sweep.py --part fill-nd --methods newton,ddim --only \
        "plain,p2p px w5,p2p px fh w5"

Each (edit, inversion) is inverted once; every setting then regenerates from that inversion. Scores as in
``studio bench-edit`` (studio/eval/edit_bench.py): edit success = L(edit | source) − L(edit | target) over
paired draws; background = PSNR outside the default control's blend mask. Writes results.md/json here.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

from solvers.inversion import get_inverter
from solvers.inversion.attention_control import controlled_regeneration, edited_words, pixel_blend
from solvers.inversion.ddim import regenerate
from studio.core.conventions import to_model
from studio.core.io import load_image, write_json_atomic
from studio.core.metrics import masked_metrics
from studio.eval.edit_bench import prompt_losses, success
from studio.eval.edit_strip import load_edits, resolve_edit_image
from studio.workflows import editing

HERE = Path(__file__).parent
METHODS = {"newton": 10, "null-text": 50, "ddim": 50}
FIRST_EDITS = 7  # the tuning set until 2026-12-05 (the first parts were run on these only)
SETTINGS = {  # name: (control, overrides, edit guidance; None = the inversion's)
    "plain": ("none", {}, None),
    "plain w3": ("none", {}, 3.0),
    "plain w5": ("none", {}, 5.0),
    "plain w7.5": ("none", {}, 7.5),
    "plain w10": ("none", {}, 10.0),
    "p2p": ("auto", {}, None),
    "p2p w3": ("auto", {}, 3.0),
    "p2p w4": ("auto", {}, 4.0),
    "p2p w5": ("auto", {}, 5.0),
    "p2p w7.5": ("auto", {}, 7.5),
    "p2p w10": ("auto", {}, 10.0),
    "p2p w12.5": ("auto", {}, 12.5),
    "p2p b8 w5": ("auto", {"blend_side": 8}, 5.0),
    "p2p b4 s4 w5": ("auto", {"blend_side": 4, "self_max_side": 4}, 5.0),
    "p2p s8 w5": ("auto", {"self_max_side": 8}, 5.0),
    "p2p s4 w5": ("auto", {"self_max_side": 4}, 5.0),
    "p2p sr0.2 w5": ("auto", {"self_replace": 0.2}, 5.0),
    "p2p s8 w10": ("auto", {"self_max_side": 8}, 10.0),
    "p2p s4 w10": ("auto", {"self_max_side": 4}, 10.0),
    "p2p px w5": ("auto", {"pixel_blend": True}, 5.0),
    "p2p px w10": ("auto", {"pixel_blend": True}, 10.0),
    "p2p px rw2 w5": ("auto", {"pixel_blend": True, "reweight_words": "new"}, 5.0),
    "p2p px rw2 w7.5": ("auto", {"pixel_blend": True, "reweight_words": "new"}, 7.5),
    "p2p px rw2 w10": ("auto", {"pixel_blend": True, "reweight_words": "new"}, 10.0),
    "p2p px cr0.4 w5": ("auto", {"pixel_blend": True, "cross_replace": 0.4}, 5.0),
    "p2p px cr0.6 w10": ("auto", {"pixel_blend": True, "cross_replace": 0.6}, 10.0),
    "p2p px cr0.4 w10": ("auto", {"pixel_blend": True, "cross_replace": 0.4}, 10.0),
    "p2p px cr0.4 w7.5": ("auto", {"pixel_blend": True, "cross_replace": 0.4}, 7.5),
    "p2p px cr0.2 w10": ("auto", {"pixel_blend": True, "cross_replace": 0.2}, 10.0),
    "p2p px ce0.4 w10": ("auto", {"pixel_blend": True, "cross_replace_edited": 0.4}, 10.0),
    "p2p px ce0.2 w10": ("auto", {"pixel_blend": True, "cross_replace_edited": 0.2}, 10.0),
    "p2p px ce0 w10": ("auto", {"pixel_blend": True, "cross_replace_edited": 0.0}, 10.0),
    "p2p px cr0.4 ce0.2 w10": ("auto", {"pixel_blend": True, "cross_replace": 0.4,
                                        "cross_replace_edited": 0.2}, 10.0),
    "p2p px cr0.4 sr0.2 w10": ("auto", {"pixel_blend": True, "cross_replace": 0.4, "self_replace": 0.2},
                               10.0),
    "p2p px cr0.4 sr0.6 w10": ("auto", {"pixel_blend": True, "cross_replace": 0.4, "self_replace": 0.6},
                               10.0),
    "p2p px cr0.4 t0.2 w10": ("auto", {"pixel_blend": True, "cross_replace": 0.4, "blend_threshold": 0.2},
                              10.0),
    "p2p px cr0.4 t0.1 w10": ("auto", {"pixel_blend": True, "cross_replace": 0.4, "blend_threshold": 0.1},
                              10.0),
}


SETTINGS.update({  # part su (2026-12-05): self-attention injected into the unconditional pair too
    "p2p px cr0.4 su w10": ("auto", {"pixel_blend": True, "cross_replace": 0.4, "self_unconditional": True},
                            10.0),
    "p2p px su w10": ("auto", {"pixel_blend": True, "self_unconditional": True}, 10.0),
    "p2p px cr0.4 su w7.5": ("auto", {"pixel_blend": True, "cross_replace": 0.4, "self_unconditional": True},
                             7.5),
    # diagnostics, not candidates (they turn off both injections that keep the layout): only the blends
    "p2p px cr0 sr0 w10": ("auto", {"pixel_blend": True, "cross_replace": 0.0, "self_replace": 0.0}, 10.0),
    "p2p px cr0 sr0 w7.5": ("auto", {"pixel_blend": True, "cross_replace": 0.0, "self_replace": 0.0}, 7.5),
    # part fill (2026-12-05): the blend mask's enclosed holes filled
    "p2p px cr0.4 fh w10": ("auto", {"pixel_blend": True, "cross_replace": 0.4, "blend_fill_holes": True},
                            10.0),
    "p2p px fh w5": ("auto", {"pixel_blend": True, "blend_fill_holes": True}, 5.0),
})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(SETTINGS), help="comma list of settings")
    parser.add_argument("--part", default="main", help="results-<part>.json; the table merges every part")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of inversion methods")
    parser.add_argument("--table-only", action="store_true", help="only re-write results.md from the parts")
    args = parser.parse_args()
    if args.table_only:
        write_table()
        return
    chosen = {k: SETTINGS[k] for k in args.only.split(",")}
    prior = editing.latent_prior_for(None)
    rows = []
    for spec in load_edits("configs/edits-tuning.yaml"):
        image = load_image(resolve_edit_image(spec.image))
        prompts = [spec.source, spec.target]
        for method in args.methods.split(","):
            steps = METHODS[method]
            fn, w = get_inverter(method)
            with torch.no_grad():
                z0 = prior.encode(to_model(image))
            inv = fn(prior, z0, prompt=spec.source, guidance=w, steps=steps)
            keep = None
            for name, (control, overrides, w_edit) in {"p2p": SETTINGS["p2p"], **chosen}.items():
                if overrides.get("reweight_words") == "new":  # the target's words the source lacks
                    overrides = {**overrides, "reweight_words": list(edited_words(spec.source, spec.target))}
                settings = editing.control_settings(control, overrides)
                if control == "none":
                    z = regenerate(prior, inv, prompt=spec.target, guidance=w_edit)
                    mask = None
                else:
                    z_rec, z, mask = controlled_regeneration(prior, inv, spec.target, settings, w_edit)
                with torch.no_grad():
                    edited = editing._decoded(prior, z)
                    if settings.pixel_blend and mask is not None:
                        edited = pixel_blend(edited, editing._decoded(prior, z_rec), mask)
                if name == "p2p":
                    keep = 1 - torch.nn.functional.interpolate(mask, size=image.shape[-2:])
                if name == "p2p" and "p2p" not in chosen:
                    continue
                rows.append({"image": spec.image, "target": spec.target, "kind": spec.kind, "method": method,
                             "setting": name,
                             "success": success(prompt_losses(prior, edited, prompts)),
                             "edited": edited, "mask_fraction": None if mask is None else float(mask.mean())})
            for r in rows:
                if "edited" in r and r["image"] == spec.image and r["method"] == method:
                    r["background_psnr"] = masked_metrics(r.pop("edited"), image, keep)["psnr"]
            print(spec.target, method, file=sys.stderr)
    write_json_atomic({"rows": rows, "settings": {k: list(v) for k, v in chosen.items()}},
                      HERE / f"results-{args.part}.json")
    write_table()


def write_table() -> None:
    """results.md from every results-<part>.json here: one row per (inversion, setting) and edit set; a
    later part (by name) replaces an earlier one's row for the same (edit, inversion, setting)."""
    latest = {}
    for f in sorted(HERE.glob("results-*.json")):
        for r in json.loads(f.read_text())["rows"]:
            latest[(r["image"], r["target"], r["method"], r["setting"])] = r
    rows = list(latest.values())
    edits = [(e.image, e.target) for e in load_edits("configs/edits-tuning.yaml")]
    sections = [f"### The first {FIRST_EDITS} edits\n\n" + "\n".join(_table(rows, edits[:FIRST_EDITS])),
                f"### All {len(edits)} edits\n\n" + "\n".join(_table(rows, edits))]
    # the docstring's backslash-newlines already joined each command into one line, with the indent inside
    commands = "\n".join(re.sub(r"(\S) {2,}([^\s#])", r"\1 \2", line.strip()) for line in __doc__.splitlines()
                         if line.startswith("    "))
    (HERE / "results.md").write_text(
        "# Attention-control sweep on the tuning edits (emoji-sd)\n\n"
        "Training-set emoji (configs/edits-tuning.yaml); setting names: p2p = attention control (auto), "
        "plain = no control; wN = edit-branch guidance N (none: the inversion's, 1 for newton/ddim, 7.5 "
        "for null-text); b8 = blend mask read at 8² positions (default 16²); b4 s4 = blend at 4² and "
        "self-attention injected only at ≤ 4² (the older default's levels on this model: a quarter of "
        "the latent side; its own full sweep is in fractional-sizes/); s8, s4 = self-attention injected "
        "only in layers of ≤ 8², ≤ 4² positions; sr0.2 = self_replace 0.2 (default 0.4); px = pixel_blend "
        "(outside the mask, the decoded reconstruction); rw2 = the target's new words' cross-attention "
        "reweighted ×2; crF = cross_replace F (default 0.8); ceF = cross_replace_edited F (in a word "
        "swap the swapped-in words take the source's cross-attention for F of the steps, the other words "
        "for cross_replace; no effect on the refine edit pear → green apple); tF = blend_threshold F "
        "(default 0.3); su = self_unconditional (the self-attention injection also in the unconditional "
        "half of the guided batch, as MasaCtrl does; official: the conditional half only); "
        "fh = blend_fill_holes (the blend mask's enclosed holes filled); "
        "cr0 sr0 = no attention injected at all, only the latent and pixel blends (diagnostic rows, not "
        "candidates). "
        "Edit success = L(edit | source) − "
        "L(edit | target); background = PSNR outside the default control's mask (p2p at the inversion's "
        "guidance); − plain = the mean over the edits of each edit's success minus plain regeneration's "
        "after the same inversion, ± its standard error from the spread of those gaps over the edits "
        "(as the edit bench's 'SE over edits').\n\n"
        "The first seven edits of configs/edits-tuning.yaml were the tuning set until 2026-12-05; the "
        "next seven were added then, before any setting was tried on them, and only the settings run "
        "on all fourteen have rows in the second table.\n\n"
        f"Command:\n\n```\n{commands}\n```\n\n" + "\n\n".join(sections) + "\n")
    print("\n\n".join(sections))


def _table(rows: list[dict], edits: list[tuple[str, str]]) -> list[str]:
    """Means over ``edits`` ((image, target) pairs) of every (inversion, setting) run on all of them."""
    table = ["| inversion | setting | edit success | − plain ± SE over edits | colour | object, expression "
             "| background PSNR (dB) | edits |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        plain = {(r["image"], r["target"]): r["success"] for r in rows
                 if r["method"] == method and r["setting"] == "plain"}
        for name in SETTINGS:
            sel = [r for r in rows if r["method"] == method and r["setting"] == name
                   and (r["image"], r["target"]) in edits]
            if len(sel) != len(edits):
                continue
            gaps = [r["success"] - plain[(r["image"], r["target"])] for r in sel
                    if (r["image"], r["target"]) in plain]
            vs_plain = ("—" if name == "plain" or len(gaps) != len(sel) else
                        f"{statistics.fmean(gaps):+.4f} ± {statistics.stdev(gaps) / len(gaps) ** 0.5:.4f}")
            bg = [r["background_psnr"] for r in sel if r["background_psnr"] is not None]
            kinds = [statistics.fmean(r["success"] for r in sel if (r.get("kind") == "colour") == colour)
                     for colour in (True, False)]
            table.append(f"| {method} | {name} | {statistics.fmean(r['success'] for r in sel):+.4f} | "
                         f"{vs_plain} | {kinds[0]:+.4f} | {kinds[1]:+.4f} | "
                         f"{statistics.fmean(bg) if bg else float('nan'):.2f} "
                         f"({len(bg)} with a background) | {len(sel)} |")
    return table


if __name__ == "__main__":
    main()
