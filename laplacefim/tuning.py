"""Prior (and noise) tuning: evidence maximisation or a grid search, as functions of values."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from laplacefim.config import CurvatureConfig, Hyperparameters
from laplacefim.inputs import to_device
from laplacefim.layout import Layout
from laplacefim.marglik import Evidence, PriorTuning, tune_marglik
from laplacefim.options import PriorStructure
from laplacefim.prediction import Prediction


def tune_evidence(
    evidence: Evidence,
    layout: Layout,
    config: CurvatureConfig,
    hyper: Hyperparameters,
    structure: PriorStructure,
    *,
    tune_noise: bool,
    tol: float,
    max_iter: int,
) -> tuple[Tensor, Tensor, int, bool]:
    """The prior (and noise) maximising the evidence, from the current values.

    Returns:
        The prior, the noise, the iteration count and whether it converged.

    Raises:
        ValueError: For a per-parameter prior on Kronecker blocks, or noise tuning with a
            per-output noise.
    """
    tune_noise = tune_noise and config.likelihood.has_noise
    if tune_noise and hyper.sigma_noise.ndim > 0:
        raise ValueError(
            "noise tuning needs a scalar sigma_noise (a per-output noise is part of the "
            "fitted curvature); pass tune_noise=False or refit with a scalar."
        )
    dtype, device = torch.float64, evidence.theta.device
    sigma = hyper.sigma_noise.to(dtype=dtype, device=device)
    current = hyper.prior_precision.to(dtype=dtype, device=device)
    start = layout.per_param(current).mean()
    if structure is not PriorStructure.SCALAR and current.shape == (layout.n_layers,):
        start = current  # warm start from the current layer-wise prior
    if structure is PriorStructure.DIAGONAL:  # refused by blocks that cannot absorb it
        evidence.precision(layout.per_param(start.clamp_min(1e-8)), sigma)
    prior, sigma, n_iter, converged = tune_marglik(
        evidence,
        structure,
        start.clamp_min(1e-8),
        sigma,
        tune_noise=tune_noise,
        tol=tol,
        max_iter=max_iter,
    )
    if not converged:
        warnings.warn(
            f"tune_prior did not converge in {max_iter} iterations; raise max_iter or tol.",
            RuntimeWarning,
            stacklevel=3,
        )
    return prior.detach(), sigma.detach(), n_iter, converged


def gridsearch(
    val_loader: Iterable[Any] | None,
    grid: Tensor | None,
    config: CurvatureConfig,
    device: torch.device,
    predict: Callable[[Tensor, object], Prediction],
) -> tuple[Tensor, int]:
    """The scalar prior in ``grid`` with the lowest validation NLL of ``predict(prior, x)``.

    Returns:
        The best prior and the number of grid points evaluated.

    Raises:
        ValueError: Without ``val_loader``, for an empty one, or a grid of bad values.
    """
    if val_loader is None:
        raise ValueError("method='gridsearch' needs val_loader=, a loader of validation batches.")
    values = torch.logspace(-4, 4, 21, dtype=torch.float64) if grid is None else grid
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if values.numel() == 0 or not bool((torch.isfinite(values) & (values > 0)).all()):
        raise ValueError(f"grid must hold finite prior precisions > 0, got {values.tolist()}.")
    batches = [config.io.split(batch, i) for i, batch in enumerate(val_loader)]
    if not batches:
        raise ValueError("val_loader yielded no batch.")
    batches = [(to_device(x, device), y.to(device)) for x, y in batches]
    scores = [
        sum(float(config.likelihood.predictive_nll(predict(value, x), y)) for x, y in batches)
        for value in values
    ]
    best = min(range(len(scores)), key=scores.__getitem__)
    chosen = values[best]
    if len(scores) > 1 and (chosen == values.min() or chosen == values.max()):
        edge = "smallest" if chosen == values.min() else "largest"
        warnings.warn(
            f"gridsearch chose the {edge} prior precision of its grid ({float(values[best]):.3g}):"
            " the best value may lie beyond it; extend grid= past that end.",
            RuntimeWarning,
            stacklevel=3,
        )
    return values[best], len(scores)


__all__ = ["PriorTuning", "gridsearch", "tune_evidence"]
