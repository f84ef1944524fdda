"""The curvature engine: one forward, one batched backward, per-parameter segments per batch.

For each chosen parameter the engine finds the module(s) that use it and the layer rule
that accounts for each use (:mod:`laplacefim.curvature.rules`): the outermost module whose
registered rule claims it (attention claims its ``out_proj``, which it calls
functionally), else the module that owns it with the generic ``torch.func`` rule. A
parameter used by several modules (tied weights) gets the sum of its uses' per-sample
gradients. Per batch, the likelihood's columns are backpropagated to the watched modules'
outputs only, in one ``is_grads_batched`` backward, and each rule turns what its module
saw into segments (:mod:`laplacefim.curvature.segments`). Structures read the segments.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from laplacefim.curvature.audit import audit
from laplacefim.curvature.hooks import Call, column_grads, run_recorded
from laplacefim.curvature.kinds import columns
from laplacefim.curvature.rules import GENERIC, RULES, LayerRule
from laplacefim.curvature.segments import Samples, Segment
from laplacefim.inputs import ModelIO
from laplacefim.likelihoods import LikelihoodModel
from laplacefim.likelihoods.base import OutputCurvature
from laplacefim.options import CurvatureKind
from laplacefim.subsets import Selection

# Exact-GGN columns per datum from which a fit that has to backpropagate them says so.
MANY_COLUMNS = 100
# Output gradients one backward pass may hold: more columns than fit are backpropagated in
# parts, one backward pass after another over the retained graph. Every statistic except
# the inputs' (a Kronecker input factor) is a sum over columns, so the parts add up; and a
# part never holds every layer's (V, B, ...) gradients at once. On CPU a batched backward
# through a convolution loops over the columns anyway and stacks them (PyTorch has no
# batching rule for its backward there): a ResNet-18's exact-GGN KFAC fit took half the
# time in one-column parts (benchmarks/README.md).
PART_BYTES = 1 << 28


@dataclass(frozen=True)
class Use:
    """One module that uses a chosen parameter, and the rule that accounts for the use.

    Attributes:
        module: Name of the module whose calls the hooks record.
        local: The parameter's name relative to that module.
    """

    module: str
    local: str


@dataclass(frozen=True)
class Slot:
    """One chosen parameter and its uses."""

    name: str
    param: nn.Parameter
    uses: tuple[Use, ...]


SegmentMap = dict[str, list[Segment]]


@dataclass(frozen=True)
class BatchRows:
    """What one batch gave: per-parameter segments and the likelihood's bookkeeping.

    Attributes:
        first: The first part's segments (all of them unless ``later`` has more), until
            :meth:`each_part` hands it on; read it through :attr:`segments`.
        outputs: Detached model outputs ``(B, C)``.
        loss_stats: The likelihood's summable loss statistic (None for Jacobian rows).
        n_data: Number of data in the batch (a 0-d tensor for token-level targets).
        bad_outputs: 0-d bool tensor, True if an output was NaN or infinite.
        bad_targets: 0-d bool tensor, True if a target value was out of range.
        later: The segments of the other parts of the columns (see ``PART_BYTES``), each
            backpropagated when the iterator reaches it; use :meth:`each_part`.
    """

    first: list[SegmentMap]
    outputs: Tensor
    loss_stats: Tensor | None = None
    n_data: int | Tensor = 0
    bad_outputs: Tensor | None = None
    bad_targets: Tensor | None = None
    later: Iterator[SegmentMap] = field(default_factory=lambda: iter(()))

    @property
    def segments(self) -> SegmentMap:
        """Per chosen parameter (by name), its segments in flat order, of the first part of
        the columns; a parameter whose modules did not run in the batch is absent."""
        if not self.first:
            raise RuntimeError("the batch's segments were handed on by each_part already.")
        return self.first[0]

    def each_part(self, add: Callable[[SegmentMap, bool], object]) -> None:
        """Call ``add(segments, first)`` on every part of the columns in turn, ``first``
        True for the first part only (the batch's inputs are counted with it: see
        ``Block.statistics(..., inputs=False)``). Only the part being added is held: the
        previous one is released before the next part's backward pass."""
        part: SegmentMap | None = self.segments
        self.first.clear()
        first = True
        while part is not None:
            add(part, first)
            part = None  # released before next() runs the next part's backward
            part, first = next(self.later, None), False


def _ancestors(name: str) -> list[str]:
    """Module names from the root down to ``name``."""
    parts = name.split(".") if name else []
    return [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]


def resolve_uses(model: nn.Module, selection: Selection) -> tuple[list[Slot], dict[str, LayerRule]]:
    """The uses of every chosen parameter and the rule of every watched module."""
    holders: dict[int, list[tuple[str, str]]] = {}
    for module_name, module in model.named_modules():
        for local, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module_name, local))
    rules: dict[str, LayerRule] = {}
    slots = []
    for name, param in zip(selection.names, selection.params, strict=True):
        uses: list[Use] = []
        for holder, local in holders[id(param)]:
            use, rule = _accounting(model, holder, local)
            rules[use.module] = rule
            if use not in uses:
                uses.append(use)
        slots.append(Slot(name, param, tuple(uses)))
    return slots, rules


def _accounting(model: nn.Module, holder: str, local: str) -> tuple[Use, LayerRule]:
    for prefix in _ancestors(holder):
        module = model.get_submodule(prefix)
        rule = RULES.lookup(module)
        relative = f"{holder[len(prefix) :].lstrip('.')}.{local}".lstrip(".")
        if rule is not None and relative in rule.claims(module):
            return Use(prefix, relative), rule
    return Use(holder, local), GENERIC


class CurvatureEngine:
    """Per-batch segments of the chosen parameters of a model.

    Args:
        model: The model (its modules are hooked only while a batch runs).
        selection: The chosen parameters.
        kind: Exact GGN, MC Fisher or empirical Fisher.
        likelihood: The likelihood of the model's outputs.
        noise: The likelihood's noise hyperparameter at which the curvature is formed.
        io: How to call the model.
        fisher_samples: Labels drawn per datum for the MC Fisher.
        dtype: Dtype in which segments are handed to the structures.
    """

    def __init__(
        self,
        model: nn.Module,
        selection: Selection,
        kind: CurvatureKind,
        likelihood: LikelihoodModel,
        noise: Tensor,
        io: ModelIO,
        *,
        fisher_samples: int,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.selection = selection
        self.kind = kind
        self.likelihood = likelihood
        self.noise = noise
        self.io = io
        self.fisher_samples = fisher_samples
        self.dtype = dtype
        self.slots, self.rules = resolve_uses(model, selection)
        self.modules = {name: model.get_submodule(name) for name in self.rules}
        self.broadcast = frozenset(name for name, rule in self.rules.items() if rule.broadcast)
        self.wanted = {
            name: frozenset(u.local for s in self.slots for u in s.uses if u.module == name)
            for name in self.rules
        }
        # Whether the only watched call's output is the model's output (then no backward
        # is needed: its gradients are the columns); decided on the first batch.
        self._fast: bool | None = None
        self._audited = False
        self._warned = False
        # Modules whose outputs the model changes in place: recorded through clones.
        self.clone: set[str] = set()

    @property
    def output_is_watched(self) -> bool | None:
        """Whether the only watched call gives the model's output, so that Jacobian rows
        need no backward pass (None before the first batch)."""
        return self._fast

    # ---------------------------------------------------------------- one batch
    def batch(self, x: object, y: Tensor, generator: torch.Generator | None) -> BatchRows:
        """Run one batch and return its segments and loss statistics.

        The first batch is audited first (:func:`~laplacefim.curvature.audit.audit`).
        """
        if not self._audited:
            params = [(slot.name, slot.param) for slot in self.slots]
            audit(
                self.model,
                self.io,
                self.modules,
                self.broadcast,
                self.clone,
                params,
                self.segments,
                x,
            )
            self._audited = True
        f, f2, calls = self.forward(x, y.shape[0])
        targets = self.likelihood.targets(f2, y)
        segments = None
        later: Iterator[SegmentMap] = iter(())
        if self._fast and self.kind is CurvatureKind.GGN and targets.weight is None:
            curvature = self.likelihood.output_curvature(f2, self.noise)
            if curvature is not None:
                segments = self.output_segments(calls, curvature)
        if segments is None:
            cols = columns(
                self.kind,
                self.likelihood,
                f2,
                targets.values,
                self.noise,
                fisher_samples=self.fisher_samples,
                generator=generator,
            )
            if targets.weight is not None:  # ignored tokens carry no datum
                cols = cols * targets.weight[None, ..., None]
            if self.kind is CurvatureKind.GGN and not self._warned:
                self._warn_many_columns(calls, cols.shape[0])
            later = self._parts(f, cols, calls)
            segments = next(later)
        loss_stats = self.likelihood.loss_stats(f2, targets.values).to(self.dtype)
        return BatchRows(
            [segments],
            f2,
            loss_stats,
            targets.count,
            ~torch.isfinite(f2).all(),
            targets.invalid,
            later,
        )

    def _parts(self, f: Tensor, cols: Tensor, calls: dict[str, list[Call]]) -> Iterator[SegmentMap]:
        """The segments of the columns ``(V, ...)``, a part at a time (``PART_BYTES``)."""
        n_columns = cols.shape[0]
        outputs = [o for cs in calls.values() for c in cs for o in c.outputs]
        per_column = sum(o.numel() * o.element_size() for o in outputs)
        step = n_columns if self._fast else max(1, min(n_columns, PART_BYTES // max(per_column, 1)))
        for start in range(0, n_columns, step):
            end = min(start + step, n_columns)
            self.backward(f, cols[start:end], calls, retain=end < n_columns)
            yield self.segments(calls)

    def jacobian_rows(self, x: object, batch: int) -> BatchRows:
        """Segments of the Jacobian of the outputs: the columns are the unit vectors ``e_c``.

        The Jacobian is kept per layer as inputs and output gradients, never as a
        ``(B, C, P)`` matrix.
        """
        f, f2, calls = self.forward(x, batch)
        segments = self.output_segments(calls, None) if self._fast else None
        if segments is None:
            n_out = f2[0].numel()
            eye = torch.eye(n_out, dtype=f2.dtype, device=f2.device)
            columns = eye[:, None, :].expand(n_out, f2.shape[0], n_out)
            self.backward(f, columns.reshape(n_out, *f2.shape), calls)
            segments = self.segments(calls)
        return BatchRows([segments], f2)

    def output_segments(
        self, calls: dict[str, list[Call]], curvature: OutputCurvature | None
    ) -> dict[str, list[Segment]] | None:
        """Segments of the one watched call, which gave the model's output, from the output
        curvature (the identity when None) without per-datum columns; None where its rule
        has no such form (then the columns are formed)."""
        ((name, (call,)),) = [(n, cs) for n, cs in calls.items() if cs]
        rule = self.rules[name]
        if rule.output_rows is None:
            return None
        found = rule.output_rows(self.modules[name], call, self.wanted[name], curvature)
        if found is None:
            return None
        memo: dict[int, Tensor] = {}
        out: dict[str, list[Segment]] = {}
        for slot in self.slots:
            if len(slot.uses) != 1:  # tied weights: their per-sample gradients add up
                return None
            (use,) = slot.uses
            if use.module == name:
                out[slot.name] = [s.to(self.dtype, memo) for s in found[use.local]]
        return out

    def forward(self, x: object, batch: int) -> tuple[Tensor, Tensor, dict[str, list[Call]]]:
        """Run the model with the watched modules recorded.

        Returns:
            The output as the model gave it, the likelihood's checked view ``(B, C)``
            (detached), and the recorded calls per module.
        """
        f, recording = run_recorded(
            lambda: self.io.call(self.model, x),
            self.modules,
            track_grad=not self._fast,
            batch=batch,
            broadcast=self.broadcast,
            clone=self.clone,
        )
        f2 = self.likelihood.outputs(f.detach().to(self.dtype))
        calls = recording.calls
        if self._fast is None:
            only = [c for cs in calls.values() for c in cs]
            self._fast = len(only) == 1 and len(only[0].returned) == 1 and only[0].returned[0] is f
        return f, f2, calls

    def _warn_many_columns(self, calls: dict[str, list[Call]], n_columns: int) -> None:
        """Say once what the exact GGN's columns cost when there are many of them."""
        self._warned = True
        if self._fast or n_columns < MANY_COLUMNS:
            return
        outputs = [o for cs in calls.values() for c in cs for o in c.outputs if o.requires_grad]
        gigabytes = n_columns * sum(o.numel() * o.element_size() for o in outputs) / 1e9
        warnings.warn(
            f"the exact GGN backpropagates {n_columns} columns per datum (one per model "
            f"output): about {n_columns} backward passes' work per batch, and {gigabytes:.2f} "
            f"GB of output gradients for this batch (formed {PART_BYTES / 1e6:.0f} MB at a "
            "time). curvature='fisher' (the MC Fisher) "
            "backpropagates fisher_samples sampled columns instead (1 by default); "
            "subset='last_layer' needs no columns at all.",
            RuntimeWarning,
            stacklevel=4,
        )

    def backward(
        self, f: Tensor, cols: Tensor, calls: dict[str, list[Call]], *, retain: bool = False
    ) -> None:
        """Fill each call's ``grads``: the columns' gradients w.r.t. its outputs (``retain``:
        keep the graph for another part of the columns)."""
        n_columns = cols.shape[0]
        grad_outputs = cols.reshape(n_columns, *f.shape).to(f.dtype)
        for cs in calls.values():  # the previous part's gradients go before this part's come
            for call in cs:
                call.grads = []
        if (
            self._fast
        ):  # the watched call produced the model's output: its gradients are the columns
            for cs in calls.values():
                for call in cs:
                    call.grads = [grad_outputs]
            return
        outputs = [o for cs in calls.values() for c in cs for o in c.outputs if o.requires_grad]
        found: list[Tensor | None] = []
        if outputs:
            found = column_grads([f], outputs, [grad_outputs], retain_graph=retain)
        index = 0
        for cs in calls.values():
            for call in cs:
                call.grads = []
                for out in call.outputs:
                    g = found[index] if out.requires_grad else None
                    index += int(out.requires_grad)
                    zero = out.new_zeros(n_columns, *out.shape)
                    call.grads.append(zero if g is None else g.detach())

    def segments(self, calls: dict[str, list[Call]]) -> SegmentMap:
        """Each chosen parameter's segments, from the rules of the modules that ran."""
        by_module: dict[str, dict[str, list[Segment]]] = {}
        for name, module in self.modules.items():
            if not calls[name]:
                continue
            try:
                by_module[name] = self.rules[name].rows(module, calls[name], self.wanted[name])
            except (ValueError, TypeError) as error:
                params = [s.name for s in self.slots if any(u.module == name for u in s.uses)]
                raise type(error)(f"module {name!r} (parameters {params}): {error}") from error
        out: dict[str, list[Segment]] = {}
        memo: dict[int, Tensor] = {}
        for slot in self.slots:
            found = [by_module[u.module][u.local] for u in slot.uses if u.module in by_module]
            if not found:
                continue
            if len(found) == 1:
                out[slot.name] = [s.to(self.dtype, memo) for s in found[0]]
            else:  # tied weights: the per-sample gradients of every use add up
                total = sum(torch.cat([s.per_sample() for s in segs], dim=2) for segs in found)
                out[slot.name] = [Samples(total.to(self.dtype))]  # type: ignore[union-attr]
        return out
