"""diffusion-studio in the browser: ``python app.py`` (the checkout's launcher) or ``studio app``, on
http://127.0.0.1:7860.

Layout and wiring only: every action calls a ``studio`` workflow through :mod:`studio.workflows.web`. Runs
offline with the embedded models; never opens a public share link. The model fields take registered names
and folders inside the allowed model folders only (``--model-dir``, ``$STUDIO_MODEL_DIRS``): a browser must
not load, or learn about, anything else on the server's disk.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from models.registry import MODELS, PIXEL, TEXT_TO_IMAGE, default_model  # noqa: E402
from solvers import solver_config  # noqa: E402
from studio.core.config import to_plain  # noqa: E402
from studio.core.errors import SolveCancelled, StudioError  # noqa: E402
from studio.workflows import editing, personalize  # noqa: E402
from studio.workflows import web as webapp  # noqa: E402

OUTPUT_ROOT = Path(os.environ.get("STUDIO_APP_OUTPUTS", "outputs/app"))
#: the registered models offered in each tab's dropdown (a folder inside the allowed ones may be typed in)
PIXEL_MODELS = [name for name, entry in MODELS.items() if entry.kind == PIXEL]
TEXT_TO_IMAGE_MODELS = [name for name, entry in MODELS.items() if entry.kind == TEXT_TO_IMAGE]
#: one widget per (task, parameter); only the current task's widgets are visible and used
PARAM_SPECS = [(task, key) for task, params in webapp.TASK_PARAMS.items() for key in params]


@dataclass
class JobDone:
    result: object


def stream_job(work):
    """Run ``work(report, stopped)`` in a thread; yield each value it reports, then ``JobDone(result)``.

    Errors become one readable ``gr.Error`` (the app survives anything one request does). Closing this
    generator (Stop button, closed page) makes ``stopped()`` true, so the job's callback can end the solve
    or the training at its next step."""
    end = object()
    items: queue.Queue = queue.Queue()
    stop = threading.Event()
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = work(items.put, stop.is_set)
        except (StudioError, SolveCancelled) as err:
            outcome["error"] = webapp.user_message(err)
        except Exception as err:  # noqa: BLE001
            outcome["error"] = webapp.user_message(err)
        finally:
            items.put(end)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not end:
            yield item
    finally:
        stop.set()
    thread.join()
    if "error" in outcome:
        raise gr.Error(outcome["error"])
    yield JobDone(outcome["result"])


@contextlib.contextmanager
def _errors_as_messages():
    """A failed request shows one readable ``gr.Error``; the app keeps serving the next one."""
    try:
        yield
    except StudioError as err:
        raise gr.Error(webapp.user_message(err)) from None
    except Exception as err:  # noqa: BLE001 - one request must not take the app down
        raise gr.Error(webapp.user_message(err)) from None


def one_line_upload_errors(component):
    """``component`` whose undecodable uploads fail with one line (:func:`webapp.unreadable_upload`): Gradio
    decodes an image upload before the handler runs, and its own error is a multi-line dump of the payload
    with the server's temporary path. Gradio passes a ``gr.Error`` raised there through unchanged."""
    decode = component.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except Exception as err:  # noqa: BLE001 - any decoding failure is the upload's
            raise gr.Error(webapp.unreadable_upload(err)) from None

    component.preprocess = preprocess
    return component


def _solver_defaults(solver: str, task: str) -> tuple[int, float | None]:
    params = to_plain(solver_config(solver, task, []))
    return int(params.get("steps", 50)), params.get(webapp.MAIN_PARAM.get(solver, ""))


def on_task_change(task: str, solver: str):
    choices = webapp.solvers_for(task)
    solver = solver if solver in choices else ("cdim" if "cdim" in choices else choices[0])
    steps, main = _solver_defaults(solver, task)
    updates = [gr.update(visible=owner == task) for owner, _ in PARAM_SPECS]
    return [gr.update(choices=choices, value=solver), steps, main, *updates]


def on_solver_change(solver: str, task: str):
    steps, main = _solver_defaults(solver, task)
    return steps, gr.update(value=main, label=f"{webapp.MAIN_PARAM.get(solver, 'parameter')} ({solver})")


def restore(editor, mode, task, solver, steps, seed, main_param, noise_sigma, model, *param_values,
            model_dirs=()):
    """Generator: x̂0 previews while the solver runs, then the before/after slider, summary and files."""
    try:
        model = webapp.check_model(model, model_dirs)
        image = webapp.to_image_tensor(editor)
        fill = (webapp.fill_mask_from_editor(editor, tuple(image.shape[-2:])) if task == "inpaint_mask"
                else None)
        params = {key: v for (owner, key), v in zip(PARAM_SPECS, param_values) if owner == task}
        overrides = webapp.task_overrides(task, params, noise_sigma)
        if main_param is not None and webapp.MAIN_PARAM.get(solver):
            overrides.append(f"{webapp.MAIN_PARAM[solver]}={main_param}")
        job = webapp.RestoreJob(image=image, task=task, solver=solver, mode=mode, steps=int(steps),
                                seed=int(seed), overrides=overrides, fill_mask=fill, model=model)
    except StudioError as err:
        raise gr.Error(webapp.user_message(err)) from None
    def work(report, stopped):
        def callback(i, total, x_t, x0):
            if stopped():
                return False
            if i % 5 == 0 or i == total - 1:
                report((i + 1, total, x0))
            return None

        return webapp.run_restore(job, OUTPUT_ROOT, callback=callback)

    with contextlib.closing(stream_job(work)) as stream:
        for item in stream:
            if isinstance(item, JobDone):
                res = item.result
                break
            i, total, x0 = item
            # x̂0 (decoded for latent solvers)
            preview = webapp.image_to_numpy(((x0[:1] + 1) / 2).float().cpu())
            yield gr.update(), preview, gr.update(), f"step {i} / {total}", gr.update()
    before = webapp.image_to_numpy(res["measurement"])
    after = webapp.image_to_numpy(res["restored"])
    yield ((before, after), after, before, webapp.summary_markdown(res["record"]),
           [res["files"]["restored"], res["files"]["record"]])


def invert_edit(image, source_prompt, target_prompt, method, steps, guidance, strength, model,
                model_dirs=()):
    """Invert under the source prompt, regenerate (reconstruction) and edit under the target prompt."""
    with _errors_as_messages():
        model = webapp.check_model(model, model_dirs)
        x = webapp.to_image_tensor(image)
        res = editing.edit(x, source_prompt=source_prompt or "", target_prompt=target_prompt or "",
                           method=method, steps=int(steps),
                           guidance=None if guidance in (None, "", 0) else float(guidance),
                           strength=float(strength), model=model)
    rec = res.record
    text = (f"**{rec['method']}** inversion · {rec['inverted_steps']} steps · NFE {rec['nfe']} · "
            f"{rec['wall_time_s']:.2f} s\n\nreconstruction PSNR **{rec['metrics']['psnr']:.2f} dB** "
            f"(VAE round trip {rec['vae_roundtrip_metrics']['psnr']:.2f} dB)")
    return webapp.image_to_numpy(res.reconstruction), webapp.image_to_numpy(res.image), text


def train_token(files, token, init, steps, lr, cross_init, model, model_dirs=()):
    """Generator: live loss plot while textual inversion trains, then the embedding file."""
    if not files:
        raise gr.Error("upload a few images of the concept")
    with _errors_as_messages():
        model = webapp.check_model(model, model_dirs)
    folder = OUTPUT_ROOT / "personalize" / webapp.job_name()

    def work(report, stopped):
        def callback(step, total, loss):
            report((step, loss))
            return False if stopped() else None

        return personalize.personalize(
            [str(f) for f in files], model=model, quiet=True, callback=callback, resume=False,
            placeholder=token, initializer=init, steps=int(steps), lr=float(lr), cross_init=bool(cross_init),
            batch_size=min(4, len(files)), output_dir=str(folder), validate_every=0)

    points = []
    with contextlib.closing(stream_job(work)) as stream:
        for item in stream:
            if isinstance(item, JobDone):
                res = item.result
                break
            points.append(item)
            if len(points) % 5 == 0:
                yield (pd.DataFrame(points, columns=["step", "loss"]), gr.update(),
                       f"step {item[0]} / {int(steps)}")
    yield (pd.DataFrame(points, columns=["step", "loss"]), res["embeddings"],
           f"learned **{token}** in {res['step']} steps, final loss {res['final_loss']:.4f}")


def generate_images(prompt, embedding_file, n, steps, guidance, seed, model, model_dirs=()):
    with _errors_as_messages():
        model = webapp.check_model(model, model_dirs)
        images = personalize.generate(prompt, model=model,
                                      embeddings=[embedding_file] if embedding_file else [],
                                      n=int(n), steps=int(steps), guidance=float(guidance), seed=int(seed))
    return [webapp.image_to_numpy(im[None]) for im in images]


def build(model_dirs=None) -> gr.Blocks:
    """The app; its model fields accept registered names and folders inside ``model_dirs`` (see
    :func:`studio.workflows.web.allowed_model_dirs` for the default), fixed here for the app's lifetime."""
    dirs = webapp.allowed_model_dirs(model_dirs)
    with gr.Blocks(title="diffusion-studio") as demo:
        gr.Markdown("# diffusion-studio\nRestore degraded images with diffusion posterior solvers. "
                    "Models run offline; outputs go to `" + str(OUTPUT_ROOT) + "`.")
        with gr.Tab("Restore"):
            _restore_tab(dirs)
        with gr.Tab("Invert & edit"):
            _invert_edit_tab(dirs)
        with gr.Tab("Personalize"):
            _personalize_tab(dirs)
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo


def _restore_tab(dirs) -> None:
    """Paint or pick an image, choose task and solver, watch x̂0 while it runs, compare before/after."""
    with gr.Row():
        with gr.Column(scale=1):
            editor = one_line_upload_errors(gr.ImageEditor(
                label="image — for 'inpaint_mask', paint the region to fill", type="filepath",
                image_mode="RGBA", sources=("upload", "clipboard"), transforms=(), layers=False,
                brush=gr.Brush(default_size=3, colors=["#ff00ff"], color_mode="fixed"),
                eraser=gr.Eraser(default_size=3), canvas_size=(256, 256)))
            gr.Examples([[p] for p, _ in webapp.examples(32)[:16]], inputs=[editor], label="held-out emoji")
            mode = gr.Radio(["simulate", "degraded"], value="simulate", label="the image is",
                            info="simulate: clean — degrade it first (shows y); degraded: it is the "
                                 "measurement")
            task = gr.Dropdown(list(webapp.TASK_PARAMS), value="inpaint_box", label="task")
            param_widgets = []
            for owner, key in PARAM_SPECS:
                label, default = webapp.TASK_PARAMS[owner][key]
                param_widgets.append(gr.Number(value=default, label=label, visible=owner == "inpaint_box"))
            noise = gr.Slider(0, 0.3, value=0.025, step=0.005, label="noise sigma ([0,1] units)")
            solver = gr.Dropdown(webapp.solvers_for("inpaint_box"), value="cdim", label="solver")
            with gr.Row():
                steps = gr.Number(value=50, precision=0, label="steps", minimum=1, maximum=1000)
                seed = gr.Number(value=0, precision=0, label="seed")
                main_param = gr.Number(value=3, label="inner_steps (cdim)")
            model = gr.Dropdown(PIXEL_MODELS, value=default_model(PIXEL), allow_custom_value=True,
                                label="model (registered name, or a folder inside the allowed model "
                                      "folders)")
            with gr.Row():
                run = gr.Button("Restore", variant="primary")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column(scale=1):
            slider = gr.ImageSlider(label="measurement / restored", type="numpy")
            with gr.Row():
                preview = gr.Image(label="x̂0 while it runs", type="numpy", height=160)
                measurement = gr.Image(label="measurement y", type="numpy", height=160)
            summary = gr.Markdown()
            files = gr.File(label="download (PNG + JSON record)", file_count="multiple")
    task.change(on_task_change, [task, solver], [solver, steps, main_param, *param_widgets])
    solver.change(on_solver_change, [solver, task], [steps, main_param])
    event = run.click(functools.partial(restore, model_dirs=dirs),
                      [editor, mode, task, solver, steps, seed, main_param, noise, model, *param_widgets],
                      [slider, preview, measurement, summary, files],
                      api_name="restore", concurrency_limit=1, concurrency_id="solve")
    stop.click(None, None, None, cancels=[event])


def _invert_edit_tab(dirs) -> None:
    """Invert an image under a source prompt; show the reconstruction and the edit under a target prompt."""
    with gr.Row():
        with gr.Column():
            image = one_line_upload_errors(gr.Image(
                label="image (64x64 for emoji-sd; sides multiple of the VAE factor)", type="filepath",
                sources=("upload", "clipboard")))
            gr.Examples([[p] for p, _ in webapp.examples(64)[:12]], inputs=[image], label="held-out emoji")
            source = gr.Textbox(label="source prompt (describes the image)")
            target = gr.Textbox(label="target prompt (the edit)")
            with gr.Row():
                method = gr.Dropdown(["newton", "ddim", "null-text"], value="newton", label="inversion")
                steps = gr.Number(value=10, precision=0, minimum=1, maximum=1000, label="steps")
                guidance = gr.Number(value=0,
                                     label="guidance (0: the method's default, 1 or 7.5 for null-text)")
                strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="strength")
            model = gr.Dropdown(TEXT_TO_IMAGE_MODELS, value=default_model(TEXT_TO_IMAGE),
                                allow_custom_value=True,
                                label="text-to-image model (registered name or folder)")
            run = gr.Button("Invert & edit", variant="primary")
        with gr.Column():
            reconstruction = gr.Image(label="reconstruction (source prompt)", type="numpy")
            edited = gr.Image(label="edit (target prompt)", type="numpy")
            summary = gr.Markdown()
    run.click(functools.partial(invert_edit, model_dirs=dirs),
              [image, source, target, method, steps, guidance, strength, model],
              [reconstruction, edited, summary], api_name="edit", concurrency_id="solve")


def _personalize_tab(dirs) -> None:
    """Learn a token from a few images with a live loss plot, then generate with it."""
    with gr.Row():
        with gr.Column():
            concept = gr.File(label="a few images of the concept", file_count="multiple",
                              file_types=["image"])
            with gr.Row():
                token = gr.Textbox(value="<my-concept>", label="new token")
                init = gr.Textbox(value="face", label="initializer word (one token)")
            with gr.Row():
                steps = gr.Number(value=300, precision=0, minimum=1, maximum=20000, label="steps")
                lr = gr.Number(value=5e-3, label="learning rate")
                cross = gr.Checkbox(value=False, label="Cross-Initialization")  # off, as in the CLI
            model = gr.Dropdown(TEXT_TO_IMAGE_MODELS, value=default_model(TEXT_TO_IMAGE),
                                allow_custom_value=True, label="model")
            with gr.Row():
                train = gr.Button("Train", variant="primary")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column():
            loss_plot = gr.LinePlot(x="step", y="loss", label="training loss")
            status = gr.Markdown()
            embedding = gr.File(label="learned_embeds.safetensors (download, or upload one to use)")
    with gr.Row():
        prompt = gr.Textbox(value=webapp.starting_token_prompt(default_model(TEXT_TO_IMAGE), "<my-concept>"),
                            label="prompt")
        with gr.Column():
            n_images = gr.Number(value=4, precision=0, minimum=1, maximum=16, label="images")
            gen_steps = gr.Number(value=20, precision=0, minimum=1, maximum=200, label="steps")
            gen_guidance = gr.Number(value=3.0, label="guidance")
            gen_seed = gr.Number(value=0, precision=0, label="seed")
    generate = gr.Button("Generate")
    gallery = gr.Gallery(label="samples", columns=4)
    train_event = train.click(functools.partial(train_token, model_dirs=dirs),
                              [concept, token, init, steps, lr, cross, model],
                              [loss_plot, embedding, status], api_name="personalize", concurrency_id="solve")
    stop.click(None, None, None, cancels=[train_event])
    generate.click(functools.partial(generate_images, model_dirs=dirs),
                   [prompt, embedding, n_images, gen_steps, gen_guidance, gen_seed, model],
                   [gallery], api_name="generate", concurrency_id="solve")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``python app.py``; ``studio app`` declares the same ones in :mod:`studio.cli.app`, which
    must not import gradio to build its parser (a test checks the two agree)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model-dir", action="append", metavar="FOLDER",
                        help="a folder whose model folders the model fields accept (repeatable; default: "
                             f"${webapp.MODEL_DIRS_ENV}, else ./models); registered names always work")
    parser.add_argument("--auth", metavar="USER:PASS",
                        help="require this login (for a --host reachable from the network)")
    return parser


def serve(args: argparse.Namespace) -> None:
    """Check the flags (a bad --auth is a StudioError: one line), warn when the network can reach the app,
    then launch it (blocks)."""
    auth = webapp.parse_auth(args.auth)
    warning = webapp.network_warning(args.host, args.port, auth is not None)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
    build(args.model_dir).launch(server_name=args.host, server_port=args.port, share=False, show_error=True,
                                 auth=auth, allowed_paths=[str(OUTPUT_ROOT.resolve())])


def main(argv: list[str] | None = None) -> None:
    """``python app.py [--host H] [--port P] [--model-dir D ...] [--auth USER:PASS]``."""
    parser = add_arguments(argparse.ArgumentParser(description="diffusion-studio web app"))
    args = parser.parse_args(argv)
    try:
        serve(args)
    except StudioError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
