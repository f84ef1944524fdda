"""Any module: per-sample gradients of its own parameters with ``torch.func``.

The module is re-run on each datum alone (a batch dimension of one, ``vmap`` over the
batch), with the gradients of the columns w.r.t. every floating output as cotangents.
Arguments whose leading dimension is not the batch (masks broadcast over it, position
ids) are shared by all data. The module must treat data independently, as modules in
eval mode do; the engine's audit checks it on the first batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from laplacefim.curvature.hooks import Call
from laplacefim.curvature.rules.base import check_batch_first
from laplacefim.curvature.segments import Samples, Segment


def _floating(output: Any) -> tuple[Tensor, ...]:
    leaves, _ = tree_flatten(output)
    return tuple(t for t in leaves if isinstance(t, Tensor) and t.dtype.is_floating_point)


def _one_call(module: nn.Module, params: dict[str, Tensor], call: Call) -> dict[str, Tensor]:
    batch = call.batch
    for index in range(len(call.outputs)):
        check_batch_first(module, call, index)

    def dims(value: Any) -> int | None:
        return (
            0 if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch else None
        )

    arg_dims = tree_map(dims, call.args)
    kwarg_dims = tree_map(dims, call.kwargs)

    def one_sample(args: tuple[Any, ...], kwargs: dict[str, Any], cots: tuple[Tensor, ...]) -> Any:
        args1 = tree_map(lambda a, d: a.unsqueeze(0) if d == 0 else a, args, arg_dims)
        kwargs1 = tree_map(lambda a, d: a.unsqueeze(0) if d == 0 else a, kwargs, kwarg_dims)

        def forward(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            return _floating(torch.func.functional_call(module, p, args1, kwargs1))

        outputs, vjp, *_ = torch.func.vjp(forward, params)
        shapes = [o.shape for o in outputs]

        def per_column(column: tuple[Tensor, ...]) -> Any:
            return vjp(tuple(c.reshape(s) for c, s in zip(column, shapes, strict=True)))[0]

        return torch.func.vmap(per_column)(cots)

    cotangents = tuple(call.grads)
    per_sample = torch.func.vmap(one_sample, in_dims=(arg_dims, kwarg_dims, 1))(
        call.args, call.kwargs, cotangents
    )
    # (B, V, *shape) -> (V, B, p)
    return {name: value.transpose(0, 1).flatten(2) for name, value in per_sample.items()}


def generic_rows(
    module: nn.Module, calls: list[Call], wanted: frozenset[str]
) -> dict[str, list[Segment]]:
    """Per-sample gradients ``(V, B, p)`` of the wanted own parameters, summed over calls."""
    names = [name for name, _ in module.named_parameters(recurse=False) if name in wanted]
    if not names:
        return {}
    params = {name: module._parameters[name].detach() for name in names}  # type: ignore[union-attr]
    total: dict[str, Tensor] = {}
    # torch.func differentiates inside no_grad; autograd records nothing through the
    # module's other parameters.
    with torch.no_grad():
        for call in calls:
            for name, value in _one_call(module, params, call).items():
                total[name] = total[name] + value if name in total else value
    return {name: [Samples(value)] for name, value in total.items()}
