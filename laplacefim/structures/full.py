"""``structure="full"``: one dense block ``Σₙ Σ_v uᵥuᵥᵀ`` over every chosen parameter.

The per-sample gradients ``u`` are formed per batch (``(V·B, P)``) and multiplied once.
When the chosen parameters are one linear layer's weight (and bias) seen once per datum —
the last layer — the block is stored by output pairs instead: ``Σₙ Mₙ ⊗ ãₙãₙᵀ`` with
``Mₙ = Σ_v g gᵀ``, one GEMM of about ``N·P²/2`` multiply-adds and no Jacobian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from laplacefim.curvature.segments import Product, Segment
from laplacefim.curvature.segments.outputs import CurvatureProduct
from laplacefim.options import CurvatureKind
from laplacefim.structures.base import Block, Plan, SegmentMap, add_statistics, gather, whole
from laplacefim.structures.eigen import DenseBasis, EigenDecomposition, symmetric_eigh


def decompose_dense(matrix: Tensor) -> EigenDecomposition:
    """Eigendecomposition of a dense PSD block, keeping the matrix for varying priors."""
    values, vectors = symmetric_eigh(matrix)
    return EigenDecomposition(values, DenseBasis(vectors), matrix.clone())


@dataclass
class DenseBlock:
    """A dense curvature block over whole parameters.

    Attributes:
        names: The parameters, in flat order.
        sizes: Their sizes.
        matrix: The block ``(p, p)``, summed over data.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    matrix: Tensor
    active: bool = True

    @property
    def numel(self) -> int:
        """Number of parameters covered."""
        return self.matrix.shape[0]

    def statistics(self, segments: SegmentMap, *, inputs: bool = True) -> list[Tensor]:
        """``JᵀJ`` of the batch's per-sample gradients."""
        jac = gather(segments, self.names, self.sizes, lambda s: s.per_sample())
        if jac is None:
            return [torch.zeros_like(self.matrix)]
        jac = jac.reshape(-1, jac.shape[-1])
        return [jac.T @ jac]

    def covered(self, segments: SegmentMap) -> list[Segment] | None:
        """Every segment of the block's parameters."""
        return whole(segments, self.names, self.sizes)

    def state(self) -> list[Tensor]:
        """``[matrix]``."""
        return [self.matrix]

    def end_pass(self) -> None:
        """One pass suffices."""
        self.active = False

    def to_dense(self) -> Tensor:
        """The matrix."""
        return self.matrix

    def diagonal(self) -> Tensor:
        """Its diagonal."""
        return self.matrix.diagonal()

    def decompose(self) -> EigenDecomposition:
        """``eigh`` of the matrix."""
        return decompose_dense(self.matrix)

    def save(self) -> tuple[dict[str, Any], list[Tensor]]:
        """Names and sizes; the matrix."""
        return {"names": list(self.names), "sizes": list(self.sizes)}, [self.matrix]

    @classmethod
    def restore(cls, spec: dict[str, Any], tensors: list[Tensor]) -> DenseBlock:
        """Inverse of :meth:`save`."""
        return cls(tuple(spec["names"]), tuple(spec["sizes"]), tensors[0], active=False)


@dataclass
class LinearPairsBlock:
    """The exact dense block of one linear layer, stored by output pairs.

    For per-sample gradients ``g ⊗ ã`` (``ã`` the input, with a trailing 1 when the bias is
    covered), the block is ``Σₙ Mₙ ⊗ ãₙãₙᵀ``. Only the pairs ``o ≤ p`` of output indices
    are stored: ``pairs[k] = Σₙ Mₙ[o_k, p_k] ãₙãₙᵀ``; :meth:`to_dense` assembles the
    ``(P, P)`` matrix with the weight (row-major) before the bias.

    Attributes:
        names: The weight and/or bias, in flat order.
        pairs: ``(d_out (d_out + 1) / 2, d_aug, d_aug)``, summed over data.
        d_out: Output size of the layer.
        weight: Whether the weight is covered.
        bias: Whether the bias is covered.
    """

    names: tuple[str, ...]
    pairs: Tensor
    d_out: int
    weight: bool
    bias: bool
    active: bool = True

    @property
    def d_aug(self) -> int:
        """Length of ``ã``."""
        return self.pairs.shape[-1]

    @property
    def numel(self) -> int:
        """Number of parameters covered."""
        d_in = self.d_aug - int(self.bias)
        return self.d_out * (d_in * int(self.weight) + int(self.bias))

    def _rows(self, segments: SegmentMap) -> tuple[Tensor, Tensor] | None:
        """``ã (B, d_aug)`` and ``Mₙ[o_k, p_k]`` ``(B, pairs)``, or None where the form does
        not hold."""
        found = [segments.get(name) for name in self.names]
        if any(f is None for f in found):
            return None
        parts = [f[0] for f in found if f is not None]
        if not all(_one_position(p) for p in parts):
            return None
        first: Product | CurvatureProduct = parts[0]  # type: ignore[assignment]
        upper = torch.triu_indices(self.d_out, self.d_out, device=first.grads.device)
        inputs = first.inputs if self.weight else None
        if isinstance(first, CurvatureProduct):
            weights = first.curvature.entries(upper[0], upper[1])
        else:
            g = first.grads[:, :, 0]
            weights = (g[:, :, upper[0]] * g[:, :, upper[1]]).sum(0)
            inputs = None if inputs is None else inputs[:, 0]
        ones = weights.new_ones(weights.shape[0], 1)
        if inputs is None:
            return ones, weights
        return (torch.cat([inputs, ones], dim=1) if self.bias else inputs), weights

    def statistics(self, segments: SegmentMap, *, inputs: bool = True) -> list[Tensor]:
        """``pairs[k] = Σₙ Mₙ[o_k, p_k] ãₙãₙᵀ``: one GEMM over the batch."""
        rows = self._rows(segments)
        if rows is None:
            sizes = [self.d_out * (self.d_aug - int(self.bias))] if self.weight else []
            sizes += [self.d_out] if self.bias else []
            jac = gather(segments, self.names, sizes, lambda s: s.per_sample())
            if jac is None:
                return [torch.zeros_like(self.pairs)]
            jac = jac.reshape(-1, jac.shape[-1])
            return [self.pairs_from_dense(jac.T @ jac)]
        a, weights = rows
        return [(_weighted(a, weights).T @ a).reshape(-1, self.d_aug, self.d_aug)]

    def accumulate_(self, segments: SegmentMap, *, inputs: bool = True) -> None:
        """Add the batch's pairs to the state in place: the GEMM writes into it (a fresh
        ``(pairs, d_aug, d_aug)`` tensor per batch and its add cost a tenth of the fit)."""
        rows = self._rows(segments)
        if rows is None or rows[0].dtype != self.pairs.dtype:
            add_statistics(self, segments, inputs=inputs)
            return
        a, weights = rows
        self.pairs.view(-1, self.d_aug).addmm_(_weighted(a, weights).T, a)

    def covered(self, segments: SegmentMap) -> list[Segment] | None:
        """The weight's and bias's segments."""
        sizes = [self.d_out * (self.d_aug - int(self.bias))] if self.weight else []
        sizes += [self.d_out] if self.bias else []
        return whole(segments, self.names, sizes)

    def state(self) -> list[Tensor]:
        """``[pairs]``."""
        return [self.pairs]

    def end_pass(self) -> None:
        """One pass suffices."""
        self.active = False

    def _order(self) -> Tensor:
        """Positions of the flat parameters (weight row-major, then bias) in ``(o, i)`` order."""
        index = torch.arange(self.d_out * self.d_aug, device=self.pairs.device)
        index = index.reshape(self.d_out, self.d_aug)
        if not self.bias:
            return index.reshape(-1)
        if not self.weight:
            return index[:, -1]
        return torch.cat([index[:, :-1].reshape(-1), index[:, -1]])

    def to_dense(self) -> Tensor:
        """The block as a dense ``(P, P)`` matrix."""
        upper = torch.triu_indices(self.d_out, self.d_out, device=self.pairs.device)
        full = self.pairs.new_zeros(self.d_out, self.d_out, self.d_aug, self.d_aug)
        full[upper[1], upper[0]] = self.pairs.transpose(1, 2)
        full[upper[0], upper[1]] = self.pairs
        side = self.d_out * self.d_aug
        dense = full.permute(0, 2, 1, 3).reshape(side, side)
        order = self._order()
        return dense[order][:, order]

    def diagonal(self) -> Tensor:
        """The block's diagonal ``(P,)``."""
        upper = torch.triu_indices(self.d_out, self.d_out, device=self.pairs.device)
        on_diagonal = (upper[0] == upper[1]).nonzero().squeeze(1)
        return self.pairs[on_diagonal].diagonal(dim1=1, dim2=2).reshape(-1)[self._order()]

    def decompose(self) -> EigenDecomposition:
        """``eigh`` of the assembled dense block."""
        return decompose_dense(self.to_dense())

    def pairs_from_dense(self, dense: Tensor) -> Tensor:
        """The ``pairs`` state of a dense ``(P, P)`` block in flat-parameter order."""
        side = self.d_out * self.d_aug
        order = self._order()
        full = dense.new_zeros(side, side)
        full[order[:, None], order[None, :]] = dense
        full = full.reshape(self.d_out, self.d_aug, self.d_out, self.d_aug).permute(0, 2, 1, 3)
        upper = torch.triu_indices(self.d_out, self.d_out, device=dense.device)
        return full[upper[0], upper[1]]

    def save(self) -> tuple[dict[str, Any], list[Tensor]]:
        """The layer's shape; the pairs."""
        spec = {
            "names": list(self.names),
            "d_out": self.d_out,
            "weight": self.weight,
            "bias": self.bias,
        }
        return spec, [self.pairs]

    @classmethod
    def restore(cls, spec: dict[str, Any], tensors: list[Tensor]) -> LinearPairsBlock:
        """Inverse of :meth:`save`."""
        return cls(
            tuple(spec["names"]), tensors[0], spec["d_out"], spec["weight"], spec["bias"], False
        )


def _weighted(a: Tensor, weights: Tensor) -> Tensor:
    """``(B, pairs·d_aug)``: each datum's ``ã`` scaled by each of its pair weights."""
    return (weights[:, :, None] * a[:, None, :]).reshape(a.shape[0], -1)


def _one_position(segment: Segment) -> bool:
    """Whether a segment is a linear layer's ``g ⊗ a`` seen once per datum."""
    if isinstance(segment, CurvatureProduct):
        return True
    return isinstance(segment, Product) and segment.positions == 1


def _linear_pairs(plan: Plan) -> LinearPairsBlock | None:
    """The pairs block when the chosen parameters are one linear layer's weight and/or bias,
    each a product seen once per datum (from the same output gradients)."""
    found = [plan.segments.get(name) for name, _ in plan.params]
    if len(found) > 2 or any(f is None or len(f) != 1 for f in found):
        return None
    parts = [f[0] for f in found if f is not None]
    if not all(_one_position(p) and not p.transposed for p in parts):  # type: ignore[attr-defined]
        return None
    products: list[Product | CurvatureProduct] = parts  # type: ignore[assignment]
    if len({id(p.grads) for p in products}) != 1:
        return None
    weights = [p for p in products if p.inputs is not None]
    biases = [p for p in products if p.inputs is None]
    if (
        len(weights) > 1
        or len(biases) > 1
        or (weights and biases and products[0] is not weights[0])
    ):
        return None
    d_out = products[0].d_out
    d_aug = (weights[0].d_in if weights else 0) + int(bool(biases))
    names = tuple(name for name, _ in plan.params)
    pairs = plan.zeros(d_out * (d_out + 1) // 2, d_aug, d_aug)
    return LinearPairsBlock(names, pairs, d_out, bool(weights), bool(biases))


class Full:
    """The exact dense curvature over every chosen parameter (small ``P`` only)."""

    name = "full"
    single_pass = True
    block_types = (DenseBlock, LinearPairsBlock)

    def options(self) -> dict[str, Any]:
        """No options (the size limit is ``Laplace(max_full_params=...)``)."""
        return {}

    def check(self, n_params: int, kind: CurvatureKind, max_dense: int) -> None:
        """Refuse more than ``max_dense`` parameters.

        Raises:
            ValueError: Naming the limit and the alternatives.
        """
        if n_params > max_dense:
            raise ValueError(
                f"structure='full' over {n_params} parameters would need a {n_params}² matrix "
                f"(limit max_full_params={max_dense}); use structure='kron', 'diag' or "
                "'lowrank', or fewer parameters (for example subset='last_layer')."
            )

    def build(self, plan: Plan) -> list[Block]:
        """One dense block (by output pairs for one linear layer)."""
        pairs = _linear_pairs(plan)
        if pairs is not None:
            return [pairs]
        names = tuple(name for name, _ in plan.params)
        sizes = tuple(size for _, size in plan.params)
        return [DenseBlock(names, sizes, plan.zeros(plan.n_params, plan.n_params))]
