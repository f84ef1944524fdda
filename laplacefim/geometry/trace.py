"""Traces of the GGN / Hessian (exact or Hutchinson) and the effective dimension."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from laplacefim import checks
from laplacefim.curvature import CurvatureEngine
from laplacefim.fitting import eval_mode
from laplacefim.geometry.operator import CurvatureOperator, Matrix
from laplacefim.inputs import ModelIO
from laplacefim.layout import Layout
from laplacefim.likelihoods import LikelihoodModel
from laplacefim.options import CurvatureKind, parse_option
from laplacefim.structures.base import SegmentMap, gather
from laplacefim.subsets import Selection, SubsetSpec

if TYPE_CHECKING:
    from laplacefim.laplace import Laplace

# The exact Hessian trace takes P Hessian-vector products; refused above this many.
MAX_EXACT_HESSIAN_PARAMS = 4096
# Vectors multiplied per pass over the data in Hutchinson and exact Hessian traces.
PROBE_BLOCK = 16


@dataclass(frozen=True)
class TraceEstimate:
    """A trace, exact or estimated.

    Attributes:
        estimate: The trace, 0-d.
        standard_error: 0 when exact; else the Hutchinson standard error ``s / √n``.
        n_probes: Probe vectors used (0 when computed exactly).
    """

    estimate: Tensor
    standard_error: Tensor
    n_probes: int


def ggn_diagonal(op: CurvatureOperator) -> Tensor:
    """The exact diagonal of the GGN ``(P,)`` at the model's parameters.

    Runs the curvature engine (one forward and one batched backward of the ``C``
    loss-Hessian columns per batch): ``Σₙ Σ_c (Jₙᵀ s_c)²`` per parameter, without a Jacobian.
    """
    engine = CurvatureEngine(
        op.model,
        op.selection,
        CurvatureKind.GGN,
        op.likelihood,
        op.noise,
        op.io,
        fisher_samples=1,
        dtype=op.dtype,
    )
    names = op.selection.names
    sizes = [p.numel() for p in op.selection.params]
    total = torch.zeros(op.n_params, dtype=op.dtype, device=op.device)
    flags = []
    with eval_mode(op.model):
        for x, y in op.batches():
            rows = engine.batch(x, y, None)
            flags.append(rows.bad_targets)
            rows.each_part(lambda segments, _: _add_diagonal(total, segments, names, sizes))
    if not flags:
        raise ValueError("the loader yielded no batch; the trace needs at least one.")
    if bool(torch.stack(flags).any()):  # type: ignore[arg-type]
        raise ValueError(
            f"the targets are out of range for likelihood={op.likelihood.name!r}; expected "
            f"{op.likelihood.expected_targets}."
        )
    return total


def _add_diagonal(
    total: Tensor, segments: SegmentMap, names: Sequence[str], sizes: Sequence[int]
) -> None:
    found = gather(segments, names, sizes, lambda s: s.diag())
    if found is not None:
        total += found


def hutchinson(
    op: CurvatureOperator, matrix: Matrix, n_probes: int, generator: torch.Generator | None
) -> TraceEstimate:
    """Hutchinson's estimate ``mean(vᵀAv)`` over Rademacher probes, with its standard error."""
    quads = []
    left = n_probes
    while left > 0:
        m = min(left, PROBE_BLOCK)
        signs = torch.randint(0, 2, (m, op.n_params), generator=generator)
        v = (2 * signs - 1).to(dtype=op.dtype, device=op.device)
        quads.append((v * op.matmat(matrix, v)).sum(1))
        left -= m
    q = torch.cat(quads)
    se = q.std() / math.sqrt(n_probes) if n_probes > 1 else torch.full_like(q[0], math.inf)
    return TraceEstimate(q.mean(), se, n_probes)


def trace(
    model: nn.Module,
    loader: Iterable[Any],
    likelihood: str | LikelihoodModel,
    *,
    matrix: str | Matrix = "ggn",
    n_probes: int | None = None,
    generator: torch.Generator | None = None,
    sigma_noise: float | Tensor = 1.0,
    subset: SubsetSpec = "all",
    io: ModelIO | None = None,
) -> TraceEstimate:
    """The trace of the GGN or the Hessian of the summed NLL.

    Exact when ``n_probes`` is None: the GGN's as ``Σₙ Σ_c ‖Jₙᵀ s_c‖²`` through the
    ``C`` loss-Hessian columns (its diagonal, summed; no dense matrix); the Hessian's with
    ``P`` Hessian-vector products (small models only). Otherwise Hutchinson's estimator
    with ``n_probes`` Rademacher vectors and its standard error.

    Args:
        model: The model.
        loader: ``(inputs, targets)`` batches.
        likelihood: A registered likelihood name or instance.
        matrix: ``"ggn"`` or ``"hessian"``.
        n_probes: None for the exact trace, else the number of probes.
        generator: CPU generator for the probes.
        sigma_noise: Regression noise.
        subset: Which parameters.
        io: How batches are split and the model is called (mapping batches), as for
            :class:`~laplacefim.Laplace`.

    Returns:
        A :class:`TraceEstimate`.

    Raises:
        ValueError: For the exact Hessian trace of more than
            ``MAX_EXACT_HESSIAN_PARAMS`` parameters, or bad options.

    Example:
        >>> t = trace(model, loader, "classification", n_probes=50)
        >>> t.estimate, t.standard_error
    """
    matrix = parse_option(matrix, Matrix, "matrix")
    op = CurvatureOperator(model, loader, likelihood, sigma_noise=sigma_noise, subset=subset, io=io)
    if n_probes is not None:
        return hutchinson(op, matrix, checks.integer(n_probes, "n_probes"), generator)
    zero = torch.zeros((), dtype=op.dtype, device=op.device)
    if matrix is Matrix.GGN:
        return TraceEstimate(ggn_diagonal(op).sum(), zero, 0)
    if op.n_params > MAX_EXACT_HESSIAN_PARAMS:
        raise ValueError(
            f"the exact Hessian trace needs P = {op.n_params} Hessian-vector products "
            f"(limit {MAX_EXACT_HESSIAN_PARAMS}); pass n_probes=... for Hutchinson's estimate."
        )
    eye = torch.eye(op.n_params, dtype=op.dtype, device=op.device)
    total = sum((op.hessian(rows) * rows).sum() for rows in eye.split(PROBE_BLOCK))
    return TraceEstimate(torch.as_tensor(total), zero, 0)


def structure_trace(la: Laplace) -> Tensor:
    """The trace of a fitted Laplace's curvature ``F`` (sum over data, before the prior)."""
    return la.curvature.diagonal().sum()


def _prior_per_param(la: Laplace, prior_precision: float | Tensor | None) -> Tensor:
    mean = la.mean
    if prior_precision is None:
        prior = la.prior_precision
    elif isinstance(prior_precision, Tensor):
        prior = prior_precision.detach()
    else:
        prior = torch.tensor(float(prior_precision), dtype=torch.float64)
    if not bool((torch.isfinite(prior) & (prior >= 0)).all()):
        raise ValueError(f"prior_precision must be finite and >= 0, got {prior_precision!r}.")
    named = dict(la.model.named_parameters())
    selection = Selection(la.parameter_names, tuple(named[n] for n in la.parameter_names))
    return Layout.of(selection).per_param(prior.to(device=mean.device, dtype=mean.dtype))


def effective_dimension(la: Laplace, prior_precision: float | Tensor | None = None) -> Tensor:
    """The effective number of parameters ``γ = Σᵢ s·λᵢ / (s·λᵢ + α)`` of a fitted Laplace.

    ``λᵢ`` are the eigenvalues of the fitted curvature structure, ``s`` its scale in the
    posterior (``1/T``, and the noise ratio for regression) and ``α`` the prior precision
    (the Laplace's own unless given: a scalar, one per layer or one per parameter). In
    general ``γ = Σₚ (1 − αₚ Σₚₚ) = tr(sF (sF + P₀)⁻¹)``, the number of directions the data
    determine better than the prior.

    At a scalar prior tuned by the marginal likelihood, ``α ‖θ‖² = γ`` (MacKay's fixed
    point: setting the evidence's derivative in ``α`` to zero).

    Args:
        la: A fitted :class:`~laplacefim.Laplace`.
        prior_precision: Override of ``la.prior_precision``.

    Returns:
        γ, 0-d, between 0 and ``P``.

    Example:
        >>> la.tune_prior(); gamma = effective_dimension(la)
    """
    prior = _prior_per_param(la, prior_precision)
    scale = la.posterior_precision.scale
    total = torch.zeros((), dtype=prior.dtype, device=prior.device)
    start = 0
    for block, decomposition in zip(la.curvature.blocks, la.curvature.decompose(), strict=True):
        p = prior[start : start + block.numel]
        start += block.numel
        if bool((p == p[0]).all()):
            values = scale * decomposition.eigenvalues().to(prior)
            alpha = p[0]
            if float(alpha) == 0.0:
                total = total + (values > 0).sum()
            else:
                total = total + (values / (values + alpha)).sum()
            continue
        precision = decomposition.with_prior(scale, p)
        total = total + (1.0 - p * precision.covariance_diagonal()).sum()
    return total
