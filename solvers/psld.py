"""PSLD: Posterior Sampling with Latent Diffusion (Rout, Raoof, Daras, Caramanis, Dimakis, Shakkottai;
NeurIPS 2023). Official code: ``LituRout/PSLD`` (``ldm/models/diffusion/psld.py``).

Latent DPS plus a "gluing" term that pulls ẑ_0 toward the encoder's range. Per DDIM step:

    ε̂, ẑ_0 = prior(z_t, t);   z' = DDIM(ẑ_0, ε̂; η)
    x̂_0    = D(ẑ_0)
    glued  = Aᵀy + (I − AᵀA) x̂_0                 # measured part from y, the rest from x̂_0
    z_{t-1} = z' − ∇_{z_t} ( ω ‖y − A x̂_0‖ + γ ‖E(glued) − ẑ_0‖ )

both norms unsquared, as in the official code. Defaults follow its argparse defaults ω = 1, γ = 0.1,
η = 0 (the box-inpainting script uses ω = 0.1, γ = 0.01; the task config carries that).

Differences from the official code, on purpose:

* it adds fresh measurement noise to A x̂_0 inside the loss (a quirk that makes the gradient random);
  we do not;
* the residual is per sample and in model units (as all our DPS-family solvers), so ω is DPS's ``scale``;
* ``gluing="pinv"`` uses A†y + (I − A†A) x̂_0, a true projection onto {Ax = y} also for blur and SR, where
  AᵀA is not a projection; the default ``"adjoint"`` is the paper's Aᵀ form (the same for inpainting);
* 200 steps by default rather than the official 1000 (the measured tables say what each costs).

PSLD needs a linear operator (Aᵀ or A†).
"""

from __future__ import annotations

import torch

from solvers.common import (
    SolveResult,
    StepCallback,
    StepLoop,
    alpha_bar_at,
    ddim_step,
    decoded_residual_norm,
    initial_noise,
    latent_image_shape,
    make_generator,
    per_sample_norm,
    timesteps,
)
from solvers.registry import register_solver
from studio.core.conventions import to_image, to_model
from studio.core.errors import StudioError

Tensor = torch.Tensor


def glue(operator, y: Tensor, x: Tensor, mode: str = "adjoint") -> Tensor:
    """[0, 1] images: Aᵀy + (I − AᵀA)x (``adjoint``) or x + A†(y − Ax) (``pinv``)."""
    if mode == "adjoint":
        shape = tuple(x.shape[1:])
        return operator.A_adjoint(y, shape) + x - operator.A_adjoint(operator.A(x), shape)
    if mode == "pinv":
        return x + operator.A_dagger(y - operator.A(x), tuple(x.shape[1:]))
    raise StudioError(f"psld: unknown gluing {mode!r} (adjoint, pinv)")


@register_solver("psld", needs_linear=True, latent=True,
                 summary="Posterior Sampling with Latent Diffusion (DPS + gluing)")
def psld(
    y: Tensor,
    operator,
    prior,
    *,
    noise_sigma: float = 0.0,
    steps: int = 200,
    omega: float = 1.0,
    gamma: float = 0.1,
    eta: float = 0.0,
    gluing: str = "adjoint",
    prompt: str = "",
    guidance: float = 1.0,
    spacing: str = "leading",
    seed: int | None = 0,
    x_shape: tuple[int, ...] | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> SolveResult:
    """Posterior sample per row of ``y``; ``omega`` weighs the measurement term, ``gamma`` the gluing term."""
    if not omega > 0 or not gamma >= 0:
        raise StudioError(f"psld: need omega > 0 and gamma >= 0, got omega={omega}, gamma={gamma}")
    if not getattr(operator, "linear", False):
        raise StudioError("psld needs a linear operator (its gluing term uses the adjoint)")
    if gluing not in ("adjoint", "pinv"):
        raise StudioError(f"psld: unknown gluing {gluing!r} (adjoint, pinv)")
    gen = make_generator(seed, y.device)
    ts = timesteps(prior.num_train_timesteps, steps, spacing)
    prior.set_prompt(prompt, guidance)
    params = {"steps": steps, "omega": omega, "gamma": gamma, "eta": eta, "gluing": gluing, "prompt": prompt,
              "guidance": guidance, "spacing": spacing, "seed": gen.initial_seed()}
    loop = StepLoop("psld", len(ts), callback, progress, params)
    z = initial_noise(prior.latent_shape(latent_image_shape(y, operator, prior, x_shape)), gen, y)
    unet_calls = 2 if guidance != 1.0 else 1
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            pred = prior.predict(z, t)
            x0, meas = decoded_residual_norm(prior, operator, y, pred.x0)
            glued = glue(operator, y, to_image(x0), gluing)
            glue_err = per_sample_norm(prior.encode(to_model(glued)) - pred.x0)
            (grad,) = torch.autograd.grad((omega * meas + gamma * glue_err).sum(), z)
        loop.count(unet_calls, grad=True)
        with torch.no_grad():
            ab_t, ab_prev = alpha_bar_at(prior, t, z), alpha_bar_at(prior, t_prev, z)
            z = ddim_step(z, pred.eps.detach(), pred.x0.detach(), ab_t, ab_prev, eta, gen) - grad
        loop.step(i, z, x0.detach())
    with torch.no_grad():
        image = to_image(prior.decode(z)).clamp(0, 1)
    return loop.finish(z, y, operator, prior, image=image)
