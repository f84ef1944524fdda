"""Which layers, directions and inputs the predictions are most sensitive to."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from laplacefim.fitting import eval_mode
from laplacefim.geometry.distance import kl_between
from laplacefim.geometry.operator import CurvatureOperator
from laplacefim.geometry.trace import ggn_diagonal
from laplacefim.inputs import ModelIO
from laplacefim.likelihoods import LikelihoodModel
from laplacefim.linalg import Eigen, Which, block_krylov_eigen
from laplacefim.subsets import SubsetSpec

# Upper bound on elements of one chunk of per-datum, per-column gradients (chunk · C · P).
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class LayerSensitivity:
    """Where the Fisher's mass lies.

    Attributes:
        names: Parameter tensor names, in flat order.
        layer_traces: ``(L,)`` trace of the GGN block of each parameter tensor.
        layer_shares: ``(L,)`` ``layer_traces / total``; sums to 1.
        total_trace: The GGN trace, 0-d.
        directions: Top eigenpairs of the GGN (unit eigenvectors ``(k, P)``).
        direction_kl: ``(k,)`` exact predictive KL summed over the data for a step of
            length ``step`` along each direction (``≈ ½ step² λᵢ`` for small steps).
        step: The step length used for ``direction_kl``.
        datum_traces: ``(N,)`` per-input sensitivity ``tr(Jₙᵀ Λₙ Jₙ)``, in loader order;
            it sums to ``total_trace``.
    """

    names: tuple[str, ...]
    layer_traces: Tensor
    layer_shares: Tensor
    total_trace: Tensor
    directions: Eigen
    direction_kl: Tensor
    step: float
    datum_traces: Tensor


def datum_traces(op: CurvatureOperator) -> Tensor:
    """``tr(Jₙᵀ Λₙ Jₙ) = Σ_c ‖Jₙᵀ s_c‖²`` for every datum, ``(N,)``, in bounded chunks."""
    params = op.params(None)
    out = []
    with eval_mode(op.model), torch.no_grad():
        for x, _y in op.batches():
            if not isinstance(x, Tensor):
                raise TypeError("per-datum traces need tensor inputs (B, ...).")
            f = op.outputs_fn(x)(params)
            s = op.likelihood.hessian_sqrt(f, op.noise).transpose(0, 1)  # (B, V, C)
            chunk = max(1, CHUNK_ELEMENTS // (s.shape[1] * op.n_params))

            def one(xn: Tensor, sn: Tensor) -> Tensor:
                fn = lambda p: op.outputs_fn(xn[None])(p)[0]  # noqa: E731
                vjp_fn = vjp(fn, params)[1]
                g = vmap(vjp_fn)(sn)[0]
                return torch.stack([t.square().sum() for t in g.values()]).sum()

            for start in range(0, x.shape[0], chunk):
                out.append(vmap(one)(x[start : start + chunk], s[start : start + chunk]))
    return torch.cat(out)


def layer_sensitivity(
    model: nn.Module,
    loader: Iterable[Any],
    likelihood: str | LikelihoodModel,
    *,
    k: int = 3,
    step: float = 1.0,
    per_datum: bool = True,
    tol: float = 1e-4,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    sigma_noise: float | Tensor = 1.0,
    subset: SubsetSpec = "all",
    io: ModelIO | None = None,
) -> LayerSensitivity:
    """Per-layer share of the GGN trace, the top sensitive directions, per-input scores.

    Args:
        model: The model.
        loader: ``(inputs, targets)`` batches.
        likelihood: A registered likelihood name or instance.
        k: Number of top directions (GGN eigenvectors).
        step: Length of the step along each direction for ``direction_kl``.
        per_datum: Compute ``datum_traces`` (``O(N·C·P)`` work); else an empty tensor.
        tol: Eigen-solver tolerance.
        max_iter: Eigen-solver passes.
        generator: CPU generator for the eigen-solver's start.
        sigma_noise: Regression noise.
        subset: Which parameters.
        io: How batches are split and the model is called (mapping batches), as for
            :class:`~laplacefim.Laplace`.

    Returns:
        A :class:`LayerSensitivity`. Group ``layer_traces`` by module by summing the
        entries whose names share a prefix.

    Example:
        >>> s = layer_sensitivity(model, loader, "classification", k=3)
        >>> dict(zip(s.names, s.layer_shares.tolist()))
    """
    op = CurvatureOperator(model, loader, likelihood, sigma_noise=sigma_noise, subset=subset, io=io)
    diagonal = ggn_diagonal(op)
    sizes = [p.numel() for p in op.selection.params]
    layer = torch.stack([part.sum() for part in diagonal.split(sizes)])
    total = diagonal.sum()
    eig = block_krylov_eigen(
        op.ggn,
        op.n_params,
        k,
        which=Which.LARGEST,
        tol=tol,
        max_iter=max_iter,
        block_size=k,
        dtype=op.dtype,
        device=op.device,
        generator=generator,
    )
    theta = op.theta()
    kls = torch.stack([kl_between(op, None, theta + step * v) for v in eig.eigenvectors])
    datum = datum_traces(op) if per_datum else diagonal.new_zeros(0)
    return LayerSensitivity(op.names, layer, layer / total, total, eig, kls, float(step), datum)
