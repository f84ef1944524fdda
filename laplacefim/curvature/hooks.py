"""Forward hooks that record what each watched module saw: its inputs and its outputs.

The engine later asks autograd for the gradients of the backpropagated columns with
respect to the recorded outputs (never with respect to the weights), which is all the
per-layer rules need. Outputs may be any nest of tensors (tuples from attention and
recurrent layers); each tensor in it is recorded.

A module that sees no batch (none of its tensor inputs has ``B`` rows) but outputs a
tensor with a leading dimension of 1 while ``B > 1`` — a learned position embedding looked
up with ``(1, T)`` ids and broadcast over the batch — has that output *expanded* to ``B``
rows on its way out, so that its gradient arrives per datum instead of summed over the
batch; the call notes it, and rules expand the matching inputs. Modules whose rules know
their own layout (recurrent layers, attention) are never expanded. The engine's audit
checks, on the first batch, that this leaves the model's outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

T = TypeVar("T")


@dataclass
class Call:
    """One forward call of a module.

    Attributes:
        args: Positional inputs, detached.
        kwargs: Keyword inputs, detached where they are tensors.
        outputs: The floating-point tensors of the output (flattened nest, in order), as
            the gradients are taken against them: expanded to the batch where broadcast.
        expanded: Per output tensor, whether it was expanded from a leading 1.
        batch: Rows of the batch the call belongs to.
        returned: The tensors handed on in place of ``outputs`` (themselves, or clones
            for modules whose outputs the model changes in place later).
        versions: The outputs' version counters when recorded: a later in-place operation
            on an output changes its counter (see :meth:`Recording.modified`).
        grads: Filled by the engine: per output tensor, ``(V, *shape)`` gradients of the
            columns (zeros where the output does not reach the model's output).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Tensor]
    expanded: list[bool]
    batch: int
    returned: list[Tensor]
    versions: list[int]
    grads: list[Tensor] = field(default_factory=list)

    def arg(self, index: int, name: str) -> Any:
        """The call's argument by position, or by keyword when not given positionally."""
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(name)


@dataclass
class Recording:
    """Calls recorded per module name during one forward pass."""

    calls: dict[str, list[Call]] = field(default_factory=dict)

    def modified(self) -> set[str]:
        """Modules an output of which the model changed in place after the module returned
        it (``ReLU(inplace=True)``, ``x += ...``): gradients taken against such an output
        would belong to the changed tensor, so these modules must be recorded with clones."""
        return {
            name
            for name, calls in self.calls.items()
            for call in calls
            if any(t._version != v for t, v in zip(call.outputs, call.versions, strict=True))
        }


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


@contextmanager
def record(
    modules: Mapping[str, nn.Module],
    *,
    track_grad: bool,
    batch: int,
    broadcast: Collection[str] = (),
    clone: Collection[str] = (),
) -> Iterator[Recording]:
    """Record the inputs and outputs of ``modules`` while the block runs.

    Args:
        modules: The modules to watch, by name.
        track_grad: Whether autograd records the forward pass.
        batch: Rows of the batch ``B``.
        broadcast: Names of the modules whose outputs may be expanded to ``B`` rows when
            they see no batch-sized input.
        clone: Names of the modules whose outputs are cloned on their way out while
            autograd records, so that later in-place operations leave the recorded ones
            intact (:meth:`Recording.modified` finds them).

    Yields:
        The recording, filled as the model runs.
    """
    recording = Recording({name: [] for name in modules})

    def make_hook(name: str) -> Any:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            leaves, spec = tree_flatten(output)
            inputs, _ = tree_flatten((args, kwargs))
            sees_batch = any(
                isinstance(a, Tensor) and a.ndim > 0 and a.shape[0] == batch for a in inputs
            )
            may_expand = name in broadcast and batch > 1 and not sees_batch
            copies = name in clone
            outputs: list[Tensor] = []
            expanded: list[bool] = []
            returned: list[Any] = []
            handed: list[Tensor] = []
            for leaf in leaves:
                if not isinstance(leaf, Tensor) or not leaf.dtype.is_floating_point:
                    returned.append(leaf)
                    continue
                grows = track_grad and leaf.requires_grad
                expand = may_expand and grows and leaf.ndim > 0 and leaf.shape[0] == 1
                seen = leaf.expand(batch, *leaf.shape[1:]) if expand else leaf
                outputs.append(seen)
                expanded.append(expand)
                returned.append(seen.clone() if grows and copies else seen)
                handed.append(returned[-1])
            recording.calls[name].append(
                Call(
                    tuple(_detach(a) for a in args),
                    {k: _detach(v) for k, v in kwargs.items()},
                    outputs,
                    expanded,
                    batch,
                    handed,
                    [t._version for t in outputs],
                )
            )
            return tree_unflatten(returned, spec)

        return hook

    handles = [
        module.register_forward_hook(make_hook(name), with_kwargs=True)
        for name, module in modules.items()
    ]
    try:
        with torch.set_grad_enabled(track_grad):
            yield recording
    finally:
        for handle in handles:
            handle.remove()


def run_recorded(
    run: Callable[[], T],
    modules: Mapping[str, nn.Module],
    *,
    track_grad: bool,
    batch: int,
    broadcast: Collection[str],
    clone: set[str],
) -> tuple[T, Recording]:
    """``run()`` with ``modules`` recorded; reruns it once when the model changed a
    recorded output in place, cloning those modules' outputs from then on (``clone`` grows:
    keep it across batches).

    Raises:
        ValueError: If an output is still changed in place with clones (it is an alias of
            a tensor the model changes), naming the modules.
    """
    for attempt in range(2):
        with record(
            modules, track_grad=track_grad, batch=batch, broadcast=broadcast, clone=clone
        ) as recording:
            out = run()
        changed = recording.modified() if track_grad else set()
        if not changed:
            return out, recording
        if attempt == 0 and not changed <= clone:
            clone.update(changed)
            continue
        break
    raise ValueError(
        f"the model changes the outputs of {sorted(changed)} in place even as copies; their "
        "gradients cannot be taken. Leave their parameters out of the subset."
    )


def column_grads(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    columns: Sequence[Tensor],
    *,
    retain_graph: bool = False,
) -> list[Tensor | None]:
    """Gradients ``(V, *input.shape)`` of ``V`` cotangent columns ``(V, *output.shape)``
    (``retain_graph``: keep the graph for more columns).

    One backward pass per column is cheaper than ``is_grads_batched`` (vmap) for ``V = 1``
    (the sampled Fisher and the empirical Fisher); more columns share one batched pass.
    ``None`` where an input does not affect the outputs.
    """
    if columns[0].shape[0] == 1:
        found = torch.autograd.grad(
            outputs,
            inputs,
            [c[0] for c in columns],
            allow_unused=True,
            retain_graph=retain_graph,
        )
        return [None if g is None else g[None] for g in found]
    return list(
        torch.autograd.grad(
            outputs,
            inputs,
            columns,
            is_grads_batched=True,
            allow_unused=True,
            retain_graph=retain_graph,
        )
    )
