"""Where should the projections of CDIM and MCG cut the pseudo-inverse? (issue 20, defect 2)

Noiseless float32 Gaussian blur (61 taps, σ 3) and bicubic SR ×4 on the shipped ``emoji-pixel``, 4 held-out
emoji (010–013, 32²), seed 0: CDIM (defaults) and MCG (100 steps) with ``A_dagger`` cut at the dtype
(eps · sqrt(N) · max s, the default) or also at the operator's DDRM threshold (``observed_only=True``).

    python docs/bench/fidelity_cutoff.py > docs/bench/fidelity_cutoff.md
"""

from __future__ import annotations

import functools

import torch

from models.loading import load_prior
from solvers import SOLVERS
from studio.core.io import load_image
from studio.core.metrics import psnr
from studio.core.operators import make_operator
from studio.core.paths import examples_dir

IMAGES = [examples_dir() / f"emoji/{i:03d}-32.png" for i in range(10, 14)]
CASES = [("gaussian_blur", {}), ("super_resolution", {"mode": "bicubic"})]
SOLVER_ARGS = [("cdim", {}), ("mcg", {"steps": 100})]


def mean_psnr(prior, task: str, kwargs: dict, solver: str, extra: dict, observed_only: bool) -> list[float]:
    op = make_operator(task, **kwargs)
    op.project = functools.partial(op.project, observed_only=observed_only)
    out = []
    for path in IMAGES:
        clean = load_image(str(path))
        result = SOLVERS[solver].fn(op.A(clean), op, prior, seed=0, **extra)
        out.append(psnr(result.image, clean))
    return out


def main() -> None:
    torch.set_num_threads(1)
    prior = load_prior("emoji-pixel")
    print("| task | solver | A† cut-off | PSNR per image (dB) | mean |\n|---|---|---|---|---:|")
    for task, kwargs in CASES:
        for solver, extra in SOLVER_ARGS:
            for observed_only in (False, True):
                values = mean_psnr(prior, task, kwargs, solver, extra, observed_only)
                cut = "dtype + DDRM threshold" if observed_only else "dtype (default)"
                shown, mean = ", ".join(f"{v:.2f}" for v in values), sum(values) / len(values)
                print(f"| {task} | {solver} | {cut} | {shown} | {mean:.2f} |", flush=True)


if __name__ == "__main__":
    main()
