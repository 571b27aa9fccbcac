"""Analytic priors with exact denoisers: a Gaussian and a Gaussian mixture.

For x_0 ~ N(μ, Σ) and x_t = sqrt(ᾱ) x_0 + sqrt(1-ᾱ) ε, x_t is Gaussian and Tweedie's estimate is exact:

    x̂_0(x_t) = E[x_0 | x_t] = μ + sqrt(ᾱ) Σ (ᾱ Σ + (1-ᾱ) I)^{-1} (x_t - sqrt(ᾱ) μ).

With Σ = Q diag(λ) Qᵀ this is μ + Q diag(sqrt(ᾱ) λ / (ᾱ λ + 1 - ᾱ)) Qᵀ (x_t - sqrt(ᾱ) μ).
For a mixture Σ_k π_k N(μ_k, Σ_k), x̂_0 = Σ_k w_k(x_t) x̂_0^{(k)}(x_t) with the responsibilities
w_k ∝ π_k N(x_t; sqrt(ᾱ) μ_k, ᾱ Σ_k + (1-ᾱ) I).

Under a linear measurement y = A x_0 + n, n ~ N(0, σ² I), the Gaussian prior's posterior is Gaussian
(:func:`gaussian_posterior`): the ground truth the solvers are tested against.

Samples are vectors reshaped to ``sample_shape`` (C, H, W) so the image operators apply unchanged.
All algebra runs in float64; results come back in the input dtype.
"""

from __future__ import annotations

import math

import torch

from models.base import DiffusionPrior, Prediction, linear_alphas_cumprod

Tensor = torch.Tensor


def _check_covariance(cov: Tensor, dim: int) -> Tensor:
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if cov.shape != (dim, dim):
        raise ValueError(f"covariance has shape {tuple(cov.shape)}, expected ({dim}, {dim})")
    if not torch.allclose(cov, cov.T, atol=1e-10):
        raise ValueError("covariance is not symmetric")
    return 0.5 * (cov + cov.T)


class GaussianMixturePrior(DiffusionPrior):
    """Exact prior Σ_k π_k N(μ_k, Σ_k) over vectors of size C·H·W, in model space."""

    def __init__(
        self,
        means: Tensor,
        covariances: Tensor,
        weights: Tensor | None = None,
        sample_shape: tuple[int, int, int] | None = None,
        alphas_cumprod: Tensor | None = None,
        eig: tuple[Tensor, Tensor] | None = None,
    ):
        super().__init__(linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must be (K, d), got shape {tuple(means.shape)}")
        k, d = means.shape
        covariances = torch.stack([_check_covariance(c, d) for c in torch.as_tensor(covariances)])
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else weights
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or (weights <= 0).any():
            raise ValueError(f"weights must be {k} positive numbers, got {weights.tolist()}")
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (1, 1, d)
        if math.prod(self.sample_shape) != d:
            raise ValueError(f"sample_shape {self.sample_shape} does not hold {d} values")
        # eig: precomputed (eigenvalues (K, d), eigenvectors (K, d, d)) to skip a slow eigh on large d
        if eig is None:
            evals, evecs = torch.linalg.eigh(covariances)
        else:
            evals, evecs = (torch.as_tensor(e, dtype=torch.float64) for e in eig)
        if (evals < -1e-10).any():
            raise ValueError(
                f"covariance is not positive semi-definite (eigenvalue {evals.min().item():.3g})"
            )
        self.register_buffer("means", means, persistent=False)
        self.register_buffer("covariances", covariances, persistent=False)
        self.register_buffer("log_weights", (weights / weights.sum()).log(), persistent=False)
        self.register_buffer("eigvals", evals.clamp_min(0.0), persistent=False)
        self.register_buffer("eigvecs", evecs, persistent=False)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _predict(self, x_t: Tensor, t: int | Tensor) -> Prediction:
        shape, dtype = x_t.shape, x_t.dtype
        x = x_t.reshape(shape[0], -1).to(torch.float64)  # (B, d)
        ab = self.alphas_cumprod[torch.as_tensor(t, device=self.device)].reshape(-1, 1, 1)  # (B|1, 1, 1)
        # Work in each component's eigenbasis: z = Qᵀ (x_t - sqrt(ᾱ) μ_k), shape (B, K, d)
        centred = x[:, None, :] - ab.sqrt() * self.means[None]
        z = torch.einsum("kdj,bkd->bkj", self.eigvecs, centred)
        var_t = ab * self.eigvals[None] + (1.0 - ab)  # eigenvalues of ᾱΣ + (1-ᾱ)I, (B|1, K, d)
        x0_k = self.means[None] + torch.einsum(
            "kdj,bkj->bkd", self.eigvecs, (ab.sqrt() * self.eigvals[None] / var_t) * z
        )
        if self.means.shape[0] == 1:
            x0 = x0_k[:, 0]
        else:
            log_lik = -0.5 * ((z**2 / var_t).sum(-1) + var_t.log().sum(-1))
            w = torch.softmax(self.log_weights[None] + log_lik, dim=1)  # (B, K)
            x0 = (w[..., None] * x0_k).sum(1)
        ab2 = ab.reshape(-1, 1)
        eps = (x - ab2.sqrt() * x0) / (1.0 - ab2).sqrt()
        return Prediction(eps=eps.to(dtype).reshape(shape), x0=x0.to(dtype).reshape(shape))

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of x_0, shape (n, *sample_shape), float64."""
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator, device=self.device)
        root = self.eigvecs * self.eigvals.sqrt()[:, None, :]  # Σ_k^{1/2} = Q diag(sqrt λ)
        x = self.means[comp] + torch.einsum("ndj,nj->nd", root[comp], z)
        return x.reshape(n, *self.sample_shape)

    def describe(self) -> dict:
        return {**super().describe(), "components": int(self.means.shape[0]), "dim": self.dim}


class GaussianPrior(GaussianMixturePrior):
    """Exact prior N(μ, Σ): a one-component mixture."""

    def __init__(self, mean: Tensor, covariance: Tensor, **kwargs):
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
        super().__init__(mean, torch.as_tensor(covariance, dtype=torch.float64)[None], **kwargs)

    @property
    def mean(self) -> Tensor:
        return self.means[0]

    @property
    def covariance(self) -> Tensor:
        return self.covariances[0]


def gaussian_posterior(
    mean: Tensor, covariance: Tensor, A: Tensor, y: Tensor, noise_std: float
) -> tuple[Tensor, Tensor]:
    """Posterior N(m, P) of x ~ N(mean, covariance) given y = A x + n, n ~ N(0, noise_std² I).

        m = μ + Σ Aᵀ (A Σ Aᵀ + σ² I)^{-1} (y - A μ),   P = Σ - Σ Aᵀ (A Σ Aᵀ + σ² I)^{-1} A Σ.

    ``A`` is the dense (m, d) matrix, ``y`` a (m,) vector. A pseudo-inverse handles σ = 0 with a
    rank-deficient A Σ Aᵀ (e.g. inpainting's unobserved zeros).
    """
    mean, cov, A, y = (torch.as_tensor(v, dtype=torch.float64) for v in (mean, covariance, A, y))
    S = A @ cov @ A.T + noise_std**2 * torch.eye(A.shape[0], dtype=torch.float64)
    gain = cov @ A.T @ torch.linalg.pinv(S, hermitian=True, rtol=1e-12)
    return mean + gain @ (y - A @ mean), cov - gain @ A @ cov


def random_covariance(dim: int, generator: torch.Generator, condition: float = 20.0) -> Tensor:
    """A random well-posed non-diagonal covariance (eigenvalues log-spaced over ``condition``)."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=generator))
    evals = torch.logspace(0, -math.log10(condition), dim, dtype=torch.float64)
    return (q * evals) @ q.T
