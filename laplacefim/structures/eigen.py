"""Decomposed blocks: ``Q diag(λ) Qᵀ`` once, then any prior is a cheap shift of ``λ``.

A fitted block decomposes once into eigenvalues and a basis (identity for a diagonal
block, a dense ``Q`` for a dense block, ``Q₁ ⊗ Q₂`` for a Kronecker block). Adding a prior
``δ`` that is constant on the block, or any per-parameter prior when the basis is the
identity, only shifts the eigenvalues: ``scale·λ + δ``. That makes the log-determinant,
solves and samples cost O(p) per prior value after the decomposition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class IdentityBasis:
    """The standard basis of ``p`` parameters."""

    p: int

    def to_basis(self, v: Tensor) -> Tensor:
        """Coordinates ``Qᵀv`` of row vectors ``(..., p)``."""
        return v

    def from_basis(self, w: Tensor) -> Tensor:
        """Vectors ``Qw`` from coordinates ``(..., p)``."""
        return w


@dataclass(frozen=True)
class DenseBasis:
    """An orthonormal basis ``Q`` ``(p, p)``, eigenvectors in columns."""

    q: Tensor

    def to_basis(self, v: Tensor) -> Tensor:
        """Coordinates ``Qᵀv`` of row vectors ``(..., p)``."""
        return v @ self.q

    def from_basis(self, w: Tensor) -> Tensor:
        """Vectors ``Qw`` from coordinates ``(..., p)``."""
        return w @ self.q.T


@dataclass(frozen=True)
class KronBasis:
    """The basis ``Q₁ ⊗ Q₂`` of a ``(m, n)`` weight; ``None`` stands for the identity."""

    first: Tensor | None
    second: Tensor | None
    shape: tuple[int, int]

    def _apply(self, v: Tensor, transpose: bool) -> Tensor:
        m, n = self.shape
        x = v.reshape(*v.shape[:-1], m, n)
        if self.first is not None:
            q = self.first if transpose else self.first.T
            x = torch.einsum("mi,...mn->...in", q, x)
        if self.second is not None:
            q = self.second if transpose else self.second.T
            x = x @ q
        return x.reshape(v.shape)

    def to_basis(self, v: Tensor) -> Tensor:
        """Coordinates ``(Q₁ ⊗ Q₂)ᵀv`` of row vectors ``(..., m·n)``."""
        return self._apply(v, transpose=True)

    def from_basis(self, w: Tensor) -> Tensor:
        """Vectors ``(Q₁ ⊗ Q₂)w`` from coordinates ``(..., m·n)``."""
        return self._apply(w, transpose=False)


Basis = IdentityBasis | DenseBasis | KronBasis


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0, they belong to a PSD matrix) and eigenvectors."""
    values, vectors = torch.linalg.eigh(matrix)
    return values.clamp_min(0), vectors


@dataclass(frozen=True)
class CurvatureEigen:
    """A fitted curvature block, decomposed: ``basis · diag(eigenvalues) · basisᵀ``.

    Attributes:
        eigenvalues: ``(p,)`` eigenvalues of the curvature block (before scale and prior).
        basis: The eigenbasis.
        matrix: The dense block, kept for dense blocks only, to absorb a prior that varies
            within the block (which no longer commutes with the basis).
    """

    eigenvalues: Tensor
    basis: Basis
    matrix: Tensor | None = None

    def with_prior(self, scale: Tensor | float, prior: Tensor) -> PrecisionEigen:
        """The precision ``scale·F + diag(prior)`` of this block, decomposed.

        Args:
            scale: Factor on the curvature (``1/T``, and the noise for regression).
            prior: A 0-d prior precision, or one value per parameter ``(p,)``.

        Returns:
            The decomposed precision block; O(p) unless a per-parameter prior meets a dense
            block, which needs one new eigendecomposition.

        Raises:
            ValueError: If a per-parameter prior meets a Kronecker block.
        """
        # Computed in the prior's dtype (the evidence passes float64): a 0-d prior alone
        # would not promote float32 eigenvalues, and their log-sum must not lose digits.
        eigenvalues = self.eigenvalues.to(prior.dtype)
        if prior.ndim == 0 or isinstance(self.basis, IdentityBasis):
            return PrecisionEigen(scale * eigenvalues + prior, self.basis)
        if self.matrix is not None:
            matrix = self.matrix.to(prior.dtype)
            values, vectors = torch.linalg.eigh(scale * matrix + torch.diag(prior))
            return PrecisionEigen(values, DenseBasis(vectors))
        raise ValueError(
            "a prior precision that varies within a Kronecker-factored block cannot be "
            "absorbed in its eigenbasis; use prior_structure='scalar' or 'layerwise' with "
            "structure='kron', or structure='diag' / 'full' for a per-parameter prior."
        )


@dataclass(frozen=True)
class PrecisionEigen:
    """A decomposed posterior-precision block ``basis · diag(values) · basisᵀ``."""

    values: Tensor
    basis: Basis

    def to(self, dtype: torch.dtype) -> PrecisionEigen:
        """The same block with its eigenvalues and basis in ``dtype``."""
        basis: Basis = self.basis
        if isinstance(basis, DenseBasis):
            basis = DenseBasis(basis.q.to(dtype))
        elif isinstance(basis, KronBasis):
            first = None if basis.first is None else basis.first.to(dtype)
            second = None if basis.second is None else basis.second.to(dtype)
            basis = KronBasis(first, second, basis.shape)
        return PrecisionEigen(self.values.to(dtype), basis)

    def logdet(self) -> Tensor:
        """``log det`` of the precision block."""
        return self.values.log().sum()

    def solve(self, v: Tensor) -> Tensor:
        """Covariance times row vectors ``(..., p)``: ``Σv``."""
        return self.basis.from_basis(self.basis.to_basis(v) / self.values)

    def quad(self, v: Tensor) -> Tensor:
        """``vᵀ P v`` for row vectors ``(..., p)``."""
        return (self.basis.to_basis(v).square() * self.values).sum(-1)

    def sample(self, z: Tensor) -> Tensor:
        """Map standard normal rows ``(..., p)`` to ``N(0, Σ)`` draws."""
        return self.basis.from_basis(z / self.values.sqrt())

    def covariance_diagonal(self) -> Tensor:
        """The diagonal of the covariance ``(p,)``, without building it."""
        inverse = 1.0 / self.values
        if isinstance(self.basis, IdentityBasis):
            return inverse
        if isinstance(self.basis, DenseBasis):
            return self.basis.q.square() @ inverse
        m, n = self.basis.shape
        grid = inverse.reshape(m, n)
        if self.basis.first is not None:
            grid = self.basis.first.square() @ grid
        if self.basis.second is not None:
            grid = grid @ self.basis.second.square().T
        return grid.reshape(-1)

    def covariance(self) -> Tensor:
        """The dense covariance ``(p, p)`` (small blocks only)."""
        eye = torch.eye(self.values.numel(), dtype=self.values.dtype, device=self.values.device)
        return self.solve(eye)

    def precision(self) -> Tensor:
        """The dense precision ``(p, p)`` (small blocks only)."""
        eye = torch.eye(self.values.numel(), dtype=self.values.dtype, device=self.values.device)
        return self.basis.from_basis(self.basis.to_basis(eye) * self.values)
