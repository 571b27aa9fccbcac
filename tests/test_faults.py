"""Faults (issue 22): personalization from images of mixed sizes, and runs killed mid-write.

The kill checks start real ``studio`` processes, SIGKILL them (or one of their workers) while they are
writing a file, check that every file under its final name reads back whole, and rerun: the rerun resumes
where the kill stopped it and leaves complete outputs, equal to an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from studio.cli import main
from studio.core.errors import StudioError
from studio.core.io import load_image, save_image
from studio.training.textual_inversion import TextualInversionConfig, train_textual_inversion
from studio.workflows import personalize, restoration
from studio.workflows.batch import restore_batch
from tests.conftest import build_tiny_sd_pipeline

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ personalize: image sizes


def _save(folder: Path, name: str, width: int, height: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    return save_image(torch.rand(1, 3, height, width, generator=g), folder / name)


@pytest.fixture()
def mixed_sizes(tmp_path) -> Path:
    """Three images the tiny SD model (64x64) trains on: square at its size, landscape, portrait."""
    folder = tmp_path / "concept"
    for i, (w, h) in enumerate([(64, 64), (96, 48), (40, 72)]):
        _save(folder, f"{i}.png", w, h, seed=i)
    return folder


def test_personalize_trains_on_images_of_different_sizes(tmp_path, mixed_sizes, capsys):
    """Once a RuntimeError from stacking ("Sizes of tensors must match"); now each image is center-cropped
    and resized to the model's size, and that is said once, with the sizes found and the size used."""
    pipe = build_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = personalize.personalize([str(mixed_sizes)], model=pipe, placeholder="<x>", initializer="heart",
                                  steps=2, batch_size=2, output_dir=str(tmp_path / "ti"), validate_every=0)
    assert out["step"] == 2 and np.isfinite(out["final_loss"])
    assert load_file(out["embeddings"])["<x>"].shape[0] == 1
    assert out["images"]["sizes"] == {"64x64": 1, "96x48": 1, "40x72": 1}
    assert (out["images"]["size"], out["images"]["changed"]) == ("64x64", 2)
    printed = capsys.readouterr().out
    assert printed.count("training images:") == 1, printed
    assert "64x64, 96x48, 40x72" in printed and "resized to 64x64" in printed


def test_images_are_center_cropped_not_squashed():
    """A 96x48 image whose middle 48x48 is white and whose sides are black becomes all white (a squash
    would keep the black bands)."""
    from studio.training.textual_inversion import prepare_images

    image = torch.zeros(1, 3, 48, 96)
    image[..., 24:72] = 1
    batch, found = prepare_images(image, 64)
    assert batch.shape == (1, 3, 64, 64)
    torch.testing.assert_close(batch, torch.ones_like(batch))  # [-1, 1]: white is 1
    assert found["sizes"] == {"96x48": 1} and found["changed"] == 1
    same, found = prepare_images(torch.rand(2, 3, 64, 64), 64)
    assert found == {"count": 2, "sizes": {"64x64": 2}, "size": "64x64", "changed": 0, "note": ""}


def test_personalize_refuses_what_cannot_work_with_one_line(tmp_path, mixed_sizes, tiny_sd_model_dir,
                                                            capsys):
    _save(mixed_sizes, "thumb.png", 40, 6)
    code = main(["personalize", "--images", str(mixed_sizes), "--model", tiny_sd_model_dir, "--token", "<x>",
                 "--init", "heart", "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "ti"),
                 "--quiet", "validate_every=0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "thumb.png' is 40x6: too small for this model's 64x64 training size" in err
    assert "at least 8 px" in err and not (tmp_path / "ti" / "learned_embeds.safetensors").exists()
    (tmp_path / "empty").mkdir()
    assert main(["personalize", "--images", str(tmp_path / "empty"), "--model", tiny_sd_model_dir]) == 2
    assert "no images found in" in capsys.readouterr().err
    for nothing in ([], torch.zeros(0, 3, 64, 64)):
        with pytest.raises(StudioError, match="^no training images given$"):
            personalize.personalize(nothing, model=build_tiny_sd_pipeline(), steps=1, batch_size=1,
                                    output_dir=str(tmp_path / "none"))


# ------------------------------------------------------------------------------ what a kill leaves


def _temporaries(folder: Path) -> list[str]:
    """What an atomic write killed half-way leaves: ``*.tmp`` files (not under any output's name)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def _torn(folder: Path) -> list[str]:
    """The files under their final names in ``folder`` (recursively) that do not read back whole."""
    bad = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix == ".tmp":
            continue
        try:
            if p.suffix == ".png":
                with Image.open(p) as im:
                    im.load()
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".jsonl":
                [json.loads(line) for line in p.read_text().splitlines()]
            elif p.suffix == ".safetensors":
                with safe_open(str(p), framework="pt") as f:
                    [f.get_tensor(k) for k in f.keys()]
        except Exception as err:  # noqa: BLE001 - any failure to read is a torn file
            bad.append(f"{p.relative_to(folder)} ({type(err).__name__})")
    return bad


def _pixel_args(run_dir: Path, data: str, steps: int, **extra) -> list[str]:
    options = {"steps": steps, "batch_size": 4, "block_out_channels": "[8,16]",
               "attention_at_lowest": "false", "sample_every": 1, "num_samples": 4, "log_every": 1,
               "warmup": 1, "checkpoint_every": 1, "threads": 1, **extra}
    return ["train", "pixel", "--run-dir", str(run_dir), "--data", data, "--quiet",
            *(f"{k}={v}" for k, v in options.items())]


def _logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_resumed_training_drops_what_the_kill_left(tmp_path, tiny_dataset):
    """A run killed after logging step 3 (its last checkpoint at 2), in the middle of step 4's line and of
    a grid's temporary: resumed, it logs steps 3 and 4 once each and removes the temporaries (the log was
    appended to, giving 1 2 3 <torn> 3 4)."""
    run = tmp_path / "run"
    assert main(_pixel_args(run, tiny_dataset, 2)) == 0
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.5}) + "\n" + '{"step": 4, "lo')
    stale = [run / "samples" / ".step-000003.png.k1ll3d_x.tmp", run / ".config.json.abcd1234.tmp"]
    for p in stale:
        p.write_bytes(b"\x89PNG half")
    assert main(_pixel_args(run, tiny_dataset, 4)) == 0
    assert _logged_steps(run) == [1, 2, 3, 4]
    assert _torn(run) == [] and _temporaries(run) == []


def _ti_config(out: Path, **kw) -> TextualInversionConfig:
    base = dict(placeholder="<x>", initializer="heart", steps=2, batch_size=2, output_dir=str(out),
                validate_every=0, checkpoint_every=5)
    return TextualInversionConfig(**{**base, **kw})


def test_textual_inversion_resumed_at_its_end_writes_the_embeddings(tmp_path):
    """Killed after its final checkpoint but before ``learned_embeds.safetensors``: the rerun has no step
    left to take, and once returned without the file."""
    out, images = tmp_path / "ti", [str(_save(tmp_path / "concept", f"{i}.png", 64, 64, i)) for i in range(2)]
    first = train_textual_inversion(build_tiny_sd_pipeline(), images, _ti_config(out), quiet=True)
    rows = load_file(first["embeddings"])["<x>"]
    Path(first["embeddings"]).unlink()
    (out / "checkpoint.tmp").write_bytes(b"half a checkpoint")
    again = train_textual_inversion(build_tiny_sd_pipeline(), images, _ti_config(out), quiet=True)
    assert again["step"] == 2 and again["loss_history"] == first["loss_history"]
    assert torch.equal(load_file(again["embeddings"])["<x>"], rows)
    assert _temporaries(out) == [] and _torn(out) == []


@pytest.fixture()
def measured(tmp_path) -> Path:
    """Eight measurements (16x16 box inpainting) for the tiny pixel model."""
    clean, measured = tmp_path / "clean", tmp_path / "measured"
    for i in range(8):
        _save(clean, f"img{i}.png", 16, 16, seed=i)
        restoration.degrade_files(str(clean / f"img{i}.png"), "inpaint_box", str(measured / f"img{i}.png"),
                                  seed=i)
    return measured


BATCH = dict(solver="cdim", steps=2, seed=3, progress=False)


def test_batch_redoes_an_input_killed_between_its_two_writes(tmp_path, measured, tiny_pixel_model_dir):
    """The solve writes PNG + sidecar, then the batch rewrites the sidecar with its ``batch`` record. Killed
    in between, the input was counted done and kept a sidecar without model name or batch record; and the
    temporaries of a write killed half-way stayed in the output folder."""
    out = tmp_path / "out"
    restore_batch(measured, out, model=tiny_pixel_model_dir, **BATCH)
    side = json.loads((out / "img0.json").read_text())
    (out / "img0.json").write_text(json.dumps({k: v for k, v in side.items()
                                               if k not in ("batch", "model_name")}))
    for name in (".img1.png.k1ll3d_x.tmp", ".img1.json.abcd1234.tmp", ".batch.json.zz99zz99.tmp"):
        (out / name).write_text("half")
    s = restore_batch(measured, out, model=tiny_pixel_model_dir, **BATCH)
    assert (s["restored"], s["skipped"]) == (1, 7) and s["items"][0]["status"] == "restored"
    again = json.loads((out / "img0.json").read_text())
    assert again["model_name"] == tiny_pixel_model_dir and again["batch"]["processes"] == 1
    assert _temporaries(out) == [] and _torn(out) == []


# ------------------------------------------------------------------------------ SIGKILL, real processes


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with open(log, "a") as f:
        return subprocess.Popen([sys.executable, "-m", "studio.cli", *args], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def _writing(pid: int, folder: Path) -> list[str]:
    """The files under ``folder`` that process ``pid`` has open for writing now (read from /proc: a scan
    takes a fraction of a millisecond, shorter than the writes it has to catch)."""
    root, found = str(folder) + os.sep, []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(root) and _opened_for_writing(pid, fd):
                found.append(target)
        except OSError:  # closed meanwhile
            continue
    return found


def _opened_for_writing(pid: int, fd: str) -> bool:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
    return flags & (os.O_WRONLY | os.O_RDWR) != 0


def _kill_while_writing(run: subprocess.Popen, folder: Path, ready=lambda: True, workers: bool = False,
                        timeout: float = 600) -> dict | None:
    """SIGKILL the process (``workers``: the child of ``run``) that is writing a file under ``folder`` at a
    moment ``ready()`` holds; what was killed, when and while writing what (``None``: the run ended
    first)."""
    main_proc, start = psutil.Process(run.pid), time.monotonic()
    pids, listed = [run.pid], 0.0
    while run.poll() is None and time.monotonic() - start < timeout:
        if workers and time.monotonic() - listed > 0.2:
            pids, listed = [c.pid for c in main_proc.children()], time.monotonic()
        for pid in pids:
            files = _writing(pid, folder)
            if files and ready():
                os.kill(pid, signal.SIGKILL)
                return {"pid": pid, "worker": workers, "after_s": round(time.monotonic() - start, 2),
                        "writing": [str(Path(f).relative_to(folder)) for f in files]}
    return None


def _finish(run: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return run.wait(timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        raise


def _finished_outputs(out: Path) -> set[str]:
    """Inputs whose PNG and batch-finished sidecar are both there."""
    done = set()
    for side in out.glob("img*.json"):
        meta = json.loads(side.read_text())
        if "batch" in meta and side.with_suffix(".png").is_file():
            done.add(side.with_suffix(".png").name)
    return done


def _check_batch_after_kill(out: Path, report: dict) -> None:
    """Nothing torn; the summary the main process wrote says restored/skipped exactly for the inputs whose
    outputs are on disk, failed for the others."""
    assert _torn(out) == [], report
    s = json.loads((out / "batch.json").read_text())
    done = _finished_outputs(out)
    status = {r["output"]: r["status"] for r in s["items"]}
    assert {n for n, st in status.items() if st != "failed"} == done, (status, sorted(done), report)
    report.update(finished=len(done), failed=s["failed"], temporaries=_temporaries(out))


@pytest.mark.slow
def test_sigkill_restore_batch_workers_then_resume(tmp_path, measured, tiny_pixel_model_dir):
    """Kill a worker of ``restore-batch --processes 2`` while it writes its first output, rerun, kill a
    worker again while it writes once the rerun has finished some inputs, rerun: nothing torn at any point,
    the summary matches the disk, and the final outputs equal an uninterrupted run's."""
    out, log = tmp_path / "out", tmp_path / "log.txt"
    args = ["restore-batch", "--input-dir", str(measured), "--output-dir", str(out), "--solver", "cdim",
            "--steps", "2", "--seed", "3", "--model", tiny_pixel_model_dir, "--processes", "2", "--quiet"]
    reports = []
    for attempt in range(2):
        before = _finished_outputs(out) if out.exists() else set()
        run = _start(args, log)
        ready = (lambda: True) if attempt == 0 else (lambda b=before: len(_finished_outputs(out) - b) > 0)
        report = _kill_while_writing(run, out, ready, workers=True)
        assert report is not None, log.read_text()[-3000:]
        code = _finish(run)
        assert code == 1, log.read_text()[-3000:]  # the failed inputs are reported, exit status 1
        _check_batch_after_kill(out, report)
        reports.append(report)
    start = time.monotonic()
    run = _start(args, log)
    assert _finish(run) == 0, log.read_text()[-3000:]
    s = json.loads((out / "batch.json").read_text())
    assert (s["restored"] + s["skipped"], s["failed"], s["skipped"]) == (8, 0, reports[-1]["finished"])
    assert _torn(out) == [] and _temporaries(out) == []
    straight = tmp_path / "straight"
    restore_batch(measured, straight, model=tiny_pixel_model_dir, **BATCH)
    for png in sorted(straight.glob("img*.png")):
        assert torch.equal(load_image(out / png.name), load_image(png)), png.name
    print(f"\nrestore-batch kills: {reports}; resume: {time.monotonic() - start:.1f} s, "
          f"{s['skipped']} skipped, {s['restored']} restored")


@pytest.mark.slow
def test_sigkill_train_while_it_writes_a_sample_grid_then_resume(tmp_path, tiny_dataset):
    """Kill ``studio train pixel`` while it writes a sample grid after its first checkpoint (so it has
    logged steps it will take again), rerun: nothing torn, each step logged once, and the final checkpoint
    equals an uninterrupted run's bit for bit."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    args = _pixel_args(run_dir, tiny_dataset, 6, checkpoint_every=2, num_samples=64)
    run = _start(args, log)
    checkpointed = (run_dir / "checkpoint.safetensors").exists
    report = _kill_while_writing(run, run_dir / "samples", checkpointed)
    assert report is not None, log.read_text()[-3000:]
    assert _finish(run) == -signal.SIGKILL
    assert _torn(run_dir) == [], report
    report.update(logged=_logged_steps(run_dir), temporaries=_temporaries(run_dir),
                  grids=sorted(p.name for p in (run_dir / "samples").glob("*.png")))
    start = time.monotonic()
    assert _finish(_start(args, log)) == 0, log.read_text()[-3000:]
    resume_s = time.monotonic() - start
    assert _logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert _torn(run_dir) == [] and _temporaries(run_dir) == []
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == [f"step-00000{i}.png"
                                                                           for i in range(1, 7)]
    straight = tmp_path / "straight"
    assert main(_pixel_args(straight, tiny_dataset, 6, checkpoint_every=2, num_samples=64)) == 0
    a = load_file(str(straight / "checkpoint.safetensors"))
    b = load_file(str(run_dir / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"\ntrain kill: {report}; resume: {resume_s:.1f} s")


@pytest.mark.slow
def test_sigkill_personalize_while_it_writes_then_resume(tmp_path, tiny_sd_model_dir):
    """Kill ``studio personalize`` while it writes a validation grid after its first checkpoint, rerun:
    nothing torn, and the resumed run ends with every step's grid, the embeddings and a full loss history."""
    out, log, images = tmp_path / "ti", tmp_path / "log.txt", tmp_path / "concept"
    for i in range(2):
        _save(images, f"{i}.png", 64, 64, seed=i)
    args = ["personalize", "--images", str(images), "--model", tiny_sd_model_dir, "--token", "<x>",
            "--init", "heart", "--steps", "4", "--batch-size", "2", "--out", str(out), "--quiet",
            "validate_every=1", "checkpoint_every=2"]
    run = _start(args, log)
    report = _kill_while_writing(run, out / "validation", lambda: (out / "checkpoint.safetensors").exists())
    assert report is not None, log.read_text()[-3000:]
    assert _finish(run) == -signal.SIGKILL
    assert _torn(out) == [], report
    report.update(files=sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()))
    start = time.monotonic()
    assert _finish(_start(args, log)) == 0, log.read_text()[-3000:]
    resume_s = time.monotonic() - start
    assert _torn(out) == [] and _temporaries(out) == []
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == [f"step-0000{i}.png"
                                                                          for i in range(1, 5)]
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["step"] == "4" and len(json.loads(meta["history"])) == 4
    assert load_file(str(out / "learned_embeds.safetensors"))["<x>"].shape == (1, 32)
    print(f"\npersonalize kill: {report}; resume: {resume_s:.1f} s")
