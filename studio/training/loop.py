"""The training loop the embedded models' trainers share: resumable, deterministic, no pickle.

The batch indices, timesteps and noise of step ``k`` come from a generator seeded with ``(seed, k)``
(:func:`step_generator`), so a run stopped and resumed any number of times gives the same weights as one
uninterrupted run (on the same device and thread count). A run folder holds

- ``checkpoint.safetensors``: raw and EMA weights, the AdamW state and the step (no pickle anywhere);
- ``log.jsonl``: one line per logged step (loss, learning rate, seconds per step);
- ``samples/step-XXXXXX.png``: sample grids from the EMA weights as training goes.

Every file is written whole or not at all (a temporary file renamed into place), so a run killed at any
moment (SIGKILL, power) leaves nothing torn; resumed, it starts from its last checkpoint, drops the log
lines of the steps it will take again and deletes the temporaries the kill left.

The EMA and the LR schedule are written here rather than taken from diffusers: ``EMAModel``'s decay is
``min(decay, (1+k)/(10+k))``, which would change the EMA weights of every run made with the shipped
configs (ours copies the weights until ``warmup`` and then decays at ``ema_decay``), and
``optimization.get_scheduler`` has no schedule that decays linearly to 10% from a step and re-warms after a
warm start, nor would its ``LambdaLR`` multiply out to our exact learning rates.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from studio.core.errors import StudioError
from studio.core.io import PendingFile, staged_temporary_pattern, write_set

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.jsonl"
#: what an atomic write leaves when killed: write_set's ``.<name>.<random>.tmp``, save_file's ``<stem>.tmp``
TEMPORARY = re.compile(rf"^(?:{staged_temporary_pattern()}|checkpoint\.tmp|learned_embeds\.tmp)$")


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one training step: resuming at ``step`` reproduces the uninterrupted run."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (avx512_bf16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_setting(value: bool | str) -> bool | str:
    """The ``bf16`` option as given in a config or on the command line: True, False or ``"auto"``
    (``true``/``false`` text counts as the bool); anything else raises, naming the value."""
    if isinstance(value, bool) or value == "auto":
        return value
    text = str(value).strip().lower()
    if text in ("true", "false", "auto"):
        return {"true": True, "false": False}.get(text, "auto")
    raise StudioError(f"bf16 must be true, false or auto, got {value!r}")


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """``"auto"``: bf16 autocast on CUDA and on CPUs with native bf16. Measured on an AVX2-only EPYC,
    emulated bf16 made a 1.7 M-parameter UNet step 18x slower (41 s instead of 2.3 s), hence not forced."""
    setting = bf16_setting(setting)
    if setting == "auto":
        return device.type == "cuda" or cpu_has_bf16()
    return setting


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast (halves step time on CPUs with avx512_bf16, and on CUDA)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def learning_rate(step: int, base: float, warmup: int, total: int, decay_fraction: float = 0.2) -> float:
    """Linear warm-up, constant, then linear decay to 10% over the last ``decay_fraction`` of ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if step < decay_start or total <= decay_start:
        return base
    frac = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return base * (1 - 0.9 * frac)


# ---------------------------------------------------------------------------------------- files


def write_text_atomic(path: Path, text: str) -> Path:
    """``text`` through a temporary file and ``os.replace`` (:func:`studio.core.io.write_set`): a run killed
    while writing leaves the previous file or none, never a torn one the next run cannot read."""
    return write_set([PendingFile(Path(path), lambda f: f.write(text), binary=False)])[0]


def write_json(path: Path, obj, **dumps) -> Path:
    """``obj`` as JSON (``json.dumps`` options in ``dumps``), atomically (:func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(obj, **dumps))


def remove_stale_temporaries(*folders: Path) -> int:
    """Delete the temporaries a killed writer left in ``folders`` (:data:`TEMPORARY`); how many.

    Called where a run (re)starts: a run folder has one writer, so any temporary in it then is stale."""
    removed = 0
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


# ---------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, step: int, extra: dict
) -> None:
    """Weights of every module, the optimizer's tensors and its hyper-parameters; atomic."""
    tensors: dict[str, Tensor] = {}
    for prefix, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().to("cpu").contiguous()
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"optim.{idx}.{k}"] = torch.as_tensor(v).detach().to("cpu").contiguous()
    meta = {"step": str(step), "param_groups": json.dumps(opt["param_groups"]), "extra": json.dumps(extra)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_checkpoint(
    path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer
) -> tuple[int, dict]:
    """Restore what :func:`save_checkpoint` wrote; returns ``(step, extra)``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    for prefix, m in modules.items():
        sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        m.load_state_dict(sd)
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"]), json.loads(meta.get("extra", "{}"))


def checkpoint_step(path: Path) -> int:
    """The step stored in a checkpoint's metadata (-1 when there is no checkpoint)."""
    if not path.is_file():
        return -1
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["step"])


def load_weights(module: torch.nn.Module, run_dir: Path, prefix: str = "ema") -> torch.nn.Module:
    """Load one module's weights (checkpoint keys ``<prefix>.*``, e.g. "ema", "model") from a run folder."""
    with safe_open(str(run_dir / CHECKPOINT), framework="pt") as f:
        sd = {k[len(prefix) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
    module.load_state_dict(sd)
    return module


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


# ---------------------------------------------------------------------------------------- logging


class Logger:
    """Appends JSON lines to ``log.jsonl`` and prints a short line."""

    def __init__(self, run_dir: Path, quiet: bool = False):
        self.path = run_dir / LOG
        self.quiet = quiet

    def __call__(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.quiet:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)


def _record(line: str) -> dict | None:
    """One log line as its record; ``None`` for a line a kill cut short (or anything else unreadable)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def last_logged(run_dir: Path, key: str = "loss", window: int = 20) -> float | None:
    """Mean of ``key`` over the last ``window`` log lines (the loss reported in a model card)."""
    path = Path(run_dir) / LOG
    if not path.is_file():
        return None
    records = [_record(line) for line in path.read_text().splitlines()[-window:]]
    values = [r.get(key) for r in records if r is not None and r.get(key) is not None]
    return float(np.mean(values)) if values else None


def trim_log(run_dir: Path, step: int) -> None:
    """Keep the log lines of the steps up to ``step``, where the run resumes: a killed run had logged steps
    past its last checkpoint (maybe a torn last line too), and resumed it logs those steps again."""
    path = Path(run_dir) / LOG
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if _kept(_record(line), step)]
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in keep))


def _kept(record: dict | None, step: int) -> bool:
    return record is not None and isinstance(record.get("step", 0), int) and record.get("step", 0) <= step


# ---------------------------------------------------------------------------------------- the loop


def train_loop(cfg, run_dir: Path, modules: dict, params, lr_base: float, total: int, batch_fn: Callable,
               sample_fn: Callable, minutes: float | None, quiet: bool, ema_pairs: list,
               decay_fraction: float = 0.2, start_step: int = 0) -> int:
    """The shared loop: per-step generator, LR schedule, clipping, EMA, logging, grids, checkpoints.

    ``start_step`` > 0 is a warm start (weights already loaded, no optimizer state): the LR is re-warmed
    linearly over ``cfg.warmup`` steps from there, because a fresh AdamW's first updates are ~lr * sign(g)."""
    device = pick_device(cfg.device)
    opt = torch.optim.AdamW(params, lr=lr_base, weight_decay=0.0)
    ckpt = run_dir / CHECKPOINT
    step = start_step
    if ckpt.is_file():
        step, _ = load_checkpoint(ckpt, modules, opt)
    remove_stale_temporaries(run_dir, run_dir / "samples")
    trim_log(run_dir, step)
    log = Logger(run_dir, quiet)
    bf16 = use_bf16(cfg.bf16, device)
    start = t_last = time.time()
    losses: list[float] = []
    extra_logs: dict[str, list[float]] = {}
    while step < total:
        g = step_generator(cfg.seed, step)
        lr = learning_rate(step, lr_base, cfg.warmup, total, decay_fraction)
        if start_step and step - start_step < cfg.warmup:
            lr *= (step - start_step + 1) / cfg.warmup
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(device, bf16):
            loss, parts = batch_fn(g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for ema, model in ema_pairs:
            ema_update(ema, model, cfg.ema_decay if step >= cfg.warmup else 0.0)
        step += 1
        losses.append(loss.item())
        for k, v in parts.items():
            extra_logs.setdefault(k, []).append(v)
        if step % cfg.log_every == 0 or step == total:
            now = time.time()
            log(step=step, loss=float(np.mean(losses)), lr=lr, sec_per_step=(now - t_last) / len(losses),
                **{k: float(np.mean(v)) for k, v in extra_logs.items()})
            losses, extra_logs, t_last = [], {}, now
        if step % cfg.sample_every == 0 or step == total:
            sample_fn(step)
        out_of_time = minutes is not None and time.time() - start > minutes * 60
        if step % cfg.checkpoint_every == 0 or step == total or out_of_time:
            save_checkpoint(ckpt, modules, opt, step, {})
        if out_of_time:
            break
    if not ckpt.is_file():  # a warm start at or past ``total``: the stage is done, record it
        save_checkpoint(ckpt, modules, opt, step, {})
    return step
