"""Gaussian likelihood with a fixed observation noise ``sigma_noise`` (scalar or per output)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from laplacefim.likelihoods.base import OutputCurvature, Targets, floating_targets
from laplacefim.options import CurvatureKind, Link
from laplacefim.prediction import Prediction, sample_moments, variances


def _sigma(f: Tensor, noise: Tensor) -> Tensor:
    sigma = noise.to(dtype=f.dtype, device=f.device).reshape(-1)
    if sigma.numel() not in (1, f.shape[1]):
        raise ValueError(
            f"sigma_noise has {sigma.numel()} values but the model has {f.shape[1]} outputs; "
            "give a scalar or one value per output."
        )
    return sigma


def gaussian_prediction(mean: Tensor, cov: Tensor, aleatoric: Tensor, joint: bool) -> Prediction:
    """Mean, epistemic ``diag(cov)``, aleatoric and total variance of a Gaussian predictive
    (``cov`` may hold the variances alone, ``(B, K)``)."""
    epistemic = variances(cov)
    return Prediction(
        logit_cov=cov if joint else None,
        mean=mean,
        epistemic_var=epistemic,
        aleatoric_var=aleatoric,
        var=epistemic + aleatoric,
    )


def gaussian_nll(prediction: Prediction, y: Tensor) -> Tensor:
    """Summed NLL of targets under ``N(mean, var)`` elementwise, float64."""
    mean = prediction.mean.to(torch.float64)  # type: ignore[union-attr]
    var = prediction.var.to(torch.float64)  # type: ignore[union-attr]
    y = y.reshape(mean.shape).to(mean)
    return 0.5 * ((y - mean).square() / var + var.log() + math.log(2 * math.pi)).sum()


class Regression:
    """Gaussian likelihood: outputs ``(B, K)`` (or ``(B,)``), noise ``σ`` scalar or ``(K,)``."""

    name = "regression"
    task = "regression"
    has_noise = True
    expected_targets = "finite targets"

    def options(self) -> dict[str, object]:
        """No options (the noise is a hyperparameter, not an option)."""
        return {}

    def outputs(self, f: Tensor) -> Tensor:
        """Return the outputs as a ``(B, K)`` matrix, or raise if their shape is wrong."""
        if f.ndim == 1:
            f = f[:, None]
        if f.ndim != 2:
            raise ValueError(
                f"regression expects model outputs of shape (B, K) or (B,), got {tuple(f.shape)}."
            )
        return f

    def targets(self, f: Tensor, y: Tensor) -> Targets:
        """Check floating-point targets of the outputs' shape ``(B, K)``."""
        return floating_targets(f, y, f.shape[1], self.name)

    def loss_stats(self, f: Tensor, y: Tensor) -> Tensor:
        """Squared residuals summed per output ``(K,)``: the log-likelihood follows for any
        noise after the fit, which noise tuning needs."""
        return (y - f).square().sum(0)

    def log_likelihood(self, stats: Tensor, n_data: int, noise: Tensor) -> Tensor:
        """Gaussian log-likelihood, constants included, for noise ``noise``."""
        sigma = noise.reshape(-1).expand(stats.shape[0])
        return -(
            0.5 * (stats / sigma.square()).sum()
            + n_data * (sigma.log().sum() + 0.5 * stats.shape[0] * math.log(2 * math.pi))
        )

    def hessian_sqrt(self, f: Tensor, noise: Tensor) -> Tensor:
        """Columns ``e_k / σ_k``: their outer products sum to ``diag(1/σ²)``; ``(K, B, K)``."""
        n_out = f.shape[1]
        columns = torch.eye(n_out, dtype=f.dtype, device=f.device) / _sigma(f, noise)[:, None]
        return columns[:, None, :].expand(n_out, f.shape[0], n_out)

    def output_curvature(self, f: Tensor, noise: Tensor) -> OutputCurvature | None:
        """``diag(1/σ²)``, the same for every datum."""
        diagonal = (1 / _sigma(f, noise).square()).expand_as(f)
        return OutputCurvature(diagonal, None, lambda: self.hessian_sqrt(f, noise), f.shape[1])

    def sampled_gradients(
        self, f: Tensor, noise: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Loss gradients ``(f − ỹ)/σ² = −ε/σ`` at ``ỹ = f + σε``, over √k; ``(k, B, K)``."""
        eps = torch.randn(
            (n_samples, *f.shape), dtype=f.dtype, device=f.device, generator=generator
        )
        return eps / (_sigma(f, noise) * math.sqrt(n_samples))

    def gradient(self, f: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """Loss gradient ``(f − y)/σ²`` at the true targets; ``(1, B, K)``."""
        return ((f - y) / _sigma(f, noise).square())[None]

    def check_noise(self, noise: Tensor) -> None:
        """Any positive noise, scalar or one per output, applies."""

    def curvature_scale(self, kind: CurvatureKind, noise_fit: Tensor, noise: Tensor) -> Tensor:
        """``(σ_fit/σ)²`` (GGN, Fisher) or ``(σ_fit/σ)⁴`` (empirical Fisher) for a scalar noise.

        Raises:
            ValueError: If a per-output noise differs from the one fitted.
        """
        noise_fit = noise_fit.to(device=noise.device, dtype=torch.float64)
        noise = noise.to(torch.float64)
        if noise_fit.ndim > 0 or noise.ndim > 0:
            if noise.shape != noise_fit.shape or not bool((noise == noise_fit).all()):
                raise ValueError(
                    "a per-output sigma_noise is part of the fitted curvature; refit to change "
                    "it (only a scalar sigma_noise can change after the fit)."
                )
            return torch.ones((), dtype=torch.float64, device=noise.device)
        power = 4 if kind is CurvatureKind.EMPIRICAL_FISHER else 2
        return (noise_fit / noise) ** power

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
        """Epistemic ``diag(cov)`` plus aleatoric ``σ²`` (the link does not apply)."""
        aleatoric = noise.to(mean).square().expand_as(mean)
        return gaussian_prediction(mean, cov, aleatoric, joint_outputs)

    def sampled_predictive(
        self, samples: Tensor, *, noise: Tensor, joint_outputs: bool
    ) -> Prediction:
        """Sample mean and covariance, plus the noise."""
        mean, cov = sample_moments(samples)
        aleatoric = noise.to(mean).square().expand_as(mean)
        return gaussian_prediction(mean, cov, aleatoric, joint_outputs)

    def predictive_nll(self, prediction: Prediction, y: Tensor) -> Tensor:
        """Gaussian NLL under the predictive mean and total variance."""
        return gaussian_nll(prediction, y)

    def kl(self, f1: Tensor, f2: Tensor, noise: Tensor) -> Tensor:
        """``‖(f₁ − f₂)/σ‖² / 2`` per datum."""
        return ((f1 - f2) / _sigma(f1, noise)).square().sum(-1) / 2

    def point_prediction(self, f: Tensor) -> Tensor:
        """The outputs ``(B, K)``."""
        return self.outputs(f)
