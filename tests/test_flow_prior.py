"""Flow-matching priors: the Gaussian-path equivalence with variance-preserving models (checked against the
exact Gaussian flow), and a tiny random Stable-Diffusion-3-style pipeline loaded as a prior."""

from __future__ import annotations

import pytest
import torch

from models.analytic import GaussianPrior, random_covariance
from models.base import linear_alphas_cumprod
from models.diffusers_prior import open_pipeline
from models.flow_prior import (FlowMatchingPrior, SD3LatentPrior, flow_time, flow_times, flow_velocity,
                               training_sigmas, vp_alpha_bar)
from models.latent_prior import load_latent_prior
from models.loading import as_prior
from solvers.common import ddim_step
from studio.core.errors import StudioError


def exact_gaussian_flow(mean: torch.Tensor, cov: torch.Tensor, x_s: torch.Tensor, s: float):
    """E[x_0 | x_s] and E[ε | x_s] for x_0 ~ N(μ, Σ), x_s = (1 − s) x_0 + s ε: the flow parametrisation
    computed on its own, with no VP quantity."""
    d = mean.shape[0]
    cov_s = (1 - s) ** 2 * cov + s**2 * torch.eye(d, dtype=cov.dtype)
    gain = (1 - s) * cov @ torch.linalg.inv(cov_s)
    x0 = mean + (x_s - (1 - s) * mean) @ gain.T
    return x0, (x_s - (1 - s) * x0) / s


class ExactGaussianFlow(FlowMatchingPrior):
    """A 'flow model' whose velocity is the exact one of a Gaussian."""

    def __init__(self, mean, cov, sigmas):
        super().__init__(sigmas)
        self.mean, self.cov = mean, cov

    def velocity(self, x_flow, t):
        s = float(self.sigmas[t])
        x0, eps = exact_gaussian_flow(self.mean, self.cov, x_flow.reshape(x_flow.shape[0], -1).double(), s)
        return (eps - x0).reshape(x_flow.shape).to(x_flow.dtype)


@pytest.fixture(scope="module")
def gaussian():
    gen = torch.Generator().manual_seed(0)
    d = 6
    mean = torch.randn(d, generator=gen, dtype=torch.float64)
    cov = random_covariance(d, gen)
    return mean, cov, GaussianPrior(mean, cov, sample_shape=(1, 1, d))


def test_time_maps_are_inverse_and_monotone():
    ab = linear_alphas_cumprod()
    s = flow_time(ab)
    torch.testing.assert_close(vp_alpha_bar(s), ab)
    assert (s.diff() > 0).all() and 0 < s[0] < 0.01 and 0.9 < s[-1] < 1


@pytest.mark.parametrize("t", [0, 100, 500, 900, 999])
def test_flow_view_of_a_vp_model_is_the_exact_gaussian_flow(gaussian, t):
    mean, cov, prior = gaussian
    s = float(flow_times(prior)[t])
    x_s = torch.randn(4, 1, 1, 6, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    x0, eps = exact_gaussian_flow(mean, cov, x_s.reshape(4, 6), s)
    torch.testing.assert_close(flow_velocity(prior, x_s, t).reshape(4, 6), eps - x0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [0, 100, 500, 900, 999])
def test_vp_view_of_a_flow_model_is_the_same_denoiser(gaussian, t):
    mean, cov, prior = gaussian
    flow = ExactGaussianFlow(mean, cov, flow_times(prior))
    torch.testing.assert_close(flow.alphas_cumprod, prior.alphas_cumprod)
    x_t = torch.randn(4, 1, 1, 6, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    want, got = prior.predict(x_t, t), flow.predict(x_t, t)
    torch.testing.assert_close(got.x0, want.x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.eps, want.eps, rtol=1e-6, atol=1e-6)


def test_bad_flow_grids_are_refused():
    for bad in (torch.tensor([0.0, 0.5]), torch.tensor([0.5, 0.2]), torch.tensor([0.5, 1.5])):
        with pytest.raises(ValueError, match="ascending"):
            FlowMatchingPrior(bad)


def test_training_grid_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = scheduler.sigmas[scheduler.sigmas > 0]  # some versions append the final 0
    torch.testing.assert_close(training_sigmas(1000, 3.0).flip(0).float(), sigmas.float())


# ------------------------------------------------------------------------ a tiny SD3-style pipeline


@pytest.fixture(scope="module")
def sd3(tiny_sd3_model_dir):
    return load_latent_prior(tiny_sd3_model_dir)


def test_sd3_folder_loads_as_a_flow_prior(sd3, tiny_sd3_model_dir):
    assert isinstance(sd3, SD3LatentPrior) and isinstance(as_prior(tiny_sd3_model_dir), SD3LatentPrior)
    assert sd3.factor == 4 and sd3.patch_size == 2 and sd3.latent_channels == 4 and sd3.image_size == 64
    assert sd3.describe()["flow"] and sd3.describe()["schedule_shift"] == 3.0
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    z = sd3.encode(x)
    assert z.shape == (2, 4, 8, 6) and sd3.decode(z).shape == x.shape
    raw = sd3.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, (raw - 0.0609) * 1.5035)  # SD3's shift and scale
    with pytest.raises(StudioError, match="not divisible by 8"):
        sd3.latent_shape((1, 3, 36, 32))


def test_a_loaded_sd3_pipeline_is_used_as_it_is():
    from tests.conftest import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline()
    prior = as_prior(pipe)
    assert isinstance(prior, SD3LatentPrior)
    assert prior.transformer is pipe.transformer and prior.vae is pipe.vae  # nothing copied


def test_guidance_combines_conditional_and_unconditional_velocity(sd3):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sd3.set_prompt("red heart", guidance=1.0)
    v_c = sd3.velocity(z, 700)
    sd3.set_prompt("", guidance=1.0)
    v_u = sd3.velocity(z, 700)
    sd3.set_prompt("red heart", guidance=4.0)
    torch.testing.assert_close(sd3.velocity(z, 700), v_u + 4.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(v_c, v_u, atol=1e-4)
    sd3.set_prompt("")


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ddim_on_the_vp_view_is_the_pipelines_own_euler_sampler(tiny_sd3_model_dir, guidance):
    """DDIM (η = 0) on the VP view and diffusers' flow Euler sampler are the same update: on the same four
    grid points, the two generate the same latent."""
    pipe, _ = open_pipeline(tiny_sd3_model_dir)  # a folder saved without T5 needs it passed as None
    prior = as_prior(pipe)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    grid = [999, 666, 333, 0]  # the pipeline shifts u = (t + 1)/T to s_t itself
    want = pipe("red heart", sigmas=[(t + 1) / 1000 for t in grid], guidance_scale=guidance,
                latents=noise.clone(), output_type="latent", height=32, width=32).images
    assert torch.allclose(pipe.scheduler.sigmas[:-1].double(), prior.sigmas[grid], atol=1e-6)
    prior.set_prompt("red heart", guidance)
    z = noise.clone()  # s_999 = 1: the VP start is the noise itself
    with torch.no_grad():
        for i, t in enumerate(grid):
            pred = prior.predict(z, t)
            ab_prev = prior.alphas_cumprod[grid[i + 1]] if i + 1 < len(grid) else torch.tensor(1.0)
            z = ddim_step(z, pred.eps, pred.x0, prior.alphas_cumprod[t].float(), ab_prev.float(), eta=0.0)
    torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver, params", [
    ("latent-dps", {}), ("psld", {}), ("flair", {"data_steps": 2}),
    ("resample", {"dc_every": 2, "pixel_iters": 3, "latent_iters": 3})])
def test_vp_solvers_run_on_a_flow_model_and_are_reproducible(sd3, solver, params):
    from solvers import get_solver
    from studio.core.noise import GaussianNoise, measure
    from studio.core.tasks import build_operator

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    op = build_operator({"name": "inpaint_box", "box_size": 0.5}, (32, 32), 0, None)
    y = measure(x, op, GaussianNoise(0.01), torch.Generator().manual_seed(0))
    fn = get_solver(solver).fn
    a, b = fn(y, op, sd3, steps=3, seed=1, **params), fn(y, op, sd3, steps=3, seed=1, **params)
    assert a.image.shape == x.shape and a.x.shape == (1, 4, 8, 8) and torch.equal(a.image, b.image)
    assert not torch.equal(a.image, fn(y, op, sd3, steps=3, seed=2, **params).image)


def test_solvers_and_inversions_that_need_a_unet_refuse_a_flow_model_in_one_line(sd3):
    from solvers import get_solver
    from solvers.inversion import get_inverter
    from studio.core.tasks import build_operator

    op = build_operator({"name": "inpaint_box", "box_size": 0.5}, (32, 32), 0, None)
    with pytest.raises(StudioError, match="p2l does not run on a flow-matching .* that do: .*latent-dps"):
        get_solver("p2l").fn(torch.rand(1, 3, 32, 32), op, sd3, steps=2)
    with pytest.raises(StudioError, match="null-text inversion does not run on a flow-matching"):
        get_inverter("null-text")[0](sd3, torch.zeros(1, 4, 8, 8), prompt="red heart")


def test_cli_restores_with_an_sd3_folder_and_refuses_p2l_in_one_line(tmp_path, tiny_sd3_model_dir, capsys):
    import json

    from studio.cli import main
    from studio.core.io import save_image

    clean = tmp_path / "clean.png"
    save_image(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), clean)
    out = tmp_path / "x.png"
    args = ["restore", "--input", str(clean), "--simulate", "--task", "super_resolution", "--model",
            tiny_sd3_model_dir, "--steps", "3", "--quiet", "operator.factor=4"]
    code = main([*args, "--solver", "flair", "--output", str(out), "prompt=red heart", "data_steps=1"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["solver"] == "flair" and rec["model"]["flow"] and rec["solver_params"]["prompt"] == "red heart"
    assert main([*args, "--solver", "p2l", "--output", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "p2l does not run on a flow-matching" in err
    assert not (tmp_path / "y.png").exists()
