"""Bernoulli likelihood on one logit per datum."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from laplacefim.likelihoods.base import NoNoise, OutputCurvature, Targets
from laplacefim.options import Link
from laplacefim.prediction import Prediction, mc_logits, probit, sample_moments, variances


class Binary(NoNoise):
    """Bernoulli likelihood: outputs ``(B,)`` or ``(B, 1)`` logits, targets 0/1."""

    name = "binary"
    task = "classification"
    expected_targets = "targets equal to 0 or 1"

    def outputs(self, f: Tensor) -> Tensor:
        """Return the outputs as a ``(B, 1)`` matrix, or raise if their shape is wrong."""
        if f.ndim == 1:
            f = f[:, None]
        if f.ndim != 2 or f.shape[1] != 1:
            raise ValueError(
                f"binary expects one logit per datum, outputs of shape (B,) or (B, 1), got "
                f"{tuple(f.shape)}; for several classes use likelihood='classification'."
            )
        return f

    def targets(self, f: Tensor, y: Tensor) -> Targets:
        """Check 0/1 targets of shape ``(B,)`` or ``(B, 1)``."""
        if y.dtype.is_complex:
            raise TypeError(f"binary expects 0/1 targets, got dtype {y.dtype}.")
        if y.ndim == 1:
            y = y[:, None]
        if y.shape != f.shape:
            raise ValueError(
                f"binary expects targets of shape (B,) or (B, 1) with B = {f.shape[0]}, "
                f"got {tuple(y.shape)}."
            )
        y = y.to(f.dtype)
        return Targets(y, ((y != 0) & (y != 1)).any(), f.shape[0])

    def loss_stats(self, f: Tensor, y: Tensor) -> Tensor:
        """The summed binary cross-entropy, 0-d."""
        return F.binary_cross_entropy_with_logits(f, y, reduction="sum")

    def log_likelihood(self, stats: Tensor, n_data: int, noise: Tensor) -> Tensor:
        """Log-likelihood of the data from their summed statistics."""
        return -stats

    def hessian_sqrt(self, f: Tensor, noise: Tensor) -> Tensor:
        """The single column ``√(p(1 − p))``; ``(1, B, 1)``."""
        p = f.sigmoid()
        return (p * (1 - p)).sqrt()[None]

    def output_curvature(self, f: Tensor, noise: Tensor) -> OutputCurvature | None:
        """``p(1 − p)``."""
        p = f.sigmoid()
        return OutputCurvature(p * (1 - p), None, lambda: self.hessian_sqrt(f, noise), 1)

    def sampled_gradients(
        self, f: Tensor, noise: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Loss gradients ``p − ỹ`` at labels drawn from the model, over √k; ``(k, B, 1)``."""
        p = f.sigmoid()
        u = torch.rand((n_samples, *f.shape), dtype=f.dtype, device=f.device, generator=generator)
        return (p[None] - (u < p).to(f.dtype)) / math.sqrt(n_samples)

    def gradient(self, f: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """Loss gradient ``p − y`` at the true targets; ``(1, B, 1)``."""
        return (f.sigmoid() - y)[None]

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
        """``P(y = 1)`` from a Gaussian over the logit (probit or Monte Carlo)."""
        var = variances(cov)
        if link is Link.PROBIT:
            probs = probit(mean[:, 0], var[:, 0]).sigmoid()
        elif link is Link.MC:
            probs = mc_logits(mean, cov, n_samples, generator)[..., 0].sigmoid().mean(0)
        else:
            raise ValueError(
                "link='bridge' needs several classes; use link='probit' or 'mc' with "
                "likelihood='binary'."
            )
        return Prediction(
            probs=probs,
            logit_mean=mean[:, 0],
            logit_var=var[:, 0],
            logit_cov=cov if joint_outputs else None,
        )

    def sampled_predictive(
        self, samples: Tensor, *, noise: Tensor, joint_outputs: bool
    ) -> Prediction:
        """The average of the samples' sigmoid."""
        mean, cov = sample_moments(samples)
        return Prediction(
            probs=samples[..., 0].sigmoid().mean(0),
            logit_mean=mean[:, 0],
            logit_var=cov.diagonal(dim1=-2, dim2=-1)[:, 0],
            logit_cov=cov if joint_outputs else None,
        )

    def predictive_nll(self, prediction: Prediction, y: Tensor) -> Tensor:
        """Bernoulli NLL of 0/1 targets, probabilities floored at the smallest float64."""
        probs = prediction.probs.to(torch.float64)  # type: ignore[union-attr]
        tiny = torch.finfo(torch.float64).tiny
        y = y.reshape(-1).to(probs)
        return -(
            y * probs.clamp_min(tiny).log() + (1 - y) * (1 - probs).clamp_min(tiny).log()
        ).sum()

    def kl(self, f1: Tensor, f2: Tensor, noise: Tensor) -> Tensor:
        """Bernoulli KL per datum."""
        p1 = f1.sigmoid()
        pos = F.logsigmoid(f1) - F.logsigmoid(f2)
        neg = F.logsigmoid(-f1) - F.logsigmoid(-f2)
        return (p1 * pos + (1 - p1) * neg).sum(-1)

    def point_prediction(self, f: Tensor) -> Tensor:
        """``P(y = 1)`` ``(B,)``."""
        return f.reshape(-1).sigmoid()
