"""NeTI on a tiny random SD-style pipeline: the mapper (norm, truncation, nested dropout), keys and values
per layer through the attention-processor API, training only the mapper, resume, the file, loading back,
the refusals and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from models.layer_conditioning import cross_attention_layers, per_layer_conditioning
from models.neti import encode_with_rows, initial_mapper, neti_conditioning
from studio.cli import main
from studio.core.errors import StudioError
from studio.training.neti import prompt_ids, sample_neti
from studio.training.textual_inversion import (TextualInversionConfig, add_learned_tokens, load_into,
                                               read_embedding_file, train_textual_inversion)
from studio.training.xti import encode_prompts
from studio.workflows import personalize
from tests.conftest import build_tiny_sd_pipeline


@pytest.fixture()
def images(concept_images):
    return [str(p) for p in sorted(concept_images.iterdir())]


def _heart(pipe) -> int:
    return pipe.tokenizer.convert_tokens_to_ids("heart</w>")


def test_mapper_is_seeded_normed_truncatable_and_drops_out_per_layer():
    pipe = build_tiny_sd_pipeline()
    a, b = initial_mapper(pipe, _heart(pipe), 3), initial_mapper(pipe, _heart(pipe), 3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(initial_mapper(pipe, _heart(pipe), 4).fourier, a.fourier)
    norm = float(pipe.text_encoder.get_input_embeddings().weight[_heart(pipe)].detach().norm())
    a.eval()
    t, layer = torch.tensor([0.0, 350.0, 999.0]), torch.tensor([0, 3, 6])
    rows, bypass = a(t, layer)
    torch.testing.assert_close(torch.cat([rows, bypass], 1).norm(dim=1), torch.full((3,), norm))
    assert not torch.allclose(rows[0], rows[1])  # depends on (t, l)
    full, _ = a(t, layer, truncation=a.config.hidden)
    assert torch.equal(full, rows)
    assert not torch.allclose(a(t, layer, truncation=8)[0], rows)
    a.train()  # nested dropout: drawn from the generator, one coin per layer index
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(a(t, layer, generator=g1)[0], a(t, layer, generator=g2)[0])
    same_layer = torch.zeros(64, dtype=torch.long)
    mask = a.dropout_mask(same_layer, torch.Generator().manual_seed(0))
    fired = (mask == 0).any()
    kept = mask.sum(dim=1)
    assert torch.equal(mask, (torch.arange(a.config.hidden)[None] < kept[:, None]).float())  # a prefix
    assert (kept < a.config.hidden).all() if fired else (kept == a.config.hidden).all()


def test_keys_and_values_per_layer_and_everything_comes_off():
    pipe = build_tiny_sd_pipeline()
    heart, face = encode_prompts(pipe, ["red heart"]), encode_prompts(pipe, ["grinning face"])
    n_layers = len(cross_attention_layers(pipe.unet))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = pipe.unet(z, 500, encoder_hidden_states=heart).sample
        with per_layer_conditioning(pipe.unet, [heart] * n_layers, values=[heart] * n_layers):
            same = pipe.unet(z, 500, encoder_hidden_states=face).sample
        with per_layer_conditioning(pipe.unet, [heart] * n_layers, values=[face] * n_layers):
            other_values = pipe.unet(z, 500, encoder_hidden_states=heart).sample
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)  # our attention = diffusers' processor
    assert not torch.allclose(other_values, plain, atol=1e-4)
    # the token's own row and no bypass: the plain encoding
    ids = prompt_ids(pipe.tokenizer, ["red heart"])
    row = pipe.text_encoder.get_input_embeddings().weight[_heart(pipe)][None]
    keys, values = encode_with_rows(pipe.text_encoder, ids, _heart(pipe), row)
    torch.testing.assert_close(keys, heart)
    assert keys is values
    bypass = torch.randn(row.shape, generator=torch.Generator().manual_seed(0))  # not constant: LN removes it
    _, shifted = encode_with_rows(pipe.text_encoder, ids, _heart(pipe), row, bypass=bypass)
    moved = (shifted - heart).abs().amax(dim=-1)[0]
    assert moved[2] > 1e-3 and moved[:2].max() < 1e-6  # bypass at the token only ([bos, red, heart])
    before = dict(pipe.unet.attn_processors)
    mapper = initial_mapper(pipe, _heart(pipe), 0).eval()
    with pytest.raises(RuntimeError, match="inside"):
        with neti_conditioning(pipe.unet, pipe.text_encoder, mapper, ids, _heart(pipe)):
            raise RuntimeError("inside")
    assert pipe.unet.attn_processors == before and not pipe.unet._forward_pre_hooks
    with pytest.raises(StudioError, match="truncation must be between 0 and 128"):
        with neti_conditioning(pipe.unet, pipe.text_encoder, mapper, ids, _heart(pipe), truncation=129):
            pass


def test_each_layer_reads_its_own_keys_and_bypass_values_at_each_samples_timestep():
    """The pre-hook against a reference built layer by layer: per-sample timesteps, a guidance batch
    [negative; conditional] whose negative half stays plain, keys plain and values bypassed."""
    pipe = build_tiny_sd_pipeline()
    mapper = initial_mapper(pipe, _heart(pipe), 0).eval()
    ids = prompt_ids(pipe.tokenizer, ["red heart", "a heart"])
    t = torch.tensor([10, 900])
    negative = encode_prompts(pipe, ["", ""])
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    keys, values = [], []
    for layer in range(len(cross_attention_layers(pipe.unet))):
        rows, bypass = mapper(t.float(), torch.full((2,), layer))
        k, v = encode_with_rows(pipe.text_encoder, ids, _heart(pipe), rows, bypass)
        keys.append(k)
        values.append(v)
    with torch.no_grad():
        context = torch.cat([negative, encode_prompts(pipe, ["red heart", "a heart"])])
        with per_layer_conditioning(pipe.unet, keys, values=values):
            expected = pipe.unet(z, torch.cat([t, t]), encoder_hidden_states=context).sample
        with neti_conditioning(pipe.unet, pipe.text_encoder, mapper, ids, _heart(pipe)):
            got = pipe.unet(z, torch.cat([t, t]), encoder_hidden_states=context).sample
            swapped = pipe.unet(z, torch.cat([t, t.flip(0)]), encoder_hidden_states=context).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(swapped, expected, atol=1e-4)  # the conditional rows' own timesteps count
    torch.testing.assert_close(got[:2], swapped[:2], rtol=1e-5, atol=1e-5)  # ... and only theirs


def _cfg(tmp_path, **kw):
    base = dict(placeholder="<x>", initializer="heart", steps=3, batch_size=2, neti=True,
                output_dir=str(tmp_path / "neti"), validate_every=0, checkpoint_every=1)
    return TextualInversionConfig(**{**base, **kw})


def _train(tmp_path, images, **kw):
    pipe = build_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    out = train_textual_inversion(pipe, images, _cfg(tmp_path, **kw), quiet=True)
    return pipe, (before, unet), out


def test_neti_trains_only_the_mapper(tmp_path, images):
    pipe, (before, unet), out = _train(tmp_path, images, validate_every=3)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet.items())
    after = pipe.text_encoder.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if "token_embedding" not in k)
    old = next(v for k, v in before.items() if k.endswith("token_embedding.weight"))
    new = next(v for k, v in after.items() if k.endswith("token_embedding.weight"))
    assert torch.equal(new[: len(old)], old) and torch.equal(new[-1], old[_heart(pipe)])  # rows untouched
    with safe_open(out["embeddings"], framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    config = json.loads(meta["neti_config"])
    assert meta["method"] == "neti" and config["layers"] == cross_attention_layers(pipe.unet)
    assert "<x>" in keys and "neti.fourier" in keys and "neti.out.weight" in keys
    learned = read_embedding_file(out["embeddings"])
    start = initial_mapper(pipe, _heart(pipe), 0)
    assert not torch.equal(learned.mapper.out.weight, start.out.weight)  # it trained
    assert torch.equal(learned.mapper.fourier, start.fourier)  # a buffer, not trained
    assert (tmp_path / "neti" / "validation" / "step-00003.png").is_file()
    with pytest.raises(StudioError, match="a NeTI mapper, which diffusers"):
        load_into(build_tiny_sd_pipeline(), out["embeddings"])


def test_neti_resumes_exactly(tmp_path, images):
    _, _, straight = _train(tmp_path / "a", images, steps=4)
    _train(tmp_path / "b", images, steps=2)
    _, _, resumed = _train(tmp_path / "b", images, steps=4)
    assert resumed["step"] == 4
    assert resumed["loss_history"] == straight["loss_history"]
    a, b = read_embedding_file(straight["embeddings"]), read_embedding_file(resumed["embeddings"])
    pairs = zip(a.mapper.state_dict().values(), b.mapper.state_dict().values())
    assert all(torch.equal(x, y) for x, y in pairs)
    train_textual_inversion(build_tiny_sd_pipeline(), images, _cfg(tmp_path / "c", neti=False, steps=1),
                            quiet=True)
    with pytest.raises(StudioError, match="not a NeTI checkpoint"):  # resuming a TI run's folder
        train_textual_inversion(build_tiny_sd_pipeline(), images, _cfg(tmp_path / "c", steps=2), quiet=True)
    with pytest.raises(StudioError, match="not a textual-inversion checkpoint"):  # and the other way
        train_textual_inversion(build_tiny_sd_pipeline(), images, _cfg(tmp_path / "b", neti=False, steps=5),
                                quiet=True)


def test_neti_with_core_trains_only_the_mapper_and_resumes_exactly(tmp_path, images):
    """CoRe's terms on a NeTI token: the loss changes, the token's rows stay, a resumed run is the same."""
    _, (before, unet), plain = _train(tmp_path / "plain", images, steps=2)
    pipe, _, straight = _train(tmp_path / "a", images, steps=4, core=True, core_templates=("a {} on red",))
    assert straight["loss_history"][:2] != plain["loss_history"]  # CoRe's terms count
    new = next(v for k, v in pipe.text_encoder.state_dict().items() if k.endswith("token_embedding.weight"))
    assert torch.equal(new[-1], new[_heart(pipe)])  # the placeholder row is not trained (nor held)
    _train(tmp_path / "b", images, steps=2, core=True, core_templates=("a {} on red",))
    _, _, resumed = _train(tmp_path / "b", images, steps=4, core=True, core_templates=("a {} on red",))
    assert resumed["loss_history"] == straight["loss_history"]


def test_the_file_loads_back_to_identical_samples_and_truncation_is_a_dial(tmp_path, images):
    pipe, _, out = _train(tmp_path, images)
    mapper = read_embedding_file(out["embeddings"]).mapper
    kw = dict(n=2, steps=2, guidance=3.0)
    direct = sample_neti(pipe, "a <x>", "<x>", mapper, generator=torch.Generator().manual_seed(5), **kw)
    fresh = build_tiny_sd_pipeline()
    fresh.set_progress_bar_config(disable=True)
    loaded = personalize.generate("a <x>", embeddings=[out["embeddings"]], seed=5, pipe=fresh, **kw)
    assert torch.equal(loaded, direct)
    cut = personalize.generate("a <x>", embeddings=[out["embeddings"]], seed=5, pipe=fresh, truncation=4,
                               **kw)
    assert not torch.equal(cut, loaded)
    plain = personalize.generate("red heart", embeddings=[out["embeddings"]], seed=5, pipe=fresh, **kw)
    assert not torch.equal(plain, loaded)  # a prompt without the token samples without it


def test_neti_refusals(tmp_path, images):
    for option, match in (({"cross_init": True}, "does not combine with cross_init"),
                          ({"per_layer": True}, "does not combine with per_layer"),
                          ({"num_vectors": 2}, "num_vectors must be 1")):
        with pytest.raises(StudioError, match=match):
            _train(tmp_path, images, **option)
    assert not (tmp_path / "neti").exists()
    pipe = build_tiny_sd_pipeline()
    with pytest.raises(StudioError, match="a mapper is trained only by NeTI"):
        train_textual_inversion(pipe, images, _cfg(tmp_path, neti=False),
                                mapper=initial_mapper(pipe, _heart(pipe), 0))
    _, _, out = _train(tmp_path, images, steps=1)
    learned = read_embedding_file(out["embeddings"])
    other = build_tiny_sd_pipeline()
    learned.mapper.config = type(learned.mapper.config)(**{**learned.mapper.config.__dict__,
                                                          "layers": ("down_blocks.9.attn2.processor",)})
    with pytest.raises(StudioError, match="belongs to another model"):
        add_learned_tokens(other, learned)


def test_cli_personalize_neti_and_generate_with_truncation(tmp_path, images, tiny_sd_model_dir):
    out = tmp_path / "neti"
    assert main(["personalize", "--method", "neti", "--images", *images, "--model", tiny_sd_model_dir,
                 "--token", "<x>", "--init", "heart", "--steps", "2", "--batch-size", "2", "--out", str(out),
                 "--quiet", "validate_every=0"]) == 0
    assert read_embedding_file(out / "learned_embeds.safetensors").mapper is not None
    grid = tmp_path / "gen.png"
    assert main(["generate", "--prompt", "a <x>", "--model", tiny_sd_model_dir, "--embeddings",
                 str(out / "learned_embeds.safetensors"), "--n", "2", "--steps", "2", "--truncation", "16",
                 "--output", str(grid)]) == 0
    assert grid.is_file() and json.loads(grid.with_suffix(".json").read_text())["truncation"] == 16
