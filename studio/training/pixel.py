"""``studio train pixel``: the 32x32 pixel-space DDPM prior (emoji-pixel).

Pixel prior (DDPM, Ho et al. 2020): minimise
``E ||target - f_theta(sqrt(abar_t) x0 + sqrt(1-abar_t) eps, t)||^2`` with ``t`` uniform, cosine schedule
(Nichol & Dhariwal 2021), images in [-1, 1]. The target is the velocity
``v = sqrt(abar_t) eps - sqrt(1-abar_t) x0`` (Salimans & Ho 2022) by default, or ``eps``. Why v: the cosine
schedule ends at ``abar_T ~ 2e-9``, where ``x0 = (x_t - sqrt(1-abar) eps_hat) / sqrt(abar)`` multiplies any
error of an eps-network by ~2e4. The eps-trained prior of steps 0-15652 got the high-noise steps wrong
(on the held-out emoji its clipped x0 estimate had an MSE of 1.60 at t=999 and 1.28 at t=990, where
predicting the training mean image scores 0.36), and its DDPM samples were mostly frame-filling saturated
colour tiles, which the white-background data never shows. A v-network's
``x0 = sqrt(abar) x_t - sqrt(1-abar) v`` is ``-v`` there: after 7000 steps of v training from those weights
the same MSE was 0.37 and the tiles were gone.

The loop, checkpoints and EMA are :mod:`studio.training.loop`'s; warm starts are
:mod:`studio.training.warm_start`'s.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors import safe_open

from studio.core.errors import StudioError
from studio.training.emoji_data import load_training_images, to_model_range
from studio.training.loop import CHECKPOINT, pick_device, train_loop, write_json
from studio.training.objective import check_prediction_type, diffusion_target, forward_process
from studio.training.sampling import ddim_sample_pixel, save_grid
from studio.training.warm_start import card_steps, init_folder, load_exported, warm_start_note


@dataclass
class PixelTrainConfig:
    data: str = "runs/data/emoji"
    run_dir: str = "runs/train/emoji-pixel"
    size: int = 32
    steps: int = 40_000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 250
    ema_decay: float = 0.999
    seed: int = 0
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_at_lowest: bool = True
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    # "v_prediction" or "epsilon" (the shipped model's first 15652 steps; a shipped training_config.json
    # without this key is an epsilon run)
    prediction_type: str = "v_prediction"
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 100
    num_samples: int = 64
    bf16: bool | str = "auto"
    limit: int | None = None  # use only the first N training images (smoke tests)
    device: str = "auto"
    threads: int | None = None
    # Warm start: a run folder without a checkpoint starts from this exported model (a diffusers folder or
    # registered name) at the step its card records, with a fresh AdamW state and the LR re-warmed; see
    # `studio.training.warm_start`. Empty: start from random weights at step 0.
    init_from: str = ""
    init_step: int = 0  # set from the folder's card.json when the warm start happens
    notes: str = ""  # the run's history in words; printed in the model card


def build_pixel_unet(cfg: PixelTrainConfig) -> UNet2DModel:
    n = len(cfg.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention_at_lowest:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=cfg.size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=min(32, cfg.block_out_channels[0]),
        attention_head_dim=min(32, cfg.block_out_channels[-1]),
    )


def build_pixel_scheduler(cfg: PixelTrainConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=True,
    )


def _record_warm_start(cfg: PixelTrainConfig, warm: Path) -> None:
    """Continue at the exported folder's step; the history notes the leg and any change of target."""
    cfg.init_step = card_steps(warm)
    cfg.notes = warm_start_note(cfg.notes, cfg.init_from, "steps", cfg.init_step, cfg.warmup)
    before = json.loads((warm / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type")
    if before != cfg.prediction_type:
        cfg.notes += f" The training target changed there from {before} to {cfg.prediction_type}."


def train_pixel(cfg: PixelTrainConfig, minutes: float | None = None, export: str | None = None,
                quiet: bool = False) -> dict:
    """Train (or resume) the pixel prior; returns a summary. See the module docstring."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    warm = None if (run_dir / CHECKPOINT).is_file() else init_folder(cfg)
    check_prediction_type(cfg.prediction_type)
    if warm is not None:
        _record_warm_start(cfg, warm)
    write_json(run_dir / "config.json", asdict(cfg), indent=1)  # atomic: a resume reads it back
    images, _ = load_training_images(cfg.data, cfg.size, cfg.limit)
    torch.manual_seed(cfg.seed)
    unet = build_pixel_unet(cfg).to(device)
    if warm is not None:
        load_exported(unet, warm / "unet", UNet2DModel)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = build_pixel_scheduler(cfg)
    noising = forward_process(scheduler.config)

    def batch_fn(g):
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
        t = torch.randint(cfg.num_train_timesteps, (cfg.batch_size,), generator=g)
        noise = torch.randn(cfg.batch_size, 3, cfg.size, cfg.size, generator=g).to(device)
        x0 = to_model_range(images[idx], device)
        t = t.to(device)
        pred = unet(noising.add_noise(x0, noise, t), t).sample
        target = diffusion_target(cfg.prediction_type, noising, x0, noise, t)
        return torch.nn.functional.mse_loss(pred.float(), target), {}

    def sample_fn(step):
        grid = ddim_sample_pixel(ema, dict(scheduler.config), cfg.num_samples, cfg.size, 50, 0, device)
        save_grid(grid, run_dir / "samples" / f"step-{step:06d}.png")

    step = train_loop(cfg, run_dir, {"model": unet, "ema": ema}, list(unet.parameters()), cfg.lr, cfg.steps,
                      batch_fn, sample_fn, minutes, quiet, [(ema, unet)], start_step=cfg.init_step)
    if export:
        export_pixel(ema, scheduler, export)
    return {"step": step, "done": step >= cfg.steps, "run_dir": str(run_dir), "export": export}


def export_pixel(unet, scheduler, folder: str | Path) -> Path:
    """Save as a ``DDPMPipeline`` folder (safetensors) that ``DDPMPipeline.from_pretrained`` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = DDPMPipeline(unet=unet.to("cpu").float(), scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def load_pixel_for_export(cfg: PixelTrainConfig, weights: str = "ema"):
    """The UNet (``weights`` = "ema" or "raw") and scheduler from a run's checkpoint, and its step."""
    if weights not in ("ema", "raw"):
        raise StudioError(f"weights must be ema or raw, got {weights!r}")
    prefix = "ema." if weights == "ema" else "model."
    unet = build_pixel_unet(cfg)
    with safe_open(str(Path(cfg.run_dir) / CHECKPOINT), framework="pt") as f:
        sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        step = int(f.metadata()["step"])
    unet.load_state_dict(sd)
    return unet, build_pixel_scheduler(cfg), step
