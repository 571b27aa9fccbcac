"""Loaded diffusers pipelines in (loaders, solvers, workflows: the very same modules, nothing copied) and
diffusers-native restoration pipelines out (``from_pipe``, output types, generator, save/load, errors)."""

from __future__ import annotations

import inspect
import json
import re
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from models import as_prior, load_pixel_prior
from models.base import DiffusionPrior
from models.latent_prior import LatentDiffusionPrior, load_latent_prior
from models.loading import load_prior
from solvers import SOLVERS, ddrm, dps, latent_dps, psld
from solvers.inversion import ddim_inversion
from studio.core.config import load_solver
from studio.core.errors import ModelLoadError, StudioError
from studio.core.io import load_image
from studio.core.operators import make_operator
from studio.workflows import (LatentRestorationPipeline, NewtonInversionPipeline, PixelRestorationPipeline,
                              restore)
from studio.workflows import editing, personalize
from studio.workflows.pipelines import RestorationPipelineOutput
from tests.conftest import build_tiny_pixel_pipeline

ROOT = Path(__file__).resolve().parent.parent
PIXEL_DIR = str(ROOT / "models/weights/emoji-pixel")
SD_DIR = str(ROOT / "models/weights/emoji-sd")


def _ddpm():
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(PIXEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SD_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ddpm():
    return _ddpm()


@pytest.fixture(scope="module")
def sd():
    return _sd()


def _pointers(*modules) -> list[tuple[str, int]]:
    return [(n, p.data_ptr()) for m in modules for n, p in m.named_parameters()]


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


BLUR = dict(kernel_size=9, sigma=1.5)


@pytest.fixture(scope="module")
def blur():
    return make_operator("gaussian_blur", **BLUR)


@pytest.fixture(scope="module")
def y32(blur):
    return blur.A(load_image(ROOT / "examples/emoji/000-32.png"))


@pytest.fixture(scope="module")
def y64(blur):
    return blur.A(load_image(ROOT / "examples/emoji/000-64.png"))


# ------------------------------------------------------------------------------------------ pipelines in


def test_loaders_use_the_pipelines_own_modules(ddpm, sd):
    pointers = _pointers(ddpm.unet), _pointers(sd.unet, sd.vae, sd.text_encoder)
    for prior in (load_pixel_prior(ddpm), load_prior(ddpm), as_prior(ddpm), as_prior(ddpm, latent=False)):
        assert type(prior).__name__ == "DiffusersPixelPrior" and prior.unet is ddpm.unet
        assert _pointers(prior.unet) == pointers[0]
        assert prior.source == PIXEL_DIR and prior.dtype == torch.float32
    for prior in (load_latent_prior(sd), load_prior(sd, latent=True), as_prior(sd),
                  as_prior(sd, latent=True)):
        assert isinstance(prior, LatentDiffusionPrior)
        parts = (prior.unet, prior.vae, prior.text_encoder, prior.tokenizer)
        assert parts == (sd.unet, sd.vae, sd.text_encoder, sd.tokenizer)
        assert _pointers(prior.unet, prior.vae, prior.text_encoder) == pointers[1]
        assert prior.source == SD_DIR
    prior = as_prior(ddpm)
    assert as_prior(prior) is prior and as_prior(prior, latent=True) is prior
    assert isinstance(as_prior("emoji-pixel"), DiffusionPrior)
    assert isinstance(as_prior(SD_DIR), LatentDiffusionPrior)  # a folder: its model_index.json tells
    assert load_pixel_prior(build_tiny_pixel_pipeline()).source == "DDPMPipeline"  # built in memory


def test_loader_errors_for_pipeline_objects_are_one_line(ddpm, sd):
    with pytest.raises(ModelLoadError) as err:
        load_pixel_prior(sd)
    assert "latent solvers" in _one_line(err)
    with pytest.raises(ModelLoadError) as err:
        load_latent_prior(ddpm)
    assert "not a Stable-Diffusion-style pipeline: no vae, text_encoder, tokenizer" in _one_line(err)
    with pytest.raises(ModelLoadError) as err:
        load_pixel_prior(types.SimpleNamespace(unet=ddpm.unet, scheduler=None))
    assert "has no unet + DDPM-type scheduler" in _one_line(err)
    with pytest.raises(ModelLoadError) as err:
        as_prior(42)
    assert "got a int" in _one_line(err)
    with pytest.raises(ModelLoadError):  # a latent model for a pixel solver
        dps(torch.zeros(1, 3, 32, 32), make_operator("denoise"), sd, steps=2)


def test_an_explicit_dtype_moves_the_pipeline_in_place_as_to_does():
    pipe = build_tiny_pixel_pipeline()
    prior = load_pixel_prior(pipe, dtype=torch.float64)
    assert prior.unet is pipe.unet and pipe.unet.dtype == torch.float64


def test_pixel_solvers_take_a_pipeline(ddpm, blur, y32):
    before = _pointers(ddpm.unet)
    prior = load_pixel_prior(ddpm)
    for solver in (dps, ddrm):
        a = solver(y32, blur, ddpm, steps=3, seed=0)
        b = solver(y=y32, operator=blur, prior=prior, steps=3, seed=0)  # keyword prior too
        assert torch.isfinite(a.x).all() and torch.equal(a.x, b.x)
    assert _pointers(ddpm.unet) == before


def test_latent_solvers_take_a_pipeline(sd, blur, y64):
    before = _pointers(sd.unet, sd.vae, sd.text_encoder)
    prior = load_latent_prior(sd)
    for solver in (latent_dps, psld):
        a = solver(y64, blur, sd, steps=3, seed=0, prompt="grinning face")
        b = solver(y64, blur, prior, steps=3, seed=0, prompt="grinning face")
        assert a.image.shape == (1, 3, 64, 64) and torch.equal(a.x, b.x)
    assert _pointers(sd.unet, sd.vae, sd.text_encoder) == before


def test_solver_signatures_are_still_the_config_schema():
    for name, info in SOLVERS.items():
        assert list(inspect.signature(info.fn).parameters)[:3] == ["y", "operator", "prior"]
        assert info.fn.__wrapped__.__name__ == info.fn.__name__
        load_solver(name)
    assert SOLVERS["dps"].fn is dps


def test_restore_takes_a_pipeline(ddpm, sd, blur, y32, y64):
    out = restore(y32, task="gaussian_blur", solver="dps", model=ddpm, operator=blur, steps=3)
    assert out.record["model_name"] == PIXEL_DIR and out.record["model"]["source"] == PIXEL_DIR
    assert out.record["device"] == "cpu" and out.image.shape == (1, 3, 32, 32)
    ref = restore(y32, task="gaussian_blur", solver="dps", model=PIXEL_DIR, operator=blur, steps=3)
    assert torch.equal(out.image, ref.image)
    out = restore(y64, task="gaussian_blur", solver="latent-dps", model=sd, operator=blur, steps=3)
    assert out.record["model_name"] == SD_DIR and torch.isfinite(out.image).all()
    with pytest.raises(StudioError) as err:
        restore(y32, task="gaussian_blur", solver="latent-dps", model=ddpm, operator=blur, steps=3)
    _one_line(err)


def test_inversion_and_editing_take_a_pipeline(sd):
    before = _pointers(sd.unet, sd.vae, sd.text_encoder)
    image = load_image(ROOT / "examples/emoji/000-64.png")
    inv = editing.invert(image, prompt="grinning face", method="newton", steps=3, model=sd)
    assert inv.record["model"]["source"] == SD_DIR and inv.reconstruction.shape == (1, 3, 64, 64)
    edited = editing.edit(image, source_prompt="grinning face", target_prompt="red heart", method="ddim",
                          steps=3, model=sd)
    assert torch.isfinite(edited.image).all()
    z0 = as_prior(sd).encode(image * 2 - 1)
    assert ddim_inversion(sd, z0, steps=3).z_start.shape == z0.shape  # the inverters take one too
    assert _pointers(sd.unet, sd.vae, sd.text_encoder) == before


def test_one_textual_inversion_step_trains_the_pipeline_in_place(tmp_path):
    pipe = _sd()
    unet_vae = _pointers(pipe.unet, pipe.vae)
    text_encoder = pipe.text_encoder
    frozen = [(n, p.data_ptr()) for n, p in text_encoder.named_parameters() if "token_embedding" not in n]
    images = torch.stack([load_image(ROOT / f"examples/emoji/00{i}-64.png")[0] for i in range(2)])
    out = personalize.personalize(images, model=pipe, placeholder="<x>", initializer="face", steps=1,
                                  batch_size=2, validate_every=0, checkpoint_every=1, quiet=True,
                                  output_dir=str(tmp_path / "ti"))
    assert out["step"] == 1 and Path(out["embeddings"]).is_file()
    assert "<x>" in pipe.tokenizer.get_vocab() and pipe.text_encoder is text_encoder
    assert _pointers(pipe.unet, pipe.vae) == unet_vae
    assert frozen == [(n, p.data_ptr()) for n, p in text_encoder.named_parameters()
                      if "token_embedding" not in n]
    # the model's card (emoji-sd: bare "{}" prompts) is found from the pipeline's folder
    assert json.loads((tmp_path / "ti" / "config.json").read_text())["templates"] == ["{}"]


def test_a_bfloat16_pipeline_stays_bfloat16(blur, y32, y64):
    sd = _sd().to(torch.bfloat16)
    before = _pointers(sd.unet, sd.vae, sd.text_encoder)
    prior = as_prior(sd)
    assert prior.unet_dtype == prior.vae_dtype == torch.bfloat16 == sd.text_encoder.dtype
    out = latent_dps(y64, blur, sd, steps=2, seed=0)
    assert torch.isfinite(out.x).all() and out.image.dtype == torch.float32
    pipe = LatentRestorationPipeline.from_pipe(sd)  # no cast either (diffusers' from_pipe would cast to fp32)
    assert pipe.unet is sd.unet and sd.unet.dtype == torch.bfloat16
    assert _pointers(sd.unet, sd.vae, sd.text_encoder) == before
    ddpm = _ddpm().to(torch.bfloat16)
    res = dps(y32, blur, ddpm, steps=2, seed=0)
    assert torch.isfinite(res.x).all() and ddpm.unet.dtype == torch.bfloat16


def test_from_pipe_keeps_mixed_dtypes_and_torch_dtype_goes_through_diffusers():
    sd = _sd()
    sd.unet.to(torch.bfloat16)  # the usual memory setup: UNet in half precision, VAE in float32
    pipe = LatentRestorationPipeline.from_pipe(sd)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    pipe = PixelRestorationPipeline.from_pipe(_ddpm(), torch_dtype=torch.float32)  # diffusers' own from_pipe
    assert isinstance(pipe, PixelRestorationPipeline) and pipe.config._name_or_path == PIXEL_DIR


# ----------------------------------------------------------------------------------------- pipelines out


def test_from_pipe_shares_the_modules(ddpm, sd):
    pixel = PixelRestorationPipeline.from_pipe(ddpm)
    assert pixel.unet is ddpm.unet and pixel.scheduler is ddpm.scheduler
    latent = LatentRestorationPipeline.from_pipe(sd)
    assert all(getattr(latent, k) is getattr(sd, k) for k in ("vae", "text_encoder", "tokenizer", "unet",
                                                               "scheduler"))
    assert NewtonInversionPipeline.from_pipe(sd).unet is sd.unet
    with pytest.raises(ModelLoadError) as err:
        LatentRestorationPipeline.from_pipe(ddpm)
    assert "has no text_encoder, tokenizer, vae (it is a DDPMPipeline)" in _one_line(err)
    with pytest.raises(ModelLoadError) as err:
        PixelRestorationPipeline.from_pipe(sd)
    _one_line(err)


def test_pixel_pipeline_output_types_and_reproducibility(ddpm, blur, y32):
    pipe = PixelRestorationPipeline.from_pipe(ddpm)
    pipe.set_progress_bar_config(disable=True)
    before = _pointers(ddpm.unet)

    def run(**kw):
        return pipe(measurement=kw.pop("measurement", y32), operator=blur, solver="dps",
                    num_inference_steps=3, generator=torch.Generator().manual_seed(0), **kw)

    pt = run(output_type="pt")
    assert isinstance(pt, RestorationPipelineOutput) and pt.images.shape == (1, 3, 32, 32)
    assert pt.record["params"]["seed"] == 0 and pt.record["task"] == "gaussian_blur"
    # a fresh manual_seed(0) generator is seed=0; the task's defaults (DPS scale 0.3 for blur) apply
    assert torch.equal(pt.images, dps(y32, blur, ddpm, steps=3, scale=0.3, seed=0).image.clamp(0, 1))
    assert torch.equal(run(output_type="pt").images, pt.images)
    arr = run(output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 32, 32, 3) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr[0], pt.images[0].permute(1, 2, 0).numpy())
    pil = run().images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (32, 32)
    images, record = run(output_type="pt", return_dict=False)
    assert torch.equal(images, pt.images) and record["solver"] == "dps"
    # diffusers' image inputs: PIL and numpy measurements (uint8 here, so all three are the same y)
    y8 = (y32 * 255).round() / 255
    ref = run(measurement=y8, output_type="pt").images
    as_pil = PIL.Image.fromarray((y8[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert torch.equal(run(measurement=as_pil, output_type="pt").images, ref)
    assert torch.equal(run(measurement=np.asarray(as_pil), output_type="pt").images, ref)
    # a used generator gives another (reproducible) sample
    g = torch.Generator().manual_seed(0)
    first = pipe(measurement=y32, operator=blur, num_inference_steps=3, generator=g, output_type="pt")
    second = pipe(measurement=y32, operator=blur, num_inference_steps=3, generator=g, output_type="pt")
    assert torch.equal(first.images, pt.images) and not torch.equal(second.images, first.images)
    assert _pointers(ddpm.unet) == before


def test_pipeline_operator_by_task_name_and_solver_params(ddpm, blur, y32):
    pipe = PixelRestorationPipeline.from_pipe(ddpm)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(measurement=y32, num_inference_steps=3, output_type="pt")
    by_name = pipe(operator="gaussian_blur", operator_options=BLUR,
                   generator=torch.Generator().manual_seed(0), **kw)
    by_object = pipe(operator=blur, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(by_name.images, by_object.images)
    ddrm_run = pipe(operator=blur, solver="ddrm", eta=0.5, noise_sigma=0.01, **kw)
    assert ddrm_run.record["params"]["eta"] == 0.5


def test_pipeline_bad_input_is_one_line(ddpm, sd, blur, y32):
    pipe = PixelRestorationPipeline.from_pipe(ddpm)
    cases = [
        dict(solver="nope"),  # unknown solver
        dict(solver="psld"),  # a latent solver on the pixel pipeline
        dict(measurement=torch.rand(1, 3, 16, 16), height=32, width=32),  # not what A makes of a 32x32 image
        dict(measurement=torch.rand(1, 1, 32, 32)),  # one channel for an RGB model
        dict(measurement="y.png"),
        dict(scale="big"),  # a bad solver parameter
        dict(prompt="a face"),  # not a dps parameter
        dict(output_type="latent"),
    ]
    for case in cases:
        kw = {"measurement": y32, "operator": blur, "num_inference_steps": 2, **case}
        with pytest.raises(StudioError) as err:
            pipe(**kw)
        _one_line(err)
    with pytest.raises(StudioError) as err:
        LatentRestorationPipeline.from_pipe(sd)(measurement=torch.rand(1, 3, 62, 62), operator=blur,
                                                num_inference_steps=2)
    assert "VAE factor" in _one_line(err)


def test_latent_pipeline_runs_with_prompt_and_guidance(sd, blur, y64):
    pipe = LatentRestorationPipeline.from_pipe(sd)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(measurement=y64, operator=blur, solver="psld", prompt="grinning face", guidance_scale=2.0,
               num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 64, 64) and out.record["model"]["prompt"] == "grinning face"
    assert out.record["params"]["guidance"] == 2.0
    ref = psld(y64, blur, sd, steps=3, prompt="grinning face", guidance=2.0, seed=0)
    assert torch.equal(out.images, ref.image.clamp(0, 1))


def test_save_pretrained_from_pretrained_round_trip(ddpm, sd, blur, y32, y64, tmp_path):
    kw = dict(operator=blur, num_inference_steps=2, output_type="pt")
    pixel = PixelRestorationPipeline.from_pipe(ddpm)
    pixel.save_pretrained(tmp_path / "pixel")
    loaded = PixelRestorationPipeline.from_pretrained(tmp_path / "pixel")
    assert type(loaded) is PixelRestorationPipeline and loaded.unet is not ddpm.unet
    run = [p(measurement=y32, generator=torch.Generator().manual_seed(3), **kw).images
           for p in (pixel, loaded)]
    assert torch.equal(*run)
    latent = LatentRestorationPipeline.from_pipe(sd)
    latent.save_pretrained(tmp_path / "latent")
    loaded = LatentRestorationPipeline.from_pretrained(tmp_path / "latent")
    run = [p(measurement=y64, generator=torch.Generator().manual_seed(3), **kw).images
           for p in (latent, loaded)]
    assert torch.equal(*run)
    # the saved folders are plain DDPMPipeline / StableDiffusionPipeline ones: any loader reads them
    from diffusers import DiffusionPipeline

    assert type(DiffusionPipeline.from_pretrained(tmp_path / "pixel")).__name__ == "DDPMPipeline"
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "latent")).__name__ == "StableDiffusionPipeline"
    assert load_pixel_prior(str(tmp_path / "pixel")).source == str(tmp_path / "pixel")
    assert isinstance(load_prior(str(tmp_path / "latent"), latent=True), LatentDiffusionPrior)
    # a registered name (a plain DDPMPipeline folder) loads as the restoration pipeline; the wrong kind not
    assert type(PixelRestorationPipeline.from_pretrained("emoji-pixel")) is PixelRestorationPipeline
    with pytest.raises(ModelLoadError) as err:
        PixelRestorationPipeline.from_pretrained(tmp_path / "latent")
    _one_line(err)


def test_newton_inversion_pipeline(sd):
    pipe = NewtonInversionPipeline.from_pipe(sd)
    image = PIL.Image.open(ROOT / "examples/emoji/000-64.png")
    out = pipe(image=image, prompt="grinning face", num_inference_steps=3, output_type="pt")
    assert out.latents.shape == (1, 4, 16, 16) and out.images.shape == (1, 3, 64, 64)
    assert out.record["method"] == "newton" and out.record["metrics"]["psnr"] > 10
    again = pipe(image=image, prompt="grinning face", num_inference_steps=3, output_type="pt")
    assert torch.equal(again.latents, out.latents)
    with pytest.raises(StudioError) as err:
        pipe(image=image, num_inference_steps=3, newton_step=1)
    assert "unknown newton parameter" in _one_line(err)


def test_readme_bring_your_own_pipeline_block_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Bring your own pipeline"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = re.sub(r"steps=50", "steps=2", code).replace('"my-restorer"', repr(str(tmp_path / "my-restorer")))
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["images"][0].size == (32, 32) and scope["x"].shape == (1, 3, 64, 64)
    reloaded = PixelRestorationPipeline.from_pretrained(tmp_path / "my-restorer")
    assert type(reloaded) is PixelRestorationPipeline


def test_flow_restoration_pipeline_shares_an_sd3_pipeline_and_runs_flair(tiny_sd3_model_dir, tmp_path):
    """An SD3-style pipeline (no T5) in: from_pipe shares its modules, the call equals the solver function on
    the same modules, P2L is refused in one line, and a saved folder is a plain StableDiffusion3Pipeline one
    that loads back to the same output."""
    from diffusers import StableDiffusion3Pipeline
    from solvers import flair
    from studio.training.tokenizer import save_clip_tokenizer
    from studio.workflows import FlowRestorationPipeline

    sd3 = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model_dir, text_encoder_3=None, tokenizer_3=None)
    pipe = FlowRestorationPipeline.from_pipe(sd3)
    assert pipe.transformer is sd3.transformer and pipe.vae is sd3.vae and pipe.text_encoder_3 is None
    pipe.set_progress_bar_config(disable=True)
    sr = make_operator("super_resolution", factor=2)
    y = sr.A(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    kw = dict(measurement=y, operator=sr, num_inference_steps=3, output_type="pt", prompt="red heart",
              data_lr=0.5)  # (given: an operator of a task takes the task's defaults, SR's data_lr 1.33)
    out = pipe(generator=torch.Generator().manual_seed(1), **kw)
    ref = flair(y, sr, sd3, steps=3, prompt="red heart", seed=1, data_lr=0.5)
    assert out.images.shape == (1, 3, 64, 64) and torch.equal(out.images, ref.image.clamp(0, 1))
    assert out.record["solver"] == "flair" and out.record["model"]["prompt"] == "red heart"
    with pytest.raises(StudioError, match="p2l.*flow") as err:
        pipe(solver="p2l", **{k: v for k, v in kw.items() if k != "data_lr"})
    assert "\n" not in str(err.value)
    pipe.save_pretrained(tmp_path / "saved")
    for name in ("tokenizer", "tokenizer_2"):
        save_clip_tokenizer(getattr(pipe, name), tmp_path / "saved" / name)
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusion3Pipeline"
    loaded = FlowRestorationPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is FlowRestorationPipeline
    assert torch.equal(loaded(generator=torch.Generator().manual_seed(1), **kw).images, out.images)
