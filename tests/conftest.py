"""Shared fixtures: tiny random diffusers models built in the test (no downloads), seeded RNG."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(min(2, torch.get_num_threads()))


def build_tiny_pixel_pipeline(sample_size: int = 16, prediction_type: str = "epsilon", seed: int = 0):
    """A random 2-level UNet2DModel + DDPMScheduler pipeline (a few thousand parameters)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    return DDPMPipeline(unet=unet, scheduler=scheduler)


@pytest.fixture(scope="session")
def tiny_pixel_model_dir(tmp_path_factory) -> str:
    """A tiny random pixel pipeline saved as a diffusers folder (safetensors)."""
    path = tmp_path_factory.mktemp("tiny_pixel")
    build_tiny_pixel_pipeline().save_pretrained(path, safe_serialization=True)
    return str(path)


def build_tiny_sd_pipeline(seed: int = 0):
    """A random tiny Stable-Diffusion-style pipeline (VAE f=4, 1-layer CLIP text encoder, small UNet)."""
    from studio.training.tokenizer import build_clip_tokenizer
    from studio.training.latent import (LatentTrainConfig, build_cond_unet, build_latent_scheduler,
                                        build_text_encoder, build_vae)
    from studio.training.sampling import assemble_sd_pipeline

    cfg = LatentTrainConfig(vae_block_out_channels=(8, 16, 16), unet_block_out_channels=(32, 32, 32),
                            text_hidden_size=32, text_layers=1)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(["grinning face", "red heart"] * 2, num_merges=30)
    return assemble_sd_pipeline(build_vae(cfg), build_text_encoder(cfg, tokenizer), tokenizer,
                                build_cond_unet(cfg), build_latent_scheduler(cfg))


@pytest.fixture(scope="session")
def tiny_sd_model_dir(tmp_path_factory) -> str:
    """A tiny random SD-style pipeline saved as a diffusers folder (safetensors), tokenizer files included."""
    from studio.training.tokenizer import save_clip_tokenizer

    from models.diffusers_prior import MODULE_BUILD_LOCK

    path = tmp_path_factory.mktemp("tiny_sd")
    with MODULE_BUILD_LOCK:  # a browser test's app may be loading a model in its own thread meanwhile
        pipe = build_tiny_sd_pipeline()
    pipe.save_pretrained(path, safe_serialization=True)
    save_clip_tokenizer(pipe.tokenizer, path / "tokenizer")
    return str(path)


def build_tiny_sd3_pipeline(seed: int = 0):
    """A random tiny Stable-Diffusion-3-style pipeline: SD3 transformer (patch 2), VAE f=4 with a shift
    factor, two 2-layer CLIP text encoders with projections, no T5 (optional in SD3), flow-matching
    scheduler with SD3's shift 3."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from studio.training.tokenizer import build_clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(["grinning face", "red heart"] * 2, num_merges=30)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, projection_dim=32, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))

    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=1, attention_head_dim=8, num_attention_heads=4,
                                        joint_attention_dim=64, caption_projection_dim=32,
                                        pooled_projection_dim=64)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5035, sample_size=64)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(),
                                    tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)


@pytest.fixture(scope="session")
def tiny_sd3_model_dir(tmp_path_factory) -> str:
    """The tiny SD3-style pipeline saved as a diffusers folder (safetensors), tokenizer files included."""
    from studio.training.tokenizer import save_clip_tokenizer

    from models.diffusers_prior import MODULE_BUILD_LOCK

    path = tmp_path_factory.mktemp("tiny_sd3")
    with MODULE_BUILD_LOCK:
        pipe = build_tiny_sd3_pipeline()
    pipe.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        save_clip_tokenizer(getattr(pipe, name), path / name)
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def app_model_dirs(tmp_path_factory):
    """The web app loads model folders only inside its allowed folders (``STUDIO_MODEL_DIRS`` when no
    ``--model-dir`` is given); the tests save their tiny models under pytest's base temp folder, so an app
    built by a test with no arguments allows that folder (tests of the allow-list itself pass their own)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_MODEL_DIRS", str(tmp_path_factory.getbasetemp()))
        yield


@pytest.fixture()
def tiny_dataset(tmp_path) -> str:
    """A 12-image random emoji dataset (32 and 64 px; the last 3 held out) saved as the trainers read it."""
    import numpy as np

    from studio.training import emoji_data

    g = np.random.default_rng(0)
    n = 12
    ds = emoji_data.EmojiDataset(
        images={32: g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                64: g.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)},
        captions=[f"thing number {i}" for i in range(n)], sequences=[chr(0x1F600 + i) for i in range(n)],
        concepts=[chr(0x1F600 + i) for i in range(n)], held_out=np.arange(n) >= 9)
    return str(emoji_data.save_dataset(ds, tmp_path / "data"))


@pytest.fixture()
def concept_images(tmp_path):
    """A folder of 4 random 64x64 PNGs: the images of a concept to learn (textual inversion and its kin)."""
    from studio.core.io import save_image

    folder = tmp_path / "concept"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        save_image(torch.rand(1, 3, 64, 64, generator=g), folder / f"{i}.png")
    return folder
