"""Per-sample gradients in factorised form: what a layer rule returns, what structures read.

For one batch, the engine backpropagates ``V`` columns (loss-Hessian square-root columns,
sampled-label gradients, or the true-label gradient) and a layer rule describes, for each
parameter it accounts for, the per-sample, per-column gradients ``u_{v,b}`` as one or more
*segments* covering consecutive slices of the parameter's flat (row-major) vector:

* :class:`Product` — ``u = Σ_t g_t a_tᵀ`` over ``T`` positions that share the weight
  (``nn.Linear``, ``nn.Conv2d`` patches, recurrent steps, attention projections); a bias is
  the case ``a_t = 1``. Kronecker factors, exact diagonals and GLM contractions follow
  without forming ``u``.
  A convolution's weight is a :class:`~laplacefim.curvature.segments.conv.ConvProduct`:
  the same product over patches it unfolds only when asked, with its input factor from
  shifted products of the input where that is cheaper.
* :class:`Tokens` — ``u = Σ_t e_{token_t} g_tᵀ`` (``nn.Embedding``).
* :class:`Samples` — ``u`` itself, ``(V, B, p)`` (any other module, via ``torch.func``).

Every segment answers the same questions (the structures never ask which kind it is):
the exact diagonal ``Σ_{v,b} u²``, Kronecker factors (or None), ``u`` itself, weighted
Gram matrices ``Σ_p u_{v,b,p} u_{w,b,p} w_p``, coordinates in a Kronecker eigenbasis, and
products with vectors (``uᵀX`` and ``Σ c u``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import Tensor

from laplacefim.options import KfacApprox

# Upper bound on elements of a per-sample gradient chunk (V · B_chunk · p); bounds memory.
CHUNK_ELEMENTS = 1 << 24


Rotate = Callable[[Tensor, Tensor], Tensor]


def matmul(x: Tensor, q: Tensor) -> Tensor:
    """``x @ q``."""
    return x @ q


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

    def kron(self, approx: KfacApprox, *, inputs: bool = True) -> list[Tensor | None] | None:
        """``[first, second, count]`` of a Kronecker block ``(first ⊗ second)/count`` in the
        slice's flat order, or None where no Kronecker factorisation exists.

        With ``inputs=False`` the input-side factor and the count are None: the segment is
        a later column part of a batch whose first part counted them (see
        :class:`~laplacefim.curvature.engine.BatchRows`)."""
        ...

    def rotated(
        self, first: Tensor | None, second: Tensor | None, rotate: Rotate = matmul
    ) -> Segment:
        """The segment in the coordinates of the Kronecker basis ``first ⊗ second``
        (orthonormal columns; None for the identity); ``rotate(x, q)`` computes ``x @ q``
        (a caller may share the products between segments)."""
        ...

    def gram(self, weights: Tensor) -> Tensor:
        """``Σ_p u_{v,b,p} u_{w,b,p} weights_p``: ``(B, V, V)``."""
        ...

    def gram_diagonal(self, weights: Tensor) -> Tensor:
        """The diagonal of :meth:`gram`, ``Σ_p u_{v,b,p}² weights_p``: ``(B, V)``."""
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

    def tensors(self) -> list[Tensor]:
        """The tensors the segment holds (to measure its memory)."""
        ...


def join(tensors: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` of the calls of a layer; one call's tensor as it is (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def cast(tensor: Tensor, dtype: torch.dtype, memo: dict[int, Tensor]) -> Tensor:
    """``tensor`` in ``dtype``, converting each distinct tensor once (segments of one layer
    share their output gradients, and keep sharing them)."""
    if tensor.dtype == dtype:
        return tensor
    key = id(tensor)
    if key not in memo:
        memo[key] = tensor.to(dtype)
    return memo[key]


def flat_grid(grid: Tensor, transposed: bool) -> Tensor:
    """A ``(..., d_out, d_in)`` weight grid in a slice's flat order ``(..., size)`` (the slice
    stores ``(d_in, d_out)`` row-major when ``transposed``)."""
    if transposed:
        grid = grid.transpose(-1, -2)
    return grid.reshape(*grid.shape[:-2], -1)


def grid_of(flat: Tensor, d_out: int, d_in: int, transposed: bool) -> Tensor:
    """Inverse of :func:`flat_grid`: ``(..., size)`` to ``(..., d_out, d_in)``."""
    if transposed:
        return flat.reshape(*flat.shape[:-1], d_in, d_out).transpose(-1, -2)
    return flat.reshape(*flat.shape[:-1], d_out, d_in)


def batch_chunks(n_columns: int, batch: int, per_sample: int) -> int:
    return max(1, min(batch, CHUNK_ELEMENTS // max(n_columns * per_sample, 1)))


def gram_of(u: Tensor, weights: Tensor) -> Tensor:
    return torch.einsum("vbp,wbp->bvw", u * weights, u)


def drop_scratch(segments: Mapping[str, list[Segment]]) -> None:
    """Empty the per-batch scratch (``shared``: factors and columns formed once for a
    layer's segments) of segments kept after their batch: every entry is formed again on
    demand, and a kept batch would otherwise hold, say, a 2,048-wide head's 16 MB input
    factor that :func:`footprint` does not count."""
    for segs in segments.values():
        for segment in segs:
            scratch = getattr(segment, "shared", None)
            if isinstance(scratch, dict):
                scratch.clear()


def footprint(segments: Mapping[str, list[Segment]], counted: set[int] | None = None) -> int:
    """Bytes held by the tensors of a batch's segments (shared tensors counted once, and
    none whose id is in ``counted``, which gains the ids counted here)."""
    counted = set() if counted is None else counted
    total = 0
    for segs in segments.values():
        for segment in segs:
            for tensor in segment.tensors():
                if id(tensor) not in counted:
                    counted.add(id(tensor))
                    total += tensor.numel() * tensor.element_size()
    return total
