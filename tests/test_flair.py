"""FLAIR on tiny random pipelines of both families: an SD-style (variance-preserving) one through the
Gaussian-path equivalence, and an SD3-style flow-matching one."""

from __future__ import annotations

import pytest
import torch

from models.flow_prior import flow_times
from models.latent_prior import load_latent_prior
from solvers import get_solver
from solvers.flair import (data_residual, hard_data_consistency, regularizer_error_table, regularizer_weights,
                           time_grid)
from studio.core.conventions import to_image
from studio.core.errors import StudioError
from studio.core.noise import GaussianNoise, measure
from studio.core.tasks import build_operator

TASKS = [{"name": "inpaint_box", "box_size": 0.5}, {"name": "super_resolution", "factor": 4}]


@pytest.fixture(scope="module", params=["sd", "sd3"])
def prior(request, tiny_sd_model_dir, tiny_sd3_model_dir):
    return load_latent_prior(tiny_sd_model_dir if request.param == "sd" else tiny_sd3_model_dir)


def _problem(task, size=(32, 32)):
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    op = build_operator(task, size, 0, None)
    return x, op, measure(x, op, GaussianNoise(0.01), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("task", TASKS)
def test_flair_runs_and_is_reproducible_on_both_families(prior, task):
    x, op, y = _problem(task)
    fn = get_solver("flair").fn
    a, b = fn(y, op, prior, steps=4, data_steps=2, seed=3), fn(y, op, prior, steps=4, data_steps=2, seed=3)
    assert a.image.shape == x.shape and a.x.shape == (1, 4, 8, 8)
    assert torch.equal(a.image, b.image) and 0 <= a.image.min() and a.image.max() <= 1
    assert not torch.equal(a.image, fn(y, op, prior, steps=4, data_steps=2, seed=4).image)
    assert a.record["nfe"] == len(a.record["data_steps_taken"]) <= 4


def test_hard_data_consistency_lowers_the_residual_and_stops_at_the_tolerance(prior):
    x, op, y = _problem(TASKS[0])
    mu = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    before = float(data_residual(prior, op, y, mu).pow(2).mean())
    fitted, taken = hard_data_consistency(prior, op, y, mu, lr=0.05, max_steps=5, tolerance=0.0)
    assert taken == 5 and float(data_residual(prior, op, y, fitted).pow(2).mean()) < 0.9 * before
    same, none = hard_data_consistency(prior, op, y, mu, lr=0.05, max_steps=5, tolerance=before * 1.01)
    assert none == 0 and torch.equal(same, mu)  # already below the tolerance: untouched


def test_the_data_steps_make_the_result_consistent(prior):
    """Toward an image the decoder can produce, the data steps cut the final residual."""
    op = build_operator(TASKS[0], (32, 32), 0, None)
    with torch.no_grad():
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        x = to_image(prior.decode(z)).clamp(0, 1)
    y = measure(x, op, GaussianNoise(0.0), torch.Generator().manual_seed(0))
    fn = get_solver("flair").fn
    free = fn(y, op, prior, steps=4, data_steps=0, seed=0).record["residual"][0]
    fitted = fn(y, op, prior, steps=4, data_steps=8, data_lr=0.5, seed=0).record["residual"][0]
    assert fitted < 0.8 * free


def test_the_time_grid_snaps_to_the_priors_own_times(prior):
    grid = time_grid(prior, 10, 0.18)
    s = flow_times(prior)[grid]
    assert grid == sorted(grid, reverse=True) and len(set(grid)) == len(grid)
    last = 0.18 + (1 - 0.18) / 11  # linspace(1, t_min, steps + 2) without its ends, as the official code
    assert abs(float(s[-1]) - last) < 0.01 and float(s[0]) <= float(flow_times(prior)[-1])


def test_regularizer_weights_are_the_normalised_inverse_error():
    times = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    assert torch.equal(regularizer_weights(None, times), torch.ones(3, dtype=torch.float64))
    w = regularizer_weights([1.0, 2.0, 4.0], times)  # table at t = 1, 0.5, 0
    torch.testing.assert_close(w, torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64) * 3 / 7)


def test_error_table_is_measured_on_the_priors_grid(prior):
    table = regularizer_error_table(prior, torch.randn(2, 4, 8, 8), points=5, draws=1)
    assert len(table) == 5 and all(v > 0 and v == v for v in table)


@pytest.mark.parametrize("bad, message", [({"steps": 0}, "steps"), ({"t_min": 1.0}, "t_min"),
                                          ({"data_steps": -1}, "data_steps"), ({"data_lr": 0.0}, "data_lr"),
                                          ({"regularizer_weight": -1.0}, "regularizer_weight")])
def test_bad_parameters_are_one_clear_error(prior, bad, message):
    x, op, y = _problem(TASKS[0])
    with pytest.raises(StudioError, match=message):
        get_solver("flair").fn(y, op, prior, **bad)


def test_the_step_callback_sees_decoded_images(prior):
    x, op, y = _problem(TASKS[1])
    seen = []
    get_solver("flair").fn(y, op, prior, steps=3, data_steps=1,
                           callback=lambda i, n, z, x0: seen.append((z.shape, x0.shape)))
    assert seen and all(z == (1, 4, 8, 8) and img == (1, 3, 32, 32) for z, img in seen)
