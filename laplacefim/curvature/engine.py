"""The curvature engine: one forward, one batched backward, per-layer statistics per batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from laplacefim.curvature.hooks import Call, record
from laplacefim.curvature.kinds import columns
from laplacefim.curvature.layers import DENSE_INPUT, EMBEDDING, GENERIC, Rows, kron_capable
from laplacefim.likelihoods import LikelihoodModel
from laplacefim.options import CurvatureKind, Structure
from laplacefim.structures import (
    Block,
    BlockDiagonal,
    DenseBlock,
    DiagBlock,
    KronBlock,
    LinearDenseBlock,
)
from laplacefim.subsets import Selection


@dataclass(frozen=True)
class Slot:
    """One chosen parameter and the module that owns it."""

    name: str
    module_name: str
    local: str
    param: nn.Parameter


@dataclass(frozen=True)
class Backprop:
    """One forward pass and the gradients of some output columns w.r.t. layer outputs.

    Attributes:
        outputs: Detached model outputs ``(B, C)``.
        calls: Recorded layer calls, per module name.
        grads: Per module name and call, gradients ``(V, *layer output shape)``.
    """

    outputs: Tensor
    calls: dict[str, list[Call]]
    grads: dict[str, list[Tensor]]


@dataclass(frozen=True)
class BatchStats:
    """What one batch adds to a fit.

    Attributes:
        contributions: Tensors laid out as the accumulator's ``state()``.
        loss_stats: The likelihood's summable loss statistic of the batch.
        n_data: Number of data in the batch.
        bad_outputs: 0-d bool tensor, True if an output was NaN or infinite.
        bad_targets: 0-d bool tensor, True if a target value was out of range.
    """

    contributions: list[Tensor]
    loss_stats: Tensor
    n_data: int
    bad_outputs: Tensor
    bad_targets: Tensor


def _owner_slots(model: nn.Module, selection: Selection) -> list[Slot]:
    owners = {}
    for module_name, module in model.named_modules():
        for local, param in module._parameters.items():
            if param is not None and id(param) not in owners:
                owners[id(param)] = (module_name, local)
    slots = []
    for name, param in zip(selection.names, selection.params, strict=True):
        module_name, local = owners[id(param)]
        slots.append(Slot(name, module_name, local, param))
    return slots


class CurvatureEngine:
    """Computes per-batch curvature statistics for the chosen parameters of a model.

    Args:
        model: The model (its modules are hooked only while a batch runs).
        selection: The chosen parameters.
        structure: Full, diagonal or Kronecker-factored.
        kind: Exact GGN, MC Fisher or empirical Fisher.
        likelihood: The likelihood of the model's outputs.
        fisher_samples: Labels drawn per datum for the MC Fisher.
        dtype: Dtype in which statistics are formed and summed.
    """

    def __init__(
        self,
        model: nn.Module,
        selection: Selection,
        structure: Structure,
        kind: CurvatureKind,
        likelihood: LikelihoodModel,
        *,
        fisher_samples: int,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.structure = structure
        self.kind = kind
        self.likelihood = likelihood
        self.fisher_samples = fisher_samples
        self.dtype = dtype
        self.slots = _owner_slots(model, selection)
        self.modules = {s.module_name: model.get_submodule(s.module_name) for s in self.slots}
        self._fast: bool | None = (
            None  # whether the only hooked layer's output is the model's output
        )

    # ---------------------------------------------------------------- layout
    def rule_kind(self, slot: Slot) -> str:
        """``"dense_input"`` (Linear, Conv2d), ``"embedding"`` or ``"generic"`` (torch.func)."""
        module = self.modules[slot.module_name]
        if kron_capable(module) and slot.local in ("weight", "bias"):
            return "embedding" if isinstance(module, nn.Embedding) else "dense_input"
        return "generic"

    def zeros(self) -> BlockDiagonal:
        """An empty accumulator laid out for this engine's structure."""
        if self.structure is Structure.FULL:
            linear = self.single_linear()
            if linear is not None:
                d_out, d_aug, weight, bias = linear
                pairs = self._zeros(d_out * (d_out + 1) // 2, d_aug, d_aug)
                return BlockDiagonal([LinearDenseBlock(pairs, d_out, weight, bias)])
            n = sum(s.param.numel() for s in self.slots)
            return BlockDiagonal([DenseBlock(self._zeros(n, n))])
        return BlockDiagonal([self._zero_block(slot) for slot in self.slots])

    def single_linear(self) -> tuple[int, int, bool, bool] | None:
        """``(d_out, d_aug, weight, bias)`` when every chosen parameter is one Linear layer's."""
        if len(self.modules) != 1:
            return None
        module = next(iter(self.modules.values()))
        if not isinstance(module, nn.Linear):
            return None
        locals_ = {s.local for s in self.slots}
        weight, bias = "weight" in locals_, "bias" in locals_
        d_aug = module.in_features * int(weight) + int(bias) if weight else 1
        return module.out_features, d_aug, weight, bias

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.slots[0].param.device)

    def _zero_block(self, slot: Slot) -> Block:
        rule = self.rule_kind(slot)
        shape = slot.param.shape
        if self.structure is Structure.DIAG or rule == "generic":
            return DiagBlock(self._zeros(slot.param.numel()))
        if rule == "dense_input" and slot.local == "bias":
            return DenseBlock(self._zeros(shape[0], shape[0]))
        if rule == "dense_input":
            d_in = slot.param[0].numel()
            return KronBlock(
                self._zeros(shape[0], shape[0]), self._zeros(d_in, d_in), self._zeros()
            )
        return KronBlock(self._zeros(shape[0]), self._zeros(shape[1], shape[1]), self._zeros())

    # ---------------------------------------------------------------- one batch
    def batch(self, x: object, y: Tensor, generator: torch.Generator | None) -> BatchStats:
        """Run one batch and return its statistics (nothing is accumulated here)."""
        f, f2, calls = self._forward(x)
        targets = self.likelihood.targets(f2, y)
        cols = columns(
            self.kind,
            self.likelihood,
            f2,
            targets.values,
            fisher_samples=self.fisher_samples,
            generator=generator,
        )
        grads = self._output_grads(f, cols, calls)
        contributions = self._contributions(calls, grads)
        loss_stats = self.likelihood.loss_stats(f2, targets.values).to(self.dtype)
        bad_outputs = ~torch.isfinite(f2).all()
        return BatchStats(contributions, loss_stats, f2.shape[0], bad_outputs, targets.invalid)

    def jacobian_rows(self, x: object) -> Backprop:
        """Gradients of every output ``e_c`` w.r.t. the hooked layers' outputs.

        This is the Jacobian of the outputs, kept per layer as ``(C, B, T, d_out)`` output
        gradients next to the inputs, never as a ``(B, C, P)`` matrix.
        """
        f, f2, calls = self._forward(x)
        n_out = f2.shape[1]
        eye = torch.eye(n_out, dtype=f2.dtype, device=f2.device)
        cols = eye[:, None, :].expand(n_out, f2.shape[0], n_out)
        return Backprop(f2, calls, self._output_grads(f, cols, calls))

    def _forward(self, x: object) -> tuple[Tensor, Tensor, dict[str, list[Call]]]:
        with record(self.modules, track_grad=not self._fast) as recording:
            f = self.model(x)
        if not isinstance(f, Tensor):
            raise TypeError(
                f"the model returned {type(f).__name__}; laplacefim needs one output tensor."
            )
        f2 = self.likelihood.outputs(f.detach())
        calls = {name: recording.calls[name] for name in self.modules}
        if self._fast is None:
            only = list(calls.values())
            self._fast = (
                len(only) == 1
                and len(only[0]) == 1
                and only[0][0].returned is f
                and isinstance(self.modules[next(iter(calls))], nn.Linear)
            )
        return f, f2, calls

    def _output_grads(
        self, f: Tensor, cols: Tensor, calls: dict[str, list[Call]]
    ) -> dict[str, list[Tensor]]:
        n_columns = cols.shape[0]
        grad_outputs = cols.reshape(n_columns, *f.shape)
        if self._fast:  # the hooked layer produced the model's output: g is the columns
            return {name: [grad_outputs for _ in cs] for name, cs in calls.items()}
        outputs = [call.output for cs in calls.values() for call in cs]
        if n_columns == 1:
            raw = torch.autograd.grad(f, outputs, grad_outputs[0], allow_unused=True)
            found = [None if g is None else g[None] for g in raw]
        else:
            found = list(
                torch.autograd.grad(
                    f, outputs, grad_outputs, is_grads_batched=True, allow_unused=True
                )
            )
        result: dict[str, list[Tensor]] = {}
        i = 0
        for name, cs in calls.items():
            result[name] = []
            for call in cs:
                g = found[i]
                i += 1
                if g is None:
                    g = call.output.new_zeros(n_columns, *call.output.shape)
                result[name].append(g.detach())
        return result

    def rows(self, module: nn.Module, calls: list[Call], grads: list[Tensor]) -> Rows:
        """A Linear/Conv2d/Embedding layer's inputs and output gradients, in the engine's dtype."""
        rule = EMBEDDING if isinstance(module, nn.Embedding) else DENSE_INPUT
        rows = rule.rows(module, calls, grads)
        inputs = rows.inputs if rows.inputs.dtype == torch.long else rows.inputs.to(self.dtype)
        return Rows(inputs, rows.grads.to(self.dtype))

    def _contributions(
        self, calls: dict[str, list[Call]], grads: dict[str, list[Tensor]]
    ) -> list[Tensor]:
        by_module: dict[str, list[Slot]] = {}
        for slot in self.slots:
            by_module.setdefault(slot.module_name, []).append(slot)
        if self.structure is Structure.FULL:
            return [self._full(by_module, calls, grads)]
        parts: dict[str, list[Tensor]] = {}
        for module_name, slots in by_module.items():
            module = self.modules[module_name]
            cs, gs = calls[module_name], grads[module_name]
            if not cs:
                continue
            generic = [s for s in slots if self.rule_kind(s) == "generic"]
            if generic:
                per_sample = GENERIC.per_sample(module, [s.local for s in generic], cs, gs)
                for s in generic:
                    parts[s.name] = [per_sample[s.local].to(self.dtype).square().sum((0, 1))]
            ruled = [s for s in slots if self.rule_kind(s) != "generic"]
            if ruled:
                parts.update(self._ruled_stats(module, ruled, self.rows(module, cs, gs)))
        out: list[Tensor] = []
        for slot in self.slots:
            out.extend(parts[slot.name] if slot.name in parts else self._zero_block(slot).state())
        return out

    def _ruled_stats(
        self, module: nn.Module, slots: list[Slot], rows: Rows
    ) -> dict[str, list[Tensor]]:
        parts: dict[str, list[Tensor]] = {}
        if isinstance(module, nn.Embedding):
            for s in slots:
                if self.structure is Structure.DIAG:
                    parts[s.name] = [EMBEDDING.diag(rows, module).reshape(-1)]
                else:
                    parts[s.name] = EMBEDDING.kron(rows, module)
            return parts
        if self.structure is Structure.DIAG:
            for s in slots:
                parts[s.name] = [DENSE_INPUT.diag(rows, s.local).reshape(-1)]
            return parts
        weight = [s for s in slots if s.local == "weight"]
        kron = DENSE_INPUT.kron(rows) if weight else [DENSE_INPUT.output_factor(rows)]
        for s in slots:
            parts[s.name] = kron if s.local == "weight" else kron[:1]
        return parts

    def per_sample(
        self,
        by_module: dict[str, list[Slot]],
        calls: dict[str, list[Call]],
        grads: dict[str, list[Tensor]],
    ) -> dict[str, Tensor]:
        """Per-sample, per-column gradients ``(V, B, p)`` of the given slots, by name.

        Used where no contraction exists (the full structure, shared weights, custom
        modules); slots whose layer did not run get zeros.
        """
        out: dict[str, Tensor] = {}
        for module_name, slots in by_module.items():
            module = self.modules[module_name]
            cs, gs = calls[module_name], grads[module_name]
            if not cs:
                continue
            generic = [s for s in slots if self.rule_kind(s) == "generic"]
            if generic:
                per = GENERIC.per_sample(module, [s.local for s in generic], cs, gs)
                out.update({s.name: per[s.local].to(self.dtype) for s in generic})
            ruled = [s for s in slots if self.rule_kind(s) != "generic"]
            if ruled:
                rows = self.rows(module, cs, gs)
                for s in ruled:
                    if isinstance(module, nn.Embedding):
                        out[s.name] = EMBEDDING.per_sample(rows, module)
                    else:
                        out[s.name] = DENSE_INPUT.per_sample(rows, s.local)
        wanted = [s for slots in by_module.values() for s in slots]
        if len(out) < len(wanted):  # layers not run in this batch contribute zeros
            some = next(iter(out.values()), None)
            if some is None:
                raise ValueError("none of the chosen parameters' layers ran in the forward pass.")
            for s in wanted:
                if s.name not in out:
                    out[s.name] = some.new_zeros(*some.shape[:2], s.param.numel())
        return out

    def _full(
        self,
        by_module: dict[str, list[Slot]],
        calls: dict[str, list[Call]],
        grads: dict[str, list[Tensor]],
    ) -> Tensor:
        """One batch's full block: by output pairs for one Linear layer, else ``JᵀJ``."""
        linear = self.single_linear()
        if linear is not None:
            module_name = next(iter(self.modules))
            rows = self.rows(self.modules[module_name], calls[module_name], grads[module_name])
            if len(calls[module_name]) == 1 and rows.inputs.shape[1] == 1:
                return self._linear_pairs(rows, *linear)
        per_sample = self.per_sample(by_module, calls, grads)
        jac = torch.cat([per_sample[s.name] for s in self.slots], dim=2)
        jac = jac.reshape(-1, jac.shape[-1])
        dense = jac.T @ jac
        if linear is None:
            return dense
        d_out, d_aug, weight, bias = linear
        order = LinearDenseBlock(dense.new_zeros(0, d_aug, d_aug), d_out, weight, bias)._order()
        return LinearDenseBlock.pairs_from_dense(dense, d_out, d_aug, order)

    def _linear_pairs(self, rows: Rows, d_out: int, d_aug: int, weight: bool, bias: bool) -> Tensor:
        """``pairs[k] = Σₙ Mₙ[o_k, p_k] ãₙãₙᵀ`` for ``o_k ≤ p_k``: one GEMM over the batch.

        Costs about ``N·P²/2`` multiply-adds, against ``V·N·P²`` for a per-sample Jacobian.
        """
        a, g = rows.inputs[:, 0], rows.grads[:, :, 0]
        if bias:
            ones = a.new_ones(a.shape[0], 1)
            a = torch.cat([a, ones], dim=1) if weight else ones
        upper = torch.triu_indices(d_out, d_out, device=a.device)
        weights = (g[:, :, upper[0]] * g[:, :, upper[1]]).sum(0)  # (B, pairs)
        left = (weights[:, :, None] * a[:, None, :]).reshape(a.shape[0], -1)
        return (left.T @ a).reshape(-1, d_aug, d_aug)
