"""PNG plots of calibration and robustness: reliability diagrams, shift curves, quantiles.

matplotlib is an optional dependency (``pip install laplacefim[plot]``); it is imported
when a plot is drawn, not when this module is imported. Figures are drawn on matplotlib's
Agg canvas directly (no ``pyplot``), so nothing changes the caller's backend or global
figure state, and every function works on machines without a display.

Example:
    >>> from laplacefim import plots
    >>> plots.reliability_diagram({"MAP": (p_map, y), "Laplace": (p_la, y)}, "rel.png")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from laplacefim.metrics import (
    DEFAULT_LEVELS,
    ArrayLike,
    QuantileCalibration,
    ReliabilityDiagram,
    reliability,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_EXTRA_HINT = "pip install laplacefim[plot]"
"""What to install for the plots (the ``plot`` extra pulls in matplotlib)."""

DPI = 120
"""Resolution of the written PNG files."""

ReliabilityInput = ReliabilityDiagram | tuple[ArrayLike, ArrayLike]
"""A computed diagram, or ``(probs, labels)``: probs ``(B, C)`` or ``(B,)``, labels ``(B,)``."""

ShiftTable = Mapping[str, Mapping[float, Mapping[str, float]]]
"""``table[method][intensity][metric] -> value``, e.g. ``table["MAP"][30.0]["nll"]``."""


def _figure(width: float, height: float) -> Figure:
    """A new matplotlib figure on an Agg canvas, or a clear error if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # ModuleNotFoundError is a subclass
        raise ModuleNotFoundError(
            "laplacefim.plots needs matplotlib, which is not installed (or failed to import: "
            f"{error}). Install the plotting extra with `{PLOT_EXTRA_HINT}` "
            "(or `pip install matplotlib`)."
        ) from error
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _path(path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}.")
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; give a path ending in .png, got {str(out)!r}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, format="png", dpi=DPI)
    return path


def _diagram(name: str, value: object, n_bins: int) -> ReliabilityDiagram:
    if isinstance(value, ReliabilityDiagram):
        return value
    if isinstance(value, tuple | list) and len(value) == 2:
        probs, labels = value
        return reliability(probs, labels, n_bins)
    raise TypeError(
        f"results[{name!r}] must be a ReliabilityDiagram or a (probs, labels) pair, "
        f"got {type(value).__name__}."
    )


def reliability_diagram(
    results: Mapping[str, ReliabilityInput],
    path: str | os.PathLike[str],
    *,
    n_bins: int = 15,
    title: str | None = None,
) -> Path:
    """Reliability diagram of several predictors, with their confidence histograms below.

    The top panel plots, per equal-width confidence bin, the accuracy against the mean
    confidence (a calibrated predictor lies on the diagonal); the bottom panel the share
    of samples in each bin. Binning is :func:`laplacefim.metrics.reliability`'s.

    Args:
        results: Label (e.g. ``"MAP"``, ``"KFAC"``) to a ``ReliabilityDiagram`` or to a
            ``(probs, labels)`` pair with probs ``(B, C)`` (or ``(B,)`` = P(y = 1)) and
            labels ``(B,)``. Curves are drawn in the mapping's order.
        path: Output file, ending in ``.png``; parent folders are created.
        n_bins: Number of bins for ``(probs, labels)`` pairs.
        title: Figure title.

    Returns:
        The path written.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.
        ValueError: If ``results`` is empty, or on bad probabilities or labels.
        TypeError: If a value is neither a diagram nor a pair.

    Example:
        >>> reliability_diagram({"MAP": (p_map, y), "KFAC": (p_la, y)}, "reliability.png")
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError(
            "results must be a non-empty mapping of label -> ReliabilityDiagram or "
            f"(probs, labels); got {results!r}."
        )
    diagrams = {str(name): _diagram(str(name), value, n_bins) for name, value in results.items()}
    out = _path(path)
    figure = _figure(5.5, 6.0)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    for name, diagram in diagrams.items():
        edges = diagram.edges.double().cpu()
        count = diagram.count.double().cpu()
        seen = count > 0
        (line,) = top.plot(
            diagram.confidence.double().cpu()[seen].numpy(),
            diagram.accuracy.double().cpu()[seen].numpy(),
            marker="o",
            markersize=3.5,
            linewidth=1.4,
            label=name,
        )
        share = (count / count.sum()).numpy()
        bottom.stairs(share, edges.numpy(), color=line.get_color(), linewidth=1.4)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize="small")
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.set_ylabel("share of samples")
    bottom.grid(alpha=0.3)
    top.set_title(title or "Reliability diagram")
    return _save(figure, out)


def shift_curves(
    table: ShiftTable,
    path: str | os.PathLike[str],
    metrics: Sequence[str] = ("accuracy", "nll", "ece"),
    *,
    xlabel: str = "rotation (degrees)",
    title: str | None = None,
) -> Path:
    """Each metric against the shift intensity, one curve per method, one panel per metric.

    Args:
        table: ``table[method][intensity][metric] -> value``; intensities are numbers
            (e.g. rotation angles in degrees) and are sorted before drawing.
        path: Output file, ending in ``.png``; parent folders are created.
        metrics: Metric names to draw, each present for every method and intensity.
        xlabel: Label of the intensity axis.
        title: Figure title.

    Returns:
        The path written.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.
        ValueError: If the table or ``metrics`` is empty, or a metric is missing.

    Example:
        >>> shift_curves({"MAP": {0: {"nll": 0.1}, 30: {"nll": 1.9}}}, "shift.png", ["nll"])
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    if not isinstance(table, Mapping) or not table or not metrics:
        raise ValueError(
            "shift_curves needs a non-empty table[method][intensity][metric] and at least one "
            f"metric name; got {len(table) if isinstance(table, Mapping) else table!r} methods "
            f"and metrics={tuple(metrics)!r}."
        )
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for method, rows in table.items():
        if not isinstance(rows, Mapping) or not rows:
            raise ValueError(
                f"table[{method!r}] must map intensities to metric dicts; got {rows!r}."
            )
        xs = sorted(rows, key=float)
        series[str(method)] = {}
        for metric in metrics:
            missing = [x for x in xs if metric not in rows[x]]
            if missing:
                raise ValueError(
                    f"metric {metric!r} is missing for method {method!r} at intensities "
                    f"{missing}; available: {sorted(rows[missing[0]])}."
                )
            series[str(method)][metric] = (
                [float(x) for x in xs],
                [float(rows[x][metric]) for x in xs],
            )
    out = _path(path)
    figure = _figure(3.6 * len(metrics), 3.4)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        for method, curves in series.items():
            xs, ys = curves[metric]
            ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.4, label=method)
        ax.set_xlabel(xlabel)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return _save(figure, out)


def regression_calibration(
    mean: ArrayLike,
    var: ArrayLike | Mapping[str, ArrayLike],
    y: ArrayLike,
    path: str | os.PathLike[str],
    *,
    levels: Sequence[float] = DEFAULT_LEVELS,
    title: str | None = None,
) -> Path:
    """Regression calibration plot: observed against expected quantile frequency.

    For each level ``p`` the observed frequency is the share of targets with
    ``y ≤ μ + σ Φ⁻¹(p)`` (as in :func:`laplacefim.metrics.calibration_error`); a
    calibrated Gaussian predictive lies on the diagonal.

    Args:
        mean: Predictive means ``(B,)`` or ``(B, K)``.
        var: Predictive variances (``mean``'s shape or broadcasting to it), or a mapping of
            label to variances for several predictors sharing the mean (e.g. MAP with its
            noise variance and the GLM Laplace predictive, whose mean is the MAP output).
        y: Targets, ``mean``'s shape.
        path: Output file, ending in ``.png``; parent folders are created.
        levels: Quantile levels in ``(0, 1)``.
        title: Figure title.

    Returns:
        The path written.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.
        ValueError: On bad shapes, non-positive variances or levels outside ``(0, 1)``.

    Example:
        >>> regression_calibration(mu, {"MAP": s2, "Laplace": pred.var}, y, "calib.png")
    """
    variances = var if isinstance(var, Mapping) else {"predictive": var}
    if not variances:
        raise ValueError("var must be variances or a non-empty mapping of label -> variances.")
    curves: dict[str, tuple[list[float], list[float], float]] = {}
    for name, v in variances.items():
        metric = QuantileCalibration(levels)
        metric.update(mean, v, y)
        curves[str(name)] = (
            list(metric.levels),
            metric.frequencies().cpu().tolist(),
            metric.compute(),
        )
    out = _path(path)
    figure = _figure(4.6, 4.4)
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    for name, (expected, observed, error) in curves.items():
        ax.plot(
            expected,
            observed,
            marker="o",
            markersize=3.5,
            linewidth=1.4,
            label=f"{name} (error {error:.3f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("expected frequency (quantile level)")
    ax.set_ylabel("observed frequency")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title or "Regression calibration")
    return _save(figure, out)


__all__ = [
    "DPI",
    "PLOT_EXTRA_HINT",
    "ReliabilityInput",
    "ShiftTable",
    "regression_calibration",
    "reliability_diagram",
    "shift_curves",
]
