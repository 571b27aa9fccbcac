"""One exception type for bad user input: the CLI and the app print its message as one line."""

from __future__ import annotations


class StudioError(ValueError):
    """A bad value from the user (file, mask, name, config value). The message names the value."""


class ModelLoadError(StudioError, OSError):
    """A model id or folder that cannot be loaded (offline hub id, missing folder, corrupt weights)."""


class SolverDivergedError(StudioError, FloatingPointError):
    """NaN/Inf appeared during a solve; raised instead of writing a black image."""


class SolveCancelled(RuntimeError):
    """A step callback asked the solver to stop (the app's Stop button)."""
