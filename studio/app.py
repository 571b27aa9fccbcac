"""diffusion-studio in the browser: ``python app.py`` (the checkout's launcher) or ``studio app``, on
http://127.0.0.1:7860.

Layout and wiring only: every action calls a ``studio`` workflow through :mod:`studio.workflows.web`. Runs
offline with the embedded models; never opens a public share link. The model fields take registered names
and folders inside the allowed model folders only (``--model-dir``, ``$STUDIO_MODEL_DIRS``): a browser must
not load, or learn about, anything else on the server's disk.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from models.registry import MODELS, PIXEL, TEXT_TO_IMAGE, default_model  # noqa: E402
from solvers import SOLVERS, solver_config  # noqa: E402
from studio.core.config import to_plain  # noqa: E402
from studio.core.errors import SolveCancelled, StudioError  # noqa: E402
from studio.workflows import editing, personalize  # noqa: E402
from studio.workflows import web as webapp  # noqa: E402

OUTPUT_ROOT = Path(os.environ.get("STUDIO_APP_OUTPUTS", "outputs/app"))
#: the text-to-image models offered in the Invert & edit and Personalize tabs (a folder inside the allowed
#: ones may be typed in); the Restore tab offers every registered model (webapp.model_choices)
TEXT_TO_IMAGE_MODELS = [name for name, entry in MODELS.items() if entry.kind == TEXT_TO_IMAGE]
#: one widget per (task, parameter); only the current task's widgets are visible and used
PARAM_SPECS = [(task, key) for task, params in webapp.TASK_PARAMS.items() for key in params]


@dataclass
class JobDone:
    result: object


@dataclass
class SessionRun:
    """One browser session's Restore, Invert & edit or Personalize training, from its click to its end: its
    progress and last x̂0 (a Restore's)."""
    started: float
    total: int = 0
    step: int = 0
    preview: object = None
    stop: threading.Event = field(default_factory=threading.Event)  # set by Stop; the solver ends next step
    begun: bool = False  # a request took it up (it runs until finished)


class SessionRuns:
    """The run of each browser session in one tab (Restore, Invert & edit, Personalize), on the server, for
    its Stop button.

    The Run click registers the session's run before the request is queued (:meth:`prepare`), the queued
    request takes it up (:meth:`begin`), and Stop only sets its ``stop`` (:meth:`stop`): a queued run then
    never starts, a running one ends at its next step, and the run itself shows "stopped at step N" as its
    last output. One writer per field: a Stop handler that wrote the message, or Gradio's ``cancels``, raced
    with the run's last preview (the message was replaced, or never shown, 1 in 7 and 1 in 20 browser
    runs). Keyed by the request's session; past ``keep`` sessions the oldest are forgotten."""

    def __init__(self, keep: int = 64):
        self.keep = keep
        self._by_session: dict = {}
        self._lock = threading.Lock()

    def prepare(self, session) -> SessionRun:
        """A new run for ``session`` (its Run click), replacing one that has not begun. A running one stays:
        the page drops a second click while its request runs, and Stop must still reach that run."""
        with self._lock:
            current = self._by_session.get(session)
            if current is not None and current.begun:
                return current
            return self._put(session, SessionRun(started=time.perf_counter()))

    def begin(self, session, total: int) -> SessionRun:
        """The run a request of ``session`` executes: the one its click prepared, else (an API call, or a
        second request while the first runs) a new one; its clock starts now."""
        with self._lock:
            run = self._by_session.get(session)
            if run is None or run.begun:
                run = self._put(session, SessionRun(started=0.0))
            run.started, run.total, run.begun = time.perf_counter(), total, True
            return run

    def _put(self, session, run: SessionRun) -> SessionRun:
        """Register ``run`` for ``session`` as the newest; forget the oldest past ``keep`` (lock held)."""
        self._by_session.pop(session, None)
        self._by_session[session] = run
        while len(self._by_session) > self.keep:
            self._by_session.pop(next(iter(self._by_session)))
        return run

    def stop(self, session) -> bool:
        """Stop ``session``'s run (queued or running); False when it has none."""
        run = self.get(session)
        if run is not None:
            run.stop.set()
        return run is not None

    def get(self, session) -> SessionRun | None:
        with self._lock:
            return self._by_session.get(session)

    def finish(self, session, run: SessionRun) -> None:
        with self._lock:
            if self._by_session.get(session) is run:
                del self._by_session[session]

    def streamed(self, session, total: int, stream):
        """The yields of ``stream(run)`` for the run a request of ``session`` executes (:meth:`begin`),
        let go of however the stream ends (:meth:`finish`)."""
        run = self.begin(session, total)
        try:
            yield from stream(run)
        finally:
            self.finish(session, run)


RESTORE_RUNS = SessionRuns()
EDIT_RUNS = SessionRuns()
TRAIN_RUNS = SessionRuns()


def _session(request: gr.Request | None):
    return getattr(request, "session_hash", None)


_RUNNING_JOBS: set = set()  # (thread, its stream's closed event) of each stream_job worker running


@atexit.register
def _stop_running_jobs(timeout_s: float = 30.0) -> None:
    """At exit, stop the workers still running and wait for them: a daemon thread torn down inside a torch
    op aborts the whole process ("terminate called without an active exception"), which happened when a
    test ended right after a Stop."""
    for thread, closed in list(_RUNNING_JOBS):
        closed.set()
        thread.join(timeout_s)


def stream_job(work, stop_request: threading.Event | None = None):
    """Run ``work(report, stopped)`` in a thread; yield each value it reports, then ``JobDone(result)``.

    Errors become one readable ``gr.Error`` (the app survives anything one request does). Closing this
    generator (Stop button's cancel, closed page) or setting ``stop_request`` makes ``stopped()`` true, so
    the job's callback can end the solve or the training at its next step; a job ended by ``stop_request``
    ends the stream quietly (no result, no error), one that finished first still yields its result."""
    end = object()
    items: queue.Queue = queue.Queue()
    closed = threading.Event()
    requested = stop_request or threading.Event()
    outcome: dict = {}

    def stopped() -> bool:
        return closed.is_set() or requested.is_set()

    def target():
        try:
            outcome["result"] = work(items.put, stopped)
        except (StudioError, SolveCancelled) as err:
            outcome["error"] = webapp.user_message(err)
        except Exception as err:  # noqa: BLE001
            outcome["error"] = webapp.user_message(err)
        finally:
            _RUNNING_JOBS.discard(job)
            items.put(end)

    thread = threading.Thread(target=target, daemon=True)
    job = (thread, closed)
    _RUNNING_JOBS.add(job)
    thread.start()
    try:
        while (item := items.get()) is not end:
            yield item
    finally:
        closed.set()  # closed early: the job ends at its next step
    thread.join()
    if "result" in outcome:  # finished before the stop took effect: its outputs exist, so they are shown
        yield JobDone(outcome["result"])
    elif not requested.is_set():
        raise gr.Error(outcome["error"])


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


def _kind_of_field(model, model_dirs) -> str:
    """The kind of the model typed or chosen; a model the app refuses counts as pixel (Restore says why)."""
    try:
        return webapp.model_kind_of(webapp.check_model(model, model_dirs))
    except StudioError:
        return "pixel"


def _image_of(editor):
    """The editor's image as a tensor, or None when there is none or it cannot be read (Restore says why)."""
    try:
        return webapp.to_image_tensor(editor)
    except StudioError:
        return None


def _note(editor, model, solver, steps, task, mode, model_dirs) -> str:
    try:
        model = webapp.check_model(model, model_dirs)
    except StudioError:
        return ""
    return webapp.upload_note(_image_of(editor), model, solver, steps, task, mode)


def _solver_panel(solver: str, task: str, noise: float | None):
    """The fields that follow the solver: its default steps, then updates for the main parameter, the
    prompt field, the description and the step advice."""
    main_name = webapp.MAIN_PARAM.get(solver, "parameter")
    steps, main = _solver_defaults(solver, task)
    takes_prompt = solver in SOLVERS and SOLVERS[solver].takes_prompt
    return (steps, gr.update(value=main, label=f"{main_name} ({solver})"), gr.update(visible=takes_prompt),
            webapp.solver_text(solver), webapp.step_advice(solver, steps, noise))


def _task_values(task: str, image) -> dict:
    """The task's parameter values for ``image`` (sizes that follow the image; None without one)."""
    return webapp.task_param_values(task, tuple(image.shape[-2:]) if image is not None else None)


def on_model_change(model, task, solver, editor, mode, noise, model_dirs=()):
    """The solver list follows the model's kind (pixel or text-to-image)."""
    kind = _kind_of_field(model, model_dirs)
    choices = webapp.solver_choices(task, kind)
    names = [n for _, n in choices]
    solver = solver if solver in names else names[0]
    steps, *panel = _solver_panel(solver, task, noise)
    return (gr.update(choices=choices, value=solver), steps, *panel,
            _note(editor, model, solver, steps, task, mode, model_dirs))


def on_task_change(task, solver, model, editor, mode, model_dirs=()):
    kind = _kind_of_field(model, model_dirs)
    names = webapp.solvers_for(task, kind)
    solver = solver if solver in names else ("cdim" if "cdim" in names else names[0])
    values = _task_values(task, _image_of(editor))
    params = [gr.update(visible=owner == task, value=values[key] if owner == task else None)
              for owner, key in PARAM_SPECS]
    title, about = webapp.task_text(task)
    noise = webapp.task_noise_sigma(task)
    steps, *panel = _solver_panel(solver, task, noise)
    return (gr.update(choices=webapp.solver_choices(task, kind), value=solver), steps, *panel, noise,
            webapp.image_label(task), f"**{title}**: {about}.",
            _note(editor, model, solver, steps, task, mode, model_dirs), *params)


def on_solver_change(solver, task, model, editor, mode, noise, model_dirs=()):
    steps, *panel = _solver_panel(solver, task, noise)
    return steps, *panel, _note(editor, model, solver, steps, task, mode, model_dirs)


def on_steps_change(solver, steps, task, model, editor, mode, noise, model_dirs=()):
    note = _note(editor, model, solver, steps, task, mode, model_dirs)
    return webapp.step_advice(solver, steps, noise), note


def on_image(editor, task, model, solver, steps, mode, model_dirs=()):
    """A new image: say what will happen to it, size the task fields and the brush to it."""
    image = _image_of(editor)
    values = _task_values(task, image)
    params = [gr.update(value=values[key]) if owner == task else gr.update() for owner, key in PARAM_SPECS]
    brush = max(3, max(image.shape[-2:]) // 16) if image is not None else 3
    return (_note(editor, model, solver, steps, task, mode, model_dirs),
            gr.update(brush=gr.Brush(default_size=brush, colors=["#ff00ff"], color_mode="fixed"),
                      eraser=gr.Eraser(default_size=brush)),
            *params)


def _progress_text(i: int, total: int, started: float) -> str:
    elapsed = time.perf_counter() - started
    left = elapsed / max(i, 1) * (total - i)
    return (f"step {i} / {total} · {webapp.describe_duration(elapsed)} elapsed · about "
            f"{webapp.describe_duration(left)} left")


def restore(request: gr.Request, editor, mode, task, solver, steps, seed, main_param, noise_sigma, model,
            prompt, *param_values, model_dirs=()):
    """Generator: x̂0 previews while the solver runs, then the before/after slider, summary and files.
    Yields (slider, x̂0 preview, measurement, progress, summary, files); the progress and the last preview
    are also kept in ``RESTORE_RUNS`` for the session's Stop button (:func:`on_stop`)."""
    try:
        model = webapp.check_model(model, model_dirs)
        image = webapp.to_image_tensor(editor)
        fill = (webapp.fill_mask_from_editor(editor, tuple(image.shape[-2:])) if task == "inpaint_mask"
                else None)
        image, fill, fitted = webapp.fit_to_model(image, fill, model, task, mode)
        params = {key: v for (owner, key), v in zip(PARAM_SPECS, param_values) if owner == task}
        overrides = webapp.task_overrides(task, params, noise_sigma)
        if main_param is not None and webapp.MAIN_PARAM.get(solver):
            overrides.append(f"{webapp.MAIN_PARAM[solver]}={main_param}")
        if prompt and solver in SOLVERS and SOLVERS[solver].takes_prompt:
            overrides.append(f"prompt={prompt}")
        job = webapp.RestoreJob(image=image, task=task, solver=solver, mode=mode, steps=int(steps),
                                seed=int(seed), overrides=overrides, fill_mask=fill, model=model)
    except StudioError as err:
        raise gr.Error(webapp.user_message(err)) from None
    yield from RESTORE_RUNS.streamed(_session(request), int(steps),
                                     lambda run: _restore_stream(job, run, solver, fitted))


def _restore_stream(job, run: SessionRun, solver: str, fitted: str | None):
    """The yields of :func:`restore` once its job is built; once Stop has set ``run.stop``, one last
    "stopped at step N" with the last x̂0."""

    def work(report, stopped):
        def callback(i, total, x_t, x0):
            if stopped():
                return False
            if i % 5 == 0 or i == total - 1:
                report((i + 1, total, x0))
            return None

        return webapp.run_restore(job, OUTPUT_ROOT, callback=callback)

    if run.stop.is_set():
        yield (gr.update(), gr.update(), gr.update(), "stopped before it started", gr.update(), gr.update())
        return
    yield (gr.update(), gr.update(), gr.update(), f"starting {SOLVERS[solver].title}…", gr.update(),
           gr.update())
    res = None
    with contextlib.closing(stream_job(work, stop_request=run.stop)) as stream:
        for item in stream:
            if isinstance(item, JobDone):
                res = item.result
                break
            if run.stop.is_set():
                break
            i, total, x0 = item
            # x̂0 in model units (decoded for the latent solvers)
            run.preview = webapp.display_image(((x0[:1] + 1) / 2).float().cpu().clamp(0, 1))
            run.step, run.total = i, total
            yield (gr.update(), run.preview, gr.update(), _progress_text(i, total, run.started), gr.update(),
                   gr.update())
    if res is None:  # stopped (a finished result that came first is still shown)
        if run.stop.is_set():
            yield (gr.update(), *_stopped_message(run), gr.update(), gr.update())
        return
    before = webapp.display_image(res["measurement"])
    after = webapp.display_image(res["restored"])
    summary = webapp.summary_markdown(res["record"]) + (f"\n\n{fitted}." if fitted else "")
    done = f"done: {res['record']['solver_params']['steps']} steps in " \
           f"{webapp.describe_duration(time.perf_counter() - run.started)}"
    yield (before, after), after, before, done, summary, [res["files"]["restored"], res["files"]["record"]]


def _stopped_message(run: SessionRun) -> tuple:
    """(x̂0 preview, measurement, progress) once ``run`` stopped: where, and its last x̂0 as the partial
    result."""
    text = (f"stopped at step {run.step} / {run.total} after "
            f"{webapp.describe_duration(time.perf_counter() - run.started)}")
    if run.preview is None:
        return gr.update(), gr.update(), text
    return run.preview, gr.update(), text + " · the last x̂0 is shown as the partial result"


def prepare_restore(request: gr.Request) -> None:
    """The Run click, before its request is queued: registers the session's run, so Stop can reach it."""
    RESTORE_RUNS.prepare(_session(request))


def on_stop(request: gr.Request) -> None:
    """Stop: the session's run ends at its next step (a queued one never starts) and says where itself."""
    RESTORE_RUNS.stop(_session(request))


def prepare_edit(request: gr.Request) -> None:
    """The Invert & edit click (or Enter), before its request is queued: registers the session's run."""
    EDIT_RUNS.prepare(_session(request))


def on_edit_stop(request: gr.Request) -> None:
    """Stop on the Invert & edit tab: as :func:`on_stop`, for the session's edit."""
    EDIT_RUNS.stop(_session(request))


def invert_edit(request: gr.Request, image, source_prompt, target_prompt, method, steps, guidance, strength,
                model, control="auto", blend="", reweight="", edit_guidance=0, model_dirs=()):
    """Generator: invert under the source prompt, then show the reconstruction, the edit under the target
    prompt with attention control, the blend mask, a summary and the files (edit, reconstruction, mask,
    JSON record). The run is kept in ``EDIT_RUNS`` for the session's Stop button (:func:`on_edit_stop`)."""
    with _errors_as_messages():
        model = webapp.check_model(model, model_dirs)
        x = webapp.to_image_tensor(image)
        control_params = webapp.control_params_from_fields(blend, reweight)
    edit_args = dict(
        image=x, source_prompt=source_prompt or "", target_prompt=target_prompt or "", method=method,
        steps=int(steps), guidance=None if guidance in (None, "", 0) else float(guidance),
        strength=float(strength), model=model, out_root=OUTPUT_ROOT / "edit", control=control,
        control_params=control_params,
        edit_guidance=None if edit_guidance in (None, "", 0) else float(edit_guidance))
    yield from EDIT_RUNS.streamed(_session(request), int(steps), lambda run: _edit_stream(edit_args, run))


def _edit_stream(edit_args: dict, run: SessionRun):
    """The yields of :func:`invert_edit` once its arguments are checked; once Stop has set ``run.stop``, one
    last "stopped" summary (the run is its only writer, so it never sits beside a finished edit)."""
    keep = (gr.update(), gr.update(), gr.update())
    if run.stop.is_set():
        yield (*keep, "stopped before it started", gr.update())
        return
    yield (*keep, f"inverting with {edit_args['method']}…", gr.update())
    res = None
    with contextlib.closing(stream_job(lambda report, stopped: webapp.run_edit(**edit_args, stopped=stopped),
                                       stop_request=run.stop)) as stream:
        res = next((item.result for item in stream if isinstance(item, JobDone)), None)
    if res is None:  # stopped: nothing is shown or kept (the job writes its files only once finished)
        yield (*keep, f"stopped after {webapp.describe_duration(time.perf_counter() - run.started)}; "
                      "nothing was saved", gr.update())
        return
    rec = res["record"]
    text = (f"**{rec['method']}** inversion · {rec['inverted_steps']} steps · NFE {rec['nfe']} · "
            f"{time.perf_counter() - run.started:.1f} s\n\n"
            f"reconstruction PSNR **{rec['metrics']['psnr']:.2f} dB** "
            f"(the VAE round trip, the best any inversion can do: "
            f"{rec['vae_roundtrip_metrics']['psnr']:.2f} dB)\n\n{_control_text(rec)}")
    mask = webapp.display_image(res["mask"].expand(1, 3, -1, -1)) if res["mask"] is not None else None
    yield (webapp.display_image(res["reconstruction"]), webapp.display_image(res["edit"]), mask, text,
           list(res["files"].values()))


def _control_text(rec: dict) -> str:
    control = rec["control"]
    if control["mode"] == "none":
        return "attention control **off**: the edit is a plain regeneration under the target prompt"
    if rec["mask_fraction"] is None:
        blend = "no local blend"
    else:
        outside = "; outside it, the reconstruction's pixels" if control.get("pixel_blend") else ""
        blend = f"the edit is confined to the mask ({rec['mask_fraction']:.0%} of the image{outside})"
    return (f"attention control **{control['mode']}**: {editing.describe_injection(control)}; "
            f"edit guidance {rec['edit_guidance']:g}; {blend}")


def prepare_training(request: gr.Request) -> None:
    """The Train click, before its request is queued: registers the session's training run."""
    TRAIN_RUNS.prepare(_session(request))


def on_training_stop(request: gr.Request) -> None:
    """Stop on the Personalize tab: the training ends after its current step, checkpointed, and the token
    learned so far is offered (:func:`_training_stream`)."""
    TRAIN_RUNS.stop(_session(request))


def train_token(request: gr.Request, files, token, init, steps, lr, method, model, model_dirs=()):
    """Generator: live loss plot while textual inversion trains, then the embedding file. The run is kept in
    ``TRAIN_RUNS`` for the session's Stop button (:func:`on_training_stop`)."""
    if not files:
        raise gr.Error("upload a few images of the concept")
    with _errors_as_messages():
        model = webapp.check_model(model, model_dirs)
    train_args = dict(images=[str(f) for f in files], model=model, placeholder=token, initializer=init,
                      steps=int(steps), lr=float(lr), method=method,
                      output_dir=str(OUTPUT_ROOT / "personalize" / webapp.job_name()))
    yield from TRAIN_RUNS.streamed(_session(request), int(steps),
                                   lambda run: _training_stream(train_args, run))


def _training_stream(train_args: dict, run: SessionRun):
    """The yields of :func:`train_token` once its arguments are checked. Stop (``run.stop``) ends the training
    after its current step; the trainer checkpoints and writes the embedding there, so a stopped run offers
    the token learned so far and says at which step it stopped (the run is the status line's only writer)."""
    if run.stop.is_set():
        yield gr.update(), gr.update(), "stopped before it started"
        return

    def work(report, stopped):
        def callback(step, total, loss):
            report((step, loss))
            return False if stopped() else None

        return personalize.personalize(quiet=True, callback=callback, resume=False, validate_every=0,
                                       batch_size=min(4, len(train_args["images"])), **train_args)

    points, res = [], None
    with contextlib.closing(stream_job(work, stop_request=run.stop)) as stream:
        for item in stream:
            if isinstance(item, JobDone):
                res = item.result
                break
            points.append(item)
            if len(points) % 5 == 0:
                yield _loss_frame(points), gr.update(), f"step {item[0]} / {run.total}"
    elapsed = webapp.describe_duration(time.perf_counter() - run.started)
    if res is None:  # stopped, and the training ended in an error (stream_job keeps it quiet): no embedding
        yield _loss_frame(points), gr.update(), f"stopped after {elapsed}; no embedding to offer"
        return
    token = train_args["placeholder"]
    if res["step"] < run.total:
        status = (f"stopped at step {res['step']} / {run.total} after {elapsed} · the token learned so far "
                  f"is offered: {token}, loss {res['final_loss']:.4f}")
    else:
        status = f"learned {token} in {res['step']} steps, final loss {res['final_loss']:.4f}"
    yield _loss_frame(points), res["embeddings"], webapp.literal(status)


def _loss_frame(points) -> pd.DataFrame:
    return pd.DataFrame(webapp.smoothed_loss(points), columns=["step", "loss", "series"])


def on_concept_upload(files):
    return [str(f) for f in files] if files else []


def on_token_change(token, previous, prompt):
    """The generation prompt follows the token field."""
    return webapp.follow_token(prompt or "", previous or "", token or ""), token


def generate_images(prompt, embedding_file, n, steps, guidance, seed, model, truncation=None, model_dirs=()):
    warning = webapp.prompt_warning(prompt, webapp.learned_tokens(embedding_file))
    if warning:
        gr.Warning(webapp.literal(warning))
    with _errors_as_messages():
        model = webapp.check_model(model, model_dirs)

    def work(report, stopped):
        embeddings = [embedding_file] if embedding_file else []
        return personalize.generate(prompt, model=model, embeddings=embeddings, n=int(n), steps=int(steps),
                                    guidance=float(guidance), seed=int(seed),
                                    truncation=None if truncation is None else int(truncation))

    # in a stream_job worker, which the exit hook waits for: a page closed while it samples (a test that ends
    # after clicking Generate) must not leave the process to abort inside a torch op
    images = next(item.result for item in stream_job(work) if isinstance(item, JobDone))
    return [webapp.display_image(im[None]) for im in images]


#: on a narrow screen (a phone), bring the result into view when it arrives
SCROLL_TO = "() => {{ if (window.innerWidth < 700) document.getElementById('{}')?.scrollIntoView(); }}"


def build(model_dirs=None) -> gr.Blocks:
    """The app; its model fields accept registered names and folders inside ``model_dirs`` (see
    :func:`studio.workflows.web.allowed_model_dirs` for the default), fixed here for the app's lifetime."""
    dirs = webapp.allowed_model_dirs(model_dirs)
    with gr.Blocks(title="diffusion-studio") as demo:
        gr.Markdown("# diffusion-studio\nRestore degraded images with diffusion posterior solvers, invert "
                    "and edit images, learn new tokens. Models run offline on this server; every result "
                    "can be downloaded with its JSON record.")
        with gr.Tab("Restore"):
            _restore_tab(dirs)
        with gr.Tab("Invert & edit"):
            _invert_edit_tab(dirs)
        with gr.Tab("Personalize"):
            _personalize_tab(dirs)
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo


EXPLAIN_PREVIEW = "x̂0: the model's current guess of the clean image, updated while the solver runs"
EXPLAIN_MEASUREMENT = "measurement y: the degraded image the solver is given"


def _restore_results():
    """The Restore tab's result column: (slider, progress, x̂0 preview, measurement, summary, files)."""
    slider = gr.ImageSlider(label="measurement y / restored", type="numpy", format="png",
                            elem_id="restore-result")
    progress = gr.Markdown()
    with gr.Row():
        preview = gr.Image(label="x̂0 while it runs", type="numpy", height=256, format="png",
                           elem_id="restore-preview")
        measurement = gr.Image(label="measurement y", type="numpy", height=256, format="png")
    gr.Markdown(f"{EXPLAIN_PREVIEW}; {EXPLAIN_MEASUREMENT}. Relative residual: ‖y − A(x̂)‖ / ‖y‖, "
                "how far the result is from explaining y (near the noise level is right; far above "
                "it, the result ignores y).")
    summary = gr.Markdown()
    files = gr.File(label="download (PNG + JSON record)", file_count="multiple")
    return slider, progress, preview, measurement, summary, files


def _restore_tab(dirs) -> None:
    """Paint or pick an image, choose model, task and solver, watch x̂0 while it runs, compare before/after."""
    first_task = "inpaint_box"
    with gr.Row():
        with gr.Column(scale=1):
            editor = one_line_upload_errors(gr.ImageEditor(
                label="image", type="filepath",
                image_mode="RGBA", sources=("upload", "clipboard"), transforms=(), layers=False,
                brush=gr.Brush(default_size=3, colors=["#ff00ff"], color_mode="fixed"),
                eraser=gr.Eraser(default_size=3), canvas_size=(256, 256)))
            # what the image should be, by task, under the editor: the editor's own label stays (updating it
            # re-renders the canvas, which drops a fresh stroke) and text above it would move the canvas
            # under a brush stroke when it changes
            image_hint = gr.Markdown(webapp.image_label(first_task))
            note = gr.Markdown()
            model = gr.Dropdown(webapp.model_choices(), value=default_model(PIXEL), allow_custom_value=True,
                                label="model (registered name, or a folder inside the allowed model "
                                      "folders)",
                                info="pixel models run the pixel solvers, text-to-image models the latent "
                                     "ones")
            mode = gr.Radio(["simulate", "degraded"], value="simulate", label="the image is",
                            info="simulate: clean — degrade it first (shows y); degraded: it is the "
                                 "measurement y (the task's parameters below describe how it was degraded)")
            task = gr.Dropdown(webapp.task_choices(), value=first_task, label="task")
            title, about = webapp.task_text(first_task)
            task_about = gr.Markdown(f"**{title}**: {about}.")
            param_widgets = []
            for owner, key in PARAM_SPECS:
                label, default = webapp.TASK_PARAMS[owner][key]
                param_widgets.append(gr.Number(value=default, label=label, visible=owner == first_task,
                                               info="empty: follows the image size" if default is None
                                               else None))
            noise = gr.Slider(0, 0.3, value=webapp.task_noise_sigma(first_task), step=0.005,
                              label="noise sigma ([0,1] units)",
                              info="the measurement noise; starts at the task's configured value")
            solver = gr.Dropdown(webapp.solver_choices(first_task), value="cdim", label="solver")
            solver_about = gr.Markdown(webapp.solver_text("cdim"))
            prompt = gr.Textbox(label="prompt (a description of the image, for the text-prompted solvers)",
                                visible=False)
            with gr.Row():
                steps = gr.Number(value=50, precision=0, label="steps", minimum=1, maximum=1000)
                seed = gr.Number(value=0, precision=0, label="seed")
                main_param = gr.Number(value=3, label="inner_steps (cdim)")
            advice = gr.Markdown(webapp.step_advice("cdim", 50, webapp.task_noise_sigma(first_task)))
            with gr.Row():
                run = gr.Button("Restore", variant="primary")
                stop = gr.Button("Stop", variant="stop")
            gr.Examples([[p] for p, _ in webapp.examples(32)], inputs=[editor],
                        label="held-out emoji (click one to load it)", examples_per_page=50)
        with gr.Column(scale=1):
            slider, progress, preview, measurement, summary, files = _restore_results()
    bound = functools.partial
    panel = [main_param, prompt, solver_about, advice]
    # the handlers that rewrite the note run one at a time, in the order they were triggered: an upload's
    # note (which may first time a forward pass) must not land after, and undo, a later steps change's
    in_order = dict(concurrency_id="fields", concurrency_limit=1)
    model.change(bound(on_model_change, model_dirs=dirs), [model, task, solver, editor, mode, noise],
                 [solver, steps, *panel, note], **in_order)
    task.change(bound(on_task_change, model_dirs=dirs), [task, solver, model, editor, mode],
                [solver, steps, *panel, noise, image_hint, task_about, note, *param_widgets], **in_order)
    solver.input(bound(on_solver_change, model_dirs=dirs), [solver, task, model, editor, mode, noise],
                 [steps, *panel, note], **in_order)
    steps.input(bound(on_steps_change, model_dirs=dirs), [solver, steps, task, model, editor, mode, noise],
                [advice, note], **in_order)
    noise.input(webapp.step_advice, [solver, steps, noise], [advice])
    editor.upload(bound(on_image, model_dirs=dirs), [editor, task, model, solver, steps, mode],
                  [note, editor, *param_widgets], **in_order)
    mode.change(bound(_note, model_dirs=dirs), [editor, model, solver, steps, task, mode], [note], **in_order)
    _wire_run_and_stop(run, stop, [editor, mode, task, solver, steps, seed, main_param, noise, model, prompt,
                                   *param_widgets],
                       [slider, preview, measurement, progress, summary, files], dirs)


def _wire_run_and_stop(run, stop, inputs, outputs, dirs) -> None:
    """The Restore and Stop buttons: prepare_restore runs unqueued at the click, so a Stop while the request
    waits in the queue reaches it; Stop has no ``cancels``: the run stops itself and says where (a cancel
    raced with the run's last preview)."""

    def restore_here(request: gr.Request, *values):
        # not functools.partial: Gradio finds the gr.Request parameter only in a plain function's type hints
        yield from restore(request, *values, model_dirs=dirs)

    prepared = run.click(prepare_restore, None, None, queue=False, api_visibility="private")
    event = prepared.then(restore_here, inputs, outputs, api_name="restore", concurrency_limit=1,
                          concurrency_id="solve")
    event.then(None, js=SCROLL_TO.format("restore-result"))
    stop.click(on_stop, None, None, queue=False, api_visibility="private")


def _invert_edit_tab(dirs) -> None:
    """Invert an image under a source prompt; show the reconstruction and the edit under a target prompt."""
    with gr.Row():
        with gr.Column():
            image = one_line_upload_errors(gr.Image(
                label="image (64x64 for emoji-sd; sides multiple of the VAE factor)", type="filepath",
                sources=("upload", "clipboard"), height=256))
            source = gr.Textbox(label="source prompt (describes the image)",
                                info="an example below fills it with the emoji's caption")
            target = gr.Textbox(label="target prompt (the edit)", info="Enter runs the edit")
            with gr.Row():
                method = gr.Dropdown(["newton", "ddim", "null-text"], value="newton", label="inversion")
                steps = gr.Number(value=10, precision=0, minimum=1, maximum=1000, label="steps")
                guidance = gr.Number(value=0,
                                     label="guidance (0: the method's default, 1 or 7.5 for null-text)")
                strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="strength")
            with gr.Row():
                control = gr.Dropdown(
                    ["auto", "replace", "refine", "reweight", "none"], value="auto",
                    label="attention control",
                    info="prompt-to-prompt: auto swaps words (replace) or adds them (refine); none "
                         "regenerates")
                blend = gr.Textbox(label="blend words", placeholder="default: the words that differ",
                                   info="comma list; the edit stays where these words attend ('-': off)")
                reweight = gr.Textbox(label="reweight (WORD=SCALE)", placeholder="e.g. blue=2",
                                      info="scale a target word's attention (any control but none)")
                edit_guidance = gr.Number(value=0, label="edit guidance (0: the default)",
                                          info="the edit branch's guidance; the reconstruction keeps the "
                                               "inversion's")
            model = gr.Dropdown(TEXT_TO_IMAGE_MODELS, value=default_model(TEXT_TO_IMAGE),
                                allow_custom_value=True,
                                label="text-to-image model (registered name or folder)")
            with gr.Row():
                run = gr.Button("Invert & edit", variant="primary")
                stop = gr.Button("Stop", variant="stop")
            # one image input: drawn as a thumbnail gallery (two inputs would make a 50-row table); the
            # caption comes from the file name
            gr.Examples([[p] for p, _ in webapp.examples(64)], inputs=[image], outputs=[source],
                        fn=webapp.example_caption, run_on_click=True, cache_examples=False,
                        label="held-out emoji (click one: its caption becomes the source prompt)",
                        examples_per_page=50)
        with gr.Column():
            with gr.Row():
                reconstruction = gr.Image(label="reconstruction (source prompt)", type="numpy", format="png",
                                          elem_id="edit-result", height=300)
                edited = gr.Image(label="edit (target prompt)", type="numpy", format="png", height=300)
                mask = gr.Image(label="blend mask (white: edited region)", type="numpy", format="png",
                                height=300, elem_id="edit-mask")
            summary = gr.Markdown()
            files = gr.File(label="download (edit, reconstruction, mask, JSON record)", file_count="multiple",
                            elem_id="edit-files")
    inputs = [image, source, target, method, steps, guidance, strength, model, control, blend, reweight,
              edit_guidance]
    outputs = [reconstruction, edited, mask, summary, files]

    def edit_here(request: gr.Request, *values):
        # not functools.partial: Gradio finds the gr.Request parameter only in a plain function's type hints
        yield from invert_edit(request, *values, model_dirs=dirs)

    # Stop has no ``cancels`` (as on Restore): the run stops itself and says so, its summary's only writer
    for trigger, api_name in ((run.click, "edit"), (source.submit, None), (target.submit, None)):
        prepared = trigger(prepare_edit, None, None, queue=False, api_visibility="private")
        event = prepared.then(edit_here, inputs, outputs, api_name=api_name, concurrency_id="solve")
        event.then(None, js=SCROLL_TO.format("edit-result"))
    stop.click(on_edit_stop, None, None, queue=False, api_visibility="private")


def _personalize_tab(dirs) -> None:
    """Learn a token from a few images with a live loss plot, then generate with it."""
    start_token = "<my-concept>"
    with gr.Row():
        with gr.Column():
            concept = gr.File(label="a few images of the concept", file_count="multiple",
                              file_types=["image"])
            thumbnails = gr.Gallery(label="the images", columns=6, height=120, interactive=False)
            with gr.Row():
                token = gr.Textbox(value=start_token, label="new token")
                init = gr.Textbox(value="face", label="initializer word (one token)")
            with gr.Row():
                steps = gr.Number(value=300, precision=0, minimum=1, maximum=20000, label="steps")
                lr = gr.Number(value=5e-3, label="learning rate")
                method = gr.Dropdown([(title, m) for m, title in personalize.METHOD_TITLES.items()],
                                     value="ti", label="method")
            model = gr.Dropdown(TEXT_TO_IMAGE_MODELS, value=default_model(TEXT_TO_IMAGE),
                                allow_custom_value=True, label="model")
            with gr.Row():
                train = gr.Button("Train", variant="primary")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column():
            loss_plot = gr.LinePlot(x="step", y="loss", color="series", label="training loss",
                                    x_axis_format="d", elem_id="personalize-result")
            status = gr.Markdown()
            embedding = gr.File(label="learned_embeds.safetensors (download, or upload one to use)")
    with gr.Row():
        prompt = gr.Textbox(value=webapp.starting_token_prompt(default_model(TEXT_TO_IMAGE), start_token),
                            label="prompt", info="follows the token; Enter generates")
        with gr.Column():
            n_images = gr.Number(value=4, precision=0, minimum=1, maximum=16, label="images")
            gen_steps = gr.Number(value=20, precision=0, minimum=1, maximum=200, label="steps")
            gen_guidance = gr.Number(value=3.0, label="guidance")
            gen_seed = gr.Number(value=0, precision=0, label="seed")
            truncation = gr.Slider(0, 128, value=128, step=1, label="NeTI truncation",
                                   info="NeTI tokens only: fewer of the mapper's dimensions = more editable, "
                                        "more = closer to the concept")
    generate = gr.Button("Generate", variant="primary")
    gallery = gr.Gallery(label="samples", columns=4, elem_id="samples")
    previous_token = gr.State(start_token)
    concept.change(on_concept_upload, [concept], [thumbnails])
    token.change(on_token_change, [token, previous_token, prompt], [prompt, previous_token])

    def train_here(request: gr.Request, *values):
        # not functools.partial: Gradio finds the gr.Request parameter only in a plain function's type hints
        yield from train_token(request, *values, model_dirs=dirs)

    # Stop has no ``cancels`` (as on Restore): the training ends after its step, checkpointed, and says so
    prepared = train.click(prepare_training, None, None, queue=False, api_visibility="private")
    prepared.then(train_here, [concept, token, init, steps, lr, method, model],
                  [loss_plot, embedding, status], api_name="personalize", concurrency_id="solve")
    stop.click(on_training_stop, None, None, queue=False, api_visibility="private")
    action = dict(fn=functools.partial(generate_images, model_dirs=dirs),
                  inputs=[prompt, embedding, n_images, gen_steps, gen_guidance, gen_seed, model, truncation],
                  outputs=[gallery], concurrency_id="solve")
    for e in (generate.click(**action, api_name="generate"), prompt.submit(**action)):
        e.then(None, js=SCROLL_TO.format("samples"))


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
