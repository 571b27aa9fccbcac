"""Tests for studio.core.io, studio.core.metrics and studio.core.config (small, CPU-only)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from studio.core.config import (
    apply_overrides,
    config_dir,
    list_solvers,
    list_tasks,
    load_solver,
    load_task,
    require,
    to_plain,
)
from studio.core.errors import StudioError
from studio.core.io import (
    image_to_numpy,
    load_image,
    numpy_to_tensor,
    open_image,
    save_image,
    write_json_atomic,
)
from studio.core.metrics import image_metrics, psnr, ssim
from omegaconf import OmegaConf


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------ io


def test_roundtrip_8bit_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    t = numpy_to_tensor(u8)
    assert t.shape == (1, 3, 5, 7) and t.dtype == torch.float32
    out = save_image(t, tmp_path / "a.png")
    back = load_image(out)
    assert back.shape == (1, 3, 5, 7)
    assert torch.equal(back, t)
    with Image.open(out) as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im), u8)
    # (C,H,W) accepted too, and values are clamped
    save_image((t[0] * 2 - 0.5), tmp_path / "b.png")
    assert load_image(tmp_path / "b.png").min() >= 0 and load_image(tmp_path / "b.png").max() <= 1


def test_greyscale_8_and_16_bit(tmp_path: Path) -> None:
    g = np.array([[0, 128, 255]], dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    t = load_image(tmp_path / "g.png")
    assert t.shape == (1, 3, 1, 3)
    assert torch.equal(t[0, 0], t[0, 1]) and torch.equal(t[0, 0], t[0, 2])
    assert torch.allclose(t[0, 0, 0], torch.tensor([0, 128 / 255, 1.0]))

    g16 = np.array([[0, 1, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    t16 = load_image(tmp_path / "g16.png")
    assert t16.shape == (1, 3, 1, 4)
    assert torch.allclose(t16[0, 1, 0], torch.tensor([0, 1 / 65535, 32768 / 65535, 1.0]))
    assert t16[0, 0, 0, 1] > 0  # 16-bit precision kept
    m = load_image(tmp_path / "g16.png", mode="L")
    assert m.shape == (1, 1, 1, 4)
    assert torch.allclose(m[0, 0], t16[0, 0], atol=1e-6)


def test_float_mode_and_1bit(tmp_path: Path) -> None:
    f = np.array([[0.0, 0.25, 2.0]], dtype=np.float32)
    Image.fromarray(f, mode="F").save(tmp_path / "f.tiff")
    t = load_image(tmp_path / "f.tiff")
    assert torch.allclose(t[0, 2, 0], torch.tensor([0.0, 0.25, 1.0]))
    Image.new("1", (3, 2), 1).save(tmp_path / "b.png")
    assert torch.all(load_image(tmp_path / "b.png") == 1.0)


def test_rgba_la_composited_on_white(tmp_path: Path) -> None:
    a = np.zeros((1, 3, 4), dtype=np.uint8)
    a[0, 0] = [255, 0, 0, 255]  # opaque red
    a[0, 1] = [255, 0, 0, 0]  # transparent → white
    a[0, 2] = [0, 0, 0, 128]  # half black → ~grey
    Image.fromarray(a, mode="RGBA").save(tmp_path / "rgba.png")
    t = load_image(tmp_path / "rgba.png")
    assert t.shape == (1, 3, 1, 3)
    assert torch.allclose(t[0, :, 0, 0], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(t[0, :, 0, 1], torch.ones(3))
    assert torch.allclose(t[0, :, 0, 2], torch.full((3,), 1 - 128 / 255))
    la = np.array([[[0, 0], [0, 255]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    t = load_image(tmp_path / "la.png")
    assert torch.allclose(t[0, :, 0, 0], torch.ones(3)) and torch.allclose(t[0, :, 0, 1], torch.zeros(3))
    # open_image keeps alpha for callers that need it
    assert open_image(tmp_path / "rgba.png").mode == "RGBA"


def test_palette_images(tmp_path: Path) -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    t = load_image(tmp_path / "p.png")
    assert torch.allclose(t[0, :, 0, 0], torch.tensor([0.0, 0, 1])) and torch.allclose(
        t[0, :, 0, 1], torch.tensor([0.0, 1, 0])
    )
    p.save(tmp_path / "pt.png", transparency=0)  # index 0 transparent → white
    t = load_image(tmp_path / "pt.png")
    assert torch.allclose(t[0, :, 0, 0], torch.ones(3))
    assert torch.allclose(t[0, :, 0, 1], torch.tensor([0.0, 1, 0]))


def test_cmyk_to_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (2, 2), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    t = load_image(tmp_path / "c.jpg")
    assert t.shape == (1, 3, 2, 2) and t.min() > 0.9


def test_exif_orientation_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (4, 2), (0, 0, 255))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").shape == (1, 3, 4, 2)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(StudioError, match="no such file") as e:
        load_image(tmp_path / "missing.png")
    assert "missing.png" in _one_line(e)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(StudioError, match="empty file") as e:
        load_image(tmp_path / "empty.png")
    assert "empty.png" in _one_line(e)
    (tmp_path / "text.png").write_text("hello, not a png\n")
    with pytest.raises(StudioError, match=r"cannot read image '.*text\.png': not an image file \(") as e:
        load_image(tmp_path / "text.png")
    _one_line(e)
    with pytest.raises(StudioError, match="is a directory"):
        load_image(tmp_path)
    # truncated PNG
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(StudioError, match="trunc.png"):
        load_image(tmp_path / "trunc.png")
    with pytest.raises(StudioError, match="mode"):
        load_image(tmp_path / "full.png", mode="RGBA")  # type: ignore[arg-type]


def test_too_large_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (20, 10)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", max_pixels=200).shape == (1, 3, 10, 20)

    def no_decode(self: Image.Image) -> None:  # pragma: no cover - must not be called
        raise AssertionError("decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(StudioError, match=r"too large: 20x10 = 200 pixels \(limit 199\)") as e:
        load_image(tmp_path / "big.png", max_pixels=199)
    assert "big.png" in _one_line(e)


def test_decompression_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("L", (40, 40)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 * 100 → PIL raises at open
    with pytest.raises(StudioError, match="too large"):
        load_image(tmp_path / "bomb.png", max_pixels=10**9)


def test_save_rejects_nan_and_bad_shapes(tmp_path: Path) -> None:
    t = torch.rand(1, 3, 4, 4)
    t[0, 1, 2, 3] = float("nan")
    with pytest.raises(StudioError, match="NaN") as e:
        save_image(t, tmp_path / "nan.png")
    assert "nan.png" in _one_line(e)
    assert not (tmp_path / "nan.png").exists()
    with pytest.raises(StudioError, match="channels"):
        save_image(torch.rand(2, 4, 4), tmp_path / "c2.png")
    with pytest.raises(StudioError, match="batch"):
        save_image(torch.rand(2, 3, 4, 4), tmp_path / "b2.png")
    with pytest.raises(StudioError, match=r"\.png"):
        save_image(torch.rand(3, 4, 4), tmp_path / "x.jpg")
    assert os.listdir(tmp_path) == []


def test_atomic_writes_leave_no_temp_files(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "img.png"
    save_image(torch.rand(1, 1, 3, 3), out)
    save_image(torch.rand(1, 4, 3, 3), out)  # overwrite
    with Image.open(out) as im:
        assert im.mode == "RGBA"
    obj = {
        "z": torch.tensor(1.5),
        "a": np.float32(0.25),
        "n": np.int64(3),
        "t": torch.arange(3),
        "arr": np.eye(2),
        "psnr": math.inf,
        "path": tmp_path,
        "flag": np.bool_(True),
    }
    j = write_json_atomic(obj, tmp_path / "sub" / "m.json")
    text = j.read_text()
    assert text.startswith('{\n  "z": 1.5,')  # indent 2, key order kept
    back = json.loads(text)
    assert list(back) == list(obj)
    assert back["a"] == 0.25 and back["n"] == 3 and back["t"] == [0, 1, 2] and back["arr"] == [[1, 0], [0, 1]]
    assert back["psnr"] == math.inf and back["path"] == str(tmp_path) and back["flag"] is True
    assert sorted(os.listdir(tmp_path / "sub")) == ["img.png", "m.json"]
    with pytest.raises(TypeError):
        write_json_atomic({"x": object()}, tmp_path / "sub" / "bad.json")
    assert sorted(os.listdir(tmp_path / "sub")) == ["img.png", "m.json"]


def test_numpy_conversion() -> None:
    t = torch.rand(1, 3, 2, 5)
    a = image_to_numpy(t)
    assert a.shape == (2, 5, 3)
    assert torch.equal(numpy_to_tensor(a), t)
    assert image_to_numpy(t[0]).shape == (2, 5, 3)
    assert numpy_to_tensor(np.zeros((2, 3))).shape == (1, 1, 2, 3)
    assert numpy_to_tensor(np.full((1, 1), 65535, np.uint16)).item() == 1.0


# ------------------------------------------------------------------------------------------- metrics


def test_identical_images() -> None:
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert psnr(x, x) == math.inf
    assert ssim(x, x) == pytest.approx(1.0)
    m = image_metrics(x, x.clone())
    assert m == {"psnr": math.inf, "ssim": pytest.approx(1.0)}


def test_psnr_constant_offset_matches_hand_computation() -> None:
    x = torch.full((3, 8, 8), 0.5, dtype=torch.float64)
    y = x + 0.1
    mse = float(((y - x) ** 2).mean())
    expected = 10 * math.log10(1.0 / mse)  # MSE = 0.01 → 20 dB
    assert expected == pytest.approx(20.0, abs=1e-9)
    assert psnr(y, x) == pytest.approx(expected, abs=1e-9)
    assert psnr(y[None], x) == pytest.approx(expected, abs=1e-9)  # (1,C,H,W) vs (C,H,W)
    assert psnr(y.float(), x.float()) == pytest.approx(20.0, abs=1e-4)
    # inputs are clamped to [0, 1] first: 1.5 counts as 1.0
    hi = torch.full((1, 8, 8), 1.5, dtype=torch.float64)
    assert psnr(hi, torch.full((1, 8, 8), 0.75, dtype=torch.float64)) == pytest.approx(
        10 * math.log10(1 / 0.25**2), abs=1e-9
    )


def test_ssim_small_and_degraded() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 32, generator=g)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = ssim(noisy, x)
    assert 0.0 < s < 0.95
    tiny = torch.rand(3, 4, 6, generator=g)
    assert ssim(tiny, tiny) == pytest.approx(1.0)
    assert -1.0 <= ssim(tiny.flip(-1), tiny) <= 1.0
    with pytest.raises(StudioError, match="too small"):
        ssim(torch.rand(3, 2, 8), torch.rand(3, 2, 8))


def test_metric_shape_mismatch_and_nan() -> None:
    with pytest.raises(StudioError) as e:
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    msg = _one_line(e)
    assert "(1, 3, 8, 8)" in msg and "(1, 3, 8, 9)" in msg
    with pytest.raises(StudioError, match=r"\(3, 8, 8\).*\(1, 8, 8\)"):
        ssim(torch.rand(3, 8, 8), torch.rand(1, 8, 8))
    bad = torch.rand(3, 8, 8)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(StudioError, match="NaN"):
        psnr(bad, torch.rand(3, 8, 8))


# -------------------------------------------------------------------------------------------- config

# solver configs for names no solver module registers: their ``params`` are the schema (a config folder's
# fallback); the signature schema of registered solvers is tested below with a toy function
DPS = """\
solver: toydps
params:
  steps: 1000
  scale: 0.5
  sampler: ddpm
  clip: true
tasks:
  gaussian_blur:
    scale: 0.3
  inpainting:
    steps: 500
"""

BLUR = """\
task: gaussian_blur
operator:
  name: gaussian_blur
  kernel_size: 61
  sigma: 3.0
noise:
  name: gaussian
  sigma: 0.05
"""


@pytest.fixture
def cfgdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "task").mkdir()
    (tmp_path / "solver").mkdir()
    (tmp_path / "task" / "gaussian_blur.yaml").write_text(BLUR)
    (tmp_path / "task" / "inpainting.yaml").write_text("task: inpainting\noperator:\n  name: inpainting\n")
    (tmp_path / "solver" / "toydps.yaml").write_text(DPS)
    (tmp_path / "solver" / "toyddrm.yaml").write_text("solver: toyddrm\nparams:\n  steps: 20\n  eta: 0.85\n")
    monkeypatch.setenv("STUDIO_CONFIG_DIR", str(tmp_path))
    return tmp_path


def test_config_dir_default_and_env(cfgdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_dir() == cfgdir
    monkeypatch.delenv("STUDIO_CONFIG_DIR")
    assert config_dir() == Path(__file__).resolve().parent.parent / "configs"


def test_list_names(cfgdir: Path) -> None:
    assert list_tasks() == ["gaussian_blur", "inpainting"]
    assert list_solvers() == ["toyddrm", "toydps"]


def test_load_task_and_overrides(cfgdir: Path) -> None:
    t = load_task("gaussian_blur")
    assert t.operator.kernel_size == 61 and t.noise.sigma == 0.05
    t = load_task("gaussian_blur", ["operator.sigma=2", "noise.sigma=0.01", "operator.name=box"])
    assert t.operator.sigma == 2.0 and isinstance(t.operator.sigma, float)
    assert t.noise.sigma == 0.01 and t.operator.name == "box"
    assert to_plain(t)["operator"] == {"name": "box", "kernel_size": 61, "sigma": 2.0}
    with pytest.raises(StudioError, match=r"unknown task 'nope' \(valid: gaussian_blur, inpainting\)"):
        load_task("nope")


def test_load_solver_merging(cfgdir: Path) -> None:
    assert to_plain(load_solver("toydps")) == {"steps": 1000, "scale": 0.5, "sampler": "ddpm", "clip": True}
    assert load_solver("toydps", task="gaussian_blur").scale == 0.3
    assert load_solver("toydps", task="inpainting").steps == 500
    assert load_solver("toydps", task="super_resolution").scale == 0.5  # no per-task section
    p = load_solver("toydps", task="gaussian_blur", overrides=["scale=0.1", "steps=50", "clip=false"])
    assert (p.scale, p.steps, p.clip) == (0.1, 50, False)
    assert load_solver("toyddrm", task="gaussian_blur", overrides=["eta=1"]).eta == 1.0
    with pytest.raises(StudioError, match=r"unknown solver 'dsp' \(valid: toyddrm, toydps\)"):
        load_solver("dsp")


def test_override_errors(cfgdir: Path) -> None:
    with pytest.raises(StudioError) as e:
        load_solver("toydps", overrides=["scal=0.3"])
    assert _one_line(e) == "unknown config key 'scal' for solver toydps (valid: steps, scale, sampler, clip)"
    with pytest.raises(StudioError, match=r"'abc'.*'steps'.*solver toydps.*integer"):
        load_solver("toydps", overrides=["steps=abc"])
    with pytest.raises(StudioError, match="integer"):
        load_solver("toydps", overrides=["steps=1.5"])
    with pytest.raises(StudioError, match=r"'yes'.*'clip'.*true or false"):
        load_solver("toydps", overrides=["clip=yes"])
    with pytest.raises(StudioError, match=r"'high'.*'scale'.*number"):
        load_solver("toydps", overrides=["scale=high"])
    with pytest.raises(StudioError, match="number"):
        load_solver("toydps", overrides=["scale=true"])
    with pytest.raises(StudioError, match=r"malformed override 'scale' for solver toydps"):
        load_solver("toydps", overrides=["scale"])
    with pytest.raises(StudioError, match="empty key"):
        load_solver("toydps", overrides=["=3"])
    with pytest.raises(StudioError,
                       match=r"unknown config key 'operator.sgima' for task gaussian_blur.*operator\.sigma"):
        load_task("gaussian_blur", ["operator.sgima=1.0"])
    with pytest.raises(StudioError, match="group"):
        load_task("gaussian_blur", ["operator=3"])
    with pytest.raises(StudioError, match="unknown config key 'noise.sigma.x'"):
        load_task("gaussian_blur", ["noise.sigma.x=1"])


def test_bad_config_files(cfgdir: Path) -> None:
    (cfgdir / "solver" / "typo.yaml").write_text(
        "params:\n  steps: 10\ntasks:\n  gaussian_blur:\n    stesp: 5\n")
    with pytest.raises(StudioError,
                       match=r"unknown config key 'stesp' for solver typo \(tasks.gaussian_blur in"):
        load_solver("typo", task="gaussian_blur")
    assert load_solver("typo").steps == 10
    (cfgdir / "solver" / "wrongtype.yaml").write_text("params:\n  steps: 10\ntasks:\n  t:\n    steps: fast\n")
    with pytest.raises(StudioError, match=r"'fast'.*'steps'.*tasks.t"):
        load_solver("wrongtype", task="t")
    (cfgdir / "task" / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(StudioError, match=r"cannot read config '.*broken.yaml'") as e:
        load_task("broken")
    _one_line(e)
    (cfgdir / "task" / "listy.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(StudioError, match="mapping"):
        load_task("listy")


def test_apply_overrides_does_not_mutate_and_require() -> None:
    cfg = OmegaConf.create({"a": 1, "b": {"c": [1, 2], "d": None, "e": "x"}})
    out = apply_overrides(cfg, ["a=2", "b.c=[3, 4, 5]", "b.d=0.5", "b.e=123"], "test")
    assert cfg.a == 1 and list(cfg.b.c) == [1, 2]
    assert to_plain(out) == {"a": 2, "b": {"c": [3, 4, 5], "d": 0.5, "e": "123"}}
    with pytest.raises(StudioError, match="list"):
        apply_overrides(cfg, ["b.c=7"], "test")
    require(True, "fine")
    with pytest.raises(StudioError, match="^steps must be > 0$"):
        require(False, "steps must be > 0")


def test_interpolations_in_a_value_are_refused_not_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt or token typed into the app goes through the overrides: '${oc.env:...}' there would put
    the server's environment into the run and its record."""
    monkeypatch.setenv("STUDIO_SECRET_FOR_TEST", "hunter2")
    from studio.core.config import merge_overrides

    cfg = OmegaConf.create({"prompt": "", "b": {"c": 1}})
    for value in ["${oc.env:STUDIO_SECRET_FOR_TEST}", "a <${b.c}> token"]:
        with pytest.raises(StudioError, match=r"interpolation\) is not allowed"):
            apply_overrides(cfg, [f"prompt={value}"], "test")
        with pytest.raises(StudioError, match=r"interpolation\) is not allowed"):
            merge_overrides(cfg, overrides={"prompt": value})  # typed values, as the app passes them
    assert merge_overrides(cfg, overrides={"prompt": "costs $5 {each}"})["prompt"] == "costs $5 {each}"
    assert apply_overrides(cfg, ["prompt=costs $5 {each}"], "test").prompt == "costs $5 {each}"


def _toy_solver(y, operator, prior, *, noise_sigma: float = 0.0, steps: int = 50, scale: float = 1,
                prompt: str = "", tune: bool = True, seed: int | None = 0, progress: bool = False):
    """Stands in for a registered solver: its signature is the config schema."""


def test_signature_schema_and_task_defaults(cfgdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from studio.core import config

    monkeypatch.setitem(config._SOLVER_FUNCTIONS, "toy", _toy_solver)
    (cfgdir / "solver" / "toy.yaml").write_text("# toy\ntasks:\n  gaussian_blur: {scale: 0.3, tune: false}\n")
    assert to_plain(load_solver("toy")) == {"steps": 50, "scale": 1.0, "prompt": "", "tune": True}
    assert isinstance(load_solver("toy").scale, float)  # the annotation's type, not the default's
    assert to_plain(load_solver("toy", "gaussian_blur", ["prompt=true", "steps=7"])) == {
        "steps": 7, "scale": 0.3, "prompt": "true", "tune": False}  # text stays text
    assert load_solver("toy", overrides=["prompt='a: b # c'"]).prompt == "a: b # c"
    with pytest.raises(StudioError) as e:
        load_solver("toy", overrides=["seed=3"])  # run-time arguments are not parameters
    assert _one_line(e) == "unknown config key 'seed' for solver toy (valid: steps, scale, prompt, tune)"
    with pytest.raises(StudioError, match="finite"):
        load_solver("toy", overrides=["scale=nan"])
    (cfgdir / "solver" / "toy.yaml").write_text("tasks:\n  t: {prompt: 3}\n")
    with pytest.raises(StudioError, match=r"'3'.*'prompt'.*tasks.t.*text"):
        load_solver("toy", "t")


def test_merge_overrides_for_dataclasses_and_functions() -> None:
    from dataclasses import dataclass, field

    from studio.core.config import merge_overrides

    @dataclass
    class Options:
        steps: int = 3
        lr: float = 1e-3
        templates: tuple = field(default_factory=tuple)

    out = merge_overrides(Options, {"steps": 5}, ["lr=0.5", "templates=[a, b]"], "options")
    assert out == {"steps": 5, "lr": 0.5, "templates": ("a", "b")}
    assert merge_overrides(Options(steps=9), None, {"lr": 2}, "options") == {"steps": 9, "lr": 2.0,
                                                                             "templates": ()}
    with pytest.raises(StudioError, match="^unknown option 'x' among steps, lr, templates$"):
        merge_overrides(Options, None, ["x=1"], "options",
                        unknown=lambda k, valid: f"unknown option {k!r} among " + ", ".join(valid))
    assert merge_overrides(_toy_solver, None, ["tune=false"]) == {"steps": 50, "scale": 1.0, "prompt": "",
                                                                  "tune": False}
