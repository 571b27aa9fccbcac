"""Training the embedded models: ``studio train pixel`` and ``studio train latent``, and the config a run
uses (the saved one when resuming, a warm start's shipped one, then ``key=value`` overrides).

The trainers live in :mod:`studio.training.pixel` (emoji-pixel) and :mod:`studio.training.latent` (emoji-sd);
the resumable, deterministic loop they share, its checkpoints and EMA in :mod:`studio.training.loop`; warm
starts in :mod:`studio.training.warm_start`; sample grids in :mod:`studio.training.sampling`.

``--minutes`` stops a chunk early (with a checkpoint) so long trainings run as a series of short jobs;
``--export DIR`` writes the EMA weights as a diffusers folder at the end of the chunk.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from studio.core.config import merge_overrides
from studio.core.errors import StudioError
from studio.training.latent import LatentTrainConfig
from studio.training.loop import bf16_setting
from studio.training.pixel import PixelTrainConfig
from studio.training.warm_start import MACHINE_KEYS, TRAINING_CONFIG, init_folder


def apply_overrides(cfg, overrides: list[str]):
    """``key=value`` strings onto a trainer config dataclass, checked against its fields (unknown keys and
    values of the wrong type raise, naming the key)."""
    values = merge_overrides(cfg, None, overrides, "training config",
                             unknown=lambda key, known: f"unknown training option '{key}' "
                                                        f"(known: {', '.join(asdict(cfg))})")
    given = {item.split("=", 1)[0].strip() for item in overrides}
    for key in given:
        setattr(cfg, key, bf16_setting(values[key]) if key == "bf16" else values[key])
    return cfg


def config_for(kind: str, run_dir: str | None, data: str | None, threads: int | None,
               overrides: list[str]) -> PixelTrainConfig | LatentTrainConfig:
    """The config of a run: the one saved in ``run_dir`` when resuming, else the defaults; then overrides."""
    cls = {"pixel": PixelTrainConfig, "latent": LatentTrainConfig}.get(kind)
    if cls is None:
        raise StudioError(f"unknown model kind '{kind}' (use pixel or latent)")
    cfg = cls()
    if run_dir:
        cfg.run_dir = run_dir
    saved = Path(cfg.run_dir) / "config.json"
    if saved.is_file():
        stored = json.loads(saved.read_text())
        for k, v in stored.items():
            if hasattr(cfg, k):
                setattr(cfg, k, tuple(v) if isinstance(v, list) else v)
    if data:
        cfg.data = data
    if threads:
        cfg.threads = threads
    cfg = apply_overrides(cfg, overrides)
    if cfg.init_from and not saved.is_file():
        # a warm start takes the exported run's settings (the overrides still win)
        shipped = init_folder(cfg) / TRAINING_CONFIG
        if shipped.is_file():
            stored = json.loads(shipped.read_text())
            if kind == "pixel":
                stored.setdefault("prediction_type", "epsilon")  # configs written before the key existed
            for k, v in stored.items():
                if hasattr(cfg, k) and k not in MACHINE_KEYS:
                    setattr(cfg, k, tuple(v) if isinstance(v, list) else v)
            cfg = apply_overrides(cfg, overrides)
    return cfg
