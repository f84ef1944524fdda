"""How a model takes its inputs and gives its outputs: batches, mappings, output picking.

A batch is an ``(inputs, targets)`` pair or a mapping (``y_key`` names the targets,
``x_key`` the inputs; without ``x_key`` the model gets the mapping less the targets). The
model is called as ``model(inputs)``, or ``model(**inputs)`` with ``call_kwargs=True``;
its output is a tensor, or a tuple / mapping / object from which ``output`` picks the
tensor (a key, an index, an attribute name, or a callable).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

OutputSpec = str | int | Callable[[Any], Tensor] | None


@dataclass(frozen=True)
class ModelIO:
    """Where the inputs and targets are in a batch, how to call the model, what it returns.

    Attributes:
        x_key: For mapping batches, the key of the inputs (None: the mapping less ``y_key``).
        y_key: For mapping batches, the key of the targets.
        call_kwargs: Call ``model(**inputs)`` for mapping inputs (HuggingFace style).
        output: Picks the output tensor from what the model returns: a key, an index, an
            attribute name, or a callable; None when the model returns a tensor.
    """

    x_key: str | None = None
    y_key: str | None = None
    call_kwargs: bool = False
    output: OutputSpec = None

    def split(self, batch: object, index: int) -> tuple[object, Tensor]:
        """Split a batch into inputs and targets, or raise a TypeError that says what came."""
        if isinstance(batch, Mapping):
            if self.y_key is None:
                raise TypeError(
                    f"the loader yielded a mapping with keys {sorted(batch)} as batch {index}; "
                    "pass y_key= (and x_key=, unless the model takes the mapping)."
                )
            missing = [k for k in (self.x_key, self.y_key) if k is not None and k not in batch]
            if missing:
                raise ValueError(
                    f"batch {index} has no keys {missing}; its keys are {sorted(batch)}."
                )
            x = (
                batch[self.x_key]
                if self.x_key is not None
                else {k: v for k, v in batch.items() if k != self.y_key}
            )
            y = batch[self.y_key]
        elif isinstance(batch, tuple | list) and len(batch) == 2:
            x, y = batch
        else:
            kind = type(batch).__name__
            size = f" of length {len(batch)}" if isinstance(batch, tuple | list) else ""
            raise TypeError(
                f"the loader yielded a {kind}{size} as batch {index}; laplacefim expects "
                "(inputs, targets) pairs, as a TensorDataset in a DataLoader yields, or mappings "
                "with x_key= / y_key=."
            )
        if not isinstance(y, Tensor):
            raise TypeError(f"batch {index}: targets must be a tensor, got {type(y).__name__}.")
        return x, y

    def call(self, model: nn.Module, x: object) -> Tensor:
        """Run the model on inputs and return its output tensor.

        Raises:
            TypeError: If the model's output is not a tensor and ``output`` picks none.
        """
        out = model(**x) if self.call_kwargs and isinstance(x, Mapping) else model(x)
        return self.pick(out)

    def functional_call(self, model: nn.Module, params: dict[str, Tensor], x: object) -> Tensor:
        """:meth:`call` with some parameters replaced (``torch.func.functional_call``)."""
        if self.call_kwargs and isinstance(x, Mapping):
            out = torch.func.functional_call(model, params, (), dict(x))
        else:
            out = torch.func.functional_call(model, params, (x,))
        return self.pick(out)

    def pick(self, out: Any) -> Tensor:
        """The output tensor from what the model returned."""
        spec = self.output
        if callable(spec):
            out = spec(out)
        elif isinstance(spec, int) and isinstance(out, tuple | list):  # noqa: SIM114
            out = out[spec]
        elif isinstance(spec, str) and isinstance(out, Mapping):
            out = out[spec]
        elif isinstance(spec, str):
            out = getattr(out, spec)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the model returned {type(out).__name__}; laplacefim needs one output tensor. "
                "Pass output_key= (a key, index or attribute, e.g. 'logits') or output_fn= "
                "to pick it."
            )
        return out


def to_device(x: object, device: torch.device) -> object:
    """Move a tensor, or the tensors of a mapping, to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def batch_size(x: object) -> int:
    """Rows of an input batch: a tensor's leading size, or the largest leading size among a
    mapping's tensors (broadcast ones have 1).

    Raises:
        TypeError: If no tensor is found.
    """
    if isinstance(x, Tensor) and x.ndim > 0:
        return x.shape[0]
    if isinstance(x, Mapping):
        sizes = [v.shape[0] for v in x.values() if isinstance(v, Tensor) and v.ndim > 0]
        if sizes:
            return max(sizes)
    raise TypeError(f"cannot tell the batch size of inputs of type {type(x).__name__}.")


def take(x: object, rows: slice | Tensor, batch: int) -> object:
    """The rows ``rows`` of every tensor whose leading size is the batch (others as they are)."""
    if isinstance(x, Tensor):
        return x[rows] if x.ndim > 0 and x.shape[0] == batch else x
    if isinstance(x, Mapping):
        return {k: take(v, rows, batch) for k, v in x.items()}
    return x


def split_rows(x: object, chunk: int) -> list[object]:
    """Inputs cut into chunks of at most ``chunk`` rows."""
    total = batch_size(x)
    return [take(x, slice(start, start + chunk), total) for start in range(0, total, chunk)]
