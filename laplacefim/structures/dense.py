"""Dense block: the full curvature matrix of a group of parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from laplacefim.structures.eigen import CurvatureEigen, DenseBasis, symmetric_eigh


def decompose_dense(matrix: Tensor) -> CurvatureEigen:
    """Eigen-decomposition of a dense PSD block, keeping the matrix for varying priors."""
    values, vectors = symmetric_eigh(matrix)
    return CurvatureEigen(values, DenseBasis(vectors), matrix.clone())


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

    def decompose(self) -> CurvatureEigen:
        """Eigen-decomposition of the dense block."""
        return decompose_dense(self.matrix)


@dataclass
class LinearDenseBlock:
    """The exact dense block of one ``nn.Linear`` layer, stored by output pairs.

    For per-sample gradients ``g ⊗ ã`` (``ã`` the input, with a trailing 1 when the bias is
    covered), the block is ``Σₙ Mₙ ⊗ ãₙãₙᵀ`` with ``Mₙ = Σ_v g gᵀ``. Only the pairs
    ``o ≤ p`` of output indices are stored: ``pairs[k] = Σₙ Mₙ[o_k, p_k] ãₙãₙᵀ``, which
    halves the work of the fit; :meth:`to_dense` assembles the ``(P, P)`` matrix with the
    weight (row-major) before the bias.

    Attributes:
        pairs: ``(d_out (d_out + 1) / 2, d_aug, d_aug)``, summed over data.
        d_out: Output size of the layer.
        weight: Whether the weight is covered.
        bias: Whether the bias is covered.
    """

    pairs: Tensor
    d_out: int
    weight: bool
    bias: bool

    @property
    def d_aug(self) -> int:
        """Length of ``ã``."""
        return self.pairs.shape[-1]

    @property
    def numel(self) -> int:
        """Number of parameters the block covers."""
        d_in = self.d_aug - int(self.bias)
        return self.d_out * (d_in * int(self.weight) + int(self.bias))

    def state(self) -> list[Tensor]:
        """Tensors that add up over batches and ranks."""
        return [self.pairs]

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

    def decompose(self) -> CurvatureEigen:
        """Eigen-decomposition of the assembled dense block."""
        return decompose_dense(self.to_dense())

    @staticmethod
    def pairs_from_dense(dense: Tensor, d_out: int, d_aug: int, order: Tensor) -> Tensor:
        """The ``pairs`` state of a dense ``(P, P)`` block in flat-parameter order."""
        side = d_out * d_aug
        full = dense.new_zeros(side, side)
        full[order[:, None], order[None, :]] = dense
        full = full.reshape(d_out, d_aug, d_out, d_aug).permute(0, 2, 1, 3)
        upper = torch.triu_indices(d_out, d_out, device=dense.device)
        return full[upper[0], upper[1]]
