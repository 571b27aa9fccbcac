"""`studio restore-batch`: a folder of measurements over several processes, resumable, one bad input
tolerated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from studio.workflows import restoration as workflows
from studio.workflows import batch
from studio.workflows.batch import restore_batch
from studio.cli import main
from studio.core.io import load_image, save_image

REPO = Path(__file__).resolve().parent.parent
COMMON = dict(solver="cdim", steps=2, seed=3, progress=False)


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clean")
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        save_image(torch.rand(1, 3, 16, 16, generator=g), d / f"img{i}.png")
    return d


@pytest.fixture(scope="module")
def measured_dir(clean_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("measured")
    for i, p in enumerate(sorted(clean_dir.glob("*.png"))):
        workflows.degrade_files(str(p), "inpaint_box", str(d / p.name), seed=i)
    return d


def _summary(out: Path) -> dict:
    return json.loads((out / "batch.json").read_text())


def _outputs(out: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(out.glob("img*.png"))}


def test_two_processes_match_one_and_rerun_skips(measured_dir, tiny_pixel_model_dir, tmp_path, monkeypatch):
    out2, out1 = tmp_path / "out2", tmp_path / "out1"
    res = restore_batch(measured_dir, out2, model=tiny_pixel_model_dir, processes=2, **COMMON)
    s = _summary(out2)
    assert (s["inputs"], s["restored"], s["skipped"], s["failed"]) == (4, 4, 0, 0)
    assert s["processes"] == 2 and s["launcher"] == "spawn" and res["main_process"]
    # contiguous chunks, as accelerate's split_between_processes cuts them
    assert [r["process"] for r in s["items"]] == [0, 0, 1, 1]
    assert all(r["wall_time_s"] > 0 for r in s["items"])
    for name, png in _outputs(out2).items():
        side = json.loads(png.with_suffix(".json").read_text())
        assert side["kind"] == "restoration" and side["solver"] == "cdim"
        assert side["solver_params"]["steps"] == 2
        assert side["solver_params"]["seed"] == 3 and side["model_name"] == tiny_pixel_model_dir
        assert side["task"] == "inpaint_box"  # from the measurement's sidecar
    assert len(_outputs(out2)) == 4

    restore_batch(measured_dir, out1, model=tiny_pixel_model_dir, processes=1, **COMMON)
    assert _summary(out1)["restored"] == 4
    for name, png in _outputs(out1).items():
        assert torch.equal(load_image(png), load_image(out2 / name)), name  # the same seed: N does not matter

    # resume: everything is done, so nothing is solved (no model load, no worker) and nothing is rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out2.iterdir() if p.name != "batch.json"}

    def boom(*a, **k):
        raise AssertionError("solver called on a finished input")

    monkeypatch.setattr(workflows, "restore_files", boom)
    monkeypatch.setattr(batch, "load_prior", boom)
    for n in (2, 1):
        restore_batch(measured_dir, out2, model=tiny_pixel_model_dir, processes=n, **COMMON)
        s = _summary(out2)
        assert (s["restored"], s["skipped"], s["failed"]) == (0, 4, 0)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out2.iterdir() if p.name != "batch.json"}


@pytest.mark.parametrize("n", [0, 1, 4, 5, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_spawned_split_is_accelerates(n, world):
    """The spawned workers split the inputs as `accelerate launch` does: contiguous chunks, each input
    exactly once."""
    accelerate_state = pytest.importorskip("accelerate.state")
    names = [f"img{i}.png" for i in range(n)]
    split = accelerate_state.PartialState.split_between_processes.__wrapped__  # the generator function
    shares = [batch._share(names, rank, world) for rank in range(world)]
    for rank, share in enumerate(shares):
        state = SimpleNamespace(num_processes=world, process_index=rank)
        assert share == next(split(state, names))
    assert [name for share in shares for name in share] == names


def test_half_written_output_is_redone(measured_dir, tiny_pixel_model_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for ext in (".png", ".json", ".safetensors"):
        shutil.copy(measured_dir / f"img0{ext}", src / f"img0{ext}")
    out = tmp_path / "out"
    out.mkdir()
    save_image(torch.zeros(1, 3, 16, 16), out / "img0.png")  # a PNG without its sidecar: not finished
    restore_batch(src, out, model=tiny_pixel_model_dir, **COMMON)
    assert _summary(out)["restored"] == 1 and (out / "img0.json").exists()
    assert load_image(out / "img0.png").abs().sum() > 0


def test_bad_input_is_reported_and_the_rest_succeed(measured_dir, tiny_pixel_model_dir, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for stem in ("img0", "img1"):
        for ext in (".png", ".json", ".safetensors"):
            shutil.copy(measured_dir / f"{stem}{ext}", src / f"{stem}{ext}")
    (src / "x.png").write_text("not an image")
    (src / "x.json").write_text(json.dumps({"kind": "measurement", "task": "inpaint_box", "seed": 0,
                                            "task_config": {}, "measurement": "missing.safetensors"}))
    (src / "notes.png").write_text("no sidecar: not a measurement, ignored")
    out = tmp_path / "out"
    s = restore_batch(src, out, model=tiny_pixel_model_dir, **COMMON)
    assert (s["inputs"], s["restored"], s["failed"], s["ignored_pngs"]) == (3, 2, 1, 1)
    assert _summary(out)["failures"][0]["input"] == "x.png"
    assert "x.png" in _summary(out)["failures"][0]["error"]
    assert sorted(_outputs(out)) == ["img0.png", "img1.png"] and not (out / "x.png").exists()
    # the CLI: the failed input is retried (the others are skipped), one summary line, exit status 1
    code = main(["restore-batch", "--input-dir", str(src), "--output-dir", str(out), "--solver", "cdim",
                 "--steps", "2", "--seed", "3", "--model", tiny_pixel_model_dir, "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 1 and stdout.count("\n") == 1 and "0 restored, 2 skipped, 1 failed of 3 inputs" in stdout


def test_simulate_and_cli_summary(clean_dir, tiny_pixel_model_dir, tmp_path, capsys):
    src = tmp_path / "clean"
    src.mkdir()
    shutil.copy(clean_dir / "img0.png", src / "img0.png")
    out = tmp_path / "out"
    code = main(["restore-batch", "--input-dir", str(src), "--output-dir", str(out), "--solver", "cdim",
                 "--simulate", "--task", "inpaint_box", "--model", tiny_pixel_model_dir, "--steps", "2",
                 "--quiet", "inner_steps=1"])
    stdout = capsys.readouterr().out
    assert code == 0 and "1 restored, 0 skipped, 0 failed of 1 inputs" in stdout
    side = json.loads((out / "img0.json").read_text())
    assert "psnr" in side["metrics"] and side["command"][:2] == ["studio", "restore-batch"]
    assert _summary(out)["items"][0]["metrics"]["psnr"] == side["metrics"]["psnr"]


@pytest.mark.parametrize("options, extra, message", [
    ({"--input-dir": "{tmp}/missing"}, [], "does not exist"),
    ({"--input-dir": "{tmp}/empty"}, [], "no PNG images"),
    ({"--input-dir": "{tmp}/plain"}, [], "is a measurement"),
    ({"--processes": "0"}, [], "--processes must be a positive integer"),
    ({"--solver": "nope"}, [], "unknown solver 'nope'"),
    ({"--steps": "0"}, [], "--steps must be a positive integer"),
    ({}, ["--simulate"], "--simulate needs --task"),
    ({}, ["bogus_key=1"], "bogus_key"),
])
def test_cli_errors_exit_2_once(options, extra, message, measured_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "plain").mkdir()
    save_image(torch.zeros(1, 3, 4, 4), tmp_path / "plain" / "a.png")
    opts = {"--input-dir": str(measured_dir), "--output-dir": str(tmp_path / "out"), "--solver": "cdim",
            **{k: v.format(tmp=tmp_path) for k, v in options.items()}}
    code = main(["restore-batch", *[t for kv in opts.items() for t in kv], "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("studio: error:") == 1 and message in err, err
    assert not (tmp_path / "out" / "batch.json").exists()


def test_accelerate_launch_two_processes(measured_dir, tiny_pixel_model_dir, tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate is not installed")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "studio.cli", "restore-batch",
           "--input-dir", str(measured_dir), "--output-dir", str(out), "--solver", "cdim", "--steps", "2",
           "--seed", "3", "--model", tiny_pixel_model_dir, "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("restore-batch: 4 restored") == 1, proc.stdout  # the main process prints
    s = _summary(out)
    assert (s["restored"], s["processes"], s["launcher"]) == (4, 2, "accelerate")
    assert [r["process"] for r in s["items"]] == [0, 0, 1, 1]
    assert len(_outputs(out)) == 4 and all(p.with_suffix(".json").exists() for p in _outputs(out).values())
