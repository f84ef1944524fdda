"""Normalisation layers' affine parameters: ``y = x̂ ⊙ w + b`` elementwise.

The per-sample gradient of the scale is ``Σ g ⊙ x̂`` and of the shift ``Σ g`` over every
position sharing them, with ``x̂`` the normalised input, recomputed from the recorded
input: over the last dimensions for ``nn.LayerNorm``, per group for ``nn.GroupNorm``, with
the running statistics for ``nn.BatchNorm*d`` in eval mode (batch statistics mix the data
of a batch: that case goes to the generic rule, whose audit refuses it). Given as
per-sample gradients (``Samples``): every structure keeps their exact diagonal.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from laplacefim.curvature.hooks import Call
from laplacefim.curvature.rules.base import batched, check_batch_first
from laplacefim.curvature.rules.generic import generic_rows
from laplacefim.curvature.segments import Samples, Segment


def _normalised(module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """``x̂`` and the number of trailing dimensions the affine parameters cover."""
    if isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        return F.layer_norm(x, shape, None, None, module.eps), len(shape)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps), -1
    bn: nn.modules.batchnorm._BatchNorm = module  # type: ignore[assignment]
    return F.batch_norm(x, bn.running_mean, bn.running_var, None, None, False, 0.0, bn.eps), -1


def norm_rows(
    module: nn.Module, calls: list[Call], wanted: frozenset[str]
) -> dict[str, list[Segment]]:
    """Per-sample gradients of the wanted ``weight`` and ``bias``, summed over calls."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None
    ):
        return generic_rows(module, calls, wanted)
    totals: dict[str, Tensor] = {}
    for call in calls:
        check_batch_first(module, call)
        x = batched(call.arg(0, "input"), call)
        g = call.grads[0]
        x_hat, trailing = _normalised(module, x)
        if trailing > 0:  # LayerNorm: (B, *, *normalized) -> (B, positions, features)
            features = x.shape[x.ndim - trailing :].numel()
            rows_g = g.reshape(g.shape[0], g.shape[1], -1, features)
            rows_x = x_hat.reshape(x.shape[0], -1, features)
        else:  # channels in dimension 1: (B, C, *) -> (B, positions, C)
            rows_g = g.reshape(g.shape[0], g.shape[1], g.shape[2], -1).transpose(2, 3)
            rows_x = x_hat.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
        for name in wanted:
            value = (rows_g * rows_x).sum(2) if name == "weight" else rows_g.sum(2)
            totals[name] = totals[name] + value if name in totals else value
    return {name: [Samples(value)] for name, value in totals.items()}
