"""TReg: Regularization by Texts for latent diffusion inverse solvers (Kim, Park, Chung, Ye; ICLR 2025).
Official code: ``TReg-inverse/TReg`` (read at 6d856f9: ``solver/latent_diffusion.py``, ``TRegSolver``;
``solve.py``; ``configs/solver/treg.yaml``; the README's example runs).

The solver is told in words what the solution should show (``prompt``, e.g. "a photo of a cat"): the text
steers the sampler by classifier-free guidance (CFG) against a "null" (negative) text, and a hard
data-consistency step in pixels keeps each estimate on the measurement. Per DDIM step t → t' (index i of
N, ᾱ' = ᾱ_{t'}, u the run's null-text embedding, c the prompt's, w = ``guidance``):

    ε̂ = ε_θ(z_t, t, u) + w (ε_θ(z_t, t, c) − ε_θ(z_t, t, u));   ẑ_0 = Tweedie(z_t, ε̂)
    if i mod τ = 0 and i < f·N:                                                   # every τ-th step, early
        x_y = argmin_x ‖A x − y‖² + λ ‖x − D(ẑ_0)‖²              # CG from D(ẑ_0), as P2L's projection
        z_y = E(x_y)
        u  ← K Adam steps (lr γ) on s(u) = mean_k ⟨f/‖f‖, u_k⟩,  f = CLIP_image(x_y)  # adaptive negation
        z̄_0 = ᾱ' z_y + (1 − ᾱ') ẑ_0                                               # blend
        z_t' = sqrt(ᾱ') z̄_0 + (1 − ᾱ') ε̂ + sqrt(ᾱ' (1 − ᾱ')) n,   n ~ N(0, I)      # re-noise
    elif dps:   ε̂_u, ẑ_0 from the null branch alone;  z_t' = DDIM(ẑ_0, ε̂_u) − ρ ∇_{z_t} ‖y − A(D(ẑ_0))‖
    else:       z_t' = DDIM(ẑ_0, ε̂)                                                           # η = 0
    result: D(z_0) after the last step

The re-noising mixes the predicted noise and a fresh draw so that the noise part keeps the variance
1 − ᾱ': sqrt(1 − ᾱ') (sqrt(1 − ᾱ') ε̂ + sqrt(ᾱ') n). The adaptive negation moves the null text away from
what the current data-consistent image shows, so the CFG term pushes toward it. Its loss is linear in u
(the official form: the unit CLIP image embedding against the raw per-token hidden states of the null
text), so its gradient f/L is the same every iteration and each Adam step moves every entry of u by
about γ against the sign of f's matching entry.

Text. ``prompt`` is the description of the expected solution. With an empty prompt, c is the
unconditional embedding: the CFG then only pushes away from ``negative_prompt`` (by default the official
examples' "out of focus, depth of field", a generic sharpness prior), and with both texts empty and no CLIP
model the solver is DDIM with the periodic data consistency and blend, no text regularisation at all (one
UNet pass per step). ``guidance`` 0 is the README's "without text" run: the null branch alone.

Choices and deviations from the official code:

* **Adaptive negation needs a CLIP image encoder** whose embedding size is the text encoder's hidden size
  (the official one is OpenAI CLIP ViT-L/14, 768 as SD 1.5's text encoder). Our latent priors carry none
  (the embedded emoji-sd has none) and nothing is downloaded, so it is an optional argument: ``clip`` is a
  transformers ``CLIPModel`` or ``CLIPVisionModelWithProjection`` (its image embeddings, of the image resized
  to its input size with bicubic interpolation and normalised with CLIP's mean and std, as the official
  ``FrozenClipImageEmbedder``), or any callable from [0, 1] images (B, 3, H, W) to embeddings (B, D). Only
  the image tower is used (the null text side is the prior's own embedding), so no tokenizer is needed.
  Without ``clip`` the negation is off and the record says ``"adaptive_negation": false``; the official
  README runs all use it (``--use_AN``). The image CLIP sees is clamped to [0, 1].
* **The null embedding is per run**: a copy of the prior's embedding of ``negative_prompt``, one per sample;
  the prior's stored prompt state is never changed (every model call passes explicit embeddings). The Adam
  state restarts at each negation and u carries over between them, as in the official code.
* **Schedule**: the official 200 steps run the data step while step < 170; ours is a fraction ``dc_until``
  = 0.85 of the N steps, so shorter runs keep the same shape. The DDIM grid is ours (``spacing``); the
  official one evaluates the UNet at t + 1 with ᾱ_t (a prepended 1.0) and ends at ᾱ_0 instead of 1.
* **CG**: 5 iterations (the official call passes ``m=5``; our research notes said 10) with λ = 1e-4
  (``--cg_lamb``), from D(ẑ_0), in [0, 1] units (the minimiser is the same in [-1, 1] units for linear A).
  A needs an adjoint: nonlinear operators are refused.
* **Encoder mean**: z_y = E(x_y) uses the encoder mean (deterministic); the official code samples the
  latent distribution.
* **DPS branch** (``dps``, off by default as the official ``--use_DPS``): as the official code, the
  prediction is the null branch alone (it passes ``cfg_guidance=0``; one UNet pass here, two there) and the
  step is ρ = sqrt(ᾱ') unless ``dps_scale`` is given; the norm is per sample and in model units (as our
  other DPS-family solvers; the official one is over the batch of one, also in [-1, 1] units).
* **Result**: D(z) after the last step; the official code returns D(ẑ_0) of the last step, the same unless
  the last step takes the DPS step (ours keeps it).
* **Defaults**: CFG w = 5 and ``null_lr`` 1e-3 with 10 Adam steps (README SR and deblur runs; the CLI
  defaults are 4.0 and 8e-4, and the README uses 5e-4 for one deblur run). ``noise_sigma`` is not used:
  the official λ is fixed (its measurements carry σ = 0.01 in [-1, 1] units, 0.005 here); raise
  ``prox_weight`` for noisier ones.
* **Cost** (measured on emoji-sd, CPU): about 2.5 model passes a step (CFG's two UNet passes, a decode
  and an encode every 3rd step), half of latent DPS's. SR x4 and box inpainting on 3 emoji (σ 0.01): at
  50-200 steps the result beat A†y by 1-4 dB (SR); at 15-25 steps SR fell to or below A†y, hence 50.
* **Prior**: any Stable-Diffusion-style latent prior (SD 1.5, fp16 autocast in the official code); not
  flow-matching (SD3) priors, which condition on a (hidden, pooled) pair the negation does not model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from solvers.common import (
    SolveResult,
    StepCallback,
    StepLoop,
    alpha_bar_at,
    check_params,
    ddim_step,
    initial_noise,
    is_count,
    is_number,
    latent_dps_gradient,
    latent_image_shape,
    make_generator,
    timesteps,
)
from solvers.p2l import proximal_projection
from solvers.registry import register_solver
from studio.core.conventions import to_image, to_model
from studio.core.errors import StudioError

Tensor = torch.Tensor

#: OpenAI CLIP's image normalisation (the official ``FrozenClipImageEmbedder``'s constants)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_image_features(clip, image: Tensor) -> Tensor:
    """Unit-norm CLIP image embeddings (B, D) of [0, 1] ``image`` (see the module docstring for ``clip``)."""
    image = image.clamp(0, 1)
    config = getattr(clip, "config", None)
    with torch.no_grad():
        if config is not None:  # a transformers CLIP model
            size = getattr(getattr(config, "vision_config", config), "image_size")
            param = next(clip.parameters())
            x = F.interpolate(image.float(), size=(size, size), mode="bicubic", align_corners=True)
            mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
            x = ((x - mean) / std).to(device=param.device, dtype=param.dtype)
            encode = getattr(clip, "get_image_features", clip)
            out = encode(pixel_values=x)
        else:
            out = clip(image)
    if not torch.is_tensor(out):
        embeds = getattr(out, "image_embeds", None)
        out = embeds if embeds is not None else getattr(out, "pooler_output", None)
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != image.shape[0]:
        raise StudioError("treg: clip must give one image embedding per image, shape (B, D)")
    out = out.detach().to(device=image.device, dtype=torch.float32)
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def null_similarity(features: Tensor, uc: Tensor) -> Tensor:
    """s(u) per sample: the mean over the null tokens of ⟨f, u_k⟩ (f unit-norm, u the raw hidden states)."""
    if features.shape[-1] != uc.shape[-1]:
        raise StudioError(f"treg: the clip model's image embeddings have {features.shape[-1]} entries but "
                          f"the prior's text embeddings {uc.shape[-1]}: adaptive negation needs a CLIP whose "
                          f"embedding size is the text encoder's (ViT-L/14 for SD 1.x)")
    return torch.einsum("bd,bld->bl", features, uc).mean(dim=1)


def negate_null(features: Tensor, uc: Tensor, lr: float, iters: int) -> Tensor:
    """``iters`` Adam steps (lr ``lr``, a fresh optimiser) on u minimising :func:`null_similarity`."""
    uc = uc.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([uc], lr=lr)
    for _ in range(iters):
        with torch.enable_grad():
            loss = null_similarity(features, uc).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return uc.detach()


class TextGuidance:
    """The run's text conditioning: the prompt's embedding c and the run's own copy u of the null text's,
    one per sample (adaptive negation changes u; the prior's stored prompt state is never touched)."""

    def __init__(self, prior, prompt: str, negative_prompt: str, guidance: float, batch: int, adaptive: bool):
        self.c = prior.embed(prompt).float()
        self.uc = prior.embed(negative_prompt).float().expand(batch, -1, -1).clone()
        self.start = self.uc.clone()
        self.guidance = float(guidance)
        self.distinct = adaptive or prompt != negative_prompt  # equal texts: CFG is the one branch

    def predict(self, prior, z: Tensor, t: int):
        """The CFG prediction at (z, t) and the number of UNet passes it took."""
        if self.guidance == 0.0:
            return prior.predict_with(z, t, self.uc), 1
        if self.guidance == 1.0 or not self.distinct:
            return prior.predict_with(z, t, self.c), 1
        return prior.predict_with(z, t, self.c, self.uc, self.guidance), 2


def renoise(z0y: Tensor, z0: Tensor, eps: Tensor, ab_prev: Tensor, gen: torch.Generator) -> Tensor:
    """z_t' = sqrt(ᾱ') (ᾱ' z_y + (1 − ᾱ') ẑ_0) + (1 − ᾱ') ε̂ + sqrt(ᾱ' (1 − ᾱ')) n (the official blend)."""
    noise = torch.randn(z0y.shape, generator=gen, device=z0y.device, dtype=z0y.dtype)
    blend = ab_prev * z0y + (1 - ab_prev) * z0
    return ab_prev.sqrt() * blend + (1 - ab_prev) * eps + (ab_prev * (1 - ab_prev)).sqrt() * noise


def _check(guidance, dc_every, dc_until, prox_weight, cg_iters, null_lr, null_steps, dps_scale, clip) -> None:
    check_params("treg", [
        ("guidance", guidance, is_number(guidance, 0), "a number >= 0"),
        ("dc_every", dc_every, is_count(dc_every, 0), "an integer >= 0"),
        ("dc_until", dc_until, is_number(dc_until, 0) and dc_until <= 1,
         "in [0, 1] (a fraction of the steps)"),
        ("prox_weight", prox_weight, is_number(prox_weight, 0, strict=True), "a number > 0"),
        ("cg_iters", cg_iters, is_count(cg_iters, 1), "an integer >= 1"),
        ("null_lr", null_lr, is_number(null_lr, 0), "a number >= 0"),
        ("null_steps", null_steps, is_count(null_steps, 0), "an integer >= 0"),
        ("dps_scale", dps_scale, dps_scale is None or is_number(dps_scale, 0),
         "a number >= 0 (or null: sqrt(ᾱ'))"),
        ("clip", type(clip).__name__, clip is None or (callable(clip) and not isinstance(clip, str)),
         "a CLIP model object passed through the Python API (without one adaptive negation is off)")])


def _consistency_step(prior, operator, y, z, t, ab_prev, text, gen, opts, clip) -> tuple[Tensor, Tensor, int,
                                                                                        list | None]:
    """One data-consistency step (see the module docstring): z_t', D(ẑ_0), UNet passes and, when the null
    text was negated, its similarity [before, after] (batch mean)."""
    with torch.no_grad():
        pred, passes = text.predict(prior, z, t)
        x0 = prior.decode(pred.x0)
        x_y = proximal_projection(operator, y, to_image(x0), opts["prox_weight"], opts["cg_iters"])
        z0y = prior.encode(to_model(x_y))
    sims = None
    if clip is not None:
        features = clip_image_features(clip, x_y)
        before = float(null_similarity(features, text.uc).mean())
        text.uc = negate_null(features, text.uc, opts["null_lr"], opts["null_steps"])
        sims = [before, float(null_similarity(features, text.uc).mean())]
    with torch.no_grad():
        z = renoise(z0y, pred.x0, pred.eps, ab_prev, gen)
    return z, x0, passes, sims


def _dps_step(prior, operator, y, z, t, ab_t, ab_prev, text, scale) -> tuple[Tensor, Tensor]:
    """DDIM step of the null branch alone minus ρ ∇_z ‖y − A(D(ẑ_0))‖ (the official ``--use_DPS``)."""
    pred, x0, grad = latent_dps_gradient(lambda v: prior.predict_with(v, t, text.uc), prior, operator, y, z)
    rho = float(ab_prev.sqrt()) if scale is None else float(scale)
    with torch.no_grad():
        return ddim_step(z.detach(), pred.eps, pred.x0, ab_t, ab_prev) - rho * grad, x0


@register_solver("treg", needs_linear=True, latent=True, title="TReg (regularization by texts)",
                 min_steps=50, step_cost=2.5, needs_prompt=True,
                 summary="latent DDIM steered by a text description of the solution (CFG against a null text "
                         "it adapts) with a CG data-consistency step every 3rd step: latent models, linear "
                         "operators, 50-200 steps; takes a prompt")
def treg(
    y: Tensor,
    operator,
    prior,
    *,
    noise_sigma: float = 0.0,
    steps: int = 200,
    prompt: str = "",
    guidance: float = 5.0,
    negative_prompt: str = "out of focus, depth of field",
    dc_every: int = 3,
    dc_until: float = 0.85,
    prox_weight: float = 1e-4,
    cg_iters: int = 5,
    clip: object | None = None,
    null_lr: float = 1e-3,
    null_steps: int = 10,
    dps: bool = False,
    dps_scale: float | None = None,
    spacing: str = "leading",
    seed: int | None = 0,
    x_shape: tuple[int, ...] | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> SolveResult:
    """TReg solution per row of ``y``, steered toward ``prompt``; ``clip`` turns adaptive negation on."""
    _check(guidance, dc_every, dc_until, prox_weight, cg_iters, null_lr, null_steps, dps_scale, clip)
    if not getattr(operator, "linear", False):
        raise StudioError("treg needs a linear operator (its data-consistency step solves with the adjoint)")
    adaptive = clip is not None and dc_every > 0 and dc_until > 0 and null_steps > 0 and null_lr > 0
    gen = make_generator(seed, y.device)
    ts = timesteps(prior.num_train_timesteps, steps, spacing)
    params = {"steps": steps, "prompt": prompt, "guidance": guidance, "negative_prompt": negative_prompt,
              "dc_every": dc_every, "dc_until": dc_until, "prox_weight": prox_weight, "cg_iters": cg_iters,
              "clip": type(clip).__name__ if clip is not None else None, "null_lr": null_lr,
              "null_steps": null_steps, "dps": dps, "dps_scale": dps_scale, "spacing": spacing,
              "seed": gen.initial_seed()}
    opts = {"prox_weight": prox_weight, "cg_iters": cg_iters, "null_lr": null_lr, "null_steps": null_steps}
    loop = StepLoop("treg", len(ts), callback, progress, params)
    z = initial_noise(prior.latent_shape(latent_image_shape(y, operator, prior, x_shape)), gen, y)
    text = TextGuidance(prior, prompt, negative_prompt, guidance, z.shape[0], adaptive)
    similarity, consistency_steps = [], 0
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ab_t, ab_prev = alpha_bar_at(prior, t, z), alpha_bar_at(prior, t_prev, z)
        if dc_every and i % dc_every == 0 and i < dc_until * len(ts):
            z, x0, passes, sims = _consistency_step(prior, operator, y, z, t, ab_prev, text, gen, opts,
                                                    clip if adaptive else None)
            loop.count(passes)
            consistency_steps += 1
            similarity += [sims] if sims else []
        elif dps:
            z, x0 = _dps_step(prior, operator, y, z, t, ab_t, ab_prev, text, dps_scale)
            loop.count(1, grad=True)
        else:
            with torch.no_grad():
                pred, passes = text.predict(prior, z, t)
                z = ddim_step(z, pred.eps, pred.x0, ab_t, ab_prev)
                x0 = prior.decode(pred.x0) if callback is not None else pred.x0  # decode only to show
            loop.count(passes)
        loop.step(i, z, x0)
    loop.extra.update({"adaptive_negation": adaptive, "consistency_steps": consistency_steps})
    if adaptive:
        loop.extra["null_similarity"] = similarity
        loop.extra["null_drift"] = float((text.uc - text.start).flatten(1).norm(dim=1).mean())
    with torch.no_grad():
        image = to_image(prior.decode(z)).clamp(0, 1)
    return loop.finish(z, y, operator, prior, image=image)
