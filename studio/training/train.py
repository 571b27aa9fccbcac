"""Training the embedded models: ``studio train pixel`` and ``studio train latent``.

Both trainers are resumable and deterministic: the batch indices, timesteps and noise of step ``k`` come
from a generator seeded with ``(seed, k)``, so a run stopped and resumed any number of times gives the same
weights as one uninterrupted run (on the same device and thread count). A run folder holds

- ``checkpoint.safetensors``: raw and EMA weights, the AdamW state and the step (no pickle anywhere);
- ``log.jsonl``: one line per logged step (loss, learning rate, seconds per step);
- ``samples/step-XXXXXX.png``: sample grids from the EMA weights as training goes.

``--minutes`` stops a chunk early (with a checkpoint) so long trainings run as a series of short jobs;
``--export DIR`` writes the EMA weights as a diffusers folder at the end of the chunk.

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
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from studio.core.errors import StudioError

CHECKPOINT = "checkpoint.safetensors"


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


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """``"auto"``: bf16 autocast on CUDA and on CPUs with native bf16. Measured on an AVX2-only EPYC,
    emulated bf16 made a 1.7 M-parameter UNet step 18x slower (41 s instead of 2.3 s), hence not forced."""
    if setting == "auto":
        return device.type == "cuda" or cpu_has_bf16()
    return bool(setting)


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


def _checkpoint_step(path: Path) -> int:
    """The step stored in a checkpoint's metadata (-1 when there is no checkpoint)."""
    if not path.is_file():
        return -1
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["step"])


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def save_grid(images: Tensor, path: Path, nrow: int = 8) -> Path:
    """``images`` in [0,1], (N,3,H,W) → one PNG grid with 2-pixel white gutters."""
    from PIL import Image

    n, c, h, w = images.shape
    ncol = nrow
    nrows = math.ceil(n / ncol)
    pad = 2
    grid = np.ones((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    arr = images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    for i in range(n):
        r, cidx = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + cidx * (w + pad): pad + cidx * (w + pad) + w] = arr[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255 + 0.5).astype(np.uint8)).save(path)
    return path


class Logger:
    """Appends JSON lines to ``log.jsonl`` and prints a short line."""

    def __init__(self, run_dir: Path, quiet: bool = False):
        self.path = run_dir / "log.jsonl"
        self.quiet = quiet

    def __call__(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.quiet:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)


def last_logged(run_dir: Path, key: str = "loss", window: int = 20) -> float | None:
    """Mean of ``key`` over the last ``window`` log lines (the loss reported in a model card)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return None
    values = [json.loads(line).get(key) for line in path.read_text().splitlines()[-window:]]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------------------------------- data


def load_training_images(data_dir: str | Path, size: int, limit: int | None = None) -> tuple[Tensor, list[str]]:
    """Training split (held-out concepts removed) as uint8 (N,3,size,size) and captions."""
    from studio.training.emoji_data import load_dataset

    ds = load_dataset(data_dir)
    if size not in ds.images:
        raise StudioError(f"dataset {data_dir} has sizes {sorted(ds.images)}, not {size}")
    train = ds.split(held_out=False)
    images = torch.from_numpy(train.images[size]).permute(0, 3, 1, 2).contiguous()
    captions = list(train.captions)
    if limit is not None:
        images, captions = images[:limit], captions[:limit]
    return images, captions


def to_model_range(batch_uint8: Tensor, device: torch.device) -> Tensor:
    return batch_uint8.to(device=device, dtype=torch.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------- warm start
#
# Training here spans sessions whose run folders are not kept, so a run can continue from the weights it
# shipped: ``init_from=emoji-pixel`` (or a folder) loads the exported weights as raw *and* EMA weights and
# continues at the step the folder's ``card.json`` records. What a warm start cannot restore is the AdamW
# moments (and, for raw-weight exports, the EMA); the LR is re-warmed instead. The whole is still
# deterministic: the same legs (commands) give the same weights.

TRAINING_CONFIG = "training_config.json"
_MACHINE_KEYS = ("run_dir", "data", "threads", "device", "init_from", "init_step", "vae_init_step", "limit")


def init_folder(cfg) -> Path | None:
    """The exported folder a fresh run warm-starts from (``None``: no ``init_from``)."""
    if not cfg.init_from:
        return None
    from models.registry import resolve_model_path

    folder = Path(resolve_model_path(cfg.init_from))
    if not (folder / "model_index.json").is_file():
        raise StudioError(f"init_from={cfg.init_from!r}: {folder} is not an exported diffusers folder "
                          "(no model_index.json)")
    if not (folder / "card.json").is_file():
        raise StudioError(f"init_from={cfg.init_from!r}: {folder} has no card.json (the step to continue from)")
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


# ---------------------------------------------------------------------------------------- pixel prior


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
    # `init_folder` and the warm-start section. Empty: start from random weights at step 0.
    init_from: str = ""
    init_step: int = 0  # set from the folder's card.json when the warm start happens
    notes: str = ""  # the run's history in words; printed in the model card


def build_pixel_unet(cfg: PixelTrainConfig):
    from diffusers import UNet2DModel

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


def build_pixel_scheduler(cfg: PixelTrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=True,
    )


def diffusion_target(prediction_type: str, x0: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """What the network learns to output at ``x_t = sqrt(abar) x0 + sqrt(1-abar) noise``: ``noise`` for
    epsilon, ``v = sqrt(abar) noise - sqrt(1-abar) x0`` for v_prediction, ``x0`` for sample."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise StudioError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")


def ddim_sample_pixel(unet, scheduler_config: dict, n: int, size: int, steps: int, seed: int,
                      device: torch.device) -> Tensor:
    """Deterministic DDIM samples (eta 0) in [0,1] (used for the training grids and the model card)."""
    from diffusers import DDIMScheduler

    return _sample_pixel(unet, DDIMScheduler.from_config(scheduler_config), n, size, steps, seed, device,
                         eta=0.0)


def ddpm_sample_pixel(unet, scheduler_config: dict, n: int, size: int, steps: int, seed: int,
                      device: torch.device) -> Tensor:
    """DDPM ancestral samples in [0,1], as ``DDPMPipeline`` draws them with the shipped scheduler:
    x_{t-1} = mu_theta(x_t, t) + sigma_t z, with fresh noise z at every step (the model card's main grid)."""
    from diffusers import DDPMScheduler

    return _sample_pixel(unet, DDPMScheduler.from_config(scheduler_config), n, size, steps, seed, device)


@torch.no_grad()
def _sample_pixel(unet, sched, n: int, size: int, steps: int, seed: int, device: torch.device, **step_kw) -> Tensor:
    sched.set_timesteps(steps)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g).to(device)
    for t in sched.timesteps:
        eps = unet(x, t.to(device)).sample
        # the step noise comes from the same CPU generator (diffusers draws it on the CPU and moves it),
        # so a seed gives the same grid on any device
        x = sched.step(eps, t, x, generator=g, **step_kw).prev_sample
    return ((x + 1) / 2).clamp(0, 1).cpu()


def train_pixel(cfg: PixelTrainConfig, minutes: float | None = None, export: str | None = None,
                quiet: bool = False) -> dict:
    """Train (or resume) the pixel prior; returns a summary. See the module docstring."""
    import copy

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    warm = None if (run_dir / CHECKPOINT).is_file() else init_folder(cfg)
    diffusion_target(cfg.prediction_type, torch.zeros(1), torch.zeros(1), torch.ones(1))  # validates the name
    if warm is not None:
        cfg.init_step = card_steps(warm)
        cfg.notes = warm_start_note(cfg.notes, cfg.init_from, "steps", cfg.init_step, cfg.warmup)
        before = json.loads((warm / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type")
        if before != cfg.prediction_type:
            cfg.notes += f" The training target changed there from {before} to {cfg.prediction_type}."
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    images, _ = load_training_images(cfg.data, cfg.size, cfg.limit)
    torch.manual_seed(cfg.seed)
    unet = build_pixel_unet(cfg).to(device)
    if warm is not None:
        from diffusers import UNet2DModel

        load_exported(unet, warm / "unet", UNet2DModel)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = build_pixel_scheduler(cfg)
    abar = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32, device=device)

    def batch_fn(g):
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
        t = torch.randint(cfg.num_train_timesteps, (cfg.batch_size,), generator=g)
        noise = torch.randn(cfg.batch_size, 3, cfg.size, cfg.size, generator=g).to(device)
        x0 = to_model_range(images[idx], device)
        t = t.to(device)
        a = abar[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample
        target = diffusion_target(cfg.prediction_type, x0, noise, a)
        return torch.nn.functional.mse_loss(pred.float(), target), {}

    def sample_fn(step):
        grid = ddim_sample_pixel(ema, dict(scheduler.config), cfg.num_samples, cfg.size, 50, 0, device)
        save_grid(grid, run_dir / "samples" / f"step-{step:06d}.png")

    step = _train_loop(cfg, run_dir, {"model": unet, "ema": ema}, list(unet.parameters()), cfg.lr, cfg.steps,
                       batch_fn, sample_fn, minutes, quiet, [(ema, unet)], start_step=cfg.init_step)
    if export:
        export_pixel(ema, scheduler, export)
    return {"step": step, "done": step >= cfg.steps, "run_dir": str(run_dir), "export": export}


def export_pixel(unet, scheduler, folder: str | Path) -> Path:
    """Save as a ``DDPMPipeline`` folder (safetensors) that ``DDPMPipeline.from_pretrained`` loads."""
    from diffusers import DDPMPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet.to("cpu").float(), scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
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


def apply_overrides(cfg, overrides: list[str]):
    """``key=value`` strings onto a trainer config dataclass (values parsed as JSON when they parse)."""
    from studio.core.config import parse_key_values

    for key, value in parse_key_values(overrides).items():
        if not hasattr(cfg, key):
            raise StudioError(f"unknown training option '{key}' (known: {', '.join(asdict(cfg))})")
        setattr(cfg, key, value)
    return cfg


# ---------------------------------------------------------------------------------------- latent prior
#
# A tiny Stable-Diffusion-style set for 64x64 images (Rombach et al. 2022), trained in two stages:
#   1. AutoencoderKL f=4 on the images: L1 + MSE reconstruction + a small KL term; the latent scaling
#      factor is 1 / std of the training latents (as SD's 0.18215 was chosen).
#   2. UNet2DConditionModel and CLIPTextModel together on the frozen VAE's latents, eps-prediction with
#      SD's scaled-linear schedule; captions are dropped to "" with probability ``caption_dropout`` so that
#      classifier-free guidance (Ho & Salimans 2022) works at sampling time.


@dataclass
class LatentTrainConfig:
    data: str = "runs/data/emoji"
    run_dir: str = "runs/train/emoji-sd"
    size: int = 64
    seed: int = 0
    # stage 1: VAE
    vae_steps: int = 4_000
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    vae_decay_fraction: float = 0.2  # the LR decays linearly to 10% over this last fraction of vae_steps
    vae_block_out_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    kl_weight: float = 1e-6
    # The VAE ships its raw weights (as SD's VAE): an EMA that starts at step `warmup` keeps ~5% of the
    # step-250 weights after 3000 steps (0.999^2750), measured to cost several dB of reconstruction.
    vae_use_ema: bool = False
    # stage 2: text encoder + UNet
    unet_steps: int = 40_000
    unet_batch_size: int = 32
    unet_lr: float = 5e-4
    unet_block_out_channels: tuple[int, ...] = (64, 128, 128)
    text_hidden_size: int = 128
    text_layers: int = 4
    num_merges: int = 1500
    caption_dropout: float = 0.1
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    warmup: int = 250
    ema_decay: float = 0.999
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 100
    sample_captions: tuple[str, ...] = ()  # default: the first 16 training captions after a fixed shuffle
    bf16: bool | str = "auto"
    limit: int | None = None
    device: str = "auto"
    threads: int | None = None
    notes: str = ""  # the run's history in words (e.g. a schedule extended mid-run); printed in the model card
    init_from: str = ""  # warm start from an exported folder / registered name (see PixelTrainConfig)
    init_step: int = 0  # the text/UNet stage's step at the warm start
    vae_init_step: int = 0  # the VAE stage's step at the warm start


def build_vae(cfg: LatentTrainConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_block_out_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(32, cfg.vae_block_out_channels[0]),
        sample_size=cfg.size,
    )


def build_text_encoder(cfg: LatentTrainConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden_size,
        intermediate_size=4 * cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=cfg.text_hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_cond_unet(cfg: LatentTrainConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_block_out_channels)
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
    f = 2 ** (len(cfg.vae_block_out_channels) - 1)
    return UNet2DConditionModel(
        sample_size=cfg.size // f,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_block_out_channels),
        layers_per_block=1,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_latent_scheduler(cfg: LatentTrainConfig):
    """SD's DDIM scheduler (scaled-linear betas, ``steps_offset=1``); training uses its ``alphas_cumprod``."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _train_loop(cfg, run_dir: Path, modules: dict, params, lr_base: float, total: int, batch_fn: Callable,
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


@torch.no_grad()
def latent_statistics(vae, images: Tensor, device: torch.device, batch: int = 64) -> float:
    """Std of the VAE's latent means over ``images``; SD scales latents by its inverse."""
    zs = []
    for i in range(0, len(images), batch):
        zs.append(vae.encode(to_model_range(images[i:i + batch], device)).latent_dist.mean.float().cpu())
    return float(torch.cat(zs).std())


def _load_ema(module, run_dir: Path, prefix: str = "ema"):
    with safe_open(str(run_dir / CHECKPOINT), framework="pt") as f:
        sd = {k[len(prefix) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
    module.load_state_dict(sd)
    return module


def train_vae(cfg: LatentTrainConfig, minutes: float | None = None, quiet: bool = False,
              warm: Path | None = None) -> int:
    """Stage 1. Loss: ``|x - D(z)|_1 + |x - D(z)|^2 + kl_weight * KL(q(z|x) || N(0, I))``."""
    import copy

    device = pick_device(cfg.device)
    run_dir = Path(cfg.run_dir) / "vae"
    run_dir.mkdir(parents=True, exist_ok=True)
    images, _ = load_training_images(cfg.data, cfg.size, cfg.limit)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg)
    if warm is not None:  # only passed for a stage without a checkpoint (train_latent)
        from diffusers import AutoencoderKL

        load_exported(vae, warm / "vae", AutoencoderKL)
    vae = vae.to(device)
    ema = copy.deepcopy(vae).requires_grad_(False)
    held_images = _held_out_images(cfg)

    def batch_fn(g):
        idx = torch.randint(len(images), (cfg.vae_batch_size,), generator=g)
        x = to_model_range(images[idx], device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample.float()
        l1, l2 = (rec - x).abs().mean(), (rec - x).pow(2).mean()
        kl = post.kl().mean() / x[0].numel()
        psnr = float(10 * torch.log10(4.0 / l2.detach()))  # [-1,1] range → peak-to-peak 2
        return l1 + l2 + cfg.kl_weight * kl, {"psnr_train": psnr, "kl": float(kl.detach())}

    def sample_fn(step):
        x = to_model_range(held_images[:32], device)
        with torch.no_grad():
            used = ema if cfg.vae_use_ema else vae
            rec = used.decode(used.encode(x).latent_dist.mean).sample.float()
        mse = ((rec.clamp(-1, 1) - x) / 2).pow(2).mean(dim=(1, 2, 3))
        # the first 32 held-out images (the model card measures all of them)
        Logger(run_dir, quiet)(step=step, held_out_psnr=float((-10 * torch.log10(mse)).mean()))
        save_grid(torch.cat([(x + 1) / 2, (rec + 1) / 2])[:64], run_dir / "samples" / f"step-{step:06d}.png")

    return _train_loop(cfg, run_dir, {"model": vae, "ema": ema}, list(vae.parameters()), cfg.vae_lr,
                       cfg.vae_steps, batch_fn, sample_fn, minutes, quiet, [(ema, vae)], cfg.vae_decay_fraction,
                       start_step=cfg.vae_init_step)


def _held_out_images(cfg) -> Tensor:
    from studio.training.emoji_data import load_dataset

    ds = load_dataset(cfg.data).split(held_out=True)
    return torch.from_numpy(ds.images[cfg.size]).permute(0, 3, 1, 2).contiguous()


def sample_captions(cfg: LatentTrainConfig, captions: list[str], n: int = 16) -> list[str]:
    """The captions of the text-to-image grids: fixed by the seed, held-in (training) captions."""
    if cfg.sample_captions:
        return list(cfg.sample_captions)
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(cfg.seed + 7))
    return [captions[i] for i in order[:n].tolist()]


def train_text_unet(cfg: LatentTrainConfig, minutes: float | None = None, quiet: bool = False,
                    warm: Path | None = None) -> int:
    """Stage 2: ``E ||eps - eps_theta(z_t, t, tau(c))||^2`` with ``c`` dropped to "" at ``caption_dropout``."""
    import copy

    from studio.training.tokenizer import build_clip_tokenizer, save_clip_tokenizer

    device = pick_device(cfg.device)
    run_dir = Path(cfg.run_dir) / "unet"
    run_dir.mkdir(parents=True, exist_ok=True)
    vae_dir = Path(cfg.run_dir) / "vae"
    if not (vae_dir / CHECKPOINT).is_file():
        raise StudioError(f"no VAE checkpoint in {vae_dir}: train the VAE stage first")
    images, captions = load_training_images(cfg.data, cfg.size, cfg.limit)
    tok_dir = Path(cfg.run_dir) / "tokenizer"
    if warm is not None and not (tok_dir / "vocab.json").is_file():  # warm: only for a stage without a checkpoint
        import shutil

        shutil.copytree(warm / "tokenizer", tok_dir)  # the shipped vocabulary, not a rebuilt one
    if (tok_dir / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    else:
        from studio.training.emoji_data import load_dataset

        all_train = load_dataset(cfg.data).split(held_out=False).captions  # independent of ``limit``
        tokenizer = build_clip_tokenizer(all_train, cfg.num_merges)
        save_clip_tokenizer(tokenizer, tok_dir)
    vae = _load_ema(build_vae(cfg), vae_dir, "ema" if cfg.vae_use_ema else "model").to(device).requires_grad_(False)
    latents_path = Path(cfg.run_dir) / "latents.safetensors"
    vae_step = _checkpoint_step(vae_dir / CHECKPOINT)
    stored = None
    if latents_path.is_file() and cfg.limit is None:
        from safetensors.torch import load_file

        stored = load_file(str(latents_path))
        if int(stored.get("vae_step", torch.tensor(-1))) != vae_step:
            stored = None  # encoded by another VAE checkpoint (the VAE trained on): encode again
    if stored is not None:
        mean, std, scale = stored["mean"], stored["std"], float(stored["scaling_factor"])
    else:
        with torch.no_grad():
            dists = [vae.encode(to_model_range(images[i:i + 64], device)).latent_dist for i in range(0, len(images), 64)]
        mean = torch.cat([d.mean.float().cpu() for d in dists]).contiguous()
        std = torch.cat([d.std.float().cpu() for d in dists]).contiguous()
        scale = float(1.0 / mean.std())
        save_file({"mean": mean, "std": std, "scaling_factor": torch.tensor(scale),
                   "vae_step": torch.tensor(vae_step)}, str(latents_path))
    vae.register_to_config(scaling_factor=scale)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    torch.manual_seed(cfg.seed)
    text_encoder = build_text_encoder(cfg, tokenizer)
    unet = build_cond_unet(cfg)
    if warm is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        load_exported(text_encoder, warm / "text_encoder", CLIPTextModel)
        load_exported(unet, warm / "unet", UNet2DConditionModel)
    text_encoder, unet = text_encoder.to(device), unet.to(device)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    scheduler = build_latent_scheduler(cfg)
    abar = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32, device=device)
    grid_captions = sample_captions(cfg, captions)

    def batch_fn(g):
        b = cfg.unet_batch_size
        idx = torch.randint(len(images), (b,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        t = torch.randint(cfg.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        drop = torch.rand(b, generator=g) < cfg.caption_dropout
        tokens = torch.where(drop[:, None], empty.expand(b, -1), ids[idx])
        z0, t, noise, tokens = z0.to(device), t.to(device), noise.to(device), tokens.to(device)
        a = abar[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = text_encoder(tokens).last_hidden_state
        pred = unet(z_t, t, encoder_hidden_states=cond).sample
        return torch.nn.functional.mse_loss(pred.float(), noise), {}

    def sample_fn(step):
        pipe = assemble_sd_pipeline(vae, ema_text, tokenizer, ema_unet, scheduler)
        grid = sd_sample(pipe, grid_captions, steps=20, guidance=3.0, seed=0)
        save_grid(grid, run_dir / "samples" / f"step-{step:06d}.png", nrow=4)
        (run_dir / "samples" / "captions.json").write_text(json.dumps(grid_captions, ensure_ascii=False))

    params = list(text_encoder.parameters()) + list(unet.parameters())
    return _train_loop(cfg, run_dir, {"text": text_encoder, "unet": unet, "ema_text": ema_text,
                                      "ema_unet": ema_unet}, params, cfg.unet_lr, cfg.unet_steps,
                       batch_fn, sample_fn, minutes, quiet, [(ema_text, text_encoder), (ema_unet, unet)],
                       start_step=cfg.init_step)


def assemble_sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@torch.no_grad()
def sd_sample(pipe, prompts: list[str], steps: int = 20, guidance: float = 3.0, seed: int = 0) -> Tensor:
    """Text-to-image samples in [0,1] with classifier-free guidance, one seeded generator."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=g, height=size,
               width=size, output_type="pt")
    return out.images.cpu()


def train_latent(cfg: LatentTrainConfig, stage: str = "all", minutes: float | None = None,
                 export: str | None = None, quiet: bool = False) -> dict:
    """Run the VAE stage until done, then the text/UNet stage (or only one with ``stage``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if stage not in ("all", "vae", "unet"):
        raise StudioError(f"unknown latent training stage '{stage}' (use all, vae or unet)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fresh_vae, fresh_unet = (not (run_dir / s / CHECKPOINT).is_file() for s in ("vae", "unet"))
    warm = init_folder(cfg) if (fresh_vae or fresh_unet) else None
    if warm is not None:
        if fresh_vae:
            cfg.vae_init_step = card_steps(warm, "vae")
            if cfg.vae_init_step < cfg.vae_steps:
                cfg.notes = warm_start_note(cfg.notes, cfg.init_from, "VAE steps", cfg.vae_init_step, cfg.warmup)
        if fresh_unet:
            cfg.init_step = card_steps(warm, "unet")
            cfg.notes = warm_start_note(cfg.notes, cfg.init_from, "text/UNet steps", cfg.init_step, cfg.warmup)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    start = time.time()
    left = lambda: None if minutes is None else max(0.0, minutes - (time.time() - start) / 60)  # noqa: E731
    vae_step = unet_step = 0
    if stage in ("all", "vae"):
        vae_step = train_vae(cfg, left(), quiet, warm if fresh_vae else None)
    if stage == "unet" or (stage == "all" and vae_step >= cfg.vae_steps and (left() is None or left() > 0)):
        unet_step = train_text_unet(cfg, left(), quiet, warm if fresh_unet else None)
    if export:
        export_latent(cfg, export)
    return {"vae_step": vae_step, "unet_step": unet_step, "run_dir": str(run_dir), "export": export}


def export_latent(cfg: LatentTrainConfig, folder: str | Path, weights: str = "ema") -> Path:
    """A ``StableDiffusionPipeline`` folder (safetensors) with the tokenizer files: the text encoder and UNet
    with their EMA (``weights="ema"``) or raw (``"raw"``) weights; the VAE as ``vae_use_ema`` says."""
    if weights not in ("ema", "raw"):
        raise StudioError(f"weights must be ema or raw, got {weights!r}")
    from transformers import CLIPTokenizer

    from studio.training.tokenizer import save_clip_tokenizer

    run_dir = Path(cfg.run_dir)
    tokenizer = CLIPTokenizer.from_pretrained(run_dir / "tokenizer")
    vae = _load_ema(build_vae(cfg), run_dir / "vae", "ema" if cfg.vae_use_ema else "model")
    from safetensors.torch import load_file

    vae.register_to_config(scaling_factor=float(load_file(str(run_dir / "latents.safetensors"))["scaling_factor"]))
    prefix = "ema_" if weights == "ema" else ""
    text = _load_ema(build_text_encoder(cfg, tokenizer), run_dir / "unet", f"{prefix}text")
    unet = _load_ema(build_cond_unet(cfg), run_dir / "unet", f"{prefix}unet")
    pipe = assemble_sd_pipeline(vae, text, tokenizer, unet, build_latent_scheduler(cfg))
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    save_clip_tokenizer(tokenizer, folder / "tokenizer")
    return folder


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
                if hasattr(cfg, k) and k not in _MACHINE_KEYS:
                    setattr(cfg, k, tuple(v) if isinstance(v, list) else v)
            cfg = apply_overrides(cfg, overrides)
    return cfg
