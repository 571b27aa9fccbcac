"""``studio bench``: a resumable benchmark of the solvers (and classical baselines) over a grid of
tasks × solvers × images × seeds.

For each (task, image, seed) the measurement is made once with
:func:`studio.workflows.restoration.degrade` (seeded), then every requested solver that supports the task's
operator restores it with the *same* operator, and the scikit-image baselines
(:mod:`studio.eval.bench.baselines`) restore it too. Every finished run is appended to
``results.jsonl`` at once, so an interrupted bench restarted with the same ``--out`` skips what is done.
Each row carries a settings id (model, task overrides, device and the ``--steps`` of its own solver); a
restart whose settings differ for a row already there is refused, so rows of two settings never mix.

What is measured, per run:

* **PSNR / SSIM** of the restored image against the clean one (:mod:`studio.core.metrics`).
* **NFE / grad NFE**: model evaluations, and those with a backward pass, as counted by the solver
  (0 for the baselines).
* **wall time**: the solve only — the solver call timed by :func:`studio.workflows.restoration.restore`
  (``record["total_time_s"]``: the sampling loop plus the solver's own setup such as DDRM's SVD; not model
  loading, config parsing or metrics); for a baseline, the baseline call. ``loop_time_s`` keeps the
  solver's loop-only clock.
* **peak memory** (MB): on CUDA ``torch.cuda.max_memory_allocated`` after a reset (includes the
  resident weights); on CPU the increase of the process's resident set size over its value at the start
  of the run, sampled every ~5 ms by a background thread (approximate: freed memory is trimmed back to
  the OS before each run where glibc allows it, but short spikes between samples are missed).
* **overhead ratio**: wall time / (model-only time), model-only time = (NFE − grad NFE) · t_fwd +
  grad NFE · t_fwdbwd, where t_fwd (one forward at batch 1) and t_fwdbwd (forward + backward w.r.t. the
  input) are timed once per bench and image size (median of a few repeats after a warm-up). A ratio near
  1 means the solver's time is all network; above 1 is the solver's own work (projections, SVDs, ...).
  For a latent prior the timed evaluation is the UNet on a latent of the image's size, so the VAE decode
  (and its backward) that latent solvers run every step counts as overhead.
* **measurement residual** ‖y − A x̂‖₂ in [0, 1] image units (the units of y), over every measured entry
  (``operator.observed``: unobserved pixels of inpainting are not counted): ``residual`` for the output
  image (as the solver's record has it), ``clean_residual`` for the clean image — the norm of the noise
  actually drawn, the level a well-fitting solver should reach (well below it means fitting the noise).
* **residual over steps** (``residual_trace``, diffusion solvers): at every step, ‖y − A(clip(x̂_0))‖₂ of
  the step's denoised estimate x̂_0 as the solver hands it to its step callback (pixel solvers: Tweedie's
  x̂_0; latent solvers: the decoded D(ẑ_0) they already computed for their guidance), clipped to [0, 1] as
  an output image is. It costs one operator application per step and no network evaluation; its time
  (``trace_time_s``) is subtracted from the wall times (on CUDA only the launch time is measured, so a
  little of it may remain). The last value is that of x̂_0 at the final step, not of the final output.

Solver variants: ``--solvers p2l,p2l:tune_prompt=false`` runs P2L twice, once with ``tune_prompt=false``
(``base:key=value[:key=value...]``, keys of the solver's parameters, i.e. its signature's defaults, checked
and typed like ``studio restore`` overrides). The variant's label is its row's ``solver`` everywhere (rows,
resume key, table, plots, file names); ``--steps base=N`` applies to every variant of ``base`` unless the
variant sets ``steps=`` itself.

Prompts: latent solvers run with their papers' empty prompt, except a solver steered by a description of
the solution (``needs_prompt`` in the registry: TReg), which gets each image's caption (the held-out emoji's
``captions.json``, or the image folder's) unless its variant sets ``prompt=``; an image without a caption is
refused before any work.

Outputs in ``out``: ``results.jsonl``, ``results.json`` (rows + machine info + command), ``results.md``
(the table + baselines note), ``psnr_vs_nfe.png``, ``psnr_vs_time.png``, ``residual_vs_step.png``,
``outputs/`` (each run's image) and ``strips/<task>-<image>-s<seed>.png`` (reference | measurement |
each solver, 2 px white gutters).

Modules: :mod:`~studio.eval.bench.inputs` (arguments, solver variants), :mod:`~studio.eval.bench.peers`
(the peer registry), :mod:`~studio.eval.bench.measure` (memory, network time, overhead ratio, residuals),
:mod:`~studio.eval.bench.baselines` (classical baselines), :mod:`~studio.eval.bench.records` (rows,
``results.jsonl``, settings ids), :mod:`~studio.eval.bench.context` (one run's state, resume check),
:mod:`~studio.eval.bench.runner` (:func:`run_bench`), :mod:`~studio.eval.bench.summary`,
:mod:`~studio.eval.bench.goals`, :mod:`~studio.eval.bench.plots`, :mod:`~studio.eval.bench.report` (result
files) and :mod:`~studio.eval.bench.merge` (``studio bench-merge``).
"""

from studio.eval.bench.baselines import BASELINES_NOTE
from studio.eval.bench.context import BenchContext
from studio.eval.bench.goals import bench_goals, goals_markdown
from studio.eval.bench.inputs import (
    DEFAULT_TASKS,
    BenchImage,
    SolverSpec,
    base_solver,
    check_solvers,
    is_peer,
    load_bench_images,
    parse_seeds,
    parse_solver_spec,
    parse_steps,
)
from studio.eval.bench.measure import (
    NetworkTimer,
    PeakMemory,
    ResidualTrace,
    measurement_residual,
    overhead_ratio,
    sync_device,
    time_model_eval,
)
from studio.eval.bench.merge import merge_results
from studio.eval.bench.peers import PEERS, register_peer
from studio.eval.bench.records import ROW_FIELDS
from studio.eval.bench.report import BenchResult, markdown_table
from studio.eval.bench.runner import run_baseline, run_bench, run_solver
from studio.eval.bench.summary import summarize, variant_comparisons

__all__ = [
    "BASELINES_NOTE",
    "DEFAULT_TASKS",
    "PEERS",
    "ROW_FIELDS",
    "BenchContext",
    "BenchImage",
    "BenchResult",
    "NetworkTimer",
    "PeakMemory",
    "ResidualTrace",
    "SolverSpec",
    "base_solver",
    "bench_goals",
    "check_solvers",
    "goals_markdown",
    "is_peer",
    "load_bench_images",
    "markdown_table",
    "measurement_residual",
    "merge_results",
    "overhead_ratio",
    "parse_seeds",
    "parse_solver_spec",
    "parse_steps",
    "register_peer",
    "run_baseline",
    "run_bench",
    "run_solver",
    "summarize",
    "sync_device",
    "time_model_eval",
    "variant_comparisons",
]
