"""Measurements for the embedded models' cards: denoising against classical baselines, VAE fidelity.

The pixel prior's denoiser is Tweedie's formula at the timestep matching the noise level
(:meth:`models.base.DiffusionPrior.denoise`). The baselines are scikit-image's Gaussian filter,
total-variation (Chambolle) and wavelet (BayesShrink) denoisers, each at the parameter that is best *on
the same images* (an oracle choice, which favours the baselines).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from torch import Tensor

from models.diffusers_prior import DiffusersPixelPrior
from studio.core import paths
from studio.core.conventions import sigma_to_model, to_image, to_model
from studio.core.errors import StudioError
from studio.core.io import load_image
from studio.core.metrics import psnr
from studio.training.emoji_data import load_training_images
from studio.training.latent import build_cond_unet, build_text_encoder, export_latent, sample_captions
from studio.training.loop import CHECKPOINT, last_logged, load_weights
from studio.training.objective import diffusion_target, forward_process
from studio.training.pixel import export_pixel, load_pixel_for_export
from studio.training.sampling import ddim_sample_pixel, ddpm_sample_pixel, save_grid, sd_sample
from studio.training.warm_start import init_folder, write_training_config

GAUSSIAN_SIGMAS = (0.3, 0.5, 0.7, 0.9, 1.1, 1.4, 1.8, 2.4)
TV_WEIGHTS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.17, 0.22, 0.3)
WAVELET_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def _mean_psnr(estimates: np.ndarray, clean: np.ndarray) -> float:
    return float(np.mean([psnr(torch.from_numpy(e), torch.from_numpy(c)) for e, c in zip(estimates, clean)]))


def classical_denoisers(noisy: np.ndarray, clean: np.ndarray, sigma: float) -> dict[str, dict]:
    """Best-parameter PSNR of each scikit-image denoiser; arrays are (N,H,W,3) in [0,1]."""
    from skimage.filters import gaussian
    from skimage.restoration import denoise_tv_chambolle, denoise_wavelet

    def sweep(fn, params):
        scores = {p: _mean_psnr(np.stack([np.clip(fn(y, p), 0, 1) for y in noisy]), clean) for p in params}
        best = max(scores, key=scores.get)
        return {"psnr": scores[best], "best_param": best, "sweep": scores}

    return {
        "gaussian_filter": sweep(lambda y, s: gaussian(y, sigma=s, channel_axis=-1), GAUSSIAN_SIGMAS),
        "tv_chambolle": sweep(lambda y, w: denoise_tv_chambolle(y, weight=w, channel_axis=-1), TV_WEIGHTS),
        "wavelet": sweep(lambda y, f: denoise_wavelet(y, sigma=f * sigma, channel_axis=-1,
                                                      method="BayesShrink",
                                                      mode="soft", rescale_sigma=True), WAVELET_FACTORS),
    }


@torch.no_grad()
def denoiser_comparison(prior, clean: Tensor, sigmas=(0.1, 0.2), seed: int = 0) -> dict[str, dict]:
    """PSNR of the prior's Tweedie denoiser and of the best classical denoiser at each [0,1]-unit sigma.

    ``clean``: (N,3,H,W) in [0,1]. Returns ``{str(sigma): {"prior": dB, "best_classical": dB, "margin_db":
    dB, "classical": {...}}}``.
    """
    out = {}
    g = torch.Generator().manual_seed(seed)
    for sigma in sigmas:
        noisy = clean + sigma * torch.randn(clean.shape, generator=g)
        x0 = prior.denoise(to_model(noisy).to(prior.device), sigma_to_model(sigma))
        ours = to_image(x0.float().cpu()).clamp(0, 1)
        prior_psnr = float(np.mean([psnr(a, b) for a, b in zip(ours, clean)]))
        classical = classical_denoisers(noisy.permute(0, 2, 3, 1).double().numpy(),
                                        clean.permute(0, 2, 3, 1).double().numpy(), sigma)
        best = max(v["psnr"] for v in classical.values())
        out[str(sigma)] = {"prior": prior_psnr, "best_classical": best, "margin_db": prior_psnr - best,
                           "classical": classical}
    return out


@torch.no_grad()
def vae_reconstruction_psnr(vae, clean: Tensor, batch: int = 32) -> list[float]:
    """Per-image PSNR of ``decode(mean(encode(x)))`` for (N,3,H,W) images in [0,1]."""
    scores = []
    for i in range(0, len(clean), batch):
        x = clean[i:i + batch]
        rec = vae.decode(vae.encode(to_model(x)).latent_dist.mean).sample
        scores += [psnr(a, b) for a, b in zip(to_image(rec).clamp(0, 1), x)]
    return scores


@torch.no_grad()
def held_out_diffusion_loss(model_fn, x0: Tensor, noising, prediction_type: str = "epsilon", draws: int = 8,
                            seed: int = 0) -> float:
    """The training objective on images never trained on: mean ``||target - model_fn(x_t, t)||^2`` with
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` over the images x ``draws`` timesteps (stratified over
    [0, T), noise and t fixed by ``seed``, so raw and EMA weights, or two snapshots, are scored on the same
    draws); the target is :func:`~studio.training.objective.diffusion_target` of ``prediction_type``.
    ``x0``: (N, C, H, W) in model units (pixels in [-1, 1], or scaled latents); ``noising``: the forward
    process (:func:`~studio.training.objective.forward_process`)."""
    g = torch.Generator().manual_seed(seed)
    total = len(noising.alphas_cumprod)
    losses = []
    for k in range(draws):
        t = ((k + torch.rand(len(x0), generator=g)) / draws * total).long().clamp(max=total - 1)
        noise = torch.randn(x0.shape, generator=g)
        pred = model_fn(noising.add_noise(x0, noise, t), t)
        target = diffusion_target(prediction_type, noising, x0, noise, t)
        losses.append(float(((pred.float() - target) ** 2).mean()))
    return float(np.mean(losses))


def pixel_held_out_loss(prior: DiffusersPixelPrior, clean: Tensor) -> float:
    """The held-out loss in eps terms whatever the network outputs (a v-network's eps-hat is
    ``sqrt(abar) v + sqrt(1-abar) x_t``), so epsilon and v models are scored on one scale."""
    return held_out_diffusion_loss(lambda x, t: prior.predict(x, t).eps, to_model(clean),
                                   forward_process(prior.scheduler_config), "epsilon")


HIGH_NOISE_TIMESTEPS = (999, 990, 950, 900, 800)


@torch.no_grad()
def high_noise_x0_error(prior, clean: Tensor, mean_image: Tensor, timesteps=HIGH_NOISE_TIMESTEPS,
                        seed: int = 0) -> dict[str, dict]:
    """MSE (model units) of the prior's x0-hat, clipped to [-1, 1] as the DDPM sampler clips it, at the
    highest-noise timesteps, beside predicting ``mean_image`` (the training images' mean, which is the
    MMSE estimate as abar_t -> 0). An x0-hat worse than the mean there is what made the eps-trained prior
    fill the frame with saturated colour. ``clean`` and ``mean_image`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x0 = to_model(clean).to(prior.device)
    noising = forward_process(prior.scheduler_config)
    baseline = float(((to_model(mean_image).to(x0) - x0) ** 2).mean())
    out = {}
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=g).to(x0)
        a = prior.alpha_bar(t, x0)
        x_t = noising.add_noise(x0, noise, torch.full((len(x0),), t, device=x0.device))
        x0_hat = prior.predict(x_t, t).x0.clamp(-1, 1)
        out[str(t)] = {"alpha_bar": float(a.flatten()[0]), "mse": float(((x0_hat - x0) ** 2).mean()),
                       "mean_image_mse": baseline}
    return out


def latent_held_out_loss(vae, text_encoder, tokenizer, unet, scheduler, clean: Tensor,
                         captions: list[str]) -> float:
    """Conditional held-out loss: latents of the held-out images, their own captions."""
    with torch.no_grad():
        z0 = vae.encode(to_model(clean)).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        cond = text_encoder(ids).last_hidden_state
    unet.eval()
    noising = forward_process(scheduler.config)
    return held_out_diffusion_loss(lambda z, t: unet(z, t, encoder_hidden_states=cond).sample, z0, noising,
                                   noising.config.prediction_type)


EXAMPLES_DIR = "examples/emoji"


def load_examples(size: int, folder: str = EXAMPLES_DIR) -> tuple[Tensor, list[str]]:
    """The shipped held-out emoji at ``size`` (32 or 64) as (N,3,size,size) in [0,1], with captions."""
    root = paths.resolve_shipped(folder)
    entries = json.loads((root / "captions.json").read_text())
    images = [load_image(str(root / e["files"][str(size)])) for e in entries]
    return torch.cat(images), [e["caption"] for e in entries]


def captions_by_file(folder: Path) -> dict[str, str]:
    """``captions.json`` in the examples layout (``[{caption, files: {size: name}}]``) as
    {file name: caption}; {} without one."""
    path = folder / "captions.json"
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return {name: e["caption"] for e in entries for name in e["files"].values()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise StudioError(f"cannot read captions from '{path}': {err}") from None


def _run_summary(run_dir) -> dict:
    """Steps, final loss and median seconds per step of a training run (from its checkpoint and log)."""
    with safe_open(str(Path(run_dir) / CHECKPOINT), framework="pt") as f:
        step = int(f.metadata()["step"])
    log = Path(run_dir) / "log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    secs = [s for s in (json.loads(line).get("sec_per_step") for line in lines) if s]
    return {"steps": step, "final_loss": last_logged(run_dir),
            "sec_per_step": float(np.median(secs)) if secs else None}


LICENCE = """- Training images: rendered from **Noto Color Emoji** (Debian package \
`fonts-noto-color-emoji` 2.042,
  © Google, SIL Open Font License 1.1). Captions: CLDR short names via the `emoji` Python package (BSD).
- Weights: trained by this project from scratch; released under the project's licence (Apache-2.0). As
  images derived from an OFL font, generated samples carry no additional restriction."""


PIXEL_CARD_DDPM_STEPS, PIXEL_CARD_DDIM_STEPS = 250, 100  # sampler steps of the card's two grids


def _pixel_grids(unet, scheduler, size: int, folder: Path, docs_dir: str) -> None:
    """The card's two 64-sample grids, in the exported folder and in ``docs_dir``: the shipped scheduler's
    own ancestral sampler (what DDPMPipeline runs), and DDIM beside it."""
    cpu = torch.device("cpu")
    grids = ((ddpm_sample_pixel, PIXEL_CARD_DDPM_STEPS, "samples.png"),
             (ddim_sample_pixel, PIXEL_CARD_DDIM_STEPS, f"samples-ddim{PIXEL_CARD_DDIM_STEPS}.png"))
    for sampler, steps, grid_name in grids:
        grid = sampler(unet, dict(scheduler.config), 64, size, steps=steps, seed=0, device=cpu)
        save_grid(grid, Path(docs_dir) / f"emoji-pixel-{grid_name}")
        save_grid(grid, folder / grid_name)


def _pixel_measurements(cfg, unet, scheduler, weights: str) -> dict:
    """card.json's numbers: denoising against the classical baselines, the high-noise x0 check and the
    held-out loss of both the raw and the EMA weights (``unet`` holds the ``weights`` ones)."""
    clean, _ = load_examples(cfg.size)
    prior = DiffusersPixelPrior(unet, scheduler)
    train_images, _ = load_training_images(cfg.data, cfg.size)
    mean_image = train_images.float().mean(0, keepdim=True) / 255
    other_prior = lambda w: DiffusersPixelPrior(load_pixel_for_export(cfg, w)[0], scheduler)  # noqa: E731
    held_loss = {w: pixel_held_out_loss(prior if w == weights else other_prior(w), clean)
                 for w in ("raw", "ema")}
    return {**_run_summary(cfg.run_dir), "weights": weights,
            "params": sum(p.numel() for p in unet.parameters()),
            "denoising": denoiser_comparison(prior, clean), "held_out_images": len(clean),
            "held_out_loss": held_loss,
            "high_noise_x0": high_noise_x0_error(prior, clean, mean_image), "notes": cfg.notes}


def write_pixel_card(cfg, folder, docs_dir: str = "docs", command: str = "", weights: str = "ema") -> dict:
    """Export the pixel prior (``weights``: EMA or raw) to ``folder`` with a model card, a sample grid and
    numbers."""
    unet, scheduler, step = load_pixel_for_export(cfg, weights)
    unet.eval()
    folder = Path(folder)
    export_pixel(unet, scheduler, folder)
    write_training_config(cfg, folder)
    Path(docs_dir).mkdir(parents=True, exist_ok=True)
    _pixel_grids(unet, scheduler, cfg.size, folder, docs_dir)
    summary = _pixel_measurements(cfg, unet, scheduler, weights)
    (folder / "card.json").write_text(json.dumps(summary, indent=1, default=float))
    (folder / "README.md").write_text(_pixel_readme(cfg, summary, command, weights))
    return summary


def _pixel_readme(cfg, summary: dict, command: str, weights: str) -> str:
    report, high_noise, held_loss = summary["denoising"], summary["high_noise_x0"], summary["held_out_loss"]
    n_held = summary["held_out_images"]
    rows = "\n".join(
        f"| {s} | {v['prior']:.2f} | {v['classical']['gaussian_filter']['psnr']:.2f} | "
        f"{v['classical']['tv_chambolle']['psnr']:.2f} | {v['classical']['wavelet']['psnr']:.2f} | "
        f"{v['margin_db']:+.2f} |" for s, v in report.items())
    hn_rows = "\n".join(f"| {t} | {v['alpha_bar']:.1e} | {v['mse']:.3f} |" for t, v in high_noise.items())
    commands = command or ("studio data emoji && studio train pixel && "
                           "studio export pixel --to models/weights/emoji-pixel")
    status = ("Training is complete." if summary["steps"] >= cfg.steps
              else "Still training; see the samples before relying on it as a generator.")
    params, channels = summary["params"] / 1e6, tuple(cfg.block_out_channels)
    return f"""# emoji-pixel: a 32x32 DDPM prior over emoji

Unconditional `UNet2DModel` ({params:.2f} M parameters, channels {channels},
self-attention at 8x8) with a `DDPMScheduler` (cosine schedule, 1000 steps, {cfg.prediction_type}), saved as a
`DDPMPipeline` folder (safetensors only). Load it with `studio restore --model emoji-pixel`, with
`models.diffusers_prior.load_pixel_prior("emoji-pixel")`, or with \
`DDPMPipeline.from_pretrained(<this folder>)`.

## Training
- Data: {cfg.size}x{cfg.size} emoji from `studio data emoji` (training split; the held-out concepts in
  `examples/emoji/` are never seen). Images in [-1, 1].
- Commands: `{commands}`
  (training is resumable; run it in chunks with `--minutes`; the same commands reproduce these weights on
  the same hardware and thread count).
- **Status: {summary['steps']} of {cfg.steps} planned steps.** {status}
- {summary['steps']} steps of batch {cfg.batch_size}, AdamW lr {cfg.lr} (warm-up {cfg.warmup}, \
linear decay over
  the last 20% of {cfg.steps} planned steps), grad-norm clip 1, EMA {cfg.ema_decay} from step {cfg.warmup};
  shipped: the **{'EMA' if weights == 'ema' else 'raw (non-EMA)'}** weights.
{('- History: ' + cfg.notes) if cfg.notes else ''}
- Final training loss ({cfg.prediction_type} target MSE, mean of the last 20 logged values):
  {summary['final_loss']:.4f}; {summary['sec_per_step']:.2f} s/step (median over the last leg's log; each \
leg's
  hardware, threads and precision are in the History).
- Held-out diffusion loss (eps-MSE on the {n_held} held-out images, 8 stratified timesteps each, fixed
  noise; a v-network's eps-hat is derived from its v-hat): raw weights {held_loss['raw']:.4f},
  EMA {held_loss['ema']:.4f}.

## High-noise check
MSE (model units, [-1, 1]) of x0-hat, clipped as the sampler clips it, on the held-out images at the
highest-noise timesteps, against predicting the training images' mean image
(MSE {next(iter(high_noise.values()))['mean_image_mse']:.3f}), the best estimate as abar -> 0. Where x0-hat
is worse than the mean, DDPM sampling starts from wrong colours: the epsilon-trained weights of step 15652
scored 1.60 / 1.28 / 0.38 / 0.20 / 0.10 at these five timesteps, and most of their samples were
frame-filling saturated colour tiles.

| t | abar_t | x0-hat MSE |
|---|---|---|
{hn_rows}

## Samples
64 unconditional samples, seed 0, not selected, from the same starting noise: DDPM ancestral sampling
(the shipped `DDPMScheduler`, as `DDPMPipeline` runs it) with {PIXEL_CARD_DDPM_STEPS} steps: `samples.png`;
deterministic DDIM (eta 0) with {PIXEL_CARD_DDIM_STEPS} steps: `samples-ddim{PIXEL_CARD_DDIM_STEPS}.png`.

## Denoising (Tweedie x0 at the matching timestep) on the {n_held} held-out 32x32 images
PSNR in dB, Gaussian noise of the given sigma in [0,1] units, noise seed 0; each scikit-image baseline at
its best parameter on these same images.

| sigma | this prior | Gaussian filter | TV (Chambolle) | wavelet (BayesShrink) | margin over best |
|---|---|---|---|---|---|
{rows}

## Licence
{LICENCE}
"""


def _latent_held_out_losses(cfg, pipe, clean: Tensor, captions: list[str]) -> dict[str, float]:
    """The text/UNet held-out loss of the run's raw and EMA weights (``pipe`` gives the VAE and tokenizer)."""
    held_loss = {}
    unet_dir = Path(cfg.run_dir) / "unet"
    for w, prefix in (("raw", ""), ("ema", "ema_")):
        text = load_weights(build_text_encoder(cfg, pipe.tokenizer), unet_dir, f"{prefix}text").eval()
        unet = load_weights(build_cond_unet(cfg), unet_dir, f"{prefix}unet")
        held_loss[w] = latent_held_out_loss(pipe.vae, text, pipe.tokenizer, unet, pipe.scheduler, clean,
                                            captions)
    return held_loss


def _latent_measurements(cfg, pipe, prompts: list[str], weights: str, previous_vae: dict | None) -> dict:
    """card.json's numbers: both stages' runs, sizes, VAE fidelity and held-out losses on the examples."""
    clean, held_captions = load_examples(cfg.size)
    vae_psnr = vae_reconstruction_psnr(pipe.vae, clean)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    summary = {
        "vae": _run_summary(Path(cfg.run_dir) / "vae"),  # replaced below when the VAE stage did not run here
        "unet": _run_summary(Path(cfg.run_dir) / "unet"),
        "params": {"vae": count(pipe.vae), "text_encoder": count(pipe.text_encoder),
                   "unet": count(pipe.unet)},
        "vocab_size": len(pipe.tokenizer),
        "vae_held_out_psnr": {"mean": float(np.mean(vae_psnr)), "min": float(np.min(vae_psnr)),
                              "n": len(vae_psnr)},
        "held_out_loss": _latent_held_out_losses(cfg, pipe, clean, held_captions),
        "sample_prompts": prompts,
        "prompt_template": "{}",  # trained on bare captions: what personalization and its eval should use
        "weights": weights,
        "notes": cfg.notes,
    }
    if (summary["vae"]["final_loss"] is None and previous_vae is not None
            and previous_vae["steps"] == summary["vae"]["steps"]):
        summary["vae"] = previous_vae
    return summary


def write_latent_card(cfg, folder, docs_dir: str = "docs", command: str = "", weights: str = "ema") -> dict:
    """Export the latent set to ``folder`` with a model card, a text-to-image grid and VAE numbers."""
    folder = Path(folder)
    # a warm-started run skips the VAE stage: its numbers come from the card it started from
    previous_vae = None
    if cfg.init_from:
        previous_vae = json.loads((init_folder(cfg) / "card.json").read_text()).get("vae")
    export_latent(cfg, folder, weights)
    write_training_config(cfg, folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    _, captions = load_training_images(cfg.data, cfg.size)
    prompts = sample_captions(cfg, captions)
    grid = sd_sample(pipe, prompts, steps=20, guidance=3.0, seed=0)
    Path(docs_dir).mkdir(parents=True, exist_ok=True)
    save_grid(grid, Path(docs_dir) / "emoji-sd-samples.png", nrow=4)
    save_grid(grid, folder / "samples.png", nrow=4)
    summary = _latent_measurements(cfg, pipe, prompts, weights, previous_vae)
    (folder / "card.json").write_text(json.dumps(summary, indent=1, default=float))
    (folder / "README.md").write_text(_latent_readme(cfg, summary, pipe.vae.config.scaling_factor, command,
                                                     weights))
    return summary


def _latent_readme(cfg, summary: dict, scaling_factor: float, command: str, weights: str) -> str:
    prompt_list = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(summary["sample_prompts"]))
    v, u, n = summary["vae"], summary["unet"], summary["params"]
    held_loss, n_held = summary["held_out_loss"], summary["vae_held_out_psnr"]["n"]
    commands = command or "studio data emoji && studio train latent --export models/weights/emoji-sd"
    return f"""# emoji-sd: a tiny Stable-Diffusion-style text-to-image model for 64x64 emoji

A `StableDiffusionPipeline` folder (safetensors only): \
`AutoencoderKL` (f=4, {cfg.latent_channels} latent channels,
{n['vae'] / 1e6:.2f} M), \
`CLIPTextModel` (hidden {cfg.text_hidden_size}, {cfg.text_layers} layers, {n['text_encoder'] / 1e6:.2f} M),
a `CLIPTokenizer` with CLIP's byte-level layout \
({summary['vocab_size']} tokens: all 256 bytes, their end-of-word forms,
merges learned from the captions, start/end tokens; no prompt collapses to unknown tokens),
`UNet2DConditionModel` on 16x16 latents ({n['unet'] / 1e6:.2f} M), `DDIMScheduler` (SD's scaled-linear betas).
Load with `StableDiffusionPipeline.from_pretrained(<this folder>)` or by the registered name `emoji-sd`.

## Training
- Data: 64x64 emoji with CLDR captions from `studio data emoji` (training split only).
- Command: `{commands}` (resumable).
- Stage 1, VAE: {v['steps']} steps of batch {cfg.vae_batch_size}, \
L1 + MSE + {cfg.kl_weight} KL, AdamW {cfg.vae_lr}
  (warm-up {cfg.warmup} steps, \
linear decay to 10% over the last {cfg.vae_decay_fraction:.0%} of {cfg.vae_steps});
  final loss {v['final_loss']:.4f}; shipped: its {'EMA' if cfg.vae_use_ema else 'raw'} weights.
  Latent scaling factor {scaling_factor:.4f} (1 / latent std).
- Stage 2, text encoder + UNet trained together from scratch on the frozen VAE's latents: {u['steps']} of
  {cfg.unet_steps} planned steps of batch {cfg.unet_batch_size}, AdamW {cfg.unet_lr}, caption dropout
  {cfg.caption_dropout} (for classifier-free guidance), EMA {cfg.ema_decay}; final loss {u['final_loss']:.4f};
  shipped: the **{'EMA' if weights == 'ema' else 'raw (non-EMA)'}** weights.
{('- History: ' + cfg.notes) if cfg.notes else ''}

## Quality
- Held-out diffusion loss (the text/UNet training objective on the {n_held} held-out images with their own
  captions, 8 stratified timesteps each, fixed noise): raw weights {held_loss['raw']:.4f}, EMA \
{held_loss['ema']:.4f}.
- VAE reconstruction of the {n_held} held-out 64x64 images: mean PSNR \
{summary['vae_held_out_psnr']['mean']:.2f} dB,
  worst {summary['vae_held_out_psnr']['min']:.2f} dB.
- `samples.png`: one sample per prompt, 20 DDIM steps, guidance 3.0, seed 0, not selected; prompts (held-in
  captions fixed by the training seed), row by row:

{prompt_list}

## Licence
{LICENCE}
"""
