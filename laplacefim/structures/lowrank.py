"""``structure="lowrank"``: the top eigenpairs of the curvature plus a diagonal remainder.

``F ≈ D + U diag(λ) Uᵀ``: ``U (P, k)`` and ``λ`` are the ``k`` largest eigenpairs of the
exact curvature (GGN or empirical Fisher) over every chosen parameter, found by block
Lanczos (:mod:`laplacefim.linalg`) with one pass over the data per block of products —
each product ``F X = Σₙ Σ_v u (uᵀX)`` is formed from the per-layer segments, never from a
Jacobian. ``D`` is the exact diagonal minus that of the low-rank part (accumulated in the
first pass), so the approximation's diagonal is the exact one. Posterior precisions are
handled with the Woodbury identity: ``O(P k²)`` per prior value.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from laplacefim import checks
from laplacefim.curvature.segments import Segment
from laplacefim.linalg import Eigen, Which, krylov_steps
from laplacefim.options import CurvatureKind
from laplacefim.structures.base import Block, Plan, SegmentMap, gather, whole

SEED = 20240611
# Eigenvalues of D + U diag(λ) Uᵀ are computed densely up to this many parameters.
DENSE_EIGENVALUES = 20_000


@dataclass
class LowRankBlock:
    """``D + U diag(λ) Uᵀ`` over every chosen parameter.

    Attributes:
        names: The parameters, in flat order.
        sizes: Their sizes.
        rank: ``k``.
        diag: The exact diagonal (first pass), then the remainder ``D``.
        product: ``F X`` of the current block ``X``, summed over the pass.
        vectors: ``U (P, k)`` once fitted.
        values: ``λ (k,)`` once fitted.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    rank: int
    diag: Tensor
    product: Tensor | None = None
    vectors: Tensor | None = None
    values: Tensor | None = None
    active: bool = True
    steps: Generator[Tensor, Tensor, Eigen] | None = field(default=None, repr=False)
    block: Tensor | None = field(default=None, repr=False)
    first_pass: bool = True

    @property
    def numel(self) -> int:
        """Number of parameters covered."""
        return self.diag.numel()

    def start(self, block_size: int, tol: float, max_passes: int) -> None:
        """Set up the Lanczos iteration; its first block is multiplied in the first pass."""
        generator = torch.Generator().manual_seed(SEED)
        self.steps = krylov_steps(
            self.numel,
            min(self.rank, self.numel),
            which=Which.LARGEST,
            tol=tol,
            max_iter=max_passes,
            block_size=block_size,
            dtype=self.diag.dtype,
            device=self.diag.device,
            generator=generator,
        )
        self.block = next(self.steps)
        self.product = torch.zeros_like(self.block)

    def _product(self, segments: SegmentMap) -> Tensor:
        """``Σ_{n,v} u (uᵀX)`` for the batch, through each segment's products."""
        block = self.block
        if block is None or self.product is None:
            raise RuntimeError("the low-rank block was not started.")
        parts = block.split(list(self.sizes), dim=1)
        coefficients = None
        for name, part in zip(self.names, parts, strict=True):
            segs: Sequence[Segment] = segments.get(name, [])
            for seg, rows in zip(segs, part.split([s.size for s in segs], dim=1), strict=True):
                dots = seg.dots(rows)
                coefficients = dots if coefficients is None else coefficients + dots
        if coefficients is None:
            return torch.zeros_like(self.product)
        found = gather(segments, self.names, self.sizes, lambda s: s.combine(coefficients))
        return torch.zeros_like(self.product) if found is None else found

    def statistics(self, segments: SegmentMap, *, inputs: bool = True) -> list[Tensor]:
        """First pass: the exact diagonal and ``F X₀``; later passes: ``F X``."""
        product = self._product(segments)
        if not self.first_pass:
            return [product]
        found = gather(segments, self.names, self.sizes, lambda s: s.diag())
        return [torch.zeros_like(self.diag) if found is None else found, product]

    def covered(self, segments: SegmentMap) -> list[Segment] | None:
        """Every segment of the block's parameters."""
        return whole(segments, self.names, self.sizes)

    def state(self) -> list[Tensor]:
        """The summed statistics of the current pass (the fitted factors when done)."""
        if not self.active:
            return self._factors()
        assert_product = self.product if self.product is not None else self.diag.new_zeros(0)
        return [self.diag, assert_product] if self.first_pass else [assert_product]

    def end_pass(self) -> None:
        """Give the product to the Lanczos iteration; finish when it has converged."""
        if self.steps is None or self.product is None:
            raise RuntimeError("the low-rank block was not started.")
        self.first_pass = False
        try:
            self.block = self.steps.send(self.product)
            self.product = torch.zeros_like(self.block)
        except StopIteration as done:
            eigen: Eigen = done.value
            self.vectors = eigen.eigenvectors.T.contiguous()
            self.values = eigen.eigenvalues.clamp_min(0)
            low_rank_diag = self.vectors.square() @ self.values
            self.diag = (self.diag - low_rank_diag).clamp_min(0)
            self.steps = self.block = self.product = None
            self.active = False

    def _factors(self) -> list[Tensor]:
        if self.vectors is None or self.values is None:
            raise RuntimeError("the low-rank block has not finished its passes over the data.")
        return [self.diag, self.vectors, self.values]

    def to_dense(self) -> Tensor:
        """``D + U diag(λ) Uᵀ``."""
        diag, vectors, values = self._factors()
        return torch.diag(diag) + (vectors * values) @ vectors.T

    def diagonal(self) -> Tensor:
        """The exact diagonal of the fitted curvature."""
        diag, vectors, values = self._factors()
        return diag + vectors.square() @ values

    def decompose(self) -> LowRankDecomposition:
        """The factors, for Woodbury solves at any prior."""
        diag, vectors, values = self._factors()
        return LowRankDecomposition(diag, vectors, values)

    def save(self) -> tuple[dict[str, Any], list[Tensor]]:
        """Names, sizes and rank; ``D``, ``U`` and ``λ``."""
        spec = {"names": list(self.names), "sizes": list(self.sizes), "rank": self.rank}
        return spec, self._factors()

    @classmethod
    def restore(cls, spec: dict[str, Any], tensors: list[Tensor]) -> LowRankBlock:
        """Inverse of :meth:`save`."""
        diag, vectors, values = tensors
        return cls(
            tuple(spec["names"]),
            tuple(spec["sizes"]),
            spec["rank"],
            diag,
            vectors=vectors,
            values=values,
            active=False,
            first_pass=False,
        )


@dataclass(frozen=True)
class LowRankDecomposition:
    """``D + U diag(λ) Uᵀ`` with orthonormal ``U``."""

    diag: Tensor
    vectors: Tensor
    values: Tensor

    def eigenvalues(self) -> Tensor:
        """All eigenvalues, by a dense ``eigh`` (``P`` up to ``DENSE_EIGENVALUES``).

        Raises:
            ValueError: For larger ``P``.
        """
        if self.diag.numel() > DENSE_EIGENVALUES:
            raise ValueError(
                f"the eigenvalues of a low-rank-plus-diagonal block of {self.diag.numel()} "
                f"parameters need a dense eigendecomposition (limit {DENSE_EIGENVALUES})."
            )
        dense = torch.diag(self.diag) + (self.vectors * self.values) @ self.vectors.T
        return torch.linalg.eigvalsh(dense).clamp_min(0)

    def with_prior(self, scale: Tensor | float, prior: Tensor) -> LowRankPrecision:
        """``s(D + U λ Uᵀ) + diag(prior)``: any prior, scalar or per parameter."""
        dtype = prior.dtype
        diag = scale * self.diag.to(dtype) + prior
        return LowRankPrecision(diag, self.vectors.to(dtype), scale * self.values.to(dtype))


@dataclass(frozen=True)
class LowRankPrecision:
    """``P = D' + U S Uᵀ`` (``D'`` positive diagonal, ``S ≥ 0``), by the Woodbury identity.

    With ``W = D'^{-1/2} U S^{1/2}`` and ``M = I + WᵀW = L Lᵀ``: ``log det P = Σ log D' +
    log det M`` and ``Σ = D'^{-1} − Z Zᵀ`` with ``Z = D'^{-1} U S^{1/2} L^{-ᵀ}``.
    """

    diag: Tensor
    vectors: Tensor
    values: Tensor

    @property
    def elementwise(self) -> bool:
        """Never diagonal."""
        return False

    @property
    def dense(self) -> bool:
        """Not unstructured."""
        return False

    @property
    def numel(self) -> int:
        """Number of parameters covered."""
        return self.diag.numel()

    def _z(self) -> tuple[Tensor, Tensor]:
        """``Z (P, k)`` and the Cholesky factor ``L`` of ``M``."""
        scaled = self.vectors * self.values.sqrt()  # U S^{1/2}
        w = scaled / self.diag.sqrt()[:, None]
        m = torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + w.T @ w
        chol = torch.linalg.cholesky(m)
        z = torch.linalg.solve_triangular(chol, (scaled / self.diag[:, None]).T, upper=False).T
        return z, chol

    def to(self, dtype: torch.dtype) -> LowRankPrecision:
        """In ``dtype``."""
        return LowRankPrecision(self.diag.to(dtype), self.vectors.to(dtype), self.values.to(dtype))

    def logdet(self) -> Tensor:
        """``Σ log D' + 2 Σ log diag(L)``."""
        _, chol = self._z()
        return self.diag.log().sum() + 2 * chol.diagonal().log().sum()

    def solve(self, v: Tensor) -> Tensor:
        """``Σ v = v / D' − Z (Zᵀ v)``."""
        z, _ = self._z()
        return v / self.diag - (v @ z) @ z.T

    def quad(self, v: Tensor) -> Tensor:
        """``vᵀ D' v + (Uᵀv)ᵀ S (Uᵀv)``."""
        coordinates = v @ self.vectors
        return (v.square() * self.diag).sum(-1) + (coordinates.square() * self.values).sum(-1)

    def sample(self, z: Tensor) -> Tensor:
        """``D'^{-1/2} (I + W Wᵀ)^{-1/2} z`` via a thin SVD of ``W``."""
        w = self.vectors * self.values.sqrt() / self.diag.sqrt()[:, None]
        left, singular, _ = torch.linalg.svd(w, full_matrices=False)
        shrink = (1.0 + singular.square()).rsqrt() - 1.0
        whitened = z + ((z @ left) * shrink) @ left.T
        return whitened / self.diag.sqrt()

    def covariance_diagonal(self) -> Tensor:
        """``1/D' − rowsum(Z²)``."""
        z, _ = self._z()
        return 1.0 / self.diag - z.square().sum(1)

    def functional_variance(self, segments: Sequence[Segment]) -> Tensor:
        """``J D'^{-1} Jᵀ − (JZ)(JZ)ᵀ`` from the segments' Gram matrices and products."""
        z, _ = self._z()
        inverse = (1.0 / self.diag).split([s.size for s in segments])
        rows = z.T.split([s.size for s in segments], dim=1)
        diagonal = sum(s.gram(w) for s, w in zip(segments, inverse, strict=True))
        coordinates = sum(s.dots(r) for s, r in zip(segments, rows, strict=True))
        return diagonal - torch.einsum("vbk,wbk->bvw", coordinates, coordinates)

    def functional_variance_diagonal(self, segments: Sequence[Segment]) -> Tensor:
        """The diagonal of :meth:`functional_variance`, ``(B, V)``."""
        z, _ = self._z()
        inverse = (1.0 / self.diag).split([s.size for s in segments])
        rows = z.T.split([s.size for s in segments], dim=1)
        diagonal = sum(s.gram_diagonal(w) for s, w in zip(segments, inverse, strict=True))
        coordinates: Tensor = sum(s.dots(r) for s, r in zip(segments, rows, strict=True))  # type: ignore[assignment]
        return diagonal - coordinates.square().sum(-1).T

    def eigenvalue_range(self) -> tuple[Tensor, Tensor]:
        """Bounds: ``min D'`` below the smallest eigenvalue, ``max D' + max S`` above the
        largest."""
        top = self.diag.max() + (self.values.max() if self.values.numel() else 0.0)
        return self.diag.min(), top

    def to_dense(self) -> Tensor:
        """``D' + U S Uᵀ``."""
        return torch.diag(self.diag) + (self.vectors * self.values) @ self.vectors.T

    def covariance(self) -> Tensor:
        """The dense covariance."""
        eye = torch.eye(self.numel, dtype=self.diag.dtype, device=self.diag.device)
        return self.solve(eye)


class LowRank:
    """Top-``rank`` eigenpairs of the curvature plus its diagonal remainder.

    Args:
        rank: Number of eigenpairs ``k``.
        oversample: Extra vectors per Lanczos block (faster convergence of the ``k``-th).
        tol: Relative residual tolerance of the eigenpairs.
        max_passes: Most passes over the data for the eigenpairs.

    Raises:
        ValueError: For a rank or pass count < 1, or a tolerance that is not > 0.

    Example:
        >>> la = Laplace(model, structure=LowRank(rank=30)).fit(loader)
    """

    name = "lowrank"
    single_pass = False
    block_types = (LowRankBlock,)

    def __init__(
        self, rank: int = 20, *, oversample: int = 10, tol: float = 1e-4, max_passes: int = 30
    ) -> None:
        self.rank = checks.integer(rank, "rank")
        self.oversample = checks.integer(oversample, "oversample", minimum=0)
        self.tol = checks.number(tol, "tol", positive=True)
        self.max_passes = checks.integer(max_passes, "max_passes")

    def options(self) -> dict[str, Any]:
        """The constructor's arguments."""
        return {
            "rank": self.rank,
            "oversample": self.oversample,
            "tol": self.tol,
            "max_passes": self.max_passes,
        }

    def check(self, n_params: int, kind: CurvatureKind, max_dense: int) -> None:
        """Refuse the MC Fisher: its samples change from pass to pass.

        Raises:
            ValueError: For ``curvature="fisher"``.
        """
        if kind is CurvatureKind.FISHER:
            raise ValueError(
                "structure='lowrank' multiplies the curvature over several passes over the "
                "data, and the MC Fisher's sampled labels change from pass to pass; use "
                "curvature='ggn' or 'empirical_fisher'."
            )

    def build(self, plan: Plan) -> list[Block]:
        """One block over every chosen parameter."""
        names = tuple(name for name, _ in plan.params)
        sizes = tuple(size for _, size in plan.params)
        block = LowRankBlock(names, sizes, self.rank, plan.zeros(plan.n_params))
        block_size = min(self.rank + self.oversample, plan.n_params)
        block.start(block_size, self.tol, self.max_passes)
        return [block]
