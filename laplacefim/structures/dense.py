"""Dense block: the full curvature matrix of a group of parameters."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class DenseBlock:
    """A dense curvature block.

    Attributes:
        matrix: The block ``(p, p)``, summed over data.
    """

    matrix: Tensor

    @property
    def numel(self) -> int:
        """Number of parameters the block covers."""
        return self.matrix.shape[0]

    def state(self) -> list[Tensor]:
        """Tensors that add up over batches and ranks."""
        return [self.matrix]

    def to_dense(self) -> Tensor:
        """The block as a dense ``(p, p)`` matrix."""
        return self.matrix

    def diagonal(self) -> Tensor:
        """The block's diagonal ``(p,)``."""
        return self.matrix.diagonal()
