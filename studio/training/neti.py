"""NeTI training and generation pieces (the mapper itself is :mod:`models.neti`).

Training is textual inversion's loop (:mod:`studio.training.textual_inversion`, option ``neti``) with
the mapper's weights as the only trainable tensors, as in the official code: the UNet, VAE and text
encoder (its token table included) stay frozen; the placeholder token is added with the initializer
word's row, which the mapper's output replaces in every prompt. Per step each sample's timestep goes to
both the UNet and the mapper; nested dropout is drawn from the step's own generator, so a resumed run
takes the same draws. Official defaults (AdamW over the mapper, lr 1e-3 scaled by batch × accumulation
× GPUs, 1000 steps, batch 8) are not forced: the run takes the shared options. CoRe's terms combine with it
(option ``core``; see :mod:`studio.training.core`); Cross-Init and XTI do not (they shape the rows NeTI
replaces).

File (``learned_embeds.safetensors``, nothing pickled):

* ``{placeholder}``: (1, D), the placeholder's input row (registers the token, as the official
  ``learned_embeds``);
* ``neti.<name>``: the mapper's weights, its Fourier matrix ``neti.fourier`` included;
* metadata ``{"format": "pt", "method": "neti", "neti_config": <NetiConfig as JSON>}``.

No diffusers or A1111 format exists for a mapper; diffusers' loader is refused it in one line
(:func:`~studio.training.textual_inversion.load_into`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from models.neti import NETI_METHOD, NetiMapper, check_layers, mapper_tensors, neti_conditioning
from studio.core.errors import StudioError
from studio.training.loop import load_checkpoint, save_checkpoint
from studio.training.xti import encode_prompts, prompt_ids

Tensor = torch.Tensor


def unwrapped(mapper) -> NetiMapper:
    return getattr(mapper, "module", mapper)


def save_neti_file(path: Path, placeholder: str, row: Tensor, mapper) -> Path:
    """The concept's file (schema above); written atomically."""
    mapper = unwrapped(mapper)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {placeholder: row.detach().float().cpu().reshape(1, -1).contiguous()}
    tensors.update(mapper_tensors(mapper))
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "method": NETI_METHOD,
                                           "neti_config": mapper.config.to_json()})
    tmp.replace(path)
    return path


class MapperCheckpoint:
    """Resumable state of a NeTI run: the mapper, its AdamW state, the step and the loss history."""

    def __init__(self, folder: Path):
        self.path = folder / "checkpoint.safetensors"

    def save(self, mapper, opt: torch.optim.Optimizer, step: int, history: list) -> None:
        save_checkpoint(self.path, {"mapper": unwrapped(mapper)}, opt, step, {"history": history})

    def load(self, mapper, opt: torch.optim.Optimizer) -> tuple[int, list]:
        try:
            step, extra = load_checkpoint(self.path, {"mapper": unwrapped(mapper)}, opt)
        except (KeyError, RuntimeError, ValueError) as err:
            raise StudioError(f"{self.path} is not a NeTI checkpoint of this run's settings "
                              f"({type(err).__name__}); start in a new output folder or without resume") \
                from None
        return step, extra.get("history", [])


def token_id(tokenizer, token: str, ids: Tensor) -> int:
    """The id of the NeTI token, refused when no prompt names it."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if not (ids == tid).any(dim=1).all():
        raise StudioError(f"every prompt must name the NeTI token {token!r}")
    return tid


@torch.no_grad()
def sample_neti(pipe, prompt: str, token: str, mapper: NetiMapper, *, n: int, steps: int, guidance: float,
                generator: torch.Generator, negative_prompt: str = "", size: int | None = None,
                truncation: int | None = None) -> Tensor:
    """``n`` samples of ``pipe`` (a StableDiffusionPipeline) for ``prompt``, in which ``token``'s embedding
    comes from ``mapper`` at every sampler step and layer (``truncation``: keep the first k dims of its
    hidden vector; None: all); (n, 3, H, W) in [0, 1]. The pipeline's own sampler runs; the negative prompt
    is encoded as usual (no mapper, no bypass), as in the official code."""
    check_layers(mapper, pipe.unet, repr(token), pipe.text_encoder)
    ids = prompt_ids(pipe.tokenizer, [prompt] * n)
    tid = token_id(pipe.tokenizer, token, ids)
    device = pipe.unet.device
    mapper = mapper.to(device).eval()
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    plain = encode_prompts(pipe, [prompt] * n)  # the context the processors replace: its shape matters
    with neti_conditioning(pipe.unet, pipe.text_encoder, mapper, ids.to(device), tid, truncation):
        out = pipe(prompt_embeds=plain, negative_prompt=[negative_prompt] * n, num_inference_steps=steps,
                   guidance_scale=guidance, generator=generator, height=size, width=size, output_type="pt")
    return out.images.float().cpu().clamp(0, 1)


__all__ = ["MapperCheckpoint", "prompt_ids", "sample_neti", "save_neti_file", "token_id", "unwrapped"]
