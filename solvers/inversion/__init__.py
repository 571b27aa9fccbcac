"""Inversion methods (DDIM, Newton–Raphson, null-text): each module registers its function in
:data:`INVERTERS` (:mod:`solvers.inversion.registry`); importing this package imports them all, in the
registry's order."""

from __future__ import annotations

from solvers.inversion.ddim import ddim_inversion
from solvers.inversion.newton import newton_inversion
from solvers.inversion.null_text import null_text_inversion
from solvers.inversion.registry import INVERTERS, WORKFLOW_ARGS, get_inverter, register_inverter

__all__ = ["INVERTERS", "WORKFLOW_ARGS", "ddim_inversion", "get_inverter", "newton_inversion",
           "null_text_inversion", "register_inverter"]
