"""The Gradio app through its API (gradio_client), and the UI-value conversions it relies on.

Browser tests (Playwright + Debian chromium) are in tests/test_browser.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.workflows import web as webapp
from solvers import SOLVERS
from studio.core.errors import StudioError

EXAMPLE = webapp.examples(32)[34][0]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from gradio_client import Client

    os.environ["STUDIO_APP_OUTPUTS"] = str(tmp_path_factory.mktemp("app_outputs"))
    import importlib

    from studio import app

    importlib.reload(app)  # pick up STUDIO_APP_OUTPUTS
    demo = app.build()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, show_error=True)
    yield Client(demo.local_url, verbose=False), app
    demo.close()


def _editor(path, layers=()):
    from gradio_client import handle_file

    return {"background": handle_file(str(path)), "layers": [handle_file(str(p)) for p in layers],
            "composite": None}


def _restore(client, app, editor, task, solver="cdim", steps=3, mode="simulate", model="emoji-pixel",
             noise=0.025, prompt="", **params):
    """The /restore endpoint; returns (slider, x̂0 preview, measurement, summary, files)."""
    c, _ = client, app
    values = [params.get(key, webapp.TASK_PARAMS[owner][key][1]) for owner, key in app.PARAM_SPECS]
    slider, preview, measurement, progress, summary, files, *_ = c.predict(
        editor, mode, task, solver, steps, 0, None, noise, model, prompt, *values, api_name="/restore")
    assert progress.startswith("done:")
    return slider, preview, measurement, summary, files


@pytest.mark.parametrize("task,solver", [("inpaint_box", "cdim"), ("gaussian_blur", "ddrm"),
                                         ("motion_blur", "dps"), ("super_resolution", "ddrm"),
                                         ("denoise", "cdim"), ("colorize", "ddim"),
                                         ("inpaint_random", "mcg")])
def test_restore_each_task(client, task, solver):
    c, app = client
    slider, preview, measurement, summary, files = _restore(c, app, _editor(EXAMPLE), task, solver,
                                                            kernel_size=9)
    assert "PSNR" in summary and solver in summary
    assert len(files) == 2 and files[0].endswith("restored.png") and files[1].endswith("restored.json")
    jobs = [d for d in os.scandir(os.environ["STUDIO_APP_OUTPUTS"]) if d.is_dir()]
    # one folder per job
    assert jobs and all(os.path.isfile(os.path.join(d.path, "restored.json")) for d in jobs)


def test_painted_mask_is_filled_and_observed_pixels_kept(client, tmp_path):
    c, app = client
    layer = np.zeros((32, 32, 4), np.uint8)
    layer[10:20, 8:24, 3] = 255
    Image.fromarray(layer).save(tmp_path / "layer.png")
    _, _, _, summary, files = _restore(c, app, _editor(EXAMPLE, [tmp_path / "layer.png"]), "inpaint_mask",
                                       steps=3, noise=0.0)
    restored = np.asarray(Image.open(files[0]), dtype=np.float32)
    clean = np.asarray(Image.open(EXAMPLE).convert("RGB"), dtype=np.float32)
    outside = np.ones((32, 32), bool)
    outside[10:20, 8:24] = False
    assert np.abs(restored - clean)[outside].max() <= 2.0  # observed pixels kept (8-bit rounding)
    assert np.abs(restored - clean)[~outside].mean() > 1.0  # the painted region was re-synthesised


def _bad_files(folder):
    """The bad uploads of the app's table, written once into ``folder``."""
    (folder / "text.png").write_text("this is not an image")
    (folder / "empty.png").write_bytes(b"")
    Image.new("1", (20000, 20000)).save(folder / "huge.png")
    Image.new("RGB", (2000, 2000), (200, 120, 40)).save(folder / "photo.png")
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(folder / "blank.png")
    Image.fromarray(np.full((32, 64, 4), 255, np.uint8)).save(folder / "wide.png")


# (id, upload, layers, task, model, other arguments of _restore, what the one line says)
APP_BAD = [
    ("not an image", "text.png", (), "inpaint_box", "emoji-pixel", {},
     "not a readable image: cannot identify image file 'text.png'"),
    ("empty file", "empty.png", (), "inpaint_box", "emoji-pixel", {}, "not a readable image"),
    ("20000x20000 upload", "huge.png", (), "inpaint_box", "emoji-pixel", {}, "not a readable image.*exceeds"),
    ("no mask painted", None, (), "inpaint_mask", "emoji-pixel", {}, "paint the region to fill"),
    ("empty painted mask", None, ("blank.png",), "inpaint_mask", "emoji-pixel", {}, "mask is empty"),
    ("mask painted on another image", None, ("wide.png",), "inpaint_mask", "emoji-pixel", {},
     "paint the mask on this image"),
    ("hub id", None, (), "inpaint_box", "someone/unreachable-model", {}, re.escape(webapp.UNKNOWN_MODEL)),
    ("server path", None, (), "inpaint_box", "/etc/passwd", {}, re.escape(webapp.UNKNOWN_MODEL)),
    ("text-to-image model for a pixel solver", None, (), "inpaint_box", "emoji-sd", {}, "latent solvers"),
    ("steps 0", None, (), "inpaint_box", "emoji-pixel", {"steps": 0}, "less than minimum value 1"),
    ("negative noise", None, (), "inpaint_box", "emoji-pixel", {"noise": -0.1}, "less than minimum value 0"),
    ("solver that cannot do the task", None, (), "motion_blur", "emoji-pixel", {"solver": "ddrm"}, "ddrm"),
]


@pytest.mark.parametrize("upload, layers, task, model, extra, message", [c[1:] for c in APP_BAD],
                         ids=[c[0] for c in APP_BAD])
def test_app_bad_input(client, tmp_path, upload, layers, task, model, extra, message):
    """One readable line, no job folder left behind, and the next request still works."""
    c, app = client
    _bad_files(tmp_path)
    outputs = os.environ["STUDIO_APP_OUTPUTS"]
    before = sorted(os.listdir(outputs))
    editor = _editor(tmp_path / upload if upload else EXAMPLE, [tmp_path / p for p in layers])
    with pytest.raises(Exception, match=message) as err:
        _restore(c, app, editor, task, model=model, **extra)
    assert "\n" not in str(err.value).strip() and "/tmp/" not in str(err.value)  # one line, no server paths
    assert sorted(os.listdir(outputs)) == before  # nothing written
    _, _, _, summary, _ = _restore(c, app, _editor(EXAMPLE), "inpaint_box")
    assert "PSNR" in summary


@pytest.mark.parametrize("mode,dtype", [("L", np.uint8), ("RGBA", np.uint8), ("I;16", np.uint16)])
def test_grey_rgba_and_16bit_uploads_are_converted(tmp_path, mode, dtype):
    g = np.random.default_rng(0)
    if mode == "L":
        img = Image.fromarray(g.integers(0, 256, (20, 24), dtype=np.uint8), "L")
    elif mode == "RGBA":
        img = Image.fromarray(g.integers(0, 256, (20, 24, 4), dtype=np.uint8), "RGBA")
    else:
        img = Image.fromarray(g.integers(0, 65536, (20, 24), dtype=np.uint16))
    img.save(tmp_path / "x.png")
    x = webapp.to_image_tensor(str(tmp_path / "x.png"))
    assert x.shape == (1, 3, 20, 24) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_task_overrides_and_solver_lists():
    assert webapp.task_overrides("super_resolution", {"operator.factor": 2.0}, 0.01) == \
        ["operator.factor=2", "noise.sigma=0.01"]
    with pytest.raises(StudioError, match="noise sigma"):
        webapp.task_overrides("denoise", {}, 2.0)
    assert "ddrm" not in webapp.solvers_for("motion_blur") and "cdim" in webapp.solvers_for("inpaint_box")
    assert set(webapp.solvers_for("inpaint_box", "latent")) == {"latent-dps", "psld", "p2l", "resample",
                                                                 "flair", "treg"}


def test_a_flow_model_lists_only_the_solvers_that_run_on_it(tiny_sd3_model_dir, tiny_sd_model_dir):
    """An SD3-style folder is a 'flow' model: its Restore list holds the latent solvers that run on the VP
    view (P2L and TReg, which batch one text-embedding tensor, are not offered); its geometry counts the
    transformer's patch."""
    assert webapp.model_kind_of(tiny_sd3_model_dir) == "flow"
    assert webapp.model_kind_of(tiny_sd_model_dir) == webapp.model_kind_of("emoji-sd") == "latent"
    assert webapp.model_kind_of("emoji-pixel") == "pixel"
    flow = set(webapp.solvers_for("inpaint_box", "flow"))
    assert flow == {n for n in webapp.solvers_for("inpaint_box", "latent") if SOLVERS[n].flow}
    assert {"flair", "latent-dps"} <= flow and not {"p2l", "treg"} & flow
    config = json.loads((Path(tiny_sd3_model_dir) / "transformer" / "config.json").read_text())
    vae = json.loads((Path(tiny_sd3_model_dir) / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    geometry = webapp.model_geometry(tiny_sd3_model_dir)
    assert geometry.multiple == factor * config["patch_size"] > factor
    assert geometry.trained == (config["sample_size"] * factor,) * 2


def test_invert_and_edit_endpoint(client, tiny_sd_model_dir):
    from gradio_client import handle_file

    c, app = client
    img = webapp.examples(64)[0][0]
    controls = ("auto", "", "", 0)  # attention control, blend words, reweight, edit guidance (0: default)
    rec, edit, mask, summary, files = c.predict(handle_file(img), "red heart", "grinning face", "newton", 2,
                                                None, 1.0, tiny_sd_model_dir, *controls, api_name="/edit")
    assert "reconstruction PSNR" in summary and "newton" in summary and "attention control" in summary
    assert [os.path.basename(f) for f in files] == ["edit.png", "reconstruction.png", "mask.png", "edit.json"]
    assert mask is not None
    import json

    record = json.loads(open(files[3]).read())
    assert record["source_prompt"] == "red heart" and record["target_prompt"] == "grinning face"
    assert record["control"]["mode"] == "replace"
    assert Image.open(files[0]).size == (64, 64)  # the files keep the model's size; the page enlarges
    # the page shows an empty guidance as 0: it must mean the method's default (1), not CFG with w = 0
    _, _, _, summary_zero, _ = c.predict(handle_file(img), "red heart", "grinning face", "newton", 2, 0, 1.0,
                                         tiny_sd_model_dir, *controls, api_name="/edit")
    nfe = lambda text: re.search(r"NFE (\d+)", text).group(1)  # noqa: E731
    assert nfe(summary_zero) == nfe(summary)
    _, _, mask, summary, files = c.predict(handle_file(img), "red heart", "grinning face", "newton", 2, None,
                                           1.0, tiny_sd_model_dir, "none", "", "", 0, api_name="/edit")
    assert mask is None and "off" in summary and len(files) == 3
    with pytest.raises(Exception, match="unknown inversion method|not one of the choices|magic"):
        c.predict(handle_file(img), "", "", "magic", 2, None, 1.0, tiny_sd_model_dir, *controls,
                  api_name="/edit")
    with pytest.raises(Exception, match="WORD=SCALE"):
        c.predict(handle_file(img), "red heart", "red face", "ddim", 2, None, 1.0, tiny_sd_model_dir,
                  "reweight", "", "face", 0, api_name="/edit")
    rec, edit, _, summary, _ = c.predict(handle_file(img), "", "", "ddim", 2, None, 1.0, tiny_sd_model_dir,
                                         *controls, api_name="/edit")
    assert "ddim" in summary  # still serving after the errors
    assert not app.EDIT_RUNS._by_session  # every finished or failed edit let go of its run


def test_personalize_and_generate_endpoints(client, tiny_sd_model_dir, tmp_path):
    from gradio_client import handle_file

    c, app = client
    files = [handle_file(p) for p, _ in webapp.examples(64)[:2]]
    plot, embedding, status = c.predict(files, "<tiny>", "heart", 3, 5e-3, "cross-init", tiny_sd_model_dir,
                                        api_name="/personalize")
    assert "learned" in status and embedding.endswith("learned_embeds.safetensors")
    gallery = c.predict("a picture of a <tiny>", handle_file(embedding), 2, 2, 3.0, 0, tiny_sd_model_dir,
                        api_name="/generate")
    assert len(gallery) == 2
    _, per_layer, status = c.predict(files, "<layered>", "heart", 2, 5e-3, "xti", tiny_sd_model_dir,
                                     api_name="/personalize")
    assert "learned" in status
    gallery = c.predict("a picture of a <layered>", handle_file(per_layer), 2, 2, 3.0, 0, tiny_sd_model_dir,
                        api_name="/generate")
    assert len(gallery) == 2
    _, mapped, status = c.predict(files, "<mapped>", "heart", 2, 5e-3, "neti", tiny_sd_model_dir,
                                  api_name="/personalize")
    assert "learned" in status
    gallery = c.predict("a picture of a <mapped>", handle_file(mapped), 2, 2, 3.0, 0, tiny_sd_model_dir, 16,
                        api_name="/generate")  # the NeTI truncation slider
    assert len(gallery) == 2
    with pytest.raises(Exception, match="already exists"):
        c.predict(files, "heart", "heart", 3, 5e-3, "ti", tiny_sd_model_dir, api_name="/personalize")
    assert not app.TRAIN_RUNS._by_session  # every finished or failed training let go of its run


def test_generation_prompt_follows_the_model_template(tmp_path):
    """The Personalize tab's starting prompt uses the template the model's card declares (bare for
    emoji-sd, whose samples under "a picture of a" are noise), the default template otherwise, and survives
    a bad model."""
    import json

    assert webapp.starting_token_prompt("emoji-sd", "<my-concept>") == "<my-concept>"
    folder = tmp_path / "model"
    folder.mkdir()
    assert webapp.starting_token_prompt(str(folder), "<t>") == "a picture of a <t>"
    (folder / "card.json").write_text(json.dumps({"prompt_template": "an emoji of {}"}))
    assert webapp.starting_token_prompt(str(folder), "<t>") == "an emoji of <t>"
    assert webapp.starting_token_prompt(str(tmp_path / "missing"), "<t>") == "a picture of a <t>"


def test_a_photo_larger_than_the_model_is_downscaled_and_the_summary_says_so(client, tmp_path):
    c, app = client
    Image.new("RGB", (512, 384), (200, 120, 40)).save(tmp_path / "photo.png")
    _, _, _, summary, files = _restore(c, app, _editor(tmp_path / "photo.png"), "denoise", steps=2)
    assert Image.open(files[0]).size == (43, 32)  # shorter side to the model's 32, aspect kept
    assert "512x384 image was downscaled to 43x32" in summary


def test_fitted_size_follows_the_models_limits():
    pixel = webapp.model_geometry("emoji-pixel")
    latent = webapp.model_geometry("emoji-sd")
    assert pixel.trained == (32, 32) and latent.trained == (64, 64) and latent.multiple == 4
    assert webapp.fitted_size((64, 64), pixel) == (64, 64)  # up to 2x the trained side runs as it is
    assert webapp.fitted_size((512, 512), pixel) == (32, 32)
    assert webapp.fitted_size((2000, 100), pixel) == (64, 3)  # the longer side capped at 2x
    assert webapp.fitted_size((62, 62), latent) == (60, 60)  # cut to the VAE factor
    assert webapp.fitted_size((60, 90), webapp.model_geometry("gaussian-demo")) == (32, 32)
    assert webapp.solve_size((16, 16), "super_resolution", "degraded") == (64, 64)
    import torch

    x = webapp.fit_to_size(torch.rand(1, 3, 100, 50), (40, 20))
    assert tuple(x.shape) == (1, 3, 40, 20)


def test_upload_note_names_the_size_and_an_estimate():
    import torch

    note = webapp.upload_note(torch.zeros(1, 3, 256, 256), "emoji-pixel", "cdim", 50)
    assert note.startswith("256x256 image") and "restored at 32x32 (downscaled)" in note
    assert re.search(r"about [\d.]+ (s|min) for 50 CDIM", note)
    assert "downscaled" not in webapp.upload_note(torch.zeros(1, 3, 32, 32), "emoji-pixel", "cdim", 50)


def test_task_defaults_follow_the_image_and_the_noise_the_config():
    assert webapp.task_param_values("gaussian_blur", (32, 32)) == {"operator.sigma": 1.0,
                                                                   "operator.kernel_size": 7}
    assert webapp.task_param_values("gaussian_blur", (256, 256)) == {"operator.sigma": 3.0,
                                                                     "operator.kernel_size": 61}
    assert webapp.task_noise_sigma("inpaint_mask") == 0.0 and webapp.task_noise_sigma("denoise") == 0.1
    assert webapp.image_label("inpaint_mask").startswith("**Image**: paint")
    assert "super-resolution" in webapp.image_label("super_resolution")


def test_solver_lists_put_the_baseline_last_and_advise_on_steps():
    names = webapp.solvers_for("inpaint_box")
    assert names[-1] == "ddim" and dict(webapp.solver_choices("inpaint_box"))["DDIM (unconditional baseline)"]
    assert webapp.step_advice("dps", 20).startswith("⚠ 20 steps is below")
    assert not webapp.step_advice("dps", 1000).startswith("⚠")
    assert all(title and title != name for title, name in webapp.solver_choices("inpaint_box", "latent"))


def test_personalize_prompt_follows_the_token_and_warns_without_it(tmp_path):
    import torch
    from safetensors.torch import save_file

    renamed = webapp.follow_token("<my-concept> on a bike", "<my-concept>", "<cane-man>")
    assert renamed == "<cane-man> on a bike"
    assert webapp.follow_token("<old>", "<gone>", "<new>") == "<new>"  # the one token present is renamed
    save_file({"<cane-man>": torch.zeros(1, 4)}, str(tmp_path / "e.safetensors"))
    tokens = webapp.learned_tokens(tmp_path / "e.safetensors")
    assert tokens == ["<cane-man>"]
    assert webapp.prompt_warning("<cane-man>", tokens) is None
    assert "not a learned token" in webapp.prompt_warning("<my-concept>", tokens)
    assert "no learned token" in webapp.prompt_warning("a man", tokens)
    assert webapp.literal("learned <cane-man>") == "learned &lt;cane-man&gt;"


def test_stop_hook_ends_a_loop_at_the_next_forward_and_is_removed():
    import torch

    from studio.core.errors import SolveCancelled

    net = torch.nn.Linear(2, 2)
    calls = []
    with pytest.raises(SolveCancelled):
        with webapp.stop_when(net, lambda: len(calls) >= 2):
            for _ in range(5):
                net(torch.zeros(1, 2))
                calls.append(1)
    assert len(calls) == 2
    net(torch.zeros(1, 2))  # the hook is gone
    assert not net._forward_pre_hooks


def test_an_edit_example_gives_its_caption_by_file_name(tmp_path):
    from studio.workflows import web as webapp

    path, caption = webapp.examples(64)[5]
    copy = tmp_path / "gradio-cache" / Path(path).name  # the app is handed a copy under the same name
    assert webapp.example_caption(str(copy)) == caption and caption
    assert webapp.example_caption(str(tmp_path / "holiday.png")) == ""
    assert webapp.example_caption(None) == ""


def test_stop_reaches_its_own_sessions_run_queued_or_running_and_nothing_else():
    from studio.app import SessionRuns

    runs = SessionRuns()
    mine, other = runs.prepare("a"), runs.prepare("b")  # two Run clicks, both requests still queued
    assert runs.stop("a") and mine.stop.is_set() and not other.stop.is_set()
    assert runs.begin("a", 10) is mine and mine.total == 10  # the queued request takes up its stopped run
    assert not runs.stop("nobody")
    runs.finish("a", mine)
    assert runs.get("a") is None and runs.get("b") is other
    assert runs.begin("api-call", 5).total == 5  # a request without a click (the API) gets a run too
    running = runs.begin("b", 20)
    assert running is other and runs.prepare("b") is running  # a second click while it runs keeps it
    assert runs.stop("b") and running.stop.is_set()  # so Stop still reaches the running one


def test_restore_runs_forget_the_oldest_sessions_and_a_finished_run():
    from studio.app import SessionRuns

    runs = SessionRuns(keep=2)
    first, *_ = [runs.prepare(name) for name in "abc"]
    assert runs.get("a") is None and runs.get("b") and runs.get("c")
    newer = runs.prepare("b")
    runs.finish("b", first)  # an older run of that session ending does not drop the newer one
    assert runs.get("b") is newer
    runs.finish("b", newer)
    assert runs.get("b") is None


def _fake_run_restore(job, root, callback):
    """``webapp.run_restore`` with a solver that reports x̂0 each step and would run 1000 steps."""
    import torch

    from studio.core.errors import SolveCancelled

    for i in range(1000):
        if callback(i, 1000, None, torch.full((1, 3, 8, 8), i / 1000)) is False:
            raise SolveCancelled("stopped")
    raise AssertionError("the solver was never stopped")


def test_a_stopped_run_says_where_as_its_last_output_and_keeps_the_last_estimate(monkeypatch):
    import time

    from studio import app

    monkeypatch.setattr(app.webapp, "run_restore", _fake_run_restore)
    run = app.SessionRun(started=time.perf_counter(), total=1000)
    stream = app._restore_stream(None, run, "dps", None)
    shown = [next(stream) for _ in range(4)]  # "starting…", then the previews of steps 1, 6 and 11
    run.stop.set()  # Stop, while the solver goes on
    rest = list(stream)
    assert [o[3].split(" · ")[0] for o in shown[1:]] == ["step 1 / 1000", "step 6 / 1000", "step 11 / 1000"]
    assert len(rest) == 1  # nothing after the stop but the message
    slider, preview, measurement, progress, summary, files = rest[0]
    assert progress.startswith("stopped at step 11 / 1000 after ")
    assert progress.endswith(" · the last x̂0 is shown as the partial result")
    assert preview is shown[-1][1]  # the last preview the page showed stays
    queued = app.SessionRun(started=0.0, total=5)
    queued.stop.set()  # Stop while the request waited in the queue
    assert [o[3] for o in app._restore_stream(None, queued, "dps", None)] == ["stopped before it started"]


def test_a_stopped_edit_says_so_as_its_last_output_and_a_finished_one_is_shown(monkeypatch):
    import threading
    import time

    import torch

    from studio import app
    from studio.core.errors import SolveCancelled

    started = threading.Event()

    def fake_run_edit(stopped, **_):  # an edit that would run until stopped
        started.set()
        while not stopped():
            time.sleep(0.01)
        raise SolveCancelled("stopped")

    monkeypatch.setattr(app.webapp, "run_edit", fake_run_edit)
    run = app.SessionRun(started=time.perf_counter())
    stream = app._edit_stream({"method": "newton"}, run)
    assert next(stream)[3] == "inverting with newton…"
    threading.Timer(0.05, lambda: started.wait() and run.stop.set()).start()  # Stop, while it runs
    rest = list(stream)
    assert len(rest) == 1 and rest[0][3].startswith("stopped after ") and "nothing was saved" in rest[0][3]
    queued = app.SessionRun(started=0.0)
    queued.stop.set()  # Stop while the request waited in the queue
    assert [o[3] for o in app._edit_stream({"method": "newton"}, queued)] == ["stopped before it started"]

    def finishes_despite_the_stop(stopped, **_):  # the Stop came after the last UNet call
        late.stop.set()
        return {"record": {"method": "ddim", "inverted_steps": 2, "nfe": 8, "metrics": {"psnr": 30.0},
                           "vae_roundtrip_metrics": {"psnr": 31.0}, "control": {"mode": "none"}},
                "reconstruction": torch.zeros(1, 3, 4, 4), "edit": torch.ones(1, 3, 4, 4), "mask": None,
                "files": {"edit": "edit.png"}}

    monkeypatch.setattr(app.webapp, "run_edit", finishes_despite_the_stop)
    late = app.SessionRun(started=time.perf_counter())
    *_, last = app._edit_stream({"method": "ddim"}, late)
    assert "reconstruction PSNR **30.00 dB**" in last[3] and last[4] == ["edit.png"]  # its files exist


def test_a_stopped_training_offers_the_token_learned_so_far(monkeypatch):
    """Personalize's Stop ends the training after its step; the trainer checkpoints there, so the last output
    offers that embedding and says where it stopped; a run stopped while queued never starts; a finished run
    says "learned"."""
    import threading
    import time

    from studio import app

    started = threading.Event()

    def fake_personalize(images, callback, steps, **_):  # trains until its callback says stop
        for step in range(1, steps + 1):
            if step == 11:
                started.set()
            if callback(step, steps, 1.0 / step) is False:
                break
            time.sleep(0.005)
        return {"step": step, "final_loss": 1.0 / step, "embeddings": "learned_embeds.safetensors"}

    monkeypatch.setattr(app.personalize, "personalize", fake_personalize)
    args = dict(images=["a.png"], model="m", placeholder="<x>", initializer="face", steps=100_000, lr=5e-3,
                method="ti", output_dir="out")
    run = app.SessionRun(started=time.perf_counter(), total=100_000)
    threading.Timer(0.01, lambda: started.wait() and run.stop.set()).start()  # Stop, while it trains
    *shown, last = list(app._training_stream(args, run))
    assert shown and all(o[2].startswith("step ") for o in shown)
    assert last[1] == "learned_embeds.safetensors"
    assert last[2].startswith("stopped at step ") and "/ 100000" in last[2] and "learned so far" in last[2]
    stopped_at = int(last[2].split()[3])
    assert 11 <= stopped_at < 100_000 and len(last[0]) >= 1  # the loss plot keeps every reported step
    queued = app.SessionRun(started=0.0, total=10)
    queued.stop.set()  # Stop while the request waited in the queue
    assert [o[2] for o in app._training_stream(args, queued)] == ["stopped before it started"]
    done = app.SessionRun(started=time.perf_counter(), total=12)
    *_, last = list(app._training_stream({**args, "steps": 12}, done))
    assert "learned" in last[2] and "12 steps" in last[2] and "stopped" not in last[2]


def test_a_finished_restore_leaves_no_run_behind(client):
    c, app = client
    _restore(c, app, _editor(EXAMPLE), "inpaint_box", steps=2)
    assert not app.RESTORE_RUNS._by_session
