"""Warm starts: a fresh run that continues from exported weights.

Training here spans sessions whose run folders are not kept, so a run can continue from the weights it
shipped: ``init_from=emoji-pixel`` (or a folder) loads the exported weights as raw *and* EMA weights and
continues at the step the folder's ``card.json`` records. What a warm start cannot restore is the AdamW
moments (and, for raw-weight exports, the EMA); the LR is re-warmed instead. The whole is still
deterministic: the same legs (commands) give the same weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from models.registry import resolve_model_path
from studio.core.errors import StudioError

TRAINING_CONFIG = "training_config.json"
#: Settings of the machine and the run folder, not of the model: a warm start does not take them over.
MACHINE_KEYS = ("run_dir", "data", "threads", "device", "init_from", "init_step", "vae_init_step", "limit")


def init_folder(cfg) -> Path | None:
    """The exported folder a fresh run warm-starts from (``None``: no ``init_from``)."""
    if not cfg.init_from:
        return None
    folder = Path(resolve_model_path(cfg.init_from))
    if not (folder / "model_index.json").is_file():
        raise StudioError(f"init_from={cfg.init_from!r}: {folder} is not an exported diffusers folder "
                          "(no model_index.json)")
    if not (folder / "card.json").is_file():
        raise StudioError(f"init_from={cfg.init_from!r}: {folder} has no card.json "
                          "(the step to continue from)")
    return folder


def card_steps(folder: Path, stage: str | None = None) -> int:
    """The training step an exported folder's ``card.json`` records (``stage``: "vae"/"unet" for latent)."""
    card = json.loads((folder / "card.json").read_text())
    return int(card[stage]["steps"] if stage else card["steps"])


def load_exported(module: torch.nn.Module, folder: Path, cls) -> None:
    """Copy the weights of an exported diffusers/transformers sub-folder into ``module`` (strict)."""
    module.load_state_dict(cls.from_pretrained(folder).state_dict())


def warm_start_note(notes: str, source: str, what: str, step: int, warmup: int) -> str:
    """The run's history gains one leg: where it warm-started and what that could not restore."""
    leg = (f"{what} from {step} on: warm start from the exported '{source}' at step {step} (AdamW moments "
           f"and EMA re-initialised from its weights, LR re-warmed over {warmup} steps).")
    return f"{notes} {leg}".strip()


def write_training_config(cfg, folder: Path) -> None:
    """The config beside exported weights, so a later ``init_from`` continues with the same settings."""
    (Path(folder) / TRAINING_CONFIG).write_text(json.dumps(asdict(cfg), indent=1))
