"""``studio bench``: result files and fields, resuming, input errors, honest classical baselines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from studio.core.config import load_task, to_plain
from studio.core.errors import StudioError
from studio.core.io import load_image, measurement_display, save_image
from studio.eval import bench
from studio.eval.bench import baselines, report
from studio.eval.bench import bench_goals, goals_markdown, merge_results, overhead_ratio, run_bench
from studio.eval.bench.records import settings_id
from studio.core.metrics import psnr
from studio.workflows.restoration import degrade

SIZE = 32
FIELDS = (
    "task",
    "solver",
    "image",
    "seed",
    "status",
    "psnr",
    "ssim",
    "nfe",
    "grad_nfe",
    "wall_time_s",
    "peak_memory_mb",
)


def smooth_image(size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """A smooth colour image: low-frequency sinusoids per channel, in [0.1, 0.9]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    chans = []
    for _ in range(3):
        a, b, c = (torch.rand(3, generator=g) * 2 * math.pi).tolist()
        chans.append(0.5 + 0.2 * torch.sin(a * xx + c) * torch.cos(b * yy))
    return torch.stack(chans)[None].clamp(0.1, 0.9)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_images")
    save_image(smooth_image(), folder / "smooth.png")
    return folder


@pytest.fixture(scope="module")
def first_bench(tiny_pixel_model_dir, image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    res = run_bench(
        tasks=["inpaint_box"],
        solvers=["ddim", "cdim"],
        images=str(image_dir),
        model=tiny_pixel_model_dir,
        steps={"ddim": 2, "cdim": 2},
        out=out,
        progress=False,
        command=["studio", "bench", "test"],
    )
    return res, out


def test_bench_writes_results_and_every_field(first_bench):
    res, out = first_bench
    for name in (
        "results.json",
        "results.jsonl",
        "results.md",
        "psnr_vs_nfe.png",
        "psnr_vs_time.png",
        "residual_vs_step.png",
    ):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    for key in ("platform", "cpu", "torch", "diffusers", "device", "torch_threads"):
        assert key in data["machine"]
    assert data["command"] == ["studio", "bench", "test"]
    assert data["model"]["class"] == "DiffusersPixelPrior"
    rows = data["rows"]
    assert {r["solver"] for r in rows} == {"ddim", "cdim", "classical:biharmonic"}
    for r in rows:
        assert r["status"] == "ok"
        for f in FIELDS:
            assert r[f] is not None, (r["solver"], f)
        assert 0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1 and r["wall_time_s"] > 0
        assert math.isfinite(r["peak_memory_mb"])
        assert math.isfinite(r["residual"]) and r["clean_residual"] > 0
        if r["kind"] == "diffusion":
            assert r["nfe"] > 0 and r["overhead_ratio"] > 0 and r["t_fwd_s"] > 0 and r["t_fwdbwd_s"] > 0
            assert 0 < r["network_time_s"] <= r["wall_time_s"]  # measured inside the solve
            if r["solver"] == "ddim":  # forward-only: wall time holds the network time, so the ratio is >= 1
                assert r["overhead_ratio"] >= 1.0
            assert len(r["residual_trace"]) == 2 and all(v > 0 for v in r["residual_trace"])  # one per step
        else:
            assert r["nfe"] == 0 and r["grad_nfe"] == 0 and r["overhead_ratio"] is None
            assert r["residual_trace"] is None
    # one measurement per (task, image, seed): every run sees the same clean-image residual
    assert len({round(r["clean_residual"], 6) for r in rows}) == 1
    cdim = next(r for r in rows if r["solver"] == "cdim")
    assert cdim["grad_nfe"] > 0 and cdim["params"]["steps"] == 2
    assert len((out / "results.jsonl").read_text().splitlines()) == 3
    md = (out / "results.md").read_text()
    assert (
        "| inpaint_box | classical:biharmonic |" in md and "## Baselines" in md and "studio bench test" in md
    )
    strip = load_image(out / "strips" / "inpaint_box-smooth-s0.png")
    assert strip.shape[-2:] == (SIZE, 5 * SIZE + 4 * 2)  # reference, y, ddim, cdim, biharmonic
    assert res.table.splitlines()[0].startswith("| task | solver |")


def test_rerun_into_same_out_skips_completed_runs(first_bench, tiny_pixel_model_dir, image_dir, monkeypatch):
    _, out = first_bench
    before = (out / "results.jsonl").read_text()

    def no_solve(*args, **kwargs):
        raise AssertionError("a completed run was solved again")

    monkeypatch.setattr("studio.workflows.restoration.restore", no_solve)
    res = run_bench(
        tasks=["inpaint_box"],
        solvers=["ddim", "cdim"],
        images=str(image_dir),
        model=tiny_pixel_model_dir,
        steps={"ddim": 2, "cdim": 2},
        out=out,
        progress=False,
    )
    assert (out / "results.jsonl").read_text() == before
    assert len(res.rows) == 3
    # other settings into the same folder are refused, not mixed in
    with pytest.raises(StudioError, match="other settings"):
        run_bench(
            tasks=["inpaint_box"],
            solvers=["ddim"],
            images=str(image_dir),
            model=tiny_pixel_model_dir,
            steps={"ddim": 3},
            out=out,
            progress=False,
        )


def test_resume_keys_steps_per_solver(tiny_pixel_model_dir, image_dir, tmp_path):
    """A resume that adds a solver with its own --steps keeps the finished rows (their solver's steps are
    unchanged); rows written with the old whole-run id are accepted; another step count for a finished
    solver is refused, naming it."""
    out = tmp_path / "out"
    kw = dict(tasks=["inpaint_box"], images=str(image_dir), model=tiny_pixel_model_dir, out=out,
              progress=False)
    first = run_bench(solvers=["ddim"], steps={"ddim": 2}, **kw)
    done = (out / "results.jsonl").read_text()
    res = run_bench(solvers=["ddim", "cdim"], steps={"ddim": 2, "cdim": 2}, **kw)
    assert (out / "results.jsonl").read_text().startswith(done)
    assert len(res.rows) == len(first.rows) + 1 and {r["solver"] for r in res.rows} >= {"ddim", "cdim"}
    ddim_id = next(r["settings"] for r in res.rows if r["solver"] == "ddim")
    cdim_id = next(r["settings"] for r in res.rows if r["solver"] == "cdim")
    assert ddim_id == settings_id(tiny_pixel_model_dir, [], "cpu", 2) and cdim_id == ddim_id  # both 2 steps
    with pytest.raises(StudioError, match=r"the steps of cdim\)"):
        run_bench(solvers=["ddim", "cdim"], steps={"ddim": 2, "cdim": 3}, **kw)
    # a folder from before per-solver ids: rows carry the id of the whole --steps dict
    whole = settings_id(tiny_pixel_model_dir, [], "cpu", {"ddim": 2, "cdim": 2})
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    (out / "results.jsonl").write_text("".join(json.dumps({**r, "settings": whole}) + "\n" for r in rows))
    assert len(run_bench(solvers=["ddim", "cdim"], steps={"ddim": 2, "cdim": 2}, **kw).rows) == len(rows)


def test_unsupported_solver_is_recorded_and_latent_solvers_skipped(tiny_pixel_model_dir, image_dir, tmp_path):
    res = run_bench(
        tasks="motion_blur",
        solvers="ddrm,psld",
        images=str(image_dir),
        model=tiny_pixel_model_dir,
        out=tmp_path / "out",
        progress=False,
    )
    by_solver = {r["solver"]: r for r in res.rows}
    assert by_solver["ddrm"]["status"] == "unsupported" and by_solver["ddrm"]["psnr"] is None
    assert "psld" not in by_solver and any("psld" in n and "latent" in n for n in res.notes)
    assert {"classical:wiener", "classical:unsupervised_wiener", "classical:richardson_lucy"} <= set(
        by_solver
    )
    assert "| motion_blur | ddrm | 0 | unsupported |" in res.table


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"solvers": "ddim,nosuch"}, "nosuch"),
        ({"tasks": "inpaint_box,deblur_everything"}, "deblur_everything"),
        ({"tasks": "inpaint_mask"}, "inpaint_mask"),
        ({"steps": {"dps": 0}}, "positive integer"),
        ({"steps": ["dps=abc"]}, "'abc'"),
        ({"steps": ["fancy=3"]}, "fancy"),
        ({"seeds": "0,x"}, "'x'"),
        ({"limit": 0}, "--limit"),
        ({"noise_sigma": 5.0}, "5.0"),
        ({"overrides": ["scale=0.3"]}, "scale=0.3"),
        ({"overrides": ["operator.nope=1"]}, "nope"),
        ({"solvers": "p2l,p2l:tune_promt=false"}, "unknown config key 'tune_promt'"),
        ({"solvers": "p2l:tune_prompt=maybe"}, "'maybe' for config key 'tune_prompt'"),
        ({"solvers": "p2l:seed=3"}, "'seed'"),
        ({"solvers": "p2l:tune_prompt"}, "key=value"),
        ({"solvers": "nosuch:scale=1"}, "nosuch"),
        ({"example_size": 48}, "48"),
    ],
)
def test_bad_input_raises_studio_error_naming_it(kwargs, message, tmp_path):
    with pytest.raises(StudioError, match=message):
        run_bench(out=tmp_path / "out", progress=False, **kwargs)


def test_images_folder_without_pngs(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(StudioError, match="no PNG images"):
        run_bench(images=str(tmp_path), out=tmp_path / "out", progress=False)
    with pytest.raises(StudioError, match="folder"):
        run_bench(images=str(tmp_path / "missing"), out=tmp_path / "out", progress=False)


def _baseline_psnrs(task: str, clean: torch.Tensor, overrides: tuple[str, ...] = ()
                    ) -> tuple[float | None, dict[str, float]]:
    d = degrade(clean, task, seed=0, overrides=overrides)
    cfg = to_plain(load_task(task, list(overrides)))
    fns = baselines.baselines_for(cfg, d.operator, d.y, (SIZE, SIZE), 0)
    y_psnr = psnr(d.y.clamp(0, 1), clean) if d.y.shape == clean.shape else None
    return y_psnr, {name: psnr(baselines.to_chw(fn()), clean) for name, fn in fns.items()}


@pytest.mark.parametrize(
    "task, names",
    [
        ("gaussian_blur", ["classical:wiener", "classical:richardson_lucy"]),
        ("inpaint_box", ["classical:biharmonic"]),
        ("denoise", ["classical:tv_chambolle"]),
    ],
)
def test_classical_baselines_beat_the_measurement_on_a_smooth_image(task, names):
    """Honest baselines: on a smooth image they improve on y itself. The blur is DPS's 61-tap, sigma 3 px
    (the 32-px default, sigma 1, hardly blurs a smooth image: y is then as good as the noise allows)."""
    clean = smooth_image()
    strong = ("operator.kernel_size=61", "operator.sigma=3.0") if task == "gaussian_blur" else ()
    y_psnr, scores = _baseline_psnrs(task, clean, strong)
    for name in names:
        assert scores[name] > y_psnr + 0.3, (name, scores[name], y_psnr)


def test_richardson_lucy_iterations_follow_the_blur_width():
    from studio.core.operators import make_operator

    assert baselines.richardson_lucy_iters(make_operator("gaussian_blur", kernel_size=61, sigma=3.0)) == 20
    assert baselines.richardson_lucy_iters(make_operator("gaussian_blur", kernel_size=7, sigma=1.0)) == 7
    assert baselines.richardson_lucy_iters(make_operator("gaussian_blur", kernel_size=7, sigma=0.3)) == 3
    assert baselines.richardson_lucy_iters(make_operator("motion_blur", kernel_size=61, seed=0)) == 20
    assert baselines.richardson_lucy_iters(make_operator("motion_blur", kernel_size=15, seed=0)) == 5


def test_deconvolution_baselines_beat_blurred_emoji_on_average():
    from studio.training.model_card import load_examples

    images = load_examples(SIZE)[0][:5]
    results = [_baseline_psnrs("gaussian_blur", img[None]) for img in images]
    y_mean = np.mean([y for y, _ in results])
    for name in ("classical:wiener", "classical:unsupervised_wiener", "classical:richardson_lucy"):
        assert np.mean([scores[name] for _, scores in results]) > y_mean + 0.5, name


def test_motion_blur_baselines_run_and_are_finite():
    _, scores = _baseline_psnrs("motion_blur", smooth_image())
    assert len(scores) == 3 and all(math.isfinite(v) for v in scores.values())


def test_bicubic_baseline_beats_nearest_upsampling():
    clean = smooth_image()
    d = degrade(clean, "super_resolution", seed=0)
    nearest = measurement_display(d.y, (SIZE, SIZE))
    _, scores = _baseline_psnrs("super_resolution", clean)
    assert scores["classical:bicubic"] > psnr(nearest, clean)


def test_blur_kernel_and_padding_reproduce_the_operator():
    """The baselines deconvolve the operator's own blur: reflect-extend + 'same' convolution == A(x)."""
    from scipy.signal import convolve

    clean = smooth_image()
    for task in ("gaussian_blur", "motion_blur"):
        d = degrade(clean, task, seed=3, overrides=["noise.sigma=0"])
        k = baselines.blur_kernel(d.operator)
        r = k.shape[0] // 2
        padded = baselines.reflect_pad(baselines.to_hwc(clean), r, r)
        blurred = np.stack([convolve(padded[:, :, c], k, mode="same") for c in range(3)], 2)[
            r : r + SIZE, r : r + SIZE
        ]
        assert np.abs(blurred - baselines.to_hwc(d.y)).max() < 1e-5


def test_overhead_ratio_and_parsers():
    timing = {"t_fwd_s": 0.05, "t_fwdbwd_s": 0.1}
    assert overhead_ratio(1.4, 10, 4, timing) == pytest.approx(1.4 / (6 * 0.05 + 4 * 0.1))
    assert overhead_ratio(1.0, 0, 0, timing) is None
    # in-run normalisation: 10 forward calls took 0.8 s in the run, 0.4 s of it in the 4 forwards recorded
    # for autograd; their backward passes are estimated from the calibration's backward-to-recorded-forward
    # ratio (0.1 - 0.06) / 0.06, not against the faster no-grad forward (which would double-count recording)
    timing["t_fwd_grad_s"] = 0.06
    network = bench.NetworkTimer(object(), "cpu")
    network.time_s, network.calls, network.grad_time_s = 0.8, 10, 0.4
    assert overhead_ratio(1.4, 10, 4, timing, network) == pytest.approx(1.4 / (0.8 + 0.4 * (0.04 / 0.06)))
    # a real forward-hook timer splits recorded and no-grad forwards
    net = torch.nn.Linear(3, 3)
    with bench.NetworkTimer(net, "cpu") as timer:
        with torch.no_grad():
            net(torch.zeros(2, 3))
        net(torch.zeros(1, 3, requires_grad=True)).sum().backward()
    assert (timer.calls, timer.grad_calls, timer.samples, timer.grad_samples) == (2, 1, 3, 1)
    assert 0 < timer.grad_time_s < timer.time_s
    assert bench.parse_steps(["dps=100", "ddrm=20,cdim=5"]) == {"dps": 100, "ddrm": 20, "cdim": 5}
    assert bench.parse_seeds("0, 2,2") == [0, 2]


def test_cli_bench_prints_table_and_errors_exit_2(tiny_pixel_model_dir, image_dir, tmp_path, capsys):
    from studio.cli import main

    out = tmp_path / "cli"
    rc = main(
        [
            "bench",
            "--tasks",
            "denoise",
            "--solvers",
            "ddim",
            "--steps",
            "ddim=1",
            "--images",
            str(image_dir),
            "--model",
            tiny_pixel_model_dir,
            "--out",
            str(out),
            "--quiet",
            "noise.sigma=0.05",
        ]
    )
    printed = capsys.readouterr().out
    assert (
        rc == 0 and str(out / "results.md") in printed and "| denoise | classical:tv_chambolle |" in printed
    )
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["solver"] for r in rows} == {"ddim", "classical:tv_chambolle"}
    assert "noise.sigma=0.05" in json.loads((out / "results.json").read_text())["task_overrides"]
    assert main(["bench", "--solvers", "warp", "--out", str(tmp_path / "x")]) == 2
    assert "studio: error: unknown solver 'warp'" in capsys.readouterr().err


def test_solver_spec_labels_are_canonical():
    spec = bench.parse_solver_spec(" p2l : tune_prompt = False ")
    assert (spec.label, spec.base, spec.overrides) == ("p2l:tune_prompt=false", "p2l", ("tune_prompt=false",))
    assert bench.parse_solver_spec("dps").label == "dps" and not bench.parse_solver_spec("dps").overrides
    assert bench.parse_solver_spec("psld:steps=7:gluing=pinv").sets_steps
    labels = [s.label for s in bench.check_solvers(["p2l", "p2l:tune_prompt=false", "p2l:tune_prompt=FALSE"])]
    assert labels == ["p2l", "p2l:tune_prompt=false"]


def test_residual_trace_is_the_measurement_residual_of_the_clipped_x0():
    from studio.core.conventions import to_model

    clean = smooth_image()
    d = degrade(clean, "gaussian_blur", seed=0, overrides=["noise.sigma=0.01"])
    trace = bench.ResidualTrace(d.operator, d.y)
    x0 = to_model(clean) * 1.3  # out of [-1, 1] in places: the trace clips as an output image is clipped
    trace(0, 2, x0, x0)
    trace(1, 2, to_model(clean), to_model(clean))
    values = trace.values()
    assert values[0] == pytest.approx(bench.measurement_residual(d.operator, d.y, ((x0 + 1) / 2).clamp(0, 1)))
    assert values[1] == pytest.approx(bench.measurement_residual(d.operator, d.y, clean), rel=1e-5)
    assert values[1] == pytest.approx(0.01 * math.sqrt(clean.numel()), rel=0.1)  # clean: the noise's norm
    assert values[0] > values[1] and trace.time_s > 0


def _latent_run(solvers: str, model: str, image_dir, out):
    """Box inpainting at sigma 0.01 with 2-step latent solvers on the tiny SD pipeline."""
    return run_bench(tasks="inpaint_box", solvers=solvers, images=str(image_dir), model=model,
                     steps=["latent-dps=2,p2l=2"], noise_sigma=0.01, out=out, progress=False)


@pytest.fixture(scope="module")
def latent_bench(tiny_sd_model_dir, image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent_bench") / "out"
    return _latent_run("latent-dps,p2l,p2l:tune_prompt=false", tiny_sd_model_dir, image_dir, out), out


def test_latent_bench_records_residual_traces_and_the_frozen_prompt_variant(latent_bench):
    res, out = latent_bench
    rows = {r["solver"]: r for r in res.rows}
    assert set(rows) == {"latent-dps", "p2l", "p2l:tune_prompt=false", "classical:biharmonic"}
    for name in ("latent-dps", "p2l", "p2l:tune_prompt=false"):
        r = rows[name]
        assert r["status"] == "ok" and r["t_fwd_s"] > 0, (name, r["error"])
        assert len(r["residual_trace"]) == 2 and all(math.isfinite(v) for v in r["residual_trace"])
        assert math.isfinite(r["residual"]) and r["residual"] > 0
    tuned, frozen = rows["p2l"], rows["p2l:tune_prompt=false"]
    assert tuned["params"]["tune_prompt"] is True and frozen["params"]["tune_prompt"] is False
    assert frozen["solver_base"] == "p2l" and frozen["solver_overrides"] == ["tune_prompt=false"]
    assert frozen["solver_extra"]["prompt_drift"] == 0 < tuned["solver_extra"]["prompt_drift"]
    assert tuned["nfe"] == 2 * frozen["nfe"] == 4  # the prompt update is one more UNet pass per step
    assert (out / "outputs" / "inpaint_box-smooth-s0" / "p2l-tune_prompt-false.png").is_file()
    assert "| inpaint_box | p2l:tune_prompt=false | 1 |" in res.table
    entry = next(e for e in res.summary if e["solver"] == "p2l:tune_prompt=false")
    assert entry["residual_trace"] == pytest.approx(frozen["residual_trace"])
    assert (out / "residual_vs_step.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "## Variants against their base solver" in md
    assert "| inpaint_box | p2l | p2l:tune_prompt=false | 1 |" in md


def test_a_new_variant_resumes_into_the_same_bench(latent_bench, tiny_sd_model_dir, image_dir):
    """The variant label is part of the resume key: adding one runs only it."""
    _, out = latent_bench
    before = len((out / "results.jsonl").read_text().splitlines())
    variants = "p2l:tune_prompt=false,p2l:tune_prompt=false:prompt_steps=2"
    _latent_run(variants, tiny_sd_model_dir, image_dir, out)
    new = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()][before:]
    assert [r["solver"] for r in new] == ["p2l:tune_prompt=false:prompt_steps=2"]
    assert new[0]["params"]["prompt_steps"] == 2 and new[0]["status"] == "ok"


def test_a_text_guided_solver_gets_each_images_caption(tiny_sd_model_dir, tmp_path):
    """TReg is steered by a description of the image: the bench passes each image's caption as its prompt
    (a variant's own prompt= wins); without captions it refuses before any work."""
    folder = tmp_path / "images"
    folder.mkdir()
    save_image(smooth_image(), folder / "smooth.png")
    kwargs = dict(tasks="inpaint_box", images=str(folder), model=tiny_sd_model_dir, steps=["treg=2"],
                  noise_sigma=0.01, progress=False)
    with pytest.raises(StudioError, match="treg needs a text description of each image, and smooth has no "):
        run_bench(solvers="treg", out=tmp_path / "refused", **kwargs)
    assert not (tmp_path / "refused").exists()
    captions = [{"caption": "red heart", "files": {"64": "smooth.png"}}]
    (folder / "captions.json").write_text(json.dumps(captions))
    res = run_bench(solvers="treg,treg:prompt=grinning face,latent-dps", out=tmp_path / "out", **kwargs)
    rows = {r["solver"]: r for r in res.rows}
    assert rows["treg"]["status"] == "ok", rows["treg"]["error"]
    assert rows["treg"]["params"]["prompt"] == "red heart"
    assert rows["treg:prompt=grinning face"]["params"]["prompt"] == "grinning face"
    assert rows["latent-dps"]["params"]["prompt"] == ""  # the papers' empty prompt
    assert "treg: prompt = each image's caption" in (tmp_path / "out" / "results.md").read_text()


def test_variant_comparisons_pair_runs_on_the_same_measurement():
    def row(solver, image, psnr_db, residual, overrides=()):
        return {"task": "sr", "solver": solver, "image": image, "seed": 0, "status": "ok", "psnr": psnr_db,
                "residual": residual, "solver_base": "p2l", "solver_overrides": list(overrides)}

    frozen = ["tune_prompt=false"]
    rows = [
        row("p2l", "a", 20.0, 1.0),
        row("p2l:tune_prompt=false", "a", 19.0, 1.5, frozen),
        row("p2l", "b", 22.0, 2.0),
        row("p2l:tune_prompt=false", "b", 22.5, 1.9, frozen),
        row("p2l:tune_prompt=false", "c", 30.0, 0.1, frozen),  # no base run on image c: not paired
    ]
    (c,) = bench.variant_comparisons(rows)
    assert (c["base"], c["variant"], c["pairs"]) == ("p2l", "p2l:tune_prompt=false", 2)
    assert c["psnr_gain_db"] == pytest.approx(0.25) and c["residual_change"] == pytest.approx(-0.2)
    assert c["psnr_gain_std"] == pytest.approx(math.sqrt(2 * 0.75**2))  # gains 1.0 and -0.5
    assert c["base_higher_psnr"] == 1 and c["base_lower_residual"] == 1
    assert "| sr | p2l | p2l:tune_prompt=false | 2 | +0.250" in "\n".join(report._variants_section([c]))


def _entry(task, solver, psnr, ssim, wall, ratio=1.0, nfe=100):
    return {"task": task, "solver": solver, "runs": 4, "failed": 0, "unsupported": False, "psnr": psnr,
            "ssim": ssim, "wall_time_s": wall, "overhead_ratio": ratio if not solver.startswith("classical:")
            else math.nan, "nfe": nfe}


def test_goals_are_evaluated_from_the_summary():
    summary = [
        _entry("inpaint_box", "classical:biharmonic", 19.0, 0.70, 0.01),
        _entry("inpaint_box", "ddim", 8.0, 0.05, 2.0),  # unguided: not held to the classical goal
        _entry("inpaint_box", "dps", 20.0, 0.69, 50.0, 1.05, 1000),
        _entry("inpaint_box", "cdim", 19.7, 0.71, 4.0, 1.20),
        _entry("inpaint_box", "ddrm", 18.0, 0.60, 1.0),
        _entry("inpaint_box", "deepinv-dps", 19.0, 0.65, 49.0, 1.30, 1000),  # a peer's ratio: not our goal
        # a variant: not held to the classical goal
        _entry("inpaint_box", "dps:steps=10", 10.0, 0.30, 0.5, 1.0, 10),
        _entry("denoise", "classical:tv_chambolle", 25.0, 0.86, 0.01),
        _entry("denoise", "ddrm", 29.0, 0.95, 1.0),
    ]
    goals = {(g["task"], g["goal"].split()[0]): g for g in bench_goals(summary)}
    assert goals[("inpaint_box", "every")]["status"] == "not met"
    every = goals[("inpaint_box", "every")]["detail"]
    assert "ddrm" in every and "ddim" not in every
    assert goals[("inpaint_box", "dps")]["status"] == "not met"  # higher PSNR but 50 s > 49 s
    assert goals[("inpaint_box", "cdim")]["status"] == "met"  # -0.3 dB at 0.08 of the time
    overhead = goals[("inpaint_box", "overhead")]
    assert overhead["status"] == "not met" and "cdim 1.20" in overhead["detail"]
    assert "peers: deepinv-dps 1.30" in goals[("inpaint_box", "overhead")]["detail"]
    assert "dps:steps=10" not in goals[("inpaint_box", "every")]["detail"]
    assert goals[("denoise", "every")]["status"] == "met"
    assert goals[("denoise", "dps")]["status"] == goals[("denoise", "cdim")]["status"] == "not measured"
    assert goals[("denoise", "overhead")]["status"] == "met"
    # with a dps variant at the peer's NFE, that variant is the one compared
    summary += [_entry("inpaint_box", "dps:steps=100", 19.5, 0.66, 5.0, 1.0, 100),
                _entry("inpaint_box", "deepinv-dps", 19.0, 0.65, 5.2, 1.0, 100)]
    summary = [e for e in summary if not (e["solver"] == "deepinv-dps" and e["nfe"] == 1000)]
    g2 = next(g for g in bench_goals(summary) if g["task"] == "inpaint_box" and g["goal"].startswith("dps"))
    assert g2["status"] == "met" and g2["detail"].startswith("dps:steps=100 19.50 dB")
    assert goals_markdown(bench_goals(summary))[0] == "## Goals, as measured"


def test_bench_results_carry_the_goals(first_bench):
    _, out = first_bench
    saved = json.loads((out / "results.json").read_text())
    assert saved["goals"] and {g["status"] for g in saved["goals"]} <= {"met", "not met", "not measured"}
    assert "## Goals, as measured" in (out / "results.md").read_text()


def test_bench_split_across_processes_merges_into_one_report(first_bench, tiny_pixel_model_dir, image_dir,
                                                              tmp_path, capsys):
    """Tasks run in two folders (two processes) merge into one table with both tasks and the goals; parts
    with other settings, or the same run twice, are refused."""
    from studio.cli import main

    _, part_a = first_bench  # inpaint_box: ddim, cdim (2 steps)
    part_b = tmp_path / "b"
    run_bench(tasks=["denoise"], solvers=["ddim", "cdim"], images=str(image_dir), model=tiny_pixel_model_dir,
              steps={"ddim": 2, "cdim": 2}, out=part_b, progress=False)
    assert main(["bench-merge", str(part_a), str(part_b), "--out", str(tmp_path / "merged")]) == 0
    saved = json.loads((tmp_path / "merged" / "results.json").read_text())
    a_rows = json.loads((part_a / "results.json").read_text())["rows"]
    b_rows = json.loads((part_b / "results.json").read_text())["rows"]
    assert len(saved["rows"]) == len(a_rows) + len(b_rows)
    assert {e["task"] for e in saved["summary"]} == {"inpaint_box", "denoise"}
    assert {g["task"] for g in saved["goals"]} == {"inpaint_box", "denoise"}
    md = (tmp_path / "merged" / "results.md").read_text()
    assert "| denoise | cdim |" in md and "| inpaint_box | cdim |" in md and "part 2 of 2" in md
    assert (tmp_path / "merged" / "strips").is_dir() and (tmp_path / "merged" / "psnr_vs_nfe.png").is_file()
    with pytest.raises(StudioError, match="more than one part"):
        merge_results([part_a, part_a], tmp_path / "dup")
    other = tmp_path / "c"
    run_bench(tasks=["denoise"], solvers=["ddim"], images=str(image_dir), model=tiny_pixel_model_dir,
              steps={"ddim": 3}, out=other, progress=False)
    with pytest.raises(StudioError, match="different settings"):
        merge_results([part_a, other], tmp_path / "mixed")
    assert main(["bench-merge", str(part_a), "--out", str(tmp_path / "one")]) == 2
    assert "at least two" in capsys.readouterr().err


def test_bench_merge_keys_steps_per_solver_and_keeps_shared_baselines_once(first_bench, tiny_pixel_model_dir,
                                                                           image_dir, tmp_path):
    """A part spelling --steps only for the solver it ran merges with one that spelled more (same steps for
    that solver); the classical baselines both parts ran on the same task are kept once, and the variant is
    paired with its base solver from the other part. Another model, or the same solver at other steps, is
    refused."""
    _, part_a = first_bench  # inpaint_box: ddim, cdim; steps ddim=2, cdim=2
    part_v = tmp_path / "v"
    run_bench(tasks=["inpaint_box"], solvers=["cdim:inner_steps=1"], images=str(image_dir),
              model=tiny_pixel_model_dir, steps={"cdim": 2}, out=part_v, progress=False)
    merged = merge_results([part_a, part_v], tmp_path / "merged")
    a_rows = json.loads((part_a / "results.json").read_text())["rows"]
    v_rows = json.loads((part_v / "results.json").read_text())["rows"]
    n_baselines = sum(r["kind"] == "classical" for r in v_rows)
    assert n_baselines > 0 and len(merged.rows) == len(a_rows) + len(v_rows) - n_baselines
    saved = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert saved["steps"] == {"ddim": 2, "cdim": 2}
    comp = saved["variant_comparisons"]
    assert [(c["base"], c["variant"], c["pairs"]) for c in comp] == [("cdim", "cdim:inner_steps=1", len(
        [r for r in v_rows if r["solver"] == "cdim:inner_steps=1"]))]
    part_s = tmp_path / "s"
    run_bench(tasks=["denoise"], solvers=["cdim"], images=str(image_dir), model=tiny_pixel_model_dir,
              steps={"cdim": 3}, out=part_s, progress=False)
    with pytest.raises(StudioError, match="solver 'cdim' ran with steps 2 in .* and 3 in"):
        merge_results([part_a, part_s], tmp_path / "steps")
    bad = json.loads((part_v / "results.json").read_text())
    part_m = tmp_path / "m"
    part_m.mkdir()
    (part_m / "results.json").write_text(json.dumps({**bad, "model_name": "another-model"}))
    with pytest.raises(StudioError, match="model, task overrides and device must match"):
        merge_results([part_a, part_m], tmp_path / "model")
    bad["rows"] = [{**r, "psnr": r["psnr"] + 1} if r["kind"] == "classical" else r for r in bad["rows"]]
    (part_m / "results.json").write_text(json.dumps(bad))
    with pytest.raises(StudioError, match="baseline run .* differs between parts"):
        merge_results([part_a, part_m], tmp_path / "baseline")


def test_a_failed_run_is_retried_on_resume(tiny_pixel_model_dir, image_dir, tmp_path):
    out = tmp_path / "out"
    kw = dict(tasks=["inpaint_box"], solvers=["ddim"], steps={"ddim": 2}, images=str(image_dir),
              model=tiny_pixel_model_dir, out=out, progress=False)
    first = run_bench(**kw)
    jsonl = out / "results.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    failed = next(i for i, r in enumerate(rows) if r["solver"] == "ddim")
    rows[failed] = {**rows[failed], "status": "failed", "psnr": None, "error": "killed"}
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = run_bench(**kw)
    assert len(again.rows) == len(first.rows)  # one row per run: the retry replaces the failure
    retried = [r for r in again.rows if r["solver"] == "ddim" and r["image"] == rows[failed]["image"]]
    assert len(retried) == 1 and retried[0]["status"] == "ok" and retried[0]["psnr"] is not None
    assert len(jsonl.read_text().splitlines()) == len(rows) + 1  # appended, nothing rewritten
