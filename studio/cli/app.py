"""``studio app``: the Gradio web app, on 127.0.0.1 unless ``--host`` says otherwise."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    ap = sub.add_parser("app", help="start the web app (127.0.0.1 by default; never a public link)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; any other prints a "
                         "warning)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--model-dir", action="append", metavar="FOLDER",
                    help="a folder whose model folders the app's model fields accept (repeatable; default: "
                         "$STUDIO_MODEL_DIRS, else ./models); registered names always work")
    ap.add_argument("--auth", metavar="USER:PASS",
                    help="require this login (for a --host reachable from the network)")
    ap.set_defaults(handler=run_app)


def run_app(args: argparse.Namespace, argv: list[str]) -> int:
    """Launch the app with these flags; a bad flag raises StudioError, which the CLI prints as one line."""
    from studio.app import serve  # lazy: gradio import takes seconds

    serve(args)
    return 0
