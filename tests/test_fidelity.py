"""Fidelity to the official code where the float64, 16-dimensional posterior tests cannot see it (issue 20):
float32, noiseless, image-sized problems on the embedded pixel model, singular-value thresholds, the x̂_0
clamp as each official code does it, and DPS's step size at fewer than 1000 steps.

The image is one held-out emoji (``examples/emoji/000-32.png``), fixed before any result was seen; the
classical baselines are the bench's (biharmonic, Wiener, bicubic) plus the grey image A†y for colorization.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.base import DiffusionPrior, Prediction, linear_alphas_cumprod
from models.loading import load_prior
from solvers import SOLVERS
from studio.core.conventions import to_image
from studio.core.io import load_image
from studio.core.masks import box_mask
from studio.core.metrics import psnr, ssim
from studio.core.operators import Inpainting, make_operator
from studio.core.operators.base import default_rcond
from studio.core.paths import examples_dir
from studio.eval.bench.baselines import WIENER_BALANCE, blur_kernel, deconvolve, to_chw, to_hwc

HELD_OUT = "emoji/000-32.png"


@pytest.fixture(scope="module")
def emoji_prior():
    return load_prior("emoji-pixel")


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    return load_image(str(examples_dir() / HELD_OUT)).to(torch.float32)


def _box_mask(size: int = 32) -> torch.Tensor:
    """The bench's box: half the side (the DPS setting), placed by seed 0."""
    return box_mask(size, size, size // 2, generator=torch.Generator().manual_seed(0))


SVD_OPERATORS = {
    "denoise": lambda: make_operator("denoise"),
    "inpaint_box": lambda: Inpainting(_box_mask()),
    "gaussian_blur": lambda: make_operator("gaussian_blur", kernel_size=61, sigma=3.0),
    "sr4_avgpool": lambda: make_operator("super_resolution", factor=4, mode="avgpool"),
    "sr4_bicubic": lambda: make_operator("super_resolution", factor=4, mode="bicubic"),
    "colorize": lambda: make_operator("colorize"),
}


def _baseline(name: str, op, y: torch.Tensor) -> torch.Tensor | None:
    """The classical estimate to beat (None for noiseless denoising, where y itself is the answer)."""
    from skimage import restoration, transform

    yn = to_hwc(y)
    if name == "inpaint_box":
        return to_chw(restoration.inpaint_biharmonic(yn, (op.mask[0] == 0).numpy(), channel_axis=-1))
    if name == "gaussian_blur":
        return to_chw(deconvolve(yn, blur_kernel(op), lambda c, p: restoration.wiener(c, p, WIENER_BALANCE)))
    if name.startswith("sr4"):
        return to_chw(transform.resize(yn, (32, 32, 3), order=3, mode="reflect", anti_aliasing=False))
    if name == "colorize":
        return op.A_dagger(y).clamp(0, 1)
    return None


# MCG at 100 steps (its scale follows the step count); the bench runs its 1000. CDIM and MCG take a
# backward pass per step, so their cases are slow checks (CI runs them); DDRM's run by default.
SOLVER_SETTINGS = {"ddrm": {}, "cdim": {}, "mcg": {"steps": 100}}
SOLVER_PARAMS = [pytest.param(name, marks=() if name == "ddrm" else pytest.mark.slow)
                 for name in SOLVER_SETTINGS]


@pytest.mark.parametrize("solver", SOLVER_PARAMS)
@pytest.mark.parametrize("op_name", list(SVD_OPERATORS))
def test_float32_noiseless_svd_operators(emoji_prior, clean, op_name, solver):
    """Finite, consistent with y as far as the method promises, and better than the classical baseline on
    PSNR or SSIM (the bench's bar).

    CDIM ends with the exact projection and MCG projects onto {A x = y} at ᾱ = 1: both promise
    Uᵀ(A x − y) = 0 on every component whose singular value float32 can divide by (``A_dagger``'s cut-off).
    DDRM, like its official code, sets the observed components to ȳ + σ_{t₀} z one step before the end
    and returns that step's x̂_0, so y is met to the last noise level: ‖s ⊙ z‖ σ_{t₀} / 2 in [0, 1] units,
    asserted with a factor 2 of room."""
    op = SVD_OPERATORS[op_name]()
    y = op.A(clean)
    result = SOLVERS[solver].fn(y, op, emoji_prior, noise_sigma=0.0, seed=0, **SOLVER_SETTINGS[solver])
    assert result.x.dtype == torch.float32 and torch.isfinite(result.x).all()

    svd = op.svd(tuple(clean.shape[1:]), dtype=torch.float32)
    usable = svd.usable(threshold=solver == "ddrm")  # the projections use every component float32 can
    spectral_residual = float(svd.Ut(op.A(to_image(result.x)) - y)[:, usable].norm())
    if solver == "ddrm":
        ab0 = emoji_prior.alphas_cumprod[0]
        bound = float(((1 - ab0) / ab0).sqrt() * svd.s[usable].norm())
    else:
        bound = 1e-4 * float(y.norm())
    assert spectral_residual <= bound, f"{solver} on {op_name}: y not met ({spectral_residual:.3g})"

    baseline = _baseline(op_name, op, y)
    if baseline is None:  # noiseless denoising: the answer is y
        assert float(psnr(result.image, clean)) > 45
        return
    ours = (float(psnr(result.image, clean)), float(ssim(result.image, clean)))
    theirs = (float(psnr(baseline, clean)), float(ssim(baseline, clean)))
    assert ours[0] > theirs[0] or ours[1] > theirs[1], f"{solver} on {op_name}: {ours} vs {theirs}"


def test_blur_threshold_is_ddrm_official_and_configurable():
    """1-D singular values below 3e-2 (× the largest) are unobserved, and so is every 2-D component built
    from one; 0 keeps every singular value that the dtype can divide by."""
    op = make_operator("gaussian_blur", kernel_size=61, sigma=3.0)
    assert op.params()["svd_threshold"] == 3e-2
    svd = op.svd((1, 32, 32), dtype=torch.float64)
    s1 = torch.linalg.svdvals(op.matrix_1d(32, -1))
    kept_1d = int((s1 > 3e-2 * s1.max()).sum())
    assert int(svd.observed.sum()) == kept_1d**2 < 32 * 32
    rebuilt = make_operator("gaussian_blur", **op.params())
    assert rebuilt.svd_threshold == 3e-2
    none = make_operator("gaussian_blur", svd_threshold=0.0).svd((1, 32, 32), dtype=torch.float64)
    assert int(none.observed.sum()) == 32 * 32  # every 2-D product is > 0 in float64 ...
    assert int(none.usable().sum()) < 32 * 32  # ... but not every one is safe to divide by


def test_pseudo_inverse_cutoff_follows_the_dtype():
    """float32: A† amplifies a perturbation of y by at most 1 / (eps · sqrt(N)), even with the operator's
    threshold off. Before, every s > 1e-6 · max was inverted: a perturbation along the left singular
    vector of the smallest such s came back ~1e6 times larger."""
    op = make_operator("gaussian_blur", kernel_size=61, sigma=3.0, svd_threshold=0.0)
    svd = op.svd((3, 32, 32), dtype=torch.float32)
    s = svd.s
    k = int(torch.where(s > 1e-6 * s.max(), s, torch.full_like(s, math.inf)).argmin())
    direction = torch.zeros(1, s.numel())
    direction[0, k] = 1.0
    delta = 1e-4 * svd.U(direction)
    gain = float(op.A_dagger(delta).norm() / delta.norm())
    assert gain <= 1.0 / default_rcond(torch.float32, s.numel())
    random = 1e-4 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert float(op.A_dagger(random).norm() / random.norm()) > 1.0  # the blur is ill-conditioned


def test_ddrm_on_an_8_bit_blurred_measurement_is_finite(emoji_prior, clean):
    """A noiseless deblur from a measurement saved as a PNG (8-bit round-off, no noise declared): DDRM
    divided the round-off by 2-D singular values down to ~1e-32 and ended in NaN at step 1."""
    op = make_operator("gaussian_blur", kernel_size=61, sigma=3.0)
    y = (op.A(clean) * 255).round() / 255
    result = SOLVERS["ddrm"].fn(y, op, emoji_prior, noise_sigma=0.0, seed=0)
    assert torch.isfinite(result.x).all()
    wiener = _baseline("gaussian_blur", op, y)
    assert float(psnr(result.image, clean)) > float(psnr(wiener, clean))


class _RecordingPrior(DiffusionPrior):
    """A bounded-data prior whose x̂_0 leaves [-1, 1]; records the ``clip`` flag of every call."""

    clip_denoised = True
    sample_shape = (3, 8, 8)

    def __init__(self):
        super().__init__(linear_alphas_cumprod())
        self.clips: list[bool] = []

    def predict(self, x_t, t, clip=True):
        self.clips.append(bool(clip))
        return super().predict(x_t, t, clip)

    def _predict(self, x_t, t):
        ab = self.alpha_bar(t, x_t)
        x0 = 3.0 * torch.tanh(x_t)  # reaches ±3: a clamp changes it
        return Prediction(eps=(x_t - ab.sqrt() * x0) / (1 - ab).sqrt(), x0=x0)


@pytest.mark.parametrize(("solver", "expected"), [("ddrm", {False}), ("cdim", {False}), ("dps", {True}),
                                                  ("mcg", {True})])
def test_x0_clamp_follows_each_official_code(solver, expected):
    """DDRM never clamps x̂_0 and CDIM clamps only inside its DDIM step (diffusers' ``clip_sample``, raw ε̂),
    never in the Tweedie estimate it differentiates; DPS and MCG clamp (guided-diffusion's clip_denoised)."""
    prior = _RecordingPrior()
    op = make_operator("super_resolution", factor=2, mode="avgpool")
    y = op.A(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    SOLVERS[solver].fn(y, op, prior, steps=5, seed=0)
    assert set(prior.clips) == expected


def test_cdim_ddim_step_clamps_like_diffusers():
    """With the clamp off, CDIM's DDIM step uses the unclamped x̂_0, so the result changes."""
    op = make_operator("super_resolution", factor=2, mode="avgpool")
    y = op.A(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    on = SOLVERS["cdim"].fn(y, op, _RecordingPrior(), steps=5, inner_steps=0, seed=0).x
    off = SOLVERS["cdim"].fn(y, op, _RecordingPrior(), steps=5, inner_steps=0, seed=0, clip_x0=False).x
    assert not torch.allclose(on, off)


@pytest.mark.parametrize("solver", ["dps", "mcg"])
def test_guidance_step_follows_the_step_count(solver):
    """``scale`` is the step at the official 1000 steps; N steps take scale · 1000 / N each (the same total
    guidance), unless ``scale_with_steps=False``."""
    prior = _RecordingPrior()
    op = make_operator("super_resolution", factor=2, mode="avgpool")
    y = op.A(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    run = SOLVERS[solver].fn
    assert math.isclose(run(y, op, prior, steps=10, scale=0.3, seed=0).record["params"]["step"], 30.0)
    fixed = run(y, op, prior, steps=10, scale=0.3, seed=0, scale_with_steps=False)
    assert math.isclose(fixed.record["params"]["step"], 0.3)


def test_dps_at_100_steps_beats_bicubic_on_sr(emoji_prior):
    """The user's first try (fewer steps than the official 1000, SR ×4 with the task's noise) on the first 4
    held-out emoji: at the official per-step scale it lost to bicubic (16.8 vs 19.0 dB mean; one image at
    7.7 dB), because 100 steps applied a tenth of the official run's guidance."""
    op = make_operator("super_resolution", factor=4, mode="bicubic")
    ours, bicubic = [], []
    for i in range(4):
        clean = load_image(str(examples_dir() / f"emoji/{i:03d}-32.png"))
        y = op.A(clean) + 0.025 * torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(i))
        ours.append(psnr(SOLVERS["dps"].fn(y, op, emoji_prior, steps=100, scale=0.3, seed=0).image, clean))
        bicubic.append(psnr(_baseline("sr4_bicubic", op, y), clean))
    assert sum(ours) / 4 > sum(bicubic) / 4 + 1.0


def test_solver_nan_message_names_no_step_size_for_ddrm():
    """A NaN in DDRM is not a step-size problem; the message must not send the user to one."""
    from solvers.common import StepLoop
    from studio.core.errors import SolverDivergedError

    loop = StepLoop("ddrm", 2, None, False, {"steps": 2, "eta": 0.85})
    with pytest.raises(SolverDivergedError) as info:
        loop.step(0, torch.tensor([float("nan")]), torch.zeros(1))
    assert "step size" not in str(info.value)
