"""Guided-diffusion (ADM) checkpoints → diffusers ``DDPMPipeline`` folders (``studio convert adm``).

The DPS / MCG / DDRM / DiffPIR papers sample with OpenAI's guided-diffusion UNet ("ADM", Dhariwal & Nichol
2021): ``ffhq_10m.pt`` (FFHQ 256) and ``256x256_diffusion_uncond.pt`` (ImageNet 256, unconditional). Both are
plain ``state_dict``s; this module reads them without unpickling code (``torch.load(weights_only=True)``),
renames every weight to diffusers' ``UNet2DModel`` and writes a ``DDPMPipeline`` folder that
``studio restore --model FOLDER`` and ``DDPMPipeline.from_pretrained`` load.

The network, block by block (ADM module → diffusers module; checked numerically against DeepInverse's
``DiffUNet``, which ships the same code, in ``tests/test_convert_adm.py``):

* ``time_embed.{0,2}`` (sinusoid [cos, sin], frequencies 10000^(-i/half)) → ``time_embedding.linear_{1,2}``
  (``Timesteps(flip_sin_to_cos=True, freq_shift=0)`` gives the same sinusoid);
* ``input_blocks.0.0`` → ``conv_in``; per level, ``num_res_blocks`` ResBlocks (+ an attention block at the
  attention resolutions) → ``down_blocks.L.resnets.j`` / ``.attentions.j``, then the downsampling ResBlock
  (average pool inside, ``resblock_updown``) → ``down_blocks.L.downsamplers.0``;
* ``middle_block.{0,1,2}`` → ``mid_block.resnets.0``, ``mid_block.attentions.0``, ``mid_block.resnets.1``;
* ``output_blocks`` (``num_res_blocks + 1`` per level, each after concatenating one skip) →
  ``up_blocks.i.resnets.j`` / ``.attentions.j``, the last of a level with its upsampling ResBlock →
  ``up_blocks.i.upsamplers.0``;
* ``out.0`` / ``out.2`` → ``conv_norm_out`` / ``conv_out`` (6 channels: ε, then the variance interpolation v).

Inside a ResBlock: ``in_layers.0`` → ``norm1``, ``in_layers.2`` → ``conv1``, ``emb_layers.1`` →
``time_emb_proj`` (scale and shift, ``resnet_time_scale_shift="scale_shift"``), ``out_layers.0`` → ``norm2``,
``out_layers.3`` → ``conv2``, ``skip_connection`` (1x1, only where the channel count changes) →
``conv_shortcut``. Inside an attention block: ``norm`` → ``group_norm``; ``qkv`` (a 1x1 conv1d, legacy order:
per head, ``head_dim`` rows of q, then of k, then of v) → ``to_q`` / ``to_k`` / ``to_v`` (Linear);
``proj_out`` → ``to_out.0``. Nothing else changes: the values are the original ones, cast to float32.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.core.errors import ModelLoadError, StudioError


@dataclass(frozen=True)
class AdmLayout:
    """One guided-diffusion ``create_model`` configuration (the flags of its ``model_config``)."""

    description: str
    num_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]  # in pixels at image_size ("16" → attention at 16x16)
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    image_size: int = 256
    num_head_channels: int = 64
    in_channels: int = 3
    out_channels: int = 6  # learn_sigma: ε then the variance interpolation v

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def has_attention(self, level: int) -> bool:
        """Whether the blocks at ``level`` (resolution image_size / 2^level) carry attention."""
        return self.image_size // 2**level in self.attention_resolutions

    def summary(self) -> str:
        return (f"num_channels {self.num_channels}, num_res_blocks {self.num_res_blocks}, channel_mult "
                f"{self.channel_mult}, attention at {', '.join(map(str, self.attention_resolutions))} px, "
                f"{self.num_head_channels} channels per head, learned variance ({self.out_channels} output "
                "channels), scale-shift norm, resblock up/down, legacy QKV attention order")


#: the supported checkpoints (guided-diffusion flags; both: use_scale_shift_norm, resblock_updown,
#: learn_sigma, use_new_attention_order False, dropout 0 at inference, 1000 linear-β steps)
LAYOUTS: dict[str, AdmLayout] = {
    "ffhq-256": AdmLayout("FFHQ 256 (ffhq_10m.pt, the DPS / MCG / DiffPIR checkpoint)",
                          num_channels=128, num_res_blocks=1, attention_resolutions=(16,)),
    "imagenet-256-uncond": AdmLayout("ImageNet 256 unconditional (OpenAI's 256x256_diffusion_uncond.pt)",
                                     num_channels=256, num_res_blocks=2, attention_resolutions=(32, 16, 8)),
}

#: ResBlock sub-module → ResnetBlock2D sub-module (``skip_connection`` exists only where channels change)
RESNET_PARTS = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))

#: buffers DeepInverse's ``DiffUNet`` adds to its state dict (its noise schedule), not network weights
DEEPINV_SCHEDULE_BUFFERS = ("sqrt_alphas_cumprod", "sqrt_1m_alphas_cumprod")


def _layout(layout: str) -> AdmLayout:
    if layout not in LAYOUTS:
        raise StudioError(f"unknown ADM layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def unet_config(layout: str) -> dict:
    """The diffusers ``UNet2DModel(**config)`` that is the ADM network of ``layout`` (random weights until
    :func:`convert_state_dict`'s are loaded). Levels with attention are ``AttnDownBlock2D`` /
    ``AttnUpBlock2D``, the others ``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D``; up/down-sampling
    is a ResBlock (``*_type="resnet"``), the mid block's attention gets its group norm
    (``attn_norm_num_groups``), heads are 64 channels wide."""
    spec = _layout(layout)
    down = tuple("AttnDownBlock2D" if spec.has_attention(level) else "ResnetDownsampleBlock2D"
                 for level in range(spec.levels))
    up = tuple("AttnUpBlock2D" if spec.has_attention(level) else "ResnetUpsampleBlock2D"
               for level in reversed(range(spec.levels)))
    return dict(
        sample_size=spec.image_size, in_channels=spec.in_channels, out_channels=spec.out_channels,
        center_input_sample=False, time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
        down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2D",
        block_out_channels=tuple(spec.num_channels * m for m in spec.channel_mult),
        layers_per_block=spec.num_res_blocks, mid_block_scale_factor=1, downsample_type="resnet",
        upsample_type="resnet", dropout=0.0, act_fn="silu", attention_head_dim=spec.num_head_channels,
        norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5, resnet_time_scale_shift="scale_shift",
        add_attention=True,
    )


def module_pairs(layout: str) -> list[tuple[str, str, str]]:
    """(ADM module, diffusers module, kind) for every module with weights, in network order; kind is
    ``plain`` (weight/bias copied), ``resnet`` (:data:`RESNET_PARTS`) or ``attention`` (qkv split)."""
    spec = _layout(layout)
    return [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
        ("input_blocks.0.0", "conv_in", "plain"),
        *_down_pairs(spec),
        ("middle_block.0", "mid_block.resnets.0", "resnet"),
        ("middle_block.1", "mid_block.attentions.0", "attention"),
        ("middle_block.2", "mid_block.resnets.1", "resnet"),
        *_up_pairs(spec),
        ("out.0", "conv_norm_out", "plain"),
        ("out.2", "conv_out", "plain"),
    ]


def _down_pairs(spec: AdmLayout) -> list[tuple[str, str, str]]:
    """``input_blocks.1..`` → ``down_blocks``: per level its ResBlocks (and attentions), then the
    downsampling ResBlock, one input block each."""
    pairs, block = [], 1
    for level in range(spec.levels):
        for j in range(spec.num_res_blocks):
            pairs.append((f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if spec.has_attention(level):
                pairs.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", "attention"))
            block += 1
        if level < spec.levels - 1:
            pairs.append((f"input_blocks.{block}.0", f"down_blocks.{level}.downsamplers.0", "resnet"))
            block += 1
    return pairs


def _up_pairs(spec: AdmLayout) -> list[tuple[str, str, str]]:
    """``output_blocks`` → ``up_blocks`` (deepest level first): ``num_res_blocks + 1`` blocks per level, each
    a ResBlock (after its skip concatenation), its attention, and on a level's last block the upsampling
    ResBlock (sub-index 1, or 2 after an attention)."""
    pairs, block = [], 0
    for i, level in enumerate(reversed(range(spec.levels))):
        for j in range(spec.num_res_blocks + 1):
            pairs.append((f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            sub = 1
            if spec.has_attention(level):
                pairs.append((f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}", "attention"))
                sub = 2
            if level > 0 and j == spec.num_res_blocks:
                pairs.append((f"output_blocks.{block}.{sub}", f"up_blocks.{i}.upsamplers.0", "resnet"))
            block += 1
    return pairs


class _Source:
    """The ADM state dict being consumed: :meth:`take` hands each key out once and records misses."""

    def __init__(self, state_dict: dict):
        self.tensors = state_dict
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.problems: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str):
        if key not in self.tensors:
            self.missing.append(key)
            return None
        if key in self.used:
            self.problems.append(f"{key} used twice")
        self.used.add(key)
        return self.tensors[key]

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def _copy(src: _Source, adm: str, target: str, out: dict) -> None:
    """``adm.weight/bias`` → ``target.weight/bias`` as they are (convs, linears, group norms)."""
    for name in ("weight", "bias"):
        value = src.take(f"{adm}.{name}")
        if value is not None:
            out[f"{target}.{name}"] = value


def _convert_resnet(src: _Source, adm: str, target: str, out: dict, spec: AdmLayout) -> None:
    """ResBlock → ResnetBlock2D by :data:`RESNET_PARTS`; the 1x1 skip conv only where the checkpoint has
    one (a channel change), otherwise the skip is the identity in both."""
    for adm_part, target_part in RESNET_PARTS:
        if adm_part == "skip_connection" and not src.has(f"{adm}.skip_connection.weight"):
            continue
        _copy(src, f"{adm}.{adm_part}", f"{target}.{target_part}", out)


def _convert_attention(src: _Source, adm: str, target: str, out: dict, spec: AdmLayout) -> None:
    """AttentionBlock (legacy QKV order) → diffusers ``Attention``: the qkv conv1d weight (3C, C, 1) holds,
    per head h, rows [q_h; k_h; v_h] of head_dim rows each, so reshaping it to (heads, 3, head_dim, C) and
    taking [:, 0], [:, 1], [:, 2] gives to_q, to_k, to_v (heads in order, as diffusers splits them);
    ``proj_out`` (C, C, 1) → ``to_out.0`` (C, C); ``norm`` → ``group_norm``."""
    _copy(src, f"{adm}.norm", f"{target}.group_norm", out)
    weight, bias = src.take(f"{adm}.qkv.weight"), src.take(f"{adm}.qkv.bias")
    if weight is not None and bias is not None:
        channels, head = weight.shape[1] if weight.dim() == 3 else 0, spec.num_head_channels
        if weight.shape != (3 * channels, channels, 1) or channels % head or bias.shape != (3 * channels,):
            src.problems.append(f"{adm}.qkv has shape {tuple(weight.shape)}")
        else:
            heads = channels // head
            weight, bias = weight.reshape(heads, 3, head, channels), bias.reshape(heads, 3, head)
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                out[f"{target}.{name}.weight"] = weight[:, i].reshape(channels, channels).contiguous()
                out[f"{target}.{name}.bias"] = bias[:, i].reshape(channels).contiguous()
    proj_w, proj_b = src.take(f"{adm}.proj_out.weight"), src.take(f"{adm}.proj_out.bias")
    if proj_w is not None and proj_b is not None:
        out[f"{target}.to_out.0.weight"] = proj_w[..., 0] if proj_w.dim() == 3 else proj_w  # (C, C, 1)
        out[f"{target}.to_out.0.bias"] = proj_b


_CONVERTERS = {
    "plain": lambda src, adm, target, out, spec: _copy(src, adm, target, out),
    "resnet": _convert_resnet,
    "attention": _convert_attention,
}


def target_shapes(layout: str) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``UNet2DModel(**unet_config(layout))`` with its shape (built on the meta device:
    no memory, no initialisation)."""
    from diffusers import UNet2DModel  # lazy: diffusers takes seconds to import; keeps models/ light

    with torch.device("meta"):
        unet = UNet2DModel(**unet_config(layout))
    return {name: tuple(t.shape) for name, t in unet.state_dict().items()}


def _listed(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_state_dict(adm_state_dict: dict, layout: str) -> dict[str, torch.Tensor]:
    """The diffusers ``UNet2DModel`` state dict of an ADM state dict (module docstring: what maps to what).
    Every ADM key is used exactly once and every diffusers key filled with a tensor of its shape, or a
    one-line :class:`ModelLoadError` names the missing / unexpected / mis-shaped keys. DeepInverse's schedule
    buffers (:data:`DEEPINV_SCHEDULE_BUFFERS`) are dropped; floating tensors are cast to float32."""
    spec = _layout(layout)
    src = _Source({k: (v.float() if v.is_floating_point() else v) for k, v in adm_state_dict.items()
                   if k not in DEEPINV_SCHEDULE_BUFFERS})
    out: dict[str, torch.Tensor] = {}
    for adm, target, kind in module_pairs(layout):
        _CONVERTERS[kind](src, adm, target, out, spec)
    expected = target_shapes(layout)
    problems = list(src.problems)
    if src.missing:
        problems.append(f"missing in the checkpoint: {_listed(src.missing)}")
    if src.unused():
        problems.append(f"unexpected in the checkpoint: {_listed(src.unused())}")
    unfilled = sorted(set(expected) - set(out))
    if unfilled:
        problems.append(f"diffusers keys left unfilled: {_listed(unfilled)}")
    shapes = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in out.items()
              if k in expected and tuple(v.shape) != expected[k]]
    if shapes:
        problems.append(f"wrong shapes: {_listed(shapes)}")
    unknown = sorted(set(out) - set(expected))  # a mapping bug, never the checkpoint's fault
    if unknown:
        problems.append(f"mapped to keys the UNet does not have: {_listed(unknown)}")
    if problems:
        raise ModelLoadError(f"checkpoint does not match the ADM layout {layout!r}: " + "; ".join(problems))
    return out


def _found_signature(state_dict: dict) -> dict:
    """What identifies a layout, read from the keys and shapes of an ADM state dict."""
    conv_in = state_dict["input_blocks.0.0.weight"]
    if conv_in.dim() != 4:
        raise ModelLoadError(f"not a guided-diffusion (ADM) checkpoint: input_blocks.0.0.weight has shape "
                             f"{tuple(conv_in.shape)}, not that of a 2-D convolution")

    def blocks(prefix: str) -> int:
        indices = [k.split(".")[1] for k in state_dict if k.startswith(prefix + ".")]
        return 1 + max((int(i) for i in indices if i.isdigit()), default=-1)

    n_in = blocks("input_blocks")
    out_conv = state_dict.get("out.2.weight")
    return {
        "num_channels": int(conv_in.shape[0]), "in_channels": int(conv_in.shape[1]),
        "input_blocks": n_in, "output_blocks": blocks("output_blocks"),
        "attention_input_blocks": tuple(i for i in range(n_in)
                                        if f"input_blocks.{i}.1.qkv.weight" in state_dict),
        "out_channels": int(out_conv.shape[0]) if out_conv is not None and out_conv.dim() else None,
    }


def _expected_signature(layout: str) -> dict:
    """:func:`_found_signature` of a checkpoint of ``layout``, from :func:`module_pairs`."""
    spec = _layout(layout)
    pairs = module_pairs(layout)
    ins = {int(a.split(".")[1]) for a, _, _ in pairs if a.startswith("input_blocks.")}
    outs = {int(a.split(".")[1]) for a, _, _ in pairs if a.startswith("output_blocks.")}
    attention = tuple(sorted(int(a.split(".")[1]) for a, _, kind in pairs
                             if a.startswith("input_blocks.") and kind == "attention"))
    return {"num_channels": spec.num_channels, "in_channels": spec.in_channels, "input_blocks": len(ins),
            "output_blocks": len(outs), "attention_input_blocks": attention,
            "out_channels": spec.out_channels}


def detect_layout(state_dict: dict) -> str:
    """The name in :data:`LAYOUTS` of an ADM state dict, from its keys and shapes (channel width, block
    counts, which input blocks have attention, output channels); a one-line :class:`ModelLoadError` that
    says what was found otherwise (class-conditional ADM, a DDPM-style UNet, a diffusers UNet, another
    ADM configuration)."""
    supported = ", ".join(LAYOUTS)
    if any(k.startswith("label_emb.") for k in state_dict):
        raise ModelLoadError("class-conditional ADM checkpoint (label_emb found): not supported; "
                             f"supported unconditional layouts: {supported}")
    if "input_blocks.0.0.weight" not in state_dict:
        if "time_embedding.linear_1.weight" in state_dict:
            what = "already a diffusers UNet2DModel state dict"
        elif any(k.startswith(("temb.dense.", "down.0.block.")) for k in state_dict):
            what = "a DDPM-style UNet (the SDEdit / DDRM celeba_hq layout: temb.dense, down.N.block)"
        else:
            what = f"{len(state_dict)} keys such as {_listed(sorted(state_dict), 3)}"
        raise ModelLoadError(f"not a guided-diffusion (ADM) checkpoint: {what}; not supported "
                             f"(supported: {supported})")
    found = _found_signature(state_dict)
    for name in LAYOUTS:
        if _expected_signature(name) == found:
            return name
    described = ", ".join(f"{k} {v}" for k, v in found.items())
    raise ModelLoadError(f"unknown ADM layout ({described}); not supported (supported: {supported})")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors: ``.safetensors`` through safetensors, anything else through
    ``torch.load(map_location="cpu", weights_only=True)``, which refuses pickled objects other than tensors
    and plain containers instead of running them. One-line :class:`ModelLoadError` when the file is
    unreadable or not a flat {name: tensor} state dict."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # lazy: only for .safetensors inputs

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))  # the weights-only unpickler names what it refused
        if found is None:
            raise ModelLoadError(f"cannot read '{path.name}' as a state dict: not a torch checkpoint "
                                 f"({_weights_only_reason(err)})") from None
        raise ModelLoadError(f"'{path.name}' holds pickled objects other than tensors ({found.group(1)}); "
                             "refused without loading them (a state dict saved with "
                             "torch.save(model.state_dict()) is needed)") from None
    except Exception as err:  # a truncated zip, an empty file, a corrupt safetensors header, ...
        first = (str(err).strip().splitlines() or ["empty or truncated file"])[0][:200]
        raise ModelLoadError(
            f"cannot read '{path.name}' as a state dict: {type(err).__name__}: {first}") from None
    if not isinstance(obj, dict) or not obj:
        raise ModelLoadError(f"'{path.name}' is not a state dict (it holds {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelLoadError(f"'{path.name}' is not a flat state dict: {_listed(bad)} not a named tensor")
    return obj


def _weights_only_reason(err: Exception) -> str:
    """The informative line of torch's multi-line weights-only error (not its advice to turn it off)."""
    skip = ("Weights only load failed", "Re-running", "Please file an issue", "Check the documentation",
            "changed the default value")
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    return (lines[0] if lines else type(err).__name__)[:200]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_paths(checkpoint: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Refuse a missing checkpoint, an ``out`` that is (or contains) the checkpoint, and an existing
    non-empty ``out``: the conversion never overwrites or removes anything of the user's."""
    ckpt, target = Path(checkpoint).expanduser(), Path(out).expanduser()
    if not ckpt.is_file():
        raise ModelLoadError(f"checkpoint '{checkpoint}' is not a file")
    if target.resolve() == ckpt.resolve() or target.resolve() in ckpt.resolve().parents:
        raise StudioError(f"output folder '{out}' is or contains the checkpoint; choose a new folder")
    _refuse_nonempty(target)
    return ckpt, target


def _refuse_nonempty(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise StudioError(f"output '{target}' already exists and is not an empty folder; nothing written")


def _build_pipeline(weights: dict[str, torch.Tensor], layout: str):
    """``DDPMPipeline`` of the converted UNet (built on the meta device, then given the weights with strict
    checking) and the ADM schedule: 1000 linear β 1e-4..0.02, ε prediction, learned-range variance."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # lazy: heavy; models/ imports it late

    with torch.device("meta"):
        unet = UNet2DModel(**unet_config(layout))
    try:
        unet.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise ModelLoadError(f"converted weights do not load: {str(err).splitlines()[0]}") from None
    left = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"converted UNet has uninitialised tensors: {_listed(left)}")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                              beta_end=0.02, variance_type="learned_range", prediction_type="epsilon",
                              clip_sample=True)
    return DDPMPipeline(unet=unet.eval(), scheduler=scheduler)


def model_card(source_name: str, sha256: str, layout: str, source_note: str | None = None) -> str:
    """The folder's README.md: source file, its SHA-256, the layout, and whose terms apply."""
    spec = _layout(layout)
    note = f"- Source note: {source_note}\n" if source_note else ""
    return (
        f"# Guided-diffusion {spec.description}, converted to diffusers\n\n"
        f"- Source file: `{source_name}`\n- SHA-256 of the source file: `{sha256}`\n{note}"
        f"- Layout: `{layout}` ({spec.summary()})\n"
        "- Format: diffusers `DDPMPipeline` (`UNet2DModel` in safetensors + `DDPMScheduler`: 1000 linear β "
        "from 1e-4 to 0.02, ε prediction, `variance_type=\"learned_range\"`, clip_sample)\n\n"
        "## What the conversion did\n\n"
        "This conversion is ours (diffusion-studio, `studio convert adm`, `models/adm.py`): every weight of "
        "the source file was renamed to its diffusers module and the attention `qkv` 1x1 convolutions were "
        "split into `to_q` / `to_k` / `to_v` (legacy per-head order); no value was changed (float32). The "
        "UNet returns 6 channels: ε, then the variance interpolation v (log σ² = v' log β_t + (1 − v') "
        "log β̃_t with v' = (v + 1) / 2).\n\n"
        "## Licence and terms\n\n"
        "The weights are not ours: their licence and terms of use are those of the original checkpoint "
        f"(`{source_name}` and the project that published it). Check them before using or redistributing "
        "this folder.\n\n"
        "## Use\n\n"
        "```python\nfrom diffusers import DDPMPipeline\n"
        "pipe = DDPMPipeline.from_pretrained(\"FOLDER\")\n```\n\n"
        "or `studio restore --model FOLDER ...`.\n"
    )


def _write_atomically(pipe, card: str, out: Path) -> None:
    """Save into a fresh hidden folder beside ``out`` and rename it into place, so ``out`` appears complete
    or not at all; the temporary folder is removed on any failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _refuse_nonempty(out)  # again: something may have appeared while we converted
        os.rename(tmp, out)  # replaces an empty folder on POSIX
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_adm_checkpoint(checkpoint: str | Path, out: str | Path, layout: str | None = None,
                           source_note: str | None = None) -> Path:
    """Convert a guided-diffusion ``.pt`` (or ``.safetensors``) state dict into a ``DDPMPipeline`` folder at
    ``out`` (``unet/``, ``scheduler/``, ``model_index.json``, ``README.md`` model card). ``layout`` None:
    :func:`detect_layout`. Refuses (one line) an unreadable or pickled-object file, an unknown layout, an
    existing non-empty ``out`` and an ``out`` that is or contains the checkpoint. Returns ``out``."""
    ckpt, target = _check_paths(checkpoint, out)
    state_dict = read_state_dict(ckpt)
    layout = layout or detect_layout(state_dict)
    pipe = _build_pipeline(convert_state_dict(state_dict, layout), layout)
    del state_dict
    card = model_card(ckpt.name, file_sha256(ckpt), layout, source_note)
    _write_atomically(pipe, card, target)
    return target
