"""Eigen-decomposed blocks: ``Q diag(λ) Qᵀ`` once, then any prior is a cheap shift of ``λ``.

A fitted block decomposes once into eigenvalues and a basis (the identity for a diagonal
block, a dense ``Q`` for a dense block, ``Q₁ ⊗ Q₂`` for a Kronecker block). Adding a prior
``δ`` that is constant on the block, or any per-parameter prior when the basis is the
identity, only shifts the eigenvalues: ``s·λ + δ``. That makes the log-determinant, solves
and samples cost O(p) per prior value after the decomposition. Each basis also knows how
to contract a Jacobian's segments into ``J Σ Jᵀ`` without forming ``J`` where it can.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from laplacefim.curvature.segments import Segment


class Basis(Protocol):
    """An orthonormal basis of a block's ``p`` parameters.

    Attributes:
        elementwise: Whether it is the standard basis, where a per-parameter prior is
            still a shift of the eigenvalues.
        dense: Whether it is an unstructured dense basis.
    """

    elementwise: bool
    dense: bool

    def to_basis(self, v: Tensor) -> Tensor:
        """Coordinates ``Qᵀv`` of row vectors ``(..., p)``."""
        ...

    def from_basis(self, w: Tensor) -> Tensor:
        """Vectors ``Qw`` from coordinates ``(..., p)``."""
        ...

    def squared(self, values: Tensor) -> Tensor:
        """``diag(Q diag(values) Qᵀ)`` ``(p,)``."""
        ...

    def contract(self, segments: Sequence[Segment], inverse: Tensor) -> Tensor:
        """``Σ_k (Qᵀu_v)_k (Qᵀu_w)_k inverse_k`` per datum ``(B, V, V)``."""
        ...

    def contract_diagonal(self, segments: Sequence[Segment], inverse: Tensor) -> Tensor:
        """The diagonal of :meth:`contract`, ``(B, V)``."""
        ...

    def to(self, dtype: torch.dtype) -> Basis:
        """The basis in ``dtype``."""
        ...


def _split(segments: Sequence[Segment], values: Tensor) -> list[Tensor]:
    return list(values.split([s.size for s in segments], dim=-1))


@dataclass(frozen=True)
class IdentityBasis:
    """The standard basis of ``p`` parameters."""

    p: int
    elementwise = True
    dense = False

    def to_basis(self, v: Tensor) -> Tensor:
        """``v``."""
        return v

    def from_basis(self, w: Tensor) -> Tensor:
        """``w``."""
        return w

    def squared(self, values: Tensor) -> Tensor:
        """``values``."""
        return values

    def contract(self, segments: Sequence[Segment], inverse: Tensor) -> Tensor:
        """Weighted Gram matrices of each segment, summed."""
        parts = _split(segments, inverse)
        return sum(s.gram(w) for s, w in zip(segments, parts, strict=True))  # type: ignore[return-value]

    def contract_diagonal(self, segments: Sequence[Segment], inverse: Tensor) -> Tensor:
        """Diagonals of the weighted Gram matrices, summed."""
        parts = _split(segments, inverse)
        return sum(s.gram_diagonal(w) for s, w in zip(segments, parts, strict=True))  # type: ignore[return-value]

    def to(self, dtype: torch.dtype) -> IdentityBasis:
        """Itself."""
        return self


@dataclass(frozen=True)
class DenseBasis:
    """An orthonormal basis ``Q`` ``(p, p)``, eigenvectors in columns."""

    q: Tensor
    elementwise = False
    dense = True

    def to_basis(self, v: Tensor) -> Tensor:
        """``Qᵀv``."""
        return v @ self.q

    def from_basis(self, w: Tensor) -> Tensor:
        """``Qw``."""
        return w @ self.q.T

    def squared(self, values: Tensor) -> Tensor:
        """``(Q ∘ Q) values``."""
        return self.q.square() @ values

    def contract(self, segments: Sequence[Segment], inverse: Tensor) -> Tensor:
        """``Qᵀu`` through each segment's products with the columns of ``Q``."""
        rows = _split(segments, self.q.T)
        coordinates = sum(s.dots(r) for s, r in zip(segments, rows, strict=True))
        return torch.einsum("vbk,wbk->bvw", coordinates * inverse, coordinates)

    def contract_diagonal(self, segments: Sequence[Segment], inverse: Tensor) -> Tensor:
        """``Σ_k (Qᵀu_v)_k² inverse_k``."""
        rows = _split(segments, self.q.T)
        coordinates: Tensor = sum(s.dots(r) for s, r in zip(segments, rows, strict=True))  # type: ignore[assignment]
        return torch.einsum("vbk,k->bv", coordinates.square(), inverse)

    def to(self, dtype: torch.dtype) -> DenseBasis:
        """``Q`` in ``dtype``."""
        return DenseBasis(self.q.to(dtype))


@dataclass(frozen=True)
class KronBasis:
    """The basis ``Q₁ ⊗ Q₂`` of a ``(m, n)`` weight; ``None`` stands for the identity."""

    first: Tensor | None
    second: Tensor | None
    shape: tuple[int, int]
    elementwise = False
    dense = False

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
        """``(Q₁ ⊗ Q₂)ᵀv``."""
        return self._apply(v, transpose=True)

    def from_basis(self, w: Tensor) -> Tensor:
        """``(Q₁ ⊗ Q₂)w``."""
        return self._apply(w, transpose=False)

    def squared(self, values: Tensor) -> Tensor:
        """``diag((Q₁ ⊗ Q₂) diag(values) (Q₁ ⊗ Q₂)ᵀ)`` without the Kronecker product."""
        m, n = self.shape
        grid = values.reshape(m, n)
        if self.first is not None:
            grid = self.first.square() @ grid
        if self.second is not None:
            grid = grid @ self.second.square().T
        return grid.reshape(-1)

    def contract(self, segments: Sequence[Segment], inverse: Tensor) -> Tensor:
        """The one segment rotated into the factors' eigenbases, then a weighted Gram."""
        (segment,) = segments
        return segment.rotated(self.first, self.second).gram(inverse)

    def contract_diagonal(self, segments: Sequence[Segment], inverse: Tensor) -> Tensor:
        """The diagonal of :meth:`contract`."""
        (segment,) = segments
        return segment.rotated(self.first, self.second).gram_diagonal(inverse)

    def to(self, dtype: torch.dtype) -> KronBasis:
        """Both factors' bases in ``dtype``."""
        first = None if self.first is None else self.first.to(dtype)
        second = None if self.second is None else self.second.to(dtype)
        return KronBasis(first, second, self.shape)


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0: they belong to a PSD matrix) and eigenvectors.

    ``eigh`` can fail to converge on an ill-conditioned factor; it is retried in float64,
    then with a relative jitter on the diagonal (a warning says by how much).
    """
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        values, vectors = _robust_eigh(matrix)
    return values.clamp_min(0), vectors


def _robust_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    double = matrix.to(torch.float64)
    try:
        values, vectors = torch.linalg.eigh(double)
    except torch.linalg.LinAlgError:
        pass
    else:
        warnings.warn(
            f"eigh did not converge on a {matrix.shape[0]}x{matrix.shape[0]} curvature factor "
            f"in {matrix.dtype}; it converged in float64 (no jitter added).",
            RuntimeWarning,
            stacklevel=4,
        )
        return values.to(matrix.dtype), vectors.to(matrix.dtype)
    scale = float(double.diagonal().abs().max().clamp_min(torch.finfo(torch.float64).tiny))
    eye = torch.eye(matrix.shape[0], dtype=torch.float64, device=matrix.device)
    for relative in (1e-12, 1e-10, 1e-8, 1e-6):
        try:
            values, vectors = torch.linalg.eigh(double + relative * scale * eye)
        except torch.linalg.LinAlgError:
            continue
        warnings.warn(
            f"eigh did not converge on a {matrix.shape[0]}x{matrix.shape[0]} curvature factor, "
            f"in {matrix.dtype} nor in float64; it converged with a jitter of {relative:g} "
            f"times its largest diagonal entry ({relative * scale:.3g}) added.",
            RuntimeWarning,
            stacklevel=4,
        )
        return (values - relative * scale).to(matrix.dtype), vectors.to(matrix.dtype)
    raise torch.linalg.LinAlgError(
        f"eigh failed on a {matrix.shape[0]}x{matrix.shape[0]} curvature factor even in float64 "
        "with a relative jitter of 1e-6; check the factor for NaN or inf."
    )


@dataclass(frozen=True)
class EigenDecomposition:
    """A fitted curvature block ``basis · diag(eigenvalues) · basisᵀ``.

    Attributes:
        values: ``(p,)`` eigenvalues of the curvature block (before scale and prior).
        basis: The eigenbasis.
        matrix: The dense block, kept for dense blocks only, to absorb a prior that varies
            within the block (which no longer commutes with the basis).
    """

    values: Tensor
    basis: Basis
    matrix: Tensor | None = None

    def eigenvalues(self) -> Tensor:
        """The eigenvalues ``(p,)``."""
        return self.values

    def with_prior(self, scale: Tensor | float, prior: Tensor) -> EigenPrecision:
        """The precision ``scale·F + diag(prior)``, decomposed.

        O(p) unless a per-parameter prior meets a dense block, which needs one new
        eigendecomposition; computed in the prior's dtype (the evidence passes float64).

        Raises:
            ValueError: If a per-parameter prior meets a Kronecker block.
        """
        values = self.values.to(prior.dtype)
        if prior.ndim == 0 or self.basis.elementwise:
            return EigenPrecision(scale * values + prior, self.basis)
        if self.matrix is not None:
            precision = scale * self.matrix.to(prior.dtype) + torch.diag(prior)
            new_values, vectors = torch.linalg.eigh(precision)
            # log det through Cholesky: its derivatives of every order are finite, where
            # eigh's second derivative divides by eigenvalue gaps, 0 for the repeated
            # eigenvalues a rank-deficient block gets from a prior constant per layer.
            factor, info = torch.linalg.cholesky_ex(precision)
            log_det = 2.0 * factor.diagonal().log().sum() if int(info) == 0 else None
            return EigenPrecision(new_values, DenseBasis(vectors), log_det)
        raise ValueError(
            "a prior precision that varies within a Kronecker-factored block cannot be "
            "absorbed in its eigenbasis; use prior_structure='scalar' or 'layerwise' with "
            "structure='kron' or 'ekfac', or structure='diag', 'full' or 'lowrank' for a "
            "per-parameter prior."
        )


@dataclass(frozen=True)
class EigenPrecision:
    """A decomposed posterior-precision block ``basis · diag(values) · basisᵀ``."""

    values: Tensor
    basis: Basis
    log_det: Tensor | None = None  # log det when computed otherwise than from ``values``

    @property
    def elementwise(self) -> bool:
        """Whether the precision is diagonal."""
        return self.basis.elementwise

    @property
    def dense(self) -> bool:
        """Whether the precision is an unstructured dense matrix."""
        return self.basis.dense

    @property
    def numel(self) -> int:
        """Number of parameters covered."""
        return self.values.numel()

    def to(self, dtype: torch.dtype) -> EigenPrecision:
        """The same block with its eigenvalues and basis in ``dtype``."""
        log_det = None if self.log_det is None else self.log_det.to(dtype)
        return EigenPrecision(self.values.to(dtype), self.basis.to(dtype), log_det)

    def logdet(self) -> Tensor:
        """``log det`` of the precision block."""
        return self.values.log().sum() if self.log_det is None else self.log_det

    def solve(self, v: Tensor) -> Tensor:
        """``Σv`` for row vectors ``(..., p)``."""
        return self.basis.from_basis(self.basis.to_basis(v) / self.values)

    def quad(self, v: Tensor) -> Tensor:
        """``vᵀ P v`` for row vectors ``(..., p)``."""
        return (self.basis.to_basis(v).square() * self.values).sum(-1)

    def sample(self, z: Tensor) -> Tensor:
        """Map standard normal rows ``(..., p)`` to ``N(0, Σ)`` draws."""
        return self.basis.from_basis(z / self.values.sqrt())

    def covariance_diagonal(self) -> Tensor:
        """``diag(Σ)`` ``(p,)``, without building ``Σ``."""
        return self.basis.squared(1.0 / self.values)

    def functional_variance(self, segments: Sequence[Segment]) -> Tensor:
        """``J Σ Jᵀ`` per datum by contractions in the eigenbasis."""
        return self.basis.contract(segments, 1.0 / self.values)

    def functional_variance_diagonal(self, segments: Sequence[Segment]) -> Tensor:
        """The diagonal of :meth:`functional_variance`, ``(B, V)``, without the rest."""
        return self.basis.contract_diagonal(segments, 1.0 / self.values)

    def eigenvalue_range(self) -> tuple[Tensor, Tensor]:
        """Smallest and largest eigenvalue."""
        return self.values.min(), self.values.max()

    def covariance(self) -> Tensor:
        """The dense covariance ``(p, p)`` (small blocks only)."""
        eye = torch.eye(self.numel, dtype=self.values.dtype, device=self.values.device)
        return self.solve(eye)

    def to_dense(self) -> Tensor:
        """The dense precision ``(p, p)`` (small blocks only)."""
        eye = torch.eye(self.numel, dtype=self.values.dtype, device=self.values.device)
        return self.basis.from_basis(self.basis.to_basis(eye) * self.values)
