"""The prediction type every likelihood returns, and the links from a Gaussian over logits
to probabilities (probit, Laplace bridge, Monte Carlo)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Prediction:
    """A prediction, the same type for every likelihood; fields that do not apply are None.

    Attributes:
        probs: Class probabilities ``(B, C)`` (classification) or ``P(y = 1)`` ``(B,)``
            (binary).
        logit_mean: Mean of the logits ``(B, C)`` (classification) or ``(B,)`` (binary).
        logit_var: Variance of the logits, same shape as ``logit_mean``.
        logit_cov: Covariance of the outputs ``(B, C, C)`` when ``joint_outputs=True``.
        mean: Predictive mean ``(B, K)`` (regression).
        epistemic_var: Variance from the posterior over weights ``(B, K)`` (regression).
        aleatoric_var: Observation noise ``σ²`` ``(B, K)`` (regression).
        var: ``epistemic_var + aleatoric_var`` ``(B, K)`` (regression).
    """

    probs: Tensor | None = None
    logit_mean: Tensor | None = None
    logit_var: Tensor | None = None
    logit_cov: Tensor | None = None
    mean: Tensor | None = None
    epistemic_var: Tensor | None = None
    aleatoric_var: Tensor | None = None
    var: Tensor | None = None


def variances(cov: Tensor) -> Tensor:
    """The variances of outputs ``(B, C)``: the diagonal of their covariance ``(B, C, C)``,
    or ``cov`` itself when it already holds only the variances ``(B, C)``."""
    return cov if cov.ndim == 2 else cov.diagonal(dim1=-2, dim2=-1)


def probit(mean: Tensor, var: Tensor) -> Tensor:
    """Probit approximation: logits scaled by ``1/√(1 + π var / 8)``, then softmax/sigmoid."""
    return mean / torch.sqrt(1.0 + math.pi / 8.0 * var)


def laplace_bridge(mean: Tensor, var: Tensor) -> Tensor:
    """Dirichlet mean of the Laplace bridge of ``N(mean, diag(var))`` over ``C`` logits.

    ``α_c = (1 − 2/C + e^{μ_c} Σ_k e^{−μ_k} / C²) / σ_c²``; the probabilities are ``α / Σα``.
    """
    n_classes = mean.shape[-1]
    log_term = mean + torch.logsumexp(-mean, dim=-1, keepdim=True) - 2 * math.log(n_classes)
    alpha = (1.0 - 2.0 / n_classes + log_term.exp()) / var.clamp_min(torch.finfo(var.dtype).tiny)
    return alpha / alpha.sum(-1, keepdim=True)


def mc_logits(
    mean: Tensor, cov: Tensor, n_samples: int, generator: torch.Generator | None
) -> Tensor:
    """Samples of the logits from ``N(mean, cov)`` per input: ``(S, B, C)``."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    jitter = 1e-10 * cov.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)[..., None].clamp_min(
        1e-30
    )
    chol, _ = torch.linalg.cholesky_ex(cov + jitter * eye)
    z = torch.randn(
        (n_samples, *mean.shape), dtype=mean.dtype, device=mean.device, generator=generator
    )
    return mean + torch.einsum("bcd,sbd->sbc", chol, z)


def sample_moments(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(B, ..., C)`` and unbiased covariance ``(B, ..., C, C)`` of output samples
    ``(S, B, ..., C)``."""
    mean = samples.mean(0)
    centred = samples - mean
    cov = torch.einsum("s...c,s...d->...cd", centred, centred) / max(samples.shape[0] - 1, 1)
    return mean, cov
