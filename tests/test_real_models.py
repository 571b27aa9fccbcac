"""Models at their real configurations (issue 21): the random-weight replicas the real-size benchmark runs
on, the real CLIP vocabulary, and the guard rails for models and images that do not fit each other."""

from __future__ import annotations

import pytest
import torch

from models.base import DiffusionPrior
from models.loading import load_prior
from solvers import SOLVERS
from studio.core.errors import StudioError
from studio.core.operators import make_operator
from studio.eval.realsize import Case, applicable_options, default_cases, write_tables


def _has_open_clip_vocab() -> bool:
    try:
        from models.replicas import clip_bpe_path

        clip_bpe_path()
        return True
    except Exception:
        return False


needs_vocab = pytest.mark.skipif(not _has_open_clip_vocab(), reason="open-clip-torch wheel not installed")


@needs_vocab
def test_clip_tokenizer_has_the_real_vocabulary():
    from models.replicas import clip_tokenizer

    tok = clip_tokenizer()
    assert len(tok) == 49408
    # ids of the released CLIP / SD tokenizer (openai/clip-vit-large-patch14)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("an astronaut riding a horse").input_ids[1:-1] == [550, 18376, 6765, 320, 4558]
    sd2 = clip_tokenizer("!")
    assert sd2("a", padding="max_length", max_length=5).input_ids == [49406, 320, 49407, 0, 0]


@pytest.mark.slow
@needs_vocab
def test_sd15_replica_has_the_real_parameter_counts():
    from models.replicas import stable_diffusion

    pipe = stable_diffusion("sd-1.5")
    counts = {k: sum(p.numel() for p in getattr(pipe, k).parameters())
              for k in ("unet", "vae", "text_encoder")}
    # the released runwayml/stable-diffusion-v1-5 components
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


@pytest.mark.slow
@needs_vocab
def test_sd2_v_prediction_replica_runs_the_latent_solvers():
    """SD 2.1-768 (OpenCLIP-H text encoder, v-prediction) through latent DPS and PSLD: one step each at
    256² (the networks are convolutional; 768² costs minutes per step on a CPU)."""
    from models.replicas import stable_diffusion

    prior = load_prior(stable_diffusion("sd-2.1-768"), latent=True)
    assert prior.prediction_type == "v_prediction" and prior.image_size == 768
    assert prior.embed("a cat").shape == (1, 77, 1024)
    op = make_operator("super_resolution", factor=4, mode="avgpool")
    y = op.A(torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)))
    for solver in ("latent-dps", "psld"):
        out = SOLVERS[solver].fn(y, op, prior, steps=1, seed=0, x_shape=(1, 3, 256, 256))
        assert out.image.shape == (1, 3, 256, 256) and torch.isfinite(out.image).all()


@pytest.mark.slow
@needs_vocab
def test_neti_conditions_the_sd15_replica_in_its_16_layers():
    """NeTI's mapper on SD 1.5's real layout: the 16 cross-attention layers in call order (6 down, mid, 9
    up, as the official code counts them), 768-d rows, and the pipeline's own guided sampler at 256²."""
    from models.neti import initial_mapper
    from models.replicas import stable_diffusion
    from studio.training.neti import sample_neti
    from studio.training.textual_inversion import TextualInversionConfig, add_tokens, initializer_id

    pipe = stable_diffusion("sd-1.5")
    pipe.set_progress_bar_config(disable=True)
    add_tokens(pipe.tokenizer, pipe.text_encoder, TextualInversionConfig(placeholder="<cat-toy>"))
    mapper = initial_mapper(pipe, initializer_id(pipe.tokenizer, "toy"), seed=0)
    layers = mapper.config.layers
    assert len(layers) == 16 and mapper.config.token_dim == 768
    assert [name.split(".")[0] for name in layers] == ["down_blocks"] * 6 + ["mid_block"] + ["up_blocks"] * 9
    kw = dict(n=1, steps=1, guidance=7.5, size=256)
    full = sample_neti(pipe, "a photo of a <cat-toy>", "<cat-toy>", mapper,
                       generator=torch.Generator().manual_seed(0), **kw)
    cut = sample_neti(pipe, "a photo of a <cat-toy>", "<cat-toy>", mapper,
                      generator=torch.Generator().manual_seed(0), truncation=0, **kw)
    assert full.shape == (1, 3, 256, 256) and torch.isfinite(full).all() and not torch.equal(full, cut)


# ------------------------------------------------------------------------------------------------ guard rails


def test_a_photo_far_larger_than_the_pixel_model_is_refused_naming_the_size():
    prior = load_prior("emoji-pixel")
    op = make_operator("super_resolution", factor=4, mode="avgpool")
    y = op.A(torch.rand(1, 3, 512, 512))
    with pytest.raises(StudioError, match=r"trained on 32x32 images and the image is 512x512"):
        SOLVERS["dps"].fn(y, op, prior, steps=2, seed=0)
    prior.check_image_size(64, 48)  # up to twice the trained size runs as it is


def test_latent_model_refuses_sizes_its_vae_cannot_take():
    prior = load_prior("emoji-sd", latent=True)
    with pytest.raises(StudioError, match="not divisible by this model's VAE factor 4"):
        prior.latent_shape((1, 3, 66, 64))
    with pytest.raises(StudioError, match="trained on 64x64 images and the image is 512x512"):
        prior.latent_shape((1, 3, 512, 512))


def test_latent_model_for_a_pixel_solver_is_refused_with_the_solvers_that_fit(tmp_path):
    from studio.workflows import restore

    with pytest.raises(StudioError, match="latent solvers"):
        restore(torch.rand(1, 3, 8, 8), task="super_resolution", solver="dps", model="emoji-sd", steps=2,
                overrides=["operator.factor=4"])


def test_analytic_priors_take_any_size():
    assert DiffusionPrior.trained_image_size(object()) is None


# ------------------------------------------------------------------------------------------------ the bench


def test_bench_cases_apply_each_option_only_where_it_can_act():
    cases = default_cases()
    assert ("adm-ffhq-256", "ddrm", "grad-ckpt") not in {(c.model, c.job, c.option) for c in cases}
    assert applicable_options("sd-1.5", "newton-inversion", "cpu") == ("none", "bf16", "attn-classic",
                                                                       "attn-slicing")
    assert applicable_options("sd-1.5", "psld", "cuda") == ("none", "fp16", "grad-ckpt", "attn-classic",
                                                            "attn-slicing")
    # the classic (materialised) attention is the baseline of slicing, run only when asked for
    assert "attn-classic" not in {c.option for c in cases}
    assert [c.option for c in default_cases(jobs=("psld",), options=("attn-classic",))] == ["attn-classic"]
    assert applicable_options("sd-1.5", "vae", "cpu") == ("none", "vae-slicing")
    with pytest.raises(StudioError, match="unknown job or option: nope"):
        default_cases(options=("nope",))


def test_bench_tables_name_every_case(tmp_path):
    memory = {"loaded_rss_mb": 4096.0, "peak_increase_mb": 1024.0, "peak_mb": 5120.0, "step_s": [3.0, 2.0]}
    recs = [{**Case("sd-1.5", "psld", o).__dict__, "key": o, "s_per_step": 2.0, **memory}
            for o in ("none", "bf16")]
    recs.append({**Case("sd-1.5", "p2l", "none").__dict__, "key": "x", "error": "exit 1: boom"})
    write_tables(recs, tmp_path, "studio bench-real-size")
    md = (tmp_path / "results.md").read_text()
    assert "| sd-1.5 | psld | 2.00 s · 5.00 GB | 2.00 s · 5.00 GB |" in md
    assert "| sd-1.5 | p2l | failed | not run |" in md and "exit 1: boom" in md  # bf16 acts on p2l
