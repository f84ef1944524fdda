"""Heteroscedastic Gaussian regression: the network predicts a mean and a scale per output.

Outputs ``(B, 2K)``: the first ``K`` columns are means ``μ``, the last ``K`` parametrise the
noise, as log-variances ``ℓ = log σ²`` (``parametrisation="log_var"``) or through a
softplus scale ``σ = softplus(s)`` (``"softplus"``). Targets are ``(B, K)``.

The curvature is the GGN of the Gaussian *in its natural parameters*
``η = (μ/σ², −1/(2σ²))``: the negative log-likelihood is convex in ``η`` with Hessian
``Cov[(y, y²)]``, so ``G = Σₙ Jₙᵀ (∂η/∂f)ᵀ Cov[(y, y²)] (∂η/∂f) Jₙ``, which is PSD and equals
the Fisher information. In the output coordinates its middle matrix is diagonal:
``diag(1/σ², 1/2)`` for ``(μ, ℓ)`` and ``diag(1/σ², 2 sigmoid(s)²/σ²)`` for ``(μ, s)``. (The
Hessian of the loss in ``(μ, ℓ)`` itself is indefinite away from the mode.)

The predictive splits the variance into epistemic (the posterior's variance of ``μ``) and
aleatoric (the posterior mean of ``σ²``: ``exp(m + v/2)`` for a Gaussian log-variance, by
Gauss–Hermite quadrature for the softplus scale).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from laplacefim.likelihoods.base import NoNoise, OutputCurvature, Targets, floating_targets
from laplacefim.likelihoods.regression import gaussian_nll, gaussian_prediction
from laplacefim.options import Link
from laplacefim.prediction import Prediction, sample_moments, variances

PARAMETRISATIONS = ("log_var", "softplus")
# Gauss–Hermite nodes for E[softplus(s)²] under a Gaussian s (exact for polynomials of
# degree < 2·HERMITE_NODES; softplus² is smooth, so the error is far below float32's).
HERMITE_NODES = 32


class Heteroscedastic(NoNoise):
    """Gaussian likelihood whose mean and noise scale are both model outputs.

    Args:
        parametrisation: ``"log_var"`` (outputs ``[μ, log σ²]``) or ``"softplus"``
            (outputs ``[μ, s]`` with ``σ = softplus(s)``).

    Raises:
        ValueError: For an unknown parametrisation.

    Example:
        >>> la = Laplace(model, likelihood="heteroscedastic")  # model outputs (B, 2K)
        >>> pred = la.fit(loader).predict(x)
        >>> pred.epistemic_var, pred.aleatoric_var
    """

    name = "heteroscedastic"
    task = "regression"
    expected_targets = "finite targets"

    def __init__(self, parametrisation: str = "log_var") -> None:
        if parametrisation not in PARAMETRISATIONS:
            raise ValueError(
                f"parametrisation={parametrisation!r} is not valid; expected one of "
                f"{list(PARAMETRISATIONS)}."
            )
        self.parametrisation = parametrisation

    def options(self) -> dict[str, object]:
        """The constructor's arguments (kept when saving)."""
        return {"parametrisation": self.parametrisation}

    # ---------------------------------------------------------------- the model's outputs
    def outputs(self, f: Tensor) -> Tensor:
        """Return the outputs as ``(B, 2K)``, or raise if their shape is wrong."""
        if f.ndim != 2 or f.shape[1] % 2:
            raise ValueError(
                "heteroscedastic expects model outputs of shape (B, 2K) — K means followed by "
                f"K {self._second_name()} — got {tuple(f.shape)}."
            )
        return f

    def _second_name(self) -> str:
        return "log-variances" if self.parametrisation == "log_var" else "softplus scales"

    def _split(self, f: Tensor) -> tuple[Tensor, Tensor]:
        k = f.shape[1] // 2
        return f[:, :k], f[:, k:]

    def _sigma(self, raw: Tensor) -> Tensor:
        if self.parametrisation == "log_var":
            return (0.5 * raw).exp()
        return F.softplus(raw)

    def _scale_derivative(self, raw: Tensor, sigma: Tensor) -> Tensor:
        """``dσ/d(raw) / σ``: ``1/2`` for a log-variance, ``sigmoid(s)/σ`` for softplus."""
        if self.parametrisation == "log_var":
            return torch.full_like(raw, 0.5)
        return raw.sigmoid() / sigma

    def targets(self, f: Tensor, y: Tensor) -> Targets:
        """Check floating-point targets ``(B, K)``."""
        return floating_targets(f, y, f.shape[1] // 2, self.name)

    def loss_stats(self, f: Tensor, y: Tensor) -> Tensor:
        """The summed negative log-likelihood, constants included, 0-d."""
        mu, raw = self._split(f)
        sigma = self._sigma(raw)
        z = (y - mu) / sigma
        return (0.5 * z.square() + sigma.log() + 0.5 * math.log(2 * math.pi)).sum()

    def log_likelihood(self, stats: Tensor, n_data: int, noise: Tensor) -> Tensor:
        """Log-likelihood of the data from their summed statistics."""
        return -stats

    # ---------------------------------------------------------------- curvature columns
    def hessian_sqrt(self, f: Tensor, noise: Tensor) -> Tensor:
        """Columns of the Fisher in the outputs: ``e_μ/σ`` and ``e_raw·√2·(dσ/draw)/σ``."""
        mu, raw = self._split(f)
        sigma = self._sigma(raw)
        k = mu.shape[1]
        weights = torch.cat([1.0 / sigma, math.sqrt(2) * self._scale_derivative(raw, sigma)], 1)
        eye = torch.eye(2 * k, dtype=f.dtype, device=f.device)
        return eye[:, None, :] * weights.T[:, :, None]

    def _gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """The NLL's gradient w.r.t. the outputs at targets ``y (..., B, K)``."""
        mu, raw = self._split(f)
        sigma = self._sigma(raw)
        z = (y - mu) / sigma
        scale = self._scale_derivative(raw, sigma).expand_as(z)
        return torch.cat([-z / sigma, (1 - z.square()) * scale], -1)

    def output_curvature(self, f: Tensor, noise: Tensor) -> OutputCurvature | None:
        """None: the columns are formed (two outputs per target, a small ``C``)."""
        return None

    def sampled_gradients(
        self, f: Tensor, noise: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Loss gradients at ``ỹ ~ N(μ, σ²)`` over √k; ``(k, B, 2K)``."""
        mu, raw = self._split(f)
        sigma = self._sigma(raw)
        eps = torch.randn(
            (n_samples, *mu.shape), dtype=f.dtype, device=f.device, generator=generator
        )
        return self._gradient(f, mu + sigma * eps) / math.sqrt(n_samples)

    def gradient(self, f: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """Loss gradient at the true targets; ``(1, B, 2K)``."""
        return self._gradient(f, y)[None]

    # ---------------------------------------------------------------- predictives
    def _aleatoric(self, raw_mean: Tensor, raw_var: Tensor) -> Tensor:
        """``E[σ²]`` for ``raw ~ N(raw_mean, raw_var)``."""
        if self.parametrisation == "log_var":
            return (raw_mean + 0.5 * raw_var).exp()
        nodes, weights = np.polynomial.hermite.hermgauss(HERMITE_NODES)
        x = torch.as_tensor(nodes, dtype=raw_mean.dtype, device=raw_mean.device)
        w = torch.as_tensor(
            weights / math.sqrt(math.pi), dtype=raw_mean.dtype, device=raw_mean.device
        )
        s = raw_mean[..., None] + math.sqrt(2.0) * raw_var.clamp_min(0).sqrt()[..., None] * x
        return (F.softplus(s).square() * w).sum(-1)

    def predictive(
        self,
        mean: Tensor,
        cov: Tensor,
        *,
        link: Link,
        noise: Tensor,
        n_samples: int,
        generator: torch.Generator | None,
        joint_outputs: bool,
    ) -> Prediction:
        """Mean ``μ``; epistemic ``Var[μ]``; aleatoric ``E[σ²]`` under the output Gaussian."""
        k = mean.shape[1] // 2
        var = variances(cov)
        aleatoric = self._aleatoric(mean[:, k:], var[:, k:])
        prediction = gaussian_prediction(mean[:, :k], var[:, :k], aleatoric, False)
        return replace(prediction, logit_cov=cov if joint_outputs else None)

    def sampled_predictive(
        self, samples: Tensor, *, noise: Tensor, joint_outputs: bool
    ) -> Prediction:
        """Sample mean and variance of ``μ``; the sample mean of ``σ²``."""
        k = samples.shape[-1] // 2
        mean, cov = sample_moments(samples)
        aleatoric = self._sigma(samples[..., k:]).square().mean(0)
        prediction = gaussian_prediction(mean[:, :k], cov[:, :k, :k], aleatoric, False)
        return replace(prediction, logit_cov=cov if joint_outputs else None)

    def predictive_nll(self, prediction: Prediction, y: Tensor) -> Tensor:
        """Gaussian NLL under the predictive mean and total variance."""
        return gaussian_nll(prediction, y)

    def kl(self, f1: Tensor, f2: Tensor, noise: Tensor) -> Tensor:
        """``KL(N(μ₁, σ₁²) ‖ N(μ₂, σ₂²))`` summed over outputs, per datum."""
        mu1, raw1 = self._split(f1)
        mu2, raw2 = self._split(f2)
        s1, s2 = self._sigma(raw1), self._sigma(raw2)
        return (
            (s2 / s1).log() + (s1.square() + (mu1 - mu2).square()) / (2 * s2.square()) - 0.5
        ).sum(-1)

    def point_prediction(self, f: Tensor) -> Tensor:
        """The predicted means ``(B, K)``."""
        return self._split(self.outputs(f))[0]
