"""DeepInverse's DPS, DDRM and DiffPIR as ``studio bench`` peers (studio/eval/deepinv_peer.py): the
torchvision stand-in, the denoiser wrapper around our prior, the physics wrappers (exact SVD physics),
seeded runs and 2-step bench rows."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

if importlib.util.find_spec("deepinv") is None:
    pytest.skip("deepinv is not installed (bash setup.sh installs deepinv==0.5.0 for the deepinv-dps peer)",
                allow_module_level=True)

from studio.eval import deepinv_peer as peer  # noqa: E402
from studio.eval.bench import ROW_FIELDS, check_solvers, run_bench  # noqa: E402
from studio.core.errors import StudioError  # noqa: E402
from studio.core.metrics import psnr  # noqa: E402
from studio.workflows.restoration import degrade  # noqa: E402


@pytest.fixture(scope="module")
def prior():
    from models.loading import load_prior

    return load_prior("emoji-pixel", "cpu")


@pytest.fixture(scope="module")
def emoji():
    from studio.eval.bench import load_bench_images

    return load_bench_images(None, 1)[0].image  # (1, 3, 32, 32) held-out emoji in [0, 1]


def test_deepinv_imports_and_the_standin_only_lives_during_the_import():
    dinv = peer.import_deepinv()
    assert dinv.__version__ == peer.DEEPINV_VERSION
    assert hasattr(dinv.sampling, "DPS")
    if peer._state["torchvision"] != "stand-in":
        pytest.skip("the real torchvision imports here: no stand-in to check")
    assert not any(m == "torchvision" or m.startswith("torchvision.") for m in sys.modules)
    from deepinv.utils import plotting

    with pytest.raises(RuntimeError, match="torchvision is not importable here"):
        plotting.make_grid(torch.zeros(1, 3, 4, 4))
    with pytest.raises(RuntimeError, match="torchvision is not importable here"):
        plotting.T.Compose([])
    with pytest.raises(RuntimeError, match="InterpolationMode.NEAREST"):
        sys.modules["deepinv.transform.rotate"].InterpolationMode.NEAREST


def test_standin_defines_only_the_listed_names():
    mods = peer._standin_modules()
    with pytest.raises(AttributeError, match="not in the stand-in"):
        mods["torchvision.transforms"].RandomCrop
    with pytest.raises(RuntimeError, match="iterated"):
        list(mods["torchvision.datasets.folder"].IMG_EXTENSIONS)
    assert str | mods["torchvision.transforms"].InterpolationMode  # annotations deepinv evaluates at import


@pytest.mark.parametrize("sigma", [0.05, 0.2, 1.0])
def test_denoiser_beats_the_noisy_input(prior, emoji, sigma):
    """D(x0 + σn, σ) in DeepInverse's convention ([0, 1] images, σ in [0, 1] units) must clearly beat the
    noisy input's PSNR; a wrong range or σ mapping (e.g. σ taken as model units) does not."""
    denoiser = peer.make_denoiser(prior)
    noisy = emoji + sigma * torch.randn(emoji.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = denoiser(noisy, sigma)
    assert out.shape == emoji.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert psnr(out, emoji) > psnr(noisy.clamp(0, 1), emoji) + 3.0
    assert denoiser.nfe == 1 and denoiser.grad_nfe == 0


def test_physics_wraps_our_operator_and_its_adjoint(emoji):
    d = degrade(emoji, "gaussian_blur", seed=0)
    physics = peer.make_physics(d.operator, tuple(emoji.shape), noise_sigma=0.025)
    assert torch.allclose(physics.A(emoji), d.operator.A(emoji))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(emoji.shape, generator=g), torch.randn(d.y.shape, generator=g)
    lhs, rhs = (physics.A(x) * y).sum(), (x * physics.A_adjoint(y)).sum()
    assert abs(float(lhs - rhs)) < 1e-3 * abs(float(lhs))


def test_deepinv_dps_counts_nfe_and_is_reproducible_by_seed(prior, emoji):
    d = degrade(emoji, "inpaint_box", seed=0)
    runs = [peer.deepinv_dps(d.y, d.operator, prior, steps=2, seed=s, noise_sigma=0.025) for s in (0, 0, 1)]
    assert runs[0]["nfe"] == runs[0]["grad_nfe"] == 2 and runs[0]["params"]["num_steps"] == 3
    assert torch.equal(runs[0]["image"], runs[1]["image"])
    assert not torch.equal(runs[0]["image"], runs[2]["image"])
    with pytest.raises(StudioError, match="steps must be a positive integer"):
        peer.deepinv_dps(d.y, d.operator, prior, steps=0)


def test_bench_variants_take_weight_only():
    assert [s.label for s in check_solvers(["deepinv-dps", "deepinv-dps:weight=100"])] == [
        "deepinv-dps", "deepinv-dps:weight=100.0"]
    for bad in ("deepinv-dps:scale=1", "deepinv-dps:weight=-1", "deepinv-dps:weight=x"):
        with pytest.raises(StudioError, match="deepinv-dps"):
            check_solvers([bad])


def test_two_step_bench_row_has_every_field(tmp_path):
    out = tmp_path / "bench"
    res = run_bench(tasks=["inpaint_box"], solvers=["deepinv-dps"], limit=1, model="emoji-pixel",
                    steps=["deepinv-dps=2"], out=out, progress=False)
    rows = [r for r in res.rows if r["solver"] == "deepinv-dps"]
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "ok", row["error"]
    assert set(ROW_FIELDS) <= set(row)
    empty = [k for k in ROW_FIELDS if row[k] is None and k != "error"]
    assert not empty, empty
    assert row["nfe"] == row["grad_nfe"] == 2 and len(row["residual_trace"]) == 2
    assert math.isfinite(row["psnr"]) and 0 < row["ssim"] <= 1 and row["wall_time_s"] > 0
    assert row["params"]["weight"] == 1.0 and row["params"]["num_steps"] == 3
    assert (out / row["output"]).is_file()
    saved = json.loads((out / "results.json").read_text())
    assert any("deepinv-dps" in n for n in saved["notes"])
    assert "deepinv-dps" in (out / "results.md").read_text()


@pytest.mark.parametrize("task", ["inpaint_box", "gaussian_blur", "super_resolution", "denoise"])
def test_decomposable_physics_is_our_operator(emoji, task):
    """The SVD physics DDRM and DiffPIR run on: A and A^T equal ours, and its closed-form prox_l2 satisfies
    the optimality condition A^T(Ax - y) + (x - z)/gamma = 0 of
    argmin 1/2||Ax - y||^2 + 1/(2 gamma)||x - z||^2."""
    d = degrade(emoji, task, seed=0)
    physics = peer.make_decomposable_physics(d.operator, tuple(emoji.shape), noise_sigma=0.025)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(emoji.shape, generator=g)
    y = torch.randn(d.y.shape, generator=g)
    shape = tuple(emoji.shape[1:])
    torch.testing.assert_close(physics.A(x), d.operator.A(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(physics.A_adjoint(y), d.operator.A_adjoint(y, shape), atol=1e-5, rtol=0)
    z, gamma = torch.rand(emoji.shape, generator=g), 0.7
    p = physics.prox_l2(z, y, gamma)
    grad = d.operator.A_adjoint(d.operator.A(p) - y, shape) + (p - z) / gamma
    assert float(grad.abs().max()) < 1e-4
    assert float(physics.noise_model.sigma) == pytest.approx(0.025)


def test_motion_blur_has_no_svd_physics(emoji):
    d = degrade(emoji, "motion_blur", seed=0)
    assert peer.make_decomposable_physics(d.operator, tuple(emoji.shape)) is None
    with pytest.raises(StudioError, match="deepinv-ddrm needs an operator with an SVD"):
        peer.run_peer("deepinv-ddrm", d.y, d.operator, prior=None, steps=2)


@pytest.mark.parametrize("name", ["deepinv-ddrm", "deepinv-diffpir"])
def test_ddrm_and_diffpir_reproducible_by_seed_and_leave_the_global_rng(prior, emoji, name):
    d = degrade(emoji, "inpaint_box", seed=0)
    state = torch.random.get_rng_state()
    runs = [peer.run_peer(name, d.y, d.operator, prior, steps=3, seed=s, noise_sigma=0.025)
            for s in (0, 0, 1)]
    assert torch.equal(torch.random.get_rng_state(), state)  # forked: the caller's RNG is untouched
    assert runs[0]["nfe"] == 3 and runs[0]["grad_nfe"] == 0
    assert torch.equal(runs[0]["image"], runs[1]["image"])
    assert not torch.equal(runs[0]["image"], runs[2]["image"])


@pytest.mark.parametrize("name", ["deepinv-ddrm", "deepinv-diffpir"])
def test_ddrm_and_diffpir_denoise_in_our_units(prior, emoji, name):
    """At noise sigma 0.1 ([0, 1] units) both must clearly beat the noisy input: a wrong range or sigma
    convention between their physics, our operator and our denoiser does not."""
    d = degrade(emoji, "denoise", seed=0, overrides=["noise.sigma=0.1"])
    res = peer.run_peer(name, d.y, d.operator, prior, steps=10, seed=0, noise_sigma=0.1)
    assert psnr(res["image"], emoji) > psnr(d.y.clamp(0, 1), emoji) + 3.0


def test_diffpir_noiseless_keeps_its_default_sigma(prior, emoji):
    d = degrade(emoji, "inpaint_box", seed=0, overrides=["noise.sigma=0"])
    res = peer.run_peer("deepinv-diffpir", d.y, d.operator, prior, steps=3, seed=0, noise_sigma=0.0)
    assert res["params"]["sigma"] == pytest.approx(0.05) and torch.isfinite(res["image"]).all()


def test_peer_options_are_checked():
    assert [s.label for s in check_solvers(["deepinv-ddrm:eta=0.5", "deepinv-diffpir:lambda=20"])] == [
        "deepinv-ddrm:eta=0.5", "deepinv-diffpir:lambda=20.0"]
    bad_variants = ("deepinv-ddrm:eta=2", "deepinv-ddrm:weight=1", "deepinv-diffpir:lambda=0",
                    "deepinv-diffpir:zeta=x")
    for bad in bad_variants:
        with pytest.raises(StudioError, match=bad.split(":")[0]):
            check_solvers([bad])
    with pytest.raises(StudioError, match="unknown DeepInverse peer"):
        peer.run_peer("deepinv-nope", torch.zeros(1, 3, 4, 4), None, None)


def test_two_step_bench_rows_for_ddrm_and_diffpir(tmp_path):
    out = tmp_path / "bench"
    res = run_bench(tasks=["inpaint_box", "motion_blur"], solvers=["deepinv-ddrm", "deepinv-diffpir"],
                    limit=1, model="emoji-pixel", steps=["deepinv-ddrm=2", "deepinv-diffpir=2"], out=out,
                    progress=False)
    rows = {(r["task"], r["solver"]): r for r in res.rows}
    for name in ("deepinv-ddrm", "deepinv-diffpir"):
        row = rows[("inpaint_box", name)]
        assert row["status"] == "ok", row["error"]
        assert set(ROW_FIELDS) <= set(row)
        assert row["nfe"] == 2 and row["grad_nfe"] == 0 and len(row["residual_trace"]) == 2
        assert math.isfinite(row["psnr"]) and (out / row["output"]).is_file()
        assert rows[("motion_blur", name)]["status"] == "unsupported"
    notes = json.loads((out / "results.json").read_text())["notes"]
    assert sum("stand-in" in n.lower() for n in notes) <= 1  # the torchvision line once, not per peer
    assert any(n.startswith("deepinv-ddrm:") for n in notes)
    assert any(n.startswith("deepinv-diffpir:") for n in notes)
