"""Forward hooks that record what each layer saw: its inputs and its output tensor.

The engine later asks autograd for the gradients of the backpropagated columns with
respect to the recorded outputs (never with respect to the weights), which is all the
per-layer statistics need.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Call:
    """One forward call of a module.

    Attributes:
        args: Positional inputs, detached.
        kwargs: Keyword inputs, detached where they are tensors.
        output: The output tensor as produced, the one gradients are taken against.
        returned: What the module handed on (a clone of ``output`` when gradients flow, so
            that in-place operations after the layer cannot alter ``output``).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Tensor
    returned: Tensor


@dataclass
class Recording:
    """Calls recorded per module name during one forward pass."""

    calls: dict[str, list[Call]] = field(default_factory=dict)


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


@contextmanager
def record(modules: Mapping[str, nn.Module], *, track_grad: bool) -> Iterator[Recording]:
    """Record the inputs and outputs of ``modules`` while the block runs.

    Args:
        modules: The modules to watch, by name.
        track_grad: Whether autograd records the forward pass. When True, each output is
            cloned on its way out so that later in-place operations leave it intact.

    Yields:
        The recording, filled as the model runs.

    Raises:
        TypeError: If a watched module returns something other than one tensor.
    """
    recording = Recording({name: [] for name in modules})

    def make_hook(name: str) -> Any:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"module {name!r} ({type(module).__name__}) returned "
                    f"{type(output).__name__}; laplacefim needs layers whose parameters it "
                    "covers to return one tensor. Leave it out of the subset."
                )
            returned = output.clone() if track_grad and output.requires_grad else output
            recording.calls[name].append(
                Call(
                    tuple(_detach(a) for a in args),
                    {k: _detach(v) for k, v in kwargs.items()},
                    output,
                    returned,
                )
            )
            return returned

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
