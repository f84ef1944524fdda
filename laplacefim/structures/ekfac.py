"""``structure="ekfac"``: eigenvalue-corrected KFAC (George et al., NeurIPS 2018).

A first pass over the data fits the Kronecker factors as KFAC does; their eigenbases
``Q₁ ⊗ Q₂`` are kept, and a second pass re-fits the eigenvalues exactly in that basis:
``λ = Σₙ Σ_v ((Q₁ ⊗ Q₂)ᵀ u_{n,v})²``, the diagonal of the exact curvature block projected
onto the basis. Among all matrices diagonal in that basis it is the closest to the exact
block in Frobenius norm, so it is never further from it than KFAC is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from laplacefim.curvature.segments import Segment
from laplacefim.options import CurvatureKind, KfacApprox
from laplacefim.structures.base import Block, Plan, SegmentMap
from laplacefim.structures.eigen import EigenDecomposition, KronBasis
from laplacefim.structures.kron import KronBlock, factor_eigh, kron_blocks


class Shared:
    """What the EKFAC blocks of one fit share: the eigendecompositions of equal factors (a
    weight and its bias have the same output factor) and, within a batch, the rotated
    output gradients (so a layer's gradients are rotated once)."""

    def __init__(self) -> None:
        self.factors: list[tuple[Tensor, tuple[Tensor, Tensor | None]]] = []
        self.rotated: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.batch: int | None = None

    def eigh(self, factor: Tensor) -> tuple[Tensor, Tensor | None]:
        """:func:`factor_eigh`, once per distinct factor."""
        for seen, found in self.factors:
            if seen.shape == factor.shape and torch.equal(seen, factor):
                return found
        found = factor_eigh(factor)
        self.factors.append((factor, found))
        return found

    def rotate(self, x: Tensor, q: Tensor) -> Tensor:
        """``x @ q``, once per batch for each pair; ``x`` is kept with the product, so that
        its id cannot be reused by another tensor (a bias's temporary ones) in the batch."""
        key = (id(x), id(q))
        if key not in self.rotated:
            self.rotated[key] = (x, x @ q)
        return self.rotated[key][1]

    def start_batch(self, segments: SegmentMap) -> None:
        """Forget the previous batch's products when a new batch comes."""
        if self.batch != id(segments):
            self.batch, self.rotated = id(segments), {}


@dataclass
class EKFACBlock:
    """A Kronecker eigenbasis with re-fitted eigenvalues.

    Attributes:
        kron: The KFAC factors of the first pass (released once the basis is known).
        shared: Decompositions and rotations shared with the fit's other EKFAC blocks.
        basis: ``Q₁ ⊗ Q₂``, after the first pass.
        values: The eigenvalues in that basis, summed over the second pass.
    """

    kron: KronBlock
    shared: Shared = field(default_factory=Shared, repr=False)
    basis: KronBasis | None = None
    values: Tensor | None = None
    active: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        """The parameter the block covers."""
        return self.kron.names

    @property
    def numel(self) -> int:
        """Number of parameters covered."""
        return self.kron.numel if self.values is None else self.values.numel()

    def statistics(self, segments: SegmentMap, *, inputs: bool = True) -> Sequence[Tensor | None]:
        """First pass: the KFAC factors; second: squared coordinates in the basis."""
        if self.basis is None or self.values is None:
            return self.kron.statistics(segments, inputs=inputs)
        segment = self.kron.segment(segments)
        if segment is None:
            return [torch.zeros_like(self.values)]
        self.shared.start_batch(segments)
        rotated = segment.rotated(self.basis.first, self.basis.second, self.shared.rotate)
        return [rotated.diag()]

    def covered(self, segments: SegmentMap) -> list[Segment] | None:
        """The one segment."""
        return self.kron.covered(segments)

    def state(self) -> list[Tensor]:
        """The factors in the first pass, the eigenvalues after."""
        return self.kron.state() if self.values is None else [self.values]

    def end_pass(self) -> None:
        """After the first pass, decompose the factors; after the second, done."""
        if self.basis is not None:
            self.active = False
            return
        _, _, self.basis = self.kron.basis(self.shared.eigh)
        self.values = torch.zeros(
            self.kron.numel, dtype=self.kron.first.dtype, device=self.kron.first.device
        )
        self.kron = KronBlock(
            self.kron.names, self.kron.index, *_empty(self.kron), self.kron.approx, False
        )

    def _fitted(self) -> tuple[KronBasis, Tensor]:
        if self.basis is None or self.values is None:
            raise RuntimeError("the EKFAC block has not seen its second pass over the data.")
        return self.basis, self.values

    def to_dense(self) -> Tensor:
        """``Q diag(λ) Qᵀ``."""
        basis, values = self._fitted()
        eye = torch.eye(values.numel(), dtype=values.dtype, device=values.device)
        return basis.from_basis(basis.to_basis(eye) * values)

    def diagonal(self) -> Tensor:
        """``diag(Q diag(λ) Qᵀ)``."""
        basis, values = self._fitted()
        return basis.squared(values)

    def decompose(self) -> EigenDecomposition:
        """The re-fitted eigenvalues in the Kronecker basis."""
        basis, values = self._fitted()
        return EigenDecomposition(values.clamp_min(0), basis)

    def save(self) -> tuple[dict[str, Any], list[Tensor]]:
        """Where it reads from; the bases (empty for an identity) and eigenvalues."""
        basis, values = self._fitted()
        empty = values.new_zeros(0)
        spec = {
            "names": list(self.names),
            "index": self.kron.index,
            "approx": self.kron.approx.value,
            "shape": list(basis.shape),
        }
        tensors = [empty if q is None else q for q in (basis.first, basis.second)]
        return spec, [*tensors, values]

    @classmethod
    def restore(cls, spec: dict[str, Any], tensors: list[Tensor]) -> EKFACBlock:
        """Inverse of :meth:`save`."""
        first, second, values = tensors
        shape = (spec["shape"][0], spec["shape"][1])
        basis = KronBasis(
            first if first.numel() else None, second if second.numel() else None, shape
        )
        kron = KronBlock(
            tuple(spec["names"]),
            spec["index"],
            *_empty_like(values),
            KfacApprox(spec["approx"]),
            False,
        )
        return cls(kron, Shared(), basis, values, active=False)


def _empty(kron: KronBlock) -> tuple[Tensor, Tensor, Tensor]:
    return _empty_like(kron.count)


def _empty_like(like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return like.new_zeros(0), like.new_zeros(0), like.new_zeros(())


class EKFAC:
    """Eigenvalue-corrected KFAC; two passes over the data (the loader must be re-iterable)."""

    name = "ekfac"
    single_pass = False
    block_types = (EKFACBlock,)

    def options(self) -> dict[str, Any]:
        """No options (the flavour is ``Laplace(kfac_approx=...)``)."""
        return {}

    def check(self, n_params: int, kind: CurvatureKind, max_dense: int) -> None:
        """Every fit is accepted."""

    def build(self, plan: Plan) -> list[Block]:
        """KFAC's layout, each Kronecker block wrapped for its eigenvalue correction."""
        shared = Shared()
        return kron_blocks(plan, lambda kron: EKFACBlock(kron, shared))
