"""NeTI's neural mapper and its conditioning of a diffusers UNet (Alaluf et al., "A Neural Space-Time
Representation for Text-to-Image Personalization", SIGGRAPH Asia 2023; the official code
NeuralTextualInversion/NeTI@28edf30 was read for ``docs/notes/neti-official-code.md``).

A learned concept is not one token embedding but a small network M(t, l) that gives the embedding for
denoising timestep t and cross-attention layer l:

    e = [sin(W·(t, l)), cos(W·(t, l))] / ‖·‖          random Fourier features, W ~ N(0, 1)·(σ_t, σ_l)
    h = LeakyReLU(LN(A·e))… two layers of 128          A (anchors) starts at the encodings of the anchor
                                                       pairs t ∈ {0, 100, …, 900} × every layer
    (v, b) = norm · Out(h) / ‖Out(h)‖                  norm: the initializer word's input-embedding norm

``v`` replaces the placeholder's input embedding in the prompt encoded for layer l; ``b`` is the textual
bypass: at the placeholder's positions the text encoder's last hidden state h (before its final layer
norm) becomes h + 0.2 · (b/‖b‖) · ‖h‖. Layer l's cross-attention takes its keys from the plain encoding and
its values from the bypassed one (:class:`models.layer_conditioning.LayerConditionedProcessor` with
``values``).

Nested dropout (training): on the 128-d ``h``, with probability 0.5 per layer, each sample keeps only its
first k ~ U{0..127} dimensions. At inference ``truncation`` = k keeps the first k for every sample: smaller
is more editable, larger more faithful (None: all).

:func:`neti_conditioning` does it for any call of the UNet (training, a diffusers pipeline's own sampler
with classifier-free guidance): a forward pre-hook reads the call's timestep, runs the mapper for every
layer and sets each layer's states. Nothing of diffusers or transformers is patched: processors go through
the attention-processor API, the embedding row and the bypass through PyTorch forward hooks, and all come
off afterwards.

Deviations from the official code: W is a saved tensor (the official pickles the encoder module); the
anchor timesteps are every tenth of the scheduler's training timesteps (100 for the usual 1000); the
layer index counts the model's own cross-attention layers (16 for SD 1.x, as there).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.layer_conditioning import cross_attention_layers, layer_key, per_layer_conditioning
from studio.core.errors import StudioError

Tensor = torch.Tensor

NETI_METHOD = "neti"
BYPASS_SCALE = 0.2
NESTED_DROPOUT = 0.5


@dataclass(frozen=True)
class NetiConfig:
    """What a mapper is built from (saved with its weights)."""

    token_dim: int  # the text encoder's input-embedding width
    layers: tuple[str, ...]  # the UNet's cross-attention layers (layer_key names), in call order
    norm: float  # the output's norm: the initializer word's input-embedding norm
    num_train_timesteps: int = 1000
    fourier_features: int = 1024
    sigma_t: float = 0.03
    sigma_l: float = 2.0
    hidden: int = 128
    anchor_timesteps: int = 10  # anchors at every num_train_timesteps / anchor_timesteps steps
    bypass: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> NetiConfig:
        values = json.loads(text)
        values["layers"] = tuple(values["layers"])
        return cls(**values)


class NetiMapper(nn.Module):
    """M(t, l) → (input embedding (m, D), bypass (m, D) or None) for timesteps t and layer indices l."""

    def __init__(self, config: NetiConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        scale = torch.tensor([config.sigma_t, config.sigma_l])
        self.register_buffer("fourier", torch.randn(config.fourier_features, 2, generator=generator) * scale)
        step = config.num_train_timesteps // config.anchor_timesteps
        anchors = torch.cartesian_prod(torch.arange(config.anchor_timesteps) * step,
                                       torch.arange(len(config.layers))).float()  # time-major, as there
        self.anchors = nn.Linear(2 * config.fourier_features, len(anchors))
        with torch.no_grad():
            self.anchors.weight.copy_(self.encode(anchors[:, 0], anchors[:, 1]))
        self.mlp = nn.Sequential(nn.Linear(len(anchors), config.hidden), nn.LayerNorm(config.hidden),
                                 nn.LeakyReLU(), nn.Linear(config.hidden, config.hidden),
                                 nn.LayerNorm(config.hidden), nn.LeakyReLU())
        self.out = nn.Linear(config.hidden, config.token_dim * (2 if config.bypass else 1))

    def encode(self, t: Tensor, layer: Tensor) -> Tensor:
        """Unit-norm random Fourier features of (t, l) pairs, (m, 2·features)."""
        angles = torch.stack([t.float(), layer.float()], dim=1) @ self.fourier.T
        feats = torch.cat([angles.sin(), angles.cos()], dim=1)
        return feats / feats.norm(dim=1, keepdim=True)

    def forward(self, t: Tensor, layer: Tensor, truncation: int | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        hidden = self.mlp(self.anchors(self.encode(t, layer)))
        if self.training:
            hidden = hidden * self.dropout_mask(layer, generator).to(hidden)
        if truncation is not None:
            hidden = hidden * (torch.arange(self.config.hidden, device=hidden.device) < truncation)
        out = self.out(hidden)
        out = out / out.norm(dim=1, keepdim=True).clamp_min(1e-12) * self.config.norm
        d = self.config.token_dim
        return out[:, :d], (out[:, d:] if self.config.bypass else None)

    def dropout_mask(self, layer: Tensor, generator: torch.Generator | None) -> Tensor:
        """Nested dropout: per layer index a coin (p 0.5); where it fires, row i keeps dims [0, k_i)."""
        fires = torch.rand(len(self.config.layers), generator=generator) < NESTED_DROPOUT
        keep = torch.randint(self.config.hidden, (len(layer),), generator=generator)
        dims = torch.arange(self.config.hidden)
        mask = (dims[None] < keep[:, None]) | ~fires[layer.long().cpu()][:, None]
        return mask.float().to(layer.device)


def initial_mapper(pipe, initializer_id: int, seed: int) -> NetiMapper:
    """A new mapper for ``pipe``'s UNet and text encoder; its weights depend only on ``seed``."""
    row = pipe.text_encoder.get_input_embeddings().weight[initializer_id]
    config = NetiConfig(token_dim=row.shape[0], norm=float(row.detach().float().norm()),
                        layers=tuple(layer_key(n) for n in cross_attention_layers(pipe.unet)),
                        num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # nn.Linear's own initialisation draws from the global generator
        return NetiMapper(config, torch.Generator().manual_seed(seed))


def check_layers(mapper: NetiMapper, unet, name: str = "the NeTI concept", text_encoder=None) -> list[str]:
    """The UNet's cross-attention processor names, refused if they are not the mapper's layers, or (with
    ``text_encoder``) if its embedding width is not the mapper's (SD 1.x and 2.x share layer names)."""
    layers = cross_attention_layers(unet)
    if [layer_key(n) for n in layers] != list(mapper.config.layers):
        raise StudioError(f"{name} was learned for {len(mapper.config.layers)} cross-attention layers, this "
                          f"model's UNet has {len(layers)} of other names: it belongs to another model")
    width = None if text_encoder is None else text_encoder.get_input_embeddings().weight.shape[1]
    if width is not None and width != mapper.config.token_dim:
        raise StudioError(f"{name} gives {mapper.config.token_dim}-dim embeddings, this model's text encoder "
                          f"takes {width}: it belongs to another model")
    return layers


def _final_layer_norm(text_encoder) -> nn.Module:
    for name, module in text_encoder.named_modules():
        if name.endswith("final_layer_norm"):
            return module
    raise StudioError(f"{type(text_encoder).__name__} has no final_layer_norm: NeTI's textual bypass needs a "
                      "CLIP text encoder")


def encode_with_rows(text_encoder, ids: Tensor, token_id: int, rows: Tensor,
                     bypass: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Encode ``ids`` (B, L) with ``rows`` (B, D) as the input embedding of ``token_id`` in prompt b; returns
    the plain states and those with the textual ``bypass`` (B, D) added at the token's positions (the plain
    states again when ``bypass`` is None), both after the final layer norm."""
    at_token = (ids == token_id)[..., None].to(rows.device)
    captured = {}

    def put_rows(_module, _args, out):
        return torch.where(at_token, rows[:, None, :].to(out.dtype), out)

    def keep_input(_module, args):
        captured["h"] = args[0]

    final_norm = _final_layer_norm(text_encoder)
    hooks = [text_encoder.get_input_embeddings().register_forward_hook(put_rows),
             final_norm.register_forward_pre_hook(keep_input)]
    try:
        plain = text_encoder(ids.to(rows.device))[0]
    finally:
        for hook in hooks:
            hook.remove()
    if bypass is None:
        return plain, plain
    h = captured["h"]
    direction = bypass / bypass.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    shifted = h + at_token * BYPASS_SCALE * direction[:, None, :].to(h) * h.norm(dim=-1, keepdim=True)
    return plain, final_norm(shifted)


class NetiStates:
    """Each layer's keys and values for prompts ``ids`` at given timesteps (the pre-hook's work per UNet
    call; CoRe's token pass with a NeTI token)."""

    def __init__(self, text_encoder, mapper: NetiMapper, ids: Tensor, token_id: int,
                 truncation: int | None, generator: torch.Generator | None):
        self.text_encoder, self.mapper, self.ids, self.token_id = text_encoder, mapper, ids, token_id
        self.truncation, self.generator = truncation, generator

    def states(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(layers, n, L, D) keys and values for the n prompts at timesteps ``t`` (n,), computed anew on
        every call (a sampler never repeats a timestep: a cache would only grow)."""
        n = len(self.ids)
        layers = len(self.mapper_config.layers)
        device = getattr(self.mapper, "module", self.mapper).fourier.device
        layer = torch.arange(layers, device=device).repeat_interleave(n)
        t = t.to(device).float().repeat(layers)
        rows, bypass = self.mapper(t, layer, self.truncation, self.generator)
        ids = self.ids.repeat(layers, 1)
        plain, shifted = encode_with_rows(self.text_encoder, ids, self.token_id, rows, bypass)
        return plain.unflatten(0, (layers, n)), shifted.unflatten(0, (layers, n))

    @property
    def mapper_config(self) -> NetiConfig:
        return getattr(self.mapper, "module", self.mapper).config  # unwrapped from DDP


def _call_timesteps(args: tuple, kwargs: dict, n: int) -> Tensor:
    """The conditional rows' timesteps (n,) of a UNet call ``unet(sample, timestep, ...)``."""
    t = kwargs["timestep"] if "timestep" in kwargs else args[1]
    t = torch.as_tensor(t).flatten()
    return t.expand(n) if t.numel() == 1 else t[-n:]


@contextmanager
def neti_conditioning(unet, text_encoder, mapper: NetiMapper, ids: Tensor, token_id: int,
                      truncation: int | None = None, generator: torch.Generator | None = None):
    """Inside the block every call of ``unet`` is conditioned by the mapper: the last ``len(ids)`` rows of
    its batch (all of it, or the conditional half of a guidance batch) read, at each cross-attention layer,
    the prompts ``ids`` encoded with that layer's and timestep's embedding of ``token_id`` (keys) and its
    bypass (values). ``generator`` draws nested dropout when the mapper is in training mode. The UNet's
    processors and hooks are as before afterwards, also on error."""
    config = getattr(mapper, "module", mapper).config
    if truncation is not None and not 0 <= truncation <= config.hidden:
        raise StudioError(f"NeTI truncation must be between 0 and {config.hidden}, got {truncation}")
    conditioner = NetiStates(text_encoder, mapper, ids, token_id, truncation, generator)
    n, layers = len(ids), len(config.layers)
    placeholder = [torch.zeros(n, ids.shape[1], config.token_dim)] * layers
    with per_layer_conditioning(unet, placeholder, values=placeholder) as names:
        processors = [unet.attn_processors[name] for name in names]

        def before_call(_module, args, kwargs):
            keys, values = conditioner.states(_call_timesteps(args, kwargs, n))
            for proc, k, v in zip(processors, keys, values):
                proc.states, proc.values = k, v

        hook = unet.register_forward_pre_hook(before_call, with_kwargs=True)
        try:
            yield conditioner
        finally:
            hook.remove()


def mapper_tensors(mapper: NetiMapper) -> dict[str, Tensor]:
    """The mapper's weights (its Fourier matrix included) under ``neti.``-prefixed keys, for a file."""
    return {f"neti.{k}": v.detach().float().cpu().contiguous() for k, v in mapper.state_dict().items()}


def mapper_from_tensors(config: NetiConfig, tensors: dict[str, Tensor]) -> NetiMapper:
    """A mapper with the weights of :func:`mapper_tensors`' output (eval mode); a mismatch raises."""
    with torch.random.fork_rng(devices=[]):  # building draws weights that the file's replace: keep the
        mapper = NetiMapper(config)  # caller's global random state as it was
    state = {k[len("neti."):]: v for k, v in tensors.items() if k.startswith("neti.")}
    try:
        mapper.load_state_dict(state)
    except RuntimeError as err:
        raise StudioError(f"the NeTI mapper's weights do not match its config ({str(err).splitlines()[0]})") \
            from None
    return mapper.eval()


__all__ = ["BYPASS_SCALE", "NESTED_DROPOUT", "NETI_METHOD", "NetiConfig", "NetiMapper", "NetiStates",
           "check_layers", "encode_with_rows", "initial_mapper", "mapper_from_tensors", "mapper_tensors",
           "neti_conditioning"]
