"""``studio bench``, ``bench-merge``, ``bench-inversion``, ``bench-real-size``, ``bench-edit`` and
``edit-strip``: the benchmarks and figures."""

from __future__ import annotations

import argparse

from studio.cli.common import check_positive_steps
from studio.core.errors import StudioError


def register(sub) -> None:
    _register_bench(sub)
    _register_bench_merge(sub)
    _register_bench_inversion(sub)
    _register_bench_real_size(sub)
    _register_edit_strip(sub)
    _register_bench_edit(sub)


def _register_bench(sub) -> None:
    b = sub.add_parser("bench", help="benchmark solvers and classical baselines over tasks x images x seeds")
    b.add_argument("--tasks", default=None, help="comma list (default: inpaint_box,gaussian_blur,"
                                                 "super_resolution,denoise)")
    b.add_argument("--solvers", default=None,
                   help="comma list (default: all pixel solvers); a variant base:key=value[:key=value] runs "
                        "a solver with other params under its own label, e.g. p2l,p2l:tune_prompt=false")
    b.add_argument("--images", default=None,
                   help="folder of PNGs (default: the held-out emoji, --example-size)")
    b.add_argument("--example-size", type=int, default=32, choices=[32, 64],
                   help="size of the shipped held-out emoji used without --images (default 32; 64 for "
                        "emoji-sd)")
    b.add_argument("--limit", type=int, default=None, help="use the first N images")
    b.add_argument("--seeds", default="0", help="comma list of seeds (default: 0)")
    b.add_argument("--noise-sigma", type=float, default=None, help="measurement noise std in [0, 1] units "
                                                                   "for every task (default: task config)")
    b.add_argument("--model", default=None,
                   help="model name or folder (default: emoji-pixel; emoji-sd when every solver is latent)")
    b.add_argument("--steps", action="append", default=None, metavar="SOLVER=N",
                   help="sampler steps per solver, repeatable: --steps dps=100 --steps ddrm=20 (applies to "
                        "the solver's variants too, unless a variant sets steps=)")
    _add_run_options(b, "runs/bench")
    b.add_argument("overrides", nargs="*", help="task overrides key=value (operator.*, noise.*)")
    b.set_defaults(handler=run_bench)


def _add_run_options(parser: argparse.ArgumentParser, runs_folder: str) -> None:
    """--device, a resumable --out folder and --quiet, as both benchmarks take them."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=None, help=f"results folder (default {runs_folder}/<timestamp>); an "
                                                    "existing one resumes, skipping completed runs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _register_bench_merge(sub) -> None:
    bm = sub.add_parser("bench-merge",
                        help="one report from bench runs split across processes (same settings)")
    bm.add_argument("parts", nargs="+", help="finished `studio bench --out` folders")
    bm.add_argument("--out", required=True, help="folder for the merged results.json/.md, plots and strips")
    bm.set_defaults(handler=run_bench_merge)


def _register_bench_inversion(sub) -> None:
    bi = sub.add_parser("bench-inversion", help="benchmark DDIM, Newton-Raphson and null-text inversion: "
                                                "reconstruction PSNR vs NFE and vs wall time")
    bi.add_argument("--model", default=None, help="Stable-Diffusion-style model (default emoji-sd) or folder")
    bi.add_argument("--images", default=None,
                    help="folder of PNGs, prompts from its captions.json if any (default: the held-out emoji "
                         "at --size, with their captions)")
    bi.add_argument("--size", type=int, default=64, choices=[32, 64], help="held-out emoji size (default 64)")
    bi.add_argument("--limit", type=int, default=None, help="use the first N images")
    bi.add_argument("--prompt", default=None, help="one prompt for every image instead of the captions")
    bi.add_argument("--methods", default=None, help="comma list (default: ddim,newton,null-text)")
    bi.add_argument("--steps", default=None, help="comma list of step counts (default: 5,10,20,50)")
    bi.add_argument("--ddim-steps", default="auto",
                    help="DDIM's step counts (default auto: --steps plus 2x, 4x and 8x the largest, so "
                         "DDIM's NFE range covers Newton's)")
    bi.add_argument("--guidance", default="auto",
                    help="comma list: auto (each method's default: ddim/newton 1, null-text 7.5) and/or "
                         "numbers applied to every method")
    _add_run_options(bi, "runs/bench-inversion")
    bi.add_argument("overrides", nargs="*", help="method parameters method.key=value, e.g. "
                                                 "newton.newton_steps=3 null-text.inner_steps=5")
    bi.set_defaults(handler=run_bench_inversion)


def _register_bench_real_size(sub) -> None:
    br = sub.add_parser("bench-real-size",
                        help="seconds per step and peak memory of every solver on random-weight replicas of "
                             "ADM FFHQ-256 and SD 1.5 at 512x512, with and without each memory option")
    br.add_argument("--jobs", default=None, help="comma list (default all: dps,mcg,cdim,ddrm,latent-dps,psld,"
                                                 "p2l,newton-inversion,textual-inversion,vae,vae-1024)")
    br.add_argument("--options", default=None,
                    help="comma list of none,bf16,fp16,grad-ckpt,attn-classic,attn-slicing,vae-slicing,"
                         "vae-tiling (default: every option that acts on each job but attn-classic, the "
                         "materialised attention that slicing is compared with)")
    br.add_argument("--steps", type=int, default=2, help="solver steps per case (default 2: the second is "
                                                         "the per-step figure)")
    br.add_argument("--replica-dir", default="runs/replicas",
                    help="where the replicas are saved once as diffusers folders (about 4.5 GB)")
    br.add_argument("--threads", type=int, default=None, help="torch threads per case (default: torch's)")
    br.add_argument("--timeout", type=float, default=3600,
                    help="seconds per case before it is recorded as failed")
    _add_run_options(br, "runs/bench-real-size")
    br.set_defaults(handler=run_bench_real_size)


def _register_edit_strip(sub) -> None:
    es = sub.add_parser("edit-strip",
                        help="edit held-out emoji by prompt and write one before/after PNG strip")
    es.add_argument("--edits", default=None, help="YAML with edits: [{image, source, target}] (default "
                                                  "configs/edits.yaml unless --edit is given)")
    es.add_argument("--edit", action="append", default=[], metavar="IMAGE|SOURCE|TARGET",
                    help="one edit (repeatable): image path, source prompt, target prompt")
    es.add_argument("--output", default="docs/edit-strip.png", help="strip PNG (a .json sidecar beside it)")
    es.add_argument("--model", default=None, help="Stable-Diffusion-style model (default emoji-sd) or folder")
    es.add_argument("--methods", default="newton",
                    help="comma list; two columns (reconstruction, edit) each (default newton)")
    es.add_argument("--steps", type=int, default=None, help="inversion steps (default per method)")
    es.add_argument("--guidance", type=float, default=None,
                    help="guidance (default per method: 1; null-text 7.5)")
    es.add_argument("--seed", type=int, default=0,
                    help="torch seed, stated on the strip (the methods are deterministic)")
    es.add_argument("--scale", type=int, default=2, help="tile upscaling factor (nearest; default 2)")
    es.add_argument("--device", default="cpu", help="cpu or cuda")
    es.add_argument("--control", default="auto", choices=["auto", "none", "replace", "refine", "reweight"],
                    help="attention control of every edit (default auto; none: plain regeneration)")
    es.add_argument("--edit-guidance", type=float, default=None,
                    help="guidance of the edit branch (default: the inversion's)")
    es.add_argument("overrides", nargs="*",
                    help="method parameters method.key=value (e.g. newton.newton_steps=3) and attention "
                         "control settings control.key=value (e.g. control.self_replace=0.6)")
    es.set_defaults(handler=run_edit_strip)


def _register_bench_edit(sub) -> None:
    be = sub.add_parser("bench-edit", help="do edits follow the target words and keep the rest? attention "
                                           "control vs plain regeneration, per inversion method")
    be.add_argument("--edits", default=None, help="YAML with edits: [{image, source, target, kind}] (default "
                                                  "configs/edits.yaml)")
    be.add_argument("--model", default=None, help="Stable-Diffusion-style model (default emoji-sd) or folder")
    be.add_argument("--methods", default="newton,ddim,null-text", help="comma list of inversion methods")
    be.add_argument("--controls", default="none,auto",
                    help="comma list of attention controls compared (default none,auto)")
    be.add_argument("--steps", type=int, default=None, help="inversion steps (default per method)")
    be.add_argument("--edit-guidance", type=float, default=None,
                    help="guidance of the edit branch, plain and controlled alike (default: plain at the "
                         "inversion's, controlled at configs/edit/attention_control.yaml's per-method value)")
    be.add_argument("--samples", type=int, default=64, help="(t, noise) draws of the edit-success score")
    be.add_argument("--seed", type=int, default=0, help="seed of the score's draws")
    be.add_argument("--device", default="cpu", help="cpu or cuda")
    be.add_argument("--out", default="runs/bench-edit", help="results folder; an existing one resumes")
    be.add_argument("overrides", nargs="*", help="attention control settings control.key=value")
    be.set_defaults(handler=run_bench_edit)


def _print_report(res) -> None:
    print(f"wrote {res.out / 'results.md'}")
    print(res.table)


def run_bench(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.eval.bench import run_bench as run_solver_bench  # lazy: pulls in torch; keeps --help fast

    res = run_solver_bench(tasks=args.tasks, solvers=args.solvers, images=args.images, limit=args.limit,
                           seeds=args.seeds, noise_sigma=args.noise_sigma, model=args.model, steps=args.steps,
                           device=args.device, out=args.out, overrides=args.overrides, command=argv,
                           progress=not args.quiet, example_size=args.example_size)
    _print_report(res)
    for note in res.notes:
        print(f"note: {note}")
    return 0


def run_bench_merge(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.eval.bench import merge_results  # lazy: pulls in torch; keeps `studio --help` fast

    _print_report(merge_results(args.parts, args.out, command=argv))
    return 0


def run_bench_inversion(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.eval.inversion_bench import run_inversion_bench  # lazy: pulls in torch; keeps --help fast

    res = run_inversion_bench(args.model, args.images, args.methods, args.steps, args.guidance, args.out,
                              ddim_steps=args.ddim_steps, limit=args.limit, size=args.size,
                              prompt=args.prompt, overrides=args.overrides, device=args.device, command=argv,
                              progress=not args.quiet)
    _print_report(res)
    for line in [*res.checks, *(f"note: {n}" for n in res.notes)]:
        print(line)
    return 0


def run_edit_strip(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.eval.edit_strip import edit_strip, load_edits  # lazy: pulls in torch; keeps --help fast

    check_positive_steps(args.steps)
    side = edit_strip(load_edits(args.edits, args.edit), args.output, model=args.model, methods=args.methods,
                      steps=args.steps, guidance=args.guidance, seed=args.seed, scale=args.scale,
                      overrides=args.overrides, device=args.device, command=argv, control=args.control,
                      edit_guidance=args.edit_guidance)
    print(f"wrote {args.output}: {len(side['edits'])} edits x {len(side['methods'])} method(s), "
          f"{side['layout']['width']}x{side['layout']['height']} px")
    return 0


def run_bench_edit(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.eval.edit_bench import run_edit_bench  # lazy: pulls in torch; keeps --help fast
    from studio.eval.edit_strip import load_edits  # lazy: pulls in torch; keeps --help fast

    check_positive_steps(args.steps)
    bad = [o for o in args.overrides if not o.startswith("control.")]
    if bad:
        raise StudioError(f"bench-edit takes control.key=value overrides, got {bad[0]!r}")
    res = run_edit_bench(load_edits(args.edits), args.out, methods=args.methods,
                         controls=_comma_list(args.controls), steps=args.steps, model=args.model,
                         device=args.device, control_params=[o.split(".", 1)[1] for o in args.overrides],
                         seed=args.seed, samples=args.samples, edit_guidance=args.edit_guidance,
                         command=argv)
    print(f"wrote {args.out}/results.md ({len(res['rows'])} rows)")
    return 0


def run_bench_real_size(args: argparse.Namespace, argv: list[str]) -> int:
    import time  # lazy: only this command names its default folder by time

    from studio.eval.realsize import default_cases, run_real_size  # lazy: pulls in torch; keeps --help fast

    check_positive_steps(args.steps)
    cases = default_cases(args.steps, args.device, _comma_list(args.options), _comma_list(args.jobs))
    if not cases:
        raise StudioError("no case matches --jobs / --options")
    out = args.out or f"runs/bench-real-size/{time.strftime('%Y%m%d-%H%M%S')}"
    run_real_size(cases, out, args.replica_dir, threads=args.threads, timeout_s=args.timeout,
                  command=" ".join(argv), quiet=args.quiet)
    print(f"wrote {out}/results.md")
    return 0


def _comma_list(value: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value else None
