"""Prompt-to-prompt attention control on a tiny random SD-style pipeline, and the token alignment behind
it."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from models.latent_prior import load_latent_prior
from solvers.inversion import attention_control as ac
from solvers.inversion.ddim import ddim_inversion, regenerate
from solvers.inversion.null_text import null_text_inversion
from studio.cli import main
from studio.core.errors import StudioError
from studio.core.io import save_image
from studio.eval.edit_bench import paired_difference
from studio.workflows import editing


@pytest.fixture(scope="module")
def prior(tiny_sd_model_dir):
    return load_latent_prior(tiny_sd_model_dir)


@pytest.fixture(scope="module")
def inversions(prior):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z0 = prior.encode(x)
    return {"ddim": ddim_inversion(prior, z0, prompt="red heart", steps=4),
            "null-text": null_text_inversion(prior, z0, prompt="red heart", steps=3, inner_steps=2)}


def _tokens(prior, prompt):
    return [len(ids) for _, ids, _ in ac.word_spans(prior.tokenizer, prompt)]


@pytest.mark.parametrize("method", ["ddim", "null-text"])
@pytest.mark.parametrize("mode", ["auto", "replace", "refine"])
def test_equal_prompts_leave_the_regeneration_unchanged(prior, inversions, method, mode):
    inv = inversions[method]
    plain = regenerate(prior, inv)
    settings = ac.ControlSettings(mode=mode, blend_words=("heart",), blend_start=0.0)
    z_src, z_tgt, mask = ac.controlled_regeneration(prior, inv, inv.prompt, settings)
    assert torch.allclose(z_src, plain, atol=1e-4) and torch.allclose(z_tgt, plain, atol=1e-4)
    assert mask is not None and mask.shape == (1, 1, *plain.shape[-2:])


def test_a_different_prompt_changes_only_the_target_branch(prior, inversions):
    inv = inversions["ddim"]
    z_src, z_tgt, _ = ac.controlled_regeneration(prior, inv, "grinning face", ac.ControlSettings())
    assert torch.allclose(z_src, regenerate(prior, inv), atol=1e-4)  # the source branch is the reconstruction
    assert not torch.allclose(z_tgt, z_src, atol=1e-3)
    plain = regenerate(prior, inv, prompt="grinning face")
    assert not torch.allclose(z_tgt, plain, atol=1e-4)  # the control did something


def test_processors_are_restored_also_after_an_error(prior, inversions):
    before = dict(prior.unet.attn_processors)
    ac.controlled_regeneration(prior, inversions["ddim"], "grinning face", ac.ControlSettings())
    assert all(prior.unet.attn_processors[k] is v for k, v in before.items())
    controller = ac.AttentionController(ac.ControlSettings(), prior.tokenizer, "red heart", "red face", 77,
                                        (8, 8))
    with pytest.raises(RuntimeError, match="boom"):
        with ac.attention_processors(prior.unet, controller):
            assert all(isinstance(p, ac.ControlledAttnProcessor) for p in prior.unet.attn_processors.values())
            raise RuntimeError("boom")
    assert all(prior.unet.attn_processors[k] is v for k, v in before.items())


def test_replace_maps_token_to_token_and_a_swapped_word_to_the_mean(prior):
    tok = prior.tokenizer
    mapper, alpha = ac.replace_mapper(tok, "red heart", "red face", 77)
    assert torch.equal(alpha, torch.ones(77))
    n_red, n_heart = _tokens(prior, "red heart")
    n_face = _tokens(prior, "red face")[1]
    red = slice(1, 1 + n_red)
    assert torch.equal(mapper[red, red], torch.eye(n_red))  # the shared word: token to token
    heart_rows = slice(1 + n_red, 1 + n_red + n_heart)
    for j in range(n_face):  # each token of the new word: the mean of the old word's token maps
        col = mapper[:, 1 + n_red + j]
        if n_face == n_heart:
            assert col[heart_rows].sum() == 1 and col.sum() == 1
        else:
            assert torch.allclose(col[heart_rows], torch.full((n_heart,), 1 / n_heart))
    assert torch.allclose(mapper.sum(0)[1 + n_red + n_face:], torch.ones(77 - 1 - n_red - n_face))  # padding
    with pytest.raises(StudioError, match="use refine"):
        ac.replace_mapper(tok, "red heart", "big red heart", 77)


def test_refine_keeps_added_words_own_attention(prior):
    """'heart' → 'red heart': the added word's tokens keep the target's own maps (α = 0); 'heart' maps to
    'heart'. Checked through the controller on synthetic attention probabilities."""
    tok = prior.tokenizer
    n_red, n_heart = _tokens(prior, "red heart")
    controller = ac.AttentionController(ac.ControlSettings(mode="auto", blend_words=()), tok, "heart",
                                        "red heart", 77, (4, 4))
    assert controller.mode == "refine"
    probs = torch.softmax(torch.randn(2 * 2, 16, 77, generator=torch.Generator().manual_seed(1)), -1)
    out = controller(probs.clone(), batch=2, is_cross=True).reshape(2, 2, 16, 77)
    src, tgt = probs.reshape(2, 2, 16, 77)
    assert torch.equal(out[0], src)  # the source row is never touched
    added = slice(1, 1 + n_red)
    assert torch.equal(out[1][..., added], tgt[..., added])
    heart_t, heart_s = slice(1 + n_red, 1 + n_red + n_heart), slice(1, 1 + n_heart)
    assert torch.equal(out[1][..., heart_t], src[..., heart_s])
    assert torch.equal(out[1][..., 0], src[..., 0])
    controller.progress = 0.9  # past cross_replace = 0.8: the target's own attention
    assert torch.equal(controller(probs.clone(), batch=2, is_cross=True), probs)


def test_self_attention_injection_follows_steps_and_resolution(prior):
    settings = ac.ControlSettings(self_replace=0.5, self_max_side=4, blend_words=())
    controller = ac.AttentionController(settings, prior.tokenizer, "red heart", "red face", 77, (8, 8))
    fine, coarse = torch.rand(2, 64, 64), torch.rand(2, 16, 16)  # 8x8 and 4x4 layers, one head
    assert torch.equal(controller(fine.clone(), 2, False), fine)  # more than 4 x 4 positions
    injected = controller(coarse.clone(), 2, False)
    assert torch.equal(injected[1], coarse[0]) and torch.equal(injected[0], coarse[0])
    controller.progress = 0.5
    assert torch.equal(controller(coarse.clone(), 2, False), coarse)


def test_self_attention_injection_reaches_the_unconditional_pair_only_when_asked(prior):
    coarse = torch.rand(4, 16, 16)  # rows [uncond source, uncond target, cond source, cond target], one head
    for unconditional in (False, True):
        settings = ac.ControlSettings(self_replace=0.5, blend_words=(), self_unconditional=unconditional)
        controller = ac.AttentionController(settings, prior.tokenizer, "red heart", "red face", 77, (4, 4))
        out = controller(coarse.clone(), 4, False)
        kept = [0, 0 if unconditional else 1, 2]
        assert torch.equal(out[3], coarse[2]) and torch.equal(out[:3], coarse[kept])
        cross = torch.rand(4, 16, 77)
        assert torch.equal(controller(cross.clone(), 4, True)[:3], cross[:3])  # cross: conditional pair only


def test_reweight_scales_the_chosen_words_columns(prior):
    settings = ac.ControlSettings(mode="reweight", reweight_words=("heart",), reweight_scale=3.0,
                                  blend_words=())
    controller = ac.AttentionController(settings, prior.tokenizer, "red heart", "red heart", 77, (4, 4))
    probs = torch.softmax(torch.randn(2, 16, 77), -1)
    out = controller(probs.clone(), 2, True)
    n_red, n_heart = _tokens(prior, "red heart")
    heart = slice(1 + n_red, 1 + n_red + n_heart)
    assert torch.allclose(out[1][..., heart], 3 * probs[0][..., heart])
    assert torch.allclose(out[1][..., :heart.start], probs[0][..., :heart.start])
    with pytest.raises(StudioError, match="not in"):
        ac.AttentionController(ac.ControlSettings(mode="reweight", reweight_words=("cat",)), prior.tokenizer,
                               "red heart", "red heart", 77, (4, 4))


def test_reweight_words_scale_on_top_of_a_word_swap(prior):
    swap = dict(mode="replace", blend_words=())
    plain = ac.AttentionController(ac.ControlSettings(**swap), prior.tokenizer, "red heart", "blue heart",
                                   77, (4, 4))
    scaled = ac.AttentionController(ac.ControlSettings(**swap, reweight_words=("blue",), reweight_scale=3.0),
                                    prior.tokenizer, "red heart", "blue heart", 77, (4, 4))
    probs = torch.softmax(torch.randn(2, 16, 77), -1)
    base, out = plain(probs.clone(), 2, True), scaled(probs.clone(), 2, True)
    n_blue = _tokens(prior, "blue heart")[0]
    blue = slice(1, 1 + n_blue)
    assert torch.allclose(out[1][..., blue], 3 * base[1][..., blue])  # the swapped-in word's map, ×3
    assert torch.allclose(out[1][..., blue.stop:], base[1][..., blue.stop:])  # the rest as the swap has it


def test_the_edited_words_can_keep_their_own_cross_attention_sooner(prior):
    """cross_replace 0.8 with cross_replace_edited 0.2: at 50 % of the steps the swapped-in word has its own
    map while the other tokens still take the source's; past 80 % every token has its own."""
    settings = ac.ControlSettings(mode="replace", cross_replace_edited=0.2, blend_words=())
    controller = ac.AttentionController(settings, prior.tokenizer, "red heart", "blue heart", 77, (4, 4))
    probs = torch.softmax(torch.randn(2, 16, 77, generator=torch.Generator().manual_seed(2)), -1)
    n_blue = _tokens(prior, "blue heart")[0]
    blue, rest = slice(1, 1 + n_blue), slice(1 + n_blue, None)
    swapped = ac.AttentionController(ac.ControlSettings(mode="replace", blend_words=()), prior.tokenizer,
                                     "red heart", "blue heart", 77, (4, 4))(probs.clone(), 2, True)
    assert torch.equal(controller(probs.clone(), 2, True), swapped)  # before 20 %: the plain swap
    controller.progress = 0.5
    out = controller(probs.clone(), 2, True)
    assert torch.equal(out[1][..., blue], probs[1][..., blue])
    assert torch.equal(out[1][..., rest], swapped[1][..., rest])
    assert torch.equal(out[1][..., 0], probs[0][..., 0])
    assert controller.needs_probabilities(True, 16)
    controller.progress = 0.85
    assert torch.equal(controller(probs.clone(), 2, True), probs)


def test_each_tokens_window_ends_exactly_at_its_fraction_and_takes_the_reweight_with_it(prior):
    """cross_replace 0.4 ends at step 20 of 50 (not a step later through float32); a whole-number
    cross_replace keeps the edited words' fraction; edited words longer than the rest: the other tokens
    have their own maps while the swapped-in word still takes the source's, and a reweight ends with its
    word's window; refine ignores the edited fraction (its added words have their own maps throughout)."""
    probs = torch.softmax(torch.randn(2, 16, 77), -1)

    def swap(**settings):
        return ac.AttentionController(ac.ControlSettings(blend_words=(), **settings), prior.tokenizer,
                                      "red heart", "blue heart", 77, (4, 4))
    plain = swap(cross_replace=0.4)
    plain.progress = 20 / 50
    assert not plain.needs_probabilities(True, 16) and torch.equal(plain(probs.clone(), 2, True), probs)
    whole = swap(cross_replace=1, cross_replace_edited=0.4)
    n_blue = _tokens(prior, "blue heart")[0]
    blue, rest = slice(1, 1 + n_blue), slice(1 + n_blue, None)
    assert torch.all(whole.cross_until[blue] == 0.4) and torch.all(whole.cross_until[rest] == 1.0)
    late = swap(cross_replace=0.2, cross_replace_edited=0.6, reweight_words=("heart",), reweight_scale=3.0)
    late.progress = 0.4
    out = late(probs.clone(), 2, True)
    assert torch.equal(out[1][..., rest], probs[1][..., rest])  # own maps, and "heart" no longer ×3
    assert not torch.equal(out[1][..., blue], probs[1][..., blue])  # still the source's ("red") map
    assert late.cross_end == pytest.approx(0.6)
    refine = ac.AttentionController(ac.ControlSettings(cross_replace_edited=0.9, blend_words=()),
                                    prior.tokenizer, "heart", "red heart", 77, (4, 4))
    assert refine.mode == "refine" and torch.all(refine.cross_until == 0.8) and refine.cross_end == 0.8


def test_a_word_swap_edits_the_word_at_its_position(prior):
    """The swapped-in word is found by position: "blue" also in the source elsewhere is still swapped."""
    tok = prior.tokenizer
    source, target = "a red car and a blue house", "a blue car and a blue house"
    swapped = ac.swapped_tokens(tok, source, target, 77)
    spans = ac.word_spans(tok, target)
    first_blue, second_blue = spans[1], spans[5]
    assert swapped[first_blue[2]:first_blue[2] + len(first_blue[1])].all()
    assert int(swapped.sum()) == len(first_blue[1])
    assert not swapped[second_blue[2]:second_blue[2] + len(second_blue[1])].any()
    assert ac.edited_words(source, target) == ()  # by word names there is nothing new


@pytest.mark.parametrize("bad, message", [
    (dict(mode="magic"), "attention control must be one of"),
    (dict(mode="none", reweight_words=("blue",)), "need attention control"),
    (dict(cross_replace=1.5), "cross_replace must be in"),
    (dict(cross_replace_edited=-0.1), "cross_replace_edited must be in"),
    (dict(blend_side=0), "blend_side must be a whole number"),
    (dict(self_max_side=0.25), "self_max_side must be a whole number"),
    (dict(mode="reweight"), "needs reweight_words"),
    (dict(pixel_blend="yes"), "pixel_blend must be true or false"),
])
def test_bad_settings_are_one_clear_error(bad, message):
    with pytest.raises(StudioError, match=message):
        ac.ControlSettings(**bad)


@pytest.mark.parametrize("blend_side, localised", [(16, True), (8, False), (4, False)])
def test_blend_mask_is_read_at_the_positions_asked_for(prior, blend_side, localised):
    """Maps stored at 4², 8² and 16² positions; only the 16² one says where the word is (its top-left
    quarter): a mask read there covers that corner only, one read from a flat coarse map covers it all."""
    settings = ac.ControlSettings(blend_side=blend_side, blend_start=0.0)
    controller = ac.AttentionController(settings, prior.tokenizer, "red heart", "blue heart", 77, (16, 16))
    word = int(controller.word_rows[0].nonzero()[0])
    for side in (4, 8, 16):
        maps = torch.zeros(2, side * side, 77)
        if side == 16:
            corner = torch.zeros(16, 16)
            corner[:4, :4] = 1.0
            maps[:, :, word] = corner.flatten()
        controller.maps[(side, side)] = maps
    mask = controller.blend_mask()[0, 0]
    assert mask.shape == (16, 16)
    if localised:  # the corner, widened by the 3 x 3 max-pool, and nothing else
        assert mask[:5, :5].all() and mask.sum() == 25
    else:
        assert mask.all()


def test_blend_mask_holes_are_filled_as_scipy_fills_them_when_asked(prior):
    from scipy import ndimage

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        h, w = torch.randint(1, 12, (2,), generator=g).tolist()
        mask = (torch.rand(1, 1, h, w, generator=g) < torch.rand(1, generator=g)).float()
        expected = ndimage.binary_fill_holes(mask[0, 0].numpy().astype(bool))
        assert torch.equal(ac.fill_holes(mask)[0, 0].bool(), torch.from_numpy(expected))
    ring = torch.ones(1, 1, 5, 5)
    ring[..., 2, 2] = 0  # a hole
    ring[..., 0, 0] = 0  # a notch open to the border: not a hole
    assert ac.fill_holes(ring)[..., 2, 2] == 1 and ac.fill_holes(ring)[..., 0, 0] == 0
    for fill in (False, True):
        settings = ac.ControlSettings(blend_words=("heart",), blend_threshold=0.5, blend_fill_holes=fill)
        controller = ac.AttentionController(settings, prior.tokenizer, "red heart", "blue heart", 77, (5, 5))
        maps = controller.word_rows[:, None, :].expand(2, 25, 77).clone()  # each prompt's "heart" tokens
        # a 3 x 3 block of zeros in a 5 x 5 layer: after the 3 x 3 max-pool its centre is a one-pixel hole
        maps[:, [6, 7, 8, 11, 12, 13, 16, 17, 18]] = 0.0
        controller.maps[(5, 5)] = maps
        mask = controller.blend_mask()
        assert mask[..., 2, 2] == (1.0 if fill else 0.0)


def test_alignment_and_default_blend_words():
    assert ac.global_alignment([5, 7, 9], [5, 8, 7, 9]) == [(0, 0), (1, 2), (2, 3)]
    assert ac.differing_words("orange heart", "blue heart") == ("orange", "blue")
    assert ac.resolved_mode("auto", "peach", "red apple") == "refine"
    assert ac.resolved_mode("auto", "tiger face", "cat face") == "replace"


def test_cli_edit_writes_the_set_with_the_mask(tmp_path, tiny_sd_model_dir, capsys):
    img = tmp_path / "in.png"
    save_image(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)), img)
    edit = tmp_path / "edit.png"
    base = ["edit", "--input", str(img), "--model", tiny_sd_model_dir, "--steps", "3", "--method", "ddim",
            "--source-prompt", "red heart", "--target-prompt", "red face"]
    assert main([*base, "--output", str(edit), "--blend", "heart,face", "control.blend_start=0"]) == 0
    rec = json.loads(edit.with_suffix(".json").read_text())
    assert rec["control"]["mode"] == "replace" and rec["control"]["blend_words"] == ["heart", "face"]
    assert rec["control"]["blend_start"] == 0 and rec["mask"] == "edit.mask.png"
    assert (tmp_path / "edit.mask.png").is_file() and (tmp_path / "edit.reconstruction.png").is_file()
    assert "attention control replace" in capsys.readouterr().out
    plain = tmp_path / "plain.png"
    assert main([*base, "--output", str(plain), "--control", "none"]) == 0
    rec = json.loads(plain.with_suffix(".json").read_text())
    assert rec["control"]["mode"] == "none" and rec["mask"] is None and rec["edit_nfe"] == 6
    assert not (tmp_path / "plain.mask.png").exists()
    before = img.read_bytes()
    for argv, message in [([*base, "--output", str(img)], "would overwrite the input image"),
                          ([*base, "--output", str(tmp_path / "x.png"), "control.cross_replace=2"],
                           "cross_replace must be in"),
                          ([*base, "--output", str(tmp_path / "x.png"), "--reweight", "heart"], "WORD=SCALE"),
                          ([*base, "--output", str(tmp_path / "x.png"), "--blend", "cat"], "neither prompt")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert img.read_bytes() == before and not (tmp_path / "x.png").exists()


def test_edit_api_returns_edit_reconstruction_and_mask(prior):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    res = editing.edit(image, source_prompt="red heart", target_prompt="red face", method="ddim", steps=3,
                       model=prior, control_params={"blend_start": 0.0})
    assert res.image.shape == res.reconstruction.shape == image.shape
    assert res.mask is not None and res.mask.shape == (1, 1, 32, 32)
    assert set(res.mask.unique().tolist()) <= {0.0, 1.0}
    assert res.record["mask_fraction"] == pytest.approx(float(res.mask.mean()))


def test_pixel_blend_keeps_the_reconstruction_outside_the_mask_and_the_edit_inside(prior):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    runs = [editing.edit(image, source_prompt="red heart", target_prompt="red face", method="ddim", steps=3,
                         model=prior, control_params={"blend_start": 0.0, "pixel_blend": on})
            for on in (False, True)]
    latent_only, blended = runs
    inside = blended.mask.bool().expand_as(image)
    assert 0 < blended.mask.mean() < 1
    assert torch.equal(blended.image[~inside], blended.reconstruction[~inside])
    assert torch.equal(blended.image[inside], latent_only.image[inside])
    # what it changes: the decoder's spill outside the mask
    assert not torch.equal(latent_only.image[~inside], latent_only.reconstruction[~inside])
    assert blended.record["control"]["pixel_blend"] is True


def test_bench_edit_scores_both_controls_and_resumes(tmp_path, tiny_sd_model_dir, capsys):
    out = tmp_path / "bench"
    edits = tmp_path / "edits.yaml"
    emoji = "examples/emoji"
    edits.write_text("edits:\n"
                     f"  - {{image: {emoji}/038-32.png, source: red heart, target: red face, kind: colour}}\n"
                     f"  - {{image: {emoji}/014-32.png, source: red heart, target: grinning face, "
                     "kind: object}\n"
                     f"  - {{image: {emoji}/038-32.png, source: red heart, target: blue heart, "
                     "kind: colour}\n")
    argv = ["bench-edit", "--model", tiny_sd_model_dir, "--edits", str(edits), "--methods", "ddim",
            "--steps", "2", "--samples", "4", "--out", str(out), "control.blend_start=0"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    modes = [(r["control"], r["control_mode"]) for r in res["rows"]]
    assert modes[:2] == [("none", "none"), ("auto", "replace")]
    w_edit = editing.default_edit_guidance("ddim") or 1.0
    for r in res["rows"]:  # DDIM inversion: 2 NFE; then 2 steps of reconstruction + edit
        controlled = r["control"] == "auto"
        assert r["edit_guidance"] == (w_edit if controlled else 1.0)
        assert r["nfe"] == 2 + 2 * (4 if controlled and w_edit != 1.0 else 2)
        assert isinstance(r["edit_success"], float) and isinstance(r["input_success"], float)
    for r in res["rows"]:  # the score per draw, its mean and its standard error
        assert len(r["success_draws"]) == 4
        assert r["edit_success"] == pytest.approx(sum(r["success_draws"]) / 4, abs=1e-6)
        assert r["edit_success_se"] == pytest.approx(torch.tensor(r["success_draws"]).std().item() / 2,
                                                     rel=1e-3)
    auto_all = next(s for s in res["summary"] if s["kind"] == "all" and s["control"] == "auto")
    gaps = [a["edit_success"] - n["edit_success"] for n, a in zip(res["rows"][::2], res["rows"][1::2])]
    assert auto_all["vs_none"]["difference"] == pytest.approx(sum(gaps) / 3, abs=1e-6)
    none_row, auto_row = res["rows"][:2]
    assert none_row["mask_fraction"] == auto_row["mask_fraction"]  # one mask for both controls
    kinds = {s["kind"] for s in res["summary"]}
    assert kinds == {"all", "colour", "object"}
    assert "| all (3) | ddim | auto |" in (out / "results.md").read_text()
    red_face, blue_heart = (out / "outputs" / f"038-32-to-{t}" / "ddim-auto.png"
                            for t in ("red-face", "blue-heart"))
    assert red_face.is_file() and blue_heart.is_file()  # two edits of one image: two sets of outputs
    assert red_face.read_bytes() != blue_heart.read_bytes()
    capsys.readouterr()
    lines = (out / "results.jsonl").read_text()
    assert main(argv) == 0  # resumed: nothing run again
    assert (out / "results.jsonl").read_text() == lines
    # the tables are rewritten; the wall time still counts the runs that made the rows
    assert json.loads((out / "results.json").read_text())["wall_time_s"] >= res["wall_time_s"] > 0
    assert main([*argv[:-1], "control.blend_start=0.5"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main([*argv[:-1], "newton.steps=2"]) == 2
    assert "control.key=value" in capsys.readouterr().err


def test_paired_difference_is_the_mean_gap_with_its_draw_noise():
    """Two edits, 4 shared draws: the gap is the mean over edits and draws; its error is that of the per-draw
    mean over the edits (two edits with the same per-draw gaps are no more certain than one); the error over
    edits is that of the edits' mean gaps (zero when they agree, whatever the draws); an edit without draws
    gives None."""
    def row(image, control, draws):
        return {"image": image, "target": "t", "method": "m", "control": control, "success_draws": draws}
    rows = [row("a", "none", [0, 0, 0, 0]), row("a", "auto", [1, 2, 3, 4]),
            row("b", "none", [1, 1, 1, 1]), row("b", "auto", [1, 1, 1, 5])]
    got = paired_difference(rows, "auto", "none")
    assert got["difference"] == pytest.approx((2.5 + 1.0) / 2)
    assert got["se"] == pytest.approx(torch.tensor([0.5, 1.0, 1.5, 4.0]).std().item() / 2)
    assert got["edits"] == 2
    assert got["se_edits"] == pytest.approx(torch.tensor([2.5, 1.0]).std().item() / 2 ** 0.5)
    one = paired_difference(rows[:2], "auto", "none")
    twice = paired_difference(rows[:2] + [row("c", "none", [0, 0, 0, 0]), row("c", "auto", [1, 2, 3, 4])],
                              "auto", "none")
    assert twice["se"] == pytest.approx(one["se"]) and twice["edits"] == 2
    assert one["se_edits"] is None  # one edit: no spread to take
    agree = paired_difference(rows[:2] + [row("c", "none", [0, 0, 0, 0]), row("c", "auto", [2, 2, 3, 3])],
                              "auto", "none")
    assert agree["se_edits"] == pytest.approx(0.0, abs=1e-12) and agree["se"] > 0
    assert paired_difference(rows[:3] + [row("b", "auto", None)], "auto", "none") is None


def test_app_fields_become_control_settings_and_the_job_writes_the_mask(tmp_path, tiny_sd_model_dir):
    from studio.workflows import web

    assert web.control_params_from_fields("", "") == {}
    assert web.control_params_from_fields("-", None) == {"blend_words": ()}
    assert web.control_params_from_fields(" heart , face", "face=2.5") == {
        "blend_words": ("heart", "face"), "reweight_words": ("face",), "reweight_scale": 2.5}
    with pytest.raises(StudioError, match="WORD=SCALE"):
        web.control_params_from_fields("", "face=big")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    res = web.run_edit(image, source_prompt="red heart", target_prompt="red face", method="ddim", steps=2,
                       guidance=None, strength=1.0, model=tiny_sd_model_dir, out_root=tmp_path,
                       control="auto", control_params={"blend_start": 0.0}, edit_guidance=2.0)
    assert set(res["files"]) == {"edit", "reconstruction", "mask", "record"}
    record = json.loads(open(res["files"]["record"]).read())
    assert record["edit_guidance"] == 2.0 and record["control"]["mode"] == "replace"
    assert record["edit_nfe"] == 2 * 4  # both rows guided when the edit branch is
    with pytest.raises(StudioError, match="cross_replace"):
        web.run_edit(image, source_prompt="red heart", target_prompt="red face", method="ddim", steps=2,
                     guidance=None, strength=1.0, model=tiny_sd_model_dir, out_root=tmp_path / "bad",
                     control_params={"cross_replace": 3})
    assert not (tmp_path / "bad").exists()


def test_default_edit_guidance_comes_from_the_config(tmp_path, monkeypatch, prior):
    import shutil

    from studio.core import paths

    shutil.copytree(paths.config_dir(), tmp_path / "configs")
    yaml_path = tmp_path / "configs" / "edit" / "attention_control.yaml"
    text = yaml_path.read_text().split("edit_guidance:")[0]  # the section is the file's last
    monkeypatch.setenv("STUDIO_CONFIG_DIR", str(tmp_path / "configs"))
    yaml_path.write_text(text + "\nedit_guidance: {ddim: 2.5, newton: oops}\n")
    assert editing.default_edit_guidance("ddim") == 2.5 and editing.default_edit_guidance("null-text") is None
    with pytest.raises(StudioError, match="edit_guidance.newton must be a number"):
        editing.default_edit_guidance("newton")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    controlled = editing.edit(image, source_prompt="red heart", target_prompt="red face", method="ddim",
                              steps=2, model=prior)
    plain = editing.edit(image, source_prompt="red heart", target_prompt="red face", method="ddim", steps=2,
                         model=prior, control="none")
    assert controlled.record["edit_guidance"] == 2.5 and plain.record["edit_guidance"] == 1.0


def test_a_prompt_cut_by_the_encoder_is_refused(prior):
    tok = prior.tokenizer
    end = 1 + sum(_tokens(prior, "red heart"))  # the end-of-text position
    ac.replace_mapper(tok, "red heart", "red face", end + 1)  # end of text is the last position: fits
    ac.refine_mapper(tok, "red heart", "red heart", end + 1)
    for mapper in (ac.replace_mapper, ac.refine_mapper):
        with pytest.raises(StudioError, match="too long"):
            mapper(tok, "red heart", "red heart", end)  # no room for end of text: the encoder cut the prompt


class _Passthrough:
    """A controller that reads every layer's probabilities and changes nothing."""

    def needs_probabilities(self, is_cross, queries):
        return True

    def __call__(self, probs, batch, is_cross):
        return probs


@pytest.mark.parametrize("cross", [False, True])
def test_the_processor_computes_what_diffusers_computes(cross):
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6 if cross else None, heads=2, dim_head=4,
                     norm_num_groups=2, qk_norm="layer_norm", residual_connection=True)
    with torch.no_grad():  # the layer norms start as the identity: make them matter
        for norm in (attn.norm_q, attn.norm_k):
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 3, 3)
    context = torch.randn(2, 5, 6) if cross else None
    with torch.no_grad():
        want = AttnProcessor2_0()(attn, x, context)
        got = ac.ControlledAttnProcessor(_Passthrough())(attn, x, context)
    assert torch.allclose(got, want, atol=1e-5)


def test_added_key_value_attention_is_refused_and_nothing_is_installed():
    class AddedKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.add_k_proj = torch.nn.Linear(2, 2)

    unet = torch.nn.Sequential(AddedKV())
    with pytest.raises(StudioError, match="added key/value"):
        with ac.attention_processors(unet, _Passthrough()):
            pass


def test_per_method_settings_sit_between_the_file_and_the_overrides():
    file_value = editing.control_settings().cross_replace
    null_text = editing.control_settings("auto", (), "null-text")
    assert null_text.cross_replace != file_value  # the file's per_method entry for null-text
    assert editing.control_settings("auto", (), "newton").cross_replace == file_value
    assert editing.control_settings("auto", ["cross_replace=0.7"], "null-text").cross_replace == 0.7


def test_the_summary_says_when_the_edited_words_have_their_own_fraction():
    control = {"cross_replace": 0.8, "self_replace": 0.4, "cross_replace_edited": None}
    assert editing.describe_injection(control) == ("cross-attention from the source for 80% of the steps, "
                                                   "self-attention for 40%")
    assert "(the edited words 20%)" in editing.describe_injection({**control, "cross_replace_edited": 0.2})
