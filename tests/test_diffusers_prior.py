"""Pixel priors from diffusers folders: save → load by folder → every solver runs, seeded, any size."""

from __future__ import annotations

import json

import pytest
import torch

from models import load_pixel_prior
from models.base import split_prediction
from solvers import SOLVERS, supports
from studio.core.errors import ModelLoadError
from studio.core.noise import GaussianNoise, measure
from studio.core.masks import box_mask
from studio.core.operators import Inpainting, make_operator
from tests.conftest import build_tiny_pixel_pipeline

FEW_STEPS = {"ddim": {"steps": 3}, "dps": {"steps": 3}, "mcg": {"steps": 3},
             "cdim": {"steps": 3, "inner_steps": 1}, "ddrm": {"steps": 3}}


@pytest.mark.parametrize("solver", [n for n, i in SOLVERS.items() if not i.latent])
@pytest.mark.parametrize("size", [(16, 16), (17, 23)])
def test_each_solver_runs_reproducibly_on_loaded_model(tiny_pixel_model_dir, solver, size):
    prior = load_pixel_prior(tiny_pixel_model_dir)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, *size, generator=g)
    op = Inpainting(box_mask(*size, box_size=5, top_left=(2, 3))) if solver != "ddrm" else make_operator(
        "super_resolution", factor=2, mode="avgpool")
    y = measure(x, op, GaussianNoise(0.05), g)
    runs = [SOLVERS[solver].fn(y, op, prior, noise_sigma=0.05, seed=11, **FEW_STEPS[solver])
            for _ in range(2)]
    assert runs[0].image.shape == x.shape
    assert torch.equal(runs[0].image, runs[1].image), "same seed must give the same image"
    assert 0.0 <= runs[0].image.min() and runs[0].image.max() <= 1.0
    rec = runs[0].record
    assert rec["nfe"] >= 3 and rec["wall_time_s"] > 0 and len(rec["residual"]) == 1
    json.dumps(rec)  # JSON-ready
    other = SOLVERS[solver].fn(y, op, prior, noise_sigma=0.05, seed=12, **FEW_STEPS[solver])
    assert not torch.equal(other.image, runs[0].image), "a different seed must give a different sample"


def test_prediction_types_agree():
    """epsilon, v and sample parametrisations give the same (ε̂, x̂0) pair for consistent outputs."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    ab = torch.tensor(0.3).reshape(1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    for kind, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        pred = split_prediction(out, xt, ab, kind)
        assert torch.allclose(pred.x0, x0, atol=1e-5) and torch.allclose(pred.eps, eps, atol=1e-5), kind


def test_v_prediction_model_loads_and_runs(tmp_path):
    build_tiny_pixel_pipeline(prediction_type="v_prediction").save_pretrained(tmp_path)
    prior = load_pixel_prior(str(tmp_path))
    assert prior.prediction_type == "v_prediction"
    y = torch.zeros(1, 3, 16, 16)
    out = SOLVERS["ddim"].fn(y, make_operator("denoise"), prior, steps=2, seed=0)
    assert torch.isfinite(out.image).all()


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pixel_prior(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="hub is unreachable offline"):
        load_pixel_prior("google/ddpm-cifar10-32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        load_pixel_prior(str(tmp_path / "empty"))
    corrupt = tmp_path / "corrupt"
    build_tiny_pixel_pipeline().save_pretrained(corrupt)
    (corrupt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError) as info:
        load_pixel_prior(str(corrupt))
    assert "\n" not in str(info.value)


def test_supports_filters_by_operator():
    blur = make_operator("motion_blur", kernel_size=7, intensity=0.5, seed=0)
    assert supports("dps", blur) and supports("cdim", blur)
    assert not supports("ddrm", blur, (3, 16, 16))
    assert supports("ddrm", make_operator("gaussian_blur", kernel_size=5, sigma=1.0), (3, 16, 16))


def test_callback_sees_every_step_and_can_cancel(tiny_pixel_model_dir):
    from studio.core.errors import SolveCancelled

    prior = load_pixel_prior(tiny_pixel_model_dir)
    y = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = []
    SOLVERS["dps"].fn(y, make_operator("denoise"), prior, steps=4, seed=0,
                      callback=lambda i, n, x_t, x0: seen.append((i, n, x_t.shape, x0.requires_grad)))
    assert seen == [(i, 4, (1, 3, 16, 16), False) for i in range(4)]
    with pytest.raises(SolveCancelled, match="step 2 of 4"):
        SOLVERS["cdim"].fn(y, make_operator("denoise"), prior, steps=4, seed=0, callback=lambda i, *_: i < 1)


def test_dps_accepts_a_nonlinear_user_callable(tiny_pixel_model_dir):
    """Any y = A(x) works with DPS, which only differentiates through it (here: a saturating gamma)."""
    from studio.core.operators import FunctionOperator

    prior = load_pixel_prior(tiny_pixel_model_dir)
    op = FunctionOperator(lambda x: x.clamp(0, 1) ** 2.2, name="gamma")
    y = op.A(torch.rand(1, 3, 15, 15, generator=torch.Generator().manual_seed(0)))
    out = SOLVERS["dps"].fn(y, op, prior, steps=3, seed=0, x_shape=(3, 15, 15))
    assert out.image.shape == (1, 3, 15, 15) and out.record["grad_nfe"] == 3
    with pytest.raises(Exception, match="linear"):
        SOLVERS["cdim"].fn(y, op, prior, steps=3, x_shape=(3, 15, 15))
