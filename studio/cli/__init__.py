"""``studio`` command line: degrade, restore, bench, and listings. Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from studio.core.errors import SolveCancelled, StudioError


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
    r.add_argument("--model", default=None, help="registered name, local diffusers folder or hub id (default: emoji-pixel; emoji-sd for "
                        "the latent solvers p2l, psld, latent-dps)")
    r.add_argument("--steps", type=int, default=None, help="number of sampler steps (solver default otherwise)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--mask", help="inpainting mask image: painted/white/opaque = region to fill")
    r.add_argument("--reference", help="clean image for PSNR/SSIM")
    r.add_argument("--simulate", action="store_true", help="--input is clean: degrade it first (demo mode)")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("overrides", nargs="*", help="overrides key=value: solver params (scale=0.3) or "
                                                "task keys (operator.sigma=2, noise.sigma=0.01)")

    rb = sub.add_parser("restore-batch", help="restore a folder of measurements with one solver, over several "
                                              "processes or GPUs (resumable)")
    rb.add_argument("--input-dir", required=True, help="folder of measurements from `studio degrade` (PNG + .json "
                                                       "sidecar), or of clean PNGs with --simulate")
    rb.add_argument("--output-dir", required=True, help="restored <name>.png + .json per input, and batch.json; "
                                                        "inputs already restored there are skipped")
    rb.add_argument("--solver", required=True, help="solver name; see `studio list`")
    rb.add_argument("--task", help="task name; read from each measurement's sidecar when omitted")
    rb.add_argument("--model", default=None, help="as for `studio restore` (default: emoji-pixel; emoji-sd for "
                                                  "the latent solvers)")
    rb.add_argument("--steps", type=int, default=None, help="number of sampler steps (solver default otherwise)")
    rb.add_argument("--seed", type=int, default=0, help="solver seed, the same for every image")
    rb.add_argument("--processes", type=int, default=1, help="worker processes to spawn (default 1); each loads "
                                                              "the model once and, with several GPUs, uses its own. "
                                                              "Or launch with `accelerate launch --num_processes N`")
    rb.add_argument("--simulate", action="store_true", help="the PNGs are clean: degrade each with --task first")
    rb.add_argument("--device", default="cpu", help="cpu or cuda")
    rb.add_argument("--quiet", action="store_true", help="no progress bars")
    rb.add_argument("overrides", nargs="*", help="overrides key=value: solver params or task keys (operator.*, "
                                                 "noise.*)")

    def _inversion_args(q, prompt_args):
        q.add_argument("--input", required=True, help="image (PNG/JPEG); H and W multiples of the VAE factor")
        q.add_argument("--output", required=True, help="output .png (a .json sidecar is written beside it)")
        for flag, helptext in prompt_args:
            q.add_argument(flag, default="", help=helptext)
        q.add_argument("--method", default="newton", help="ddim, newton (default) or null-text")
        q.add_argument("--steps", type=int, default=None, help="inversion steps (default per method)")
        q.add_argument("--guidance", type=float, default=None,
                       help="classifier-free guidance (default 1; 7.5 for null-text)")
        q.add_argument("--strength", type=float, default=1.0, help="invert this fraction of the steps (0, 1]")
        q.add_argument("--model", default=None, help="Stable-Diffusion-style model (default emoji-sd)")
        q.add_argument("--device", default="cpu")
        q.add_argument("overrides", nargs="*", help="method parameters key=value, e.g. newton_steps=3 reg_weight=0")

    inv = sub.add_parser("invert", help="invert an image into a text-to-image model's noise and regenerate it")
    _inversion_args(inv, [("--prompt", "source prompt (default empty)")])
    ed = sub.add_parser("edit", help="invert under a source prompt, regenerate under a target prompt")
    _inversion_args(ed, [("--source-prompt", "prompt describing the image"),
                         ("--target-prompt", "prompt for the edit")])

    b = sub.add_parser("bench", help="benchmark solvers and classical baselines over tasks x images x seeds")
    b.add_argument("--tasks", default=None, help="comma list (default: inpaint_box,gaussian_blur,"
                                                 "super_resolution,denoise)")
    b.add_argument("--solvers", default=None, help="comma list (default: all pixel solvers); a variant "
                                                   "base:key=value[:key=value] runs a solver with other params "
                                                   "under its own label, e.g. p2l,p2l:tune_prompt=false")
    b.add_argument("--images", default=None, help="folder of PNGs (default: the held-out emoji, --example-size)")
    b.add_argument("--example-size", type=int, default=32, choices=[32, 64],
                   help="size of the shipped held-out emoji used without --images (default 32; 64 for emoji-sd)")
    b.add_argument("--limit", type=int, default=None, help="use the first N images")
    b.add_argument("--seeds", default="0", help="comma list of seeds (default: 0)")
    b.add_argument("--noise-sigma", type=float, default=None, help="measurement noise std in [0, 1] units "
                                                                   "for every task (default: task config)")
    b.add_argument("--model", default=None, help="model name or folder (default: emoji-pixel; emoji-sd when "
                                                 "every solver is latent)")
    b.add_argument("--steps", action="append", default=None, metavar="SOLVER=N",
                   help="sampler steps per solver, repeatable: --steps dps=100 --steps ddrm=20 (applies to the "
                        "solver's variants too, unless a variant sets steps=)")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--out", default=None, help="results folder (default runs/bench/<timestamp>); an existing "
                                               "one resumes, skipping completed runs")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("overrides", nargs="*", help="task overrides key=value (operator.*, noise.*)")

    bm = sub.add_parser("bench-merge", help="one report from bench runs split across processes (same settings)")
    bm.add_argument("parts", nargs="+", help="finished `studio bench --out` folders")
    bm.add_argument("--out", required=True, help="folder for the merged results.json/.md, plots and strips")
    bi = sub.add_parser("bench-inversion", help="benchmark DDIM, Newton-Raphson and null-text inversion: "
                                                "reconstruction PSNR vs NFE and vs wall time")
    bi.add_argument("--model", default=None, help="Stable-Diffusion-style model (default emoji-sd) or folder")
    bi.add_argument("--images", default=None,
                    help="folder of PNGs, prompts from its captions.json if any (default: the held-out emoji at "
                         "--size, with their captions)")
    bi.add_argument("--size", type=int, default=64, choices=[32, 64], help="held-out emoji size (default 64)")
    bi.add_argument("--limit", type=int, default=None, help="use the first N images")
    bi.add_argument("--prompt", default=None, help="one prompt for every image instead of the captions")
    bi.add_argument("--methods", default=None, help="comma list (default: ddim,newton,null-text)")
    bi.add_argument("--steps", default=None, help="comma list of step counts (default: 5,10,20,50)")
    bi.add_argument("--ddim-steps", default="auto",
                    help="DDIM's step counts (default auto: --steps plus 2x, 4x and 8x the largest, so DDIM's "
                         "NFE range covers Newton's)")
    bi.add_argument("--guidance", default="auto",
                    help="comma list: auto (each method's default: ddim/newton 1, null-text 7.5) and/or numbers "
                         "applied to every method")
    bi.add_argument("--device", default="cpu", help="cpu or cuda")
    bi.add_argument("--out", default=None,
                    help="results folder (default runs/bench-inversion/<timestamp>); an existing one resumes, "
                         "skipping completed runs")
    bi.add_argument("--quiet", action="store_true", help="no progress bar")
    bi.add_argument("overrides", nargs="*",
                    help="method parameters method.key=value, e.g. newton.newton_steps=3 null-text.inner_steps=5")

    es = sub.add_parser("edit-strip", help="edit held-out emoji by prompt and write one before/after PNG strip")
    es.add_argument("--edits", default=None, help="YAML with edits: [{image, source, target}] (default "
                                                  "configs/edits.yaml unless --edit is given)")
    es.add_argument("--edit", action="append", default=[], metavar="IMAGE|SOURCE|TARGET",
                    help="one edit (repeatable): image path, source prompt, target prompt")
    es.add_argument("--output", default="docs/edit-strip.png", help="strip PNG (a .json sidecar beside it)")
    es.add_argument("--model", default=None, help="Stable-Diffusion-style model (default emoji-sd) or folder")
    es.add_argument("--methods", default="newton",
                    help="comma list; two columns (reconstruction, edit) each (default newton)")
    es.add_argument("--steps", type=int, default=None, help="inversion steps (default per method)")
    es.add_argument("--guidance", type=float, default=None, help="guidance (default per method: 1; null-text 7.5)")
    es.add_argument("--seed", type=int, default=0,
                    help="torch seed, stated on the strip (the methods are deterministic)")
    es.add_argument("--scale", type=int, default=2, help="tile upscaling factor (nearest; default 2)")
    es.add_argument("--device", default="cpu", help="cpu or cuda")
    es.add_argument("overrides", nargs="*", help="method parameters method.key=value, e.g. newton.newton_steps=3")

    pz = sub.add_parser("personalize", help="learn a new token from a few images (textual inversion)")
    pz.add_argument("--images", nargs="+", required=True, help="image files or folders")
    pz.add_argument("--token", default="<concept>", help="placeholder token, e.g. <my-cat>")
    pz.add_argument("--init", default="face", help="initializer word (one token)")
    pz.add_argument("--vectors", type=int, default=1, help="vectors per token")
    pz.add_argument("--cross-init", action="store_true", help="Cross-Initialization (+ regularisation)")
    pz.add_argument("--steps", type=int, default=300)
    pz.add_argument("--lr", type=float, default=5e-3)
    pz.add_argument("--batch-size", type=int, default=4)
    pz.add_argument("--out", default="runs/personalize/concept", help="output folder (learned_embeds.safetensors)")
    pz.add_argument("--model", default=None, help="Stable-Diffusion-style model (default emoji-sd)")
    pz.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    pz.add_argument("--device", default="cpu")
    pz.add_argument("--quiet", action="store_true")
    pz.add_argument("overrides", nargs="*", help="other options key=value, e.g. hflip=0.5 cross_init_reg=1e-4")

    gen = sub.add_parser("generate", help="text-to-image, optionally with learned tokens")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--output", required=True, help="PNG grid of the samples (a .json sidecar beside it)")
    gen.add_argument("--embeddings", nargs="*", default=[], help="learned_embeds.safetensors files (ours, "
                                                                 "diffusers or A1111 layout)")
    gen.add_argument("--token", nargs="*", default=None, help="token name per embedding file (optional)")
    gen.add_argument("--n", type=int, default=4)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=3.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--model", default=None)
    gen.add_argument("--device", default="cpu")

    pe = sub.add_parser("personalize-eval", help="measure textual inversion on a held-out concept: loss drop, "
                                                 "plain init vs Cross-Init, resemblance of samples")
    pe.add_argument("--model", default=None, help="Stable-Diffusion-style model (default emoji-sd)")
    pe.add_argument("--examples", default="examples/emoji", help="folder with captions.json + PNGs (held-out)")
    pe.add_argument("--concept", default=None, help="concept name (default: the one with the most images)")
    pe.add_argument("--init-word", default=None, help="initializer word, one token (default: the first one-token "
                                                      "word of the concept's name)")
    pe.add_argument("--token", default="<concept>", help="placeholder token")
    pe.add_argument("--steps", type=int, default=300, help="training steps of each run")
    pe.add_argument("--lr", type=float, default=5e-3)
    pe.add_argument("--batch-size", type=int, default=None, help="default: the number of concept images")
    pe.add_argument("--eval-every", type=int, default=25, help="concept loss every k steps (the curve)")
    pe.add_argument("--samples", type=int, default=240, help="(t, eps) draws per concept-loss estimate")
    pe.add_argument("--std-seeds", type=int, default=3, help="seeds for the std of the estimate (>= 2)")
    pe.add_argument("--n", type=int, default=8, help="samples generated per prompt")
    pe.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the generated samples")
    pe.add_argument("--guidance", type=float, default=3.0)
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument("--template", default=None, help="prompt template for loss, training and samples "
                    "(default: the model's card.json prompt_template, '{}' for emoji-sd; else 'a picture of a {}')")
    pe.add_argument("--out", default=None, help="results folder (default runs/personalize-eval/<concept>)")
    pe.add_argument("--device", default="cpu")
    pe.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    pe.add_argument("--quiet", action="store_true")
    pe.add_argument("overrides", nargs="*", help="other textual-inversion options key=value, e.g. cross_init_reg=1e-4")

    ap = sub.add_parser("app", help="start the web app on 127.0.0.1 (never a public link)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)

    sub.add_parser("list", help="list tasks, solvers and registered models")

    data = sub.add_parser("data", help="build a dataset offline")
    data.add_argument("name", choices=["emoji"], help="emoji: Noto Color Emoji at 32x32 and 64x64")
    data.add_argument("--out", default="runs/data/emoji", help="dataset folder (safetensors + captions.json)")
    data.add_argument("--examples", default=None,
                      help="also write the held-out images as PNGs here (the repo ships examples/emoji)")

    t = sub.add_parser("train", help="train (or resume) an embedded model; see README 'Embedded models'")
    t.add_argument("kind", choices=["pixel", "latent"], help="pixel: 32x32 DDPM UNet; latent: tiny SD at 64x64")
    t.add_argument("--run-dir", default=None, help="run folder (default runs/train/emoji-pixel|emoji-sd); "
                                                   "an existing run resumes with its saved config")
    t.add_argument("--data", default=None, help="dataset folder from `studio data emoji`")
    t.add_argument("--stage", default="all", choices=["all", "vae", "unet"], help="latent only")
    t.add_argument("--minutes", type=float, default=None, help="stop this chunk after M minutes (checkpointed)")
    t.add_argument("--export", default=None, help="write the EMA weights as a diffusers folder (+ model card)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. steps=100 batch_size=8")

    e = sub.add_parser("export", help="write a run's EMA weights as a diffusers folder with a model card")
    e.add_argument("kind", choices=["pixel", "latent"])
    e.add_argument("--to", required=True, help="output folder, e.g. models/weights/emoji-pixel")
    e.add_argument("--run-dir", default=None, help="run folder (default runs/train/emoji-pixel|emoji-sd)")
    e.add_argument("--docs", default="docs", help="where the sample grid PNG is also written")
    e.add_argument("--weights", default="ema", choices=["ema", "raw"],
                   help="EMA or raw weights (pixel: the UNet; latent: text encoder + UNet)")
    return p


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.workflows import restoration as workflows

    if args.command == "list":
        from models.registry import MODELS
        from solvers import SOLVERS
        from studio.core.config import list_tasks

        print("tasks:   " + ", ".join(list_tasks()))
        print("solvers: " + ", ".join(f"{n} ({i.summary})" for n, i in SOLVERS.items()))
        print("models:  " + ", ".join([*MODELS]))
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
            model=args.model, seed=args.seed, steps=args.steps,
            overrides=args.overrides, mask_path=args.mask, reference_path=args.reference,
            simulate=args.simulate, device=args.device, progress=not args.quiet, argv=argv)
        line = f"wrote {args.output}: {side['solver']} on {side['task']}, NFE {side['nfe']}, " \
               f"{side['wall_time_s']:.1f} s, residual {side['relative_residual'][0]:.3g} (relative)"
        if "metrics" in side:
            line += f", PSNR {side['metrics']['psnr']:.2f} dB, SSIM {side['metrics']['ssim']:.3f}"
        print(line)
        return 0
    if args.command == "restore-batch":
        from studio.workflows.batch import SUMMARY_NAME, restore_batch

        res = restore_batch(args.input_dir, args.output_dir, solver=args.solver, task=args.task, model=args.model,
                            steps=args.steps, seed=args.seed, overrides=args.overrides, processes=args.processes,
                            device=args.device, simulate=args.simulate, progress=not args.quiet, argv=argv)
        if res["main_process"]:
            print(f"restore-batch: {res['restored']} restored, {res['skipped']} skipped, {res['failed']} failed of "
                  f"{res['inputs']} inputs ({res['solver']}, {res['processes']} process(es), "
                  f"{res['total_wall_time_s']:.1f} s); wrote {Path(args.output_dir) / SUMMARY_NAME}")
        return 1 if res["failed"] else 0
    if args.command in ("invert", "edit"):
        from studio.workflows import editing

        common = dict(method=args.method, steps=args.steps, guidance=args.guidance, strength=args.strength,
                      model=args.model, device=args.device, overrides=args.overrides, argv=argv)
        if args.command == "invert":
            rec = editing.invert_files(args.input, args.output, prompt=args.prompt, **common)
        else:
            rec = editing.edit_files(args.input, args.output, source_prompt=args.source_prompt,
                                     target_prompt=args.target_prompt, **common)
        print(f"wrote {args.output}: {rec['method']} inversion, {rec['inverted_steps']} steps, NFE {rec['nfe']}, "
              f"{rec['wall_time_s']:.2f} s, reconstruction PSNR {rec['metrics']['psnr']:.2f} dB "
              f"(VAE round trip {rec['vae_roundtrip_metrics']['psnr']:.2f} dB)")
        return 0
    if args.command == "bench":
        from studio.eval.bench import run_bench

        res = run_bench(tasks=args.tasks, solvers=args.solvers, images=args.images, limit=args.limit,
                        seeds=args.seeds, noise_sigma=args.noise_sigma, model=args.model, steps=args.steps,
                        device=args.device, out=args.out, overrides=args.overrides, command=argv,
                        progress=not args.quiet, example_size=args.example_size)
        print(f"wrote {res.out / 'results.md'}")
        print(res.table)
        for note in res.notes:
            print(f"note: {note}")
        return 0
    if args.command == "bench-merge":
        from studio.eval.bench import merge_results

        res = merge_results(args.parts, args.out, command=argv)
        print(f"wrote {res.out / 'results.md'}")
        print(res.table)
        return 0
    if args.command == "bench-inversion":
        from studio.eval.inversion_bench import run_inversion_bench

        res = run_inversion_bench(args.model, args.images, args.methods, args.steps, args.guidance, args.out,
                                  ddim_steps=args.ddim_steps, limit=args.limit, size=args.size, prompt=args.prompt,
                                  overrides=args.overrides, device=args.device, command=argv,
                                  progress=not args.quiet)
        print(f"wrote {res.out / 'results.md'}")
        print(res.table)
        for line in [*res.checks, *(f"note: {n}" for n in res.notes)]:
            print(line)
        return 0
    if args.command == "edit-strip":
        from studio.eval.inversion_bench import edit_strip, load_edits

        if args.steps is not None and args.steps <= 0:
            raise StudioError(f"--steps must be a positive integer, got {args.steps}")
        side = edit_strip(load_edits(args.edits, args.edit), args.output, model=args.model, methods=args.methods,
                          steps=args.steps, guidance=args.guidance, seed=args.seed, scale=args.scale,
                          overrides=args.overrides, device=args.device, command=argv)
        print(f"wrote {args.output}: {len(side['edits'])} edits x {len(side['methods'])} method(s), "
              f"{side['layout']['width']}x{side['layout']['height']} px")
        return 0
    if args.command == "personalize":
        from studio.workflows import personalize
        from studio.core.config import parse_key_values

        options = {"placeholder": args.token, "initializer": args.init, "num_vectors": args.vectors,
                   "cross_init": args.cross_init, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                   "output_dir": args.out, **parse_key_values(args.overrides)}
        out = personalize.personalize(args.images, model=args.model, device=args.device,
                                      resume=not args.no_resume, quiet=args.quiet, **options)
        if out["main_process"]:
            print(f"wrote {out['embeddings']}: {out['step']} steps, final loss {out['final_loss']:.4f}, "
                  f"{out['wall_time_s']:.1f} s on {out['processes']} process(es)")
        return 0
    if args.command == "generate":
        from studio.workflows import personalize
        from studio.core.io import write_json_atomic
        from studio.training.train import save_grid

        images = personalize.generate(args.prompt, model=args.model, embeddings=args.embeddings, tokens=args.token,
                                      n=args.n, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                      device=args.device)
        out = Path(args.output).with_suffix(".png")
        save_grid(images, out, nrow=min(args.n, 8))
        write_json_atomic({"kind": "generation", "prompt": args.prompt, "embeddings": args.embeddings,
                           "n": args.n, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
                           "model": args.model or "emoji-sd", "command": argv}, out.with_suffix(".json"))
        print(f"wrote {out}: {args.n} samples")
        return 0
    if args.command == "personalize-eval":
        import torch

        from studio.core.config import parse_key_values
        from studio.eval.personalize_eval import evaluate_personalization

        if args.threads:
            torch.set_num_threads(args.threads)
        res = evaluate_personalization(
            args.model, args.concept, examples=args.examples, init_word=args.init_word, token=args.token,
            steps=args.steps, lr=args.lr, batch_size=args.batch_size, eval_every=args.eval_every,
            samples=args.samples, std_seeds=args.std_seeds, n_samples=args.n, sample_steps=args.sample_steps,
            guidance=args.guidance, seed=args.seed, template=args.template, out=args.out, device=args.device,
            quiet=args.quiet, options=parse_key_values(args.overrides), command=argv)
        runs = res["runs"]
        print(f"wrote {Path(res['out']) / 'results.md'}: '{res['concept']['name']}', init word "
              f"'{res['init_word']['word']}' loss {res['init_word']['loss']:.5f}; drop plain "
              f"{runs['plain']['drop_percent']:.1f}%, Cross-Init {runs['cross-init']['drop_percent']:.1f}%; "
              f"{res['wall_time_s']:.0f} s")
        return 0
    if args.command == "app":
        from studio.app import main as app_main

        app_main(["--host", args.host, "--port", str(args.port)])
        return 0
    if args.command == "data":
        from studio.training.emoji_data import render_emoji, save_dataset, write_examples

        ds = render_emoji()
        save_dataset(ds, args.out)
        print(f"wrote {args.out}: {len(ds)} emoji ({int(ds.held_out.sum())} held out) at "
              + ", ".join(f"{s}x{s}" for s in ds.images))
        if args.examples:
            write_examples(ds, args.examples)
            print(f"wrote held-out examples to {args.examples}")
        return 0
    if args.command == "train":
        from studio.training import train

        cfg = train.config_for(args.kind, args.run_dir, args.data, args.threads, args.overrides)
        if args.kind == "pixel":
            out = train.train_pixel(cfg, minutes=args.minutes, export=args.export, quiet=args.quiet)
        else:
            out = train.train_latent(cfg, stage=args.stage, minutes=args.minutes, export=args.export,
                                     quiet=args.quiet)
        print("train: " + ", ".join(f"{k}={v}" for k, v in out.items()))
        return 0
    if args.command == "export":
        from studio.training import model_card
        from studio.training import train

        cfg = train.config_for(args.kind, args.run_dir, None, None, [])
        name = "pixel" if args.kind == "pixel" else "latent"
        command = (f"studio data emoji && studio train {name} && studio export {name} --to {args.to}"
                   + (" --weights raw" if args.weights == "raw" else ""))
        if cfg.init_step:
            command += (f"`; each leg after the first (see History) starts with `studio train {name} "
                        f"init_from=<the model exported at the leg's start step>")
        if args.kind == "pixel":
            model_card.write_pixel_card(cfg, args.to, docs_dir=args.docs, weights=args.weights, command=command)
        else:
            model_card.write_latent_card(cfg, args.to, docs_dir=args.docs, command=command, weights=args.weights)
        print(f"wrote {args.to} (model card {args.to}/README.md)")
        return 0
    raise StudioError(f"unknown command {args.command!r}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser()
    # key=value overrides may come after options (`studio train pixel --minutes 5 steps=100`): argparse
    # leaves those behind a positional, so collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error("unrecognized arguments: " + " ".join(extra))
        args.overrides = [*args.overrides, *extra]
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
