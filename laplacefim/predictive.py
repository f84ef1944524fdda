"""Predictive computations: the linearised (GLM) output covariance and weight sampling.

The GLM predictive linearises the model around the mean, ``f(x; θ) ≈ f(x; θ*) + J(x)(θ − θ*)``,
so the outputs are Gaussian with covariance ``J Σ Jᵀ``. Each posterior block computes its
share from the Jacobian's segments (one backward of the ``C`` output columns): a Kronecker
block of a linear layer by a contraction in its eigenbasis,
``Σ_{ij} ĝ_{ci} ĝ_{c'i} â_j² / (s λ_i μ_j + δ)`` with ``ĝ = Q_Gᵀg`` and ``â = Q_Aᵀa``, a
diagonal block by a weighted Gram matrix, a dense block through products with its
eigenvectors. The likelihood turns the Gaussian into its predictive.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from laplacefim.config import CurvatureConfig, FitState, Hyperparameters
from laplacefim.curvature import CurvatureEngine
from laplacefim.fitting import eval_mode
from laplacefim.inputs import ModelIO, batch_size, split_rows
from laplacefim.options import Link
from laplacefim.prediction import Prediction
from laplacefim.structures import BlockDiagonal
from laplacefim.structures.base import Precision


def check_inputs(x: object, fit: FitState, io: ModelIO) -> object:
    """Inputs for prediction: tensors on the model's device, shaped like the training inputs.

    Raises:
        TypeError: For inputs that are neither a tensor nor a mapping of tensors.
        ValueError: For inputs on another device or of another shape, or rows with NaN
            (or, for tensor inputs, infinite) values, named.
    """
    device = fit.mean.device
    if isinstance(x, Tensor):
        tensors = [x]
    elif isinstance(x, Mapping):
        tensors = [v for v in x.values() if isinstance(v, Tensor)]
    else:
        raise TypeError(f"inputs must be a tensor or a mapping of tensors, got {type(x).__name__}.")
    for value in tensors:
        if value.device != device:
            raise ValueError(
                f"inputs are on {value.device} but the model is on {device}; "
                f"move them with x.to({str(device)!r})."
            )
    for value in tensors:  # in a mapping, -inf may be an additive attention mask: NaN only
        if value.dtype.is_floating_point and value.ndim > 0:
            flat = value.reshape(len(value), -1)
            bad = (~torch.isfinite(flat) if isinstance(x, Tensor) else torch.isnan(flat)).any(1)
            if bool(bad.any()):
                rows = torch.nonzero(bad).reshape(-1).tolist()
                shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
                kind = "NaN or infinite values" if isinstance(x, Tensor) else "NaN values"
                raise ValueError(
                    f"inputs hold {kind} in {len(rows)} row(s): {shown}; a prediction there "
                    "would be NaN. Drop or repair those rows."
                )
    shape = fit.input_shape
    if isinstance(x, Tensor) and shape is not None and tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"inputs of shape {tuple(x.shape)} do not match the training inputs "
            f"(B, {', '.join(map(str, shape))})."
        )
    if isinstance(x, Mapping) and io.x_key is not None and io.x_key in x:
        return x[io.x_key]
    return x


def glm_prediction(
    engine: CurvatureEngine,
    config: CurvatureConfig,
    hyper: Hyperparameters,
    fit: FitState,
    precisions: list[Precision],
    x: object,
    *,
    link: Link = Link.PROBIT,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    joint_outputs: bool = False,
    chunk_size: int = 256,
) -> Prediction:
    """The linearised predictive at ``x``: ``N(f(x), J Σ Jᵀ)`` through the likelihood
    (``engine``: one made by :func:`~laplacefim.fitting.make_engine` for this fit)."""
    # Only the Monte-Carlo link and joint outputs need covariances between outputs; the
    # variances alone cost B·C² for a last layer with C outputs, the covariances B·C³.
    diagonal = not joint_outputs and link is not Link.MC
    with eval_mode(engine.model):
        mean, cov = glm_moments(engine, fit.curvature, precisions, x, chunk_size, diagonal)
    return config.likelihood.predictive(
        mean,
        cov,
        link=link,
        noise=hyper.sigma_noise,
        n_samples=n_samples,
        generator=generator,
        joint_outputs=joint_outputs,
    )


def glm_moments(
    engine: CurvatureEngine,
    curvature: BlockDiagonal,
    precisions: list[Precision],
    x: object,
    chunk_size: int,
    diagonal: bool = False,
) -> tuple[Tensor, Tensor]:
    """Mean ``(B, C)`` and covariance ``(B, C, C)`` of the linearised outputs, chunk by chunk
    (see :func:`chunk_moments` for ``diagonal``)."""
    means, covs = [], []
    for chunk in split_rows(x, chunk_size):
        mean, cov = chunk_moments(engine, curvature, precisions, chunk, diagonal)
        means.append(mean)
        covs.append(cov)
    return torch.cat(means), torch.cat(covs)


def chunk_moments(
    engine: CurvatureEngine,
    curvature: BlockDiagonal,
    precisions: list[Precision],
    x: object,
    diagonal: bool = False,
) -> tuple[Tensor, Tensor]:
    """Mean ``(B, C)`` and covariance ``(B, C, C)`` of the linearised outputs at ``x``.

    With ``diagonal``, outputs ``(B, C)`` get their variances ``(B, C)`` in place of the
    covariance (the likelihoods' predictives take either); token-level outputs keep the
    covariance.
    """
    rows = engine.jacobian_rows(x, batch_size(x))
    n_out = rows.outputs[0].numel()
    diagonal = diagonal and rows.outputs.ndim == 2
    shape = (n_out,) if diagonal else (n_out, n_out)
    cov = rows.outputs.new_zeros(rows.outputs.shape[0], *shape, dtype=engine.dtype)
    for block, precision in zip(curvature.blocks, precisions, strict=True):
        segments = block.covered(rows.segments)
        if segments is None:
            continue
        if diagonal:
            cov = cov + precision.functional_variance_diagonal(segments)
        else:
            cov = cov + precision.functional_variance(segments)
    return rows.outputs.to(engine.dtype), cov


def linearised_samples(
    model: torch.nn.Module,
    io: ModelIO,
    names: tuple[str, ...],
    deltas: Tensor,
    x: object,
    *,
    chunk_size: int,
    sample_chunk: int = 128,
) -> Tensor:
    """Function samples ``f(x) + J(x) δₛ`` of the linearised model, ``(S, B, ...)``.

    Every input of a sample shares the same weight draw ``δₛ``, so the samples carry the
    posterior's correlations across inputs. ``J δ`` is a forward-mode product (``jvp``);
    no Jacobian is built.
    """
    params = dict(model.named_parameters())
    primal = {name: params[name].detach() for name in names}
    shapes = [primal[name].shape for name in names]
    sizes = [primal[name].numel() for name in names]

    def tangents(delta: Tensor) -> dict[str, Tensor]:
        parts = delta.split(sizes)
        return {n: p.reshape(s).to(primal[n]) for n, p, s in zip(names, parts, shapes, strict=True)}

    out = []
    for chunk in split_rows(x, chunk_size):

        def function(p: dict[str, Tensor], chunk: object = chunk) -> Tensor:
            return io.functional_call(model, p, chunk)

        def one(delta: Tensor, function: Any = function) -> Any:
            return torch.func.jvp(function, (primal,), (tangents(delta),))

        rows = []
        for part in deltas.split(sample_chunk):
            value, tangent = torch.func.vmap(one)(part)
            rows.append(value + tangent)
        out.append(torch.cat(rows))
    return torch.cat(out, dim=1)


def sampled_outputs(
    model: torch.nn.Module,
    io: ModelIO,
    params: tuple[torch.nn.Parameter, ...],
    weights: Tensor,
    x: object,
    *,
    chunk_size: int,
) -> Tensor:
    """Outputs ``(S, B, ...)`` of the model with the chosen parameters set to each sample."""
    saved = [p.detach().clone() for p in params]
    outputs = []
    chunks = split_rows(x, chunk_size)
    try:
        with torch.no_grad():
            for weight in weights:
                for p, part in zip(params, weight.split([p.numel() for p in params]), strict=True):
                    p.copy_(part.view_as(p))
                outputs.append(torch.cat([io.call(model, chunk) for chunk in chunks]))
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
    return torch.stack(outputs)
