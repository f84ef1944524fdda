"""Per-sample gradients in factorised form: what a layer rule returns, what structures read.

For one batch, the engine backpropagates ``V`` columns (loss-Hessian square-root columns,
sampled-label gradients, or the true-label gradient) and a layer rule describes, for each
parameter it accounts for, the per-sample, per-column gradients ``u_{v,b}`` as one or more
*segments* covering consecutive slices of the parameter's flat (row-major) vector:

* :class:`Product` — ``u = Σ_t g_t a_tᵀ`` over ``T`` positions that share the weight
  (``nn.Linear``, ``nn.Conv2d`` patches, recurrent steps, attention projections); a bias is
  the case ``a_t = 1``. Kronecker factors, exact diagonals and GLM contractions follow
  without forming ``u``.
* :class:`Tokens` — ``u = Σ_t e_{token_t} g_tᵀ`` (``nn.Embedding``).
* :class:`Samples` — ``u`` itself, ``(V, B, p)`` (any other module, via ``torch.func``).

Every segment answers the same questions (the structures never ask which kind it is):
the exact diagonal ``Σ_{v,b} u²``, Kronecker factors (or None), ``u`` itself, weighted
Gram matrices ``Σ_p u_{v,b,p} u_{w,b,p} w_p``, coordinates in a Kronecker eigenbasis, and
products with vectors (``uᵀX`` and ``Σ c u``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

from laplacefim.options import KfacApprox

# Upper bound on elements of a per-sample gradient chunk (V · B_chunk · p); bounds memory.
CHUNK_ELEMENTS = 1 << 24


class Segment(Protocol):
    """Per-sample gradients ``u (V, B, size)`` of a parameter slice, in some factorised form."""

    @property
    def grads(self) -> Tensor:
        """The segment's gradient tensor (its dtype and device are the segment's)."""
        ...

    @property
    def size(self) -> int:
        """Number of parameters covered."""
        ...

    @property
    def n_columns(self) -> int:
        """``V``."""
        ...

    @property
    def batch(self) -> int:
        """``B``."""
        ...

    def to(self, dtype: torch.dtype, memo: dict[int, Tensor]) -> Segment:
        """The same segment with floating tensors in ``dtype`` (see :func:`cast`)."""
        ...

    def per_sample(self) -> Tensor:
        """``u``, ``(V, B, size)``."""
        ...

    def diag(self) -> Tensor:
        """``Σ_{v,b} u²``, ``(size,)``."""
        ...

    def kron(self, approx: KfacApprox) -> list[Tensor] | None:
        """``[first, second, count]`` of a Kronecker block ``(first ⊗ second)/count`` in the
        slice's flat order, or None where no Kronecker factorisation exists."""
        ...

    def rotated(self, first: Tensor | None, second: Tensor | None) -> Segment:
        """The segment in the coordinates of the Kronecker basis ``first ⊗ second``
        (orthonormal columns; None for the identity)."""
        ...

    def gram(self, weights: Tensor) -> Tensor:
        """``Σ_p u_{v,b,p} u_{w,b,p} weights_p``: ``(B, V, V)``."""
        ...

    def dots(self, vectors: Tensor) -> Tensor:
        """``Σ_p u_{v,b,p} X_{k,p}`` for rows ``X (k, size)``: ``(V, B, k)``."""
        ...

    def combine(self, coefficients: Tensor) -> Tensor:
        """``Σ_{v,b} c_{v,b,k} u_{v,b}`` for ``c (V, B, k)``: ``(k, size)``."""
        ...

    def total(self) -> Tensor:
        """``Σ_b u``: ``(V, size)``, the gradient of each column's sum over the batch."""
        ...


def cast(tensor: Tensor, dtype: torch.dtype, memo: dict[int, Tensor]) -> Tensor:
    """``tensor`` in ``dtype``, converting each distinct tensor once (segments of one layer
    share their output gradients, and keep sharing them)."""
    if tensor.dtype == dtype:
        return tensor
    key = id(tensor)
    if key not in memo:
        memo[key] = tensor.to(dtype)
    return memo[key]


def _batch_chunks(n_columns: int, batch: int, per_sample: int) -> int:
    return max(1, min(batch, CHUNK_ELEMENTS // max(n_columns * per_sample, 1)))


def _gram_of(u: Tensor, weights: Tensor) -> Tensor:
    return torch.einsum("vbp,wbp->bvw", u * weights, u)


@dataclass(frozen=True)
class Samples:
    """Per-sample gradients given as they are.

    Attributes:
        grads: ``(V, B, p)``.
    """

    grads: Tensor

    @property
    def size(self) -> int:
        """Number of parameters covered."""
        return self.grads.shape[2]

    @property
    def n_columns(self) -> int:
        """``V``."""
        return self.grads.shape[0]

    @property
    def batch(self) -> int:
        """``B``."""
        return self.grads.shape[1]

    def to(self, dtype: torch.dtype, memo: dict[int, Tensor]) -> Samples:
        """Cast to ``dtype``."""
        return Samples(cast(self.grads, dtype, memo))

    def per_sample(self) -> Tensor:
        """``u`` itself."""
        return self.grads

    def diag(self) -> Tensor:
        """``Σ_{v,b} u²``."""
        return self.grads.square().sum((0, 1))

    def kron(self, approx: KfacApprox) -> list[Tensor] | None:
        """None: per-sample gradients have no Kronecker factorisation."""
        return None

    def rotated(self, first: Tensor | None, second: Tensor | None) -> Samples:
        """Not applicable (no Kronecker block is built on per-sample gradients)."""
        raise ValueError("per-sample gradients have no Kronecker basis to rotate into.")

    def gram(self, weights: Tensor) -> Tensor:
        """Weighted Gram matrices per datum."""
        return _gram_of(self.grads, weights)

    def dots(self, vectors: Tensor) -> Tensor:
        """``uᵀX``."""
        return torch.einsum("vbp,kp->vbk", self.grads, vectors)

    def combine(self, coefficients: Tensor) -> Tensor:
        """``Σ c u``."""
        return torch.einsum("vbk,vbp->kp", coefficients, self.grads)

    def total(self) -> Tensor:
        """``Σ_b u``."""
        return self.grads.sum(1)


@dataclass(frozen=True)
class Product:
    """``u = Σ_t g_t a_tᵀ``: a ``(d_out, d_in)`` grid laid into a parameter slice.

    Attributes:
        inputs: ``(B, T, d_in)`` inputs at the ``T`` positions sharing the weight; None for a
            bias (``a_t = 1``, ``d_in = 1``).
        grads: ``(V, B, T, d_out)`` gradients of the columns w.r.t. the outputs.
        transposed: The slice stores the grid as ``(d_in, d_out)`` row-major (a weight used
            as ``x @ W``, such as HuggingFace's ``Conv1D``).
        shared: Scratch space shared by the segments of one layer in one batch (a weight and
            its bias have the same output factor ``G``: it is formed once).
    """

    inputs: Tensor | None
    grads: Tensor
    transposed: bool = False
    shared: dict[object, Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def d_out(self) -> int:
        """Output size."""
        return self.grads.shape[-1]

    @property
    def d_in(self) -> int:
        """Input size (1 for a bias)."""
        return 1 if self.inputs is None else self.inputs.shape[-1]

    @property
    def size(self) -> int:
        """Number of parameters covered."""
        return self.d_out * self.d_in

    @property
    def n_columns(self) -> int:
        """``V``."""
        return self.grads.shape[0]

    @property
    def batch(self) -> int:
        """``B``."""
        return self.grads.shape[1]

    @property
    def positions(self) -> int:
        """``T``."""
        return self.grads.shape[2]

    def to(self, dtype: torch.dtype, memo: dict[int, Tensor]) -> Product:
        """Cast to ``dtype``."""
        inputs = None if self.inputs is None else cast(self.inputs, dtype, memo)
        return Product(inputs, cast(self.grads, dtype, memo), self.transposed, self.shared)

    def _a(self) -> Tensor:
        if self.inputs is not None:
            return self.inputs
        return self.grads.new_ones(self.batch, self.positions, 1)

    def _flat(self, grid: Tensor) -> Tensor:
        """A ``(..., d_out, d_in)`` grid in the slice's flat order ``(..., size)``."""
        if self.transposed:
            grid = grid.transpose(-1, -2)
        return grid.reshape(*grid.shape[:-2], -1)

    def _grid(self, flat: Tensor) -> Tensor:
        """Inverse of :meth:`_flat`: ``(..., size)`` to ``(..., d_out, d_in)``."""
        if self.transposed:
            return flat.reshape(*flat.shape[:-1], self.d_in, self.d_out).transpose(-1, -2)
        return flat.reshape(*flat.shape[:-1], self.d_out, self.d_in)

    def per_sample(self) -> Tensor:
        """``u (V, B, size)``."""
        if self.inputs is None:
            return self.grads.sum(2)
        return self._flat(torch.einsum("vbto,bti->vboi", self.grads, self.inputs))

    def diag(self) -> Tensor:
        """Exact diagonal: one GEMM for ``T = 1``, per-sample chunks otherwise."""
        g = self.grads
        if self.inputs is None:
            return g.sum(2).square().sum((0, 1))
        a = self.inputs
        if self.positions == 1:
            return self._flat(g[:, :, 0].square().sum(0).T @ a[:, 0].square())
        total = a.new_zeros(self.d_out, self.d_in)
        step = _batch_chunks(self.n_columns, self.batch, self.size)
        for start in range(0, self.batch, step):
            part = torch.einsum(
                "vbto,bti->vboi", g[:, start : start + step], a[start : start + step]
            )
            total += part.square().sum((0, 1))
        return self._flat(total)

    def kron(self, approx: KfacApprox) -> list[Tensor]:
        """Factors ``G = Σ g gᵀ`` and ``A = Σ a aᵀ`` over rows, and the row count.

        ``expand`` counts every (datum, position) as a row; ``reduce`` sums the output
        gradients and averages the inputs over the positions of each datum first.
        """
        g, a = self.grads, self._a()
        reduce = approx is KfacApprox.REDUCE and self.positions > 1
        if reduce:
            g, a = g.sum(2, keepdim=True), a.mean(1, keepdim=True)
        key = ("G", reduce, g.dtype)
        if key not in self.shared:
            rows_g = g.reshape(-1, self.d_out)
            self.shared[key] = rows_g.T @ rows_g
        rows_a = a.reshape(-1, a.shape[-1])
        count = a.new_full((), float(rows_a.shape[0]))  # a fill kernel, no host copy
        first, second = self.shared[key], rows_a.T @ rows_a
        return [second, first, count] if self.transposed else [first, second, count]

    def rotated(self, first: Tensor | None, second: Tensor | None) -> Product:
        """Rotate ``g`` and ``a`` into the eigenbases of their factors."""
        q_out, q_in = (second, first) if self.transposed else (first, second)
        g = self.grads if q_out is None else self.grads @ q_out
        a = self.inputs
        if q_in is not None:
            a = self._a() @ q_in
        return Product(a, g, self.transposed)

    def gram(self, weights: Tensor) -> Tensor:
        """``(B, V, V)``: a contraction of ``g² ⊗ a²`` for ``T = 1``, chunks otherwise."""
        g = self.grads
        if self.inputs is None:
            s = g.sum(2)
            return torch.einsum("vbo,wbo->bvw", s * weights, s)
        w = self._grid(weights)
        if self.positions == 1:
            per_output = self.inputs[:, 0].square() @ w.T  # (B, d_out)
            return torch.einsum("vbo,wbo->bvw", g[:, :, 0] * per_output, g[:, :, 0])
        out = []
        step = _batch_chunks(self.n_columns, self.batch, self.size)
        for start in range(0, self.batch, step):
            u = torch.einsum(
                "vbto,bti->vboi", g[:, start : start + step], self.inputs[start : start + step]
            )
            out.append(torch.einsum("vboi,wboi->bvw", u * w, u))
        return torch.cat(out)

    def dots(self, vectors: Tensor) -> Tensor:
        """``uᵀX`` through ``a`` and ``g``: ``(V, B, k)``."""
        x = self._grid(vectors)  # (k, d_out, d_in)
        if self.inputs is None:
            return torch.einsum("vbo,ko->vbk", self.grads.sum(2), x[..., 0])
        ax = torch.einsum("bti,koi->btko", self.inputs, x)
        return torch.einsum("vbto,btko->vbk", self.grads, ax)

    def combine(self, coefficients: Tensor) -> Tensor:
        """``Σ c u``: ``(k, size)``."""
        if self.inputs is None:
            return torch.einsum("vbk,vbo->ko", coefficients, self.grads.sum(2))
        gc = torch.einsum("vbk,vbto->btko", coefficients, self.grads)
        return self._flat(torch.einsum("btko,bti->koi", gc, self.inputs))

    def total(self) -> Tensor:
        """``Σ_b u``: ``(V, size)``."""
        if self.inputs is None:
            return self.grads.sum((1, 2))
        return self._flat(torch.einsum("vbto,bti->voi", self.grads, self.inputs))


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

    def kron(self, approx: KfacApprox) -> list[Tensor]:
        """``[diag(token counts), Σ g gᵀ, count]`` (one row per looked-up token)."""
        tokens = self.tokens.reshape(-1)
        counts = torch.bincount(tokens, minlength=self.num).to(self.grads.dtype)
        if self.padding_idx is not None:
            counts[self.padding_idx] = 0
        flat = self.grads.reshape(-1, self.dim)
        return [counts, flat.T @ flat, flat.new_full((), float(tokens.numel()))]

    def rotated(self, first: Tensor | None, second: Tensor | None) -> Tokens:
        """Rotate the row gradients (the token factor is diagonal: its basis is the identity)."""
        if first is not None:
            raise ValueError("an embedding's token factor is diagonal; it has no rotation.")
        grads = self.grads if second is None else self.grads @ second
        return Tokens(self.tokens, grads, self.num, self.padding_idx)

    def gram(self, weights: Tensor) -> Tensor:
        """Weighted Gram matrices, through per-sample token sums."""
        sums, token, sample = self._sums()
        w = weights.reshape(self.num, self.dim)[token]  # (U, d)
        parts = torch.einsum("vud,wud->uvw", sums * w, sums)
        out = sums.new_zeros(self.batch, self.n_columns, self.n_columns)
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
