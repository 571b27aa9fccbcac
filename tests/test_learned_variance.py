"""Learned variance (guided-diffusion's ``learn_sigma``, the checkpoints DPS/MCG/DDRM are run on): the prior
keeps the variance channels, and the DDPM step of DPS/MCG draws its noise with the model's variance exactly
as diffusers' ``DDPMScheduler(variance_type="learned_range")`` (the official ``p_sample``) does."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from models.base import DiffusionPrior, Prediction
from models.diffusers_prior import DiffusersPixelPrior
from solvers import SOLVERS
from solvers.common import ddim_step, learned_log_variance
from studio.core.operators import make_operator


class _LearnedPrior(DiffusionPrior):
    learned_variance = True
    variance_type = "learned_range"

    def __init__(self, scheduler):
        super().__init__(torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64))


@pytest.mark.parametrize(("inference_steps", "t"), [(1000, 500), (50, 480), (50, 20)])
def test_learned_range_step_matches_diffusers_ddpm_scheduler(inference_steps, t):
    scheduler = DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range", clip_sample=False)
    scheduler.set_timesteps(inference_steps)
    prev = int(scheduler.previous_timestep(t))
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 1, 3, 8, 8, generator=g)
    v = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    expected = scheduler.step(torch.cat([eps, v], 1), t, x_t,
                              generator=torch.Generator().manual_seed(7)).prev_sample

    prior = _LearnedPrior(scheduler)
    ab_t = prior.alphas_cumprod[t].float()
    ab_prev = prior.alphas_cumprod[prev].float()
    x0 = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    pred = Prediction(eps=eps, x0=x0, variance_logit=v)
    log_var = learned_log_variance(prior, pred, ab_t, ab_prev)
    ours = ddim_step(x_t, eps, x0, ab_t, ab_prev, 1.0, torch.Generator().manual_seed(7), log_var)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    if inference_steps < 1000:  # respaced, β and β̃ differ enough that the model's variance shows
        fixed = ddim_step(x_t, eps, x0, ab_t, ab_prev, 1.0, torch.Generator().manual_seed(7))
        assert (fixed - expected).abs().max() > 1e-3


def _tiny_learned_sigma_prior(variance_type: str = "learned_range") -> DiffusersPixelPrior:
    torch.manual_seed(0)
    blocks = ("DownBlock2D", "DownBlock2D"), ("UpBlock2D", "UpBlock2D")
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=6, block_out_channels=(8, 16),
                       down_block_types=blocks[0], up_block_types=blocks[1], layers_per_block=1,
                       norm_num_groups=4)
    return DiffusersPixelPrior(unet, DDPMScheduler(variance_type=variance_type))


def test_pixel_prior_keeps_the_variance_channels():
    prior = _tiny_learned_sigma_prior()
    assert prior.learned_variance and prior.sample_shape == (3, 8, 8)
    x = torch.randn(1, 3, 8, 8)
    raw = prior.unet(x, torch.tensor([10])).sample
    pred = prior.predict(x, 10, clip=False)
    assert torch.equal(pred.eps, raw[:, :3]) and torch.equal(pred.variance_logit, raw[:, 3:])
    assert prior.predict(x, 10, clip=True).variance_logit is not None  # the clamp keeps it
    # the same doubled UNet under a fixed-variance scheduler: the extra channels are not a variance
    assert not _tiny_learned_sigma_prior("fixed_small").learned_variance


@pytest.mark.parametrize("solver", ["dps", "mcg"])
def test_dps_and_mcg_draw_with_the_learned_variance(solver):
    prior = _tiny_learned_sigma_prior()
    op = make_operator("super_resolution", factor=2, mode="avgpool")
    y = op.A(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    on = SOLVERS[solver].fn(y, op, prior, steps=4, seed=0)
    off = SOLVERS[solver].fn(y, op, prior, steps=4, seed=0, learned_variance=False)
    assert on.record["params"]["learned_variance"] is True
    assert off.record["params"]["learned_variance"] is False
    assert torch.isfinite(on.x).all() and not torch.allclose(on.x, off.x)
