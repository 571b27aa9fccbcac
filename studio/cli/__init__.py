"""``studio`` command line: degrade, restore, bench, and listings. Errors print one line and exit 2.

Each command group is one module here that adds its sub-parsers and sets ``handler`` on them; this module
builds the parser from them and dispatches. Command modules import the heavy workflow modules (torch,
diffusers) inside their handlers so that ``studio --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from studio.cli import app, bench, convert, edit, listing, personalize, restore, train
from studio.core.errors import SolveCancelled, StudioError

#: in the order their sub-commands appear in ``studio --help``
COMMAND_MODULES = (restore, edit, bench, personalize, app, listing, train, convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Diffusion inverse-problem studio")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def quiet_transformers() -> None:
    """transformers' warnings off unless the user sets ``TRANSFORMERS_VERBOSITY``: on a CLI they are not
    the user's to act on (each Stable-Diffusion load printed two lines asking to install torchvision, which
    has no wheel beside this torch), and they buried the one line a bad input gets."""
    if "TRANSFORMERS_VERBOSITY" in os.environ:
        return
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "transformers" in sys.modules:  # already imported (main called from Python): set it directly
        sys.modules["transformers"].utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_transformers()
    parser = build_parser()
    # key=value overrides may come after options (`studio train pixel --minutes 5 steps=100`): argparse
    # leaves those behind a positional, so collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error("unrecognized arguments: " + " ".join(extra))
        args.overrides = [*args.overrides, *extra]
    try:
        return args.handler(args, ["studio", *argv])
    except (StudioError, SolveCancelled) as err:
        print(f"studio: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("studio: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
