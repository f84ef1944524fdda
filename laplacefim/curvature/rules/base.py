"""The layer-rule protocol and its registry type; shared checks for rules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from laplacefim.curvature.hooks import Call
from laplacefim.curvature.segments import Segment
from laplacefim.likelihoods.base import OutputCurvature

RowsFn = Callable[[nn.Module, list[Call], frozenset[str]], dict[str, list[Segment]]]
OutputRowsFn = Callable[
    [nn.Module, Call, frozenset[str], OutputCurvature | None], dict[str, list[Segment]] | None
]


def own_parameters(module: nn.Module) -> tuple[str, ...]:
    """The names of a module's own (not its submodules') parameters."""
    return tuple(name for name, p in module.named_parameters(recurse=False))


@dataclass(frozen=True)
class LayerRule:
    """A layer rule.

    Attributes:
        rows: ``(module, calls, wanted) -> {parameter name: [segments]}``.
        claims: ``module -> names`` of the parameters the rule accounts for, relative to
            the module.
        broadcast: Whether the module's outputs are batch-first, so that an output with a
            leading 1 from a module that sees no batch is broadcast over it (False for
            rules that read their module's layout themselves).
        output_rows: For a module whose one call gives the model's ``(B, C)`` output:
            ``(module, call, wanted, curvature) -> segments`` without per-datum columns,
            from the likelihood's output curvature, or from the identity (the Jacobian)
            when ``curvature`` is None; it returns None where it does not apply (the
            engine then takes ``rows``). None: the rule has no such form.
    """

    rows: RowsFn
    claims: Callable[[nn.Module], tuple[str, ...]] = own_parameters
    broadcast: bool = True
    output_rows: OutputRowsFn | None = None


class RuleRegistry:
    """Layer rules by module type (the most specific registered base class wins), then by
    behaviour (a predicate on the module), in registration order."""

    def __init__(self) -> None:
        self._by_type: dict[type, LayerRule] = {}
        self._by_behaviour: list[tuple[Callable[[nn.Module], bool], LayerRule]] = []

    def register(self, module_type: type, rule: LayerRule) -> None:
        """Use ``rule`` for ``module_type`` and its subclasses."""
        self._by_type[module_type] = rule

    def register_behaviour(self, predicate: Callable[[nn.Module], bool], rule: LayerRule) -> None:
        """Use ``rule`` for modules of no registered type for which ``predicate`` holds."""
        self._by_behaviour.append((predicate, rule))

    @property
    def types(self) -> list[type]:
        """The module types with a registered rule."""
        return list(self._by_type)

    def lookup(self, module: nn.Module) -> LayerRule | None:
        """The rule for ``module``, or None (the generic rule applies)."""
        for cls in type(module).__mro__:
            if cls in self._by_type:
                return self._by_type[cls]
        for predicate, rule in self._by_behaviour:
            if predicate(module):
                return rule
        return None


def check_batch_first(module: nn.Module, call: Call, index: int = 0) -> Tensor:
    """The call's ``index``-th output, checked to be batch-first (leading dimension ``B``).

    Raises:
        ValueError: If the leading dimension is not the batch.
    """
    out = call.outputs[index]
    if out.ndim == 0 or out.shape[0] != call.batch:
        raise ValueError(
            f"{type(module).__name__} returned an output of shape {tuple(out.shape)} whose "
            f"leading dimension is not the batch ({call.batch} rows); laplacefim needs "
            "batch-first layers (for example batch_first=True)."
        )
    return out


def batched(value: Tensor, call: Call) -> Tensor:
    """An input with a leading dimension of 1 expanded to the batch, where the call's
    output was broadcast over it."""
    if any(call.expanded) and value.ndim > 0 and value.shape[0] == 1 and call.batch > 1:
        return value.expand(call.batch, *value.shape[1:])
    return value
