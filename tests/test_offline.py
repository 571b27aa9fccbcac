"""No downloads at run time: importing any part of the project turns huggingface_hub's offline mode on
(it reads HF_HUB_OFFLINE once, at its own import), unless the user set the variable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", ["studio.eval.bench", "studio.training.train",
                                    "studio.workflows.personalize", "models", "solvers"])
def test_importing_the_project_makes_the_hub_offline(module: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = f"import {module}; import huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"
