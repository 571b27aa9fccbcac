"""Random-weight replicas of the models users bring, at their real configurations, built from configs in
this file and never downloaded: what the real-size benchmark (``studio bench-real-size``) and the
bring-your-own-model tests run on.

* ``adm-ffhq-256``: the guided-diffusion FFHQ-256 UNet of DPS/MCG/DDRM (``models.adm`` layout, learned
  variance, 1000 linear-β steps) as a ``DDPMPipeline``;
* ``sd-1.5``: the Stable Diffusion 1.5 UNet (860 M), VAE f=8 (84 M), CLIP ViT-L/14 text encoder (123 M)
  with the **real** CLIP BPE vocabulary and PNDM schedule, as a ``StableDiffusionPipeline`` at 512²;
* ``sd-2.1-768``: SD 2.x with the OpenCLIP ViT-H text encoder (23 layers), per-block head dims (5,10,20,20),
  linear projections and v-prediction, at 768².

The vocabulary is the one CLIP was trained with, read from the ``open-clip-torch`` wheel
(``bpe_simple_vocab_16e6.txt.gz``, installed by setup.sh without its dependencies) and turned into the
``vocab.json`` / ``merges.txt`` that ``CLIPTokenizer`` reads: ids are those of the real models ("a photo of
a cat" → 49406 320 1125 539 320 2368 49407). The weights are random: these replicas measure time, memory
and code paths, never quality.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import torch

from studio.core import paths
from studio.core.errors import ModelLoadError

REPLICAS = ("adm-ffhq-256", "sd-1.5", "sd-2.1-768")

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True, upcast_attention=True)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
OPENCLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, hidden_act="gelu", projection_dim=512, pad_token_id=0)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear")


def clip_bpe_path() -> Path:
    """CLIP's BPE merges file from the installed ``open-clip-torch`` wheel (located, never imported: its
    ``__init__`` needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelLoadError("the CLIP vocabulary comes from the open-clip-torch wheel: "
                             "pip install --no-deps open-clip-torch==3.3.0 (setup.sh does)")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's / GPT-2's reversible byte → printable-character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def clip_tokenizer_files(folder: Path | None = None) -> Path:
    """``vocab.json`` + ``merges.txt`` of the real CLIP tokenizer (49408 ids) in ``folder`` (default a cache
    folder), built as CLIP's own ``SimpleTokenizer`` builds its table: the 256 byte symbols, the same with
    ``</w>``, one entry per merge (the first 48894 lines), then the two special tokens."""
    folder = Path(folder or paths.cache_dir() / "clip-tokenizer")
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    return folder


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer (SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``!``)."""
    from transformers import CLIPTokenizer  # lazy: transformers is heavy and only the replicas need it here

    folder = clip_tokenizer_files()
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def adm_ffhq_256(seed: int = 0):
    """DPS/MCG's FFHQ-256 guided-diffusion UNet (learned variance) as a ``DDPMPipeline``, random weights."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # lazy: heavy, replicas only

    from models.adm import unet_config  # lazy: the ADM layouts live beside their converter

    torch.manual_seed(seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range",
                              clip_sample=True)
    return DDPMPipeline(unet=UNet2DModel(**unet_config("ffhq-256")), scheduler=scheduler)


def stable_diffusion(version: str = "sd-1.5", seed: int = 0):
    """A ``StableDiffusionPipeline`` with the real configuration of SD 1.5 or SD 2.1-768, random weights."""
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler,  # lazy: heavy, replicas only
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel  # lazy: as above

    if version not in ("sd-1.5", "sd-2.1-768"):
        raise ModelLoadError(f"unknown Stable Diffusion replica {version!r} (sd-1.5, sd-2.1-768)")
    v2 = version == "sd-2.1-768"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(SD21_UNET if v2 else SD15_UNET))
    vae = AutoencoderKL(**SD_VAE, sample_size=768 if v2 else 512)
    text_encoder = CLIPTextModel(CLIPTextConfig(**(OPENCLIP_H if v2 else CLIP_L)))
    scheduler = (DDIMScheduler(**SD_SCHEDULE, prediction_type="v_prediction", clip_sample=False,
                               set_alpha_to_one=False, steps_offset=1) if v2
                 else PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer("!" if v2 else
                                   "<|endoftext|>"), unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def build_replica(name: str, seed: int = 0):
    """The replica ``name`` (one of :data:`REPLICAS`) as a diffusers pipeline, on the CPU in float32."""
    if name == "adm-ffhq-256":
        return adm_ffhq_256(seed)
    if name in ("sd-1.5", "sd-2.1-768"):
        return stable_diffusion(name, seed)
    raise ModelLoadError(f"unknown replica {name!r} (replicas: {', '.join(REPLICAS)})")


def replica_folder(name: str, root: str | Path, seed: int = 0) -> Path:
    """The replica saved once as a diffusers folder (safetensors) under ``root``; later calls reuse it, so
    a benchmark loads it the way a user's folder is loaded. Written to a temporary folder, then renamed."""
    folder = Path(root) / name
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    build_replica(name, seed).save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder
