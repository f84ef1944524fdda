"""The posterior over the flat chosen parameters as a pyro distribution."""

from __future__ import annotations

import math

import torch
from pyro.distributions import MultivariateNormal, Normal, TorchDistribution, constraints
from torch import Tensor

from laplacefim.structures.base import Precision


class BlockDiagonalNormal(TorchDistribution):
    """``N(loc, Σ)`` with a block-diagonal precision, each block decomposed (Kronecker, dense,
    diagonal or low-rank plus diagonal), so that sampling, densities and entropy cost about
    O(P) after the decomposition.

    Args:
        loc: The mean ``(P,)``.
        blocks: Decomposed precision blocks laid along ``loc``, in order.

    Example:
        >>> posterior = la.posterior          # for structure="kron"
        >>> theta = posterior.rsample((10,))  # (10, P)
    """

    arg_constraints = {"loc": constraints.real_vector}  # noqa: RUF012 (pyro API)
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, blocks: list[Precision], validate_args: bool | None = None):
        self.loc = loc
        self.blocks = blocks
        self.sizes = [block.numel for block in blocks]
        if sum(self.sizes) != loc.shape[-1]:
            raise ValueError(f"blocks cover {sum(self.sizes)} values but loc has {loc.shape[-1]}.")
        super().__init__(torch.Size(), torch.Size([loc.shape[-1]]), validate_args=validate_args)

    @property
    def mean(self) -> Tensor:
        """The mean ``(P,)``."""
        return self.loc

    @property
    def variance(self) -> Tensor:
        """Marginal variances ``(P,)``."""
        return torch.cat([block.covariance_diagonal() for block in self.blocks])

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = ()) -> Tensor:
        """Reparametrised samples ``(*sample_shape, P)``."""
        shape = torch.Size(sample_shape) + self.event_shape
        z = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self._from_standard(z)

    def _from_standard(self, z: Tensor) -> Tensor:
        parts = z.split(self.sizes, dim=-1)
        return torch.cat([b.sample(p) for b, p in zip(self.blocks, parts, strict=True)], dim=-1)

    def log_prob(self, value: Tensor) -> Tensor:
        """Log density at ``value`` ``(..., P)``."""
        parts = (value - self.loc).split(self.sizes, dim=-1)
        quad = torch.stack([b.quad(p) for b, p in zip(self.blocks, parts, strict=True)]).sum(0)
        n = self.loc.shape[-1]
        return 0.5 * (self._logdet() - quad - n * math.log(2 * math.pi))

    def _logdet(self) -> Tensor:
        return torch.stack([b.logdet() for b in self.blocks]).sum()

    def entropy(self) -> Tensor:
        """Differential entropy ``½ (P (1 + log 2π) − log det P)``."""
        n = self.loc.shape[-1]
        return 0.5 * (n * (1.0 + math.log(2 * math.pi)) - self._logdet())

    @property
    def precision_matrix(self) -> Tensor:
        """Dense precision ``(P, P)`` (small P only)."""
        return torch.block_diag(*(block.to_dense() for block in self.blocks))

    @property
    def covariance_matrix(self) -> Tensor:
        """Dense covariance ``(P, P)`` (small P only)."""
        return torch.block_diag(*(block.covariance() for block in self.blocks))


def posterior_distribution(loc: Tensor, blocks: list[Precision]) -> TorchDistribution:
    """The posterior as the plainest pyro distribution that fits its blocks.

    Diagonal blocks only: ``Normal(loc, σ).to_event(1)``; one dense block:
    ``MultivariateNormal``; otherwise :class:`BlockDiagonalNormal`.
    """
    if all(block.elementwise for block in blocks):
        scale = torch.cat([block.covariance_diagonal() for block in blocks]).sqrt()
        return Normal(loc, scale).to_event(1)
    if len(blocks) == 1 and blocks[0].dense:
        return MultivariateNormal(loc, precision_matrix=blocks[0].to_dense())
    return BlockDiagonalNormal(loc, blocks)
