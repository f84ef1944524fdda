"""The evaluation pipeline behind ``laplacefim demo`` and ``laplacefim evaluate``.

Fit a posterior and tune its prior (:func:`fit_posterior`), score MAP and Laplace
predictions (:func:`classification_scores`, :func:`ood_scores`,
:func:`regression_scores`), and turn the results into a JSON report, a readable table
(:func:`format_report`) and files (:func:`write_report`). The report's schema is
documented in ``docs/cli.md``; ``REPORT_SCHEMA`` names its version.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplacefim import metrics as M
from laplacefim.laplace import Laplace
from laplacefim.likelihoods import LikelihoodModel, make_likelihood
from laplacefim.options import CurvatureKind

REPORT_SCHEMA = "laplacefim.report/1"
"""Name and version of the report.json layout (see docs/cli.md)."""

N_BINS = 15
"""Equal-width bins of the ECE and reliability diagrams."""

COVERAGE_LEVEL = 0.9
"""Level of the central predictive interval whose coverage regression reports."""

CLASSIFICATION_METRICS = ("accuracy", "nll", "ece", "brier")
OOD_METRICS = ("auroc", "aupr", "fpr95")
REGRESSION_METRICS = ("gaussian_nll", "crps", "coverage_90", "width_90", "rmse")

Predictor = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """One Laplace posterior to fit and evaluate.

    Attributes:
        name: Key in the report, e.g. ``"all_kron"``.
        label: Column label in tables and plots, e.g. ``"KFAC"``.
        subset: ``"all"`` or ``"last_layer"``.
        structure: ``"kron"``, ``"diag"`` or ``"full"``.
        curvature: ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
    """

    name: str
    label: str
    subset: str = "all"
    structure: str = "kron"
    curvature: str | CurvatureKind = "ggn"


@dataclass(frozen=True)
class FittedMethod:
    """A fitted, prior-tuned posterior and what the report says about it.

    Attributes:
        spec: What was fitted.
        laplace: The posterior.
        info: JSON-ready description: options, ``n_params``, ``prior_precision``,
            ``sigma_noise`` (regression), ``log_marginal_likelihood``, ``tune_converged``,
            ``tune_iterations``.
        fit_s: Seconds spent in ``fit``.
        tune_s: Seconds spent in ``tune_prior``.
    """

    spec: MethodSpec
    laplace: Laplace
    info: dict[str, Any]
    fit_s: float
    tune_s: float


def as_json(value: Tensor | float) -> float | list[float]:
    """A 0-d tensor as a float, a 1-d tensor as a list of floats, a number as a float."""
    if isinstance(value, Tensor):
        return float(value) if value.ndim == 0 else [float(v) for v in value.reshape(-1)]
    return float(value)


def fit_posterior(
    model: nn.Module,
    loader: Iterable[Any],
    likelihood: str | LikelihoodModel,
    spec: MethodSpec,
    *,
    progress: bool | None = None,
) -> FittedMethod:
    """Fit a Laplace posterior and tune its scalar prior (and regression noise) by evidence.

    Args:
        model: The trained model.
        loader: Training batches ``(inputs, targets)``.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        spec: Subset, structure and curvature.
        progress: Show the fit's progress bar (None: only on a terminal).

    Returns:
        The fitted method.

    Raises:
        ValueError, TypeError: As ``Laplace``, ``fit`` and ``tune_prior`` raise them.
    """
    la = Laplace(
        model, likelihood, subset=spec.subset, structure=spec.structure, curvature=spec.curvature
    )
    show = sys.stderr.isatty() if progress is None else progress
    start = time.perf_counter()
    la.fit(loader, progress=show)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-convergence goes in the report
        tuned = la.tune_prior()
    tune_s = time.perf_counter() - start
    info: dict[str, Any] = {
        "label": spec.label,
        "subset": spec.subset,
        "structure": la.structure,
        "curvature": la.curvature_kind.value,
        "predictive": "glm" if la.config.likelihood.task == "regression" else "glm-probit",
        "n_params": la.n_params,
        "prior_precision": as_json(tuned.prior_precision),
        "log_marginal_likelihood": float(tuned.log_marginal_likelihood),
        "tune_converged": bool(tuned.converged),
        "tune_iterations": int(tuned.n_iter),
    }
    if la.config.likelihood.has_noise:
        info["sigma_noise"] = as_json(tuned.sigma_noise)
    if la.last_layer is not None:
        info["last_layer"] = la.last_layer
    return FittedMethod(spec, la, info, fit_s, tune_s)


def classification_scores(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, NLL (nats), ECE (15 equal-width bins, top-label) and Brier score.

    Args:
        probs: Probabilities ``(B, C)``, or ``(B,)`` = P(y = 1) for binary.
        labels: Class indices ``(B,)``.
    """
    return {
        "accuracy": M.accuracy(probs, labels),
        "nll": M.nll(probs, labels),
        "ece": M.ece(probs, labels, N_BINS),
        "brier": M.brier(probs, labels),
    }


def ood_scores(probs_in: Tensor, probs_out: Tensor) -> dict[str, float]:
    """OOD detection by max-probability; in-distribution is the positive class.

    Args:
        probs_in: Probabilities on in-distribution inputs ``(N_in, C)`` or ``(N_in,)``.
        probs_out: Probabilities on out-of-distribution inputs ``(N_out, C)`` or ``(N_out,)``.

    Returns:
        ``auroc``, ``aupr`` (AUPR-In) and ``fpr95`` (FPR at 95% TPR).
    """
    s_in, s_out = M.max_probability(probs_in), M.max_probability(probs_out)
    return {
        "auroc": M.ood_auroc(s_in, s_out),
        "aupr": M.ood_aupr(s_in, s_out),
        "fpr95": M.fpr_at_95_tpr(s_in, s_out),
    }


def regression_scores(mean: Tensor, var: Tensor, y: Tensor) -> dict[str, float]:
    """Gaussian NLL, CRPS, coverage and width of the 90% interval, and RMSE.

    Args:
        mean: Predictive means ``(B, K)``.
        var: Predictive variances, ``mean``'s shape or broadcasting to it.
        y: Targets ``(B, K)``.
    """
    cover = M.coverage(mean, var, y, COVERAGE_LEVEL)
    return {
        "gaussian_nll": M.gaussian_nll(mean, var, y),
        "crps": M.crps_gaussian(mean, var, y),
        "coverage_90": cover.coverage,
        "width_90": cover.width,
        "rmse": math.sqrt(float((mean.double() - y.double()).square().mean())),
    }


@torch.no_grad()
def map_probs(
    model: nn.Module, x: Tensor, likelihood: str | LikelihoodModel, chunk: int = 1024
) -> Tensor:
    """The MAP model's prediction: softmax ``(B, C)``, for binary sigmoid ``(B,)``."""
    was_training = model.training
    model.eval()
    try:
        logits = torch.cat([model(part) for part in x.split(chunk)])
    finally:
        model.train(was_training)
    return make_likelihood(likelihood).point_prediction(logits)


def laplace_probs(la: Laplace, x: Tensor) -> Tensor:
    """GLM probit probabilities ``(B, C)`` (binary ``(B,)``) of a fitted posterior."""
    probs = la.predict(x).probs
    if probs is None:  # pragma: no cover - classification predictions always carry probs
        raise RuntimeError("the Laplace prediction has no probabilities.")
    return probs.detach()


@dataclass(frozen=True)
class EvalData:
    """Checked arrays of ``laplacefim evaluate``, as tensors in the model's dtype.

    Attributes:
        x_train: Training inputs ``(N, ...)``.
        y_train: Training targets: ``(N,)`` int64 labels (classification), ``(N,)`` or
            ``(N, 1)`` 0/1 values (binary), or ``(N, K)`` / ``(N,)`` floats (regression),
            shaped like the model's outputs.
        x_test: Test inputs ``(M, ...)``.
        y_test: Test targets, as ``y_train``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate_model` produced.

    Attributes:
        report: The JSON-ready report (schema in docs/cli.md).
        plot_data: Label to ``(probs, labels)`` (classification, binary), or to the
            ``(mean, var, y)`` of the test predictive (regression), for the plots.
    """

    report: dict[str, Any]
    plot_data: dict[str, tuple[Tensor, ...]]


def evaluate_model(
    model: nn.Module,
    data: EvalData,
    likelihood: str | LikelihoodModel,
    ood: Tensor | None = None,
    *,
    subset: str = "all",
    structure: str = "kron",
    curvature: str = "ggn",
    batch_size: int = 256,
    progress: bool | None = None,
) -> EvalResult:
    """Fit one Laplace posterior to a trained model and compare it with the MAP model.

    Classification and binary report accuracy, NLL, ECE and Brier on the test split and,
    with ``ood``, OOD detection scores; regression reports Gaussian NLL, CRPS, coverage and
    width of the 90% interval and RMSE, the MAP predictive using the tuned noise ``σ²``.

    Args:
        model: The trained model.
        data: Training and test arrays.
        likelihood: The likelihood of the targets.
        ood: Out-of-distribution inputs ``(N_out, ...)`` (classification and binary).
        subset: ``"all"`` or ``"last_layer"``.
        structure: ``"kron"``, ``"diag"`` or ``"full"``.
        curvature: ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        batch_size: Batch size of the curvature fit.
        progress: Progress bars on stderr; None shows them only on a terminal.

    Returns:
        The report and the data for the plots.

    Raises:
        ValueError, TypeError: As ``Laplace`` raises them for the model and data.
    """
    start = time.perf_counter()
    likelihood = make_likelihood(likelihood)
    spec = MethodSpec("laplace", f"LA {subset}/{structure}", subset, structure, curvature)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=batch_size)
    fitted = fit_posterior(model, loader, likelihood, spec, progress=progress)
    la = fitted.laplace
    methods: dict[str, dict[str, Any]] = {
        "map": {"label": "MAP", "n_params": sum(p.numel() for p in model.parameters())},
        "laplace": fitted.info,
    }
    tick = time.perf_counter()
    plot_data: dict[str, tuple[Tensor, ...]] = {}
    ood_report: dict[str, dict[str, dict[str, float]]] = {}
    y = data.y_test
    if likelihood.task == "regression":
        methods["map"]["predictive"] = "gaussian (MAP output, tuned noise)"
        prediction = la.predict(data.x_test)
        if prediction.mean is None or prediction.var is None:  # pragma: no cover
            raise RuntimeError("the regression prediction has no mean or variance.")
        mean = prediction.mean.detach().reshape(y.shape)
        var = prediction.var.detach().reshape(y.shape)
        noise = la.sigma_noise.to(mean).square() * torch.ones_like(mean.reshape(len(mean), -1))
        noise = noise.reshape(y.shape)
        metrics = {
            "map": {"test": regression_scores(mean, noise, y)},
            "laplace": {"test": regression_scores(mean, var, y)},
        }
        plot_data = {"MAP": (mean, noise, y), spec.label: (mean, var, y)}
    else:
        methods["map"]["predictive"] = "sigmoid" if likelihood.name == "binary" else "softmax"
        labels = y.reshape(-1).long()
        probs = {
            "map": map_probs(model, data.x_test, likelihood),
            "laplace": laplace_probs(la, data.x_test),
        }
        metrics = {name: {"test": classification_scores(p, labels)} for name, p in probs.items()}
        plot_data = {"MAP": (probs["map"], labels), spec.label: (probs["laplace"], labels)}
        if ood is not None:
            out = {"map": map_probs(model, ood, likelihood), "laplace": laplace_probs(la, ood)}
            ood_report = {name: {"ood": ood_scores(probs[name], out[name])} for name in probs}
    predict_s = time.perf_counter() - tick
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "command": "evaluate",
        "task": likelihood.name,
        "target": likelihood.task,
        "title": f"laplacefim evaluate: {likelihood.name}, MAP vs Laplace "
        f"({len(data.x_train)} train / {len(data.x_test)} test)",
        "config": {
            "likelihood": likelihood.name,
            "subset": subset,
            "structure": structure,
            "curvature": curvature,
            "batch_size": batch_size,
        },
        "data": {
            "n_train": len(data.x_train),
            "n_test": len(data.x_test),
            "input_shape": list(data.x_train.shape[1:]),
        },
        "model": {"n_params": methods["map"]["n_params"]},
        "methods": methods,
        "shifts": {"test": {"n": len(data.x_test)}},
        "ood_sets": {} if ood is None else {"ood": {"n": len(ood)}},
        "ood_reference": "test",
        "metrics": metrics,
        "ood": ood_report,
        "timings": {
            "fit_s": fitted.fit_s,
            "tune_s": fitted.tune_s,
            "predict_s": predict_s,
            "total_s": time.perf_counter() - start,
        },
        "versions": versions(),
    }
    return EvalResult(report, plot_data)


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


def versions() -> dict[str, str]:
    """Versions of Python, laplacefim and the libraries the report depends on."""
    import numpy
    import sklearn

    import laplacefim

    return {
        "python": platform.python_version(),
        "laplacefim": laplacefim.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }


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
            prior_text = f"{prior:.4g}" if isinstance(prior, float) else str(prior)
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


__all__ = [
    "CLASSIFICATION_METRICS",
    "COVERAGE_LEVEL",
    "N_BINS",
    "OOD_METRICS",
    "REGRESSION_METRICS",
    "REPORT_SCHEMA",
    "EvalData",
    "EvalResult",
    "FittedMethod",
    "MethodSpec",
    "Predictor",
    "as_json",
    "classification_scores",
    "dumps",
    "evaluate_model",
    "fit_posterior",
    "format_report",
    "laplace_probs",
    "map_probs",
    "ood_scores",
    "regression_scores",
    "versions",
    "write_eval_plots",
    "write_report",
]
