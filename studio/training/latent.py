"""``studio train latent``: a tiny Stable-Diffusion-style set for 64x64 images (emoji-sd).

Rombach et al. 2022, trained in two stages:

1. AutoencoderKL f=4 on the images: L1 + MSE reconstruction + a small KL term; the latent scaling factor
   is 1 / std of the training latents (as SD's 0.18215 was chosen).
2. UNet2DConditionModel and CLIPTextModel together on the frozen VAE's latents, eps-prediction with SD's
   scaled-linear schedule; captions are dropped to "" with probability ``caption_dropout`` so that
   classifier-free guidance (Ho & Salimans 2022) works at sampling time.

The loop, checkpoints and EMA are :mod:`studio.training.loop`'s; warm starts are
:mod:`studio.training.warm_start`'s.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from studio.core.errors import StudioError
from studio.core.io import safetensors_file, write_set
from studio.training.emoji_data import (load_dataset, load_held_out_images, load_training_images,
                                        to_model_range)
from studio.training.loop import (CHECKPOINT, Logger, checkpoint_step, load_weights, pick_device,
                                  remove_stale_temporaries, train_loop, write_json)
from studio.training.objective import diffusion_target, forward_process
from studio.training.sampling import assemble_sd_pipeline, save_grid, sd_sample
from studio.training.tokenizer import build_clip_tokenizer, save_clip_tokenizer
from studio.training.warm_start import card_steps, init_folder, load_exported, warm_start_note

LATENTS = "latents.safetensors"


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
    # the run's history in words (e.g. a schedule extended mid-run); printed in the model card
    notes: str = ""
    init_from: str = ""  # warm start from an exported folder / registered name (see PixelTrainConfig)
    init_step: int = 0  # the text/UNet stage's step at the warm start
    vae_init_step: int = 0  # the VAE stage's step at the warm start


# ---------------------------------------------------------------------------------------- models


def build_vae(cfg: LatentTrainConfig) -> AutoencoderKL:
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


def build_text_encoder(cfg: LatentTrainConfig, tokenizer) -> CLIPTextModel:
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


def build_cond_unet(cfg: LatentTrainConfig) -> UNet2DConditionModel:
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


def build_latent_scheduler(cfg: LatentTrainConfig) -> DDIMScheduler:
    """SD's DDIM scheduler (scaled-linear betas, ``steps_offset=1``); training uses its ``alphas_cumprod``."""
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


def sample_captions(cfg: LatentTrainConfig, captions: list[str], n: int = 16) -> list[str]:
    """The captions of the text-to-image grids: fixed by the seed, held-in (training) captions."""
    if cfg.sample_captions:
        return list(cfg.sample_captions)
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(cfg.seed + 7))
    return [captions[i] for i in order[:n].tolist()]


# ---------------------------------------------------------------------------------------- stage 1: VAE


def train_vae(cfg: LatentTrainConfig, minutes: float | None = None, quiet: bool = False,
              warm: Path | None = None) -> int:
    """Stage 1. Loss: ``|x - D(z)|_1 + |x - D(z)|^2 + kl_weight * KL(q(z|x) || N(0, I))``."""
    device = pick_device(cfg.device)
    run_dir = Path(cfg.run_dir) / "vae"
    run_dir.mkdir(parents=True, exist_ok=True)
    images, _ = load_training_images(cfg.data, cfg.size, cfg.limit)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg)
    if warm is not None:  # only passed for a stage without a checkpoint (train_latent)
        load_exported(vae, warm / "vae", AutoencoderKL)
    vae = vae.to(device)
    ema = copy.deepcopy(vae).requires_grad_(False)
    held_images = load_held_out_images(cfg.data, cfg.size)

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

    return train_loop(cfg, run_dir, {"model": vae, "ema": ema}, list(vae.parameters()), cfg.vae_lr,
                      cfg.vae_steps, batch_fn, sample_fn, minutes, quiet, [(ema, vae)],
                      cfg.vae_decay_fraction, start_step=cfg.vae_init_step)


# ------------------------------------------------------------------------------------ stage 2: text + UNet


def _stage_tokenizer(cfg: LatentTrainConfig, warm: Path | None) -> CLIPTokenizer:
    """The run's tokenizer: the one in its folder, else the warm start's shipped vocabulary, else one built
    from all training captions (independent of ``limit``) and saved there."""
    tok_dir = Path(cfg.run_dir) / "tokenizer"
    # ``warm`` is only passed for a stage without a checkpoint
    if warm is not None and not (tok_dir / "vocab.json").is_file():
        _publish_folder(tok_dir, lambda d: shutil.copytree(warm / "tokenizer", d))  # the shipped vocabulary
    if (tok_dir / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(tok_dir)
    all_train = load_dataset(cfg.data).split(held_out=False).captions
    tokenizer = build_clip_tokenizer(all_train, cfg.num_merges)
    _publish_folder(tok_dir, lambda d: save_clip_tokenizer(tokenizer, d))
    return tokenizer


def _publish_folder(folder: Path, fill) -> None:
    """Write ``folder`` whole or not at all: ``fill`` writes a sibling that is then renamed into place. A run
    killed half-way through the tokenizer's files must not leave a vocab.json without its merges.txt,
    which the resumed run would load as another vocabulary."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed run left
    fill(partial)
    shutil.rmtree(folder, ignore_errors=True)  # incomplete (no vocab.json): written before this was atomic
    os.replace(partial, folder)


def _training_latents(cfg: LatentTrainConfig, vae, images: Tensor, device: torch.device):
    """Per-image VAE posterior mean and std of the training images, and the latent scaling factor.

    Cached in ``latents.safetensors`` with the VAE step they were encoded by (a cache of another VAE
    checkpoint, or of a ``limit`` run, is encoded again)."""
    latents_path = Path(cfg.run_dir) / LATENTS
    vae_step = checkpoint_step(Path(cfg.run_dir) / "vae" / CHECKPOINT)
    if latents_path.is_file() and cfg.limit is None:
        stored = load_file(str(latents_path))
        if int(stored.get("vae_step", torch.tensor(-1))) == vae_step:
            return stored["mean"], stored["std"], float(stored["scaling_factor"])
    with torch.no_grad():
        dists = [vae.encode(to_model_range(images[i:i + 64], device)).latent_dist
                 for i in range(0, len(images), 64)]
    mean = torch.cat([d.mean.float().cpu() for d in dists]).contiguous()
    std = torch.cat([d.std.float().cpu() for d in dists]).contiguous()
    scale = float(1.0 / mean.std())
    write_set([safetensors_file({"mean": mean, "std": std, "scaling_factor": torch.tensor(scale),
                                 "vae_step": torch.tensor(vae_step)}, latents_path)])  # a resume reads it
    return mean, std, scale


def _caption_ids(tokenizer, captions: list[str]) -> tuple[Tensor, Tensor]:
    """Token ids of every caption and of the empty caption (the classifier-free-guidance dropout)."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    return ids, empty


def _text_unet_models(cfg: LatentTrainConfig, tokenizer, warm: Path | None, device: torch.device):
    """Text encoder and UNet (seeded init, or the warm start's weights) on ``device``, with EMA copies."""
    torch.manual_seed(cfg.seed)
    text_encoder = build_text_encoder(cfg, tokenizer)
    unet = build_cond_unet(cfg)
    if warm is not None:
        load_exported(text_encoder, warm / "text_encoder", CLIPTextModel)
        load_exported(unet, warm / "unet", UNet2DConditionModel)
    text_encoder, unet = text_encoder.to(device), unet.to(device)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    return text_encoder, unet, ema_text, ema_unet


def train_text_unet(cfg: LatentTrainConfig, minutes: float | None = None, quiet: bool = False,
                    warm: Path | None = None) -> int:
    """Stage 2: ``E ||eps - eps_theta(z_t, t, tau(c))||^2`` with ``c`` dropped to "" at
    ``caption_dropout``."""
    device = pick_device(cfg.device)
    run_dir = Path(cfg.run_dir) / "unet"
    run_dir.mkdir(parents=True, exist_ok=True)
    vae_dir = Path(cfg.run_dir) / "vae"
    if not (vae_dir / CHECKPOINT).is_file():
        raise StudioError(f"no VAE checkpoint in {vae_dir}: train the VAE stage first")
    images, captions = load_training_images(cfg.data, cfg.size, cfg.limit)
    tokenizer = _stage_tokenizer(cfg, warm)
    vae = load_weights(build_vae(cfg), vae_dir, "ema" if cfg.vae_use_ema else "model")
    vae = vae.to(device).requires_grad_(False)
    mean, std, scale = _training_latents(cfg, vae, images, device)
    vae.register_to_config(scaling_factor=scale)
    ids, empty = _caption_ids(tokenizer, captions)
    text_encoder, unet, ema_text, ema_unet = _text_unet_models(cfg, tokenizer, warm, device)
    scheduler = build_latent_scheduler(cfg)
    noising = forward_process(scheduler.config)
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
        cond = text_encoder(tokens).last_hidden_state
        pred = unet(noising.add_noise(z0, noise, t), t, encoder_hidden_states=cond).sample
        target = diffusion_target(noising.config.prediction_type, noising, z0, noise, t)
        return torch.nn.functional.mse_loss(pred.float(), target), {}

    def sample_fn(step):
        pipe = assemble_sd_pipeline(vae, ema_text, tokenizer, ema_unet, scheduler)
        grid = sd_sample(pipe, grid_captions, steps=20, guidance=3.0, seed=0)
        save_grid(grid, run_dir / "samples" / f"step-{step:06d}.png", nrow=4)
        write_json(run_dir / "samples" / "captions.json", grid_captions, ensure_ascii=False)

    params = list(text_encoder.parameters()) + list(unet.parameters())
    modules = {"text": text_encoder, "unet": unet, "ema_text": ema_text, "ema_unet": ema_unet}
    return train_loop(cfg, run_dir, modules, params, cfg.unet_lr, cfg.unet_steps, batch_fn, sample_fn,
                      minutes, quiet, [(ema_text, text_encoder), (ema_unet, unet)], start_step=cfg.init_step)


# ---------------------------------------------------------------------------------------- both stages


def _record_warm_start(cfg: LatentTrainConfig, warm: Path, fresh_vae: bool, fresh_unet: bool) -> None:
    """Each stage without a checkpoint continues at the step the exported folder's card records."""
    if fresh_vae:
        cfg.vae_init_step = card_steps(warm, "vae")
        if cfg.vae_init_step < cfg.vae_steps:
            cfg.notes = warm_start_note(cfg.notes, cfg.init_from, "VAE steps", cfg.vae_init_step, cfg.warmup)
    if fresh_unet:
        cfg.init_step = card_steps(warm, "unet")
        cfg.notes = warm_start_note(cfg.notes, cfg.init_from, "text/UNet steps", cfg.init_step, cfg.warmup)


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
        _record_warm_start(cfg, warm, fresh_vae, fresh_unet)
    remove_stale_temporaries(run_dir)
    write_json(run_dir / "config.json", asdict(cfg), indent=1)  # atomic: a resume reads it back
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
    run_dir = Path(cfg.run_dir)
    tokenizer = CLIPTokenizer.from_pretrained(run_dir / "tokenizer")
    vae = load_weights(build_vae(cfg), run_dir / "vae", "ema" if cfg.vae_use_ema else "model")
    vae.register_to_config(scaling_factor=float(load_file(str(run_dir / LATENTS))["scaling_factor"]))
    prefix = "ema_" if weights == "ema" else ""
    text = load_weights(build_text_encoder(cfg, tokenizer), run_dir / "unet", f"{prefix}text")
    unet = load_weights(build_cond_unet(cfg), run_dir / "unet", f"{prefix}unet")
    pipe = assemble_sd_pipeline(vae, text, tokenizer, unet, build_latent_scheduler(cfg))
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    save_clip_tokenizer(tokenizer, folder / "tokenizer")
    return folder
