"""What the bench measures besides the metrics: peak memory, network time (:class:`NetworkTimer`, the
model-eval calibration :func:`time_model_eval` and the :func:`overhead_ratio` built from them) and the
measurement residual, final (:func:`measurement_residual`) and per step (:class:`ResidualTrace`). See
:mod:`studio.eval.bench` for the definitions."""

from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time

import psutil
import torch

from solvers.common import per_sample_norm
from studio.core.conventions import to_image

Tensor = torch.Tensor


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the next run's RSS increase is visible."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager: ``.mb`` = peak memory of the block (see the module docstring for what)."""

    interval_s = 0.005

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.device = device
        self.mb: float | None = None
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_rss_increase"

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        gc.collect()
        _malloc_trim()
        self._proc = psutil.Process()
        self._base = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.mb = (self._peak - self._base) / 2**20


def sync_device(device: str) -> None:
    """Wait for queued CUDA work (timing); a no-op on CPU."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def time_model_eval(prior, image_size: tuple[int, int], device: str, repeats: int = 5) -> dict[str, float]:
    """Seconds for one ``prior.predict`` at batch 1 without autograd (``t_fwd_s``), with autograd recording
    (``t_fwd_grad_s``: the input requires grad, no backward) and forward + backward w.r.t. the input
    (``t_fwdbwd_s``): median of ``repeats`` after one warm-up, at the middle timestep. A latent prior
    is timed on the latent of an ``image_size`` image (the UNet only; its current prompt, no guidance)."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, 3, *image_size)
    if hasattr(prior, "latent_shape"):
        shape = prior.latent_shape(shape)
    x = torch.randn(shape, generator=gen).to(device)
    t = prior.num_train_timesteps // 2

    def fwd():
        with torch.no_grad():
            prior.predict(x, t)

    def fwd_grad():
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            prior.predict(xg, t)

    def fwdbwd():
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(prior.predict(xg, t).x0.sum(), xg)

    out = {}
    for key, fn in (("t_fwd_s", fwd), ("t_fwd_grad_s", fwd_grad), ("t_fwdbwd_s", fwdbwd)):
        fn()
        times = []
        for _ in range(repeats):
            sync_device(device)
            start = time.perf_counter()
            fn()
            sync_device(device)
            times.append(time.perf_counter() - start)
        out[key] = statistics.median(times)
    return out


class NetworkTimer:
    """Forward hooks on a network (``prior.unet``; ``None``: nothing is recorded) during a solve:
    ``time_s`` spent inside its forward calls, ``calls`` (invocations), ``samples`` (summed batch sizes: NFE,
    a CFG pair = 2) and ``grad_samples`` (those run with autograd on). The time normalises the overhead ratio
    by the network's speed *during the run*, so that a machine busier (or idler) than when the model was
    timed does not show up as solver overhead; the counts give an exact NFE."""

    def __init__(self, net: torch.nn.Module | None, device: str):
        self.net = net
        self.device = device
        self.time_s = self.grad_time_s = 0.0
        self.calls = self.samples = self.grad_samples = self.grad_calls = 0
        self._grad = False
        self._start = 0.0
        self._handles: list = []

    def _pre(self, _module, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("sample")
        n = int(x.shape[0]) if isinstance(x, Tensor) and x.dim() > 0 else 1
        self.calls += 1
        self.samples += n
        self._grad = torch.is_grad_enabled()
        if self._grad:
            self.grad_samples += n
            self.grad_calls += 1
        sync_device(self.device)
        self._start = time.perf_counter()

    def _post(self, *_) -> None:
        sync_device(self.device)
        elapsed = time.perf_counter() - self._start
        self.time_s += elapsed
        if self._grad:
            self.grad_time_s += elapsed

    def __enter__(self) -> "NetworkTimer":
        if self.net is not None:
            self._handles = [self.net.register_forward_pre_hook(self._pre, with_kwargs=True),
                             self.net.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def overhead_ratio(wall_time_s: float, nfe: int, grad_nfe: int, timing: dict[str, float],
                   network: NetworkTimer | None = None) -> float | None:
    """wall time / model-only time; None without model evaluations.

    With ``network`` (the in-run timer): model-only time = the measured time inside the network's forward
    calls + the backward passes, estimated as (the in-run time of the forwards recorded for autograd) ×
    (t_fwdbwd − t_fwd_grad) / t_fwd_grad, the calibration's backward-to-recorded-forward ratio. (A forward
    recorded for autograd is slower than a no-grad one; measuring the backward against the no-grad forward
    counted that difference twice and made DPS look faster than its network, ratio ≈ 0.7.) Without it:
    (nfe − grad_nfe) · t_fwd + grad_nfe · t_fwdbwd from the calibration alone (sensitive to load drift
    between calibration and run)."""
    if nfe <= 0:
        return None
    if network is not None and network.calls > 0:
        t_rec = timing.get("t_fwd_grad_s", timing["t_fwd_s"])
        backward_factor = max(0.0, (timing["t_fwdbwd_s"] - t_rec) / t_rec)
        model_time = network.time_s + network.grad_time_s * backward_factor
    else:
        model_time = (nfe - grad_nfe) * timing["t_fwd_s"] + grad_nfe * timing["t_fwdbwd_s"]
    return wall_time_s / model_time if model_time > 0 else None


def cost_fields(wall_time_s: float, nfe: int, grad_nfe: int, timing: dict[str, float], memory: PeakMemory,
                network: NetworkTimer) -> dict:
    """A solve's cost fields of a bench row: peak memory, the overhead ratio (in-run network time, and the
    calibration alone) and the in-run network time."""
    return {
        "peak_memory_mb": memory.mb,
        "memory_kind": memory.kind,
        "overhead_ratio": overhead_ratio(wall_time_s, nfe, grad_nfe, timing, network),
        "overhead_ratio_calibrated": overhead_ratio(wall_time_s, nfe, grad_nfe, timing),
        "network_time_s": network.time_s,
        "network_grad_time_s": network.grad_time_s,
    }


def measurement_residual(operator, y: Tensor, image: Tensor) -> float:
    """‖y − A(image)‖₂ over the measured entries (``operator.observed``), [0, 1] image units, sample 0."""
    dev = operator._device() if hasattr(operator, "_device") else y.device
    with torch.no_grad():
        r = operator.observed(operator.A(image.to(dev, torch.float32))) - y.to(dev, torch.float32)
    return float(per_sample_norm(r)[0])


class ResidualTrace:
    """A solver step callback recording ‖y − A(clip(x̂_0))‖₂ ([0, 1] image units) of every step's x̂_0.

    x̂_0 is what the solver passes to its callback (model units, [-1, 1]): no network evaluation is added,
    only one operator application per step. Norms stay on the device until :meth:`values` (no sync per
    step); ``time_s`` is the callback's own time, to be subtracted from the solve's wall time."""

    def __init__(self, operator, y: Tensor):
        self.operator, self.y = operator, y
        self._norms: list[Tensor] = []
        self.time_s = 0.0

    def __call__(self, step: int, total: int, x_t: Tensor, x0: Tensor) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            image = to_image(x0.float()).clamp(0.0, 1.0)
            y = self.y.to(image.device, image.dtype)
            self._norms.append(per_sample_norm(self.operator.observed(self.operator.A(image)) - y)[0])
        self.time_s += time.perf_counter() - start

    def values(self) -> list[float]:
        return torch.stack(self._norms).cpu().tolist() if self._norms else []
