"""Per-input uncertainty scores and out-of-distribution (OOD) detection metrics.

Per-input scores return float64 tensors ``(B,)`` on the input's device. The OOD metrics
are one-shot and exact (they sort all scores; there is no streaming accumulator): the
in-distribution samples are the POSITIVE class and a higher score means "more
in-distribution" — pass e.g. ``max_probability(probs)`` or ``-entropy(probs)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from laplacefim.metrics._base import ArrayLike, as_classes, probabilities, to_tensor


@dataclass(frozen=True)
class UncertaintyDecomposition:
    """Per-input split of predictive entropy (nats), each ``(B,)``.

    Attributes:
        total: Entropy of the mean prediction, ``H[E_s p_s]``.
        aleatoric: Expected entropy, ``E_s H[p_s]``.
        epistemic: Mutual information between label and parameters, ``total − aleatoric``
            (≥ 0 by Jensen; rounding below zero is clamped to 0).
    """

    total: Tensor
    aleatoric: Tensor
    epistemic: Tensor


def _entropy(p: Tensor) -> Tensor:
    """Entropy over the last dimension, with ``0 log 0 = 0``."""
    return torch.special.entr(p).sum(-1)


def entropy(probs: ArrayLike) -> Tensor:
    """Predictive entropy per input, in nats, in ``[0, log C]``.

    Args:
        probs: Probabilities ``(B, C)``, or ``(B,)`` = P(y = 1) (two classes).

    Returns:
        ``−Σ_c p_c log p_c`` per input ``(B,)``.

    Raises:
        TypeError: If ``probs`` is not a tensor or numpy array.
        ValueError: On a bad shape or probabilities off the simplex.

    Example:
        >>> entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000], dtype=torch.float64)
    """
    return _entropy(as_classes(probabilities(probs)))


def max_probability(probs: ArrayLike) -> Tensor:
    """Confidence ``max_c p_c`` per input ``(B,)`` (binary ``(B,)``: ``max(p, 1 − p)``).

    Raises:
        TypeError: If ``probs`` is not a tensor or numpy array.
        ValueError: On a bad shape or probabilities off the simplex.
    """
    return as_classes(probabilities(probs)).amax(-1)


def mutual_information(prob_samples: ArrayLike) -> UncertaintyDecomposition:
    """Total, aleatoric and epistemic uncertainty from sampled predictions.

    Args:
        prob_samples: Probabilities ``(S, B, C)`` (or ``(S, B)`` = P(y = 1)), one slice per
            posterior sample, e.g. from a sampling predictive.

    Returns:
        Per-input ``total`` (entropy of the sample mean), ``aleatoric`` (mean entropy) and
        ``epistemic`` (their difference, the mutual information), each ``(B,)``.

    Raises:
        TypeError: If the input is not a tensor or numpy array.
        ValueError: On a bad shape or probabilities off the simplex.

    Example:
        >>> two_confident_opposites = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
        >>> mutual_information(two_confident_opposites).epistemic  # log 2
        tensor([0.6931], dtype=torch.float64)
    """
    p = to_tensor(prob_samples, "prob_samples")
    if p.ndim not in (2, 3) or p.shape[0] == 0:
        raise ValueError(
            f"prob_samples must have shape (S, B, C) or (S, B) with S >= 1; got {tuple(p.shape)}."
        )
    flat = probabilities(p.reshape(-1, *p.shape[2:]), "prob_samples")
    p = as_classes(flat).reshape(p.shape[0], p.shape[1], -1)
    total = _entropy(p.mean(0))
    aleatoric = _entropy(p).mean(0)
    return UncertaintyDecomposition(
        total=total, aleatoric=aleatoric, epistemic=(total - aleatoric).clamp_min(0.0)
    )


@dataclass(frozen=True)
class _Curve:
    """Counts at each distinct threshold, highest first: true and false positives."""

    tp: Tensor
    fp: Tensor
    n_in: int
    n_out: int


def _curve(scores_in: ArrayLike, scores_out: ArrayLike) -> _Curve:
    s_in = to_tensor(scores_in, "scores_in")
    s_out = to_tensor(scores_out, "scores_out").to(s_in.device)
    for name, s in (("scores_in", s_in), ("scores_out", s_out)):
        if s.ndim != 1 or s.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D array; got shape {tuple(s.shape)}.")
    scores = torch.cat([s_in, s_out])
    positive = torch.cat([torch.ones_like(s_in), torch.zeros_like(s_out)])
    order = scores.argsort(descending=True)
    scores, positive = scores[order], positive[order]
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    tp = positive.cumsum(0)[last_of_tie]
    fp = (1 - positive).cumsum(0)[last_of_tie]
    return _Curve(tp=tp, fp=fp, n_in=s_in.numel(), n_out=s_out.numel())


def ood_auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """Area under the ROC curve for telling in-distribution (positive) from OOD inputs.

    Equals the probability that a random in-distribution score exceeds a random OOD one,
    ties counting ½ (as ``sklearn.metrics.roc_auc_score``).

    Args:
        scores_in: Scores of in-distribution inputs ``(N_in,)``; higher = more in-distribution.
        scores_out: Scores of OOD inputs ``(N_out,)``.

    Returns:
        The AUROC in ``[0, 1]``; 0.5 is chance.

    Raises:
        TypeError: If an input is not a tensor or numpy array.
        ValueError: If an input is not a non-empty 1-D array of finite values.

    Example:
        >>> ood_auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.85, 0.1]))
        0.75
    """
    c = _curve(scores_in, scores_out)
    tpr = torch.cat([c.tp.new_zeros(1), c.tp / c.n_in])
    fpr = torch.cat([c.fp.new_zeros(1), c.fp / c.n_out])
    return float(torch.trapezoid(tpr, fpr))


def ood_aupr(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """Area under the precision-recall curve, in-distribution positive (AUPR-In).

    Computed as average precision, ``Σ_t (R_t − R_{t−1}) P_t`` over distinct thresholds
    (as ``sklearn.metrics.average_precision_score``, no interpolation). For AUPR-Out, swap
    the arguments and negate the scores.

    Args and Raises as in ``ood_auroc``.

    Returns:
        The average precision in ``[0, 1]``; chance is ``N_in / (N_in + N_out)``.
    """
    c = _curve(scores_in, scores_out)
    recall = torch.cat([c.tp.new_zeros(1), c.tp / c.n_in])
    precision = c.tp / (c.tp + c.fp)
    return float((recall.diff() * precision).sum())


def fpr_at_95_tpr(scores_in: ArrayLike, scores_out: ArrayLike, *, tpr: float = 0.95) -> float:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr``.

    With in-distribution positive: the fraction of OOD inputs scoring at least the highest
    threshold ``t`` at which ``P(score_in ≥ t) ≥ tpr`` (ties at ``t`` all accepted).

    Args:
        scores_in: Scores of in-distribution inputs ``(N_in,)``; higher = more in-distribution.
        scores_out: Scores of OOD inputs ``(N_out,)``.
        tpr: The true-positive rate to reach, in ``(0, 1]``.

    Returns:
        The FPR in ``[0, 1]`` (lower is better).

    Raises:
        TypeError: If an input is not a tensor or numpy array.
        ValueError: On bad inputs, or ``tpr`` outside ``(0, 1]``.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1]; got {tpr}.")
    c = _curve(scores_in, scores_out)
    first = int(torch.nonzero(c.tp / c.n_in >= tpr)[0, 0])
    return float(c.fp[first] / c.n_out)
