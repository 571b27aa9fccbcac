"""NeTI's dial, measured: resemblance and editability of a NeTI token at several nested-dropout truncations.

    python docs/personalize-eval/neti_truncation.py docs/personalize-eval-neti [--truncations 4,16,32,64,128]

Takes a ``studio personalize-eval`` folder with a ``neti`` run and re-uses its settings: the concept
images, template, init word, seed, sample count, DDIM steps, guidance and edits. For each truncation k
(the first k of the mapper's 128 hidden dimensions) it generates the run's samples again and scores them
exactly as ``personalize-eval`` does: the best-match PSNR / SSIM against the concept images, and the
editability (the mean edit gain of "<token>" inside the edits, over the init word's gain stored in the
folder). k = 128 is the run's own setting, so its row repeats the folder's numbers. Writes
``neti_truncation.md`` and ``.json`` and ``neti_truncation.png`` (one row of samples per k) into the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from studio.core.io import write_json_atomic
from studio.eval.personalize_eval import edit_gain, resemblance, write_sample_grid
from studio.training.textual_inversion import _load_images
from studio.workflows.personalize import generate, load_sd_pipeline


def sweep(folder: Path, truncations: list[int]) -> dict:
    res = json.loads((folder / "results.json").read_text())
    run, s, init = res["runs"]["neti"], res["settings"], res["init_word"]
    pipe = load_sd_pipeline(res["model"])
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = (_load_images(res["concept"]["files"], size) + 1) / 2
    token = run["config"]["placeholder"]
    gen = dict(n=s["n_samples"], steps=s["sample_steps"], guidance=s["guidance"], seed=s["seed"], pipe=pipe,
               embeddings=[str(folder / "neti" / "learned_embeds.safetensors")])
    edits = init["edits"]["edits"]
    rows, grid = [], [(f"concept ({len(images)})", images)]
    for k in truncations:
        start = time.perf_counter()
        samples = generate(s["template"].format(token), truncation=k, **gen)
        gains = [edit_gain(pipe, generate(s["template"].format(e.format(token)), truncation=k, **gen),
                           s["template"], init["word"], e, s["seed"], s["samples"]) for e in edits]
        match = resemblance(samples, images)
        rows.append({"truncation": k, "psnr": match["psnr"], "ssim": match["ssim"], "gains": gains,
                     "editability": float(np.mean(gains) / init["edits"]["gain"]),
                     "seconds": time.perf_counter() - start})
        grid.append((f"NeTI, truncation {k}", samples))
        print(f"truncation {k}: PSNR {match['psnr']:.2f}, SSIM {match['ssim']:.3f}, "
              f"editability {rows[-1]['editability']:.2f}", flush=True)
    out = {"folder": str(folder), "concept": res["concept"]["name"], "token": token, "edits": edits,
           "init_word_gain": init["edits"]["gain"], "rows": rows,
           "command": ["python", "docs/personalize-eval/neti_truncation.py", *sys.argv[1:]]}
    write_sample_grid(folder / "neti_truncation.png", grid,
                      f"seed {s['seed']}, DDIM {s['sample_steps']} steps, guidance {s['guidance']:g}")
    write_json_atomic(out, folder / "neti_truncation.json")
    (folder / "neti_truncation.md").write_text(markdown(out))
    return out


def markdown(out: dict) -> str:
    lines = [f"NeTI truncation on '{out['concept']}' (edits: {', '.join(repr(e) for e in out['edits'])})", "",
             "| truncation | PSNR | SSIM | editability |", "|---|---|---|---|"]
    lines += [f"| {r['truncation']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['editability']:.2f} |"
              for r in out["rows"]]
    return "\n".join(lines) + f"\n\n`{' '.join(out['command'])}`\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--truncations", default="4,16,32,64,128")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sweep(args.folder, [int(k) for k in args.truncations.split(",")])
