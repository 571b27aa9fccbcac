"""Latent solvers (latent DPS, PSLD, P2L) and the latent prior on a tiny random SD-style pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from models.latent_prior import load_latent_prior
from solvers import SOLVERS, get_solver
from studio.cli import main
from studio.core.errors import ModelLoadError, SolveCancelled, StudioError
from studio.core.io import save_image
from studio.core.noise import GaussianNoise, measure
from studio.core.tasks import build_operator

LATENT = ["latent-dps", "psld", "p2l"]


@pytest.fixture(scope="module")
def prior(tiny_sd_model_dir):
    return load_latent_prior(tiny_sd_model_dir)


def _problem(task: dict, size=(24, 40), seed=0):
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed))
    op = build_operator(task, size, seed, None)
    return x, op, measure(x, op, GaussianNoise(0.01), torch.Generator().manual_seed(seed))


def test_latent_prior_roundtrip_and_guidance(prior):
    assert prior.factor == 4 and prior.latent_channels == 4 and prior.image_size == 64
    x = torch.rand(2, 3, 24, 40) * 2 - 1
    z = prior.encode(x)
    assert z.shape == (2, 4, 6, 10)
    torch.testing.assert_close(prior.encode(x), z)  # deterministic (encoder mean)
    assert prior.decode(z).shape == x.shape
    prior.set_prompt("grinning face", guidance=1.0)
    e1 = prior.predict(z, 500).eps
    prior.set_prompt("grinning face", guidance=3.0)
    e3 = prior.predict(z, 500).eps
    cond = prior.model_output(z, 500, prior.embed("grinning face"))
    unc = prior.model_output(z, 500, prior.embed(""))
    torch.testing.assert_close(e1, cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(e3, unc + 3.0 * (cond - unc), rtol=1e-4, atol=1e-5)
    prior.set_prompt("")


@pytest.mark.parametrize("solver", LATENT)
@pytest.mark.parametrize("task", [{"name": "inpaint_box", "box_size": 0.5},
                                  {"name": "super_resolution", "factor": 4}])
def test_latent_solvers_run_and_are_reproducible(prior, solver, task):
    x, op, y = _problem(task)
    fn = get_solver(solver).fn
    a = fn(y, op, prior, steps=4, seed=3)
    b = fn(y, op, prior, steps=4, seed=3)
    c = fn(y, op, prior, steps=4, seed=4)
    assert a.image.shape == (1, 3, 24, 40) and a.x.shape == (1, 4, 6, 10)
    assert torch.equal(a.image, b.image) and not torch.equal(a.image, c.image)
    assert 0 <= a.image.min() and a.image.max() <= 1
    assert a.record["nfe"] >= 4 and a.record["grad_nfe"] >= 4 and len(a.record["residual"]) == 1


@pytest.mark.parametrize("solver", LATENT)
def test_latent_solvers_reject_sizes_the_vae_does_not_divide(prior, solver):
    x, op, y = _problem({"name": "inpaint_box", "box_size": 0.5}, size=(26, 40))
    with pytest.raises(StudioError, match="not divisible by this model's VAE factor 4"):
        get_solver(solver).fn(y, op, prior, steps=2)


def test_latent_dps_gradient_lowers_the_residual(prior):
    """Guidance works: toward an image the decoder can produce, the DPS gradient cuts the residual by > 20%
    compared with the same run with a negligible step."""
    from studio.core.conventions import to_image

    op = build_operator({"name": "inpaint_box", "box_size": 0.5}, (24, 40), 0, None)
    with torch.no_grad():
        z = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(5))
        x = to_image(prior.decode(z)).clamp(0, 1)
    y = op.A(x)
    guided = get_solver("latent-dps").fn(y, op, prior, steps=20, scale=5.0, seed=0)
    unguided = get_solver("latent-dps").fn(y, op, prior, steps=20, scale=1e-8, seed=0)
    assert guided.record["residual"][0] < 0.8 * unguided.record["residual"][0]


def test_p2l_tunes_the_prompt_and_the_ablation_freezes_it(prior):
    x, op, y = _problem({"name": "inpaint_box", "box_size": 0.5})
    tuned = get_solver("p2l").fn(y, op, prior, steps=6, seed=0, prompt_lr=1e-2)
    frozen = get_solver("p2l").fn(y, op, prior, steps=6, seed=0, tune_prompt=False)
    assert tuned.record["prompt_drift"] > 0 and frozen.record["prompt_drift"] == 0
    assert tuned.record["nfe"] == 12 and frozen.record["nfe"] == 6  # one extra UNet pass per step for c


def test_p2l_projection_makes_the_estimate_consistent():
    """The proximal step: with a tiny weight the result satisfies A x = y (up to CG tolerance)."""
    from solvers.p2l import proximal_projection

    x, op, y = _problem({"name": "super_resolution", "factor": 4}, size=(24, 40))
    x_hat = proximal_projection(op, y, torch.rand_like(x), weight=1e-6, iters=50)
    assert (op.A(x_hat) - y).norm() < 1e-3 * y.norm()


def test_psld_needs_a_linear_operator_and_valid_gluing(prior):
    from studio.core.operators import FunctionOperator

    x, op, y = _problem({"name": "inpaint_box", "box_size": 0.5})
    with pytest.raises(StudioError, match="unknown gluing"):
        get_solver("psld").fn(y, op, prior, steps=2, gluing="nope")
    nonlinear = FunctionOperator(lambda v: v.clamp(0, 1) ** 2, name="square")
    with pytest.raises(StudioError, match="linear operator"):
        get_solver("psld").fn(y, nonlinear, prior, steps=2, x_shape=(3, 24, 40))
    out = get_solver("psld").fn(y, op, prior, steps=2, gluing="pinv")
    assert out.image.shape == x.shape


_SMALL_BLUR = {"name": "gaussian_blur", "kernel_size": 9, "sigma": 1.5}


@pytest.mark.parametrize("task, expected", [
    ({"name": "inpaint_box", "box_size": 0.5}, "adjoint"),
    ({"name": "super_resolution", "factor": 4}, "pinv"),
    ({"name": "super_resolution", "factor": 4, "mode": "bicubic"}, "pinv"),
    (_SMALL_BLUR, "identity"),
    ({"name": "motion_blur", "kernel_size": 9}, "identity"),
    ({"name": "denoise"}, "identity"),
    ({"name": "colorize"}, "pinv"),
    ({"name": "composed", "outer": _SMALL_BLUR, "inner": _SMALL_BLUR}, "pinv"),  # no official counterpart
])
def test_psld_auto_gluing_follows_the_official_transpose_per_operator(task, expected):
    from solvers.psld import resolve_gluing

    x, op, y = _problem(task)
    assert resolve_gluing("auto", op, tuple(y.shape[1:]), tuple(x.shape[1:])) == expected
    for mode in ("identity", "adjoint", "pinv"):  # an explicit choice is kept where it is valid
        if mode != "identity" or y.shape == x.shape:
            assert resolve_gluing(mode, op, tuple(y.shape[1:]), tuple(x.shape[1:])) == mode


def test_psld_default_gluing_projects_super_resolution_onto_the_measurements():
    """avgpool x4: AᵀA = P/16, so the adjoint gluing leaves 15/16 of the residual; the default is the official
    nearest-upsampling "transpose" (= A† = 16 Aᵀ), a projection: A(glued) = y."""
    import inspect

    import torch.nn.functional as F

    from solvers.psld import glue, psld, resolve_gluing

    x, op, y = _problem({"name": "super_resolution", "factor": 4})
    x_hat = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))
    mode = resolve_gluing(inspect.signature(psld).parameters["gluing"].default, op,
                          tuple(y.shape[1:]), tuple(x.shape[1:]))
    glued = glue(op, y, x_hat, mode)
    before = (op.A(x_hat) - y).norm()
    assert (op.A(glued) - y).norm() < 1e-5 * before
    torch.testing.assert_close(glued, x_hat + F.interpolate(y - op.A(x_hat), scale_factor=4, mode="nearest"),
                               rtol=1e-5, atol=1e-5)
    adjoint = glue(op, y, x_hat, "adjoint")
    assert (op.A(adjoint) - y).norm() > 0.9 * before


def test_psld_identity_gluing_is_the_official_blur_form_and_needs_a_shape_preserving_operator(prior):
    from solvers.psld import glue, resolve_gluing

    x, blur, y = _problem(_SMALL_BLUR)
    x_hat = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(glue(blur, y, x_hat, "identity"), x_hat + y - blur.A(x_hat))
    x, mask, y = _problem({"name": "inpaint_box", "box_size": 0.5})
    ref = glue(mask, y, x_hat, "adjoint")  # mask multiplies: identity (official), Aᵀ and A† all agree
    torch.testing.assert_close(glue(mask, y, x_hat, "pinv"), ref)
    torch.testing.assert_close(glue(mask, y, x_hat, "identity"), ref)
    x, sr, y = _problem({"name": "super_resolution", "factor": 4})
    with pytest.raises(StudioError, match="keeps the image's shape") as err:
        resolve_gluing("identity", sr, tuple(y.shape[1:]), tuple(x.shape[1:]))
    assert "\n" not in str(err.value) and "3x24x40 to 3x6x10" in str(err.value)
    with pytest.raises(StudioError, match="keeps the image's shape"):
        glue(sr, y, x_hat, "identity")
    with pytest.raises(StudioError, match="keeps the image's shape"):
        get_solver("psld").fn(y, sr, prior, steps=2, gluing="identity")


@pytest.mark.parametrize("task, gluing, expected", [
    ({"name": "super_resolution", "factor": 4}, None, "pinv"),
    (_SMALL_BLUR, None, "identity"),
    ({"name": "super_resolution", "factor": 4}, "adjoint", "adjoint"),
])
def test_psld_record_shows_the_resolved_gluing(prior, task, gluing, expected):
    x, op, y = _problem(task)
    kwargs = {} if gluing is None else {"gluing": gluing}
    out = get_solver("psld").fn(y, op, prior, steps=2, seed=0, **kwargs)
    assert out.record["params"]["gluing"] == expected and out.image.shape == x.shape


def test_callback_and_cancel(prior):
    x, op, y = _problem({"name": "inpaint_box", "box_size": 0.5})
    seen = []
    get_solver("p2l").fn(y, op, prior, steps=3,
                         callback=lambda i, n, zt, x0: seen.append((i, n, tuple(x0.shape))))
    assert seen == [(0, 3, (1, 3, 24, 40)), (1, 3, (1, 3, 24, 40)), (2, 3, (1, 3, 24, 40))]
    with pytest.raises(SolveCancelled):
        get_solver("latent-dps").fn(y, op, prior, steps=3, callback=lambda *a: False)


def test_restore_workflow_and_cli(tmp_path, tiny_sd_model_dir, capsys):
    clean = tmp_path / "clean.png"
    save_image(torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(1)), clean)
    out = tmp_path / "x.png"
    code = main(["restore", "--input", str(clean), "--simulate", "--task", "super_resolution",
                 "--solver", "p2l", "--model", tiny_sd_model_dir, "--steps", "3", "--output", str(out),
                 "--quiet", "operator.factor=4", "prompt=grinning face", "tune_prompt=false"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["solver"] == "p2l" and rec["model"]["latent"]
    assert rec["solver_params"]["prompt"] == "grinning face"
    assert rec["prompt_drift"] == 0 and "psnr" in rec["metrics"]
    # a latent solver on a pixel model, and the reverse: one clear line each
    assert main(["restore", "--input", str(clean), "--simulate", "--task", "inpaint_box", "--solver", "cdim",
                 "--model", tiny_sd_model_dir, "--output", str(tmp_path / "y.png"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an unconditional pixel-space" in err and "p2l" in err
    with pytest.raises(ModelLoadError):
        load_latent_prior(str(tmp_path / "missing"))


def test_latent_solvers_are_registered():
    assert all(SOLVERS[s].latent for s in LATENT) and not SOLVERS["dps"].latent
    assert SOLVERS["psld"].needs_linear and not SOLVERS["p2l"].needs_linear
