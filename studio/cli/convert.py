"""``studio convert adm``: a guided-diffusion (ADM) checkpoint → a diffusers ``DDPMPipeline`` folder."""

from __future__ import annotations

import argparse
from pathlib import Path

#: ``models.adm.LAYOUTS``' names, repeated here so that ``studio --help`` does not import torch (a test
#: checks that they agree)
LAYOUT_NAMES = ("ffhq-256", "imagenet-256-uncond")


def register(sub) -> None:
    c = sub.add_parser("convert", help="convert a third-party checkpoint into a diffusers pipeline folder")
    kinds = c.add_subparsers(dest="convert_kind", required=True)
    a = kinds.add_parser("adm", help="guided-diffusion (ADM) .pt state dict (ffhq_10m.pt, "
                                     "256x256_diffusion_uncond.pt) → DDPMPipeline folder")
    a.add_argument("checkpoint",
                   help="the .pt state dict (read with weights_only=True) or a .safetensors file")
    a.add_argument("--out", required=True, help="new folder to write (must not exist or be empty)")
    a.add_argument("--layout", choices=LAYOUT_NAMES, default=None,
                   help="network layout (default: detected from the checkpoint's keys and shapes)")
    a.add_argument("--source-note", default=None,
                   help="where the checkpoint came from (URL, paper); written into the model card")
    a.set_defaults(handler=run_convert_adm)


def run_convert_adm(args: argparse.Namespace, argv: list[str]) -> int:
    from models.adm import convert_adm_checkpoint  # lazy: imports torch and diffusers; keeps --help fast

    out = convert_adm_checkpoint(args.checkpoint, args.out, layout=args.layout, source_note=args.source_note)
    print(f"wrote {out} (diffusers DDPMPipeline converted from {Path(args.checkpoint).name})")
    return 0
