"""The bad-input table (issue 22): what a careless or hostile user gives the CLI and the Python API.

Every case must end in one line naming the problem (the CLI: ``studio: error: ...`` and exit code 2; the API:
a :class:`~studio.core.errors.StudioError` whose message is one line), write nothing and change no file that
was there before. The README's reliability section lists these cases (``pytest tests/test_bad_inputs.py -v``
prints them by name).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import studio.workflows.restoration  # noqa: F401  (diffusers' log handler bound to the session's stderr)
from studio.cli import main
from studio.core.errors import StudioError
from studio.core.io import load_image, save_image

EMOJI = Path(__file__).resolve().parent.parent / "examples" / "emoji"


def _bomb_png(path: Path, side: int = 50_000) -> None:
    """A valid PNG header declaring ``side`` x ``side`` pixels with (almost) no data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The files the cases point at: a clean emoji, a ``studio degrade`` measurement with its sidecar, and the
    bad ones (text named .png, empty file, a pickle, a bomb, a 2000x2000 photo, masks of the wrong size)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    save_image(load_image(EMOJI / "034-32.png"), root / "clean.png")
    assert main(["degrade", "--input", str(root / "clean.png"), "--task", "gaussian_blur",
                 "--output", str(root / "y.png")]) == 0
    (root / "notes.png").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "folder.png").mkdir()
    torch.save({"weights": torch.zeros(2)}, root / "model.pt")
    _bomb_png(root / "bomb.png")
    Image.new("RGB", (2000, 2000), (200, 120, 40)).save(root / "photo.png")
    Image.new("L", (5, 5), 255).save(root / "small_mask.png")
    Image.new("L", (32, 32), 0).save(root / "blank_mask.png")
    save_image(torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0)), root / "ref48.png")
    (root / "bad-sidecar").mkdir()
    save_image(torch.rand(1, 3, 32, 32), root / "bad-sidecar" / "m.png")
    (root / "bad-sidecar" / "m.json").write_text("{ not json")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "model_index.json").write_text("{}")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("mine")
    return root


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# (id, argv with {ws} for the workspace folder, a phrase the one line must contain)
RESTORE = ["restore", "--quiet", "--steps", "2"]
SIM = [*RESTORE, "--input", "{ws}/clean.png", "--simulate", "--output", "{ws}/out/o.png"]
CLI_CASES = [
    ("missing input", [*RESTORE, "--input", "{ws}/missing.png", "--output", "{ws}/out/o.png", "--task",
                       "denoise"], "missing.png"),
    ("text named .png", [*RESTORE, "--input", "{ws}/notes.png", "--output", "{ws}/out/o.png", "--task",
                         "denoise"], "notes.png"),
    ("empty file", [*RESTORE, "--input", "{ws}/empty.png", "--output", "{ws}/out/o.png", "--task", "denoise"],
     "empty.png"),
    ("folder as input", [*RESTORE, "--input", "{ws}/folder.png", "--output", "{ws}/out/o.png", "--task",
                         "denoise"], "folder.png"),
    ("decompression bomb", [*RESTORE, "--input", "{ws}/bomb.png", "--output", "{ws}/out/o.png", "--task",
                            "denoise"], "too large"),
    ("output not png", [*SIM[:-2], "--output", "{ws}/out/o.jpg", "--task", "denoise"], ".png"),
    ("output is a folder", [*SIM[:-2], "--output", "{ws}/folder.png", "--task", "denoise"], "folder.png"),
    ("output = input", [*RESTORE, "--input", "{ws}/y.png", "--output", "{ws}/y.png"], "would overwrite"),
    ("output = reference", [*RESTORE, "--input", "{ws}/y.png", "--reference", "{ws}/clean.png",
                            "--output", "{ws}/clean.png"], "would overwrite"),
    ("unknown task", [*SIM, "--task", "nope"], "nope"),
    ("unknown solver", [*SIM, "--task", "denoise", "--solver", "nope"], "unknown solver"),
    ("unknown model", [*SIM, "--task", "denoise", "--model", "no-such-model"], "no-such-model"),
    ("folder that is not a model", [*SIM, "--task", "denoise", "--model", "{ws}/not-a-model"], "not-a-model"),
    ("pickle as model", [*SIM, "--task", "denoise", "--model", "{ws}/model.pt"], "model.pt"),
    ("steps 0", [*SIM, "--task", "denoise", "--steps", "0"], "steps"),
    ("steps not a number", ["restore", "--quiet", *SIM[4:], "--task", "denoise", "steps=abc"], "steps"),
    ("negative noise sigma", [*SIM, "--task", "denoise", "noise.sigma=-1"], "sigma"),
    ("misspelt parameter", [*SIM, "--task", "denoise", "scal=0.3"], "unknown config key"),
    ("zero SR factor", [*SIM, "--task", "super_resolution", "operator.factor=0"], "factor"),
    ("negative blur size", [*SIM, "--task", "gaussian_blur", "operator.kernel_size=-3"], "kernel_size"),
    ("simulate without task", SIM, "--task"),
    ("measurement without sidecar or task", [*RESTORE, "--input", "{ws}/clean.png", "--output",
                                             "{ws}/out/o.png"], "--task"),
    ("task differs from the sidecar's", [*RESTORE, "--input", "{ws}/y.png", "--task", "denoise", "--output",
                                         "{ws}/out/o.png"], "gaussian_blur"),
    ("corrupt sidecar", [*RESTORE, "--input", "{ws}/bad-sidecar/m.png", "--output", "{ws}/out/o.png"],
     "m.json"),
    ("mask of the wrong size", [*SIM, "--task", "inpaint_mask", "--mask", "{ws}/small_mask.png"], "5x5"),
    ("empty mask", [*SIM, "--task", "inpaint_mask", "--mask", "{ws}/blank_mask.png"], "empty"),
    ("missing mask", [*SIM, "--task", "inpaint_mask", "--mask", "{ws}/nomask.png"], "nomask.png"),
    ("reference of another size", [*RESTORE, "--input", "{ws}/y.png", "--reference", "{ws}/ref48.png",
                                   "--output", "{ws}/out/o.png"], "48"),
    ("2000x2000 photo on the 32x32 model", [*SIM[:-2], "--output", "{ws}/out/o.png", "--input",
                                            "{ws}/photo.png", "--task", "denoise"], "trained on 32x32"),
    ("latent solver, pixel model", [*SIM, "--task", "denoise", "--solver", "psld", "--model", "emoji-pixel"],
     "emoji-pixel"),
    ("pixel solver, latent model", [*SIM, "--task", "denoise", "--solver", "dps", "--model", "emoji-sd"],
     "latent solvers"),
    ("degrade: output = input", ["degrade", "--input", "{ws}/clean.png", "--task", "denoise", "--output",
                                 "{ws}/clean.png"], "would overwrite"),
    ("degrade: unknown task", ["degrade", "--input", "{ws}/clean.png", "--task", "nope", "--output",
                               "{ws}/out/d.png"], "nope"),
    ("degrade: missing input", ["degrade", "--input", "{ws}/missing.png", "--task", "denoise", "--output",
                                "{ws}/out/d.png"], "missing.png"),
    ("restore-batch: missing folder", ["restore-batch", "--input-dir", "{ws}/nowhere", "--output-dir",
                                       "{ws}/out/batch", "--solver", "ddrm", "--quiet"], "nowhere"),
    ("convert: missing checkpoint", ["convert", "adm", "{ws}/missing.pt", "--out", "{ws}/out/adm"],
     "missing.pt"),
    ("convert: text as checkpoint", ["convert", "adm", "{ws}/notes.png", "--out", "{ws}/out/adm"],
     "notes.png"),
    ("convert: into a non-empty folder", ["convert", "adm", "{ws}/model.pt", "--out", "{ws}/nonempty"],
     "nonempty"),
    ("generate: steps 0", ["generate", "--prompt", "a face", "--steps", "0", "--output", "{ws}/out/g.png"],
     "steps"),
    ("invert: pixel model", ["invert", "--input", "{ws}/clean.png", "--model", "emoji-pixel", "--output",
                             "{ws}/out/i.png"], "emoji-pixel"),
]


@pytest.mark.parametrize("argv, needle", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(ws, capsys, argv, needle):
    before = _digests(ws)
    code = main([a.replace("{ws}", str(ws)) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("studio: error:"), err
    assert needle in lines[0], lines[0]
    assert _digests(ws) == before  # nothing written, nothing changed


def _api_cases():
    """(id, call(ws), phrase): the Python API's entry points given what researchers get wrong."""
    from models import as_prior, load_pixel_prior
    from solvers import dps, psld
    from studio.core.operators import make_operator
    from studio.workflows import degrade, restore
    from studio.workflows.editing import invert
    from studio.workflows.personalize import generate, personalize

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    blur = make_operator("gaussian_blur", kernel_size=5, sigma=1.0)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")

    def pixel_pipe():
        from diffusers import DDPMPipeline

        from studio.workflows import PixelRestorationPipeline

        return PixelRestorationPipeline.from_pipe(DDPMPipeline.from_pretrained("models/weights/emoji-pixel"))

    return [
        ("restore: NaN measurement", lambda ws: restore(nan, task="denoise", solver="ddrm", steps=2), "NaN"),
        ("restore: 2-D tensor", lambda ws: restore(x[0, 0], task="denoise", solver="ddrm", steps=2), "shape"),
        ("restore: unknown task", lambda ws: restore(x, task="nope", solver="ddrm"), "nope"),
        ("restore: unknown solver", lambda ws: restore(x, task="denoise", solver="nope"), "unknown solver"),
        ("restore: unknown model", lambda ws: restore(x, task="denoise", solver="ddrm", model="nope-model"),
         "nope-model"),
        ("restore: steps 0", lambda ws: restore(x, task="denoise", solver="ddrm", steps=0), "steps"),
        ("restore: misspelt parameter", lambda ws: restore(x, task="denoise", solver="ddrm", steps=2,
                                                           overrides=["etta=0.5"]), "etta"),
        ("restore: 2000x2000 on the 32x32 model",
         lambda ws: restore(torch.rand(1, 3, 2000, 2000), task="denoise", solver="ddrm", steps=2),
         "trained on 32x32"),
        ("restore: latent solver on a pixel model",
         lambda ws: restore(x, task="denoise", solver="psld", model="emoji-pixel", steps=2), "emoji-pixel"),
        ("degrade: unknown task", lambda ws: degrade(x, "nope"), "nope"),
        ("degrade: values outside [0, 1]", lambda ws: degrade(x * 5, "denoise"), "[0, 1]"),
        ("as_prior: not a model", lambda ws: as_prior(42), "int"),
        ("load_pixel_prior: a text-to-image model", lambda ws: load_pixel_prior("emoji-sd"),
         "latent solvers"),
        ("dps: a measurement the operator cannot have made",
         lambda ws: dps(torch.rand(1, 3, 7, 9), blur, "emoji-pixel", steps=2, x_shape=(1, 3, 32, 32)),
         "(3, 7, 9)"),
        ("psld: image size the VAE factor does not divide",
         lambda ws: psld(torch.rand(1, 3, 30, 30), blur, "emoji-sd", steps=2), "VAE factor"),
        ("pipeline: unknown output_type", lambda ws: pixel_pipe()(measurement=x, operator=blur, solver="ddrm",
                                                                  num_inference_steps=2, output_type="jpg"),
         "output_type"),
        ("pipeline: latent solver", lambda ws: pixel_pipe()(measurement=x, operator=blur, solver="psld"),
         "LatentRestorationPipeline"),
        ("invert: pixel model", lambda ws: invert(x, model="emoji-pixel"), "Stable-Diffusion-style"),
        ("generate: steps 0", lambda ws: generate("a face", steps=0), "steps"),
        ("personalize: no images", lambda ws: personalize([str(ws / "empty-folder")], steps=1),
         "empty-folder"),
    ]


API_CASES = _api_cases()


@pytest.mark.parametrize("call, needle", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(ws, call, needle):
    (ws / "empty-folder").mkdir(exist_ok=True)
    before = _digests(ws)
    with pytest.raises(StudioError) as err:
        call(ws)
    message = str(err.value)
    assert "\n" not in message.strip() and needle in message, message
    assert _digests(ws) == before


def test_the_table_is_large_enough():
    assert len(CLI_CASES) + len(API_CASES) >= 40 and len(CLI_CASES) >= 30
