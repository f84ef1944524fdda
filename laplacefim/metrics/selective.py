"""Selective prediction: the risk–coverage curve of an uncertainty score and its area.

A selective predictor answers the inputs whose uncertainty is at most a threshold and
abstains on the others. Sweeping the threshold over the observed uncertainties gives the
risk–coverage curve: at each distinct threshold, the fraction of inputs answered
(coverage) and the mean loss over them (selective risk). Tied uncertainties are answered
or refused together, so the curve has one point per distinct value and does not depend on
the order of ties. The area under it (AURC) is ``Σ_k (n_k / n) · risk_k`` over those
points, ``n_k`` being the inputs a point adds: lower is better; a score that orders the
inputs by their loss attains the smallest area possible for those losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from laplacefim.metrics._base import ArrayLike, to_tensor


@dataclass(frozen=True)
class RiskCoverage:
    """The risk–coverage curve, one point per distinct uncertainty (increasing).

    Attributes:
        thresholds: The uncertainty at each point ``(M,)``: inputs at or below it are answered.
        coverage: Fraction of inputs answered there ``(M,)``, increasing to 1.
        risk: Mean loss over the answered inputs ``(M,)``.
        aurc: Area under the curve (see the module docstring).
    """

    thresholds: Tensor
    coverage: Tensor
    risk: Tensor
    aurc: float


def risk_coverage(uncertainty: ArrayLike, losses: ArrayLike) -> RiskCoverage:
    """The risk–coverage curve of a score.

    Args:
        uncertainty: Per-input uncertainty ``(N,)``; higher means less trustworthy.
        losses: Per-input loss ``(N,)``, e.g. 1 for a misclassified input and 0 otherwise.

    Returns:
        The curve and its area, float64.

    Raises:
        ValueError: For empty or mismatched inputs, or non-finite values.

    Example:
        >>> risk_coverage(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])).aurc
        0.25
    """
    u = to_tensor(uncertainty, "uncertainty").reshape(-1)
    loss = to_tensor(losses, "losses").reshape(-1)
    if u.numel() == 0 or u.shape != loss.shape:
        raise ValueError(
            f"uncertainty and losses must be non-empty and of the same length; got "
            f"{u.numel()} and {loss.numel()}."
        )
    u, order = torch.sort(u, stable=True)
    cumulative = loss[order].cumsum(0)
    n = u.numel()
    last = torch.ones(n, dtype=torch.bool, device=u.device)
    last[:-1] = u[1:] > u[:-1]  # the last input of each group of ties
    answered = torch.nonzero(last).reshape(-1) + 1
    risk = cumulative[answered - 1] / answered
    added = torch.diff(answered, prepend=answered.new_zeros(1))
    return RiskCoverage(
        thresholds=u[answered - 1],
        coverage=answered.double() / n,
        risk=risk,
        aurc=float((added.double() / n * risk).sum()),
    )


def aurc(uncertainty: ArrayLike, losses: ArrayLike) -> float:
    """Area under the risk–coverage curve (lower is better); see :func:`risk_coverage`."""
    return risk_coverage(uncertainty, losses).aurc
