"""Packaging: a wheel (what `pip install .` and `pip install git+URL` build) carries everything the studio
needs at run time: the code packages, ``configs/`` and ``examples/`` (as ``studio/configs``,
``studio/examples``) and the embedded models' weights (``models/weights``).

The slow test does what a new user does: build a wheel from the checkout, install it with the pinned CPU
torch into a fresh virtualenv, and run the README's main job from an unrelated empty directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE_TOPS = ("studio", "solvers", "models")
# checkout folder -> where the wheel carries it (pyproject.toml's package-dir and package-data)
SHIPPED_FOLDERS = {"configs": "studio/configs", "examples": "studio/examples",
                   "models/weights": "models/weights"}
TORCH = "torch==2.13.0"  # the pin in pyproject.toml and setup.sh
DEMO_INPUT = "emoji/034-32.png"  # the README's held-out example, relative to the examples folder


def setuptools_config() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def package_directories() -> set[str]:
    """Every code package in the checkout: a folder with ``__init__.py`` under studio/, solvers/, models/."""
    return {".".join(init.parent.relative_to(ROOT).parts)
            for top in CODE_TOPS for init in (ROOT / top).rglob("__init__.py")}


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(setuptools_config()["packages"])
    missing = sorted(package_directories() - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml (wheels lack them)"


def test_listed_packages_and_mapped_folders_exist() -> None:
    config = setuptools_config()
    mapped = config.get("package-dir", {})
    for package in config["packages"]:
        folder = ROOT / mapped.get(package, package.replace(".", "/"))
        assert folder.is_dir(), f"pyproject.toml lists package {package!r} but {folder} does not exist"


def source_files() -> list[str]:
    """The files a build from this checkout sees: git's tracked and untracked-but-not-ignored files (what
    `pip install git+URL` gets, give or take uncommitted work), else everything outside the usual build
    and environment folders."""
    if shutil.which("git") and (ROOT / ".git").exists():
        listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                                 capture_output=True, check=True).stdout.decode()
        return sorted(f for f in listing.split("\0") if f and (ROOT / f).is_file())
    skip = {".git", ".venv", "build", "runs", "outputs", "__pycache__", ".pytest_cache"}
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                  if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)
                  and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts))


def build_wheel(files: list[str], workdir: Path) -> Path:
    """Build the wheel from a clean copy of ``files``: an in-place build would reuse ``build/lib``, where
    setuptools keeps modules deleted from the source, so the wheel would not match the checkout."""
    source = workdir / "src"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q",
               "--disable-pip-version-check", "-w", str(workdir / "dist")]
    if importlib.util.find_spec("setuptools"):  # present in .venv: build with it, nothing to download
        command.append("--no-build-isolation")
    subprocess.run(command, check=True, timeout=900)
    return next((workdir / "dist").glob("diffusion_studio-*.whl"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[str]]:
    files = source_files()
    return build_wheel(files, tmp_path_factory.mktemp("wheel")), files


def clean_env() -> dict[str, str]:
    """The caller's environment without anything that could point the installed package back at the
    checkout (PYTHONPATH, the studio's folder overrides); offline, like the README's job needs."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "STUDIO_CONFIG_DIR", "STUDIO_CACHE_DIR")}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONNOUSERSITE="1")
    return env


@pytest.mark.slow
def test_wheel_carries_configs_examples_and_weights(built) -> None:
    wheel, files = built
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [dest + name[len(src):] for name in files for src, dest in SHIPPED_FOLDERS.items()
                if name.startswith(src + "/")]
    expected += [name for name in files if name.split("/")[0] in CODE_TOPS and name.endswith(".py")]
    assert len(expected) > 100, expected
    missing = sorted(set(expected) - names)
    assert not missing, f"the wheel lacks {len(missing)} files, e.g. {missing[:10]}"
    assert not [n for n in names if n.split("/")[0] in ("configs", "examples", "tests", "docs")], \
        "the wheel must not add top-level configs/examples/tests/docs folders to site-packages"


@pytest.mark.slow
def test_wheel_runs_the_readme_job_from_any_directory(built, tmp_path) -> None:
    wheel, _ = built
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = clean_env()
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [TORCH, str(wheel)], check=True, env=env, timeout=3600)

    elsewhere = tmp_path / "elsewhere"  # an unrelated empty working directory
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import studio; from studio.core import paths; "
         "print(studio.__file__); print(paths.examples_dir())"],
        cwd=elsewhere, env=env, check=True, capture_output=True, text=True).stdout.split("\n")
    package_file, examples = Path(where[0]), Path(where[1])
    assert env_dir in package_file.parents, f"imported {package_file}, not the installed wheel"
    assert env_dir in examples.parents, f"examples found at {examples}, not inside the installed package"

    studio = str(env_dir / "bin" / "studio")
    listing = subprocess.run([studio, "list"], cwd=elsewhere, env=env, capture_output=True, text=True,
                             timeout=600)
    assert listing.returncode == 0, listing.stderr
    assert "inpaint_box" in listing.stdout and "cdim" in listing.stdout, listing.stdout

    job = subprocess.run([studio, "restore", "--input", str(examples / DEMO_INPUT), "--simulate", "--task",
                          "inpaint_box", "--solver", "cdim", "--output", "outputs/demo.png"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=1800)
    assert job.returncode == 0, job.stderr[-4000:]
    outputs = elsewhere / "outputs"
    for name in ("demo.png", "demo.measurement.png", "demo.json"):
        assert (outputs / name).is_file(), f"{name} not written; {sorted(os.listdir(outputs))}"
    record = json.loads((outputs / "demo.json").read_text())
    assert record["metrics"]["psnr"] > 15  # 21.4 dB on CPU, record["metrics"]
