"""Likelihoods: the negative log-likelihood and what the curvature engine backpropagates.

Conventions (all of laplacefim follows them):

* The loss of a data set is the **sum** of per-datum negative log-likelihoods (never the
  mean), so curvature statistics add over batches and over ranks.
* ``classification``: outputs are logits ``(B, C)``, softmax over the last dimension;
  targets are integer class indices ``(B,)``.
* ``regression``: outputs ``(B, K)`` (or ``(B,)`` for one output), Gaussian noise with
  standard deviation ``sigma_noise`` (a scalar, or one value per output ``(K,)``); targets
  are floating point of the same shape.
* ``binary``: one logit per datum, ``(B,)`` or ``(B, 1)``, Bernoulli likelihood; targets are
  0/1 of shape ``(B,)`` or ``(B, 1)``, integer, boolean or floating point.

Every curvature kind is a sum over data of ``Jₙᵀ Mₙ Jₙ`` where ``Jₙ`` is the Jacobian of the
outputs and ``Mₙ = Σ_v s_v s_vᵀ`` is given by a few *columns* ``s_v`` per datum:

* exact GGN: the columns of a square root of the Hessian of the loss w.r.t. the outputs;
* MC Fisher: gradients of the loss at labels sampled from the model, divided by √k;
* empirical Fisher: the gradient of the loss at the true label.

Each likelihood returns those columns as a ``(V, B, C)`` tensor; the engine backpropagates
them in one batched backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from laplacefim.options import Likelihood


@dataclass(frozen=True)
class Targets:
    """Targets checked against the outputs of one batch.

    Attributes:
        values: The targets in the likelihood's working form (see each likelihood).
        invalid: A 0-d boolean tensor, True when some target value is out of range; kept on
            the device so that checking it needs no host synchronisation inside the loop.
    """

    values: Tensor
    invalid: Tensor


class Classification:
    """Categorical likelihood on logits ``(B, C)``."""

    kind = Likelihood.CLASSIFICATION

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
        """Summable statistic of the loss: the summed negative log-likelihood, 0-d."""
        return F.cross_entropy(f, y, reduction="sum")

    def log_likelihood(self, stats: Tensor, n_data: int, sigma_noise: Tensor) -> Tensor:
        """Log-likelihood of the data from their summed statistics."""
        return -stats

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        """Columns ``s_c = √p_c (e_c − p)``: ``Σ_c s_c s_cᵀ = diag(p) − p pᵀ``; ``(C, B, C)``."""
        p = f.softmax(dim=-1)
        eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
        return p.T.sqrt()[:, :, None] * (eye[:, None, :] - p[None])

    def sampled_gradients(
        self, f: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Loss gradients at labels drawn from the model, over √k; ``(k, B, C)``."""
        p = f.softmax(dim=-1)
        labels = torch.multinomial(p, n_samples, replacement=True, generator=generator).T
        one_hot = F.one_hot(labels, f.shape[1]).to(f.dtype)
        return (p[None] - one_hot) / math.sqrt(n_samples)

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """Loss gradient at the true labels; ``(1, B, C)``."""
        return (f.softmax(dim=-1) - F.one_hot(y, f.shape[1]).to(f.dtype))[None]


class Regression:
    """Gaussian likelihood with fixed noise ``sigma_noise`` (scalar or one per output)."""

    kind = Likelihood.REGRESSION

    def __init__(self, sigma_noise: Tensor) -> None:
        self.sigma_noise = sigma_noise

    def outputs(self, f: Tensor) -> Tensor:
        """Return the outputs as a ``(B, K)`` matrix, or raise if their shape is wrong."""
        if f.ndim == 1:
            f = f[:, None]
        if f.ndim != 2:
            raise ValueError(
                f"regression expects model outputs of shape (B, K) or (B,), got {tuple(f.shape)}."
            )
        if self.sigma_noise.numel() not in (1, f.shape[1]):
            raise ValueError(
                f"sigma_noise has {self.sigma_noise.numel()} values but the model has "
                f"{f.shape[1]} outputs; give a scalar or one value per output."
            )
        return f

    def targets(self, f: Tensor, y: Tensor) -> Targets:
        """Check floating-point targets of the outputs' shape ``(B, K)``."""
        if not y.dtype.is_floating_point:
            raise TypeError(
                f"regression expects floating-point targets, got dtype {y.dtype}; "
                "convert with y.float() (or y.double())."
            )
        if y.ndim == 1:
            y = y[:, None]
        if y.shape != f.shape:
            raise ValueError(
                f"regression expects targets of shape (B, K) = {tuple(f.shape)} like the model "
                f"outputs, got {tuple(y.shape)}."
            )
        invalid = ~torch.isfinite(y).all()
        return Targets(y.to(f.dtype), invalid)

    def _sigma(self, f: Tensor) -> Tensor:
        return self.sigma_noise.to(dtype=f.dtype, device=f.device).reshape(-1)

    def loss_stats(self, f: Tensor, y: Tensor) -> Tensor:
        """Summable statistic of the loss: squared residuals summed per output ``(K,)``.

        Keeping them (rather than the NLL) lets the log-likelihood be evaluated for any
        noise level after the fit, which noise tuning needs.
        """
        return (y - f).square().sum(0)

    def log_likelihood(self, stats: Tensor, n_data: int, sigma_noise: Tensor) -> Tensor:
        """Gaussian log-likelihood, constants included, for noise ``sigma_noise``."""
        sigma = sigma_noise.reshape(-1).expand(stats.shape[0])
        return -(
            0.5 * (stats / sigma.square()).sum()
            + n_data * (sigma.log().sum() + 0.5 * stats.shape[0] * math.log(2 * math.pi))
        )

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        """Columns ``e_k / σ_k``: their outer products sum to ``diag(1/σ²)``; ``(K, B, K)``."""
        n_out = f.shape[1]
        columns = torch.eye(n_out, dtype=f.dtype, device=f.device) / self._sigma(f)[:, None]
        return columns[:, None, :].expand(n_out, f.shape[0], n_out)

    def sampled_gradients(
        self, f: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Loss gradients ``(f − ỹ)/σ² = −ε/σ`` at ``ỹ = f + σε``, over √k; ``(k, B, K)``."""
        eps = torch.randn(
            (n_samples, *f.shape), dtype=f.dtype, device=f.device, generator=generator
        )
        return eps / (self._sigma(f) * math.sqrt(n_samples))

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """Loss gradient ``(f − y)/σ²`` at the true targets; ``(1, B, K)``."""
        return ((f - y) / self._sigma(f).square())[None]


class Binary:
    """Bernoulli likelihood on one logit per datum."""

    kind = Likelihood.BINARY

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
        invalid = ((y != 0) & (y != 1)).any()
        return Targets(y, invalid)

    def loss_stats(self, f: Tensor, y: Tensor) -> Tensor:
        """Summable statistic of the loss: the summed binary cross-entropy, 0-d."""
        return F.binary_cross_entropy_with_logits(f, y, reduction="sum")

    def log_likelihood(self, stats: Tensor, n_data: int, sigma_noise: Tensor) -> Tensor:
        """Log-likelihood of the data from their summed statistics."""
        return -stats

    def hessian_sqrt(self, f: Tensor) -> Tensor:
        """The single column ``√(p(1 − p))``; ``(1, B, 1)``."""
        p = f.sigmoid()
        return (p * (1 - p)).sqrt()[None]

    def sampled_gradients(
        self, f: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Loss gradients ``p − ỹ`` at labels drawn from the model, over √k; ``(k, B, 1)``."""
        p = f.sigmoid()
        u = torch.rand((n_samples, *f.shape), dtype=f.dtype, device=f.device, generator=generator)
        labels = (u < p).to(f.dtype)
        return (p[None] - labels) / math.sqrt(n_samples)

    def gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """Loss gradient ``p − y`` at the true targets; ``(1, B, 1)``."""
        return (f.sigmoid() - y)[None]


LikelihoodModel = Classification | Regression | Binary


def make_likelihood(kind: Likelihood, sigma_noise: Tensor) -> LikelihoodModel:
    """Build the likelihood object for an already validated option."""
    if kind is Likelihood.CLASSIFICATION:
        return Classification()
    if kind is Likelihood.REGRESSION:
        return Regression(sigma_noise)
    return Binary()
