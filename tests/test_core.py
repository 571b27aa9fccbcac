"""CoRe's context regularisation on a tiny random SD-style pipeline: aligned context tokens, terms that are
zero where the token reads as its word, attention masses, the norm window, resume, XTI + CoRe, the CLI."""

from __future__ import annotations

import random

import pytest
import torch

from models.layer_conditioning import cross_attention_layers
from studio.cli import main
from studio.core.errors import StudioError
from studio.training import core
from studio.training.textual_inversion import (TextualInversionConfig, add_tokens, read_embedding_file,
                                               train_textual_inversion)
from tests.conftest import build_tiny_sd_pipeline


@pytest.fixture()
def images(concept_images):
    return [str(p) for p in sorted(concept_images.iterdir())]


def _with_token(pipe, row_from: str = "heart"):
    """``<x>`` added to ``pipe`` with the input embedding of ``row_from``."""
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, TextualInversionConfig(placeholder="<x>"))
    emb = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        emb[ids] = emb[pipe.tokenizer.convert_tokens_to_ids(f"{row_from}</w>")].clone()
    return ids


def _terms(pipe, ids, template: str):
    prompts = core.ContextPrompts(pipe.tokenizer, (template,), "<x>", "heart")
    tok, ref, pos_tok, pos_ref = prompts.draw(random.Random(0))
    with torch.no_grad():
        s_tok, s_ref = pipe.text_encoder(tok[None])[0], pipe.text_encoder(ref[None])[0]
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([300, 700])
        m_tok = core.attention_masses(pipe.unet, z, t, s_tok.expand(2, -1, -1))
        m_ref = core.attention_masses(pipe.unet, z, t, s_ref.expand(2, -1, -1))
    return (tok, ref, pos_tok, pos_ref, core.embedding_loss(s_tok, s_ref, pos_tok, pos_ref),
            core.attention_loss(m_tok, m_ref, pos_tok, pos_ref), m_tok)


def test_context_tokens_line_up_and_the_terms_vanish_where_the_token_reads_as_its_word():
    pipe = build_tiny_sd_pipeline()
    ids = _with_token(pipe, "heart")
    tok, ref, pos_tok, pos_ref, emb, attn, masses = _terms(pipe, ids, "a {} red heart")
    assert len(pos_tok) == len(pos_ref) == 5  # start, "a", "red", "heart", end: the token itself dropped
    assert torch.equal(tok[pos_tok], ref[pos_ref]) and ids[0] not in tok[pos_tok]
    assert float(emb) == pytest.approx(0, abs=1e-6) and float(attn) == pytest.approx(0, abs=1e-9)
    assert len(masses) == len(cross_attention_layers(pipe.unet))
    for m in masses:  # softmax mass per key, averaged over heads and queries: sums to 1 over the keys
        torch.testing.assert_close(m.sum(dim=1), torch.ones(2), rtol=1e-5, atol=1e-5)
    pipe2 = build_tiny_sd_pipeline()
    _, _, _, _, emb2, attn2, _ = _terms(pipe2, _with_token(pipe2, "face"), "a {} red heart")
    assert float(emb2) > 0 and float(attn2) > 0  # another word in its place changes the context


def test_bad_settings_are_refused_before_any_work(tmp_path, images):
    pipe = build_tiny_sd_pipeline()
    with pytest.raises(StudioError, match="one '\\{\\}' each"):
        core.ContextPrompts(pipe.tokenizer, ("no slot",), "<x>", "heart")
    vocab = len(pipe.tokenizer)
    for bad, message in (({"core_rescale_start": 0.7, "core_rescale_end": 0.2}, "start <= end"),
                         ({"core_templates": ("a {} {}",)}, "one '\\{\\}' for the token")):
        with pytest.raises(StudioError, match=message):
            train_textual_inversion(pipe, images, _cfg(tmp_path, **bad), quiet=True)
    assert len(pipe.tokenizer) == vocab  # refused before the token was added


def test_the_norm_window_records_then_holds():
    assert [core.rescale_window(s, 10, (0.4, 0.6)) for s in range(1, 8)] == \
        [None, None, None, "record", "rescale", "rescale", None]


def _cfg(tmp_path, **kw):
    base = dict(placeholder="<x>", initializer="heart", steps=5, batch_size=2, core=True,
                output_dir=str(tmp_path / "core"), validate_every=0, checkpoint_every=1)
    return TextualInversionConfig(**{**base, **kw})


def _train(tmp_path, images, stop_at: int | None = None, **kw):
    pipe = build_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    stop = None if stop_at is None else (lambda step, total, loss: False if step == stop_at else None)
    out = train_textual_inversion(pipe, images, _cfg(tmp_path, **kw), quiet=True, callback=stop)
    return pipe, before, out


def test_core_trains_only_its_rows_holds_their_norm_and_differs_from_plain(tmp_path, images):
    pipe, before, out = _train(tmp_path / "core", images, lr=0.05, core_rescale_start=0.4,
                               core_rescale_end=1.0)
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[: before.shape[0]], before)
    _, _, plain = _train(tmp_path / "plain", images, lr=0.05, core=False)
    a, b = read_embedding_file(out["embeddings"]).rows, read_embedding_file(plain["embeddings"]).rows
    assert not torch.allclose(a, b)  # the regulariser moved the row
    assert out["loss_history"][0] > plain["loss_history"][0] or out["loss_history"] != plain["loss_history"]
    # held at its norm after step 2 (0.4 of 5) for the rest of the run
    from safetensors import safe_open
    with safe_open(str(tmp_path / "core" / "core" / "checkpoint.safetensors"), framework="pt") as f:
        recorded = f.get_tensor("core_norms")
    torch.testing.assert_close(a.norm(dim=-1), recorded, rtol=1e-5, atol=1e-6)


def test_core_resumes_exactly_across_its_window(tmp_path, images):
    kw = dict(lr=0.05, core_rescale_start=0.4, core_rescale_end=1.0)
    _, _, straight = _train(tmp_path / "a", images, **kw)
    _train(tmp_path / "b", images, stop_at=3, **kw)  # stopped inside the window (recorded at step 2)
    _, _, resumed = _train(tmp_path / "b", images, **kw)
    torch.testing.assert_close(resumed["loss_history"], straight["loss_history"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(read_embedding_file(resumed["embeddings"]).rows,
                               read_embedding_file(straight["embeddings"]).rows, rtol=1e-6, atol=1e-7)


def test_xti_with_core_and_the_cli(tmp_path, images, tiny_sd_model_dir):
    out = tmp_path / "xti-core"
    assert main(["personalize", "--method", "xti", "--core", "--images", *images, "--model",
                 tiny_sd_model_dir, "--token", "<x>", "--init", "heart", "--steps", "2", "--batch-size", "2",
                 "--out", str(out), "--quiet", "validate_every=0", "core_templates={} red heart"]) == 0
    learned = read_embedding_file(out / "learned_embeds.safetensors")
    assert learned.layers is not None and len(learned.rows) == len(learned.layers)
