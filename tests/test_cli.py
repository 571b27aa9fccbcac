"""`studio degrade` / `studio restore` end to end, and bad input: one-line errors, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.base import DiffusionPrior, Prediction, linear_alphas_cumprod
from studio.workflows import restoration as workflows
from studio.cli import main
from studio.core.errors import SolverDivergedError, StudioError
from studio.core.io import load_image, save_image

EXAMPLE = str(Path(__file__).resolve().parent.parent / "examples" / "coffee-32.png")
EMOJI_EXAMPLE = str(Path(__file__).resolve().parent.parent / "examples" / "emoji" / "034-32.png")


@pytest.fixture()
def clean_png(tmp_path) -> str:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "clean.png"
    save_image(torch.rand(1, 3, 17, 22, generator=g), path)
    return str(path)


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_degrade_then_restore_rebuilds_the_operator(tmp_path, clean_png, tiny_pixel_model_dir, capsys):
    y = tmp_path / "y.png"
    code, _, err = _run(["degrade", "--input", clean_png, "--task", "motion_blur", "--output", str(y),
                         "--seed", "5", "operator.kernel_size=7"], capsys)
    assert code == 0, err
    side = json.loads(y.with_suffix(".json").read_text())
    assert side["task"] == "motion_blur" and side["seed"] == 5 and y.with_suffix(".safetensors").exists()
    out = tmp_path / "x.png"
    code, stdout, err = _run(["restore", "--input", str(y), "--output", str(out), "--solver", "dps",
                              "--steps", "3", "--model", tiny_pixel_model_dir, "--quiet", "scale=0.3"],
                             capsys)
    assert code == 0, err
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["task"] == "motion_blur" and rec["solver_params"]["scale"] == 0.3 and rec["nfe"] == 3
    assert rec["task_config"]["operator"]["kernel_size"] == 7  # rebuilt from the sidecar
    assert "psnr" in rec["metrics"] and rec["command"][:2] == ["studio", "restore"]
    assert load_image(out).shape == (1, 3, 17, 22)
    # the same operator: the measurement residual of the exact restoration path is what the record says
    assert len(rec["residual"]) == 1 and rec["wall_time_s"] > 0


def test_restore_default_model_simulate(tmp_path, capsys):
    """The README's main job: the embedded emoji-pixel prior on a held-out emoji, box inpainting, CDIM."""
    out = tmp_path / "demo.png"
    code, stdout, err = _run(["restore", "--input", EMOJI_EXAMPLE, "--simulate", "--task", "inpaint_box",
                              "--solver", "cdim", "--output", str(out), "--quiet"], capsys)
    assert code == 0, err
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["model_name"] == "emoji-pixel" and rec["model"]["source"].endswith("emoji-pixel")
    # the restoration is closer to the clean emoji than the measurement (box filled with black) is
    clean, seen = load_image(EMOJI_EXAMPLE), load_image(tmp_path / "demo.measurement.png")
    from studio.core.metrics import psnr

    assert rec["metrics"]["psnr"] > psnr(seen, clean) + 3 and "PSNR" in stdout


def test_restore_demo_model_simulate(tmp_path, capsys):
    """The project-built Gaussian prior, box inpainting, CDIM."""
    out = tmp_path / "demo.png"
    code, stdout, err = _run(["restore", "--input", EXAMPLE, "--simulate", "--task", "inpaint_box",
                              "--solver", "cdim", "--model", "gaussian-demo", "--output", str(out),
                              "--quiet"], capsys)
    assert code == 0, err
    rec = json.loads(out.with_suffix(".json").read_text())
    assert (tmp_path / "demo.measurement.png").exists()
    assert rec["metrics"]["psnr"] > 15 and "PSNR" in stdout


def test_restore_with_user_mask(tmp_path, clean_png, tiny_pixel_model_dir, capsys):
    mask = Image.new("L", (22, 17), 0)
    mask.paste(255, (5, 4, 12, 10))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "x.png"
    code, _, err = _run(["restore", "--input", clean_png, "--simulate", "--task", "inpaint_mask", "--mask",
                         str(tmp_path / "mask.png"), "--solver", "cdim", "--steps", "2", "--model",
                         tiny_pixel_model_dir, "--output", str(out), "--quiet"], capsys)
    assert code == 0, err
    restored, clean = load_image(out), load_image(clean_png)
    observed = torch.ones(17, 22, dtype=torch.bool)
    observed[4:10, 5:12] = False
    # noiseless inpainting with CDIM keeps the observed pixels (up to 8-bit rounding)
    assert (restored - clean)[..., observed].abs().max() <= 1.5 / 255


BAD = [
    (["--task", "nope"], "unknown"),
    (["--solver", "nope"], "unknown solver"),
    (["--steps", "0"], "steps"),
    (["noise.sigma=-1"], "sigma"),
    (["scal=0.3"], "unknown config key"),
    (["steps=abc"], "steps"),
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_arguments_give_one_line_errors(tmp_path, clean_png, extra, needle, capsys):
    out = tmp_path / "x.png"
    argv = ["restore", "--input", clean_png, "--simulate", "--task", "inpaint_box", "--solver", "dps",
            "--output", str(out), "--quiet"]
    if extra[0] == "--task":
        argv[argv.index("inpaint_box")] = extra[1]
        extra = []
    if extra and extra[0] == "--solver":
        argv[argv.index("dps")] = extra[1]
        extra = []
    code, _, err = _run(argv + extra, capsys)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_bad_files(tmp_path, clean_png, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for bad in (text, empty, tmp_path / "missing.png"):
        code, _, err = _run(["restore", "--input", str(bad), "--simulate", "--task", "denoise", "--output",
                             str(tmp_path / "o.png")], capsys)
        assert code == 2 and err.startswith("studio: error:") and err.count("\n") == 1, err
    small = tmp_path / "small_mask.png"
    Image.new("L", (5, 5), 255).save(small)
    code, _, err = _run(["restore", "--input", clean_png, "--simulate", "--task", "inpaint_mask", "--mask",
                         str(small), "--output", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "mask is 5x5" in err
    blank = tmp_path / "blank_mask.png"
    Image.new("L", (22, 17), 0).save(blank)
    code, _, err = _run(["restore", "--input", clean_png, "--simulate", "--task", "inpaint_mask", "--mask",
                         str(blank), "--output", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "empty" in err
    assert not (tmp_path / "o.png").exists()


def test_solver_refuses_unsupported_task(clean_png):
    y = load_image(clean_png)
    with pytest.raises(StudioError, match="SVD"):
        workflows.restore(y, task="motion_blur", solver="ddrm", model=_NaNPrior(at_step=99))


class _NaNPrior(DiffusionPrior):
    """Returns NaN from the given call on: a solve must stop with a message, not write a black PNG."""

    sample_shape = None

    def __init__(self, at_step: int):
        super().__init__(linear_alphas_cumprod())
        self.calls, self.at_step = 0, at_step

    def _predict(self, x_t, t):
        self.calls += 1
        x0 = 0.5 * x_t if self.calls < self.at_step else x_t * float("nan")
        ab = self.alpha_bar(t, x_t)
        return Prediction(eps=(x_t - ab.sqrt() * x0) / (1 - ab).sqrt(), x0=x0)


@pytest.mark.parametrize("solver", ["dps", "cdim", "ddrm", "mcg", "ddim"])
def test_nan_during_solve_stops_with_message(solver, clean_png):
    y = load_image(clean_png)
    with pytest.raises(SolverDivergedError, match="NaN"):
        workflows.restore(y, task="denoise", solver=solver, model=_NaNPrior(at_step=3), steps=5)
