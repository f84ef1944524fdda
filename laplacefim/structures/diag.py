"""``structure="diag"``: the exact diagonal of the curvature, one block per parameter tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from laplacefim.curvature.segments import Segment
from laplacefim.options import CurvatureKind
from laplacefim.structures.base import Block, Plan, SegmentMap, gather, whole
from laplacefim.structures.eigen import EigenDecomposition, IdentityBasis


@dataclass
class DiagBlock:
    """A diagonal curvature block over one or more whole parameters.

    Attributes:
        names: The parameters, in flat order.
        sizes: Their sizes.
        diag: The diagonal entries ``(p,)``, summed over data.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    diag: Tensor
    active: bool = True

    @property
    def numel(self) -> int:
        """Number of parameters covered."""
        return self.diag.numel()

    def statistics(self, segments: SegmentMap, *, inputs: bool = True) -> list[Tensor]:
        """``Σ_{v,b} u²`` of the batch."""
        found = gather(segments, self.names, self.sizes, lambda s: s.diag())
        return [torch.zeros_like(self.diag) if found is None else found]

    def accumulate_(self, segments: SegmentMap, *, inputs: bool = True) -> None:
        """Add the batch's ``Σ_{v,b} u²`` to the entries in place, a segment at a time (no
        concatenation per parameter and per block)."""
        start = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            offset = start
            for segment in segments.get(name) or ():
                part = segment.diag()
                self.diag[offset : offset + part.shape[-1]].add_(part)
                offset += part.shape[-1]
            start += size

    def covered(self, segments: SegmentMap) -> list[Segment] | None:
        """Every segment of the block's parameters."""
        return whole(segments, self.names, self.sizes)

    def state(self) -> list[Tensor]:
        """``[diag]``."""
        return [self.diag]

    def end_pass(self) -> None:
        """One pass suffices."""
        self.active = False

    def to_dense(self) -> Tensor:
        """``diag(diag)``."""
        return torch.diag(self.diag)

    def diagonal(self) -> Tensor:
        """The entries."""
        return self.diag

    def decompose(self) -> EigenDecomposition:
        """(A copy of) the entries, in the standard basis."""
        return EigenDecomposition(self.diag.clone(), IdentityBasis(self.numel))

    def save(self) -> tuple[dict[str, Any], list[Tensor]]:
        """Names and sizes; the entries."""
        return {"names": list(self.names), "sizes": list(self.sizes)}, [self.diag]

    @classmethod
    def restore(cls, spec: dict[str, Any], tensors: list[Tensor]) -> DiagBlock:
        """Inverse of :meth:`save`."""
        return cls(tuple(spec["names"]), tuple(spec["sizes"]), tensors[0], active=False)


def diag_block(name: str, size: int, plan: Plan) -> DiagBlock:
    """A zero diagonal block over one parameter."""
    return DiagBlock((name,), (size,), plan.zeros(size))


class Diagonal:
    """Exact diagonal of the curvature: ``Σₙ Σ_v (Jₙᵀ s_v)²`` per parameter."""

    name = "diag"
    single_pass = True
    block_types = (DiagBlock,)

    def options(self) -> dict[str, Any]:
        """No options."""
        return {}

    def check(self, n_params: int, kind: CurvatureKind, max_dense: int) -> None:
        """Every fit is accepted."""

    def build(self, plan: Plan) -> list[Block]:
        """One diagonal block per parameter tensor."""
        return [diag_block(name, size, plan) for name, size in plan.params]
