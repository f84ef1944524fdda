"""Per-input predictions and uncertainty scores of a batch, the same for every likelihood
task, from a fitted Laplace (GLM probit predictive) or from the MAP network alone.

Scores are deterministic: the mutual information uses the same standard-normal draws for
every input (common random numbers), so a served answer does not depend on which other
requests shared its batch — up to the rounding of the model's own batched forward pass
(about 1e-7 in float32, as for ``la.predict``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from laplacefim.fitting import eval_mode
from laplacefim.inputs import ModelIO
from laplacefim.likelihoods import LikelihoodModel
from laplacefim.metrics._base import as_classes

if TYPE_CHECKING:
    from laplacefim.fitted import FittedPosterior

# Logit draws per input for the mutual information (common to all inputs), and their seed.
MI_SAMPLES = 256
MI_SEED = 0


class Score(str, Enum):
    """An uncertainty score a rule can abstain on."""

    MAX_PROBABILITY = "max_probability"
    ENTROPY = "entropy"
    MUTUAL_INFORMATION = "mutual_information"
    TOTAL_VARIANCE = "total_variance"
    EPISTEMIC_VARIANCE = "epistemic_variance"


CLASSIFICATION_SCORES = (Score.MAX_PROBABILITY, Score.ENTROPY, Score.MUTUAL_INFORMATION)
REGRESSION_SCORES = (Score.TOTAL_VARIANCE, Score.EPISTEMIC_VARIANCE)
# Scores where a *higher* value means a *more* trustworthy prediction.
CERTAINTY_SCORES = (Score.MAX_PROBABILITY,)
# The score each task reports as its out-of-distribution score (higher: more unusual).
OOD_SCORE = {"classification": Score.MUTUAL_INFORMATION, "regression": Score.EPISTEMIC_VARIANCE}


def scores_of(task: str) -> tuple[Score, ...]:
    """The scores that apply to a likelihood task."""
    return CLASSIFICATION_SCORES if task == "classification" else REGRESSION_SCORES


@functools.cache
def shared_normals(n_columns: int) -> Tensor:
    """The standard-normal draws ``(MI_SAMPLES, n_columns)`` every input shares (float64)."""
    generator = torch.Generator().manual_seed(MI_SEED)
    return torch.randn(MI_SAMPLES, n_columns, dtype=torch.float64, generator=generator)


def uncertainty(score: Score, values: Tensor) -> Tensor:
    """A score turned into an uncertainty: higher means less trustworthy."""
    return -values if score in CERTAINTY_SCORES else values


@dataclass(frozen=True)
class BatchScores:
    """Predictions and scores of a batch of ``B`` inputs, float64 on the CPU.

    Attributes:
        prediction: The predicted class ``(B,)`` (classification) or the mean ``(B, K)``.
        probabilities: Class probabilities ``(B, C)`` (binary: ``[P(y=0), P(y=1)]``).
        epistemic_var: Output variance from the posterior over weights ``(B, K)``.
        aleatoric_var: Observation-noise variance ``(B, K)`` (None without a posterior for a
            likelihood whose noise is a fitted hyperparameter).
        scores: Each applicable :class:`Score` by value, ``(B,)``.
        ood_score: The task's out-of-distribution score ``(B,)`` (higher: more unusual).
    """

    prediction: Tensor
    probabilities: Tensor | None
    epistemic_var: Tensor | None
    aleatoric_var: Tensor | None
    scores: dict[str, Tensor]
    ood_score: Tensor


def _entropy(p: Tensor) -> Tensor:
    return torch.special.entr(p).sum(-1)


def _mutual_information(mean: Tensor, cov: Tensor, normals: Callable[[int], Tensor]) -> Tensor:
    """``H[E_s p_s] − E_s H[p_s]`` over logits ``mean + L z_s`` (``L Lᵀ = cov``), in float64;
    one logit is the class pair ``[0, logit]``.

    The draws are laid out ``(C, B, S)`` so that the softmax's reductions over classes run
    across contiguous rows (a short last axis is slow to reduce on CPUs).
    """
    dtype = torch.float64
    mean, cov = mean.to(dtype), cov.to(dtype)
    if mean.ndim == 1:  # one logit: N(mean, var), the draws' first column
        logit = mean[:, None] + cov.clamp_min(0).sqrt()[:, None] * normals(1)[:, 0]  # (B, S)
        logits = torch.stack([torch.zeros_like(logit), logit])
    else:
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
        scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None].clamp_min(1e-300)
        chol, _ = torch.linalg.cholesky_ex(cov + 1e-10 * scale * eye)
        z = normals(cov.shape[-1])
        logits = mean.T[:, :, None] + chol.permute(1, 0, 2) @ z.T  # (C, B, S)
    shifted = logits - logits.amax(0)
    e = shifted.exp()
    norm = e.sum(0)
    p = e / norm
    aleatoric = (norm.log() - (p * shifted).sum(0)).mean(-1)
    p_mean = p.mean(-1)
    total = -(p_mean * p_mean.clamp_min(torch.finfo(dtype).tiny).log()).sum(0)
    return (total - aleatoric).clamp_min(0.0)


def classification_scores(
    probs: Tensor,
    logit_mean: Tensor | None,
    logit_cov: Tensor | None,
    normals: Callable[[int], Tensor],
) -> BatchScores:
    """Scores from probabilities and (with a posterior) the Gaussian over logits.

    Args:
        probs: ``(B, C)`` or binary ``(B,)``.
        logit_mean: ``(B, C)`` or ``(B,)``; None for the MAP network.
        logit_cov: ``(B, C, C)`` or binary variances ``(B,)``; None for the MAP network.
        normals: Standard-normal draws ``(S, n)`` shared by all inputs, for ``n`` columns.
    """
    p = as_classes(probs.double())
    entropy = _entropy(p)
    if logit_mean is None or logit_cov is None:
        mutual = torch.zeros_like(entropy)
    else:
        mutual = _mutual_information(logit_mean, logit_cov, normals).double()
    scores = {
        Score.MAX_PROBABILITY.value: p.amax(-1),
        Score.ENTROPY.value: entropy,
        Score.MUTUAL_INFORMATION.value: mutual,
    }
    return BatchScores(p.argmax(-1), p, None, None, scores, mutual)


def regression_scores(mean: Tensor, epistemic: Tensor, aleatoric: Tensor | None) -> BatchScores:
    """Scores from the predictive mean and its variances ``(B, K)``."""
    epistemic = epistemic.double()
    total = epistemic if aleatoric is None else epistemic + aleatoric.double()
    scores = {
        Score.TOTAL_VARIANCE.value: total.sum(-1),
        Score.EPISTEMIC_VARIANCE.value: epistemic.sum(-1),
    }
    aleatoric = None if aleatoric is None else aleatoric.double()
    return BatchScores(
        mean.double(), None, epistemic, aleatoric, scores, scores[Score.EPISTEMIC_VARIANCE.value]
    )


def posterior_scores(
    la: FittedPosterior, x: object, normals: Callable[[int], Tensor]
) -> BatchScores:
    """Scores from the GLM probit predictive of a fitted Laplace at inputs ``x``."""
    pred = la.predict(x, joint_outputs=True)
    if la.config.likelihood.task == "classification":
        probs = _required(pred.probs, "probs")
        cov = pred.logit_cov if pred.logit_mean is not None and pred.logit_mean.ndim > 1 else None
        var = pred.logit_var if cov is None else cov
        return classification_scores(
            probs.cpu(),
            None if pred.logit_mean is None else pred.logit_mean.cpu(),
            None if var is None else var.cpu(),
            normals,
        )
    aleatoric = pred.aleatoric_var
    return regression_scores(
        _required(pred.mean, "mean").cpu(),
        _required(pred.epistemic_var, "epistemic_var").cpu(),
        None if aleatoric is None else aleatoric.cpu(),
    )


def _required(value: Tensor | None, name: str) -> Tensor:
    if value is None:
        raise RuntimeError(f"the likelihood's predictive gave no {name}; it cannot be served.")
    return value


def map_scores(
    model: nn.Module,
    likelihood: LikelihoodModel,
    io: ModelIO,
    x: object,
    normals: Callable[[int], Tensor],
) -> BatchScores:
    """Scores of the MAP network alone: no epistemic part (mutual information 0)."""
    with torch.no_grad(), eval_mode(model):
        f = likelihood.outputs(io.call(model, x))
    point = likelihood.point_prediction(f)
    if likelihood.task == "classification":
        return classification_scores(point.cpu(), None, None, normals)
    return regression_scores(point.cpu(), torch.zeros_like(point.cpu()), None)
