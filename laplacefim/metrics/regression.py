"""Regression metrics for Gaussian predictive distributions ``N(mean, var)``.

``mean`` and ``y`` share one shape (e.g. ``(B,)`` or ``(B, K)``); ``var`` has that shape or
broadcasts to it (e.g. a scalar noise variance). Every metric averages over all elements.
Each is a function and an accumulator whose state is a few float64 sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor

from laplacefim.metrics._base import ArrayLike, SumState, mean_of, to_tensor, zeros

# Quantile levels of ``calibration_error`` by default: 0.05, 0.10, …, 0.95.
DEFAULT_LEVELS: tuple[float, ...] = tuple(i / 20 for i in range(1, 20))


def _inputs(mean: ArrayLike, var: ArrayLike, y: ArrayLike) -> tuple[Tensor, Tensor, Tensor]:
    """Checked float64 ``mean``, ``var`` (broadcast to ``mean``'s shape) and ``y``."""
    m = to_tensor(mean, "mean")
    v = to_tensor(var, "var").to(m.device)
    t = to_tensor(y, "y").to(m.device)
    if t.shape != m.shape:
        raise ValueError(f"y must have mean's shape {tuple(m.shape)}; got {tuple(t.shape)}.")
    try:
        v = v.expand(m.shape)
    except RuntimeError:
        raise ValueError(
            f"var must have mean's shape {tuple(m.shape)} or broadcast to it; got {tuple(v.shape)}."
        ) from None
    if v.numel() and not bool((v > 0).all()):
        raise ValueError(
            f"var must be positive; got a minimum of {v.min().item():.6g}. Pass variances, "
            "not log-variances, and add the observation noise if it can vanish."
        )
    return m, v, t


def _level(level: float, name: str = "level") -> float:
    if not isinstance(level, int | float) or not 0.0 < level < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1); got {level!r}.")
    return float(level)


def _count(x: Tensor) -> Tensor:
    return x.new_tensor(float(x.numel()))


class GaussianNLL(SumState):
    """Streaming mean Gaussian NLL, ``½ log(2π var) + (y − mean)² / (2 var)`` in nats,
    with the constant (unlike ``torch.nn.GaussianNLLLoss``'s default ``full=False``)."""

    def __init__(self) -> None:
        super().__init__(zeros((), ()))

    def update(self, mean: ArrayLike, var: ArrayLike, y: ArrayLike) -> None:
        """Add a batch: ``mean`` and ``y`` of one shape, ``var`` broadcasting to it."""
        m, v, t = _inputs(mean, var, y)
        per = 0.5 * (torch.log(2 * math.pi * v) + (t - m).square() / v)
        self._add([per.sum(), _count(m)])

    def compute(self) -> float:
        """The mean NLL so far."""
        return mean_of(self._sums(), "GaussianNLL")


class CRPS(SumState):
    """Streaming mean continuous ranked probability score of ``N(mean, var)`` (closed form;
    in the units of ``y``, lower is better); see ``crps_gaussian``."""

    def __init__(self) -> None:
        super().__init__(zeros((), ()))

    def update(self, mean: ArrayLike, var: ArrayLike, y: ArrayLike) -> None:
        """Add a batch: ``mean`` and ``y`` of one shape, ``var`` broadcasting to it."""
        m, v, t = _inputs(mean, var, y)
        sigma = v.sqrt()
        z = (t - m) / sigma
        pdf = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
        per = sigma * (z * (2 * torch.special.ndtr(z) - 1) + 2 * pdf - 1 / math.sqrt(math.pi))
        self._add([per.sum(), _count(m)])

    def compute(self) -> float:
        """The mean CRPS so far."""
        return mean_of(self._sums(), "CRPS")


class Sharpness(SumState):
    """Streaming sharpness ``√(mean var)``: the root-mean predictive variance, in ``y``'s
    units (lower is sharper)."""

    def __init__(self) -> None:
        super().__init__(zeros((), ()))

    def update(self, var: ArrayLike) -> None:
        """Add a batch of predictive variances (any shape, all positive)."""
        v = to_tensor(var, "var")
        if v.numel() and not bool((v > 0).all()):
            raise ValueError(f"var must be positive; got a minimum of {v.min().item():.6g}.")
        self._add([v.sum(), _count(v)])

    def compute(self) -> float:
        """The sharpness so far."""
        return math.sqrt(mean_of(self._sums(), "Sharpness"))


@dataclass(frozen=True)
class CoverageResult:
    """Empirical coverage of central predictive intervals.

    Attributes:
        level: The nominal probability of the intervals.
        coverage: The fraction of targets inside ``mean ± z σ``, ``z = Φ⁻¹((1 + level) / 2)``.
        width: The mean interval width ``2 z σ`` (in ``y``'s units).
    """

    level: float
    coverage: float
    width: float


class Coverage(SumState):
    """Streaming coverage and mean width of central ``level`` intervals.

    Args:
        level: Nominal probability of the intervals, in ``(0, 1)``.

    Raises:
        ValueError: If ``level`` is outside ``(0, 1)``.
    """

    def __init__(self, level: float = 0.9) -> None:
        self.level = _level(level)
        self._z = NormalDist().inv_cdf(0.5 + self.level / 2)
        super().__init__(zeros((), (), ()))

    def _config(self) -> tuple[object, ...]:
        return (self.level,)

    def update(self, mean: ArrayLike, var: ArrayLike, y: ArrayLike) -> None:
        """Add a batch: ``mean`` and ``y`` of one shape, ``var`` broadcasting to it."""
        m, v, t = _inputs(mean, var, y)
        half_width = self._z * v.sqrt()
        inside = ((t - m).abs() <= half_width).to(m.dtype).sum()
        self._add([inside, 2 * half_width.sum(), _count(m)])

    def compute(self) -> CoverageResult:
        """Coverage and mean width so far."""
        inside, width, count = self._sums()
        return CoverageResult(
            level=self.level,
            coverage=mean_of([inside, count], "Coverage"),
            width=mean_of([width, count], "Coverage"),
        )


class QuantileCalibration(SumState):
    """Streaming regression calibration error over quantile levels; see ``calibration_error``.

    Args:
        levels: Quantile levels in ``(0, 1)``.

    Raises:
        ValueError: If ``levels`` is empty or holds a value outside ``(0, 1)``.
    """

    def __init__(self, levels: Sequence[float] = DEFAULT_LEVELS) -> None:
        if len(levels) == 0:
            raise ValueError("levels must hold at least one quantile level in (0, 1).")
        self.levels = tuple(_level(p, "each of levels") for p in levels)
        self._z = [NormalDist().inv_cdf(p) for p in self.levels]
        super().__init__(zeros((len(self.levels),), ()))

    def _config(self) -> tuple[object, ...]:
        return self.levels

    def update(self, mean: ArrayLike, var: ArrayLike, y: ArrayLike) -> None:
        """Add a batch: ``mean`` and ``y`` of one shape, ``var`` broadcasting to it."""
        m, v, t = _inputs(mean, var, y)
        z_obs = ((t - m) / v.sqrt()).reshape(-1)
        z = torch.tensor(self._z, dtype=torch.float64, device=m.device)
        below = (z_obs[None, :] <= z[:, None]).to(m.dtype).sum(1)
        self._add([below, _count(m)])

    def frequencies(self) -> Tensor:
        """Observed frequency of ``y ≤`` the predicted ``p``-quantile, per level ``(L,)``."""
        below, count = self._sums()
        mean_of([count, count], "QuantileCalibration")  # raises if empty
        return below / count

    def compute(self) -> float:
        """Mean over levels of ``|observed frequency − level|``, in ``[0, 1)``."""
        levels = torch.tensor(self.levels, dtype=torch.float64)
        return float((self.frequencies().cpu() - levels).abs().mean())


def _one_shot(metric: GaussianNLL | CRPS, mean: ArrayLike, var: ArrayLike, y: ArrayLike) -> float:
    metric.update(mean, var, y)
    return metric.compute()


def gaussian_nll(mean: ArrayLike, var: ArrayLike, y: ArrayLike) -> float:
    """Mean Gaussian negative log-likelihood, including the ``½ log 2π`` constant.

    Args:
        mean: Predictive means, e.g. ``(B,)`` or ``(B, K)``.
        var: Predictive variances (> 0), ``mean``'s shape or broadcasting to it.
        y: Targets, ``mean``'s shape.

    Returns:
        ``mean(½ log(2π var) + (y − mean)² / (2 var))`` in nats.

    Raises:
        TypeError: If an input is not a tensor or numpy array.
        ValueError: On mismatched shapes, non-finite values or ``var <= 0``.
    """
    return _one_shot(GaussianNLL(), mean, var, y)


def crps_gaussian(mean: ArrayLike, var: ArrayLike, y: ArrayLike) -> float:
    """Mean CRPS of Gaussian predictions, in closed form.

    ``CRPS(N(μ, σ²), y) = ∫ (F(x) − 1[x ≥ y])² dx = σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π]``
    with ``z = (y − μ)/σ`` (Gneiting & Raftery, 2007). It reduces to ``|y − μ|`` as σ → 0.

    Args, Raises as in ``gaussian_nll``.

    Returns:
        The mean CRPS in ``y``'s units.

    Example:
        >>> crps_gaussian(torch.zeros(1), torch.ones(1), torch.zeros(1))  # (√2 − 1)/√π
        0.2336949772...
    """
    return _one_shot(CRPS(), mean, var, y)


def coverage(mean: ArrayLike, var: ArrayLike, y: ArrayLike, level: float = 0.9) -> CoverageResult:
    """Coverage and mean width of the central ``level`` intervals ``mean ± z σ``.

    Args:
        mean: Predictive means, as in ``gaussian_nll``.
        var: Predictive variances, as in ``gaussian_nll``.
        y: Targets, as in ``gaussian_nll``.
        level: Nominal probability, in ``(0, 1)``; ``z = Φ⁻¹((1 + level) / 2)``.

    Returns:
        The observed coverage (≈ ``level`` when calibrated) and the mean width ``2 z σ``.

    Raises:
        TypeError: If an input is not a tensor or numpy array.
        ValueError: On bad inputs, or ``level`` outside ``(0, 1)``.
    """
    metric = Coverage(level)
    metric.update(mean, var, y)
    return metric.compute()


def calibration_error(
    mean: ArrayLike, var: ArrayLike, y: ArrayLike, levels: Sequence[float] = DEFAULT_LEVELS
) -> float:
    """Regression calibration error over quantile levels.

    For each level ``p``, the observed frequency ``f_p`` of ``y ≤ μ + σ Φ⁻¹(p)`` (the
    fraction of PIT values ``Φ((y − μ)/σ) ≤ p``); the error is ``mean_p |f_p − p|``
    (Kuleshov et al., 2018, use a weighted squared gap instead).

    Args:
        mean: Predictive means, as in ``gaussian_nll``.
        var: Predictive variances, as in ``gaussian_nll``.
        y: Targets, as in ``gaussian_nll``.
        levels: Quantile levels in ``(0, 1)``; by default 0.05, 0.10, …, 0.95.

    Returns:
        The mean absolute miscalibration, in ``[0, 1)``.

    Raises:
        TypeError: If an input is not a tensor or numpy array.
        ValueError: On bad inputs or levels.
    """
    metric = QuantileCalibration(levels)
    metric.update(mean, var, y)
    return metric.compute()


def sharpness(var: ArrayLike) -> float:
    """Root-mean predictive variance ``√(mean var)``, in ``y``'s units (lower is sharper).

    Some authors (Kuleshov et al., 2018) report the mean variance, the square of this.

    Raises:
        TypeError: If ``var`` is not a tensor or numpy array.
        ValueError: If ``var`` holds non-positive or non-finite values.
    """
    metric = Sharpness()
    metric.update(var)
    return metric.compute()
