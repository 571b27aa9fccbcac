"""Peers: other libraries' implementations benchmarked like our solvers, on the same pixel prior, operator and
measurement (e.g. :mod:`studio.eval.deepinv_peer`: ``deepinv-dps``, ``deepinv-ddrm``, ``deepinv-diffpir``).

A peer module registers its names here where it is defined (:func:`register_peer`); importing
:mod:`studio.eval` imports the peer modules, so the registry is complete whenever the bench runs. Steps:
``--steps <name>=N``; variants: ``<name>:key=value``.
"""

from __future__ import annotations

from typing import Protocol


class BenchPeer(Protocol):
    """What the bench calls on a peer (a module or any object with these functions)."""

    def check(self) -> None:
        """Raise StudioError if the peer cannot run here (called when ``--solvers`` is parsed)."""

    def parse_overrides(self, parts: list[str], name: str) -> dict:
        """A variant's ``key=value`` parts → checked params (bad keys / values raise, naming them)."""

    def bench_notes(self, name: str) -> list[str]:
        """Lines for ``results.md`` and the CLI output."""

    def bench_row(self, ctx, task: str, label: str, bench_image, seed: int, degraded) -> dict:
        """One run: a row with the fields of :func:`studio.eval.bench.runner.run_solver`."""


PEERS: dict[str, BenchPeer] = {}  # peer name → its hooks


def register_peer(peer: BenchPeer, *names: str) -> None:
    """Make ``names`` bench solvers run by ``peer``."""
    for name in names:
        PEERS[name] = peer


def get_peer(name: str) -> BenchPeer:
    """The hooks of peer ``name`` (a base name, not a variant label)."""
    return PEERS[name]


__all__ = ["PEERS", "BenchPeer", "get_peer", "register_peer"]
