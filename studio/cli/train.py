"""``studio data``, ``studio train`` and ``studio export``: build the emoji dataset, train the embedded
models and ship them as diffusers folders with model cards."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    data = sub.add_parser("data", help="build a dataset offline")
    data.add_argument("name", choices=["emoji"], help="emoji: Noto Color Emoji at 32x32 and 64x64")
    data.add_argument("--out", default="runs/data/emoji", help="dataset folder (safetensors + captions.json)")
    data.add_argument("--examples", default=None,
                      help="also write the held-out images as PNGs here (the repo ships examples/emoji)")
    data.set_defaults(handler=run_data)

    t = sub.add_parser("train", help="train (or resume) an embedded model; see README 'Embedded models'")
    t.add_argument("kind", choices=["pixel", "latent"],
                   help="pixel: 32x32 DDPM UNet; latent: tiny SD at 64x64")
    t.add_argument("--run-dir", default=None, help="run folder (default runs/train/emoji-pixel|emoji-sd); "
                                                   "an existing run resumes with its saved config")
    t.add_argument("--data", default=None, help="dataset folder from `studio data emoji`")
    t.add_argument("--stage", default="all", choices=["all", "vae", "unet"], help="latent only")
    t.add_argument("--minutes", type=float, default=None,
                   help="stop this chunk after M minutes (checkpointed)")
    t.add_argument("--export", default=None,
                   help="write the EMA weights as a diffusers folder (+ model card)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. steps=100 batch_size=8")
    t.set_defaults(handler=run_train)

    e = sub.add_parser("export", help="write a run's EMA weights as a diffusers folder with a model card")
    e.add_argument("kind", choices=["pixel", "latent"])
    e.add_argument("--to", required=True, help="output folder, e.g. models/weights/emoji-pixel")
    e.add_argument("--run-dir", default=None, help="run folder (default runs/train/emoji-pixel|emoji-sd)")
    e.add_argument("--docs", default="docs", help="where the sample grid PNG is also written")
    e.add_argument("--weights", default="ema", choices=["ema", "raw"],
                   help="EMA or raw weights (pixel: the UNet; latent: text encoder + UNet)")
    e.set_defaults(handler=run_export)


def run_data(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.training import emoji_data  # lazy: pulls in torch; keeps `studio --help` fast

    ds = emoji_data.render_emoji()
    emoji_data.save_dataset(ds, args.out)
    print(f"wrote {args.out}: {len(ds)} emoji ({int(ds.held_out.sum())} held out) at "
          + ", ".join(f"{s}x{s}" for s in ds.images))
    if args.examples:
        emoji_data.write_examples(ds, args.examples)
        print(f"wrote held-out examples to {args.examples}")
    return 0


def run_train(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.training import latent, pixel, train  # lazy: pulls in torch and diffusers; fast --help

    cfg = train.config_for(args.kind, args.run_dir, args.data, args.threads, args.overrides)
    if args.kind == "pixel":
        out = pixel.train_pixel(cfg, minutes=args.minutes, export=args.export, quiet=args.quiet)
    else:
        out = latent.train_latent(cfg, stage=args.stage, minutes=args.minutes, export=args.export,
                                  quiet=args.quiet)
    print("train: " + ", ".join(f"{k}={v}" for k, v in out.items()))
    return 0


def run_export(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.training import model_card, train  # lazy: pulls in torch and diffusers; keeps --help fast

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
