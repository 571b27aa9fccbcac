"""ReSample (hard data consistency with a latent prior) on the tiny random SD-style pipeline."""

from __future__ import annotations

import pytest
import torch

from models.latent_prior import load_latent_prior
from solvers import SOLVERS, get_solver
from solvers.resample import (
    dc_stage,
    fit_measurements,
    residual_mse,
    stochastic_resample,
    stopping_tolerance,
)
from studio.core.config import load_solver
from studio.core.conventions import to_image
from studio.core.errors import StudioError
from studio.core.noise import GaussianNoise, measure
from studio.core.operators import FunctionOperator
from studio.core.tasks import build_operator

BOX = {"name": "inpaint_box", "box_size": 0.5}
SR4 = {"name": "super_resolution", "factor": 4}
# 12 steps, data consistency every 2: pixel fits after countdown 8, 6, 4, a latent fit after 2, a final one
FAST = {"steps": 12, "dc_every": 2, "travel_steps": 2, "pixel_iters": 100, "latent_iters": 30, "patience": 10}
OFF = {**FAST, "dc_every": 0, "latent_iters": 0}


@pytest.fixture(scope="module")
def prior(tiny_sd_model_dir):
    return load_latent_prior(tiny_sd_model_dir)


def _problem(task: dict, seed=0):
    x = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(seed))
    op = build_operator(task, (24, 40), seed, None)
    return x, op, measure(x, op, GaussianNoise(0.01), torch.Generator().manual_seed(seed))


def _reachable(prior, task: dict):
    """A measurement of an image the tiny decoder can produce (so fitting it is possible)."""
    op = build_operator(task, (24, 40), 0, None)
    with torch.no_grad():
        z = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(5))
        return op, op.A(to_image(prior.decode(z)).clamp(0, 1))


@pytest.mark.parametrize("task", [BOX, SR4])
def test_resample_runs_is_reproducible_and_counts_its_passes(prior, task):
    x, op, y = _problem(task)
    run = get_solver("resample").fn
    a = run(y, op, prior, seed=3, noise_sigma=0.01, **FAST)
    b = run(y, op, prior, seed=3, noise_sigma=0.01, **FAST)
    c = run(y, op, prior, seed=4, noise_sigma=0.01, **FAST)
    assert a.image.shape == (1, 3, 24, 40) and a.x.shape == (1, 4, 6, 10)
    assert torch.equal(a.image, b.image) and not torch.equal(a.image, c.image)
    assert 0 <= a.image.min() and a.image.max() <= 1
    assert not a.x.requires_grad and not a.image.requires_grad
    # 12 guided steps + 2 time-travel passes at each of the 4 fits; decoder passes are not NFE
    assert a.record["nfe"] == 20 and a.record["grad_nfe"] == 12
    assert a.record["hard_dc"]["pixel_fits"] == 3 and a.record["hard_dc"]["latent_fits"] == 2
    assert 0 < a.record["hard_dc"]["latent_iterations"] <= 60


def test_schedule_is_the_official_one():
    """500 steps, every 10: countdown 170…330 fits pixels (middle third), 10…160 latents (last third)."""
    stages = {k: dc_stage(k, 500, 10) for k in range(500)}
    assert [k for k, s in stages.items() if s == "pixel"] == list(range(170, 331, 10))
    assert [k for k, s in stages.items() if s == "latent"] == list(range(10, 161, 10))
    assert dc_stage(0, 500, 1) is None and dc_stage(400, 500, 10) is None
    assert all(dc_stage(k, 500, 0) is None for k in range(500))


@pytest.mark.parametrize("task", [BOX, SR4])
def test_hard_data_consistency_lowers_the_residual(prior, task):
    op, y = _reachable(prior, task)
    on = get_solver("resample").fn(y, op, prior, seed=0, **FAST)
    off = get_solver("resample").fn(y, op, prior, seed=0, **OFF)
    assert off.record["hard_dc"]["pixel_iterations"] == off.record["hard_dc"]["latent_iterations"] == 0
    assert on.record["residual"][0] < 0.8 * off.record["residual"][0]


def test_fits_reach_a_reachable_measurement(prior):
    op, y = _reachable(prior, SR4)
    start = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x, n = fit_measurements(start, lambda v: v, op, y, lr=1e-2, iters=2000, tol=1e-3, weight_decay=0.0)
    assert residual_mse(op, y, x).item() < 1e-6 and n < 2000  # stopped by the tolerance, not the cap
    z0 = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(9))
    z, n = fit_measurements(z0, prior.decode, op, y, lr=5e-2, iters=100, tol=1e-3, patience=50)
    with torch.no_grad():
        assert residual_mse(op, y, prior.decode(z)) < 0.1 * residual_mse(op, y, prior.decode(z0))
    assert not z.requires_grad and n == 100


def test_stochastic_resample_draws_the_stated_gaussian():
    """ᾱ_t = 0.5, ᾱ_{t−1} = 0.6, γ = 3 make σ² = 1 − ᾱ_{t−1} = 0.4: mean (sqrt(0.6) ẑ_0(y) + z')/2, var 0.2;
    γ → 0 keeps z', γ → ∞ draws from N(sqrt(ᾱ_{t−1}) ẑ_0(y), 1 − ᾱ_{t−1})."""
    ab_t, ab_prev = torch.tensor(0.5), torch.tensor(0.6)
    z0_y, z_prime = torch.full((200_000,), 2.0), torch.full((200_000,), -1.0)
    gen = torch.Generator().manual_seed(0)
    s = stochastic_resample(z0_y, z_prime, ab_t, ab_prev, 3.0, gen)
    assert abs(s.mean() - (0.6**0.5 * 2.0 - 1.0) / 2) < 0.01 and abs(s.var() - 0.2) < 0.01
    s = stochastic_resample(z0_y, z_prime, ab_t, ab_prev, 1e-9, gen)
    assert torch.allclose(s, z_prime, atol=1e-3)
    s = stochastic_resample(z0_y, z_prime, ab_t, ab_prev, 1e9, gen)
    assert abs(s.mean() - 0.6**0.5 * 2.0) < 0.01 and abs(s.var() - 0.4) < 0.01


def test_stopping_tolerance_is_the_noise_level_in_model_units():
    _, sr, y = _problem(SR4)
    assert stopping_tolerance(None, 0.0, sr, y, (1, 3, 24, 40)) == 1e-3  # the official eps
    assert stopping_tolerance(None, 0.05, sr, y, (1, 3, 24, 40)) == pytest.approx(0.1)  # 2σ in [-1, 1]
    assert stopping_tolerance(0.02, 0.05, sr, y, (1, 3, 24, 40)) == 0.02
    _, box, y = _problem(BOX)  # the mean runs over all pixels, the box's unobserved zeros too
    observed = float(box.mask.mean())
    assert observed < 0.9 and stopping_tolerance(None, 0.05, box, y, (1, 3, 24, 40)) == pytest.approx(
        0.1 * observed**0.5)


@pytest.mark.parametrize("name, value", [("gamma", 0.0), ("dc_every", -1), ("travel_steps", 0),
                                         ("pixel_iters", 1.5), ("latent_lr", 0.0), ("patience", 0),
                                         ("tol", -1.0), ("scale", -0.1), ("weight_decay", float("nan")),
                                         ("noise_sigma", -0.01), ("steps", 0)])
def test_bad_parameters_raise_one_line_naming_them(prior, name, value):
    _, op, y = _problem(BOX)
    with pytest.raises(StudioError, match=name) as err:
        get_solver("resample").fn(y, op, prior, **{**FAST, name: value})
    assert "\n" not in str(err.value)


def test_nonlinear_operators_run_and_non_differentiable_ones_are_refused(prior):
    square = FunctionOperator(lambda v: v.clamp(0, 1) ** 2, name="square")
    y = square(torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(0)))
    out = get_solver("resample").fn(y, square, prior, seed=0, x_shape=(3, 24, 40), **FAST)
    assert out.image.shape == (1, 3, 24, 40) and out.record["hard_dc"]["pixel_iterations"] > 0
    rounded = FunctionOperator(lambda v: (v.detach() * 255).round() / 255, name="quantise")
    with pytest.raises(StudioError, match="differentiable operator.*quantise"):
        get_solver("resample").fn(y, rounded, prior, x_shape=(3, 24, 40), **FAST)


def test_registered_with_its_config_and_callback(prior):
    info = SOLVERS["resample"]
    assert info.latent and not info.needs_linear and info.takes_prompt and info.title.startswith("ReSample")
    cfg = load_solver("resample", "super_resolution")
    official = (cfg.steps, cfg.gamma, cfg.scale, cfg.dc_every, cfg.pixel_iters, cfg.latent_iters)
    assert official == (500, 40.0, 0.5, 10, 2000, 500)
    _, op, y = _problem(BOX)
    seen = []
    get_solver("resample").fn(y, op, prior, seed=0, **OFF,
                              callback=lambda i, n, zt, x0: seen.append((i, n, tuple(x0.shape))))
    assert seen == [(i, 12, (1, 3, 24, 40)) for i in range(12)]
