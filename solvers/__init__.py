"""Solver library: one module per method, each a plain function ``solver(y, operator, prior, **params)``;
``prior`` may also be a loaded diffusers pipeline or a model name (:func:`models.loading.as_prior`).

Each module registers its function in :data:`SOLVERS` (:func:`solvers.registry.register_solver`); importing
this package imports them all, which fills the registry. The import order is the registry's order (the order
the CLI, the app and the bench list the solvers in): pixel solvers, baseline first, then the latent ones.
"""

from __future__ import annotations

from solvers.ddim import ddim
from solvers.dps import dps
from solvers.mcg import mcg
from solvers.cdim import cdim
from solvers.ddrm import ddrm
from solvers.latent_dps import latent_dps
from solvers.psld import psld
from solvers.p2l import p2l
from solvers.resample import resample
from solvers.flair import flair
from solvers.treg import treg
from solvers.common import SolveResult
from solvers.registry import SOLVERS, SolverInfo, get_solver, register_solver, solver_config, supports

__all__ = ["SOLVERS", "SolverInfo", "SolveResult", "get_solver", "register_solver", "solver_config",
           "supports", "cdim", "ddim", "ddrm", "dps", "mcg", "latent_dps", "psld", "p2l", "resample", "flair",
           "treg"]
