"""``structure="kron"`` (KFAC): a Kronecker block per factorisable segment.

Each weight used as ``Σ_t g_t a_tᵀ`` (Linear, Conv2d, attention projections, recurrent
weights) gets ``(G ⊗ A) / count`` with ``G = Σ g gᵀ``, ``A = Σ a aᵀ`` over rows; a bias
gets ``G`` (the same form with ``A = count``); an embedding ``(diag(token counts) ⊗ G) /
count``. A parameter with no Kronecker form (norm scales, custom layers, tied weights)
gets its exact diagonal, so every parameter the engine accounts for works with every
structure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from laplacefim.curvature.segments import Segment
from laplacefim.options import CurvatureKind, KfacApprox
from laplacefim.structures.base import (
    Block,
    Plan,
    SegmentMap,
    add_statistics,
    for_part,
    zeros_like,
)
from laplacefim.structures.diag import diag_block
from laplacefim.structures.eigen import EigenDecomposition, KronBasis, symmetric_eigh


def factor_eigh(factor: Tensor) -> tuple[Tensor, Tensor | None]:
    """Eigenvalues and basis of a factor; a diagonal factor ``(m,)`` keeps the identity."""
    if factor.ndim == 1:
        return factor.clamp_min(0), None
    return symmetric_eigh(factor)


def _as_matrix(factor: Tensor) -> Tensor:
    return torch.diag(factor) if factor.ndim == 1 else factor


@dataclass
class KronBlock:
    """A Kronecker-factored block ``kron(first, second) / count`` of one segment.

    Attributes:
        names: The one parameter the segment belongs to.
        index: Which of its segments.
        first: First factor ``(m, m)``, or ``(m,)`` when diagonal.
        second: Second factor ``(n, n)``, or ``(n,)`` when diagonal.
        count: Rows summed into the factors, 0-d; both factors are sums, so the block does
            not depend on how the data are split into batches.
        approx: The flavour for weights shared over positions.
    """

    names: tuple[str, ...]
    index: int
    first: Tensor
    second: Tensor
    count: Tensor
    approx: KfacApprox = KfacApprox.EXPAND
    active: bool = True

    @property
    def numel(self) -> int:
        """Number of parameters covered."""
        return self.first.shape[0] * self.second.shape[0]

    def segment(self, segments: SegmentMap) -> Segment | None:
        """The block's segment of a batch, or None if its module did not run."""
        found = segments.get(self.names[0])
        return None if found is None else found[self.index]

    def covered(self, segments: SegmentMap) -> list[Segment] | None:
        """The one segment."""
        segment = self.segment(segments)
        return None if segment is None else [segment]

    def statistics(self, segments: SegmentMap, *, inputs: bool = True) -> Sequence[Tensor | None]:
        """The batch's ``[first, second, count]`` (the input factor and count None where
        ``inputs`` is False)."""
        segment = self.segment(segments)
        factors = None if segment is None else for_part(segment.kron, self.approx, inputs=inputs)
        return zeros_like(self.state()) if factors is None else factors

    def state(self) -> list[Tensor]:
        """``[first, second, count]``."""
        return [self.first, self.second, self.count]

    def accumulate_(self, segments: SegmentMap, *, inputs: bool = True) -> None:
        """Add the batch's factors to the state, in place where the segment can form them
        there (a convolution's input factor: no fresh factor per batch)."""
        segment = self.segment(segments)
        into = getattr(segment, "kron_into", None)
        if into is None or not for_part(into, self.approx, self.state(), inputs=inputs):
            add_statistics(self, segments, inputs=inputs)

    def end_pass(self) -> None:
        """One pass suffices."""
        self.active = False

    def to_dense(self) -> Tensor:
        """The block as a dense ``(m·n, m·n)`` matrix."""
        kron = torch.kron(_as_matrix(self.first), _as_matrix(self.second))
        return kron / self.count.clamp_min(1)

    def diagonal(self) -> Tensor:
        """The diagonal ``(m·n,)``, without the Kronecker product."""
        first = self.first if self.first.ndim == 1 else self.first.diagonal()
        second = self.second if self.second.ndim == 1 else self.second.diagonal()
        return torch.outer(first, second).reshape(-1) / self.count.clamp_min(1)

    def basis(
        self, eigh: Callable[[Tensor], tuple[Tensor, Tensor | None]] = factor_eigh
    ) -> tuple[Tensor, Tensor, KronBasis]:
        """Both factors' eigenvalues and the Kronecker eigenbasis (``eigh`` decomposes a
        factor; a caller may share decompositions between blocks)."""
        first, q_first = eigh(self.first)
        second, q_second = eigh(self.second)
        shape = (self.first.shape[0], self.second.shape[0])
        return first, second, KronBasis(q_first, q_second, shape)

    def decompose(self) -> EigenDecomposition:
        """Eigenvalues ``λ₁ ⊗ λ₂ / count`` in the basis ``Q₁ ⊗ Q₂``."""
        first, second, basis = self.basis()
        values = torch.outer(first, second).reshape(-1) / self.count.clamp_min(1)
        return EigenDecomposition(values, basis)

    def save(self) -> tuple[dict[str, Any], list[Tensor]]:
        """Where it reads from and its flavour; the factors."""
        spec = {"names": list(self.names), "index": self.index, "approx": self.approx.value}
        return spec, [self.first, self.second, self.count]

    @classmethod
    def restore(cls, spec: dict[str, Any], tensors: list[Tensor]) -> KronBlock:
        """Inverse of :meth:`save`."""
        first, second, count = tensors
        return cls(
            tuple(spec["names"]),
            spec["index"],
            first,
            second,
            count,
            KfacApprox(spec["approx"]),
            False,
        )


def kron_blocks(
    plan: Plan, wrap: Callable[[KronBlock], Block] = lambda block: block
) -> list[Block]:
    """A Kronecker block (``wrap``-ped) per segment of a parameter whose segments all
    factorise, a diagonal block per other parameter."""
    out: list[Block] = []
    for name, size in plan.params:
        segments = plan.segments.get(name)
        factors = [s.kron(plan.approx) for s in segments] if segments else [None]
        if any(f is None for f in factors):
            out.append(diag_block(name, size, plan))
            continue
        for index, found in enumerate(factors):
            first, second, count = zeros_like(found)  # type: ignore[arg-type]
            out.append(wrap(KronBlock((name,), index, first, second, count, plan.approx)))
    return out


class Kron:
    """KFAC: a Kronecker block per weight (and bias) a rule factorises; exact diagonal
    elsewhere."""

    name = "kron"
    single_pass = True
    block_types = (KronBlock,)

    def options(self) -> dict[str, Any]:
        """No options (the flavour is ``Laplace(kfac_approx=...)``)."""
        return {}

    def check(self, n_params: int, kind: CurvatureKind, max_dense: int) -> None:
        """Every fit is accepted."""

    def build(self, plan: Plan) -> list[Block]:
        """Kronecker blocks where the segments factorise."""
        return kron_blocks(plan)
