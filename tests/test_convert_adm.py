"""``studio convert adm`` / ``models.adm``: guided-diffusion (ADM) checkpoints → diffusers ``DDPMPipeline``.

Ground truth is DeepInverse's ``DiffUNet``, which ships the guided-diffusion network with the official key
layout (``large_model=False``: the FFHQ-256 ``ffhq_10m.pt`` configuration; ``True``: OpenAI's
``256x256_diffusion_uncond.pt``). Its random weights (plus noise on every parameter, so the zero-initialised
output convs and ``proj_out`` are not zero) are saved with ``torch.save`` exactly like the official files,
converted, reloaded with ``DDPMPipeline.from_pretrained`` and run on the same input and timesteps as
``net(x, t, type_t="timestep")``: the raw 6-channel outputs must agree to float32 precision.

The comparison runs at 64x64 instead of 256x256: both networks are convolutional, and where attention sits
is fixed by the block index (the downsampling level), not by the input size, so every weight is exercised
exactly as at 256x256, at 1/16 of the cost.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.adm import (DEEPINV_SCHEDULE_BUFFERS, LAYOUTS, convert_adm_checkpoint, convert_state_dict,
                        detect_layout, unet_config)
from studio.cli import main
from studio.cli.convert import LAYOUT_NAMES
from studio.core.errors import ModelLoadError, StudioError
from studio.core.io import load_image
from studio.eval.deepinv_peer import import_deepinv

ROOT = Path(__file__).resolve().parent.parent
TIMESTEPS = (17, 803)
SIZE = 64  # see the module docstring


def _deepinv():
    """DeepInverse through the project's torchvision stand-in (studio/eval/deepinv_peer.py), or a skip."""
    if importlib.util.find_spec("deepinv") is None:
        pytest.skip("deepinv is not installed")
    try:
        return import_deepinv()
    except StudioError as err:
        pytest.skip(str(err))


def random_adm(large: bool, seed: int):
    """DeepInverse's ADM network with seeded random weights, every parameter (zero-initialised ones too)
    perturbed, in eval mode (its dropout is 0.1 in training mode)."""
    dinv = _deepinv()
    torch.manual_seed(seed)
    net = dinv.models.DiffUNet(large_model=large, pretrained=None).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net


def save_official(net, path: Path) -> Path:
    """``torch.save`` of the state dict as the official files hold it (without DeepInverse's schedule
    buffers)."""
    torch.save({k: v for k, v in net.state_dict().items() if k not in DEEPINV_SCHEDULE_BUFFERS}, path)
    return path


@pytest.fixture(scope="module")
def ffhq(tmp_path_factory):
    """(DeepInverse FFHQ-256 net, its ``.pt``, the converted folder), removed after the module."""
    tmp = tmp_path_factory.mktemp("adm_ffhq")
    net = random_adm(large=False, seed=0)
    ckpt = save_official(net, tmp / "ffhq_10m.pt")
    folder = convert_adm_checkpoint(ckpt, tmp / "ffhq-diffusers", source_note="test replica")
    yield net, ckpt, folder
    shutil.rmtree(tmp, ignore_errors=True)  # 0.75 GB; pytest keeps the last runs' tmp folders


def _max_differences(net, folder: Path) -> list[tuple[float, float]]:
    """(max |diffusers − DeepInverse|, max |DeepInverse|) of the raw 6-channel output per timestep."""
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(folder), use_safetensors=True)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    rows = []
    with torch.no_grad():
        for t in TIMESTEPS:
            ref = net(x, torch.tensor([t]), type_t="timestep")
            got = pipe.unet(x, torch.tensor([t])).sample
            assert got.shape == ref.shape == (1, 6, SIZE, SIZE)
            rows.append(((got - ref).abs().max().item(), ref.abs().max().item()))
    return rows


def _check_parity(net, ckpt: Path, folder: Path, layout: str) -> None:
    assert detect_layout(torch.load(ckpt, map_location="cpu", weights_only=True)) == layout
    rows = _max_differences(net, folder)
    print(f"{layout}: max |Δ| per timestep {TIMESTEPS}: "
          + ", ".join(f"{d:.3g} (scale {s:.3g})" for d, s in rows))  # shown with pytest -s
    for diff, scale in rows:
        assert scale > 0.1  # a real output, not zeros
        assert diff <= 1e-4 * scale
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["variance_type"] == "learned_range" and scheduler["num_train_timesteps"] == 1000
    assert scheduler["beta_schedule"] == "linear" and scheduler["prediction_type"] == "epsilon"
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["clip_sample"]) == (1e-4, 0.02, True)
    assert list((folder / "unet").glob("*.safetensors")) and (folder / "model_index.json").is_file()


def test_ffhq_layout_matches_deepinverse(ffhq) -> None:
    net, ckpt, folder = ffhq
    _check_parity(net, ckpt, folder, "ffhq-256")
    card = (folder / "README.md").read_text()
    assert "ffhq_10m.pt" in card and "ffhq-256" in card and "test replica" in card
    assert "licence and terms of use are those of the original checkpoint" in card
    import hashlib

    assert hashlib.sha256((folder.parent / "ffhq_10m.pt").read_bytes()).hexdigest() in card


@pytest.mark.slow
def test_imagenet_layout_matches_deepinverse(tmp_path) -> None:
    """OpenAI's 256x256 unconditional layout (553 M parameters, 2.2 GB files, 5 GB RAM): about 36 s on one
    core, so slow-marked; the FFHQ test runs the same conversion code in the default run."""
    net = random_adm(large=True, seed=1)
    try:
        ckpt = save_official(net, tmp_path / "256x256_diffusion_uncond.pt")
        folder = convert_adm_checkpoint(ckpt, tmp_path / "imagenet-diffusers")
        _check_parity(net, ckpt, folder, "imagenet-256-uncond")
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # 4.4 GB; pytest keeps the last runs' tmp folders


def test_layouts_and_config() -> None:
    assert LAYOUT_NAMES == tuple(LAYOUTS)
    cfg = unet_config("ffhq-256")
    assert cfg["block_out_channels"] == (128, 128, 256, 256, 512, 512) and cfg["layers_per_block"] == 1
    assert cfg["down_block_types"][4] == "AttnDownBlock2D" and cfg["up_block_types"][1] == "AttnUpBlock2D"
    cfg = unet_config("imagenet-256-uncond")
    assert cfg["down_block_types"][3:] == ("AttnDownBlock2D",) * 3 and cfg["layers_per_block"] == 2


def test_deepinverse_schedule_buffers_are_dropped(ffhq) -> None:
    net = ffhq[0]
    full = net.state_dict()
    assert set(DEEPINV_SCHEDULE_BUFFERS) <= set(full)
    assert detect_layout(full) == "ffhq-256" and len(convert_state_dict(full, "ffhq-256")) > 0


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _one_line_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("studio: error: "), err
    return lines[0]


def test_cli_converts_then_refuses_a_nonempty_folder(ffhq, tmp_path, capsys) -> None:
    _, ckpt, _ = ffhq
    out = tmp_path / "converted"
    code, stdout, err = _run(["convert", "adm", str(ckpt), "--out", str(out)], capsys)
    assert code == 0, err
    assert stdout.strip().splitlines() == [f"wrote {out} (diffusers DDPMPipeline converted from ffhq_10m.pt)"]
    assert {"model_index.json", "README.md", "unet", "scheduler"} <= {p.name for p in out.iterdir()}
    before = _snapshot(out)
    code, stdout, err = _run(["convert", "adm", str(ckpt), "--out", str(out)], capsys)
    assert "not an empty folder" in _one_line_error(code, err) and not stdout
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no temporary folder left behind
    shutil.rmtree(out)  # 375 MB


def test_cli_never_writes_over_the_checkpoint(ffhq, tmp_path, capsys) -> None:
    _, ckpt, _ = ffhq
    copy = tmp_path / "inside" / "ffhq.pt"
    copy.parent.mkdir()
    os.link(ckpt, copy)  # a second name for the same 375 MB, not a copy
    for out in (copy, copy.parent, tmp_path):
        code, _, err = _run(["convert", "adm", str(copy), "--out", str(out)], capsys)
        assert "contains the checkpoint" in _one_line_error(code, err)
    assert copy.read_bytes() == ckpt.read_bytes()
    assert sorted(p.name for p in copy.parent.iterdir()) == ["ffhq.pt"]
    copy.unlink()


class _RunsCode:
    """Unpickling this would create a folder (``os.mkdir(marker)``): a stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cli_refuses_pickled_objects_without_running_them(tmp_path, capsys) -> None:
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "evil.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(1), "payload": _RunsCode(str(marker))}, ckpt)
    out = tmp_path / "out"
    code, _, err = _run(["convert", "adm", str(ckpt), "--out", str(out)], capsys)
    assert "pickled objects other than tensors" in _one_line_error(code, err)
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("content, needle", [
    (b"not a checkpoint at all", "cannot read 'bad.pt' as a state dict"),
    ({"epoch": 3, "weights": torch.zeros(2)}, "not a flat state dict: epoch"),
    ([torch.zeros(2)], "not a state dict (it holds list)"),
])
def test_cli_refuses_unreadable_files(tmp_path, capsys, content, needle) -> None:
    ckpt = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        ckpt.write_bytes(content)
    else:
        torch.save(content, ckpt)
    code, _, err = _run(["convert", "adm", str(ckpt), "--out", str(tmp_path / "out")], capsys)
    assert needle in _one_line_error(code, err)
    assert not (tmp_path / "out").exists()


def _tiny(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(shape) for k, shape in keys.items()}


@pytest.mark.parametrize("state_dict, needle", [
    (_tiny({"input_blocks.0.0.weight": (128, 3, 3, 3), "label_emb.weight": (1000, 512)}),
     "class-conditional ADM checkpoint (label_emb found): not supported"),
    (_tiny({"temb.dense.0.weight": (512, 128), "down.0.block.0.norm1.weight": (128,)}),
     "DDPM-style UNet (the SDEdit / DDRM celeba_hq layout"),
    (_tiny({"input_blocks.0.0.weight": (192, 3, 3, 3), "input_blocks.1.0.in_layers.0.weight": (192,),
            "out.2.weight": (3, 192, 3, 3)}),
     "unknown ADM layout (num_channels 192, in_channels 3, input_blocks 2"),
])
def test_cli_refuses_unknown_layouts(tmp_path, capsys, state_dict, needle) -> None:
    ckpt = tmp_path / "other.pt"
    torch.save(state_dict, ckpt)
    code, _, err = _run(["convert", "adm", str(ckpt), "--out", str(tmp_path / "out")], capsys)
    assert needle in _one_line_error(code, err) and not (tmp_path / "out").exists()


def test_cli_refuses_a_wrong_explicit_layout(ffhq, tmp_path, capsys) -> None:
    _, ckpt, _ = ffhq
    code, _, err = _run(["convert", "adm", str(ckpt), "--out", str(tmp_path / "out"),
                         "--layout", "imagenet-256-uncond"], capsys)
    line = _one_line_error(code, err)
    assert "does not match the ADM layout 'imagenet-256-uncond'" in line
    assert "missing in the checkpoint" in line
    assert not (tmp_path / "out").exists()


def test_convert_state_dict_names_missing_and_unexpected_keys(ffhq) -> None:
    sd = {k: v for k, v in ffhq[0].state_dict().items() if k != "middle_block.1.qkv.weight"}
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelLoadError, match=r"missing in the checkpoint: middle_block\.1\.qkv\.weight.*"
                                             r"unexpected in the checkpoint: extra\.weight"):
        convert_state_dict(sd, "ffhq-256")


@pytest.mark.slow
def test_restore_with_a_converted_ffhq_model(ffhq, tmp_path, capsys) -> None:
    """The converted folder works as ``studio restore --model FOLDER`` for each pixel solver at 256x256
    (random weights: this checks the code path and shapes, not quality)."""
    folder = ffhq[2]
    clean = tmp_path / "clean.png"
    emoji = Image.open(ROOT / "examples" / "emoji" / "034-64.png").convert("RGB")
    emoji.resize((256, 256), Image.BICUBIC).save(clean)
    y = tmp_path / "y.png"
    code, _, err = _run(["degrade", "--input", str(clean), "--task", "super_resolution", "--output", str(y)],
                        capsys)
    assert code == 0, err
    lines = []
    for solver in ("dps", "mcg", "cdim", "ddrm"):
        out = tmp_path / f"{solver}.png"
        start = time.perf_counter()
        code, stdout, err = _run(["restore", "--input", str(y), "--output", str(out), "--solver", solver,
                                  "--model", str(folder), "--steps", "2", "--quiet",
                                  "--reference", str(clean)], capsys)
        assert code == 0, err
        image = load_image(out)
        assert image.shape == (1, 3, 256, 256) and torch.isfinite(image).all()
        rec = json.loads(out.with_suffix(".json").read_text())
        assert all(torch.isfinite(torch.tensor(rec["relative_residual"])))
        lines.append(f"{time.perf_counter() - start:.1f} s: {stdout.strip()}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
