"""Kronecker-factored block (KFAC): ``(first ⊗ second) / count``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from laplacefim.structures.eigen import CurvatureEigen, KronBasis, symmetric_eigh


def _factor_eigh(factor: Tensor) -> tuple[Tensor, Tensor | None]:
    if factor.ndim == 1:
        return factor.clamp_min(0), None
    return symmetric_eigh(factor)


def _as_matrix(factor: Tensor) -> Tensor:
    return torch.diag(factor) if factor.ndim == 1 else factor


@dataclass
class KronBlock:
    """A Kronecker-factored curvature block of one weight tensor.

    The block is ``kron(first, second) / count``, matching the row-major flattening of the
    weight. For ``nn.Linear`` and ``nn.Conv2d``, ``first = Σ g gᵀ`` (output gradients) and
    ``second = Σ a aᵀ`` (inputs); for ``nn.Embedding``, ``first = diag(token counts)`` and
    ``second = Σ g gᵀ``. ``count`` is the number of (datum, position) rows summed, so both
    factors are sums and the block is invariant to how the data are split into batches.

    Attributes:
        first: First factor, ``(m, m)``, or ``(m,)`` when diagonal.
        second: Second factor, ``(n, n)``, or ``(n,)`` when diagonal.
        count: Number of rows summed, a 0-d tensor.
    """

    first: Tensor
    second: Tensor
    count: Tensor

    @property
    def numel(self) -> int:
        """Number of parameters the block covers."""
        return self.first.shape[0] * self.second.shape[0]

    def state(self) -> list[Tensor]:
        """Tensors that add up over batches and ranks."""
        return [self.first, self.second, self.count]

    def to_dense(self) -> Tensor:
        """The block as a dense ``(m·n, m·n)`` matrix."""
        return torch.kron(_as_matrix(self.first), _as_matrix(self.second)) / self.count.clamp_min(1)

    def decompose(self) -> CurvatureEigen:
        """Eigen-decomposition of both factors; eigenvalues ``λ₁ ⊗ λ₂ / count``."""
        first, q_first = _factor_eigh(self.first)
        second, q_second = _factor_eigh(self.second)
        values = torch.outer(first, second).reshape(-1) / self.count.clamp_min(1)
        shape = (self.first.shape[0], self.second.shape[0])
        return CurvatureEigen(values, KronBasis(q_first, q_second, shape))

    def diagonal(self) -> Tensor:
        """The block's diagonal ``(m·n,)``, without building the block."""
        first = self.first if self.first.ndim == 1 else self.first.diagonal()
        second = self.second if self.second.ndim == 1 else self.second.diagonal()
        return torch.outer(first, second).reshape(-1) / self.count.clamp_min(1)
