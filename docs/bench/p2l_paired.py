"""Paired PSNR and final residual of P2L variants against the frozen-prompt run (``p2l:tune_prompt=false``).

Pairs are the (task, image, seed) runs present in the given ``results.jsonl`` files. ``studio bench-merge``
now merges these two folders too (it keys steps per solver), but its variant table pairs each variant with
its *base* solver (``p2l``, prompt lr 1e-4); this script pairs every P2L variant with the *frozen-prompt*
run instead, the ablation's question. Prints a Markdown table (mean ± std over pairs).

    python docs/bench/p2l_paired.py \\
        docs/bench/latent-emoji-sd/results.jsonl docs/bench/latent-emoji-sd-lr/results.jsonl
"""

import collections
import json
import sys

import numpy as np

FROZEN = "p2l:tune_prompt=false"

runs = collections.defaultdict(dict)  # (task, image, seed) → solver → row
for path in sys.argv[1:]:
    for line in open(path):
        row = json.loads(line)
        if row.get("status") == "ok" and row["solver"].startswith("p2l"):
            runs[(row["task"], row["image"], row["seed"])][row["solver"]] = row

print("| task | P2L variant | pairs | PSNR variant − frozen (dB) | final residual variant − frozen |")
print("|---|---|---:|---:|---:|")
variants = sorted({s for by in runs.values() for s in by} - {FROZEN})
for task in sorted({k[0] for k in runs}):
    for variant in variants:
        pairs = [by for key, by in runs.items() if key[0] == task and variant in by and FROZEN in by]
        diffs = np.array([(by[variant]["psnr"] - by[FROZEN]["psnr"],
                           by[variant]["residual"] - by[FROZEN]["residual"]) for by in pairs])
        if len(diffs) < 2:
            continue
        (dp, dr), (sp, sr) = diffs.mean(0), diffs.std(0, ddof=1)
        print(f"| {task} | `{variant}` | {len(diffs)} | {dp:+.2f} ± {sp:.2f} | {dr:+.3f} ± {sr:.3f} |")
