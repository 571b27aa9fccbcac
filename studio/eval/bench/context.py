"""The state one bench run shares between its runs: output folder, device, settings, loaded priors, the
model-eval calibration per image size, and the resume check against rows already in the folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.core.errors import StudioError
from studio.eval.bench.inputs import SolverSpec, base_solver
from studio.eval.bench.measure import time_model_eval
from studio.eval.bench.records import settings_id


@dataclass
class BenchContext:
    """Everything one bench needs while it runs."""

    out: Path
    device: str
    task_over: list[str]
    steps: dict[str, int]
    model: str
    priors: dict[str, Any]  # "pixel" / "latent" → loaded prior
    timings: dict[tuple, dict] = field(default_factory=dict)
    variants: dict[str, SolverSpec] = field(default_factory=dict)  # label → spec (labels not here: plain)

    def spec(self, label: str) -> SolverSpec:
        return self.variants.get(label) or SolverSpec(label, label)

    def settings_for(self, solver: str | None) -> str:
        """The settings id of a row of ``solver`` (None: a classical baseline, which takes no steps)."""
        steps = self.steps.get(base_solver(solver)) if solver else None
        return settings_id(self.model, self.task_over, self.device, steps)

    def timing_for(self, kind: str, image_size: tuple[int, int]) -> dict[str, float]:
        key = (kind, *image_size)
        if key not in self.timings:
            self.timings[key] = time_model_eval(self.priors[kind], image_size, self.device)
        return self.timings[key]

    def check_resume(self, rows: list[dict]) -> None:
        """Every row already in ``out`` must have this run's settings for its solver (a row of a solver not
        in this run too: the report describes the folder with one model, overrides, device and
        ``--steps``). Rows written before ids were per solver carry the id of the whole ``--steps``."""
        whole_run = settings_id(self.model, self.task_over, self.device, self.steps)
        other = [r for r in rows if r.get("settings") not in (
            whole_run, self.settings_for(None if r.get("kind") == "classical" else r["solver"]))]
        if other:
            solvers = sorted({r["solver"] for r in other if r.get("kind") != "classical"})
            raise StudioError(
                f"--out '{self.out}' holds bench rows with other settings than this run (model, overrides, "
                "device" + (f", or the steps of {', '.join(solvers)}" if solvers else "")
                + "); use a new --out to compare them"
            )
