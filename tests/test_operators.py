"""Generic checks run over every linear operator, plus operator-specific ones (float64 for exactness)."""

from __future__ import annotations

import json
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from studio.core.errors import StudioError
from studio.core.masks import box_mask, random_pixel_mask
from studio.core.operators import (
    OPERATORS,
    Colorization,
    ComposedOperator,
    FunctionOperator,
    GaussianBlur,
    Identity,
    Inpainting,
    LinearOperator,
    MotionBlur,
    Operator,
    SuperResolution,
    adjointness_error,
    make_operator,
    motion_kernel,
    register_operator,
)
from studio.core.tasks import INPAINT_VARIANTS, build_operator

Shape = tuple[int, int, int]
SHAPES: list[Shape] = [(3, 17, 23), (3, 32, 32), (1, 9, 14)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: OpenMP threads only add overhead, and stall badly when another process holds a core
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# name -> factory(shape) building the operator for that input shape (masks depend on H, W)
CASES: dict[str, Callable[[Shape], LinearOperator]] = {
    "blur_reflect": lambda s: GaussianBlur(7, 1.0),
    "blur_circular": lambda s: GaussianBlur(7, 1.0, boundary="circular"),
    "blur_kernel_gt_image": lambda s: GaussianBlur(41, 1.2),
    "motion_blur": lambda s: MotionBlur(9, 0.5, seed=1),
    "sr2_avgpool": lambda s: SuperResolution(2, "avgpool"),
    "sr4_avgpool": lambda s: SuperResolution(4, "avgpool"),
    "sr8_avgpool": lambda s: SuperResolution(8, "avgpool"),
    "sr2_bicubic": lambda s: SuperResolution(2, "bicubic"),
    "sr4_bicubic": lambda s: SuperResolution(4, "bicubic"),
    "sr8_bicubic": lambda s: SuperResolution(8, "bicubic"),
    "inpaint_box": lambda s: Inpainting(box_mask(s[1], s[2], (s[1] // 3, s[2] // 3), generator=_gen(1))),
    "inpaint_random": lambda s: Inpainting(random_pixel_mask(s[1], s[2], 0.4, generator=_gen(2))),
    "inpaint_per_channel": lambda s: Inpainting((torch.rand(s, generator=_gen(3)) > 0.5).float()),
    "identity": lambda s: Identity(),
    "colorize": lambda s: Colorization(),
    "sr2_after_blur": lambda s: SuperResolution(2) @ GaussianBlur(5, 0.8),
    "inpaint_after_motion": lambda s: (
        Inpainting(box_mask(s[1], s[2], 4, top_left=(2, 3))) @ MotionBlur(5, 0.3, seed=2)
    ),
}
# operators whose pseudo-inverse is CGLS (no SVD): only approximately converged at the default iterations
CGLS_CASES = {"motion_blur", "sr2_after_blur", "inpaint_after_motion"}


def _params() -> list:
    out = []
    for name in CASES:
        for shape in SHAPES:
            if name == "colorize" and shape[0] != 3:
                continue  # colorization needs RGB
            out.append(pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}"))
    return out


@pytest.fixture
def x64() -> Callable[[Shape], torch.Tensor]:
    return lambda s: torch.rand(2, *s, generator=_gen(10), dtype=torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return float((a - b).norm()) <= rtol * float(b.norm()) + 1e-12


# ------------------------------------------------------------------------------------------------------
# generic set
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape", _params())
def test_adjointness(name: str, shape: Shape) -> None:
    op = CASES[name](shape)
    assert op.linear and isinstance(op, LinearOperator)
    assert adjointness_error(op, shape) < 1e-10


@pytest.mark.parametrize("name,shape", _params())
def test_pseudo_inverse_reproduces_measurement(name: str, shape: Shape, x64) -> None:
    """A A^† A x == A x, and project() lands on {A x = y}."""
    op = CASES[name](shape)
    x = x64(shape)
    y = op.A(x)
    rtol = 2e-3 if name in CGLS_CASES else 1e-6
    assert _close(op.A(op.A_dagger(y, shape)), y, rtol)
    z = torch.rand_like(x)
    assert _close(op.A(op.project(z, y)), y, rtol)


@pytest.mark.parametrize("name,shape", _params())
def test_shapes_and_measurement_count(name: str, shape: Shape, x64) -> None:
    op = CASES[name](shape)
    x = x64(shape)
    y = op.A(x)
    assert tuple(y.shape) == (2, *op.output_shape(shape))
    assert op.A_adjoint(y, shape).shape == x.shape
    assert op.A_adjoint(y).shape == x.shape  # input size recovered without x_shape
    assert op.A_dagger(y).shape == x.shape
    # measurements = entries of y that observed() keeps
    assert op.num_measurements(shape) == int((op.observed(torch.ones_like(y[:1])) != 0).sum())


@pytest.mark.parametrize("name,shape", _params())
def test_constant_preserved_on_observed_entries(name: str, shape: Shape) -> None:
    # A(1) == 1 where observed (rows sum to 1) means A(2x - 1) = 2 A(x) - 1: the [0,1] <-> [-1,1]
    # conversion commutes with A, so a solver in model space may use the same operator and measurement.
    op = CASES[name](shape)
    y = op.A(torch.ones(1, *shape, dtype=torch.float64))
    assert torch.allclose(y, op.observed(torch.ones_like(y)), atol=1e-12)


@pytest.mark.parametrize("name,shape", _params())
def test_svd_consistency(name: str, shape: Shape, x64) -> None:
    op = CASES[name](shape)
    dec = op.svd(shape, dtype=torch.float64)
    if dec is None:
        assert name in CGLS_CASES
        return
    x = x64(shape)
    y = torch.randn(op.A(x).shape, generator=_gen(4), dtype=torch.float64)
    n = x[0].numel()
    assert dec.s.shape == (n,)
    assert (dec.s >= 0).all()
    assert torch.allclose(dec.U(dec.s * dec.Vt(x)), op.A(x), atol=1e-10)
    assert torch.allclose(dec.V(dec.s * dec.Ut(y)), op.A_adjoint(y, shape), atol=1e-10)
    z = torch.randn(2, n, generator=_gen(5), dtype=torch.float64)
    assert torch.allclose(dec.Vt(dec.V(z)), z, atol=1e-10)  # V orthonormal
    assert torch.allclose(dec.V(dec.Vt(x)), x, atol=1e-10)
    # U^T U = I on the positions where s != 0
    zs = z * (dec.s != 0)
    assert torch.allclose(dec.Ut(dec.U(zs)), zs, atol=1e-10)
    assert int((dec.s > 1e-12).sum()) <= op.num_measurements(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
@pytest.mark.parametrize("name", list(CASES))
def test_dtype_and_device_preserved(name: str, dtype: torch.dtype, device: str) -> None:
    shape = (3, 17, 23)
    op = CASES[name](shape).to(device)
    x = torch.rand(2, *shape, generator=_gen(6), dtype=torch.float64)
    ref = op.A(x.to(device)).cpu()
    xd = x.to(device=device, dtype=dtype)
    y = op.A(xd)
    assert y.dtype == dtype and y.device.type == device
    assert op.A_adjoint(y, shape).dtype == dtype
    assert op.A_dagger(y, shape).dtype == dtype
    assert op.A_dagger(y, shape).device.type == device
    dec = op.svd(shape, device=device, dtype=dtype)
    if dec is not None:
        assert dec.s.dtype == dtype and dec.Vt(xd).dtype == dtype
    # cuDNN may run float32 convolutions in TF32 (10-bit mantissa): looser on CUDA
    tol = 1e-12 if dtype == torch.float64 else (2e-3 if device == "cuda" else 1e-5)
    assert torch.allclose(y.cpu().double(), ref, atol=tol)


@pytest.mark.parametrize("name", list(CASES))
def test_make_operator_round_trip(name: str) -> None:
    shape = (3, 17, 23)
    op = CASES[name](shape)
    params = op.params()
    json.dumps(params)  # JSON-serialisable
    rebuilt = make_operator(op.name, **params, **op.tensors())
    assert type(rebuilt) is type(op)
    x = torch.rand(1, *shape, dtype=torch.float64)
    assert torch.allclose(rebuilt.A(x), op.A(x), atol=1e-12)


def test_large_mask_goes_to_tensors() -> None:
    op = Inpainting(box_mask(80, 96, 20, top_left=(5, 5)))
    assert "mask" not in op.params() and op.tensors()["mask"].shape == (1, 80, 96)
    rebuilt = make_operator("inpaint", **op.params(), **op.tensors())
    assert torch.equal(rebuilt.mask, op.mask)


# ------------------------------------------------------------------------------------------------------
# operator-specific checks
# ------------------------------------------------------------------------------------------------------


def test_gaussian_blur_matches_torch_reflect_padding() -> None:
    x = torch.rand(2, 3, 17, 23, dtype=torch.float64)
    op = GaussianBlur(9, 1.7)
    k1 = op.taps
    k2 = torch.outer(k1, k1).expand(3, 1, 9, 9)
    ref = F.conv2d(F.pad(x, (4, 4, 4, 4), mode="reflect"), k2, groups=3)
    assert torch.allclose(op.A(x), ref, atol=1e-12)
    circ = GaussianBlur(9, 1.7, boundary="circular")
    ref = F.conv2d(F.pad(x, (4, 4, 4, 4), mode="circular"), k2, groups=3)
    assert torch.allclose(circ.A(x), ref, atol=1e-12)


def test_motion_blur_is_true_convolution_with_reflect_boundary() -> None:
    x = torch.rand(1, 2, 16, 19, dtype=torch.float64)
    k = torch.rand(5, 5, dtype=torch.float64)
    op = MotionBlur(kernel=k)
    k = k / k.sum()
    ref = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), torch.flip(k, (0, 1)).expand(2, 1, 5, 5), groups=2)
    assert torch.allclose(op.A(x), ref, atol=1e-12)
    # a one-hot off-centre kernel shifts the image the way a convolution does: y[i, j] = x[i - 1, j]
    delta = torch.zeros(3, 3, dtype=torch.float64)
    delta[2, 1] = 1.0
    assert torch.allclose(MotionBlur(kernel=delta).A(x)[..., 1:, :], x[..., :-1, :])


def test_motion_blur_kernel_larger_than_image() -> None:
    op = MotionBlur(15, 0.8, seed=3)
    assert adjointness_error(op, (1, 4, 6)) < 1e-10
    y = op.A(torch.ones(1, 1, 4, 6, dtype=torch.float64))
    assert torch.allclose(y, torch.ones_like(y))


def test_super_resolution_matches_torch() -> None:
    x = torch.rand(2, 3, 32, 24, dtype=torch.float64)
    for f in (2, 4, 8):
        bic = SuperResolution(f, "bicubic").A(x)
        ref = F.interpolate(x, size=(32 // f, 24 // f), mode="bicubic", antialias=True, align_corners=False)
        assert torch.allclose(bic, ref, atol=1e-12)
        assert torch.allclose(SuperResolution(f, "avgpool").A(x), F.avg_pool2d(x, f), atol=1e-12)
    # partial last block: averaged over the pixels it has (17 = 2*8 + 1)
    odd = torch.rand(1, 1, 17, 8, dtype=torch.float64)
    y = SuperResolution(2).A(odd)
    assert y.shape == (1, 1, 9, 4)
    assert torch.allclose(y[0, 0, 8], odd[0, 0, 16].reshape(4, 2).mean(dim=1))


def test_super_resolution_input_size_recovery() -> None:
    op = SuperResolution(4)
    y = torch.rand(1, 3, 5, 6, dtype=torch.float64)
    assert op.A_adjoint(y).shape == (1, 3, 20, 24)  # default: m * factor
    op.A(torch.rand(1, 3, 17, 23, dtype=torch.float64))  # 17x23 -> 5x6 is remembered
    assert op.A_adjoint(y).shape == (1, 3, 17, 23)
    assert op.A_adjoint(y, (3, 20, 24)).shape == (1, 3, 20, 24)  # explicit wins
    with pytest.raises(StudioError, match="5x6"):
        op.A_adjoint(y, (3, 40, 40))


@pytest.mark.parametrize(
    "op", [SuperResolution(2), GaussianBlur(5, 0.7), SuperResolution(4, "bicubic")], ids=str
)
def test_cgls_gives_min_norm_least_squares(op: LinearOperator) -> None:
    """CGLS from 0 and the SVD pseudo-inverse agree, also for y outside the range of A."""
    shape = (1, 9, 14)
    y = torch.randn(2, *op.output_shape(shape), generator=_gen(7), dtype=torch.float64)
    via_svd = op.A_dagger(y, shape)
    via_cgls = op.cgls(y, shape, iters=500, tol=1e-12)
    assert torch.allclose(via_cgls, via_svd, atol=1e-7)


def test_specialised_pseudo_inverses_match_generic_svd() -> None:
    shape = (3, 9, 14)
    y = torch.rand(2, *shape, dtype=torch.float64)
    for op in (Identity(), Inpainting(random_pixel_mask(9, 14, 0.3, _gen(8)))):
        assert torch.allclose(op.A_dagger(y), LinearOperator.A_dagger(op, y), atol=1e-12)
    col = Colorization()
    yc = col.A(y)
    assert torch.allclose(col.A_dagger(yc), LinearOperator.A_dagger(col, yc), atol=1e-12)
    assert torch.allclose(col.A_adjoint(yc), LinearOperator.A_adjoint(col, yc), atol=1e-12)


def test_inpainting_observed_and_errors() -> None:
    mask = box_mask(8, 10, 3, top_left=(1, 2))
    op = Inpainting(mask)
    y = torch.rand(1, 3, 8, 10)
    assert torch.equal(op.observed(y), mask * y)
    assert op.num_measurements((3, 8, 10)) == 3 * (80 - 9)
    with pytest.raises(StudioError, match=r"8x10.*3x9x10"):
        op.A(torch.rand(1, 3, 9, 10))
    with pytest.raises(StudioError, match="0.5"):
        Inpainting(torch.full((4, 4), 0.5))
    with pytest.raises(StudioError, match="shape"):
        Inpainting(torch.ones(4))
    # nothing observed / everything observed is fine at operator level
    assert Inpainting(torch.zeros(4, 4)).A(torch.ones(1, 1, 4, 4)).sum() == 0
    assert Inpainting(torch.ones(4, 4)).num_measurements((1, 4, 4)) == 16


def test_colorization_needs_rgb() -> None:
    with pytest.raises(StudioError, match="1 channel"):
        Colorization().A(torch.rand(1, 1, 4, 4))
    grey = torch.full((1, 3, 4, 5), 0.3, dtype=torch.float64)
    assert torch.allclose(Colorization().A(grey), torch.full((1, 1, 4, 5), 0.3, dtype=torch.float64))


def test_composition_semantics() -> None:
    sr, blur = SuperResolution(2), GaussianBlur(5, 1.0)
    comp = sr @ blur
    assert isinstance(comp, ComposedOperator) and isinstance(comp, LinearOperator) and comp.linear
    x = torch.rand(1, 3, 10, 12, dtype=torch.float64)
    assert torch.allclose(comp.A(x), sr.A(blur.A(x)))
    assert comp(x).shape == (1, 3, 5, 6)
    assert comp.svd((3, 10, 12)) is None


def test_function_operator_is_nonlinear_and_differentiable() -> None:
    op = FunctionOperator(lambda x: x.clamp(0, 1) ** 2, name="square")
    assert op.linear is False and not isinstance(op, LinearOperator) and isinstance(op, Operator)
    x = torch.rand(1, 3, 5, 7, requires_grad=True)
    (g,) = torch.autograd.grad(op.A(x).sum(), x)
    assert torch.allclose(g, 2 * x.detach())
    assert op.num_measurements((3, 5, 7)) == 105
    comp = SuperResolution(2) @ op
    assert comp.linear is False and not isinstance(comp, LinearOperator)
    assert comp.A(x).shape == (1, 3, 3, 4)
    with pytest.raises(StudioError):
        FunctionOperator(None)


def test_motion_kernel_properties() -> None:
    k1 = motion_kernel(21, 0.5, _gen(0))
    k2 = motion_kernel(21, 0.5, _gen(0))
    k3 = motion_kernel(21, 0.5, _gen(1))
    assert k1.shape == (21, 21)
    assert torch.equal(k1, k2)
    assert not torch.allclose(k1, k3)
    assert (k1 >= 0).all() and abs(float(k1.sum()) - 1) < 1e-6
    # centroid at the centre: blurring does not shift the image
    idx = torch.arange(21, dtype=torch.float32)
    assert abs(float((k1.sum(1) * idx).sum()) - 10) < 1e-3 and abs(float((k1.sum(0) * idx).sum()) - 10) < 1e-3
    # more intensity -> a path that reaches further from the centre
    r = ((idx - 10)[:, None] ** 2 + (idx - 10)[None, :] ** 2).sqrt()
    assert (motion_kernel(21, 1.0, _gen(0)) * r).sum() > (motion_kernel(21, 0.0, _gen(0)) * r).sum()
    assert MotionBlur(9, 0.5, seed=4).kernel.shape == (9, 9)
    assert torch.equal(MotionBlur(9, 0.5, seed=4).kernel, MotionBlur(9, 0.5, seed=4).kernel)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("nope", {}, "unknown operator 'nope'"),
        ("gaussian_blur", {"sigma": -1.0}, "-1.0"),
        ("gaussian_blur", {"sigma": 0}, "sigma"),
        ("gaussian_blur", {"kernel_size": 4}, "4"),
        ("gaussian_blur", {"boundary": "zeros"}, "zeros"),
        ("gaussian_blur", {"sigma": float("nan")}, "nan"),
        ("super_resolution", {"factor": 3}, "3"),
        ("super_resolution", {"mode": "nearest"}, "nearest"),
        ("motion_blur", {"intensity": 1.5}, "1.5"),
        ("motion_blur", {"kernel_size": 0}, "0"),
        ("motion_blur", {"kernel": [[1.0, 1.0]]}, r"\(1, 2\)"),
        ("inpaint", {"mask": [[0.0, 2.0]]}, "2"),
        ("gaussian_blur", {"sigmaa": 1.0}, "sigmaa"),
        ("custom", {}, "callable"),
    ],
)
def test_bad_params_raise_studio_error(name: str, params: dict, match: str) -> None:
    with pytest.raises(StudioError, match=match):
        make_operator(name, **params)


def test_bicubic_needs_enough_pixels() -> None:
    with pytest.raises(StudioError, match="8"):
        SuperResolution(8, "bicubic").A(torch.rand(1, 1, 7, 16))


def test_registry_names_match_classes() -> None:
    for name, cls in OPERATORS.items():
        if name not in ("composed", "custom"):
            assert cls.name == name


def test_registry_refuses_a_second_class_under_a_taken_name() -> None:
    class OtherBlur(GaussianBlur):
        pass

    with pytest.raises(ValueError, match="gaussian_blur"):
        register_operator("gaussian_blur")(OtherBlur)
    assert OPERATORS["gaussian_blur"] is GaussianBlur
    assert register_operator("gaussian_blur")(GaussianBlur) is GaussianBlur  # the same class again: fine


def test_task_inpainting_variants_build_inpainting_from_the_one_registry() -> None:
    # the variants only build masks on top of the registry's 'inpaint'; they are not operators of their own
    assert not set(INPAINT_VARIANTS) & set(OPERATORS)
    for name in INPAINT_VARIANTS:
        with pytest.raises(StudioError, match=f"unknown operator '{name}'"):
            make_operator(name)
    fill = torch.zeros(8, 10)
    fill[2:4, 3:6] = 1
    op = build_operator({"name": "inpaint_mask"}, (8, 10), 0, fill)
    assert type(op) is OPERATORS["inpaint"] and torch.equal(op.mask[0], 1 - fill)
    assert type(build_operator({"name": "gaussian_blur", "kernel_size": 3}, (8, 10), 0)) is GaussianBlur
