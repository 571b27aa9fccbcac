"""PSLD: Posterior Sampling with Latent Diffusion (Rout, Raoof, Daras, Caramanis, Dimakis, Shakkottai;
NeurIPS 2023). Official code: ``LituRout/PSLD`` (``stable-diffusion/ldm/models/diffusion/psld.py``).

Latent DPS plus a "gluing" term that pulls ẑ_0 toward the encoder's range. Per DDIM step:

    ε̂, ẑ_0 = prior(z_t, t);   z' = DDIM(ẑ_0, ε̂; η)
    x̂_0    = D(ẑ_0)
    glued  = Tᵀy + (I − TᵀA) x̂_0                 # measured part from y, the rest from x̂_0
    z_{t-1} = z' − ∇_{z_t} ( ω ‖y − A x̂_0‖ + γ ‖E(glued) − ẑ_0‖ )

both norms unsquared, as in the official code. Defaults follow its argparse defaults ω = 1, γ = 0.1,
η = 0 (the box-inpainting script uses ω = 0.1, γ = 0.01; the task config carries that).

What "Tᵀ" is. The official ``p_sample_ddim`` glues with ``operator.transpose``, taken from the DPS operators
(``diffusion-posterior-sampling/[util/]guided_diffusion/measurements.py``). That method is not Aᵀ for most
tasks:

* ``inpainting`` (A = mask ⊙ x): transpose is the identity; with y zero off the mask (ours is; the
  official y carries noise there) that is y + (1 − m) ⊙ x̂_0, the same as Aᵀ and A† (mask multiplies);
* ``super_resolution`` (A = antialiased bicubic ×1/4 resize): transpose is ``F.interpolate(scale_factor=4)``,
  nearest upsampling U. For our ``avgpool`` A (block means), U = f²Aᵀ = A† exactly (A U = I), so the
  official gluing is our ``pinv``: a projection onto {Ax = y}. Aᵀ alone is U/f²: AᵀA = P/f² (P that
  projection) barely acts, which is why the former default ``adjoint`` left ~15/16 of the SR residual;
* ``gaussian_blur`` and ``motion_blur``: transpose is the identity, so glued = x̂_0 + (y − A x̂_0);
* ``noise`` (denoising, A = I): everything is the identity, glued = y.

``gluing`` modes: ``"identity"`` x + (y − Ax) (needs A to keep the image's shape), ``"adjoint"``
Aᵀy + (I − AᵀA)x (the paper's formula), ``"pinv"`` x + A†(y − Ax) (the exact projection), and the default
``"auto"``, which follows the official code per operator name: inpaint → adjoint (= pinv = official),
super_resolution → pinv (= official for avgpool), gaussian_blur / motion_blur / denoise → identity
(= official; for blur it is also the stable choice, as A† of a blur amplifies noise by up to 1/rcond).
colorize (not in the official code) and any other linear operator (composed, user-defined) → pinv: the
projection onto {Ax = y} that the gluing term stands for, where AᵀA is not a projection in general. The run
record's ``params["gluing"]`` holds the resolved mode, never "auto" (older records say "adjoint", the
former default, for every task).

Differences from the official code, on purpose:

* it adds fresh measurement noise to A x̂_0 inside the loss (a quirk that makes the gradient random);
  we do not;
* the residual is per sample and in model units (as all our DPS-family solvers), so ω is DPS's ``scale``;
* super_resolution ``mode=bicubic``: "auto" uses A† (exact projection) rather than the official nearest
  upsampling, which is not a right inverse of bicubic downsampling; colorize and composed operators
  have no official counterpart (see above); pinv without an SVD (composed operators) runs CGLS per step;
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


GLUINGS = ("auto", "identity", "adjoint", "pinv")
# what "auto" picks per operator name (the official ``transpose`` per task; see the module docstring)
AUTO_GLUING = {"inpaint": "adjoint", "super_resolution": "pinv", "gaussian_blur": "identity",
               "motion_blur": "identity", "denoise": "identity", "colorize": "pinv"}


def _identity_shape_error(operator, y_shape: tuple, x_shape: tuple) -> StudioError:
    name = getattr(operator, "name", type(operator).__name__)
    src, dst = ("x".join(map(str, s)) for s in (x_shape, y_shape))
    return StudioError(f"psld: gluing='identity' needs an operator that keeps the image's shape, but {name} "
                       f"maps {src} to {dst}; use gluing='pinv' or 'adjoint'")


def resolve_gluing(mode: str, operator, y_shape: tuple, x_shape: tuple) -> str:
    """The gluing mode that will run: ``auto`` by operator name (else ``pinv``); ``identity`` checked."""
    if mode not in GLUINGS:
        raise StudioError(f"psld: unknown gluing {mode!r} ({', '.join(GLUINGS)})")
    y_shape, x_shape = tuple(y_shape), tuple(x_shape)
    if mode == "auto":
        mode = AUTO_GLUING.get(getattr(operator, "name", ""), "pinv")
        if mode == "identity" and y_shape != x_shape:
            mode = "pinv"
    if mode == "identity" and y_shape != x_shape:
        raise _identity_shape_error(operator, y_shape, x_shape)
    return mode


def glue(operator, y: Tensor, x: Tensor, mode: str = "pinv") -> Tensor:
    """[0, 1] images: x + (y − Ax) (``identity``), Aᵀy + (I − AᵀA)x (``adjoint``), x + A†(y − Ax) (``pinv``).

    ``mode`` is a resolved mode (see :func:`resolve_gluing`; ``auto`` is resolved there).
    """
    if mode == "identity":
        if y.shape[1:] != x.shape[1:]:
            raise _identity_shape_error(operator, tuple(y.shape[1:]), tuple(x.shape[1:]))
        return x + (y - operator.A(x))
    if mode == "adjoint":
        shape = tuple(x.shape[1:])
        return operator.A_adjoint(y, shape) + x - operator.A_adjoint(operator.A(x), shape)
    if mode == "pinv":
        return x + operator.A_dagger(y - operator.A(x), tuple(x.shape[1:]))
    raise StudioError(f"psld: unknown gluing {mode!r} (identity, adjoint, pinv)")


@register_solver("psld", needs_linear=True, latent=True, flow=True,
                 title="PSLD (posterior sampling with latent diffusion)", min_steps=100, step_cost=7.0,
                 summary="latent DPS plus a gluing term that keeps the decoded image on the measurement: "
                         "latent models, linear operators, slow (100-200 steps)")
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
    gluing: str = "auto",
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
    image_shape = latent_image_shape(y, operator, prior, x_shape)
    gluing = resolve_gluing(gluing, operator, tuple(y.shape[1:]), tuple(image_shape[1:]))
    gen = make_generator(seed, y.device)
    ts = timesteps(prior.num_train_timesteps, steps, spacing)
    prior.set_prompt(prompt, guidance)
    params = {"steps": steps, "omega": omega, "gamma": gamma, "eta": eta, "gluing": gluing, "prompt": prompt,
              "guidance": guidance, "spacing": spacing, "seed": gen.initial_seed()}
    loop = StepLoop("psld", len(ts), callback, progress, params)
    z = initial_noise(prior.latent_shape(image_shape), gen, y)
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
