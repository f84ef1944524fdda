"""Diagonal block: one curvature value per parameter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from laplacefim.structures.eigen import CurvatureEigen, IdentityBasis


@dataclass
class DiagBlock:
    """A diagonal curvature block.

    Attributes:
        diag: The diagonal entries ``(p,)``, summed over data.
    """

    diag: Tensor

    @property
    def numel(self) -> int:
        """Number of parameters the block covers."""
        return self.diag.numel()

    def state(self) -> list[Tensor]:
        """Tensors that add up over batches and ranks."""
        return [self.diag]

    def to_dense(self) -> Tensor:
        """The block as a dense ``(p, p)`` matrix."""
        return torch.diag(self.diag)

    def diagonal(self) -> Tensor:
        """The block's diagonal ``(p,)``."""
        return self.diag

    def decompose(self) -> CurvatureEigen:
        """Eigen-decomposition: (a copy of) the entries, in the standard basis."""
        return CurvatureEigen(self.diag.clone(), IdentityBasis(self.numel))
