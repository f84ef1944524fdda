"""Block-diagonal curvature: the container every structure accumulates into."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from laplacefim.structures.dense import DenseBlock, LinearDenseBlock
from laplacefim.structures.diag import DiagBlock
from laplacefim.structures.kron import KronBlock

Block = DiagBlock | DenseBlock | LinearDenseBlock | KronBlock


@dataclass
class BlockDiagonal:
    """Curvature blocks laid along the flat parameter vector, in order.

    ``structure="full"`` is one dense block (a :class:`LinearDenseBlock` when the chosen
    parameters are those of one ``nn.Linear`` layer, as for the last layer); ``"diag"`` one
    diagonal block per parameter tensor; ``"kron"`` one Kronecker block per Linear, Conv2d
    or Embedding weight, a dense block per bias and a diagonal block per other parameter.
    Every block's state is a list of tensors that add up over batches (and over ranks).

    Attributes:
        blocks: The blocks, in flat-parameter order.
    """

    blocks: list[Block]

    @property
    def numel(self) -> int:
        """Number of parameters covered."""
        return sum(block.numel for block in self.blocks)

    def state(self) -> list[Tensor]:
        """All state tensors, block after block."""
        return [tensor for block in self.blocks for tensor in block.state()]

    def add_(self, contributions: Sequence[Tensor]) -> BlockDiagonal:
        """Add tensors laid out as :meth:`state` (one batch's statistics) in place."""
        state = self.state()
        if len(contributions) != len(state):
            raise ValueError(
                f"expected {len(state)} tensors laid out as state(), got {len(contributions)}."
            )
        for total, part in zip(state, contributions, strict=True):
            total.add_(part.to(total.dtype))
        return self

    def scale_(self, factor: float) -> BlockDiagonal:
        """Multiply every block by ``factor`` in place (each state tensor scales alike)."""
        for tensor in self.state():
            tensor.mul_(factor)
        return self

    def to_dense(self) -> Tensor:
        """The whole curvature as a dense ``(P, P)`` matrix."""
        return torch.block_diag(*(block.to_dense() for block in self.blocks))

    def diagonal(self) -> Tensor:
        """The diagonal ``(P,)``."""
        return torch.cat([block.diagonal() for block in self.blocks])

    def clone(self) -> BlockDiagonal:
        """A deep copy whose tensors share no memory with this one."""
        return copy.deepcopy(self)
