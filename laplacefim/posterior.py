"""The posterior of a fit at given hyperparameters: scale, evidence and precision blocks.

Functions of values (configuration, hyperparameters, fitted state, decompositions), on
which ``Laplace`` and the tuning, persistence and fine-tuning functions are built.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from laplacefim.config import CurvatureConfig, FitState, Hyperparameters
from laplacefim.marglik import Evidence
from laplacefim.structures import BlockDiagonal
from laplacefim.structures.base import Decomposition, Precision

# Largest P for which a dense (P, P) matrix is built on request (20,000² float32 ≈ 1.6 GB).
DENSE_LIMIT = 20_000


def log_likelihood(
    config: CurvatureConfig, hyper: Hyperparameters, fit: FitState, sigma: Tensor
) -> Tensor:
    """Tempered log-likelihood of the training data at the mean, for noise ``sigma``."""
    stats = fit.loss_stats.to(torch.float64)
    value = config.likelihood.log_likelihood(stats, fit.n_data, sigma.to(stats))
    return value / hyper.temperature


def curvature_scale(
    config: CurvatureConfig, hyper: Hyperparameters, fit: FitState, sigma: Tensor
) -> Tensor:
    """Factor on the fitted curvature: ``1/T`` times the likelihood's noise ratio.

    Raises:
        ValueError: If the fitted curvature cannot follow this noise.
    """
    sigma = sigma.to(device=fit.mean.device)
    ratio = config.likelihood.curvature_scale(config.kind, fit.sigma_fit, sigma)
    return ratio / hyper.temperature


def check_noise(
    config: CurvatureConfig, hyper: Hyperparameters, fit: FitState | None, sigma: Tensor
) -> None:
    """Raise ``ValueError`` unless ``sigma`` is a noise the likelihood takes, of shape 0-d
    or ``(K,)``, that the fitted curvature (if any) can follow."""
    config.likelihood.check_noise(sigma)
    if sigma.ndim > 1:
        raise ValueError(f"sigma_noise must be a scalar or (K,), got shape {tuple(sigma.shape)}.")
    if fit is not None:
        curvature_scale(config, hyper, fit, sigma)


def evidence(
    config: CurvatureConfig,
    hyper: Hyperparameters,
    fit: FitState,
    decompositions: list[Decomposition],
) -> Evidence:
    """The evidence as a function of prior and noise, summed in float64 whatever the model's
    dtype (tuning compares values of order N to a tolerance far below float32's there)."""
    return Evidence(
        decompositions,
        fit.layout,
        fit.mean.to(torch.float64),
        lambda sigma: log_likelihood(config, hyper, fit, sigma),
        lambda sigma: curvature_scale(config, hyper, fit, sigma),
    )


def precisions(
    config: CurvatureConfig,
    hyper: Hyperparameters,
    fit: FitState,
    decompositions: list[Decomposition],
) -> list[Precision]:
    """Decomposed posterior-precision blocks at the hyperparameters, in the fit's dtype.

    Raises:
        ValueError: If the precision is singular (a zero prior on a null direction).
    """
    device = fit.mean.device
    prior = hyper.prior_precision.to(device=device, dtype=torch.float64)
    sigma = hyper.sigma_noise.to(device=device, dtype=torch.float64)
    dtype = fit.curvature.state()[0].dtype
    found = evidence(config, hyper, fit, decompositions).precision(prior, sigma)
    blocks = [block.to(dtype) for block in found]
    # With a positive prior every eigenvalue is >= the prior. Where the prior has zeros,
    # an eigenvalue below P·eps of the largest is zero up to rounding: a null direction.
    floor = 0.0
    if not bool((hyper.prior_precision > 0).all()):
        largest = max(float(block.eigenvalue_range()[1]) for block in blocks)
        floor = fit.mean.numel() * torch.finfo(fit.mean.dtype).eps * largest
    if any(not float(block.eigenvalue_range()[0]) > floor for block in blocks):
        raise ValueError(
            "the posterior precision is singular: some of its eigenvalues are zero "
            f"(prior_precision={hyper.prior_precision.tolist()}); use a prior precision > 0, "
            "for example la.prior_precision = 1.0 or la.tune_prior()."
        )
    return blocks


def warn_rounding(fit: FitState, prior: Tensor) -> None:
    """Warn when a prior is within a thousand roundings of a float32 curvature's scale.

    Small eigenvalues of a curvature summed in float32 are uncertain by about
    ``eps·λmax``; where the prior is of that order, ``log(λ + δ)`` and the evidence depend
    on rounding (on a 131-parameter full fit at prior 1e-3, by 0.3 nats). The remedy is to
    accumulate in float64 (a float64 decomposition of the float32 sums does not help).
    """
    dtype = fit.curvature.state()[0].dtype
    if dtype != torch.float32:
        return
    scale = float(fit.curvature.diagonal().abs().max())
    if float(prior.min()) < 1e3 * torch.finfo(dtype).eps * scale:
        warnings.warn(
            f"the prior precision {float(prior.min()):.3g} is within a thousand roundings of "
            f"the float32 curvature's scale ({scale:.3g}): the evidence depends on rounding "
            "in the curvature's small eigenvalues. Fit with accumulate_dtype=torch.float64.",
            RuntimeWarning,
            stacklevel=3,
        )


@dataclass(frozen=True)
class PosteriorPrecision:
    """``scale · F + diag(prior)``, kept in the fitted structure.

    Attributes:
        curvature: The fitted curvature ``F`` (sum over data).
        scale: The likelihood's scale applied to ``F`` (``1 / temperature``, and the noise
            ratio for regression).
        prior: Prior precision per parameter ``(P,)``.
    """

    curvature: BlockDiagonal
    scale: float
    prior: Tensor

    @property
    def n_params(self) -> int:
        """Number of parameters ``P``."""
        return self.curvature.numel

    def diagonal(self) -> Tensor:
        """The diagonal of the precision ``(P,)``."""
        return self.scale * self.curvature.diagonal() + self.prior

    def to_dense(self) -> Tensor:
        """The precision as a dense ``(P, P)`` matrix, for small ``P``.

        Raises:
            ValueError: If ``P`` exceeds ``DENSE_LIMIT``.
        """
        if self.n_params > DENSE_LIMIT:
            raise ValueError(
                f"to_dense() would build a {self.n_params} x {self.n_params} matrix; it is "
                f"limited to P <= {DENSE_LIMIT}. Use diagonal(), or work with the structured "
                "posterior_precision.curvature blocks instead."
            )
        dense = self.scale * self.curvature.to_dense()
        return dense + torch.diag(self.prior.to(dense.dtype))
