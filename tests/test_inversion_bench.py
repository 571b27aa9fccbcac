"""``studio bench-inversion`` and ``studio edit-strip`` on a tiny random SD-style pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.latent_prior import load_latent_prior
from studio.eval import edit_strip
from studio.eval import inversion_bench as ib
from studio.cli import main
from studio.core.io import load_image

EMOJI = str(Path(__file__).resolve().parent.parent / "examples" / "emoji")


@pytest.fixture(scope="module")
def prior(tiny_sd_model_dir):
    return load_latent_prior(tiny_sd_model_dir)


def test_bench_writes_every_field_and_counts_nfe(tmp_path, tiny_sd_model_dir, capsys):
    out = tmp_path / "bi"
    # Newton with one iteration, no step halving and tol 0 has a fixed cost: per step ε(z_s) + ε(z) (the DDIM
    # estimate and its residual), one J·r finite difference, one candidate = 4 UNet evaluations.
    argv = ["bench-inversion", "--model", tiny_sd_model_dir, "--size", "32", "--limit", "1",
            "--methods", "ddim,newton", "--steps", "2", "--ddim-steps", "2", "--out", str(out), "--quiet",
            "newton.newton_steps=1", "newton.max_halvings=0", "newton.tol=0"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"ddim", "newton"} and len(res["rows"]) == 2
    for r in rows.values():
        assert set(ib.ROW_FIELDS) <= set(r)
        assert r["status"] == "ok" and r["image"] == "000-32" and r["prompt"] == "keycap: 2"  # its caption
        assert all(r[k] is not None for k in ib.ROW_FIELDS if k != "error")
        assert r["wall_time_s"] == pytest.approx(r["inversion_time_s"] + r["regeneration_time_s"])
        assert r["nfe_reported"] == r["inversion_nfe"]  # the hook agrees with the solver's own count
        assert (out / r["output"]).is_file()
    # w = 1: one UNet evaluation per call; regeneration is one per step
    assert (rows["ddim"]["inversion_nfe"], rows["ddim"]["nfe"], rows["ddim"]["unet_calls"]) == (2, 4, 4)
    newton = rows["newton"]
    assert (newton["inversion_nfe"], newton["nfe"], newton["unet_calls"]) == (8, 10, 10)
    assert rows["newton"]["grad_nfe"] == 0
    for key in ("machine", "command", "model", "vae_ceiling", "goal_checks", "summary", "unet_timing"):
        assert key in res
    assert res["command"][:2] == ["studio", "bench-inversion"] and res["ddim_steps"] == [2]
    assert res["vae_ceiling"]["psnr"] == pytest.approx(rows["ddim"]["vae_psnr"])
    for name in ("psnr_vs_nfe.png", "psnr_vs_time.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    md = (out / "results.md").read_text()
    assert "| newton | 1 | 2 | 1 | 10 | 10 |" in md and "VAE round trip (ceiling)" in md
    assert "Newton w=1 steps 2 (NFE 10)" in md  # its goal-check line (one DDIM point: nothing to interpolate)
    # resuming with the same --out runs nothing new
    capsys.readouterr()
    assert main(argv) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_cfg_counts_two_per_batched_call_and_null_text(prior, tmp_path):
    """At w > 1 one batched UNet call evaluates 2 latents (NFE 2, UNet calls 1). Null-text with one inner
    step: pivots (w = 1) 1 per step, then per step the conditional branch, one inner forward+backward and
    the guided step."""
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    image = ib.InversionImage("x", x, "red heart")
    res = ib.run_inversion_bench(prior, [image], "ddim,null-text", [2], "1,3", tmp_path, ddim_steps=[2],
                                 overrides=["null-text.inner_steps=1"], progress=False)
    rows = {(r["method"], r["guidance"]): r for r in res.rows}
    assert set(rows) == {("ddim", 1.0), ("ddim", 3.0), ("null-text", 3.0)}
    assert any("null-text at guidance 1 skipped" in n for n in res.notes)
    d3 = rows[("ddim", 3.0)]
    assert (d3["nfe"], d3["unet_calls"], d3["inversion_nfe"], d3["nfe_reported"]) == (8, 4, 4, 4)
    nt = rows[("null-text", 3.0)]
    assert (nt["inversion_nfe"], nt["regeneration_nfe"], nt["unet_calls"], nt["grad_nfe"]) == (10, 4, 10, 2)
    assert nt["nfe_reported"] == 10
    assert res.checks == []  # no Newton rows: nothing to compare


def test_goal_checks_from_the_summary():
    def e(method, steps, nfe, psnr, time_s, w=1.0):
        return {"method": method, "guidance": w, "steps": steps, "runs": 4, "nfe": nfe, "psnr": psnr,
                "wall_time_s": time_s}

    summary = [e("ddim", 5, 10, 20.0, 0.1), e("ddim", 20, 40, 24.0, 0.4), e("newton", 5, 20, 26.0, 0.3),
               e("newton", 20, 80, 30.0, 1.2), e("null-text", 10, 300, 27.0, 10.0, 7.5)]
    checks = ib.goal_checks(summary)
    # DDIM at NFE 20: halfway between NFE 10 and 40 in log NFE → 22 dB; Newton 26 dB → +4 dB
    assert "Newton − DDIM = +4.00 dB (goal ≥ +3 dB: met)" in checks[0]
    assert "not measured at this NFE" in checks[1]  # NFE 80 is beyond DDIM's curve: no extrapolation
    assert "steps 20, 30.00 dB in 1.2 s = 12.0% of null-text's time" in checks[2]
    assert ib.psnr_at_nfe(ib._curve(summary, "ddim", 1.0), 10) == (20.0, "measured at steps 5")


def test_bad_bench_input_is_one_error_line(tiny_sd_model_dir, tmp_path, capsys):
    base = ["bench-inversion", "--model", tiny_sd_model_dir, "--size", "32", "--limit", "1",
            "--out", str(tmp_path)]
    assert main([*base, "--methods", "magic"]) == 2
    assert "unknown inversion method 'magic'" in capsys.readouterr().err
    assert main([*base, "--steps", "0"]) == 2
    assert "--steps must be positive integers, got '0'" in capsys.readouterr().err
    assert main([*base, "newton.bogus=1"]) == 2
    assert "unknown newton parameter 'bogus'" in capsys.readouterr().err
    assert main([*base, "--guidance", "-1"]) == 2
    assert "guidance must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()


def test_default_edits_config_points_at_held_out_emoji():
    edits = edit_strip.load_edits()
    captions = {e["files"]["64"]: e["caption"] for e in json.loads(Path(EMOJI, "captions.json").read_text())}
    assert len(edits) >= 3
    for spec in edits:
        assert captions[spec.image.split("/")[-1]] == spec.source and spec.target != spec.source


def test_edit_strip_layout_and_tiles(tiny_sd_model_dir, tmp_path, capsys):
    out = tmp_path / "strip.png"
    argv = ["edit-strip", "--model", tiny_sd_model_dir, "--methods", "ddim", "--steps", "2",
            "--output", str(out), "--seed", "3", "--edit", f"{EMOJI}/038-32.png|orange heart|blue heart",
            "--edit", f"{EMOJI}/014-32.png|peach|red apple"]
    assert main(argv) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    layout = side["layout"]
    with Image.open(out) as im:
        strip = np.asarray(im.convert("RGB"))
    # 4 columns (input | reconstruction | edit | blend mask) of 32 px tiles at 2x, 4 px gutters
    assert layout["tile"] == 64 and layout["width"] == 4 * 64 + 5 * 4
    assert strip.shape == (layout["height"], layout["width"], 3)
    line_h = layout["line_h"]
    # one line of column labels; per row 2 caption lines, a tile and a gutter; then the footer
    assert layout["header_h"] == line_h + 4 and layout["row_h"] == 2 * line_h + 64 + 4
    assert layout["height"] == layout["header_h"] + 2 * layout["row_h"] + layout["footer_lines"] * line_h + 4
    assert layout["footer_lines"] >= 1 and line_h >= 8
    for row, name in enumerate(("038-32.png", "014-32.png")):
        x, y = edit_strip.tile_origin(layout, row, 0)
        expected = (load_image(f"{EMOJI}/{name}")[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        expected = expected.repeat(2, axis=0).repeat(2, axis=1)
        assert np.array_equal(strip[y:y + 64, x:x + 64], expected)
    x, y = edit_strip.tile_origin(layout, 0, 2)
    assert not np.array_equal(strip[y:y + 64, x:x + 64], strip[y:y + 64, 4:4 + 64])  # edit ≠ input
    assert side["seed"] == 3 and [r["target_prompt"] for r in side["records"]] == ["blue heart", "red apple"]
    x, y = edit_strip.tile_origin(layout, 0, 3)
    mask_tile = strip[y:y + 64, x:x + 64]
    assert set(np.unique(mask_tile).tolist()) <= {0, 255}  # the blend mask, black or white
    assert "2 edits x 1 method(s)" in capsys.readouterr().out
    assert main(["edit-strip", "--model", tiny_sd_model_dir, "--edit", "no-bars-here"]) == 2
    assert "IMAGE|SOURCE PROMPT|TARGET PROMPT" in capsys.readouterr().err
