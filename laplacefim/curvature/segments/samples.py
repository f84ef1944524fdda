"""Per-sample gradients given as they are (any module, via ``torch.func``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from laplacefim.curvature.segments.base import Rotate, cast, gram_of, matmul
from laplacefim.options import KfacApprox


@dataclass(frozen=True)
class Samples:
    """Per-sample gradients given as they are.

    Attributes:
        grads: ``(V, B, p)``.
    """

    grads: Tensor

    @property
    def size(self) -> int:
        """Number of parameters covered."""
        return self.grads.shape[2]

    @property
    def n_columns(self) -> int:
        """``V``."""
        return self.grads.shape[0]

    @property
    def batch(self) -> int:
        """``B``."""
        return self.grads.shape[1]

    def to(self, dtype: torch.dtype, memo: dict[int, Tensor]) -> Samples:
        """Cast to ``dtype``."""
        return Samples(cast(self.grads, dtype, memo))

    def per_sample(self) -> Tensor:
        """``u`` itself."""
        return self.grads

    def diag(self) -> Tensor:
        """``Σ_{v,b} u²``."""
        return self.grads.square().sum((0, 1))

    def kron(self, approx: KfacApprox, *, inputs: bool = True) -> list[Tensor | None] | None:
        """None: per-sample gradients have no Kronecker factorisation."""
        return None

    def rotated(
        self, first: Tensor | None, second: Tensor | None, rotate: Rotate = matmul
    ) -> Samples:
        """Not applicable (no Kronecker block is built on per-sample gradients)."""
        raise ValueError("per-sample gradients have no Kronecker basis to rotate into.")

    def gram(self, weights: Tensor) -> Tensor:
        """Weighted Gram matrices per datum."""
        return gram_of(self.grads, weights)

    def gram_diagonal(self, weights: Tensor) -> Tensor:
        """``Σ_p u² weights``: ``(B, V)``."""
        return torch.einsum("vbp,p->bv", self.grads.square(), weights)

    def dots(self, vectors: Tensor) -> Tensor:
        """``uᵀX``."""
        return torch.einsum("vbp,kp->vbk", self.grads, vectors)

    def combine(self, coefficients: Tensor) -> Tensor:
        """``Σ c u``."""
        return torch.einsum("vbk,vbp->kp", coefficients, self.grads)

    def total(self) -> Tensor:
        """``Σ_b u``."""
        return self.grads.sum(1)

    def tensors(self) -> list[Tensor]:
        """The tensors the segment holds."""
        return [self.grads]
