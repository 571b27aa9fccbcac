"""``studio list``: the tasks, solvers and registered models a command accepts."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    sub.add_parser("list", help="list tasks, solvers and registered models").set_defaults(handler=run_list)


def run_list(args: argparse.Namespace, argv: list[str]) -> int:
    from models.registry import available_models  # lazy: models/__init__ imports torch; fast --help
    from solvers import SOLVERS  # lazy: imports torch; keeps `studio --help` fast
    from studio.core.config import list_tasks  # lazy: omegaconf takes ~0.5 s; keeps --help fast

    print("tasks:   " + ", ".join(list_tasks()))
    print("solvers: " + ", ".join(f"{n} ({i.summary})" for n, i in SOLVERS.items()))
    print("models:  " + ", ".join(available_models()))
    return 0
