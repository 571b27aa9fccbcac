"""TReg (regularization by texts) on a tiny random SD-style pipeline, with a tiny random CLIP for the adaptive
negation."""

from __future__ import annotations

import pytest
import torch

from models.latent_prior import load_latent_prior
from solvers import SOLVERS, get_solver
from solvers.treg import clip_image_features, negate_null, null_similarity
from studio.core.conventions import to_image
from studio.core.errors import StudioError
from studio.core.noise import GaussianNoise, measure
from studio.core.operators import FunctionOperator
from studio.core.tasks import build_operator

TASKS = [{"name": "inpaint_box", "box_size": 0.5}, {"name": "super_resolution", "factor": 4}]
treg = get_solver("treg").fn


@pytest.fixture(scope="module")
def prior(tiny_sd_model_dir):
    return load_latent_prior(tiny_sd_model_dir)


@pytest.fixture(scope="module")
def tiny_clip(prior):
    """A random transformers CLIPModel whose image embeddings have the tiny text encoder's width."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(tower, vocab_size=len(prior.tokenizer), max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(tower, image_size=32, patch_size=8),
                        projection_dim=prior.embed("").shape[-1])
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def _problem(task, decoder_of=None, size=(32, 32)):
    """(x, operator, y): x random with noise 0.01, or (``decoder_of`` a prior) a noiseless image its decoder
    can produce."""
    if decoder_of is None:
        x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    else:
        with torch.no_grad():
            z = torch.randn(1, 4, size[0] // 4, size[1] // 4, generator=torch.Generator().manual_seed(5))
            x = to_image(decoder_of.decode(z)).clamp(0, 1)
    op = build_operator(task, size, 0, None)
    sigma = 0.01 if decoder_of is None else 0.0
    return x, op, measure(x, op, GaussianNoise(sigma), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("task", TASKS)
def test_treg_runs_and_is_reproducible_by_seed(prior, task):
    x, op, y = _problem(task)
    a, b, c = (treg(y, op, prior, steps=6, prompt="red heart", seed=s) for s in (3, 3, 4))
    assert a.image.shape == x.shape and a.x.shape == (1, 4, 8, 8)
    assert 0 <= a.image.min() and a.image.max() <= 1 and not (a.x.requires_grad or a.image.requires_grad)
    assert torch.equal(a.image, b.image) and not torch.equal(a.image, c.image)
    # CFG: two UNet passes per step; data consistency at steps 0 and 3 (< 0.85 x 6); no negation without CLIP
    assert a.record["nfe"] == 12 and a.record["grad_nfe"] == 0 and a.record["consistency_steps"] == 2
    assert a.record["adaptive_negation"] is False and "null_similarity" not in a.record


@pytest.mark.parametrize("task", TASKS)
def test_the_data_consistency_step_lowers_the_residual(prior, task):
    x, op, y = _problem(task, decoder_of=prior)
    with_dc = treg(y, op, prior, steps=8, seed=0).record["residual"][0]
    without = treg(y, op, prior, steps=8, seed=0, dc_every=0).record["residual"][0]
    assert with_dc < 0.95 * without


def test_the_prompt_changes_the_result_and_the_prior_keeps_its_own(prior):
    x, op, y = _problem(TASKS[0])
    prior.set_prompt("grinning face", 2.0)
    stored = (prior.prompt, prior.guidance, prior.cond.clone(), prior.uncond.clone())
    heart = treg(y, op, prior, steps=6, prompt="red heart", seed=0)
    face = treg(y, op, prior, steps=6, prompt="grinning face", seed=0)
    assert (heart.image - face.image).abs().max() > 1e-3
    assert (prior.prompt, prior.guidance) == stored[:2]
    assert torch.equal(prior.cond, stored[2]) and torch.equal(prior.uncond, stored[3])
    prior.set_prompt("")
    # equal prompt and null text without CLIP: CFG is the one branch, one UNet pass per step
    assert treg(y, op, prior, steps=6, negative_prompt="", seed=0).record["nfe"] == 6


def test_adaptive_negation_moves_the_null_text_away_from_the_image(prior, tiny_clip):
    x, op, y = _problem(TASKS[1])
    plain = treg(y, op, prior, steps=6, prompt="red heart", seed=0)
    negated = treg(y, op, prior, steps=6, prompt="red heart", seed=0, clip=tiny_clip)
    rec = negated.record
    assert rec["adaptive_negation"] is True and rec["params"]["clip"] == "CLIPModel" and rec["null_drift"] > 0
    pairs = rec["null_similarity"]  # [before, after] per negation (at the 2 consistency steps)
    assert len(pairs) == 2 and all(after < before for before, after in pairs)
    assert not torch.equal(plain.image, negated.image)  # the negated null text steers the CFG


def test_negation_steps_lower_the_similarity_by_about_lr_per_entry(prior, tiny_clip):
    """The loss is linear in u, so each Adam step moves every entry by about lr against sign(f)."""
    x, _, _ = _problem(TASKS[0])
    features = clip_image_features(tiny_clip, x)
    assert features.shape == (1, prior.embed("").shape[-1])
    torch.testing.assert_close(features.norm(dim=1), torch.ones(1))
    uc = prior.embed("red heart").float()
    new = negate_null(features, uc, lr=1e-3, iters=10)
    assert float(null_similarity(features, new)) < float(null_similarity(features, uc))
    torch.testing.assert_close(uc - new, 1e-2 * features.sign()[:, None, :].expand_as(uc), rtol=1e-3,
                               atol=1e-6)


def test_clip_may_be_a_callable_and_must_match_the_text_width(prior):
    x, op, y = _problem(TASKS[0])
    width = prior.embed("").shape[-1]
    out = treg(y, op, prior, steps=3, seed=0, clip=lambda img: img.mean((2, 3)).repeat(1, width)[:, :width])
    assert out.record["adaptive_negation"] is True and out.record["null_drift"] > 0
    with pytest.raises(StudioError, match="clip model's image embeddings have 3 entries"):
        treg(y, op, prior, steps=3, seed=0, clip=lambda img: img.mean((2, 3)))


@pytest.mark.parametrize("bad, name", [({"guidance": -1.0}, "guidance"), ({"dc_every": -1}, "dc_every"),
                                       ({"dc_until": 1.5}, "dc_until"), ({"prox_weight": 0.0}, "prox_weight"),
                                       ({"cg_iters": 0}, "cg_iters"), ({"null_lr": -1.0}, "null_lr"),
                                       ({"null_steps": -1}, "null_steps"), ({"dps_scale": -1.0}, "dps_scale"),
                                       ({"clip": "openai/clip-vit-large-patch14"}, "clip"),
                                       ({"steps": 0}, "steps")])
def test_bad_parameters_are_one_clear_error(prior, bad, name):
    x, op, y = _problem(TASKS[0])
    with pytest.raises(StudioError, match=name):
        treg(y, op, prior, **bad)


def test_nonlinear_operators_and_flow_priors_are_refused(prior):
    x, op, y = _problem(TASKS[0])
    nonlinear = FunctionOperator(lambda v: v.clamp(0, 1) ** 2, name="square")
    with pytest.raises(StudioError, match="treg needs a linear operator"):
        treg(y, nonlinear, prior, steps=2, x_shape=(3, 32, 32))
    info = SOLVERS["treg"]
    assert info.needs_linear and info.latent and not info.flow and info.takes_prompt


def test_dps_branch_and_the_callback_sees_decoded_images(prior):
    x, op, y = _problem(TASKS[1])
    seen = []
    out = treg(y, op, prior, steps=6, seed=0, dps=True, callback=lambda i, n, z, x0: seen.append((z, x0)))
    assert len(seen) == 6 and all(z.shape == (1, 4, 8, 8) and x0.shape == (1, 3, 32, 32) for z, x0 in seen)
    assert not any(z.requires_grad or x0.requires_grad for z, x0 in seen)
    # 2 consistency steps with CFG (2 passes), 4 DPS steps on the null branch (1 pass with a backward)
    assert out.record["nfe"] == 2 * 2 + 4 and out.record["grad_nfe"] == 4
    assert not torch.equal(out.image, treg(y, op, prior, steps=6, seed=0).image)
