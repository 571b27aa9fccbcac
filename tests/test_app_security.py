"""The web app's model fields accept registered names and folders inside the allowed model folders only, with
one message for everything else (issue 22 item 6); ``--host`` beyond loopback warns; ``--auth`` logs in.

Through :mod:`studio.workflows.web` and, like tests/test_app.py (whose ``client`` fixture and helpers are
reused), through gradio_client against a launched app."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from models.registry import registered_models
from studio.core.errors import StudioError
from studio.workflows import web as webapp
from tests import test_app
from tests.test_app import EXAMPLE, _editor, _restore

#: the app launched as tests/test_app.py launches it (a module-scoped fixture, one app for this module)
client = test_app.client

ONLY_UNKNOWN = f"^{re.escape(webapp.UNKNOWN_MODEL)}$"
pytestmark = pytest.mark.skipif("emoji-pixel" not in registered_models(),
                                reason="needs the shipped emoji-pixel weights")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """An allowed folder holding a real model and two symlinks (one out, one in), and the same model
    outside it. The module's app allows only ``allowed`` (and the shipped weights)."""
    root = tmp_path_factory.mktemp("model_dirs")
    shipped = registered_models()["emoji-pixel"]
    inside = shutil.copytree(shipped, root / "allowed" / "pixel")
    outside = shutil.copytree(shipped, root / "elsewhere" / "pixel")
    (root / "allowed" / "escape").symlink_to(outside, target_is_directory=True)
    (root / "allowed" / "alias").symlink_to(inside, target_is_directory=True)
    return {"allowed": root / "allowed", "inside": Path(inside), "outside": Path(outside)}


@pytest.fixture(scope="module", autouse=True)
def app_allows_only_the_allowed_folder(folders):
    """``client`` (tests/test_app.py) builds the app with no arguments: it reads STUDIO_MODEL_DIRS."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(webapp.MODEL_DIRS_ENV, str(folders["allowed"]))
        yield


def _refused(folders) -> list:
    """Values that must all get the same message: system paths, a missing path, a real model folder
    outside, a symlink out of the allowed folder, ``..`` out of it (also after a link: the OS takes ``..`` in
    the link's target), a hub id, and non-paths."""
    allowed, outside = folders["allowed"], folders["outside"]
    return ["/etc/passwd", "/root", "/no/such/folder", str(outside), str(allowed / "escape"),
            f"{allowed}/../elsewhere/pixel", f"{allowed}/escape/../pixel", str(allowed / "missing"),
            "someone/unreachable-model", "~", "bad\0path", 7]


def test_model_check_refuses_everything_outside_the_allow_list_with_one_message(folders):
    allowed = webapp.allowed_model_dirs([folders["allowed"]])
    for value in _refused(folders):
        with pytest.raises(StudioError) as err:
            webapp.check_model(value, allowed)
        assert str(err.value) == webapp.UNKNOWN_MODEL, value


def test_model_check_accepts_registered_names_and_folders_inside(folders):
    allowed = webapp.allowed_model_dirs([folders["allowed"]])
    inside = str(folders["inside"].resolve())
    assert webapp.check_model("emoji-pixel", allowed) == "emoji-pixel"
    assert webapp.check_model("gaussian-demo", allowed) == "gaussian-demo"
    assert webapp.check_model("", allowed) is None and webapp.check_model(None, allowed) is None
    assert webapp.check_model(str(folders["inside"]), allowed) == inside
    assert webapp.check_model(str(folders["allowed"] / "alias"), allowed) == inside  # a link that stays in
    assert webapp.check_model(f"{folders['allowed']}/alias/../pixel", allowed) == inside
    shipped = str(registered_models()["emoji-pixel"].resolve())
    assert webapp.check_model(shipped, allowed) == shipped  # the shipped weights are always allowed


def test_allowed_model_dirs_come_from_flags_else_env_else_dot_models(tmp_path, monkeypatch):
    weights = registered_models()["emoji-pixel"].parent.resolve()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(webapp.MODEL_DIRS_ENV, raising=False)
    assert webapp.allowed_model_dirs() == (weights, tmp_path.resolve() / "models")
    monkeypatch.setenv(webapp.MODEL_DIRS_ENV, os.pathsep.join(["a", "", str(tmp_path / "b" / ".." / "c")]))
    assert webapp.allowed_model_dirs() == (weights, tmp_path.resolve() / "a", tmp_path.resolve() / "c")
    assert webapp.allowed_model_dirs(["x", "y"]) == (weights, tmp_path.resolve() / "x",
                                                     tmp_path.resolve() / "y")


def _every_model_field(c, app, model):
    """Call each endpoint that takes a model name with ``model``; return the error messages."""
    from gradio_client import handle_file

    img64 = handle_file(webapp.examples(64)[0][0])
    calls = [
        lambda: _restore(c, app, _editor(EXAMPLE), "inpaint_box", steps=2, model=model),
        lambda: c.predict(img64, "a", "b", "newton", 2, None, 1.0, model, "auto", "", "", 0,
                          api_name="/edit"),
        lambda: c.predict([img64], "<t>", "heart", 2, 5e-3, "ti", model, api_name="/personalize"),
        lambda: c.predict("a <t>", None, 1, 2, 3.0, 0, model, api_name="/generate"),
    ]
    messages = []
    for call in calls:
        with pytest.raises(Exception) as err:
            call()
        messages.append(str(err.value))
    return messages


def test_every_model_field_refuses_outside_paths_with_the_identical_message(client, folders):
    c, app = client
    for value in _refused(folders)[:-1]:  # the browser sends strings
        assert set(_every_model_field(c, app, value)) == {webapp.UNKNOWN_MODEL}, value
    _, _, _, summary, _ = _restore(c, app, _editor(EXAMPLE), "inpaint_box", steps=2)
    assert "PSNR" in summary  # the app keeps serving


def test_a_folder_inside_the_allow_list_restores_and_its_copy_outside_does_not(client, folders):
    c, app = client
    _, _, _, summary, files = _restore(c, app, _editor(EXAMPLE), "inpaint_box", steps=2,
                                       model=str(folders["inside"]))
    assert "PSNR" in summary and files[0].endswith("restored.png")
    with pytest.raises(Exception, match=ONLY_UNKNOWN):
        _restore(c, app, _editor(EXAMPLE), "inpaint_box", steps=2, model=str(folders["outside"]))


def test_a_symlink_out_of_the_allow_list_is_refused(client, folders):
    c, app = client
    with pytest.raises(Exception, match=ONLY_UNKNOWN):
        _restore(c, app, _editor(EXAMPLE), "inpaint_box", steps=2, model=str(folders["allowed"] / "escape"))
    _, _, _, summary, _ = _restore(c, app, _editor(EXAMPLE), "inpaint_box", steps=2,
                                   model=str(folders["allowed"] / "alias"))  # a link that stays inside
    assert "PSNR" in summary


def test_file_fields_refuse_server_paths_whether_they_exist_or_not(client):
    """A file field given a server path (not an upload) is refused by Gradio before our code runs, with a
    message that only repeats the path typed (this pins Gradio's guard; it also held before the fix)."""
    import httpx

    c, _ = client
    url = c.src.rstrip("/")

    def error(path: str) -> str:
        data = ["a <t>", {"path": path, "meta": {"_type": "gradio.FileData"}}, 1, 2, 3.0, 0, "emoji-sd"]
        event = httpx.post(f"{url}/gradio_api/call/generate", json={"data": data}).json()["event_id"]
        reply = httpx.get(f"{url}/gradio_api/call/generate/{event}", timeout=120).text
        assert reply.startswith("event: error"), reply
        return reply.replace(path, "<path>").replace(os.path.abspath(path), "<path>")

    paths = ["/etc/passwd", "/no/such/file.safetensors", "/root", f"{os.getcwd()}/../../etc/passwd"]
    assert len({error(p) for p in paths}) == 1


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                           ("127.0.0.2", True), ("0.0.0.0", False), ("::", False),
                                           ("192.168.1.5", False), ("example.org", False), ("", False)])
def test_only_loopback_hosts_are_quiet(host, loopback):
    assert webapp.is_loopback(host) is loopback
    warning = webapp.network_warning(host, 7860, auth=False)
    assert (warning is None) is loopback
    if not loopback:
        assert "reachable from the network" in warning and "--auth" in warning


@pytest.mark.parametrize("value,parsed", [("admin:s3cret", ("admin", "s3cret")), ("u:p:q", ("u", "p:q")),
                                          (None, None)])
def test_auth_parses_user_and_password(value, parsed):
    assert webapp.parse_auth(value) == parsed


@pytest.mark.parametrize("value", ["admin", "admin:", ":s3cret", "", " :pw"])
def test_malformed_auth_is_refused_without_repeating_it(value):
    with pytest.raises(StudioError, match="USER:PASS") as err:
        webapp.parse_auth(value)
    assert "\n" not in str(err.value) and (not value or value not in str(err.value))


class _Launched(Exception):
    """Raised by the stub in place of serving forever."""


@pytest.fixture
def launched(monkeypatch, tmp_path):
    """``studio.app.build`` replaced by a stub that records the model folders and launch arguments."""
    from studio import app

    seen: dict = {}

    class Demo:
        def launch(self, **kwargs):
            seen.update(kwargs)
            raise _Launched

    def build(model_dirs=None):
        seen["model_dirs"] = model_dirs
        return Demo()

    monkeypatch.setattr(app, "build", build)
    monkeypatch.setattr(app, "OUTPUT_ROOT", tmp_path / "outputs")
    return seen


def test_app_py_warns_beyond_loopback_and_passes_auth_and_model_dirs(launched, capsys):
    from studio import app

    with pytest.raises(_Launched):
        app.main(["--host", "0.0.0.0", "--port", "7861", "--auth", "ann:pw:x", "--model-dir", "a",
                  "--model-dir", "b"])
    err = capsys.readouterr().err
    assert "reachable from the network" in err and "0.0.0.0:7861" in err
    assert launched["auth"] == ("ann", "pw:x") and launched["server_name"] == "0.0.0.0"
    assert launched["model_dirs"] == ["a", "b"] and launched["share"] is False
    with pytest.raises(_Launched):
        app.main([])
    assert capsys.readouterr().err == "" and launched["auth"] is None and launched["model_dirs"] is None


def test_studio_app_warns_and_refuses_a_malformed_auth_with_one_line(launched, capsys):
    from studio.cli import main as cli

    with pytest.raises(_Launched):
        cli(["app", "--host", "0.0.0.0", "--auth", "ann:pw"])
    assert "reachable from the network" in capsys.readouterr().err and launched["auth"] == ("ann", "pw")
    launched.clear()
    assert cli(["app", "--host", "0.0.0.0", "--auth", "annpw"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "USER:PASS" in err and "annpw" not in err
    assert not launched  # refused before anything was built or launched


def test_app_py_refuses_a_malformed_auth_with_one_line(launched, capsys):
    from studio import app

    with pytest.raises(SystemExit) as exit_:
        app.main(["--auth", "nopassword:"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "USER:PASS" in err
    assert not launched


def test_studio_app_and_app_py_take_the_same_flags():
    import argparse

    from studio import app
    from studio.cli import build_parser

    argv = ["--host", "0.0.0.0", "--port", "1", "--model-dir", "a", "--model-dir", "b", "--auth", "u:p"]
    ours = vars(app.add_arguments(argparse.ArgumentParser()).parse_args(argv))
    cli = vars(build_parser().parse_args(["app", *argv]))
    assert {k: cli[k] for k in ours} == ours
