"""``u = Σ_t e_{token_t} g_tᵀ``: rows of an embedding table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from laplacefim.curvature.segments.base import Rotate, cast, matmul
from laplacefim.options import KfacApprox


@dataclass(frozen=True)
class Tokens:
    """``u = Σ_t e_{token_t} g_tᵀ``: rows of an embedding table ``(num, d)``.

    Attributes:
        tokens: ``(B, T)`` token indices.
        grads: ``(V, B, T, d)`` gradients w.r.t. the looked-up rows (zero at padding).
        num: Number of rows of the table.
        padding_idx: A row that never receives gradient (not counted), or None.
    """

    tokens: Tensor
    grads: Tensor
    num: int
    padding_idx: int | None = None

    @property
    def dim(self) -> int:
        """Row size ``d``."""
        return self.grads.shape[-1]

    @property
    def size(self) -> int:
        """Number of parameters covered."""
        return self.num * self.dim

    @property
    def n_columns(self) -> int:
        """``V``."""
        return self.grads.shape[0]

    @property
    def batch(self) -> int:
        """``B``."""
        return self.grads.shape[1]

    def to(self, dtype: torch.dtype, memo: dict[int, Tensor]) -> Tokens:
        """Cast the gradients to ``dtype``."""
        return Tokens(self.tokens, cast(self.grads, dtype, memo), self.num, self.padding_idx)

    def _sums(self) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients summed over equal tokens of a sample ``(V, U, d)``, their tokens and
        samples ``(U,)``."""
        batch, positions = self.tokens.shape
        keys = torch.arange(batch, device=self.tokens.device)[:, None] * self.num + self.tokens
        unique, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
        sums = self.grads.new_zeros(self.n_columns, unique.numel(), self.dim)
        sums.index_add_(1, inverse, self.grads.reshape(self.n_columns, batch * positions, -1))
        return sums, unique % self.num, unique // self.num

    def per_sample(self) -> Tensor:
        """``u (V, B, num·d)``."""
        one_hot = F.one_hot(self.tokens, self.num).to(self.grads.dtype)
        return torch.einsum("bti,vbtd->vbid", one_hot, self.grads).flatten(2)

    def diag(self) -> Tensor:
        """Exact diagonal ``(num·d,)``."""
        sums, token, _ = self._sums()
        out = sums.new_zeros(self.num, self.dim)
        return out.index_add_(0, token, sums.square().sum(0)).reshape(-1)

    def kron(self, approx: KfacApprox, *, inputs: bool = True) -> list[Tensor | None]:
        """``[diag(token counts), Σ g gᵀ, count]`` (one row per looked-up token; the counts
        None where ``inputs`` is False)."""
        flat = self.grads.reshape(-1, self.dim)
        if not inputs:
            return [None, flat.T @ flat, None]
        tokens = self.tokens.reshape(-1)
        counts = torch.bincount(tokens, minlength=self.num).to(self.grads.dtype)
        if self.padding_idx is not None:
            counts[self.padding_idx] = 0
        return [counts, flat.T @ flat, flat.new_full((), float(tokens.numel()))]

    def rotated(
        self, first: Tensor | None, second: Tensor | None, rotate: Rotate = matmul
    ) -> Tokens:
        """Rotate the row gradients (the token factor is diagonal: its basis is the identity)."""
        if first is not None:
            raise ValueError("an embedding's token factor is diagonal; it has no rotation.")
        grads = self.grads if second is None else rotate(self.grads, second)
        return Tokens(self.tokens, grads, self.num, self.padding_idx)

    def gram(self, weights: Tensor) -> Tensor:
        """Weighted Gram matrices, through per-sample token sums."""
        sums, token, sample = self._sums()
        w = weights.reshape(self.num, self.dim)[token]  # (U, d)
        parts = torch.einsum("vud,wud->uvw", sums * w, sums)
        out = sums.new_zeros(self.batch, self.n_columns, self.n_columns)
        return out.index_add_(0, sample, parts)

    def gram_diagonal(self, weights: Tensor) -> Tensor:
        """The diagonal of :meth:`gram`: ``(B, V)``."""
        sums, token, sample = self._sums()
        w = weights.reshape(self.num, self.dim)[token]  # (U, d)
        parts = torch.einsum("vud,ud->uv", sums.square(), w)
        out = sums.new_zeros(self.batch, self.n_columns)
        return out.index_add_(0, sample, parts)

    def dots(self, vectors: Tensor) -> Tensor:
        """``uᵀX``: ``(V, B, k)``."""
        x = vectors.reshape(vectors.shape[0], self.num, self.dim)[:, self.tokens]  # (k,B,T,d)
        return torch.einsum("vbtd,kbtd->vbk", self.grads, x)

    def combine(self, coefficients: Tensor) -> Tensor:
        """``Σ c u``: ``(k, num·d)``."""
        k = coefficients.shape[-1]
        parts = torch.einsum("vbk,vbtd->kbtd", coefficients, self.grads).reshape(k, -1, self.dim)
        out = parts.new_zeros(k, self.num, self.dim)
        return out.index_add_(1, self.tokens.reshape(-1), parts).reshape(k, -1)

    def total(self) -> Tensor:
        """``Σ_b u``: ``(V, num·d)``."""
        flat = self.grads.reshape(self.n_columns, -1, self.dim)
        out = flat.new_zeros(self.n_columns, self.num, self.dim)
        return out.index_add_(1, self.tokens.reshape(-1), flat).reshape(self.n_columns, -1)

    def tensors(self) -> list[Tensor]:
        """The tensors the segment holds."""
        return [self.tokens, self.grads]
