"""``studio`` command line: degrade, restore, and listings. Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys

from studio.errors import SolveCancelled, StudioError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="studio", description="Diffusion inverse-problem studio")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("degrade", help="make a measurement y = noise(A(x)) from a clean image")
    d.add_argument("--input", required=True, help="clean image (PNG/JPEG, any size)")
    d.add_argument("--task", required=True, help="task name (configs/task/*.yaml); see `studio list`")
    d.add_argument("--output", required=True, help="measurement .png (writes .json and .safetensors beside it)")
    d.add_argument("--mask", help="mask image for inpaint_mask: painted/white/opaque = region to fill")
    d.add_argument("--seed", type=int, default=0, help="seed for random masks, motion kernels and noise")
    d.add_argument("overrides", nargs="*", help="task overrides key=value, e.g. noise.sigma=0.05")

    r = sub.add_parser("restore", help="restore a measurement with a diffusion solver")
    r.add_argument("--input", required=True, help="measurement image (or clean image with --simulate)")
    r.add_argument("--output", required=True, help="restored .png (a .json sidecar is written beside it)")
    r.add_argument("--task", help="task name; read from the measurement's sidecar when omitted")
    r.add_argument("--solver", default="cdim", help="solver name (default: cdim); see `studio list`")
    r.add_argument("--model", default=None, help="registered name, local diffusers folder or hub id")
    r.add_argument("--steps", type=int, default=None, help="number of sampler steps (solver default otherwise)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--mask", help="inpainting mask image: painted/white/opaque = region to fill")
    r.add_argument("--reference", help="clean image for PSNR/SSIM")
    r.add_argument("--simulate", action="store_true", help="--input is clean: degrade it first (demo mode)")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("overrides", nargs="*", help="overrides key=value: solver params (scale=0.3) or "
                                                "task keys (operator.sigma=2, noise.sigma=0.01)")

    sub.add_parser("list", help="list tasks, solvers and registered models")
    return p


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from studio import workflows

    if args.command == "list":
        from models.registry import registered_models
        from solvers import SOLVERS
        from studio.config import list_tasks

        print("tasks:   " + ", ".join(list_tasks()))
        print("solvers: " + ", ".join(f"{n} ({i.summary})" for n, i in SOLVERS.items()))
        print("models:  " + ", ".join([workflows.DEMO_MODEL, *registered_models()]))
        return 0
    if args.command == "degrade":
        side = workflows.degrade_files(args.input, args.task, args.output, seed=args.seed,
                                       overrides=args.overrides, mask_path=args.mask)
        print(f"wrote {args.output} (task {side['task']}, seed {side['seed']})")
        return 0
    if args.command == "restore":
        if args.steps is not None and args.steps <= 0:
            raise StudioError(f"--steps must be a positive integer, got {args.steps}")
        side = workflows.restore_files(
            args.input, args.output, task=args.task, solver=args.solver,
            model=args.model or workflows.DEFAULT_MODEL, seed=args.seed, steps=args.steps,
            overrides=args.overrides, mask_path=args.mask, reference_path=args.reference,
            simulate=args.simulate, device=args.device, progress=not args.quiet, argv=argv)
        line = f"wrote {args.output}: {side['solver']} on {side['task']}, NFE {side['nfe']}, " \
               f"{side['wall_time_s']:.1f} s, residual {side['relative_residual'][0]:.3g} (relative)"
        if "metrics" in side:
            line += f", PSNR {side['metrics']['psnr']:.2f} dB, SSIM {side['metrics']['ssim']:.3f}"
        print(line)
        return 0
    raise StudioError(f"unknown command {args.command!r}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return _run(args, ["studio", *argv])
    except (StudioError, SolveCancelled) as err:
        print(f"studio: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("studio: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
