"""What several command modules share."""

from __future__ import annotations

from studio.core.errors import StudioError


def check_positive_steps(steps: int | None) -> None:
    """``--steps`` of 0 or below is a usage error, reported before any model loads."""
    if steps is not None and steps <= 0:
        raise StudioError(f"--steps must be a positive integer, got {steps}")
