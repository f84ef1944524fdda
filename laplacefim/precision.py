"""The posterior precision: scaled curvature plus prior precision."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from laplacefim.structures import BlockDiagonal

# Largest P for which a dense (P, P) matrix is built on request (20,000² float32 ≈ 1.6 GB).
DENSE_LIMIT = 20_000


@dataclass(frozen=True)
class PosteriorPrecision:
    """``scale · F + diag(prior)``, kept in the fitted structure.

    Attributes:
        curvature: The fitted curvature ``F`` (sum over data).
        scale: The likelihood's scale applied to ``F`` (``1 / temperature``).
        prior: Prior precision per parameter ``(P,)``.
    """

    curvature: BlockDiagonal
    scale: float
    prior: Tensor

    @property
    def n_params(self) -> int:
        """Number of parameters ``P``."""
        return self.curvature.numel

    def diagonal(self) -> Tensor:
        """The diagonal of the precision ``(P,)``."""
        return self.scale * self.curvature.diagonal() + self.prior

    def to_dense(self) -> Tensor:
        """The precision as a dense ``(P, P)`` matrix, for small ``P``.

        Raises:
            ValueError: If ``P`` exceeds ``DENSE_LIMIT``.
        """
        if self.n_params > DENSE_LIMIT:
            raise ValueError(
                f"to_dense() would build a {self.n_params} x {self.n_params} matrix; it is "
                f"limited to P <= {DENSE_LIMIT}. Use diagonal(), or work with the structured "
                "posterior_precision.curvature blocks instead."
            )
        dense = self.scale * self.curvature.to_dense()
        return dense + torch.diag(self.prior.to(dense.dtype))
