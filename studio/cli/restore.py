"""``studio degrade``, ``studio restore`` and ``studio restore-batch``: measurements and their restoration."""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.cli.common import check_positive_steps


def register(sub) -> None:
    d = sub.add_parser("degrade", help="make a measurement y = noise(A(x)) from a clean image")
    d.add_argument("--input", required=True, help="clean image (PNG/JPEG, any size)")
    d.add_argument("--task", required=True, help="task name (configs/task/*.yaml); see `studio list`")
    d.add_argument("--output", required=True,
                   help="measurement .png (writes .json and .safetensors beside it)")
    d.add_argument("--mask", help="mask image for inpaint_mask: painted/white/opaque = region to fill")
    d.add_argument("--seed", type=int, default=0, help="seed for random masks, motion kernels and noise")
    d.add_argument("overrides", nargs="*", help="task overrides key=value, e.g. noise.sigma=0.05")
    d.set_defaults(handler=run_degrade)

    r = sub.add_parser("restore", help="restore a measurement with a diffusion solver")
    r.add_argument("--input", required=True, help="measurement image (or clean image with --simulate)")
    r.add_argument("--output", required=True, help="restored .png (a .json sidecar is written beside it)")
    r.add_argument("--task", help="task name; read from the measurement's sidecar when omitted")
    r.add_argument("--solver", default="cdim", help="solver name (default: cdim); see `studio list`")
    r.add_argument("--model", default=None,
                   help="registered name, local diffusers folder or hub id (default: emoji-pixel; emoji-sd "
                        "for the latent solvers p2l, psld, latent-dps)")
    r.add_argument("--steps", type=int, default=None,
                   help="number of sampler steps (solver default otherwise)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--mask", help="inpainting mask image: painted/white/opaque = region to fill")
    r.add_argument("--reference", help="clean image for PSNR/SSIM")
    r.add_argument("--simulate", action="store_true", help="--input is clean: degrade it first (demo mode)")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("overrides", nargs="*", help="overrides key=value: solver params (scale=0.3) or "
                                                "task keys (operator.sigma=2, noise.sigma=0.01)")
    r.set_defaults(handler=run_restore)

    rb = sub.add_parser("restore-batch", help="restore a folder of measurements with one solver, over "
                                              "several processes or GPUs (resumable)")
    rb.add_argument("--input-dir", required=True, help="folder of measurements from `studio degrade` (PNG + "
                                                       ".json sidecar), or of clean PNGs with --simulate")
    rb.add_argument("--output-dir", required=True,
                    help="restored <name>.png + .json per input, and batch.json; inputs already restored "
                         "there are skipped")
    rb.add_argument("--solver", required=True, help="solver name; see `studio list`")
    rb.add_argument("--task", help="task name; read from each measurement's sidecar when omitted")
    rb.add_argument("--model", default=None,
                    help="as for `studio restore` (default: emoji-pixel; emoji-sd for the latent solvers)")
    rb.add_argument("--steps", type=int, default=None,
                    help="number of sampler steps (solver default otherwise)")
    rb.add_argument("--seed", type=int, default=0, help="solver seed, the same for every image")
    rb.add_argument("--processes", type=int, default=1,
                    help="worker processes to spawn (default 1); each loads the model once and, with several "
                         "GPUs, uses its own. Or launch with `accelerate launch --num_processes N`")
    rb.add_argument("--simulate", action="store_true",
                    help="the PNGs are clean: degrade each with --task first")
    rb.add_argument("--device", default="cpu", help="cpu or cuda")
    rb.add_argument("--quiet", action="store_true", help="no progress bars")
    rb.add_argument("overrides", nargs="*",
                    help="overrides key=value: solver params or task keys (operator.*, noise.*)")
    rb.set_defaults(handler=run_restore_batch)


def run_degrade(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.workflows import restoration  # lazy: pulls in torch; keeps `studio --help` fast

    side = restoration.degrade_files(args.input, args.task, args.output, seed=args.seed,
                                     overrides=args.overrides, mask_path=args.mask)
    print(f"wrote {args.output} (task {side['task']}, seed {side['seed']})")
    return 0


def run_restore(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.workflows import restoration  # lazy: pulls in torch; keeps `studio --help` fast

    check_positive_steps(args.steps)
    side = restoration.restore_files(
        args.input, args.output, task=args.task, solver=args.solver,
        model=args.model, seed=args.seed, steps=args.steps,
        overrides=args.overrides, mask_path=args.mask, reference_path=args.reference,
        simulate=args.simulate, device=args.device, progress=not args.quiet, argv=argv)
    line = f"wrote {args.output}: {side['solver']} on {side['task']}, NFE {side['nfe']}, " \
           f"{side['wall_time_s']:.1f} s, residual {side['relative_residual'][0]:.3g} (relative)"
    if "metrics" in side:
        line += f", PSNR {side['metrics']['psnr']:.2f} dB, SSIM {side['metrics']['ssim']:.3f}"
    print(line)
    return 0


def run_restore_batch(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.workflows.batch import SUMMARY_NAME, restore_batch  # lazy: pulls in torch; keeps --help fast

    res = restore_batch(args.input_dir, args.output_dir, solver=args.solver, task=args.task, model=args.model,
                        steps=args.steps, seed=args.seed, overrides=args.overrides, processes=args.processes,
                        device=args.device, simulate=args.simulate, progress=not args.quiet, argv=argv)
    if res["main_process"]:
        print(f"restore-batch: {res['restored']} restored, {res['skipped']} skipped, {res['failed']} failed "
              f"of {res['inputs']} inputs ({res['solver']}, {res['processes']} process(es), "
              f"{res['total_wall_time_s']:.1f} s); wrote {Path(args.output_dir) / SUMMARY_NAME}")
    return 1 if res["failed"] else 0
