"""``studio bench-real-size``: seconds per step and peak memory of every solver at the real resolution of
the models users bring (random-weight replicas from :mod:`models.replicas`: ADM FFHQ-256 for the pixel
solvers, Stable Diffusion 1.5 at 512² for the latent ones), with and without each memory option.

Each (model, job, option) case runs in its own Python process, so that its peak memory is its own (the
process's peak RSS on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU) and no allocator cache
carries over. A case records: the RSS once the model is loaded (weights), the peak during the job, the
increase over the loaded state (``PeakMemory``: the job's own working memory), and the wall time of each
step. Steps after the first are the per-step figure (the first also pays one-off allocation); with
``--steps 1`` the only step is reported. Results go to ``results.jsonl`` as they come (resumable: a
finished case is not re-run), and ``results.md`` / ``results.json`` are rewritten after every case.

Memory options, each applied the way a diffusers user applies it to a loaded pipeline:

* ``bf16`` / ``fp16``: the UNet and text encoder cast (the VAE stays float32, SD's decoder overflows in
  fp16);
* ``grad-ckpt``: ``enable_gradient_checkpointing()`` on the UNet (and the VAE, which the latent solvers
  backpropagate through) — claims less memory in the backward pass, at more compute;
* ``attn-slicing``: ``pipe.enable_attention_slicing()`` — claims less attention memory than the classic
  attention that materialises every (tokens x tokens) score matrix; ``attn-classic``
  (``unet.set_attn_processor(AttnProcessor())``) is that baseline, since diffusers' default SDPA attention
  already runs a memory-efficient kernel (not in the default set: ask for it with ``--options``);
* ``vae-slicing`` (``vae`` job, a batch of 4 at 512²) and ``vae-tiling`` (``vae-1024`` job, one 1024²
  image): the VAE options, which only act on batches and on images larger than the VAE's tile.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from studio.core.errors import StudioError

PIXEL_JOBS = ("dps", "mcg", "cdim", "ddrm")
LATENT_JOBS = ("latent-dps", "psld", "p2l", "newton-inversion", "textual-inversion")
VAE_JOBS = ("vae", "vae-1024")
#: jobs that backpropagate (gradient checkpointing can only act on these)
BACKPROP = {"dps", "mcg", "cdim", "latent-dps", "psld", "p2l", "textual-inversion"}
OPTIONS = ("none", "bf16", "fp16", "grad-ckpt", "attn-classic", "attn-slicing", "vae-slicing", "vae-tiling")
#: which options are meaningful for which job
APPLIES = {
    "vae": ("none", "vae-slicing"),
    "vae-1024": ("none", "vae-tiling"),
}


@dataclass(frozen=True)
class Case:
    model: str  # a replica name (models.replicas.REPLICAS)
    job: str
    option: str = "none"
    steps: int = 2
    device: str = "cpu"

    @property
    def key(self) -> str:
        return f"{self.model}|{self.job}|{self.option}|{self.steps}|{self.device}"


def default_cases(steps: int = 2, device: str = "cpu", options: tuple[str, ...] | None = None,
                  jobs: tuple[str, ...] | None = None) -> list[Case]:
    """Every job on its replica with every option that can act on it (fp16 only on CUDA, where it is the
    usual choice; on the CPU bf16 stands in). Unknown job or option names raise, naming them."""
    unknown = sorted(set(jobs or ()) - set(PIXEL_JOBS + LATENT_JOBS + VAE_JOBS)) \
        + sorted(set(options or ()) - set(OPTIONS))
    if unknown:
        raise StudioError(f"unknown job or option: {', '.join(unknown)} (jobs: "
                          f"{', '.join(PIXEL_JOBS + LATENT_JOBS + VAE_JOBS)}; options: {', '.join(OPTIONS)})")
    cases = []
    for model, model_jobs in (("adm-ffhq-256", PIXEL_JOBS), ("sd-1.5", LATENT_JOBS + VAE_JOBS)):
        for job in model_jobs:
            if jobs and job not in jobs:
                continue
            for option in applicable_options(model, job, device):
                if (option in options) if options is not None else option != "attn-classic":
                    cases.append(Case(model, job, option, steps, device))
    # every job without options first: a cut-short run still has the whole first column
    return sorted(cases, key=lambda c: c.option != "none")


def applicable_options(model: str, job: str, device: str) -> tuple[str, ...]:
    if job in APPLIES:
        return APPLIES[job]
    opts = ["none", "fp16" if str(device).startswith("cuda") else "bf16"]
    if job in BACKPROP:
        opts.append("grad-ckpt")
    if model.startswith("sd"):  # ADM-256 attends only at 16x16 (256 tokens): slicing has nothing to cut
        opts += ["attn-classic", "attn-slicing"]
    return tuple(opts)


# ---------------------------------------------------------------------------------------------- one case


def apply_option(pipe, option: str, device: str):
    """``option`` applied to a loaded pipeline as a diffusers user would; returns the pipeline."""
    pipe.to(device)
    if option in ("bf16", "fp16"):
        dtype = torch.bfloat16 if option == "bf16" else torch.float16
        for name in ("unet", "text_encoder"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(dtype)
    elif option == "grad-ckpt":
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if module is not None and getattr(module, "_supports_gradient_checkpointing", False):
                module.enable_gradient_checkpointing()
    elif option == "attn-classic":
        from diffusers.models.attention_processor import AttnProcessor  # lazy: the child process only

        pipe.unet.set_attn_processor(AttnProcessor())
    elif option == "attn-slicing":
        pipe.enable_attention_slicing()
    elif option == "vae-slicing":
        pipe.vae.enable_slicing()
    elif option == "vae-tiling":
        pipe.vae.enable_tiling()
    elif option != "none":
        raise StudioError(f"unknown memory option {option!r} ({', '.join(OPTIONS)})")
    return pipe


def _test_image(size: int, device: str, batch: int = 1) -> torch.Tensor:
    """A smooth random [0, 1] image (values do not matter: the weights are random)."""
    g = torch.Generator().manual_seed(0)
    small = torch.rand(batch, 3, size // 16, size // 16, generator=g)
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear").to(device)


def _run_solver(case: Case, pipe, size: int, stamps: list[float]) -> None:
    from models.loading import as_prior  # lazy: the child process is the only caller
    from solvers import get_solver  # lazy: as above
    from studio.core.operators import make_operator  # lazy: as above

    info = get_solver(case.job)
    prior = as_prior(pipe, latent=info.latent)
    op = make_operator("super_resolution", factor=4, mode="avgpool").to(case.device)
    x = _test_image(size, case.device)
    y = op.A(x)
    info.fn(y, op, prior, steps=case.steps, seed=0, x_shape=tuple(x.shape),
            callback=lambda *a: stamps.append(time.perf_counter()))


def _run_newton(case: Case, pipe, size: int, stamps: list[float]) -> None:
    from models.loading import as_prior  # lazy: the child process is the only caller
    from solvers.inversion.newton import newton_inversion  # lazy: as above
    from studio.core.conventions import to_model  # lazy: as above

    prior = as_prior(pipe, latent=True)
    with torch.no_grad():
        z0 = prior.encode(to_model(_test_image(size, case.device)))
    start = time.perf_counter()
    newton_inversion(prior, z0, steps=case.steps)
    # the inverter reports no per-step callback: its mean step (each is newton_steps + 1 UNet calls)
    stamps.extend([start, time.perf_counter()])
    return {"s_per_step": (stamps[-1] - start) / case.steps}


def _run_textual_inversion(case: Case, pipe, size: int, stamps: list[float]) -> None:
    from studio.training.textual_inversion import (  # lazy: the child process is the only caller
        TextualInversionConfig, train_textual_inversion)

    precision = {"bf16": "bf16", "fp16": "fp16"}.get(case.option, "no")
    if precision != "no":  # mixed precision is the trainer's own option: it casts the frozen parts itself
        for name in ("unet", "text_encoder"):
            getattr(pipe, name).to(torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TextualInversionConfig(placeholder="<replica>", initializer="face", steps=case.steps,
                                     batch_size=1, checkpoint_every=10**6, validate_every=10**6,
                                     mixed_precision=precision, output_dir=tmp)
        images = [_test_image(size, "cpu")[0]]
        stamps.append(time.perf_counter())
        train_textual_inversion(pipe, images, cfg, resume=False, quiet=True,
                                callback=lambda *a: stamps.append(time.perf_counter()))


def _run_vae(case: Case, pipe, size: int, stamps: list[float]) -> None:
    batch = 4 if case.job == "vae" else 1
    x = _test_image(1024 if case.job == "vae-1024" else size, case.device, batch) * 2 - 1
    stamps.append(time.perf_counter())
    with torch.no_grad():
        for _ in range(case.steps):
            z = pipe.vae.encode(x).latent_dist.mean
            pipe.vae.decode(z)
            stamps.append(time.perf_counter())


def run_case(case: Case, replica_dir: str) -> dict:
    """Load the replica folder, apply the option, run the job under :class:`PeakMemory`; the record."""
    import psutil  # lazy: the child process is the only caller
    from diffusers import DiffusionPipeline  # lazy: as above

    from models.replicas import replica_folder  # lazy: as above
    from studio.eval.bench.measure import PeakMemory  # lazy: as above

    folder = replica_folder(case.model, replica_dir)
    pipe = apply_option(DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True), case.option,
                        case.device)
    pipe.set_progress_bar_config(disable=True)
    loaded_mb = psutil.Process().memory_info().rss / 2**20
    size = 256 if case.model.startswith("adm") else 512
    runner = {"newton-inversion": _run_newton, "textual-inversion": _run_textual_inversion,
              "vae": _run_vae, "vae-1024": _run_vae}.get(case.job, _run_solver)
    stamps = [time.perf_counter()]
    with PeakMemory(case.device) as mem:
        extra = runner(case, pipe, size, stamps) or {}
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {**asdict(case), "key": case.key, "step_s": steps,
            "s_per_step": statistics.median(steps[1:] if len(steps) > 1 else steps) if steps else None,
            "loaded_rss_mb": loaded_mb, "peak_increase_mb": mem.mb, "memory_kind": mem.kind,
            "peak_mb": (mem.mb if mem.cuda else loaded_mb + mem.mb), "threads": torch.get_num_threads(),
            **extra}


# ---------------------------------------------------------------------------------------------- all cases


def _child(case: Case, replica_dir: str, threads: int | None, timeout_s: float) -> dict:
    """Run one case in a fresh Python process; its record, or an ``error`` record (never raises)."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    cmd = [sys.executable, "-m", "studio.eval.realsize", json.dumps(asdict(case)), replica_dir]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**asdict(case), "key": case.key, "error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**asdict(case), "key": case.key, "error": f"exit {proc.returncode}: {tail[:300]}"}
    return {**json.loads(lines[-1]), "case_wall_s": time.perf_counter() - start}


def run_real_size(cases: list[Case], out: str | Path, replica_dir: str | Path, threads: int | None = None,
                  timeout_s: float = 3600, command: str = "", quiet: bool = False) -> list[dict]:
    """Run every case not yet in ``out/results.jsonl``; rewrite the tables after each. The records."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    done = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()] if log.is_file() else []
    finished = {r["key"] for r in done if "error" not in r}
    for case in cases:
        if case.key in finished:
            continue
        if not quiet:
            print(f"bench-real-size: {case.model} {case.job} {case.option} ...", flush=True)
        record = _child(case, str(replica_dir), threads, timeout_s)
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        done = [r for r in done if r["key"] != case.key] + [record]
        write_tables(done, out, command)
    write_tables(done, out, command)
    return done


def _cell(record: dict | None, applies: bool = False) -> str:
    if record is None:
        return "not run" if applies else "–"
    if "error" in record:
        return "failed"
    return f"{record['s_per_step']:.2f} s · {record['peak_mb'] / 1024:.2f} GB"


def write_tables(records: list[dict], out: Path, command: str = "") -> None:
    """``results.md`` (one row per model × job, one column per option: s/step · peak) and ``results.json``."""
    by_key = {(r["model"], r["job"], r["option"]): r for r in records}
    options = [o for o in OPTIONS if any(k[2] == o for k in by_key)]
    rows = sorted({(k[0], k[1]) for k in by_key}, key=lambda mj: (mj[0], _job_order(mj[1])))
    lines = [f"# Real-size benchmark ({_machine()})", "", f"Command: `{command}`" if command else "", "",
             "Each cell: seconds per step · peak memory (CPU: the process's peak RSS, weights included; "
             "GPU: max allocated). `–`: the option does not act on that job; `not run`: it does, and this "
             "run has no measurement of it yet.", "",
             "| model | job | " + " | ".join(options) + " |", "|---|---|" + "---:|" * len(options)]
    for model, job in rows:
        device = next(r["device"] for r in records if (r["model"], r["job"]) == (model, job))
        applies = applicable_options(model, job, device)
        lines.append(f"| {model} | {job} | "
                     + " | ".join(_cell(by_key.get((model, job, o)), o in applies) for o in options) + " |")
    lines += ["", "Loaded RSS (weights + runtime) and the job's own increase, in GB:", "",
              "| model | job | option | loaded | increase | steps (s) |", "|---|---|---|---:|---:|---|"]
    for r in sorted(records, key=lambda r: (r["model"], _job_order(r["job"]), OPTIONS.index(r["option"]))):
        if "error" in r:
            lines.append(f"| {r['model']} | {r['job']} | {r['option']} | – | – | {r['error']} |")
            continue
        lines.append(f"| {r['model']} | {r['job']} | {r['option']} | {r['loaded_rss_mb'] / 1024:.2f} | "
                     f"{r['peak_increase_mb'] / 1024:.2f} | {', '.join(f'{s:.1f}' for s in r['step_s'])} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"command": command, "machine": _machine(),
                                                  "records": records}, indent=1))


def _job_order(job: str) -> int:
    order = PIXEL_JOBS + LATENT_JOBS + VAE_JOBS
    return order.index(job) if job in order else len(order)


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}"


if __name__ == "__main__":  # one case, in its own process (see _child)
    print(json.dumps(run_case(Case(**json.loads(sys.argv[1])), sys.argv[2])), flush=True)
