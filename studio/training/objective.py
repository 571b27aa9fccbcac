"""The diffusion training objective shared by every trainer and loss in this package.

Forward process (DDPM, Ho et al. 2020): ``x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps``, computed by
diffusers' ``add_noise``. What the network learns to output at ``x_t`` depends on the scheduler's
``prediction_type``: ``eps`` for epsilon, the velocity ``v = sqrt(abar_t) eps - sqrt(1-abar_t) x0``
(Salimans & Ho 2022; diffusers' ``get_velocity``) for v_prediction, ``x0`` for sample.

``add_noise`` and ``get_velocity`` are bit-identical (``torch.equal``) to the hand-written expressions they
replaced, on the shipped schedules (emoji-pixel's cosine DDPM schedule and emoji-sd's scaled-linear DDIM
schedule), so losses and trained weights did not change.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from studio.core.errors import StudioError

Tensor = torch.Tensor
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> str:
    """``prediction_type`` if it is one of :data:`PREDICTION_TYPES`, else a one-line error."""
    if prediction_type not in PREDICTION_TYPES:
        raise StudioError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
    return prediction_type


def forward_process(scheduler_config) -> DDPMScheduler:
    """The forward (noising) process of any DDPM-family scheduler config, as a ``DDPMScheduler``.

    Training noises with its own scheduler object, as diffusers' training examples do: ``add_noise`` moves
    the scheduler's ``alphas_cumprod`` to the data's device, which must not touch the sampler a pipeline
    uses, and not every sampler's ``add_noise`` is the DDPM one (Euler's adds ``sigma * eps``). The
    ``alphas_cumprod`` equal the source scheduler's for the same betas config (checked for both shipped
    models)."""
    return DDPMScheduler.from_config(dict(scheduler_config))


def diffusion_target(prediction_type: str, scheduler, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the network learns to output at ``x_t = scheduler.add_noise(x0, noise, t)``: ``noise`` for
    epsilon, ``v = sqrt(abar) noise - sqrt(1-abar) x0`` for v_prediction, ``x0`` for sample."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0
