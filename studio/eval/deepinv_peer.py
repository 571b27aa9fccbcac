"""DeepInverse's diffusion samplers (deepinv 0.5.0) run on *our* pixel prior, operator and measurement, as
peers of ``studio bench``: ``deepinv-dps`` (``deepinv.sampling.DPS``), ``deepinv-ddrm``
(``deepinv.sampling.DDRM``) and ``deepinv-diffpir`` (``deepinv.sampling.DiffPIR``), each at DeepInverse's
defaults except the step count and a seeded RNG. The shared pieces: our prior as a DeepInverse ``Denoiser``
(:func:`make_denoiser`), our operator as its physics (:func:`make_physics`; from our SVD,
:func:`make_decomposable_physics`), and :func:`run_peer`.

!!! TORCHVISION STAND-IN !!!
    ``import deepinv`` imports torchvision (``deepinv/__init__.py``: ``import torchvision as _torchvision``;
    plotting, mixins, transforms and datasets import pieces of it), but no torchvision wheel works beside this
    project's ``torch==2.13.0+cpu`` (PyPI's 0.28.0 is the CUDA build and fails at ``torchvision::nms``; 0.29
    needs torch 2.14). So ``setup.sh`` installs deepinv with ``--no-deps`` and, **only when** ``import
    torchvision`` fails, :func:`import_deepinv` puts a minimal stand-in into ``sys.modules`` *while deepinv is
    being imported* and removes it right after (so nothing else in the process sees a fake torchvision).
    The stand-in defines exactly the names deepinv's import chain binds (:data:`STANDIN_NAMES`); each is a
    placeholder that raises ``RuntimeError("torchvision is not importable here; this stand-in only lets
    deepinv import")`` on any use (call, attribute, iteration). The three samplers never use them (they serve
    plotting, datasets, the trainer and rotation transforms). When the real torchvision imports, it is used.

DPS (``deepinv-dps``). What runs: ``deepinv.sampling.DPS(denoiser, num_steps=steps + 1, rng=<seeded>,
device=...)`` with every other argument at its default — ``schedule="vp"`` (VP-SDE, β from 0.1 to 20),
``solver="ddpm"`` (ancestral DDPM steps on ``linspace(1, 0, num_steps)``; the last step, to t = 0, returns
the guided denoised estimate), ``alpha=1.0``, ``weight=1.0``, ``guidance="norm"`` (λ ∇‖A D(x_t, σ_t) − y‖),
``dtype=float64`` for the SDE state, ``minus_one_one=True`` — then
``dps(y, physics, x_init=(B, C, H, W), seed=seed)``.

* ``num_steps = steps + 1``: DeepInverse's ancestral solvers evaluate the denoiser once per interval of the
  time grid and never at t = 0 (and its final ``denoise_output`` step is skipped there, σ = 0), so
  ``num_steps`` grid points cost ``num_steps − 1`` denoiser calls; ``steps + 1`` makes the NFE equal
  ``steps`` (every call with a backward pass), as for our ``dps``. DeepInverse's own default, 1000 grid
  points, is thus our ``steps=999``.
* ``rng``: a ``torch.Generator`` seeded with the run seed (DeepInverse's default ``rng=None`` draws from the
  global RNG and ignores ``seed``), so runs are reproducible by seed like ours.
* ``x_init=(B, C, H, W)``: the shape of the initial noise. Without it DeepInverse computes ``A_dagger(y)``
  only to read its shape (a least-squares solve); the noise drawn is the same either way.

Range conventions (checked in deepinv 0.5.0's code, not assumed): a DeepInverse ``Denoiser`` takes images
in **[0, 1]** with noise std σ in [0, 1] units (``x = x0 + σ n``) and returns [0, 1] — ``DiffUNet`` maps to
[-1, 1] inside. ``PosteriorDiffusion`` (DPS's base) carries its SDE state in [-1, 1] but, with
``minus_one_one=True``, hands the data-fidelity term ``(x / s + 1) / 2`` and ``σ / 2`` and keeps
``y`` and ``physics.A`` in [0, 1] (its comment: "the measurement, the forward operator and the
data-fidelity term all live in [0, 1]"). DPS's ``clip=[-1, 1]`` is applied to that [0, 1] denoiser output,
so it clips nothing. Hence y and our operator (which acts on [0, 1] images) are passed as they are, and the
returned sample (``(x + 1) / 2``) is a [0, 1] image, clamped to [0, 1] for the metrics.

The denoiser (:func:`make_denoiser`), D(x, σ) for x = x0 + σ n in [0, 1] units, mirrors
``DiffUNet.forward_denoise`` on our discrete schedule: in model units x_m = 2x − 1 and σ_m = 2σ; the VP point
is x_t = x_m / √(1 + σ_m²) (ᾱ = 1 / (1 + σ_m²)); t is the **nearest** trained timestep by noise-to-signal
ratio √((1 − ᾱ_t)/ᾱ_t) vs σ_m (no interpolation; the same rule as ``DiffusionPrior.timestep_for_sigma``);
x̂0 = ``prior.predict(x_t, t).x0`` (clamped to [-1, 1] for image priors, as DiffUNet clamps) and
D = (x̂0 + 1) / 2.

The weight: with ``guidance="norm"`` DeepInverse's ``weight`` is not our ``scale`` (ζ). A DDPM step from
σ0 to σ1 (model units, VP scales s = 1/√(1 + σ²)) moves the state by
0.5 · weight · s0 · s1 · (σ0² − σ1²) · ∇_{x_t}‖A x̂0 − y‖, where our ``dps`` moves it by
ζ · ∇_{x_t}‖A x̂0 − y‖ (the same gradient, model units; checked numerically on one step). DeepInverse's
weight is a continuous-time coefficient: summed over the steps its effective ζ is ≈ 5.0 · weight for any
step count (per step at 20 / 100 / 1000 steps: median 0.25 / 0.050 / 0.0050, last step 0.015 / 0.0010 /
0.000055), against our constant ζ = 0.5 per step for inpainting (sum 0.5 · steps). So the default
``weight=1.0`` guides far less than our DPS, the more so the more steps (a matching sum is weight ≈
0.1 · steps); DeepInverse's docstring says the weight "has to absorb a factor ... typically in the
hundreds". The peer runs the default (as asked: DeepInverse's defaults); a bench variant
``deepinv-dps:weight=W`` (or :func:`deepinv_dps`'s ``weight=``) runs another weight.

DDRM (``deepinv-ddrm``): ``deepinv.sampling.DDRM(denoiser, sigmas=np.linspace(1, 0, steps))`` with its
defaults ``eta=0.85``, ``etab=1.0``, on a ``DecomposablePhysics`` built from our operator's SVD (DDRM needs
one; operators without an SVD, e.g. motion blur, are "unsupported" as for our ``ddrm``), noise model
``GaussianNoise(σ)`` ([0, 1] units; σ = 0 for a noiseless task). NFE = ``steps`` (one denoiser call per
noise level, none with a backward pass; its last level is σ = 0, our t = 0). Two things to know when reading
its numbers beside ours: its noise levels are linear in σ ∈ [1, 0] in [0, 1] image units (σ = 1 there is
model-unit σ 2, ᾱ ≈ 0.2: it never starts from pure noise), and it draws the spectral noise with std σ_t / √2
but calls the denoiser with σ_t (deepinv 0.5.0 ``diffusion.py``, read, not changed).

DiffPIR (``deepinv-diffpir``): ``deepinv.sampling.DiffPIR(denoiser, data_fidelity=L2(), max_iter=steps)``
with its defaults ``zeta=0.1``, ``lambda_=7.0``, on the same SVD physics (so its proximal data step
``prox_{L2}`` is exact, by the SVD, rather than conjugate gradient). Its noise level comes from the physics'
``GaussianNoise(σ)``; for a noiseless task (σ = 0 makes its ρ_t = λσ²/σ̄_t² zero and the prox divide by
zero) no noise model is attached, so DiffPIR keeps its default ``sigma=0.05``, recorded in ``params``.
NFE = ``steps``, no backward passes. Its time grid is its own (DDPM linear betas, quadratic spacing); our
denoiser maps each of its σ to our nearest trained timestep.

DDRM and DiffPIR draw from the *global* torch RNG (``torch.randn_like``) and seed it only ``if seed:``
(so never for seed 0); :func:`run_peer` runs them inside ``torch.random.fork_rng`` with
``torch.manual_seed(seed)``, so they are reproducible by seed and leave the caller's RNG state alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import time
import types
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from studio.core.errors import StudioError
from studio.core.io import save_image
from studio.core.metrics import image_metrics
from studio.core.tasks import build_noise, noise_sigma_of
from studio.eval.bench.measure import (NetworkTimer, PeakMemory, ResidualTrace, cost_fields,
                                       measurement_residual, sync_device)
from studio.eval.bench.peers import register_peer
from studio.eval.bench.records import make_row, output_path

Tensor = torch.Tensor

DEEPINV_VERSION = "0.5.0"
PEER_NAME = "deepinv-dps"  # the first peer (kept for callers of deepinv_dps)
DEFAULT_STEPS = 1000  # DPS's; DDRM's and DiffPIR's defaults are 100 (see PEERS)
STANDIN_MESSAGE = "torchvision is not importable here; this stand-in only lets deepinv import"

# Exactly the names deepinv 0.5.0's import chain binds from torchvision (module → names); found by importing
# deepinv with a logging stand-in. ``import torchvision.transforms as T`` style imports bind the modules.
STANDIN_NAMES: dict[str, tuple[str, ...]] = {
    "torchvision": ("transforms", "utils", "datasets"),
    "torchvision.transforms": (
        "InterpolationMode", "CenterCrop", "Compose", "Resize", "ToTensor", "functional"
    ),
    "torchvision.transforms.functional": ("crop", "rotate"),
    "torchvision.utils": ("make_grid", "save_image"),
    "torchvision.datasets": ("folder", "utils"),
    "torchvision.datasets.folder": ("IMG_EXTENSIONS",),
    "torchvision.datasets.utils": ("download_and_extract_archive",),
}

_state: dict[str, Any] = {}  # "module": deepinv, "torchvision": "<version>" or "stand-in"


# --------------------------------------------------------------------------------- torchvision stand-in


class _Unavailable(type):
    """Metaclass of the stand-in placeholders: every use raises RuntimeError(STANDIN_MESSAGE).

    Placeholders are classes (not instances) so that annotations such as ``str | InterpolationMode``, which
    deepinv evaluates at import, still work."""

    def _fail(cls, what: str):
        raise RuntimeError(f"{STANDIN_MESSAGE} (used: {cls.__qualname__}{what})")

    def __getattr__(cls, name: str):
        if name.startswith("__"):  # Python's own probes (copy, pickle, typing) get the normal answer
            raise AttributeError(name)
        cls._fail(f".{name}")

    def __call__(cls, *args, **kwargs):
        cls._fail("(...)")

    def __iter__(cls):
        cls._fail(" iterated")

    def __len__(cls):
        cls._fail(" len()")

    def __contains__(cls, item):
        cls._fail(" 'in'")

    def __getitem__(cls, item):
        cls._fail("[...]")


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{STANDIN_MESSAGE}: '{self.__name__}.{name}' is not in the stand-in")


def _standin_modules() -> dict[str, types.ModuleType]:
    """Fresh stand-in modules for :data:`STANDIN_NAMES` (submodules linked as attributes)."""
    mods = {name: _StandInModule(name, f"stand-in for {name}: {STANDIN_MESSAGE}") for name in STANDIN_NAMES}
    for name, mod in mods.items():
        mod.__path__ = []  # a package, so "import torchvision.x.y" resolves through sys.modules
        mod.__version__ = "stand-in"
        for attr in STANDIN_NAMES[name]:
            sub = f"{name}.{attr}"
            if sub in mods:
                setattr(mod, attr, mods[sub])
            else:
                setattr(mod, attr, _Unavailable(attr, (), {"__module__": name, "__qualname__": sub}))
    return mods


def _torchvision_modules() -> list[str]:
    return [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]


def import_deepinv():
    """``import deepinv`` (cached), with the torchvision stand-in only if the real torchvision fails to
    import.

    Raises:
        StudioError: deepinv is not installed (``bash setup.sh`` installs it), or its import fails.
    """
    if "module" in _state:
        return _state["module"]
    if importlib.util.find_spec("deepinv") is None:
        raise StudioError(
            f"{PEER_NAME} needs deepinv=={DEEPINV_VERSION}, which is not installed (setup.sh installs it)"
        )
    try:
        import torchvision

        _state["torchvision"] = str(getattr(torchvision, "__version__", "?"))
        standin = {}
    except Exception:  # ImportError, or the CUDA wheel's RuntimeError at torchvision::nms
        for name in _torchvision_modules():  # half-imported leftovers of the failed import
            del sys.modules[name]
        standin = _standin_modules()
        sys.modules.update(standin)
        _state["torchvision"] = "stand-in"
    try:
        dinv = importlib.import_module("deepinv")
        importlib.import_module("deepinv.sampling")
    except Exception as err:
        raise StudioError(f"cannot import deepinv: {type(err).__name__}: {err}") from err
    finally:
        for name in standin:  # the stand-in lives only while deepinv imports
            if sys.modules.get(name) is standin[name]:
                del sys.modules[name]
    if getattr(dinv, "__version__", DEEPINV_VERSION) != DEEPINV_VERSION:
        raise StudioError(f"{PEER_NAME} is written for deepinv=={DEEPINV_VERSION}, found {dinv.__version__}")
    _state["module"] = dinv
    return dinv


def torchvision_note() -> str:
    """One line for result files: which torchvision deepinv imported."""
    import_deepinv()
    if _state["torchvision"] == "stand-in":
        return (
            f"{PEER_NAME}: deepinv {DEEPINV_VERSION} imported with a torchvision STAND-IN (no torchvision "
            "works beside torch 2.13.0+cpu): placeholders for the torchvision names deepinv imports, each "
            "raising RuntimeError if used; DPS sampling uses none of them (studio/eval/deepinv_peer.py)."
        )
    return f"{PEER_NAME}: deepinv {DEEPINV_VERSION} with torchvision {_state['torchvision']}."


# ------------------------------------------------------------------------------------- denoiser, physics


def make_denoiser(prior, callback: Callable[[int, int, Tensor, Tensor], Any] | None = None, total: int = 0):
    """Our pixel prior as a ``deepinv.models.Denoiser``: D(x, σ), x = x0 + σ n, x and σ in [0, 1] units.

    See the module docstring for the mapping (nearest timestep). The returned module counts its calls:
    ``.nfe`` (all) and ``.grad_nfe`` (those made with autograd on, i.e. followed by a backward pass).
    ``callback(step, total, x, x0)`` (our solvers' step-callback signature, model units, detached) is called
    after every call — one per step of each of the three samplers — with ``x`` the denoiser's input."""
    dinv = import_deepinv()

    class PriorDenoiser(dinv.models.Denoiser):
        def __init__(self, prior):
            super().__init__(device=prior.device)
            self.prior = prior
            ab = prior.alphas_cumprod.to(torch.float64)
            self.register_buffer("ratio", ((1 - ab) / ab).sqrt(), persistent=False)
            self.nfe = 0
            self.grad_nfe = 0

        def timesteps_for(self, sigma_model: Tensor) -> Tensor:
            """Nearest trained t per sample for noise std ``sigma_model`` (model units), shape (B,)."""
            ratio = self.ratio.to(sigma_model.device)
            return (ratio[None, :] - sigma_model.to(torch.float64)[:, None]).abs().argmin(dim=1)

        def forward(self, x: Tensor, sigma, *args, **kwargs) -> Tensor:
            minus_one_one = bool(kwargs.get("input_in_minus_one_one", False))
            sigma = self._handle_sigma(sigma, batch_size=x.shape[0], device=x.device, dtype=x.dtype)
            if not torch.isfinite(sigma).all() or (sigma < 0).any():
                raise StudioError(
                    f"{PEER_NAME}: denoiser noise level must be finite and >= 0, got {sigma.tolist()}"
                )
            x_m, sigma_m = (x, sigma) if minus_one_one else (2.0 * x - 1.0, 2.0 * sigma)
            scale = (1.0 + sigma_m**2).rsqrt().view(-1, *([1] * (x.dim() - 1)))
            t = self.timesteps_for(sigma_m)
            x0 = self.prior.predict(x_m * scale, t.to(x.device)).x0
            self.nfe += 1
            if torch.is_grad_enabled() and x.requires_grad:
                self.grad_nfe += 1
            if callback is not None:
                callback(self.nfe - 1, total, x_m.detach(), x0.detach())
            return x0 if minus_one_one else (x0 + 1.0) * 0.5

    return PriorDenoiser(prior)


def make_physics(operator, x_shape: tuple[int, ...], noise_sigma: float = 0.0):
    """Our operator (on [0, 1] images) as a DeepInverse physics: ``LinearPhysics(A, A_adjoint)`` for a
    linear operator, ``Physics(A)`` otherwise (DPS only uses A). ``noise_model`` records the Gaussian σ
    ([0, 1] units; DPS with ``guidance="norm"`` does not read it)."""
    dinv = import_deepinv()
    noise = dinv.physics.GaussianNoise(sigma=float(noise_sigma)) if noise_sigma > 0 else None
    extra = {"noise_model": noise} if noise is not None else {}
    if getattr(operator, "linear", False):
        shape = tuple(x_shape[-3:])
        return dinv.physics.LinearPhysics(
            A=operator.A, A_adjoint=lambda y, **_: operator.A_adjoint(y, shape), **extra
        )
    return dinv.physics.Physics(A=operator.A, **extra)


def make_decomposable_physics(operator, x_shape: tuple[int, ...], noise_sigma: float = 0.0,
                              zero_noise_model: bool = True, device: str | torch.device = "cpu"):
    """Our operator's SVD (``A = U diag(s) V^T``, :class:`studio.core.operators.SVD`) as DeepInverse's
    ``DecomposablePhysics(U, U_adjoint, V, V_adjoint, mask=s)``, spectral coordinates (B, N) with ``mask``
    (1, N), where singular values float32 cannot divide by (below eps · sqrt(N) · max, see
    :meth:`~studio.core.operators.SVD.usable`) are 0 (the operator's DDRM threshold is our DDRM's choice and
    not applied); ``None`` when the operator has no SVD. The noise model is
    ``GaussianNoise(noise_sigma)``; for ``noise_sigma == 0`` it is ``GaussianNoise(0)`` if
    ``zero_noise_model`` else DeepInverse's default."""
    dinv = import_deepinv()
    if not getattr(operator, "linear", False):
        return None
    shape = tuple(x_shape[-3:])
    svd = operator.svd(shape, device=device, dtype=torch.float32)
    if svd is None:
        return None
    observed_s = torch.where(svd.usable(threshold=False), svd.s, torch.zeros_like(svd.s))
    extra = {}
    if noise_sigma > 0 or zero_noise_model:
        extra["noise_model"] = dinv.physics.GaussianNoise(sigma=float(noise_sigma))
    return dinv.physics.DecomposablePhysics(
        U=svd.U, U_adjoint=svd.Ut, V=svd.V, V_adjoint=svd.Vt, mask=observed_s.reshape(1, -1), device=device,
        **extra,
    )


# ---------------------------------------------------------------------------------------------- the peers


@dataclass(frozen=True)
class Option:
    """A peer's variant option: a DeepInverse keyword, with the closed range it accepts."""

    kwarg: str
    default: float
    low: float
    high: float = math.inf
    low_open: bool = False  # True: the value must be > low

    def check(self, peer: str, key: str, value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        ok = math.isfinite(number) and (number > self.low if self.low_open else number >= self.low) \
            and number <= self.high
        if not ok:
            bound = f"> {self.low}" if self.low_open else f">= {self.low}"
            bound += f" and <= {self.high}" if math.isfinite(self.high) else ""
            raise StudioError(f"{peer}: {key} must be a number {bound}, got {value!r}")
        return number


@dataclass(frozen=True)
class Peer:
    """One DeepInverse sampler as a bench peer: its defaults, its variant options, what it needs."""

    name: str
    sampler: str  # deepinv.sampling.<sampler>
    default_steps: int
    options: dict[str, Option]
    needs_svd: bool
    note: str


_DPS_NOTE = (
    "`deepinv.sampling.DPS` with DeepInverse's defaults (VP schedule, DDPM solver, weight=1.0, norm "
    "guidance) except num_steps = steps + 1 (so NFE = steps) and a seeded rng. Its weight is not our scale: "
    "summed over the steps its guidance is about 5 x weight for any step count, ours 0.5 x steps for "
    "inpainting (variant deepinv-dps:weight=W for another weight)."
)

_DDRM_NOTE = (
    "`deepinv.sampling.DDRM` with its defaults (eta=0.85, etab=1.0, noise levels linspace(1, 0, steps) in "
    "[0, 1] image units: it starts at model-unit sigma 2, not pure noise) on a DecomposablePhysics from our "
    "operator's SVD; NFE = steps, no backward passes."
)

_DIFFPIR_NOTE = (
    "`deepinv.sampling.DiffPIR` with its defaults (zeta=0.1, lambda=7, its own DDPM-linear time grid) and "
    "the L2 data fidelity, whose prox is exact on a DecomposablePhysics from our operator's SVD; noise "
    "sigma from the task (0.05, DiffPIR's default, for a noiseless task); NFE = steps."
)


PEERS: dict[str, Peer] = {
    p.name: p for p in (
        Peer("deepinv-dps", "DPS", DEFAULT_STEPS, {"weight": Option("weight", 1.0, 0.0, low_open=True)},
             False, _DPS_NOTE),
        Peer("deepinv-ddrm", "DDRM", 100, {"eta": Option("eta", 0.85, 0.0, 1.0),
                                            "etab": Option("etab", 1.0, 0.0, 1.0)}, True, _DDRM_NOTE),
        Peer("deepinv-diffpir", "DiffPIR", 100, {"zeta": Option("zeta", 0.1, 0.0, 1.0),
                                                  "lambda": Option("lambda_", 7.0, 0.0, low_open=True)}, True,
             _DIFFPIR_NOTE),
    )
}


def get_peer(name: str) -> Peer:
    if name not in PEERS:
        raise StudioError(f"unknown DeepInverse peer {name!r} (known: {', '.join(PEERS)})")
    return PEERS[name]


def _sample(peer: Peer, dinv, denoiser, physics, y: Tensor, shape: tuple[int, ...], steps: int, seed: int,
            device, kwargs: dict[str, float]) -> tuple[Tensor, dict]:
    """Build ``deepinv.sampling.<peer.sampler>`` and sample; returns the [0, 1] output and the params used."""
    if peer.sampler == "DPS":
        sampler = dinv.sampling.DPS(denoiser, num_steps=steps + 1, device=device,
                                    rng=torch.Generator(device=device).manual_seed(seed), **kwargs)
        out = sampler(y, physics, x_init=shape, seed=seed)
        return out, {"num_steps": steps + 1, "schedule": "vp", "solver": "ddpm", "alpha": 1.0,
                     "guidance": "norm", "clip": [-1.0, 1.0], "minus_one_one": True}
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # both draw from the global RNG (see the module docstring)
        torch.manual_seed(seed)
        if peer.sampler == "DDRM":
            sampler = dinv.sampling.DDRM(denoiser, sigmas=np.linspace(1, 0, steps), **kwargs)
            out = sampler(y, physics)
            return out, {"sigmas": f"linspace(1, 0, {steps})",
                         "noise_sigma_physics": float(physics.noise_model.sigma)}
        sampler = dinv.sampling.DiffPIR(denoiser, data_fidelity=dinv.optim.data_fidelity.L2(), max_iter=steps,
                                        device=device, **kwargs)
        out = sampler(y, physics)
        sigma = getattr(physics.noise_model, "sigma", None)
        return out, {"max_iter": steps, "sigma": float(sigma) if sigma is not None else sampler.sigma,
                     "data_fidelity": "L2", "prox": "exact (SVD)"}


def run_peer(
    name: str,
    y: Tensor,
    operator,
    prior,
    *,
    steps: int | None = None,
    seed: int = 0,
    noise_sigma: float = 0.0,
    x_shape: tuple[int, ...] | None = None,
    device: str | torch.device = "cpu",
    callback: Callable[[int, int, Tensor, Tensor], Any] | None = None,
    **options: float,
) -> dict[str, Any]:
    """DeepInverse's ``name`` sampler on measurement ``y`` ([0, 1] units) with our ``prior`` and ``operator``.

    ``options``: the peer's variant options (e.g. ``weight`` for DPS, ``eta`` for DDRM, ``zeta`` / ``lambda``
    for DiffPIR). Returns ``{"image": [0, 1] tensor (clamped), "nfe", "grad_nfe", "wall_time_s",
    "relative_residual", "params"}``; ``wall_time_s`` times building the sampler and sampling (not the deepinv
    import, not the metrics). ``callback``: see :func:`make_denoiser` (its time is inside ``wall_time_s``).
    """
    peer = get_peer(name)
    steps = peer.default_steps if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise StudioError(f"{name}: steps must be a positive integer, got {steps!r}")
    if peer.sampler == "DDRM" and steps < 2:
        raise StudioError(f"{name}: steps must be >= 2 (noise levels from 1 to 0), got {steps}")
    unknown = set(options) - set(peer.options)
    if unknown:
        raise StudioError(f"{name} has no option {sorted(unknown)} (options: {', '.join(peer.options)})")
    values = {k: o.check(name, k, options.get(k, o.default)) for k, o in peer.options.items()}
    dinv = import_deepinv()
    if x_shape is None:
        if not getattr(operator, "linear", False):
            raise StudioError(f"{name}: pass x_shape=(C, H, W) for a nonlinear operator")
        x_shape = tuple(operator.input_shape(tuple(y.shape[1:])))
    shape = (y.shape[0], *tuple(x_shape)[-3:])
    y = y.to(device=device, dtype=torch.float32)
    operator = operator.to(device)
    if peer.needs_svd:
        physics = make_decomposable_physics(operator, shape, noise_sigma,
                                            zero_noise_model=peer.sampler == "DDRM", device=device)
        if physics is None:
            raise StudioError(f"{name} needs an operator with an SVD, not {type(operator).__name__}")
    else:
        physics = make_physics(operator, shape, noise_sigma)
    denoiser = make_denoiser(prior, callback, steps)
    sync_device(device)
    start = time.perf_counter()
    out, used = _sample(peer, dinv, denoiser, physics, y, shape, steps, int(seed), device,
                        {o.kwarg: values[k] for k, o in peer.options.items()})
    sync_device(device)
    wall = time.perf_counter() - start
    if not torch.isfinite(out).all():
        raise StudioError(f"{name}: the sample contains NaN/Inf (steps={steps}, options={values})")
    image = out.detach().to(torch.float32).clamp(0.0, 1.0)
    with torch.no_grad():
        r = (operator.observed(operator.A(image)) - y).flatten(1).norm(dim=1)
        rel = r / y.flatten(1).norm(dim=1).clamp_min(1e-12)
    params = {"steps": steps, **values, **used, "denoiser_timestep": "nearest", "seed": int(seed),
              "deepinv": DEEPINV_VERSION, "torchvision": _state["torchvision"]}
    return {
        "image": image.cpu(),
        "nfe": denoiser.nfe,
        "grad_nfe": denoiser.grad_nfe,
        "wall_time_s": wall,
        "relative_residual": rel.tolist(),
        "params": params,
    }


def deepinv_dps(y: Tensor, operator, prior, *, steps: int = DEFAULT_STEPS, weight: float = 1.0, **kwargs):
    """DeepInverse's DPS (:func:`run_peer` with ``"deepinv-dps"``)."""
    return run_peer("deepinv-dps", y, operator, prior, steps=steps, weight=weight, **kwargs)


# ------------------------------------------------------------------------------------ studio bench hook


def check() -> None:
    """Raise StudioError now (at ``--solvers`` parsing) if the peers cannot run here."""
    import_deepinv()


def parse_overrides(parts: list[str], name: str = PEER_NAME) -> dict[str, float]:
    """A bench variant's ``key=value`` parts → params, checked against the peer's options, e.g.
    ``deepinv-dps:weight=100``, ``deepinv-ddrm:eta=0.5``, ``deepinv-diffpir:lambda=20``."""
    peer = get_peer(name)
    params: dict[str, float] = {}
    for part in parts:
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep or key not in peer.options:
            takes = ", ".join(f"{k}=<number>" for k in peer.options)
            raise StudioError(f"{name} variants take {takes} only, got {part!r}")
        if key in params:
            raise StudioError(f"{name} variant sets {key} twice")
        params[key] = peer.options[key].check(name, key, value)
    return params


def bench_notes(name: str = PEER_NAME) -> list[str]:
    """Lines for ``results.md`` and the CLI output when the peer is benchmarked."""
    return [
        torchvision_note(),
        f"{name}: {get_peer(name).note} Same prior, operator, y and seeds as ours; our prior is its denoiser "
        "at the nearest trained timestep (studio/eval/deepinv_peer.py).",
    ]


def bench_row(ctx, task: str, solver: str, bench_image, seed: int, degraded) -> dict:
    """One DeepInverse peer run for ``studio bench``, with the fields of
    :func:`studio.eval.bench.runner.run_solver`.

    The residual trace is ‖y − A(x̂0)‖ of the x̂0 each step computes (the bench's ``ResidualTrace``, fed by
    the denoiser wrapper); its time is taken out of the wall time, as for our solvers."""
    clean = bench_image.image
    spec = ctx.spec(solver)  # e.g. "deepinv-dps" or a variant "deepinv-dps:weight=100"
    peer = get_peer(spec.base)
    base = {"task": task, "solver": solver, "image": bench_image.name, "seed": seed,
            "settings": ctx.settings_for(solver), "solver_base": spec.base,
            "solver_overrides": list(spec.overrides)}
    clean_residual = measurement_residual(degraded.operator, degraded.y, clean)
    if peer.needs_svd and (not getattr(degraded.operator, "linear", False)
                           or degraded.operator.svd(tuple(clean.shape[1:])) is None):
        return make_row(**base, status="unsupported", clean_residual=clean_residual,
                          error=f"{spec.base} needs an SVD")
    params = parse_overrides(list(spec.overrides), spec.base)
    timing = ctx.timing_for("pixel", tuple(clean.shape[-2:]))
    steps = ctx.steps.get(spec.base, peer.default_steps)
    trace = ResidualTrace(degraded.operator, degraded.y)
    try:
        with PeakMemory(ctx.device) as mem, NetworkTimer(ctx.priors["pixel"].unet, ctx.device) as network:
            res = run_peer(
                spec.base,
                degraded.y,
                degraded.operator,
                ctx.priors["pixel"],
                steps=steps,
                seed=seed,
                noise_sigma=noise_sigma_of(build_noise(degraded.task["noise"])),
                x_shape=tuple(clean.shape[1:]),
                device=ctx.device,
                callback=trace,
                **params,
            )
    except StudioError as err:
        return make_row(**base, status="failed", clean_residual=clean_residual, error=str(err))
    output = output_path(ctx.out, task, bench_image.name, seed, solver)
    save_image(res["image"], output)
    metrics = image_metrics(res["image"], clean)
    wall = res["wall_time_s"] - trace.time_s
    return make_row(
        **base,
        status="ok",
        psnr=metrics["psnr"],
        ssim=metrics["ssim"],
        nfe=res["nfe"],
        grad_nfe=res["grad_nfe"],
        wall_time_s=wall,
        loop_time_s=wall,
        **cost_fields(wall, res["nfe"], res["grad_nfe"], timing, mem, network),
        relative_residual=res["relative_residual"][0],
        residual=measurement_residual(degraded.operator, degraded.y, res["image"]),
        clean_residual=clean_residual,
        residual_trace=trace.values(),
        trace_time_s=trace.time_s,
        solver_extra={"peer": "deepinv", "torchvision": res["params"]["torchvision"]},
        params=res["params"],
        output=str(output.relative_to(ctx.out)),
        **timing,
    )


register_peer(sys.modules[__name__], *PEERS)  # the bench runs these names through bench_row above


__all__ = [
    "DEEPINV_VERSION",
    "PEERS",
    "PEER_NAME",
    "STANDIN_MESSAGE",
    "STANDIN_NAMES",
    "bench_notes",
    "bench_row",
    "check",
    "deepinv_dps",
    "import_deepinv",
    "get_peer",
    "make_decomposable_physics",
    "make_denoiser",
    "make_physics",
    "run_peer",
    "parse_overrides",
    "torchvision_note",
]
