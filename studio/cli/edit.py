"""``studio invert`` and ``studio edit``: invert an image into a text-to-image model's noise, then
regenerate it or edit it under another prompt."""

from __future__ import annotations

import argparse

from studio.core.errors import StudioError


def register(sub) -> None:
    inv = sub.add_parser("invert",
                         help="invert an image into a text-to-image model's noise and regenerate it")
    _inversion_args(inv, [("--prompt", "source prompt (default empty)")])
    inv.set_defaults(handler=run_invert)
    ed = sub.add_parser("edit", help="invert under a source prompt, regenerate under a target prompt with "
                                     "prompt-to-prompt attention control")
    _inversion_args(ed, [("--source-prompt", "prompt describing the image"),
                         ("--target-prompt", "prompt for the edit")])
    control_args(ed)
    ed.set_defaults(handler=run_edit)


def control_args(q: argparse.ArgumentParser) -> None:
    """``--control``, ``--blend`` and ``--reweight``: the attention control of an edit (control.KEY=VALUE
    overrides reach every other setting of configs/edit/attention_control.yaml)."""
    q.add_argument("--control", default="auto", choices=["auto", "none", "replace", "refine", "reweight"],
                   help="attention control (default auto: replace for a word swap, refine when words are "
                        "added or removed; none: plain regeneration under the target prompt)")
    q.add_argument("--blend", default=None, metavar="WORDS",
                   help="comma list of words whose attention bounds the edited region (default: the words "
                        "that differ between the prompts; '' turns local blending off)")
    q.add_argument("--reweight", default=None, metavar="WORD=SCALE",
                   help="scale this target word's attention, e.g. blue=2 (on top of any --control but none)")
    q.add_argument("--edit-guidance", type=float, default=None,
                   help="guidance of the edit branch (default: with attention control the per-method value "
                        "of configs/edit/attention_control.yaml, without it the inversion's)")


def control_overrides(args: argparse.Namespace) -> list[str]:
    """The ``control.*`` overrides (``key=value``) that ``--blend`` and ``--reweight`` stand for, plus the
    ones given as positional ``control.KEY=VALUE`` arguments."""
    out = [o.split(".", 1)[1] for o in args.overrides if o.startswith("control.")]
    if args.blend is not None:
        words = [w.strip() for w in args.blend.split(",") if w.strip()]
        out.append(f"blend_words=[{','.join(words)}]")
    if args.reweight is not None:
        word, _, scale = args.reweight.partition("=")
        if not word.strip() or not scale.strip():
            raise StudioError(f"--reweight takes WORD=SCALE, got {args.reweight!r}")
        out += [f"reweight_words=[{word.strip()}]", f"reweight_scale={scale.strip()}"]
    return out


def _inversion_args(q: argparse.ArgumentParser, prompt_args: list[tuple[str, str]]) -> None:
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
    q.add_argument("overrides", nargs="*",
                   help="method parameters key=value, e.g. newton_steps=3 reg_weight=0 (edit: "
                        "control.KEY=VALUE for the attention control, e.g. control.self_replace=0.6)")


def _inversion_options(args: argparse.Namespace, argv: list[str]) -> dict:
    return dict(method=args.method, steps=args.steps, guidance=args.guidance, strength=args.strength,
                model=args.model, device=args.device, overrides=args.overrides, argv=argv)


def run_invert(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.workflows import editing  # lazy: pulls in torch and diffusers; keeps `studio --help` fast

    rec = editing.invert_files(args.input, args.output, prompt=args.prompt, **_inversion_options(args, argv))
    _print_record(args, rec)
    return 0


def run_edit(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.workflows import editing  # lazy: pulls in torch and diffusers; keeps `studio --help` fast

    rec = editing.edit_files(args.input, args.output, source_prompt=args.source_prompt,
                             target_prompt=args.target_prompt, control=args.control,
                             control_params=control_overrides(args), edit_guidance=args.edit_guidance, **{
                                 **_inversion_options(args, argv),
                                 "overrides": [o for o in args.overrides if not o.startswith("control.")]})
    _print_record(args, rec)
    control = rec["control"]
    if control["mode"] != "none":
        blend = (f"blend mask {rec['mask_fraction']:.0%} of the image" if rec["mask_fraction"] is not None
                 else "no local blend")
        print(f"attention control {control['mode']}: {editing.describe_injection(control)}; "
              f"edit guidance {rec['edit_guidance']:g}; {blend}")
    return 0


def _print_record(args: argparse.Namespace, rec: dict) -> None:
    print(f"wrote {args.output}: {rec['method']} inversion, {rec['inverted_steps']} steps, NFE {rec['nfe']}, "
          f"{rec['wall_time_s']:.2f} s, reconstruction PSNR {rec['metrics']['psnr']:.2f} dB "
          f"(VAE round trip {rec['vae_roundtrip_metrics']['psnr']:.2f} dB)")
