"""Categorical likelihood on logits ``(B, C)``; targets are class indices ``(B,)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from laplacefim.likelihoods.base import NoNoise, Targets
from laplacefim.options import Link
from laplacefim.prediction import (
    Prediction,
    laplace_bridge,
    mc_logits,
    probit,
    sample_moments,
)


class Classification(NoNoise):
    """Categorical likelihood, softmax over the last dimension of logits ``(B, C)``."""

    name = "classification"
    task = "classification"
    expected_targets = "class labels in [0, C)"

    def outputs(self, f: Tensor) -> Tensor:
        """Return the outputs as a ``(B, C)`` matrix, or raise if their shape is wrong."""
        if f.ndim != 2 or f.shape[1] < 2:
            raise ValueError(
                f"classification expects model outputs of shape (B, C) with C >= 2 classes, "
                f"got {tuple(f.shape)}; for one logit use likelihood='binary'."
            )
        return f

    def targets(self, f: Tensor, y: Tensor) -> Targets:
        """Check integer class labels ``(B,)`` against logits ``(B, C)``."""
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(
                f"classification expects integer class labels (torch.long), got dtype {y.dtype}; "
                "convert with y.long()."
            )
        if y.shape != f.shape[:1]:
            raise ValueError(
                f"classification expects labels of shape (B,) = {tuple(f.shape[:1])}, "
                f"got {tuple(y.shape)}."
            )
        n_classes = f.shape[1]
        invalid = ((y < 0) | (y >= n_classes)).any()
        return Targets(y.clamp(0, n_classes - 1).long(), invalid)

    def loss_stats(self, f: Tensor, y: Tensor) -> Tensor:
        """The summed negative log-likelihood, 0-d."""
        return F.cross_entropy(f, y, reduction="sum")

    def log_likelihood(self, stats: Tensor, n_data: int, noise: Tensor) -> Tensor:
        """Log-likelihood of the data from their summed statistics."""
        return -stats

    def hessian_sqrt(self, f: Tensor, noise: Tensor) -> Tensor:
        """Columns ``s_c = √p_c (e_c − p)``: ``Σ_c s_c s_cᵀ = diag(p) − p pᵀ``; ``(C, B, C)``."""
        p = f.softmax(dim=-1)
        eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
        return p.T.sqrt()[:, :, None] * (eye[:, None, :] - p[None])

    def sampled_gradients(
        self, f: Tensor, noise: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Loss gradients at labels drawn from the model, over √k; ``(k, B, C)``."""
        p = f.softmax(dim=-1)
        labels = torch.multinomial(p, n_samples, replacement=True, generator=generator).T
        one_hot = F.one_hot(labels, f.shape[1]).to(f.dtype)
        return (p[None] - one_hot) / math.sqrt(n_samples)

    def gradient(self, f: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """Loss gradient at the true labels; ``(1, B, C)``."""
        return (f.softmax(dim=-1) - F.one_hot(y, f.shape[1]).to(f.dtype))[None]

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
        """Class probabilities from a Gaussian over logits, by ``link``."""
        var = cov.diagonal(dim1=-2, dim2=-1)
        if link is Link.PROBIT:
            probs = probit(mean, var).softmax(-1)
        elif link is Link.MC:
            probs = mc_logits(mean, cov, n_samples, generator).softmax(-1).mean(0)
        else:
            probs = laplace_bridge(mean, var)
        return Prediction(
            probs=probs, logit_mean=mean, logit_var=var, logit_cov=cov if joint_outputs else None
        )

    def sampled_predictive(
        self, samples: Tensor, *, noise: Tensor, joint_outputs: bool
    ) -> Prediction:
        """The average of the samples' softmax."""
        mean, cov = sample_moments(samples)
        return Prediction(
            probs=samples.softmax(-1).mean(0),
            logit_mean=mean,
            logit_var=cov.diagonal(dim1=-2, dim2=-1),
            logit_cov=cov if joint_outputs else None,
        )

    def predictive_nll(self, prediction: Prediction, y: Tensor) -> Tensor:
        """``−Σ log p(yₙ)`` with probabilities floored at the smallest float64."""
        probs = prediction.probs.to(torch.float64)  # type: ignore[union-attr]
        tiny = torch.finfo(torch.float64).tiny
        return -probs.gather(1, y.long().reshape(-1, 1)).clamp_min(tiny).log().sum()

    def kl(self, f1: Tensor, f2: Tensor, noise: Tensor) -> Tensor:
        """Categorical KL per datum."""
        log1, log2 = f1.log_softmax(-1), f2.log_softmax(-1)
        return (log1.exp() * (log1 - log2)).sum(-1)

    def point_prediction(self, f: Tensor) -> Tensor:
        """Softmax probabilities ``(B, C)``."""
        return f.softmax(-1)
