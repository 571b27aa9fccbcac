"""``studio app``: the Gradio web app on 127.0.0.1."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    ap = sub.add_parser("app", help="start the web app on 127.0.0.1 (never a public link)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.set_defaults(handler=run_app)


def run_app(args: argparse.Namespace, argv: list[str]) -> int:
    from studio.app import main as app_main  # lazy: gradio import takes seconds

    app_main(["--host", args.host, "--port", str(args.port)])
    return 0
