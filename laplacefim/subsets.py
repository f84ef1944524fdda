"""Which parameters the posterior covers: all, the last layer, or any named subset."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from laplacefim.inputs import ModelIO

SubsetSpec = str | Sequence[str] | Callable[[str, nn.Parameter], bool]
SUBSET_KEYWORDS = ("all", "last_layer")


@dataclass(frozen=True)
class Selection:
    """The chosen parameters, in ``model.named_parameters()`` order.

    Attributes:
        names: Parameter names as in ``model.named_parameters()``.
        params: The parameters themselves.
    """

    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]

    @property
    def n_params(self) -> int:
        """Number of scalar parameters covered."""
        return sum(p.numel() for p in self.params)

    def flat(self) -> Tensor:
        """The chosen parameters as one detached flat vector ``(P,)``."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def unflatten(self, rows: Tensor) -> dict[str, Tensor]:
        """A flat ``(P,)`` vector, or rows ``(m, P)``, as ``(*shape)`` / ``(m, *shape)``
        tensors by parameter name."""
        parts = rows.split([p.numel() for p in self.params], dim=-1)
        return {
            name: part.reshape(*rows.shape[:-1], *p.shape)
            for name, part, p in zip(self.names, parts, self.params, strict=True)
        }


def validate_subset(subset: object) -> SubsetSpec:
    """Check the type of a ``subset`` option once, at the API boundary.

    Raises:
        ValueError: For an unknown keyword or an empty list.
        TypeError: For a value that is neither a keyword, a list of names nor a callable.
    """
    if isinstance(subset, str):
        if subset not in SUBSET_KEYWORDS:
            raise ValueError(
                f"subset={subset!r} is not valid; expected one of {list(SUBSET_KEYWORDS)}, "
                "a list of parameter names, or a callable(name, param) -> bool."
            )
        return subset
    if callable(subset):
        return subset
    if isinstance(subset, Sequence) and all(isinstance(name, str) for name in subset):
        if len(subset) == 0:
            raise ValueError("subset is an empty list; name at least one parameter.")
        return list(subset)
    raise TypeError(
        f"subset must be 'all', 'last_layer', a list of parameter names or a "
        f"callable(name, param) -> bool, got {type(subset).__name__}."
    )


def select(model: nn.Module, subset: SubsetSpec, last_layer: str | None = None) -> Selection:
    """Resolve a subset option to the trainable parameters it chooses.

    Args:
        model: The model.
        subset: A validated subset option.
        last_layer: The name of the last Linear module; required when ``subset`` is
            ``"last_layer"`` (see :func:`find_last_linear`).

    Returns:
        The selection, never empty.

    Raises:
        ValueError: If a named parameter does not exist or is frozen, or nothing trainable
            is chosen.
    """
    named = dict(model.named_parameters())
    if subset == "all":
        chosen = list(named)
    elif subset == "last_layer":
        if last_layer is None:
            raise ValueError("the last layer has not been found yet; call fit() first.")
        prefix = f"{last_layer}." if last_layer else ""
        chosen = [
            name for name in named if name.startswith(prefix) and "." not in name[len(prefix) :]
        ]
    elif callable(subset):
        chosen = [name for name, param in named.items() if subset(name, param)]
    else:
        unknown = [name for name in subset if name not in named]
        if unknown:
            raise ValueError(
                f"subset names parameters that the model does not have: {unknown}; "
                f"valid names are {list(named)}."
            )
        chosen = [name for name in named if name in set(subset)]
        frozen = [name for name in chosen if not named[name].requires_grad]
        if frozen:
            raise ValueError(
                f"subset names frozen parameters (requires_grad=False): {frozen}; the "
                "posterior covers trainable parameters only. Set requires_grad=True on them "
                "or leave them out of the list."
            )
    trainable = [name for name in chosen if named[name].requires_grad]
    if not trainable:
        raise ValueError(
            f"subset={subset!r} selects no trainable parameter (requires_grad=True); "
            f"chosen: {chosen}, trainable parameters of the model: "
            f"{[n for n, p in named.items() if p.requires_grad]}."
        )
    return Selection(tuple(trainable), tuple(named[name] for name in trainable))


def find_last_linear(model: nn.Module, inputs: object, io: ModelIO | None = None) -> str:
    """Find the last ``nn.Linear`` module executed by a forward pass.

    Args:
        model: The model.
        inputs: One batch of inputs, as the model takes them.
        io: How to call the model (plain ``model(inputs)`` if None).

    Returns:
        The module's name in ``model.named_modules()``.

    Raises:
        ValueError: If the forward pass runs no ``nn.Linear`` module.
    """
    order: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_args, _name=name: order.append(_name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.no_grad():
            (io or ModelIO()).call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ValueError(
            "subset='last_layer' needs an nn.Linear module in the forward pass, and the model "
            "ran none; choose the parameters with a list of names or a callable instead."
        )
    return order[-1]
