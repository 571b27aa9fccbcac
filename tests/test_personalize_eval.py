"""`studio personalize-eval` on the tiny random SD pipeline: every field, both PNGs, the curve, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from studio.cli import main
from studio.core.errors import StudioError
from studio.core.io import save_image
from studio.eval.personalize_eval import evaluate_personalization, list_concepts, pick_concept

LIGHT, DARK = "\U0001F3FB", "\U0001F3FF"


@pytest.fixture()
def examples(tmp_path) -> Path:
    """A held-out examples folder: concept 'red heart' in 3 variants (skin tones), 'white cane' in 3, and a
    single-image concept."""
    folder = tmp_path / "examples"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    entries = [("red heart", "\u2764"), ("red heart: light skin tone", "\u2764" + LIGHT),
               ("red heart: dark skin tone", "\u2764" + DARK), ("grinning face", "\U0001F600"),
               ("white cane", "\U0001F9AF"), ("white cane: light skin tone", "\U0001F9AF" + LIGHT),
               ("white cane: dark skin tone", "\U0001F9AF" + DARK)]
    meta = []
    for i, (caption, seq) in enumerate(entries):
        save_image(torch.rand(1, 3, 64, 64, generator=g), folder / f"{i:03d}-64.png")
        save_image(torch.rand(1, 3, 32, 32, generator=g), folder / f"{i:03d}-32.png")
        files = {"32": f"{i:03d}-32.png", "64": f"{i:03d}-64.png"}
        meta.append({"caption": caption, "sequence": seq, "files": files})
    (folder / "captions.json").write_text(json.dumps(meta))
    return folder


def test_concepts_group_skin_tones_and_pick_the_size(examples):
    concepts = list_concepts(examples, size=64)
    found = [(c.name, len(c.files)) for c in concepts]
    assert found == [("red heart", 3), ("grinning face", 1), ("white cane", 3)]
    assert all(p.name.endswith("-64.png") for p in concepts[0].files)
    assert pick_concept(concepts, None).name == "red heart"  # most images, first on a tie
    assert pick_concept(concepts, "White Cane").name == "white cane"


def test_cli_run_writes_every_field_and_both_pngs(tmp_path, examples, tiny_sd_model_dir, capsys):
    out = tmp_path / "eval"
    assert main(["personalize-eval", "--model", tiny_sd_model_dir, "--examples", str(examples),
                 "--steps", "5", "--eval-every", "2", "--samples", "6", "--std-seeds", "2", "--n", "2",
                 "--sample-steps", "2", "--runs", "plain,cross-init,xti,neti", "--edit", "{}: dark skin tone",
                 "--out", str(out), "--quiet", "--lr", "0.05", "cross_init_reg=1e-3"]) == 0
    assert "wrote" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["concept"]["name"] == "red heart" and len(res["concept"]["files"]) == 3
    init = res["init_word"]
    assert init["word"] == "red" and init["prompt"] == "a picture of a red"  # first one-token word; no card
    assert len(init["losses_by_seed"]) == 2 and init["std"] >= 0 and init["std"] == init["std"]
    settings = res["settings"]
    assert settings["draws"] == 6 and settings["batch_size"] == 3 and settings["lr"] == 0.05
    cross_cfg = res["runs"]["cross-init"]["config"]
    assert cross_cfg["cross_init"] and cross_cfg["cross_init_reg"] == 1e-3
    assert not res["runs"]["plain"]["config"]["cross_init"]
    # trained on the evaluated template
    assert res["runs"]["plain"]["config"]["templates"] == ["a picture of a {}"]
    refs = res["references"]
    assert refs["no word"]["prompt"] == "'a picture of a'" and refs["own captions"]["loss"] > 0
    assert refs["own captions"]["loss"] != pytest.approx(refs["no word"]["loss"], rel=1e-6)
    for r in refs.values():
        assert r["drop_percent"] == pytest.approx(100 * (init["loss"] - r["loss"]) / init["loss"])
    assert list(res["runs"]) == ["plain", "cross-init", "xti", "neti"] and res["runs"]["xti"]["per_layer"]
    assert res["runs"]["neti"]["neti"] and not res["runs"]["neti"]["per_layer"]
    assert res["init_word"]["edits"]["edits"] == ["{}: dark skin tone"]
    for name in ("plain", "cross-init", "xti", "neti"):
        run = res["runs"][name]
        edits = run["edits"]
        word_gain = res["init_word"]["edits"]["gain"]
        assert len(edits["gains"]) == 1 and edits["gain"] == edits["gains"][0]
        if word_gain > 0:  # the ratio is defined when the edit shows with the plain word
            assert edits["editability"] == pytest.approx(edits["gain"] / word_gain)
        else:
            assert edits["editability"] != edits["editability"]  # NaN, written as — in results.md
        # step 0, one entry per k=2 steps, and the last step (5 is not a multiple of 2)
        assert [p["step"] for p in run["curve"]] == [0, 2, 4, 5]
        assert run["steps_done"] == 5 and len(run["train_loss_history"]) == 5
        assert run["final_loss"] == pytest.approx(run["curve"][-1]["loss"], rel=1e-6)  # same seed, same draws
        assert run["drop_percent"] == pytest.approx(100 * (init["loss"] - run["final_loss"]) / init["loss"])
        assert run["curve"][-1]["loss"] != run["curve"][0]["loss"]  # the token did train
        for key in ("psnr", "ssim"):
            assert len(run["resemblance"][f"{key}_per_sample"]) == 2
        assert Path(run["embeddings"]).is_file()
    # plain init at step 0 is the initializer's embedding: the same loss as the init word
    assert res["runs"]["plain"]["curve"][0]["loss"] == pytest.approx(init["loss"], rel=1e-5)
    assert res["runs"]["xti"]["curve"][0]["loss"] == pytest.approx(init["loss"], rel=1e-5)  # all layers: init
    assert res["runs"]["xti"]["final_loss"] != pytest.approx(res["runs"]["plain"]["final_loss"], rel=1e-6)
    assert res["runs"]["cross-init"]["curve"][0]["loss"] != pytest.approx(init["loss"], rel=1e-5)
    # NeTI starts from its seeded initial mapper, whose output is not the init word's row
    assert res["runs"]["neti"]["curve"][0]["loss"] != pytest.approx(init["loss"], rel=1e-5)
    assert [t["name"] for t in res["targets"]] == ["plain_final", "70%_of_plain_drop"]
    assert res["targets"][0]["steps"]["plain"] is not None  # plain reaches its own final loss
    assert set(res["goal"]["drop_met"]) == {"plain", "cross-init", "xti", "neti"}
    for png, min_size in (("loss_curves.png", (300, 200)), ("samples.png", (2 * 66, 6 * 66))):
        with Image.open(out / png) as im:
            assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
    md = (out / "results.md").read_text()
    assert "## Goals (computed)" in md and "loss drop ≥ 30%" in md and "steps to plain_final" in md
    assert "| xti token (step 5) |" in md and "editability" in md
    assert "reference, own captions" in md


def test_concept_loss_takes_one_prompt_per_image(tiny_sd_model_dir):
    from studio.training.textual_inversion import concept_loss
    from studio.core.errors import StudioError
    from studio.workflows.personalize import load_sd_pipeline

    pipe = load_sd_pipeline(tiny_sd_model_dir)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    same = concept_loss(pipe, images, ["red heart", "red heart"], seed=1, samples=4)
    assert same == pytest.approx(concept_loss(pipe, images, "red heart", seed=1, samples=4), rel=1e-6)
    other = concept_loss(pipe, images, ["red heart", "blue"], seed=1, samples=4)
    assert other != pytest.approx(same, rel=1e-6)
    with pytest.raises(StudioError, match="3 prompts for 2 images"):
        concept_loss(pipe, images, ["a", "b", "c"], seed=1, samples=4)


def test_bad_concept_and_init_word_messages(tmp_path, examples, tiny_sd_model_dir, capsys):
    kw = dict(examples=examples, steps=1, eval_every=1, out=tmp_path / "x")
    with pytest.raises(StudioError, match=r"unknown concept 'nope'; .*'red heart' \(3\), 'white cane' \(3\)"):
        evaluate_personalization(tiny_sd_model_dir, "nope", **kw)
    with pytest.raises(StudioError, match=r"concept 'grinning face' has 1 image\(s\), need >= 3"):
        evaluate_personalization(tiny_sd_model_dir, "grinning face", **kw)
    with pytest.raises(StudioError, match="initializer 'cane' is 4 tokens .* one token"):
        evaluate_personalization(tiny_sd_model_dir, "red heart", init_word="cane", **kw)
    no_one_token_word = r"no word of the concept name 'white cane' is one token .*--init-word"
    with pytest.raises(StudioError, match=no_one_token_word):
        evaluate_personalization(tiny_sd_model_dir, "white cane", **kw)
    with pytest.raises(StudioError, match="placeholder token 'heart' already exists"):
        evaluate_personalization(tiny_sd_model_dir, "red heart", token="heart", **kw)
    with pytest.raises(StudioError, match="option 'cross_init' is set by the evaluation itself"):
        evaluate_personalization(tiny_sd_model_dir, "red heart", options={"cross_init": True}, **kw)
    with pytest.raises(StudioError, match="num_vectors must be 1"):  # the XTI run's, before plain trains
        evaluate_personalization(tiny_sd_model_dir, "red heart", runs=("plain", "xti"),
                                 options={"num_vectors": 2}, **kw)
    with pytest.raises(StudioError, match="each edit must contain one"):
        evaluate_personalization(tiny_sd_model_dir, "red heart", edits=("{} {color}",), **kw)
    with pytest.raises(StudioError, match="runs must be distinct names"):
        evaluate_personalization(tiny_sd_model_dir, "red heart", runs=("plain", "dreambooth"), **kw)
    assert not (tmp_path / "x").exists()  # nothing trained or written
    assert main(["personalize-eval", "--model", tiny_sd_model_dir, "--examples", str(examples), "--concept",
                 "nope"]) == 2
    assert "studio: error: unknown concept 'nope'" in capsys.readouterr().err


def test_multi_vector_token_prompts_name_every_vector():
    from studio.workflows.personalize import make_config
    from studio.eval.personalize_eval import token_prompt

    cfg = make_config({"placeholder": "<c>", "initializer": "man", "num_vectors": 3})
    assert token_prompt("{}", cfg) == "<c> <c>_1 <c>_2"
    assert token_prompt("a picture of a {}", make_config({"placeholder": "<c>", "initializer": "man"})) \
        == "a picture of a <c>"


def test_model_declared_prompt_template(tmp_path, tiny_sd_model_dir):
    import shutil

    from studio.workflows.personalize import model_prompt_template

    assert model_prompt_template("emoji-sd") == "{}"  # the shipped card: bare captions
    assert model_prompt_template(tiny_sd_model_dir) is None  # no card.json
    folder = tmp_path / "m"
    shutil.copytree(tiny_sd_model_dir, folder)
    (folder / "card.json").write_text('{"prompt_template": "an emoji of {}"}')
    assert model_prompt_template(str(folder)) == "an emoji of {}"
    (folder / "card.json").write_text('{"prompt_template": "no slot"}')
    assert model_prompt_template(str(folder)) is None
    (folder / "card.json").write_text("not json")
    assert model_prompt_template(str(folder)) is None
