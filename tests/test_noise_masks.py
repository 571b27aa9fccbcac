"""Noise models, measure(), and inpainting mask helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from studio.core.conventions import fill_mask_to_observed, observed_to_fill_mask
from studio.core.errors import StudioError
from studio.core.masks import (
    box_mask,
    fill_mask_from_image,
    observed_mask_from_image,
    random_pixel_mask,
    validate_fill_mask,
)
from studio.core.noise import GaussianNoise, PoissonNoise, make_noise, measure
from studio.core.operators import GaussianBlur, Inpainting


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors; avoids OpenMP stalls on a busy 2-core machine
    yield
    torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------
# noise
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_noise_statistics(dtype: torch.dtype) -> None:
    y = torch.full((1, 1, 250, 400), 0.5, dtype=dtype)  # 1e5 samples
    noisy = GaussianNoise(0.1)(y, _gen(0))
    assert noisy.dtype == dtype and noisy.shape == y.shape
    err = (noisy - y).double()
    assert abs(float(err.std()) - 0.1) < 0.003  # 3 %
    assert abs(float(err.mean())) < 0.002


def test_poisson_noise_statistics() -> None:
    rate, level = 50.0, 0.4
    y = torch.full((1, 1, 250, 400), level, dtype=torch.float64)
    noisy = PoissonNoise(rate)(y, _gen(1))
    assert noisy.dtype == torch.float64
    # counts ~ Poisson(rate*level): mean level, variance level / rate
    assert abs(float(noisy.mean()) - level) < 0.01 * level
    assert abs(float(noisy.var()) - level / rate) < 0.05 * level / rate
    # values are photon counts / rate; negative inputs count as 0 photons
    assert torch.allclose(noisy * rate, (noisy * rate).round())
    assert float(PoissonNoise(rate)(torch.full((1, 1, 4, 4), -0.2), _gen(2)).abs().sum()) == 0.0


@pytest.mark.parametrize("noise", [GaussianNoise(0.05), PoissonNoise(30.0)], ids=repr)
def test_noise_is_deterministic_given_generator(noise) -> None:
    y = torch.rand(2, 3, 8, 9, generator=_gen(3))
    a, b, c = noise(y, _gen(5)), noise(y, _gen(5)), noise(y, _gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_noise_on_cuda_with_cpu_generator() -> None:
    y = torch.rand(1, 3, 8, 8, device="cuda")
    for noise in (GaussianNoise(0.1), PoissonNoise(20.0)):
        out = noise(y, _gen(0))
        assert out.device.type == "cuda"
        assert torch.equal(out.cpu(), noise(y.cpu(), _gen(0)))


def test_make_noise_and_params_round_trip() -> None:
    for noise in (make_noise("gaussian", sigma=0.02), make_noise("poisson", rate=80), make_noise("none")):
        rebuilt = make_noise(noise.name, **noise.params())
        assert type(rebuilt) is type(noise) and rebuilt.params() == noise.params()
    none = make_noise("none")
    y = torch.rand(1, 1, 4, 4)
    assert none.sigma == 0 and torch.equal(none(y), y)
    assert GaussianNoise(0.1).sigma == 0.1 and PoissonNoise(50).sigma == pytest.approx((0.5 / 50) ** 0.5)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("gaussian", {"sigma": -0.1}, "-0.1"),
        ("gaussian", {"sigma": 25}, "25"),
        ("gaussian", {"sigma": "a"}, "'a'"),
        ("poisson", {"rate": 0}, "0"),
        ("poisson", {"rate": -3.0}, "-3.0"),
        ("gaussian", {"rate": 3.0}, "rate"),
        ("none", {"sigma": 0.1}, "none"),
        ("speckle", {}, "speckle"),
    ],
)
def test_bad_noise_params(name: str, params: dict, match: str) -> None:
    with pytest.raises(StudioError, match=match):
        make_noise(name, **params)


def test_measure_applies_operator_noise_and_observed() -> None:
    x = torch.rand(1, 3, 10, 12, generator=_gen(7), dtype=torch.float64)
    mask = box_mask(10, 12, 4, top_left=(3, 4))
    op = Inpainting(mask)
    y = measure(x, op, GaussianNoise(0.05), _gen(8))
    assert torch.equal(y[..., 3:7, 4:8], torch.zeros_like(y[..., 3:7, 4:8]))  # no noise where unobserved
    expected = mask * (op.A(x) + 0.05 * torch.randn(x.shape, generator=_gen(8), dtype=torch.float64))
    assert torch.allclose(y, expected)
    blur = GaussianBlur(5, 1.0)
    assert torch.equal(measure(x, blur, make_noise("none")), blur.A(x))


# ------------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------------


def test_box_mask_at_given_position() -> None:
    m = box_mask(10, 12, (3, 5), top_left=(2, 4))
    assert m.shape == (10, 12) and m.dtype == torch.float32
    assert m[2:5, 4:9].sum() == 0 and m.sum() == 120 - 15
    assert box_mask(6, 6, 2, top_left=(0, 0))[:2, :2].sum() == 0


def test_box_mask_random_position_respects_margin_and_seed() -> None:
    for seed in range(20):
        m = box_mask(16, 20, 4, generator=_gen(seed), margin=3)
        rows, cols = torch.nonzero(m == 0, as_tuple=True)
        assert len(rows) == 16
        assert rows.min() >= 3 and rows.max() <= 12 and cols.min() >= 3 and cols.max() <= 16
    assert torch.equal(box_mask(16, 20, 4, generator=_gen(1)), box_mask(16, 20, 4, generator=_gen(1)))
    positions = {
        tuple(torch.nonzero(box_mask(16, 20, 4, generator=_gen(s)) == 0)[0].tolist()) for s in range(10)
    }
    assert len(positions) > 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"box_size": 11}, "11x11"),
        ({"box_size": (4, 4), "margin": 4}, "margin 4"),
        ({"box_size": 4, "top_left": (7, 0)}, "row 7"),
        ({"box_size": 0}, "box_size"),
        ({"box_size": (2, 2, 2)}, "box_size"),
    ],
)
def test_box_mask_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(StudioError, match=match):
        box_mask(10, 10, **kwargs)


def test_random_pixel_mask() -> None:
    m = random_pixel_mask(40, 50, 0.3, _gen(0))
    assert m.shape == (40, 50) and set(m.unique().tolist()) == {0.0, 1.0}
    assert int(m.sum()) == 600
    assert torch.equal(m, random_pixel_mask(40, 50, 0.3, _gen(0)))
    assert not torch.equal(m, random_pixel_mask(40, 50, 0.3, _gen(1)))
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(StudioError, match=str(bad)):
            random_pixel_mask(8, 8, bad, _gen(0))


def _painted_rgba(w: int = 12, h: int = 8) -> Image.Image:
    arr = np.zeros((h, w, 4), dtype=np.uint8)
    arr[2:5, 3:7] = (255, 0, 0, 255)  # painted in red on a transparent layer
    return Image.fromarray(arr, mode="RGBA")


def test_fill_mask_from_rgba_uses_alpha() -> None:
    fill = fill_mask_from_image(_painted_rgba())
    assert fill.shape == (8, 12) and fill.dtype == torch.float32
    assert fill[2:5, 3:7].all() and fill.sum() == 12  # red has luminance < 0.5, alpha decides


def test_fill_mask_from_greyscale_and_rgb() -> None:
    grey = np.zeros((8, 12), dtype=np.uint8)
    grey[1:3, 2:6] = 255
    grey[5, 5] = 100  # dark grey (< 0.5): not painted
    expected = torch.zeros(8, 12)
    expected[1:3, 2:6] = 1
    assert torch.equal(fill_mask_from_image(grey), expected)
    assert torch.equal(fill_mask_from_image(Image.fromarray(grey)), expected)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    assert torch.equal(fill_mask_from_image(Image.fromarray(rgb)), expected)
    assert torch.equal(fill_mask_from_image(grey.astype(np.float32) / 255), expected)
    assert torch.equal(fill_mask_from_image(grey > 128), expected)
    # an RGBA image that never uses transparency is read by luminance, like a plain RGB one
    opaque = np.concatenate([rgb, np.full((8, 12, 1), 255, np.uint8)], axis=2)
    assert torch.equal(fill_mask_from_image(Image.fromarray(opaque, mode="RGBA")), expected)


def test_fill_mask_size_mismatch_is_an_error() -> None:
    assert fill_mask_from_image(_painted_rgba(), size=(12, 8)).shape == (8, 12)  # (width, height) like PIL
    with pytest.raises(StudioError, match="mask is 12x8 but the image is 16x8"):
        fill_mask_from_image(_painted_rgba(), size=(16, 8))
    with pytest.raises(StudioError, match="shape"):
        fill_mask_from_image(np.zeros((4, 4, 5)))
    with pytest.raises(StudioError, match="str"):
        fill_mask_from_image("mask.png")


def test_validate_fill_mask_rejects_empty_and_full() -> None:
    with pytest.raises(StudioError, match="mask is empty: paint the region to fill"):
        validate_fill_mask(torch.zeros(5, 5))
    with pytest.raises(StudioError, match="mask covers the whole image: nothing is observed"):
        validate_fill_mask(torch.ones(5, 5))
    partial = torch.zeros(5, 5)
    partial[1, 1] = 1
    assert validate_fill_mask(partial) is partial
    with pytest.raises(StudioError, match="empty"):
        observed_mask_from_image(np.zeros((4, 4), np.uint8))


def test_fill_and_observed_round_trip() -> None:
    fill = fill_mask_from_image(_painted_rgba())
    observed = observed_mask_from_image(_painted_rgba(), size=(12, 8))
    assert torch.equal(observed, fill_mask_to_observed(fill))
    assert torch.equal(observed_to_fill_mask(observed), fill)
    assert observed[2:5, 3:7].sum() == 0 and observed.sum() == 96 - 12
    # the observed mask drives the operator directly
    op = Inpainting(observed)
    assert op.num_measurements((3, 8, 12)) == 3 * (96 - 12)
