"""Regularized Newton–Raphson inversion (RNRI; Samuel, Meiri, Darshan, Chechik, Avidan, Ben-Ari,
arXiv 2312.12540; official code ``dvirsamuel/NewtonRaphsonInversion``).

Each inversion step solves the implicit DDIM equation (see :mod:`solvers.inversion.ddim`) for z_t given z_s:

    r(z) = z − f(z) = 0,   f(z) = a z_s + b ε(z, t)

RNRI finds the root with a few Newton–Raphson iterations, and guards them with a regulariser because
unguarded root-finding can land on out-of-distribution roots. Newton's step solves J_r δ = −r with
J_r = I − b ∂ε/∂z. The d × d Jacobian is out of reach, but b is small on a normal grid, so the Neumann
series (I − bJ)⁻¹ = I + bJ + (bJ)² + … converges fast; we keep ``neumann_terms`` terms (default 1):

    δ = −(r + b J r),       J r ≈ (ε(z + h r) − ε(z)) / h         (one extra UNet call, no backward)

With zero terms this is the fixed-point iteration z ← f(z) (ReNoise / FPI); the J r term is what makes it
Newton. Each candidate is accepted only if the regularised objective decreases (otherwise the step is
halved, at most ``max_halvings`` times), so the returned iterate is the best one seen:

    F(z) = mean |r(z)| + λ · mean ½ (z − sqrt(ᾱ_t) z_0)² / (1 − ᾱ_t)

the official code's objective (an L1 residual plus the negative log-density of the forward marginal
q(z_t | z_0) = N(sqrt(ᾱ_t) z_0, (1 − ᾱ_t) I)), averaged per element so λ does not depend on the latent
size. The iteration stops after ``newton_steps`` iterations or when the RMS residual drops below ``tol``.

Where we differ from the official code, on purpose: it uses an Euler-ancestral scheduler with a fixed
noise list (SDXL-Turbo) and a scalar "Newton" step that ignores ∂ε/∂z entirely (the UNet runs under
``no_grad``) with the hard-coded dimension 64·64·4; we solve the paper's equation on the deterministic
DDIM grid any SD-style model has, with a finite-difference Jacobian-vector product, for any latent size. The
paper's "prompt-aware adjustment of the encoding" is not in the released code and is not implemented here.
Defaults: 2 iterations per step and λ = 0.1 (the official ``inv_hp``), tolerance 1e-4 (RMS, latent units).
Cost per iteration: 2 UNet calls (3 with halving), no backward pass.
"""

from __future__ import annotations

import time

import torch

from solvers.inversion.ddim import Inversion, guided_eps, inversion_grid, step_coefficients
from solvers.inversion.registry import register_inverter
from solvers.common import alpha_bar_at
from studio.core.errors import StudioError

Tensor = torch.Tensor


def _rms(v: Tensor) -> float:
    return float(v.pow(2).mean().sqrt())


def _check_params(newton_steps, reg_weight, tol, neumann_terms, max_halvings, fd_step) -> None:
    if (newton_steps < 0 or reg_weight < 0 or tol < 0 or max_halvings < 0 or neumann_terms < 0
            or not fd_step > 0):
        raise StudioError(f"newton inversion: bad parameters newton_steps={newton_steps}, "
                          f"reg_weight={reg_weight}, tol={tol}, neumann_terms={neumann_terms}, "
                          f"max_halvings={max_halvings}, fd_step={fd_step}")


@register_inverter("newton", default_guidance=1.0)
def newton_inversion(
    prior,
    z0: Tensor,
    *,
    prompt: str = "",
    guidance: float = 1.0,
    steps: int = 10,
    strength: float = 1.0,
    newton_steps: int = 2,
    reg_weight: float = 0.1,
    tol: float = 1e-4,
    neumann_terms: int = 1,
    max_halvings: int = 2,
    fd_step: float = 1e-3,
    spacing: str = "leading",
) -> Inversion:
    """Invert ``z0`` solving each step's implicit equation by regularised Newton–Raphson."""
    _check_params(newton_steps, reg_weight, tol, neumann_terms, max_halvings, fd_step)
    start = time.perf_counter()
    grid = inversion_grid(prior, steps, strength, spacing)
    cond = prior.embed(prompt)
    uncond = prior.embed("") if guidance != 1.0 else None
    calls = 2 if uncond is not None else 1
    eps_of = lambda z, t: guided_eps(prior, z, t, cond, uncond, guidance)  # noqa: E731
    z_clean = z0.detach()
    z_s, trajectory = z_clean, [z_clean]
    path = list(reversed(grid))
    nfe = 0
    residual_history: list[list[float]] = []  # per step: RMS residual of each accepted iterate
    objective_history: list[list[float]] = []  # per step: F of each accepted iterate (strictly decreasing)

    with torch.no_grad():
        for k, t in enumerate(path):
            s = path[k - 1] if k > 0 else -1
            a, b = step_coefficients(prior, t, s, z_s)
            ab_t = alpha_bar_at(prior, t, z_s)
            mean, var = ab_t.sqrt() * z_clean, 1 - ab_t

            def evaluate(z):
                eps = eps_of(z, t)
                r = z - (a * z_s + b * eps)
                f = float(r.abs().mean() + reg_weight * (0.5 * (z - mean).pow(2) / var).mean())
                return r, eps, f

            z = a * z_s + b * eps_of(z_s, t)  # the DDIM-inversion estimate: ε at z_s
            r, eps, f = evaluate(z)
            nfe += 2 * calls
            history, f_history = [_rms(r)], [f]
            for _ in range(newton_steps):
                if history[-1] <= tol:
                    break
                delta, term = -r, r
                for _ in range(neumann_terms):  # δ = −(I + bJ + (bJ)² + …) r, J v by finite differences
                    h = fd_step / max(_rms(term), 1e-12)
                    term = b * (eps_of(z + h * term, t) - eps) / h
                    nfe += calls
                    delta = delta - term
                step, accepted = 1.0, False
                for _ in range(max_halvings + 1):
                    r_c, eps_c, f_c = evaluate(z + step * delta)
                    nfe += calls
                    if f_c < f:
                        z, r, eps, f, accepted = z + step * delta, r_c, eps_c, f_c, True
                        break
                    step /= 2
                if not accepted:
                    break
                history.append(_rms(r))
                f_history.append(f)
            residual_history.append(history)
            objective_history.append(f_history)
            z_s = z
            trajectory.append(z_s)
    record = {"method": "newton", "steps": steps, "inverted_steps": len(grid), "strength": strength,
              "guidance": guidance, "newton_steps": newton_steps, "reg_weight": reg_weight, "tol": tol,
              "neumann_terms": neumann_terms, "nfe": nfe, "grad_nfe": 0,
              "wall_time_s": time.perf_counter() - start,
              "residual_rms": residual_history, "objective": objective_history}
    return Inversion(z_start=z_s, trajectory=trajectory, grid=grid, prompt=prompt, guidance=guidance,
                     record=record)
