"""``studio personalize``, ``generate`` and ``personalize-eval``: textual inversion, sampling with learned
tokens, and the evaluation of textual inversion."""

from __future__ import annotations

import argparse
from pathlib import Path

#: studio.workflows.personalize.METHODS' names (not imported: keeps `studio --help` fast; a test compares)
METHODS = ("ti", "cross-init", "xti", "neti", "core")


def register(sub) -> None:
    pz = sub.add_parser("personalize", help="learn a new token from a few images (textual inversion)")
    pz.add_argument("--images", nargs="+", required=True, help="image files or folders")
    pz.add_argument("--token", default="<concept>", help="placeholder token, e.g. <my-cat>")
    pz.add_argument("--init", default="face", help="initializer word (one token)")
    pz.add_argument("--vectors", type=int, default=1, help="vectors per token")
    pz.add_argument("--method", choices=METHODS, default="ti",
                    help="ti: textual inversion; cross-init: Cross-Initialization (+ its regularisation); "
                         "xti: extended textual inversion (P+), one embedding per cross-attention layer; "
                         "neti: NeTI, a small network giving the embedding per timestep and layer; "
                         "core: textual inversion + CoRe's context regularisation")
    pz.add_argument("--core", action="store_true",
                    help="add CoRe's context regularisation to the method (e.g. --method xti --core)")
    pz.add_argument("--cross-init", action="store_true",
                    help="add Cross-Initialization to the method (--method cross-init alone is TI with it)")
    pz.add_argument("--steps", type=int, default=300)
    pz.add_argument("--lr", type=float, default=5e-3)
    pz.add_argument("--batch-size", type=int, default=4)
    pz.add_argument("--out", default="runs/personalize/concept", help="output folder "
                                                                      "(learned_embeds.safetensors)")
    pz.add_argument("--model", default=None, help="Stable-Diffusion-style model (default emoji-sd)")
    pz.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    pz.add_argument("--device", default="cpu")
    pz.add_argument("--quiet", action="store_true")
    pz.add_argument("overrides", nargs="*",
                    help="other options key=value, e.g. hflip=0.5 cross_init_reg=1e-5")
    pz.set_defaults(handler=run_personalize)

    _register_generate(sub)
    _register_eval(sub)


def _register_generate(sub) -> None:
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
    gen.add_argument("--truncation", type=int, default=None,
                     help="NeTI tokens: keep the first K of the mapper's 128 hidden dimensions (nested "
                          "dropout; smaller follows the rest of the prompt more, larger the concept more; "
                          "default all)")
    gen.add_argument("--model", default=None)
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(handler=run_generate)



def _register_eval(sub) -> None:
    pe = sub.add_parser("personalize-eval", help="measure personalization on a held-out concept: loss drop, "
                                                 "steps, resemblance and editability of TI, Cross-Init, "
                                                 "XTI, NeTI and TI + CoRe")
    pe.add_argument("--runs", default="plain,cross-init",
                    help="comma list of runs: plain (textual inversion), cross-init, xti, neti, core (TI + "
                         "CoRe), neti-core (NeTI + CoRe)")
    pe.add_argument("--edit", action="append", default=None, dest="edits",
                    help="an edit template for the editability score, with one {} for the token (repeatable; "
                         "default: '{}: dark skin tone' and '{} running'; --edit '' turns the score off)")
    pe.add_argument("--model", default=None, help="Stable-Diffusion-style model (default emoji-sd)")
    pe.add_argument("--examples", default="examples/emoji",
                    help="folder with captions.json + PNGs (held-out)")
    pe.add_argument("--concept", default=None, help="concept name (default: the one with the most images)")
    pe.add_argument("--init-word", default=None, help="initializer word, one token (default: the first "
                                                      "one-token word of the concept's name)")
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
    pe.add_argument("--template", default=None,
                    help="prompt template for loss, training and samples (default: the model's card.json "
                         "prompt_template, '{}' for emoji-sd; else 'a picture of a {}')")
    pe.add_argument("--out", default=None, help="results folder (default runs/personalize-eval/<concept>)")
    pe.add_argument("--device", default="cpu")
    pe.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    pe.add_argument("--quiet", action="store_true")
    pe.add_argument("overrides", nargs="*",
                    help="other textual-inversion options key=value, e.g. cross_init_reg=1e-5")
    pe.set_defaults(handler=run_personalize_eval)


def run_personalize(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.core.config import parse_key_values  # lazy: omegaconf takes ~0.5 s; keeps --help fast
    from studio.workflows import personalize  # lazy: pulls in torch and diffusers; keeps `studio --help` fast

    options = {"placeholder": args.token, "initializer": args.init, "num_vectors": args.vectors,
               "method": args.method, "steps": args.steps, "lr": args.lr,
               **({"cross_init": True} if args.cross_init else {}), **({"core": True} if args.core else {}),
               "batch_size": args.batch_size, "output_dir": args.out, **parse_key_values(args.overrides)}
    out = personalize.personalize(args.images, model=args.model, device=args.device,
                                  resume=not args.no_resume, quiet=args.quiet, **options)
    if out["main_process"]:
        print(f"wrote {out['embeddings']}: {out['step']} steps, final loss {out['final_loss']:.4f}, "
              f"{out['wall_time_s']:.1f} s on {out['processes']} process(es)")
    return 0


def run_generate(args: argparse.Namespace, argv: list[str]) -> int:
    from models.registry import TEXT_TO_IMAGE, default_model  # lazy: models/__init__ imports torch
    from studio.core.io import write_json_atomic  # lazy: imports torch
    from studio.training.sampling import save_grid  # lazy: pulls in torch and diffusers
    from studio.workflows import personalize  # lazy: pulls in torch and diffusers

    images = personalize.generate(args.prompt, model=args.model, embeddings=args.embeddings,
                                  tokens=args.token, n=args.n, steps=args.steps, guidance=args.guidance,
                                  seed=args.seed, device=args.device, truncation=args.truncation)
    out = Path(args.output).with_suffix(".png")
    save_grid(images, out, nrow=min(args.n, 8))
    write_json_atomic({"kind": "generation", "prompt": args.prompt, "embeddings": args.embeddings,
                       "n": args.n, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
                       "truncation": args.truncation,
                       "model": args.model or default_model(TEXT_TO_IMAGE), "command": argv},
                      out.with_suffix(".json"))
    print(f"wrote {out}: {args.n} samples")
    return 0


def run_personalize_eval(args: argparse.Namespace, argv: list[str]) -> int:
    import torch  # lazy: heavy; keeps `studio --help` fast

    from studio.core.config import parse_key_values  # lazy: omegaconf takes ~0.5 s; keeps --help fast
    from studio.eval.personalize_eval import evaluate_personalization  # lazy: pulls in torch and diffusers

    if args.threads:
        torch.set_num_threads(args.threads)
    res = evaluate_personalization(
        args.model, args.concept, examples=args.examples, init_word=args.init_word, token=args.token,
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, eval_every=args.eval_every,
        samples=args.samples, std_seeds=args.std_seeds, n_samples=args.n, sample_steps=args.sample_steps,
        guidance=args.guidance, seed=args.seed, template=args.template, out=args.out, device=args.device,
        quiet=args.quiet, options=parse_key_values(args.overrides), command=argv,
        runs=[r.strip() for r in args.runs.split(",") if r.strip()],
        **({} if args.edits is None else {"edits": [e for e in args.edits if e]}))
    drops = ", ".join(f"{name} {run['drop_percent']:.1f}%" for name, run in res["runs"].items())
    print(f"wrote {Path(res['out']) / 'results.md'}: '{res['concept']['name']}', init word "
          f"'{res['init_word']['word']}' loss {res['init_word']['loss']:.5f}; drop {drops}; "
          f"{res['wall_time_s']:.0f} s")
    return 0
