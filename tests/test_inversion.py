"""Inversion (DDIM, Newton–Raphson, null-text) and editing on a tiny random SD-style pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from models.latent_prior import load_latent_prior
from solvers.inversion.ddim import ddim_inversion, regenerate, step_coefficients
from solvers.inversion.newton import newton_inversion
from solvers.inversion.null_text import null_text_inversion
from studio.workflows import editing
from studio.cli import main
from studio.core.errors import StudioError
from studio.core.io import save_image


@pytest.fixture(scope="module")
def prior(tiny_sd_model_dir):
    return load_latent_prior(tiny_sd_model_dir)


@pytest.fixture(scope="module")
def z0(prior):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return prior.encode(x)


def _implicit_residual(prior, z_t, z_s, t, s, prompt=""):
    """RMS of z_t − f(z_t), the equation every inversion step should solve."""
    a, b = step_coefficients(prior, t, s, z_t)
    with torch.no_grad():
        eps = prior.predict_with(z_t, t, prior.embed(prompt)).eps
    return float((z_t - a * z_s - b * eps).pow(2).mean().sqrt())


def test_newton_lowers_the_implicit_residual_at_every_step(prior, z0):
    newton = newton_inversion(prior, z0, prompt="grinning face", steps=6, newton_steps=3, reg_weight=0.0)
    cond = prior.embed("grinning face")
    path = list(reversed(newton.grid))
    improved = 0
    for k, t in enumerate(path):
        s = path[k - 1] if k > 0 else -1
        z_s = newton.trajectory[k]
        a, b = step_coefficients(prior, t, s, z_s)
        with torch.no_grad():
            ddim_guess = a * z_s + b * prior.predict_with(z_s, t, cond).eps  # DDIM inversion's step from z_s
        r_ddim = _implicit_residual(prior, ddim_guess, z_s, t, s, "grinning face")
        r_newton = _implicit_residual(prior, newton.trajectory[k + 1], newton.trajectory[k], t, s,
                                      "grinning face")
        history, objective = newton.record["residual_rms"][k], newton.record["objective"][k]
        assert history[0] == pytest.approx(r_ddim, rel=1e-4)  # iteration 0 is the DDIM estimate
        # with λ = 0 the objective is mean |r|: strictly lower at every accepted iteration
        assert all(b < a for a, b in zip(objective, objective[1:])), objective
        assert r_newton == pytest.approx(history[-1], rel=1e-4)
        assert r_newton <= r_ddim * (1 + 1e-5)  # never worse than the DDIM guess it starts from
        improved += r_newton < 0.95 * r_ddim
    # On this random tiny UNet at a 6-step grid the finite-difference Newton direction is not a descent
    # direction for mean |r| at every step; which steps fail depends on the CPU's float rounding (5 or more
    # of 6 improved on the AMD EPYC of earlier runs, 4 of 6 on an Intel Xeon), and there the guarded step
    # keeps the DDIM estimate. It must still cut the residual by 5% on at least half the steps.
    assert improved >= len(path) // 2


def test_inversion_then_regeneration_is_reproducible(prior, z0):
    for fn in (ddim_inversion, newton_inversion):
        a, b = fn(prior, z0, prompt="red heart", steps=4), fn(prior, z0, prompt="red heart", steps=4)
        assert torch.equal(a.z_start, b.z_start)
        assert torch.equal(regenerate(prior, a), regenerate(prior, b))


def test_ddim_inversion_error_shrinks_with_the_step(prior, z0):
    """The ε(z_s) ≈ ε(z_t) approximation is first order: 10x finer steps over the same part of the
    schedule give a much smaller round-trip error, and Newton beats DDIM at the coarse step."""
    def err(inv):
        return float((regenerate(prior, inv) - z0).pow(2).mean().sqrt())

    coarse = err(ddim_inversion(prior, z0, steps=50, strength=0.1))
    fine = err(ddim_inversion(prior, z0, steps=500, strength=0.1))
    newton = err(newton_inversion(prior, z0, steps=50, strength=0.1, newton_steps=3, reg_weight=0.0))
    assert fine < 0.5 * coarse and newton < coarse


def test_guidance_one_versus_more(prior, z0):
    """w = 1 uses one UNet call per step; w > 1 two (batched), and regeneration uses the same w."""
    w1 = ddim_inversion(prior, z0, prompt="red heart", steps=3, guidance=1.0)
    w3 = ddim_inversion(prior, z0, prompt="red heart", steps=3, guidance=3.0)
    assert w1.record["nfe"] == 3 and w3.record["nfe"] == 6
    assert not torch.equal(w1.z_start, w3.z_start)
    assert not torch.equal(regenerate(prior, w3), regenerate(prior, w3, guidance=1.0))


def test_null_text_optimises_per_step_embeddings(prior, z0):
    inv = null_text_inversion(prior, z0, prompt="red heart", steps=3, inner_steps=3)
    assert len(inv.null_embeddings) == 3 and inv.guidance == 7.5
    plain = prior.embed("")
    assert any(not torch.allclose(e.float(), plain.float()) for e in inv.null_embeddings)
    # the null-text reconstruction is closer to the pivots than plain guided regeneration
    guided_plain = regenerate(prior, editing.Inversion(z_start=inv.z_start, trajectory=[], grid=inv.grid,
                                                       prompt=inv.prompt, guidance=7.5))
    assert (regenerate(prior, inv) - z0).norm() < (guided_plain - z0).norm()


def test_strength_inverts_part_of_the_grid(prior, z0):
    inv = newton_inversion(prior, z0, steps=10, strength=0.3)
    assert len(inv.grid) == 3 and inv.grid[-1] == 0
    with pytest.raises(StudioError, match="strength"):
        ddim_inversion(prior, z0, steps=10, strength=0.0)


def test_edit_and_cli(tmp_path, tiny_sd_model_dir, capsys):
    img = tmp_path / "in.png"
    save_image(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)), img)
    out = tmp_path / "rec.png"
    assert main(["invert", "--input", str(img), "--output", str(out), "--model", tiny_sd_model_dir,
                 "--steps", "3", "--prompt", "red heart", "newton_steps=1"]) == 0
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["method"] == "newton" and rec["newton_steps"] == 1 and rec["nfe"] > 0
    assert "psnr" in rec["metrics"]
    assert out.with_suffix(".safetensors").is_file()
    edit = tmp_path / "edit.png"
    assert main(["edit", "--input", str(img), "--output", str(edit), "--model", tiny_sd_model_dir,
                 "--steps", "3", "--method", "ddim", "--source-prompt", "red heart",
                 "--target-prompt", "grinning face"]) == 0
    rec = json.loads(edit.with_suffix(".json").read_text())
    assert rec["target_prompt"] == "grinning face" and (tmp_path / "edit.reconstruction.png").is_file()
    capsys.readouterr()
    # bad input: unknown method, size the VAE does not divide, unknown method parameter
    assert main(["invert", "--input", str(img), "--output", str(out), "--model", tiny_sd_model_dir,
                 "--method", "magic"]) == 2
    assert "unknown inversion method 'magic'" in capsys.readouterr().err
    odd = tmp_path / "odd.png"
    save_image(torch.rand(1, 3, 30, 32), odd)
    assert main(["invert", "--input", str(odd), "--output", str(out), "--model", tiny_sd_model_dir]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert main(["invert", "--input", str(img), "--output", str(out), "--model", tiny_sd_model_dir,
                 "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_interpolation_endpoints(prior, tiny_sd_model_dir):
    a = editing.invert(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)), method="ddim",
                       steps=3, model=prior)
    b = editing.invert(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)), method="ddim",
                       steps=3, model=prior)
    frames = editing.interpolate(a, b, alphas=(0.0, 0.5, 1.0), model=prior)
    torch.testing.assert_close(frames[0], a.reconstruction, atol=1e-5, rtol=0)
    torch.testing.assert_close(frames[2], b.reconstruction, atol=1e-5, rtol=0)
