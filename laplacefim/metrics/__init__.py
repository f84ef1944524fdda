"""Calibration, uncertainty and OOD metrics, each a function and a summable accumulator.

Functions take torch tensors or numpy arrays and return a float, a per-input tensor or a
small frozen dataclass. Accumulators (``Accuracy``, ``NLL``, ``Brier``, ``ECE``,
``Reliability``, ``GaussianNLL``, ``CRPS``, ``Coverage``, ``QuantileCalibration``,
``Sharpness``) keep only float64 sums (per-bin counts and totals, never the predictions),
so chunked, multi-worker or distributed evaluations add their states: ``merge`` adds
another accumulator, and ``state()`` returns the live tensors for an all-reduce.
Conventions (bin edges, norms, in-distribution positive, …) are in ``docs/metrics.md``.
"""

from laplacefim.metrics._base import PROB_ATOL, PROB_FLOOR, ArrayLike, Norm, SumState
from laplacefim.metrics.classification import (
    ECE,
    N_SUB_BINS,
    NLL,
    Accuracy,
    Brier,
    Reliability,
    ReliabilityDiagram,
    accuracy,
    brier,
    ece,
    mce,
    nll,
    reliability,
)
from laplacefim.metrics.regression import (
    CRPS,
    DEFAULT_LEVELS,
    Coverage,
    CoverageResult,
    GaussianNLL,
    QuantileCalibration,
    Sharpness,
    calibration_error,
    coverage,
    crps_gaussian,
    gaussian_nll,
    sharpness,
)
from laplacefim.metrics.uncertainty import (
    UncertaintyDecomposition,
    entropy,
    fpr_at_95_tpr,
    max_probability,
    mutual_information,
    ood_aupr,
    ood_auroc,
)

__all__ = [
    "CRPS",
    "DEFAULT_LEVELS",
    "ECE",
    "NLL",
    "N_SUB_BINS",
    "PROB_ATOL",
    "PROB_FLOOR",
    "Accuracy",
    "ArrayLike",
    "Brier",
    "Coverage",
    "CoverageResult",
    "GaussianNLL",
    "Norm",
    "QuantileCalibration",
    "Reliability",
    "ReliabilityDiagram",
    "Sharpness",
    "SumState",
    "UncertaintyDecomposition",
    "accuracy",
    "brier",
    "calibration_error",
    "coverage",
    "crps_gaussian",
    "ece",
    "entropy",
    "fpr_at_95_tpr",
    "gaussian_nll",
    "max_probability",
    "mce",
    "mutual_information",
    "nll",
    "ood_aupr",
    "ood_auroc",
    "reliability",
    "sharpness",
]
