"""Classical baselines (scikit-image, ``classical:*``): what they run per task, with which fixed parameters
(:data:`BASELINES_NOTE`, also written into ``results.md``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from studio.core.operators import reflect_index

Tensor = torch.Tensor

# Classical baseline parameters: fixed for every image (not tuned per image); see BASELINES_NOTE. Chosen once
# from small sweeps (Wiener balance 0.005-0.2, RL 5-50 iterations, TV 0.5-2 x sigma) on every 5th held-out
# emoji at 32x32 and the default task noise: a light tuning on bench images, which favours the baselines.
WIENER_BALANCE = 0.02
RICHARDSON_LUCY_ITERS = 20  # at a Gaussian sigma of 3 px (the sweep's kernel); see richardson_lucy_iters
TV_WEIGHT_PER_SIGMA = 0.6

BASELINES_NOTE = f"""\
Classical baselines (scikit-image, `classical:*`) restore the very same measurement y; their NFE is 0.
Parameters are fixed for all images (not tuned per image). They were chosen once from small sweeps on every
5th held-out emoji (32x32, default task noise) — a light tuning on bench images that favours the baselines:

* inpainting: `inpaint_biharmonic` (channel_axis=-1) on the unobserved pixels (operator mask = 0);
  observed pixels keep their (noisy) values.
* Gaussian / motion blur: deconvolution per channel with the operator's exact kernel —
  `wiener` (balance = {WIENER_BALANCE}, default Laplacian regulariser), `unsupervised_wiener` (balance
  estimated by its Gibbs sampler, seeded with the run seed) and `richardson_lucy` (num_iter =
  {RICHARDSON_LUCY_ITERS} at a Gaussian sigma of 3 px or a 61-px motion kernel, in proportion to sigma or
  the kernel side for others, at least 3; y clipped to [0, 1] first: more iterations deconvolve
  further and amplify more noise, so a milder blur wants fewer — on every 5th held-out emoji at the 32-px
  default, sigma 1 px and noise 0.025, 5 iterations give 22.6 dB and 20 give 21.1, below y's 21.5).
  Boundaries: our blur operators extend the image
  symmetrically (reflect); scikit-image's Wiener assumes a periodic image and Richardson-Lucy a zero-padded
  one. To limit that mismatch, y is extended by the kernel radius before deconvolution and cropped back
  after: by reflection for the symmetric Gaussian kernel (then the extended y is exactly the blur of the
  extended image, so only the outer padding is inconsistent), by edge replication for a motion kernel
  (reflecting a non-symmetric blur is inconsistent; replication measured better). With 61-px motion
  kernels on 32-px images (the task's setting at every size before it scaled with the image) the
  blur spans the whole image and this mismatch dominates: on the held-out emoji Wiener only about matched y
  itself, unsupervised Wiener and Richardson-Lucy fell below it.
* super-resolution: bicubic upsampling of y (`skimage.transform.resize`, order=3, no anti-aliasing).
* denoising: `denoise_tv_chambolle` (channel_axis=-1) with weight = {TV_WEIGHT_PER_SIGMA} × σ
  (σ = the task's noise std in [0, 1] units; σ = 0 returns y).
* colorization: no classical baseline.
"""


# ----------------------------------------------------------------------------------------------- inputs



def to_hwc(t: Tensor) -> np.ndarray:
    return t[0].detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()


def to_chw(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.clip(a, 0.0, 1.0).transpose(2, 0, 1))).float()[None]


def blur_kernel(operator) -> np.ndarray:
    """The 2-D convolution kernel of a GaussianBlur (outer product of its taps) or MotionBlur operator."""
    if hasattr(operator, "taps"):
        taps = operator.taps.to(torch.float64).numpy()
        return np.outer(taps, taps)
    return (
        operator._k64.to(torch.float64).numpy()
        if hasattr(operator, "_k64")
        else operator.kernel.double().numpy()
    )


def reflect_pad(img: np.ndarray, rh: int, rw: int) -> np.ndarray:
    """H x W x C → symmetric (reflect, whole-sample) extension by rh/rw, folded like our operators."""
    h, w = img.shape[:2]
    ih = reflect_index(torch.arange(-rh, h + rh), h).numpy()
    iw = reflect_index(torch.arange(-rw, w + rw), w).numpy()
    return img[ih][:, iw]


def deconvolve(
    y: np.ndarray, kernel: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> np.ndarray:
    """Per-channel ``fn(channel, kernel)`` on y extended by the kernel radius, cropped back.

    Symmetric kernels (Gaussian): reflect extension, the operator's own boundary, under which the extended
    y is exactly the blur of the extended image. Other kernels (motion): edge (replicate) extension, since
    reflecting a non-symmetric blur is inconsistent; it measured better than reflect on the held-out emoji.
    """
    rh, rw = kernel.shape[0] // 2, kernel.shape[1] // 2
    h, w = y.shape[:2]
    if np.allclose(kernel, kernel[::-1, ::-1]):
        padded = reflect_pad(y, rh, rw)
    else:
        padded = np.pad(y, ((rh, rh), (rw, rw), (0, 0)), mode="edge")
    out = np.stack([fn(padded[:, :, c], kernel) for c in range(y.shape[2])], axis=2)
    return out[rh : rh + h, rw : rw + w]


def baselines_for(
    task_cfg: dict, operator, y: Tensor, image_size: tuple[int, int], seed: int
) -> dict[str, Callable[[], np.ndarray]]:
    """name → zero-argument function returning the H x W x 3 estimate, for this task's operator."""
    from skimage import restoration, transform  # slow to import; needed only when a baseline runs

    op_name = task_cfg["operator"]["name"]
    yn = to_hwc(y)
    if op_name in ("inpaint_box", "inpaint_random", "inpaint_mask"):
        mask = operator.mask.expand(3, *image_size)
        unknown = (mask == 0).any(dim=0).numpy()
        return {"classical:biharmonic": lambda: restoration.inpaint_biharmonic(yn, unknown, channel_axis=-1)}
    if op_name in ("gaussian_blur", "motion_blur"):
        k = blur_kernel(operator)
        rng = np.random.default_rng(seed)
        return {
            "classical:wiener": lambda: deconvolve(
                yn, k, lambda c, p: restoration.wiener(c, p, WIENER_BALANCE)
            ),
            "classical:unsupervised_wiener": lambda: deconvolve(
                yn, k, lambda c, p: restoration.unsupervised_wiener(c, p, rng=rng)[0]
            ),
            "classical:richardson_lucy": lambda: deconvolve(
                np.clip(yn, 0.0, 1.0),
                k,
                lambda c, p: restoration.richardson_lucy(c, p, num_iter=richardson_lucy_iters(operator)),
            ),
        }
    if op_name == "super_resolution":
        return {
            "classical:bicubic": lambda: transform.resize(
                yn, (*image_size, 3), order=3, mode="reflect", anti_aliasing=False
            )
        }
    if op_name == "denoise":
        sigma = float(task_cfg["noise"].get("sigma", 0.0))
        if sigma <= 0:
            return {"classical:tv_chambolle": lambda: yn}
        return {
            "classical:tv_chambolle": lambda: restoration.denoise_tv_chambolle(
                yn, weight=TV_WEIGHT_PER_SIGMA * sigma, channel_axis=-1
            )
        }
    return {}


def baseline_names(task_cfg: dict) -> list[str]:
    """The ``classical:*`` names the bench runs for a task (no computation)."""
    op = task_cfg["operator"]["name"]
    if op.startswith("inpaint"):
        return ["classical:biharmonic"]
    if op in ("gaussian_blur", "motion_blur"):
        return ["classical:wiener", "classical:unsupervised_wiener", "classical:richardson_lucy"]
    return {"super_resolution": ["classical:bicubic"], "denoise": ["classical:tv_chambolle"]}.get(op, [])



def richardson_lucy_iters(operator) -> int:
    """Richardson-Lucy's iteration count for a blur operator: :data:`RICHARDSON_LUCY_ITERS` at the blur it
    was chosen on (Gaussian sigma 3 px, a 61-px motion kernel), in proportion to the blur's width for
    another (sigma / 3, kernel side / 61), at least 3."""
    sigma = getattr(operator, "sigma", None)
    scale = float(sigma) / 3.0 if sigma is not None else blur_kernel(operator).shape[-1] / 61
    return max(3, round(RICHARDSON_LUCY_ITERS * scale))


def baseline_params(name: str, operator=None) -> dict:
    """The fixed parameters of baseline ``name`` on ``operator`` (for the bench record)."""
    if name == "classical:richardson_lucy":
        return {"num_iter": richardson_lucy_iters(operator)}
    return {
        "classical:wiener": {"balance": WIENER_BALANCE},
        "classical:tv_chambolle": {"weight_per_sigma": TV_WEIGHT_PER_SIGMA},
        "classical:bicubic": {"order": 3},
    }.get(name, {})
