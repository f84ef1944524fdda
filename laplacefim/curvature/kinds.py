"""What each curvature kind backpropagates: the columns ``s_v`` with ``Mₙ = Σ_v s_v s_vᵀ``."""

from __future__ import annotations

import torch
from torch import Tensor

from laplacefim.likelihoods import LikelihoodModel
from laplacefim.options import CurvatureKind


def columns(
    kind: CurvatureKind,
    likelihood: LikelihoodModel,
    f: Tensor,
    y: Tensor,
    noise: Tensor,
    *,
    fisher_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    """The columns to backpropagate for one batch.

    Args:
        kind: Exact GGN, MC Fisher or empirical Fisher.
        likelihood: The likelihood of the outputs.
        f: Detached outputs ``(B, C)``.
        y: Checked targets.
        noise: The likelihood's noise hyperparameter.
        fisher_samples: Labels drawn per datum for the MC Fisher.
        generator: Random generator for the MC Fisher, on ``f``'s device.

    Returns:
        ``(V, B, C)``: ``V = C`` for the GGN (for the likelihoods here), ``fisher_samples``
        for the MC Fisher, 1 for the empirical Fisher.
    """
    if kind is CurvatureKind.GGN:
        return likelihood.hessian_sqrt(f, noise)
    if kind is CurvatureKind.FISHER:
        return likelihood.sampled_gradients(f, noise, fisher_samples, generator)
    return likelihood.gradient(f, y, noise)
