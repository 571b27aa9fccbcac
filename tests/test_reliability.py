"""Never lose a user's file (issue 22): outputs never replace inputs, a stale exact copy never wins over the
PNG the user passes, a failed run writes nothing. Each test reproduces a failure of the earlier code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from studio.cli import main
from studio.core.io import load_image, save_image

EMOJI = Path(__file__).resolve().parent.parent / "examples" / "emoji"


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` → its SHA-256 (what "nothing changed" is checked against)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def measured(tmp_path, capsys) -> Path:
    """A ``studio degrade`` measurement (PNG + exact copy + sidecar) of a held-out emoji, beside its clean
    image."""
    clean = tmp_path / "clean.png"
    save_image(load_image(EMOJI / "034-32.png"), clean)
    y = tmp_path / "y.png"
    code, _, err = _run(["degrade", "--input", str(clean), "--task", "gaussian_blur", "--output", str(y)],
                        capsys)
    assert code == 0, err
    return y


def _one_line_refusal(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_degrade_refuses_to_overwrite_its_input(tmp_path, capsys):
    clean = tmp_path / "clean.png"
    save_image(load_image(EMOJI / "034-32.png"), clean)
    before = _digests(tmp_path)
    code, _, err = _run(["degrade", "--input", str(clean), "--task", "gaussian_blur", "--output", str(clean)],
                        capsys)
    _one_line_refusal(code, err, "would overwrite the input", "clean.png")
    assert _digests(tmp_path) == before


@pytest.mark.parametrize("which", ["input", "mask", "reference", "clean image of the measurement"])
def test_restore_refuses_outputs_that_would_replace_an_input(measured, tiny_pixel_model_dir, capsys, which):
    folder = measured.parent
    clean, mask = folder / "clean.png", folder / "mask.png"
    save_image(torch.zeros(1, 3, 32, 32), mask)
    common = ["--solver", "ddrm", "--steps", "2", "--model", tiny_pixel_model_dir, "--quiet"]
    argv = {
        "input": ["--input", str(measured), "--output", str(measured)],
        "mask": ["--input", str(clean), "--simulate", "--task", "inpaint_mask", "--mask", str(mask),
                 "--output", str(mask)],
        "reference": ["--input", str(measured), "--reference", str(clean), "--output", str(clean)],
        # the sidecar names clean.png as the clean image (read as the reference)
        "clean image of the measurement": ["--input", str(measured), "--output", str(clean)],
    }[which]
    before = _digests(folder)
    code, _, err = _run(["restore", *argv, *common], capsys)
    _one_line_refusal(code, err, f"would overwrite the {which}")
    assert _digests(folder) == before


def test_restore_refuses_another_spelling_of_the_input(measured, tiny_pixel_model_dir, capsys):
    """``sub/../y.png`` is ``y.png``: compared as files, not as strings."""
    folder = measured.parent
    (folder / "sub").mkdir()
    before = _digests(folder)
    other_spelling = str(folder / "sub" / ".." / "y.png")
    code, _, err = _run(["restore", "--input", str(measured), "--output", other_spelling, "--solver", "ddrm",
                         "--steps", "2", "--model", tiny_pixel_model_dir, "--quiet"], capsys)
    _one_line_refusal(code, err, "would overwrite the input")
    assert _digests(folder) == before


def test_a_replaced_png_wins_over_the_stale_exact_copy(measured, tiny_pixel_model_dir, capsys, caplog):
    folder = measured.parent
    args = ["--solver", "ddrm", "--steps", "2", "--model", tiny_pixel_model_dir, "--quiet", "--seed", "3"]
    code, _, err = _run(["restore", "--input", str(measured), "--output", str(folder / "a.png"), *args],
                        capsys)
    assert code == 0, err
    first = json.loads((folder / "a.json").read_text())
    assert first["measurement_source"] == "exact copy y.safetensors"
    # the user replaces y.png by another picture (the sidecar and y.safetensors stay)
    other = load_image(EMOJI / "000-32.png")
    save_image(other, measured)
    code, _, err = _run(["restore", "--input", str(measured), "--output", str(folder / "b.png"), *args],
                        capsys)
    assert code == 0, err
    second = json.loads((folder / "b.json").read_text())
    assert second["measurement_source"].startswith("png (y.safetensors does not match it)")
    assert "does not match" in caplog.text
    assert (folder / "a.png").read_bytes() != (folder / "b.png").read_bytes()


@pytest.mark.parametrize("bad", [["--solver", "nope"], ["--model", "no-such-model"], ["small-image"]])
def test_a_failed_simulate_run_writes_nothing(tmp_path, tiny_pixel_model_dir, capsys, bad):
    clean = tmp_path / "clean.png"
    save_image(load_image(EMOJI / "034-32.png"), clean)
    out = tmp_path / "out.png"
    args = ["restore", "--input", str(clean), "--simulate", "--task", "gaussian_blur", "--output", str(out),
            "--steps", "2", "--quiet"]
    code, _, err = _run([*args, "--solver", "ddrm", "--model", tiny_pixel_model_dir], capsys)
    assert code == 0, err  # an earlier good run: its three outputs must survive the bad one untouched
    before = _digests(tmp_path)
    if bad == ["small-image"]:
        save_image(torch.rand(1, 3, 2, 2), clean)  # degrades, then too small for the metrics
        before = _digests(tmp_path)
        bad = ["--solver", "ddrm", "--model", tiny_pixel_model_dir]
    elif bad[0] == "--solver":
        bad = [*bad, "--model", tiny_pixel_model_dir]
    else:
        bad = ["--solver", "ddrm", *bad]
    code, _, err = _run([*args, *bad, "--seed", "7"], capsys)  # another seed: another measurement PNG
    _one_line_refusal(code, err)
    assert _digests(tmp_path) == before


def test_outputs_are_written_as_a_set(tmp_path):
    """A run's files appear together or not at all: a failure while staging leaves every target as it was."""
    from studio.core.errors import StudioError
    from studio.core.io import PendingFile, json_file, png_file, write_set

    old = tmp_path / "a.png"
    save_image(torch.zeros(1, 3, 4, 4), old)
    before = _digests(tmp_path)

    def fail(_):
        raise OSError(28, "No space left on device")

    with pytest.raises(StudioError, match="No space left"):
        write_set([png_file(torch.ones(1, 3, 4, 4), old), PendingFile(tmp_path / "b.json", fail, False),
                   json_file({"x": 1}, tmp_path / "c.json")])
    assert _digests(tmp_path) == before  # a.png unchanged, no b/c, no temporaries left
