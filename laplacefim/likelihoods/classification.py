"""Categorical likelihood on logits ``(B, C)``; targets are class indices ``(B,)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from laplacefim.likelihoods.base import NoNoise, OutputCurvature, Targets
from laplacefim.options import Link
from laplacefim.prediction import (
    Prediction,
    laplace_bridge,
    mc_logits,
    probit,
    sample_moments,
    variances,
)


class Classification(NoNoise):
    """Categorical likelihood, softmax over the last dimension of the logits.

    Logits ``(B, C)`` with labels ``(B,)``; or token-level logits ``(B, T, C)`` (a language
    model's head) with labels ``(B, T)``, where labels equal to ``ignore_index`` (-100)
    are no data: every other token is one datum (``n_data`` counts them). The exact GGN of
    token-level outputs backpropagates ``T·C`` columns per sequence (each token's loss is
    a separate datum), the empirical Fisher ``T``; the MC Fisher draws one label per token
    and backpropagates them together (``fisher_samples`` columns), an unbiased estimate
    because scores of different tokens have zero mean — prefer it for large vocabularies.
    """

    name = "classification"
    task = "classification"
    expected_targets = "class labels in [0, C) (or ignore_index = -100 for token-level labels)"
    ignore_index = -100

    def outputs(self, f: Tensor) -> Tensor:
        """The logits ``(B, C)`` or ``(B, T, C)``, or raise if their shape is wrong."""
        if f.ndim not in (2, 3) or f.shape[-1] < 2:
            raise ValueError(
                f"classification expects model outputs of shape (B, C), or (B, T, C) for "
                f"token-level labels, with C >= 2 classes, got {tuple(f.shape)}; for one logit "
                "use likelihood='binary'."
            )
        return f

    def targets(self, f: Tensor, y: Tensor) -> Targets:
        """Check integer class labels ``(B,)`` (or ``(B, T)``) against the logits."""
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(
                f"classification expects integer class labels (torch.long), got dtype {y.dtype}; "
                "convert with y.long()."
            )
        if y.shape != f.shape[:-1]:
            shape = "(B,)" if f.ndim == 2 else "(B, T)"
            raise ValueError(
                f"classification expects labels of shape {shape} = {tuple(f.shape[:-1])}, "
                f"got {tuple(y.shape)}."
            )
        n_classes = f.shape[-1]
        if f.ndim == 2:
            invalid = ((y < 0) | (y >= n_classes)).any()
            return Targets(y.clamp(0, n_classes - 1).long(), invalid, f.shape[0])
        kept = y != self.ignore_index
        invalid = (kept & ((y < 0) | (y >= n_classes))).any()
        values = torch.where(kept, y.clamp(0, n_classes - 1), self.ignore_index).long()
        return Targets(values, invalid, kept.sum(), kept.to(f.dtype))

    def loss_stats(self, f: Tensor, y: Tensor) -> Tensor:
        """The summed negative log-likelihood, 0-d (ignored tokens excluded)."""
        logits = f.reshape(-1, f.shape[-1])
        return F.cross_entropy(
            logits, y.reshape(-1), reduction="sum", ignore_index=self.ignore_index
        )

    def log_likelihood(self, stats: Tensor, n_data: int, noise: Tensor) -> Tensor:
        """Log-likelihood of the data from their summed statistics."""
        return -stats

    def hessian_sqrt(self, f: Tensor, noise: Tensor) -> Tensor:
        """Columns ``s_c = √p_c (e_c − p)``: ``Σ_c s_c s_cᵀ = diag(p) − p pᵀ``; ``(C, B, C)``,
        or ``(T·C, B, T, C)`` with each token's columns zero elsewhere."""
        p = f.softmax(dim=-1)
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        columns = p.sqrt()[..., :, None] * (eye - p[..., None, :])  # (B, [T,] C, C)
        if f.ndim == 2:
            return columns.permute(1, 0, 2)
        return _per_token(columns)

    def output_curvature(self, f: Tensor, noise: Tensor) -> OutputCurvature | None:
        """``diag(p) − p pᵀ`` for logits ``(B, C)``; None for token-level logits."""
        if f.ndim != 2:
            return None
        p = f.softmax(dim=-1)
        return OutputCurvature(p, p, lambda: self.hessian_sqrt(f, noise), f.shape[-1])

    def sampled_gradients(
        self, f: Tensor, noise: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Loss gradients at labels drawn from the model, over √k; ``(k, B, [T,] C)``."""
        p = f.softmax(dim=-1)
        flat = p.reshape(-1, p.shape[-1])
        labels = torch.multinomial(flat, n_samples, replacement=True, generator=generator).T
        one_hot = F.one_hot(labels, f.shape[-1]).to(f.dtype).reshape(n_samples, *f.shape)
        return (p[None] - one_hot) / math.sqrt(n_samples)

    def gradient(self, f: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """Loss gradient at the true labels; ``(1, B, C)``, or ``(T, B, T, C)`` per token."""
        one_hot = F.one_hot(y.clamp_min(0), f.shape[-1]).to(f.dtype)
        gradient = f.softmax(dim=-1) - one_hot
        if f.ndim == 2:
            return gradient[None]
        return _per_token(gradient[..., None, :])

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
        """Class probabilities from a Gaussian over logits, by ``link``; for token-level
        logits ``(B, T, C)`` (covariance ``(B, T·C, T·C)``) token by token."""
        if mean.ndim == 3:
            batch, tokens, n_classes = mean.shape
            blocks = cov.reshape(batch, tokens, n_classes, tokens, n_classes)
            per_token = blocks.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
            flat = self.predictive(
                mean.reshape(-1, n_classes),
                per_token.reshape(-1, n_classes, n_classes),
                link=link,
                noise=noise,
                n_samples=n_samples,
                generator=generator,
                joint_outputs=False,
            )
            return Prediction(
                probs=flat.probs.reshape(mean.shape),  # type: ignore[union-attr]
                logit_mean=mean,
                logit_var=flat.logit_var.reshape(mean.shape),  # type: ignore[union-attr]
                logit_cov=cov if joint_outputs else None,
            )
        var = variances(cov)
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
        """``−Σ log p(yₙ)`` with probabilities floored at the smallest float64 (ignored
        tokens excluded)."""
        probs = prediction.probs.to(torch.float64)  # type: ignore[union-attr]
        probs = probs.reshape(-1, probs.shape[-1])
        labels = y.long().reshape(-1)
        kept = labels != self.ignore_index
        tiny = torch.finfo(torch.float64).tiny
        picked = probs[kept].gather(1, labels[kept][:, None])
        return -picked.clamp_min(tiny).log().sum()

    def kl(self, f1: Tensor, f2: Tensor, noise: Tensor) -> Tensor:
        """Categorical KL per datum (summed over its tokens)."""
        log1, log2 = f1.log_softmax(-1), f2.log_softmax(-1)
        return (log1.exp() * (log1 - log2)).reshape(f1.shape[0], -1).sum(-1)

    def point_prediction(self, f: Tensor) -> Tensor:
        """Softmax probabilities ``(B, C)``."""
        return f.softmax(-1)


def _per_token(columns: Tensor) -> Tensor:
    """``(B, T, V, C)`` columns of each token to ``(T·V, B, T, C)``, zero at other tokens."""
    batch, tokens, n_columns, n_classes = columns.shape
    eye = torch.eye(tokens, dtype=columns.dtype, device=columns.device)
    spread = torch.einsum("btvc,ts->tvbsc", columns, eye)
    return spread.reshape(tokens * n_columns, batch, tokens, n_classes)
