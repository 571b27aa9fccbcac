"""Textual inversion on a tiny random SD-style pipeline: rows, files, resume, accelerate, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.training.textual_inversion import TextualInversionConfig, read_embeddings, train_textual_inversion
from studio.workflows import personalize
from studio.cli import main
from studio.core.errors import StudioError
from tests.conftest import build_tiny_sd_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def images(concept_images) -> Path:
    return concept_images


def _cfg(tmp_path, **kw):
    base = dict(placeholder="<x>", initializer="heart", steps=3, batch_size=2,
                output_dir=str(tmp_path / "ti"), validate_every=0, checkpoint_every=1)
    return TextualInversionConfig(**{**base, **kw})


def _train(tmp_path, images, **kw):
    pipe = build_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    out = train_textual_inversion(pipe, [str(p) for p in sorted(images.iterdir())], _cfg(tmp_path, **kw),
                                  quiet=True)
    return pipe, before, out


def test_only_the_new_rows_change_and_diffusers_loads_the_file(tmp_path, images):
    pipe, before, out = _train(tmp_path, images, num_vectors=2)
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert after.shape[0] == before.shape[0] + 2
    assert out["token_ids"] == [before.shape[0], before.shape[0] + 1]
    assert torch.equal(after[: before.shape[0]], before)  # bit-identical
    init = before[pipe.tokenizer.convert_tokens_to_ids("heart</w>")]
    assert not torch.equal(after[-1], init)  # the new rows did train
    stored = load_file(out["embeddings"])
    assert list(stored) == ["<x>"] and stored["<x>"].shape == (2, before.shape[1])
    fresh = build_tiny_sd_pipeline()
    fresh.load_textual_inversion(out["embeddings"])  # diffusers' own loader, multi-vector → <x>, <x>_1
    assert fresh.tokenizer.convert_tokens_to_ids(["<x>", "<x>_1"]) == out["token_ids"]
    torch.testing.assert_close(fresh.text_encoder.get_input_embeddings().weight[-2:], after[-2:])


@pytest.mark.parametrize("kw", [{}, {"cross_init": True, "num_vectors": 2}], ids=["plain", "cross-init"])
def test_resume_continues_the_exact_step_count(tmp_path, images, kw):
    _, _, straight = _train(tmp_path / "a", images, steps=4, **kw)
    _train(tmp_path / "b", images, steps=2, **kw)
    _, _, resumed = _train(tmp_path / "b", images, steps=4, **kw)
    assert resumed["step"] == 4 and len(resumed["loss_history"]) == 4
    torch.testing.assert_close(resumed["loss_history"], straight["loss_history"], rtol=1e-6, atol=1e-7)
    a, b = load_file(straight["embeddings"]), load_file(resumed["embeddings"])
    torch.testing.assert_close(a["<x>"], b["<x>"], rtol=1e-6, atol=1e-7)


def _encoder_outputs(pipe, text: str) -> torch.Tensor:
    """The text encoder's (final-layer-norm) outputs for ``text`` with bos/eos, unpadded: (L, D)."""
    with torch.no_grad():
        return pipe.text_encoder(pipe.tokenizer(text, return_tensors="pt").input_ids)[0][0].float()


def test_cross_init_starts_each_vector_from_the_encoder_output_at_its_position(tmp_path, images):
    """As the official ``token_cross_init`` with the initializer as every initializer token: vector k starts
    at the encoder's output at position k of ``"heart heart"`` (after bos), one target per vector."""
    from studio.training.textual_inversion import cross_init_target

    pipe = build_tiny_sd_pipeline()
    expected = _encoder_outputs(pipe, "heart heart")[1:3]
    target = cross_init_target(pipe.tokenizer, pipe.text_encoder, "heart", 2)
    assert target.shape == (2, expected.shape[1])
    torch.testing.assert_close(target, expected)
    assert not torch.allclose(target[0], target[1])  # its own target per vector, not one shared
    torch.testing.assert_close(cross_init_target(pipe.tokenizer, pipe.text_encoder, "heart"),
                               _encoder_outputs(pipe, "heart")[1:2])  # one vector: "heart" alone
    _, _, out = _train(tmp_path, images, cross_init=True, num_vectors=2, steps=1, lr=1e-9)
    torch.testing.assert_close(load_file(out["embeddings"])["<x>"], expected, rtol=1e-4, atol=1e-6)


def test_cross_init_regulariser_is_the_official_mean_unsquared_distance(tmp_path, images, monkeypatch):
    """With the diffusion loss zeroed, the training loss is the regulariser alone: the official
    ``1e-5 · mean_k ‖v_k − t_k‖₂`` (default weight) with t_k each vector's own target."""
    from studio.training import textual_inversion as ti

    assert TextualInversionConfig().cross_init_reg == 1e-5  # the official --reg_weight default
    monkeypatch.setattr(ti, "diffusion_loss", lambda unet, noising, lat, cond, t, noise: cond.sum() * 0)
    pipe = build_tiny_sd_pipeline()
    targets = _encoder_outputs(pipe, "heart heart")[1:3]
    rows, losses = {}, {}

    def record(step, total, loss):
        ids = pipe.tokenizer.convert_tokens_to_ids(["<x>", "<x>_1"])
        rows[step] = pipe.text_encoder.get_input_embeddings().weight[ids].detach().clone()
        losses[step] = loss

    train_textual_inversion(pipe, [str(p) for p in sorted(images.iterdir())],
                            _cfg(tmp_path, cross_init=True, num_vectors=2, steps=3, lr=0.05), quiet=True,
                            callback=record)
    for step in (2, 3):  # the loss of a step is taken on the rows the previous step left
        dist = torch.linalg.vector_norm(rows[step - 1] - targets, dim=-1)
        assert dist.min() > 1e-3  # the rows moved, so the check is not of the 1e-6 guard alone
        assert losses[step] == pytest.approx(1e-5 * float(dist.mean()), rel=1e-3)
    # the same, through the function the loss uses, on arbitrary rows
    v = targets + torch.randn(targets.shape, generator=torch.Generator().manual_seed(0))
    expected = 1e-5 * torch.linalg.vector_norm(v - targets, dim=-1).mean()
    torch.testing.assert_close(ti.cross_init_regulariser(v, targets, 1e-5), expected, rtol=1e-4, atol=0)


def test_reads_a1111_layout_and_generates(tmp_path, images):
    _, _, out = _train(tmp_path, images)
    rows = load_file(out["embeddings"])["<x>"]
    a1111 = tmp_path / "a1111.safetensors"
    save_file({"emb_params": rows}, str(a1111), metadata={"name": "<y>"})
    name, read = read_embeddings(a1111)
    assert name == "<y>" and torch.equal(read, rows)
    pipe = build_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    imgs = personalize.generate("a picture of a <y>", pipe=pipe, embeddings=[str(a1111)], n=2, steps=2)
    assert imgs.shape == (2, 3, 64, 64) and "<y>" in pipe.tokenizer.get_vocab()


def test_bad_input_messages(tmp_path, images):
    with pytest.raises(StudioError, match="already exists"):
        _train(tmp_path, images, placeholder="heart")
    with pytest.raises(StudioError, match="batch_size 8 is larger than the 4 training images"):
        _train(tmp_path, images, batch_size=8)
    with pytest.raises(StudioError, match="fp16 training needs a CUDA GPU"):
        _train(tmp_path, images, mixed_precision="fp16")
    with pytest.raises(StudioError, match="one token"):
        _train(tmp_path, images, initializer="grinning face")
    (images / "notes.png").write_text("not an image")
    with pytest.raises(StudioError, match="notes.png"):
        train_textual_inversion(build_tiny_sd_pipeline(), [str(p) for p in sorted(images.iterdir())],
                                _cfg(tmp_path), quiet=True)
    with pytest.raises(StudioError, match="unknown personalization option 'bogus'"):
        personalize.make_config({"bogus": 1})


def test_cli_personalize_and_generate(tmp_path, images, tiny_sd_model_dir, capsys):
    out = tmp_path / "ti"
    assert main(["personalize", "--images", str(images), "--model", tiny_sd_model_dir, "--token", "<x>",
                 "--init", "heart", "--steps", "2", "--batch-size", "2", "--out", str(out), "--quiet",
                 "validate_every=0"]) == 0
    grid = tmp_path / "gen.png"
    assert main(["generate", "--prompt", "a <x>", "--model", tiny_sd_model_dir, "--embeddings",
                 str(out / "learned_embeds.safetensors"), "--n", "2", "--steps", "2", "--output",
                 str(grid)]) == 0
    assert grid.is_file() and grid.with_suffix(".json").is_file()


@pytest.mark.parametrize("method", ["ti", "neti"])  # NeTI: the mapper, not the text encoder, is prepared
def test_two_process_accelerate_launch(tmp_path, images, tiny_sd_model_dir, method):
    """`accelerate launch` with 2 CPU processes (torchrun + gloo) completes a few steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "studio.cli", "personalize",
           "--images", str(images), "--model", tiny_sd_model_dir, "--token", "<x>", "--init", "heart",
           "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "ti"), "--quiet", "validate_every=0",
           "--method", method]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "on 2 process(es)" in res.stdout and res.stdout.count("wrote") == 1
    assert (tmp_path / "ti" / "learned_embeds.safetensors").is_file()


def test_personalize_trains_on_the_models_declared_template(tmp_path, images, tiny_sd_model_dir):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_model_dir, folder)
    (folder / "card.json").write_text(json.dumps({"prompt_template": "{}"}))
    kw = dict(model=str(folder), placeholder="<x>", initializer="heart", steps=1, batch_size=2,
              validate_every=0, quiet=True)
    personalize.personalize([str(images)], output_dir=str(tmp_path / "a"), **kw)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["templates"] == ["{}"]
    # the given template wins
    personalize.personalize([str(images)], output_dir=str(tmp_path / "b"), templates="a {}", **kw)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["templates"] == ["a {}"]
    personalize.personalize([str(images)], model=tiny_sd_model_dir, output_dir=str(tmp_path / "c"),
                            **{k: v for k, v in kw.items() if k != "model"})
    assert json.loads((tmp_path / "c" / "config.json").read_text())["templates"] == []  # no card: by property


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_target_follows_the_prediction_type(prediction_type):
    """The textual-inversion loss compares the UNet output with the target of the scheduler's prediction
    type: noise, velocity, or the clean latents for ``sample`` (once scored as if it were v-prediction)."""
    from diffusers import DDIMScheduler

    from studio.training.objective import forward_process
    from studio.training.textual_inversion import diffusion_loss

    class FixedOutput(torch.nn.Module):
        dtype = torch.float32

        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, z_t, t, encoder_hidden_states):
            return type("Out", (), {"sample": self.out})()

    g = torch.Generator().manual_seed(0)
    latents, noise, out = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([10, 500, 990])
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    noising = forward_process(scheduler.config)
    loss = diffusion_loss(FixedOutput(out), noising, latents, torch.zeros(3, 2, 4), t, noise)
    expected = {"epsilon": noise, "v_prediction": noising.get_velocity(latents, noise, t),
                "sample": latents}[prediction_type]
    assert torch.equal(loss, torch.nn.functional.mse_loss(out, expected))
