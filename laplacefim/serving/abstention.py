"""Abstention rules calibrated on held-out data: answer when a score says the prediction is
trustworthy enough, abstain otherwise.

The rule abstains when the uncertainty exceeds a threshold (for ``"max_probability"``:
when the confidence is below it). The threshold is chosen on held-out data so that the
fraction of inputs answered reaches ``target_coverage``, or so that the mean loss over the
answered inputs (the selective risk: the error rate for classification, the squared error
for regression) stays at most ``target_risk`` while answering as many as possible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from laplacefim.inputs import ModelIO, to_device
from laplacefim.metrics.selective import RiskCoverage, risk_coverage
from laplacefim.serving.scores import BatchScores, Score, scores_of, uncertainty


@dataclass(frozen=True)
class AbstentionRule:
    """Abstain when ``score`` is beyond ``threshold``; plain values, saved with a posterior.

    Attributes:
        score: The :class:`Score` the rule reads.
        threshold: In the score's units: abstain when ``max_probability < threshold``, or
            when any other score ``> threshold``.
        target_coverage: The coverage asked for, or None.
        target_risk: The selective risk asked for, or None.
        coverage: The fraction answered on the calibration data.
        risk: The selective risk there (error rate, or squared error for regression).
        aurc: Area under the calibration data's risk–coverage curve for this score.
        n_calibration: Number of calibration inputs.
    """

    score: str
    threshold: float
    target_coverage: float | None
    target_risk: float | None
    coverage: float
    risk: float
    aurc: float
    n_calibration: int

    def abstains(self, scores: dict[str, Tensor]) -> Tensor:
        """Per input ``(B,)``, whether the rule abstains, from a batch's scores."""
        score = Score(self.score)
        values = scores[self.score]
        limit = uncertainty(score, torch.tensor(self.threshold, dtype=values.dtype))
        return uncertainty(score, values) > limit

    def to_state(self) -> dict[str, Any]:
        """The rule as plain values."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> AbstentionRule:
        """The rule from :meth:`to_state`."""
        return cls(**state)


@dataclass(frozen=True)
class AbstentionReport:
    """The calibrated rule and the risk–coverage figures it was chosen from.

    Attributes:
        rule: The rule (also set on the Laplace it was calibrated for).
        curve: The calibration data's risk–coverage curve for the rule's score.
        optimal_aurc: The area an oracle that orders inputs by their loss would reach.
    """

    rule: AbstentionRule
    curve: RiskCoverage
    optimal_aurc: float


def losses(task: str, batch: BatchScores, y: Tensor) -> Tensor:
    """Per-input loss ``(B,)``: 0/1 error (classification) or summed squared error."""
    y = y.detach().cpu()
    if task == "classification":
        return (batch.prediction != y.reshape(-1).long()).double()
    target = y.double().reshape(batch.prediction.shape)
    return ((batch.prediction - target) ** 2).sum(-1)


def choose(curve: RiskCoverage, target_coverage: float | None, target_risk: float | None) -> int:
    """The index of the curve point a target picks.

    Raises:
        ValueError: When no point keeps the risk at or below ``target_risk``.
    """
    if target_coverage is not None:
        reached = torch.nonzero(curve.coverage >= target_coverage - 1e-12).reshape(-1)
        return int(reached[0])
    allowed = torch.nonzero(curve.risk <= float(target_risk) + 1e-12).reshape(-1)  # type: ignore[arg-type]
    if allowed.numel() == 0:
        best = int(curve.risk.argmin())
        raise ValueError(
            f"no threshold keeps the selective risk at or below target_risk={target_risk}: "
            f"the lowest on these data is {float(curve.risk[best]):.4g} at coverage "
            f"{float(curve.coverage[best]):.3g}. Ask for a larger risk or a coverage instead."
        )
    return int(allowed[-1])


def calibrate(
    task: str,
    scores_fn: Callable[[object], BatchScores],
    io: ModelIO,
    device: torch.device,
    val_loader: Iterable[Any],
    *,
    score: str | Score | None,
    target_coverage: float | None,
    target_risk: float | None,
) -> AbstentionReport:
    """Score the held-out batches and choose the threshold (see the module docstring).

    Args:
        task: The likelihood's task.
        scores_fn: Inputs (on the model's device) to their :class:`BatchScores`.
        io: Where inputs and targets are in a batch.
        device: The model's device.
        val_loader: Held-out ``(inputs, targets)`` batches, or mappings.
        score: The score; by default ``"max_probability"`` (classification) or
            ``"total_variance"`` (regression).
        target_coverage: Fraction of inputs to answer, in ``(0, 1]``.
        target_risk: Largest mean loss over the answered inputs, ``>= 0``.

    Raises:
        ValueError: For both or neither target, a target out of range, a score that does
            not apply to the task, an empty loader, or an unreachable risk.
    """
    allowed = scores_of(task)
    chosen = allowed[0] if score is None else Score(score) if score in set(Score) else None
    if chosen is None or chosen not in allowed:
        raise ValueError(
            f"score={score!r} does not apply to {task}; expected one of "
            f"{[s.value for s in allowed]}."
        )
    if (target_coverage is None) == (target_risk is None):
        raise ValueError("give exactly one of target_coverage= and target_risk=.")
    if target_coverage is not None and not 0 < target_coverage <= 1:
        raise ValueError(f"target_coverage must be in (0, 1], got {target_coverage}.")
    if target_risk is not None and not (math.isfinite(target_risk) and target_risk >= 0):
        raise ValueError(f"target_risk must be finite and >= 0, got {target_risk}.")
    values, loss = [], []
    for index, batch in enumerate(val_loader):
        x, y = io.split(batch, index)
        scored = scores_fn(to_device(x, device))
        values.append(scored.scores[chosen.value])
        loss.append(losses(task, scored, y))
    if not values:
        raise ValueError("val_loader yielded no batches; abstention needs held-out data.")
    score_values, loss_values = torch.cat(values), torch.cat(loss)
    curve = risk_coverage(uncertainty(chosen, score_values), loss_values)
    point = choose(curve, target_coverage, target_risk)
    rule = AbstentionRule(
        score=chosen.value,
        threshold=float(uncertainty(chosen, curve.thresholds[point])),
        target_coverage=None if target_coverage is None else float(target_coverage),
        target_risk=None if target_risk is None else float(target_risk),
        coverage=float(curve.coverage[point]),
        risk=float(curve.risk[point]),
        aurc=curve.aurc,
        n_calibration=int(score_values.numel()),
    )
    optimal = risk_coverage(loss_values, loss_values).aurc
    return AbstentionReport(rule, curve, optimal)
