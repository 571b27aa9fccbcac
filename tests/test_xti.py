"""Extended textual inversion (P+) on a tiny random SD-style pipeline: per-layer conditioning through the
attention-processor API, training only its own rows, the file, resume, loading back, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from models.layer_conditioning import cross_attention_layers, per_layer_conditioning
from studio.cli import main
from studio.core.errors import StudioError
from studio.training.textual_inversion import (TextualInversionConfig, add_learned_tokens, load_into,
                                               read_embedding_file, train_textual_inversion)
from studio.training.xti import encode_prompts, layer_prompts, layer_tokens, sample_per_layer
from studio.workflows import personalize
from tests.conftest import build_tiny_sd_pipeline


@pytest.fixture()
def images(concept_images):
    return [str(p) for p in sorted(concept_images.iterdir())]


def _unet_call(pipe, states: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(states.shape[0], 4, 8, 8, generator=g)
    with torch.no_grad():
        return pipe.unet(z, 500, encoder_hidden_states=states).sample


def test_layers_come_in_forward_order_and_the_processors_come_back():
    pipe = build_tiny_sd_pipeline()
    layers = cross_attention_layers(pipe.unet)
    groups = [name.split(".")[0] for name in layers]
    order = ["down_blocks", "mid_block", "up_blocks"]
    assert groups == sorted(groups, key=order.index) and "mid_block" in groups
    assert all(name.endswith("attn2.processor") for name in layers)
    before = dict(pipe.unet.attn_processors)
    states = encode_prompts(pipe, ["red heart"])
    with pytest.raises(RuntimeError, match="inside"):
        with per_layer_conditioning(pipe.unet, [states] * len(layers)):
            raise RuntimeError("inside")
    assert pipe.unet.attn_processors == before
    with pytest.raises(StudioError, match="one state per cross-attention layer"):
        with per_layer_conditioning(pipe.unet, [states]):
            pass


def test_every_layer_reading_the_same_states_is_the_plain_unet_and_one_layer_changes_it():
    pipe = build_tiny_sd_pipeline()
    heart, face = encode_prompts(pipe, ["red heart"]), encode_prompts(pipe, ["grinning face"])
    n_layers = len(cross_attention_layers(pipe.unet))
    plain = _unet_call(pipe, heart)
    with per_layer_conditioning(pipe.unet, [heart] * n_layers):
        assert torch.equal(_unet_call(pipe, face), plain)  # the layers' own states replace the context
    with per_layer_conditioning(pipe.unet, [heart] * (n_layers - 1) + [face]):
        changed = _unet_call(pipe, heart)
    assert not torch.allclose(changed, plain)
    # a classifier-free-guidance batch [uncond; cond]: only the conditional half is replaced
    null = encode_prompts(pipe, [""])
    with per_layer_conditioning(pipe.unet, [heart] * n_layers):
        guided = _unet_call(pipe, torch.cat([null, face]))
    torch.testing.assert_close(guided, _unet_call(pipe, torch.cat([null, heart])))


def _cfg(tmp_path, **kw):
    base = dict(placeholder="<x>", initializer="heart", steps=3, batch_size=2, per_layer=True,
                output_dir=str(tmp_path / "xti"), validate_every=0, checkpoint_every=1)
    return TextualInversionConfig(**{**base, **kw})


def _train(tmp_path, images, **kw):
    pipe = build_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    out = train_textual_inversion(pipe, images, _cfg(tmp_path, **kw), quiet=True)
    return pipe, before, out


def test_xti_trains_one_row_per_layer_and_nothing_else(tmp_path, images):
    pipe, before, out = _train(tmp_path, images)
    layers = cross_attention_layers(pipe.unet)
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert after.shape[0] == before.shape[0] + len(layers) and len(out["token_ids"]) == len(layers)
    assert torch.equal(after[: before.shape[0]], before)  # bit-identical
    rows = after[out["token_ids"]]
    init = before[pipe.tokenizer.convert_tokens_to_ids("heart</w>")]
    assert all(not torch.equal(r, init) for r in rows)  # every layer's row trained...
    assert all(not torch.allclose(rows[0], r) for r in rows[1:])  # ... to its own value
    assert pipe.tokenizer.convert_ids_to_tokens(out["token_ids"]) == layer_tokens("<x>", len(layers))
    with safe_open(out["embeddings"], framework="pt") as f:
        meta, stored = f.metadata(), f.get_tensor("<x>")
    assert meta["method"] == "xti" and json.loads(meta["layers"]) == layers
    torch.testing.assert_close(stored, rows)
    learned = read_embedding_file(out["embeddings"])
    assert learned.name == "<x>" and learned.layers == tuple(layers)
    with pytest.raises(StudioError, match="per-layer .XTI. embeddings, which diffusers"):
        load_into(build_tiny_sd_pipeline(), out["embeddings"])


def test_xti_resumes_exactly(tmp_path, images):
    _, _, straight = _train(tmp_path / "a", images, steps=4)
    _train(tmp_path / "b", images, steps=2)
    _, _, resumed = _train(tmp_path / "b", images, steps=4)
    assert resumed["step"] == 4
    torch.testing.assert_close(resumed["loss_history"], straight["loss_history"], rtol=1e-6, atol=1e-7)
    a, b = read_embedding_file(straight["embeddings"]), read_embedding_file(resumed["embeddings"])
    torch.testing.assert_close(a.rows, b.rows, rtol=1e-6, atol=1e-7)


def test_the_file_loads_back_to_identical_samples(tmp_path, images):
    pipe, _, out = _train(tmp_path, images)
    n_layers = len(cross_attention_layers(pipe.unet))
    assert layer_prompts("a <x> and a <x>", {"<x>": n_layers})[2] == "a <x>_layer2 and a <x>_layer2"
    kw = dict(n=2, steps=2, guidance=3.0)
    direct = sample_per_layer(pipe, "a <x>", {"<x>": n_layers}, generator=torch.Generator().manual_seed(5),
                              **kw)
    fresh = build_tiny_sd_pipeline()
    fresh.set_progress_bar_config(disable=True)
    loaded = personalize.generate("a <x>", embeddings=[out["embeddings"]], seed=5, pipe=fresh, **kw)
    assert torch.equal(loaded, direct)
    plain = personalize.generate("red heart", embeddings=[out["embeddings"]], seed=5, pipe=fresh, **kw)
    assert not torch.equal(plain, loaded)  # a prompt without the token samples without it


def test_xti_refuses_extra_vectors_and_another_models_layers(tmp_path, images):
    with pytest.raises(StudioError, match="num_vectors must be 1"):
        _train(tmp_path, images, num_vectors=2)
    _, _, out = _train(tmp_path, images, steps=1)
    learned = read_embedding_file(out["embeddings"])
    renamed = type(learned)(learned.name, learned.rows, tuple(n.replace("up_blocks", "down_blocks")
                                                              for n in learned.layers))
    with pytest.raises(StudioError, match="belongs to another model"):
        add_learned_tokens(build_tiny_sd_pipeline(), renamed)


def test_a_method_and_a_contradicting_option_are_refused(tmp_path, images):
    with pytest.raises(StudioError, match="'xti' sets per_layer=True, the options say per_layer=False"):
        personalize.personalize(images, model=None, method="xti", per_layer=False)


def test_cli_methods_are_the_workflows():
    from studio.cli.personalize import METHODS

    assert METHODS == tuple(personalize.METHODS) == tuple(personalize.METHOD_TITLES)


def test_cli_personalize_xti_and_generate(tmp_path, images, tiny_sd_model_dir):
    out = tmp_path / "xti"
    assert main(["personalize", "--method", "xti", "--images", *images, "--model", tiny_sd_model_dir,
                 "--token", "<x>", "--init", "heart", "--steps", "2", "--batch-size", "2", "--out", str(out),
                 "--quiet", "validate_every=0"]) == 0
    assert read_embedding_file(out / "learned_embeds.safetensors").layers is not None
    grid = tmp_path / "gen.png"
    assert main(["generate", "--prompt", "a <x>", "--model", tiny_sd_model_dir, "--embeddings",
                 str(out / "learned_embeds.safetensors"), "--n", "2", "--steps", "2", "--output",
                 str(grid)]) == 0
    assert grid.is_file()
