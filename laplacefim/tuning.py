"""Prior (and noise) tuning for a fitted ``Laplace``: evidence maximisation or a grid search."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from laplacefim.fitting import unpack
from laplacefim.marglik import PriorTuning, tune_marglik
from laplacefim.options import Likelihood, PriorStructure, Structure, TuneMethod, parse_option
from laplacefim.predictive import predictive_nll

if TYPE_CHECKING:
    from laplacefim.laplace import Laplace


def _tensor(x: object, device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"validation inputs must be tensors, got {type(x).__name__}.")
    return x.to(device)


def tune_prior(
    la: Laplace,
    method: str | TuneMethod,
    prior_structure: str | PriorStructure,
    *,
    tune_noise: bool,
    val_loader: Iterable[Any] | None,
    grid: Tensor | None,
    tol: float,
    max_iter: int,
) -> PriorTuning:
    """Tune and set ``la``'s prior (and noise); see :meth:`Laplace.tune_prior`."""
    method = parse_option(method, TuneMethod, "method")
    structure = parse_option(prior_structure, PriorStructure, "prior_structure")
    fit = la._fitted()
    if method is TuneMethod.GRIDSEARCH:
        return gridsearch(la, val_loader, grid)
    if structure is PriorStructure.DIAGONAL and la.structure is Structure.KRON:
        raise ValueError(
            "prior_structure='diagonal' needs structure='diag' or 'full' (a per-parameter "
            "prior does not commute with Kronecker factors); with structure='kron' use "
            "prior_structure='scalar' or 'layerwise'."
        )
    tune_noise = tune_noise and la.likelihood is Likelihood.REGRESSION
    if tune_noise and la._sigma_noise.ndim > 0:
        raise ValueError(
            "noise tuning needs a scalar sigma_noise (a per-output noise is part of the "
            "fitted curvature); pass tune_noise=False or refit with a scalar."
        )
    dtype, device = torch.float64, fit.mean.device
    start = fit.layout.per_param(la._prior_precision.to(dtype=dtype, device=device)).mean()
    prior, sigma, n_iter, converged = tune_marglik(
        la._evidence(),
        structure,
        start.clamp_min(1e-8),
        la._sigma_noise.to(dtype=dtype, device=device),
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
    la.prior_precision = prior.detach()
    if tune_noise:
        la.sigma_noise = sigma.detach()
    value = la.log_marginal_likelihood().detach()
    return PriorTuning(la._prior_precision, la._sigma_noise, value, n_iter, converged)


def gridsearch(la: Laplace, val_loader: Iterable[Any] | None, grid: Tensor | None) -> PriorTuning:
    """The scalar prior in ``grid`` with the lowest validation NLL (GLM probit)."""
    if val_loader is None:
        raise ValueError("method='gridsearch' needs val_loader=, a loader of validation batches.")
    fit = la._fitted()
    values = torch.logspace(-4, 4, 21, dtype=torch.float64) if grid is None else grid
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if values.numel() == 0 or not bool((torch.isfinite(values) & (values > 0)).all()):
        raise ValueError(f"grid must hold finite prior precisions > 0, got {values.tolist()}.")
    batches = [unpack(batch, i) for i, batch in enumerate(val_loader)]
    if not batches:
        raise ValueError("val_loader yielded no batch.")
    device = fit.mean.device
    before = la._prior_precision
    scores = []
    try:
        for value in values:
            la._prior_precision = value
            scores.append(
                sum(
                    float(
                        predictive_nll(la.likelihood, la.predict(_tensor(x, device)), y.to(device))
                    )
                    for x, y in batches
                )
            )
    finally:
        la._prior_precision = before
    best = values[min(range(len(scores)), key=scores.__getitem__)]
    la.prior_precision = best
    return PriorTuning(
        best, la._sigma_noise, la.log_marginal_likelihood().detach(), len(scores), True
    )
