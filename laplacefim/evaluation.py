"""The evaluation pipeline behind ``laplacefim demo`` and ``laplacefim evaluate``.

Fit a posterior and tune its prior (:func:`fit_posterior`), score MAP and Laplace
predictions (:func:`classification_scores`, :func:`ood_scores`,
:func:`regression_scores`), and collect them in a JSON-ready report
(:func:`evaluate_model`); :mod:`laplacefim.report` turns it into text and files. The
report's schema is documented in ``docs/cli.md``; ``REPORT_SCHEMA`` names its version.
"""

from __future__ import annotations

import math
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
        prior_structure: The prior tuned by evidence: ``"layerwise"`` (one precision per
            layer: the recommended default, chosen by ``benchmarks/calibration.py``),
            ``"scalar"`` or ``"diagonal"``.
    """

    name: str
    label: str
    subset: str = "all"
    structure: str = "kron"
    curvature: str | CurvatureKind = "ggn"
    prior_structure: str = "layerwise"


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
    """Fit a Laplace posterior and tune its prior (and regression noise) by evidence.

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
        tuned = la.tune_prior(prior_structure=spec.prior_structure)
    tune_s = time.perf_counter() - start
    info: dict[str, Any] = {
        "label": spec.label,
        "subset": spec.subset,
        "structure": la.structure,
        "curvature": la.curvature_kind.value,
        "predictive": "glm" if la.config.likelihood.task == "regression" else "glm-probit",
        "n_params": la.n_params,
        "prior_structure": spec.prior_structure,
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
