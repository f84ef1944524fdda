"""The evaluation report as text and files: the metric tables (:func:`format_report`),
``report.json`` (:func:`write_report`, :func:`dumps`) and the plots
(:func:`write_eval_plots`)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from laplacefim.evaluation import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    EvalResult,
)


def write_eval_plots(result: EvalResult, out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """``reliability.png`` (classification, binary) or ``calibration.png`` (regression).

    Returns:
        File names by plot, relative to ``out_dir``.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.
    """
    from laplacefim import plots

    folder = Path(out_dir)
    if result.report["target"] == "regression":
        (mean, _, y), *_ = result.plot_data.values()
        variances = {label: values[1] for label, values in result.plot_data.items()}
        plots.regression_calibration(
            mean, variances, y, folder / "calibration.png", title="Calibration on the test split"
        )
        return {"calibration": "calibration.png"}
    pairs = {label: (values[0], values[1]) for label, values in result.plot_data.items()}
    plots.reliability_diagram(
        pairs, folder / "reliability.png", title="Reliability on the test split"
    )
    return {"reliability": "reliability.png"}


def _cell(value: float, width: int) -> str:
    return f"{value:>{width}.3f}" if math.isfinite(value) else f"{'—':>{width}}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(
        h.ljust(w) if i < 2 else h.rjust(w)
        for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    out = [line, "-" * len(line)]
    for row in rows:
        out.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(out)


def format_report(report: Mapping[str, Any]) -> str:
    """The report as readable text: one metric table, an OOD table, priors and timings."""
    labels = {name: spec.get("label", name) for name, spec in report["methods"].items()}
    metrics = report["metrics"]
    names = list(labels)
    regression = report["target"] == "regression"
    columns = REGRESSION_METRICS if regression else CLASSIFICATION_METRICS
    titles = {
        "accuracy": "acc ↑",
        "nll": "NLL ↓",
        "ece": "ECE ↓",
        "brier": "Brier ↓",
        "gaussian_nll": "NLL ↓",
        "crps": "CRPS ↓",
        "coverage_90": "cov@90",
        "width_90": "width@90",
        "rmse": "RMSE ↓",
    }
    rows = []
    for shift in report["shifts"]:
        for i, name in enumerate(names):
            values = metrics[name][shift]
            rows.append(
                [shift if i == 0 else "", labels[name], *(_cell(values[c], 7) for c in columns)]
            )
    parts = [
        report.get("title", ""),
        _table(["shift", "method", *(titles[c] for c in columns)], rows),
    ]
    if report.get("ood"):
        sets = list(report["ood_sets"])
        ood_rows = [
            [labels[n], "", *(_cell(report["ood"][n][s]["auroc"], 7) for s in sets)] for n in names
        ]
        parts.append(
            "OOD detection: AUROC ↑ of the max probability (in-distribution = "
            f"{report.get('ood_reference', 'test')}, positive)\n"
            + _table(["method", "", *sets], ood_rows)
        )
    lines = []
    for name, spec in report["methods"].items():
        if "prior_precision" in spec:
            prior = spec["prior_precision"]
            prior_text = (
                f"{prior:.4g}"
                if isinstance(prior, float)
                else "[" + ", ".join(f"{v:.3g}" for v in prior) + "]"
            )
            note = "" if spec["tune_converged"] else " (tuning did not converge)"
            noise = (
                f", sigma = {spec['sigma_noise']:.4g}"
                if isinstance(spec.get("sigma_noise"), float)
                else ""
            )
            lines.append(
                f"  {labels[name]:<8} P = {spec['n_params']:>7}  prior precision "
                f"{prior_text}{noise}  log evidence {spec['log_marginal_likelihood']:.1f}"
                f"{note}"
            )
    if lines:
        parts.append("Posteriors (prior tuned by marginal likelihood):\n" + "\n".join(lines))
    timings = report.get("timings", {})
    seconds = timings.get("wall_s", timings.get("total_s"))
    if seconds is not None:
        parts.append(f"Run time {seconds:.1f} s (after imports).")
    return "\n\n".join(p for p in parts if p)


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.json`` (indented, NaN written as null) into ``out_dir``; return its path."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.json"
    tmp = folder / ".report.json.tmp"
    tmp.write_text(dumps(report) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def dumps(report: Mapping[str, Any]) -> str:
    """The report as strict JSON text (non-finite numbers become null)."""
    return json.dumps(_clean(report), indent=2, ensure_ascii=False, allow_nan=False)


__all__ = ["dumps", "format_report", "write_eval_plots", "write_report"]
