"""``u = Σ_t g_t a_tᵀ``: weights applied at positions (linear layers, convolutions, ...)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from laplacefim.curvature.segments.base import (
    Rotate,
    batch_chunks,
    cast,
    flat_grid,
    grid_of,
    join,
    matmul,
)
from laplacefim.options import KfacApprox

# Factor Gram matrices of at least this many rows, from at least this many entries, are
# formed a block triangle at a time (smaller products lose more to the extra calls).
SYMMETRIC_GRAM_MIN = 512
SYMMETRIC_GRAM_MIN_ENTRIES = 1 << 21


class ProductShape:
    """The sizes of a ``(d_out, d_in)`` grid of weights shared over positions, read from
    its ``(V, B, T, d_out)`` output gradients (``d_in`` is the subclass's)."""

    grads: Tensor

    @property
    def d_in(self) -> int:
        """Input size."""
        raise NotImplementedError

    @property
    def d_out(self) -> int:
        """Output size."""
        return self.grads.shape[-1]

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


@dataclass(frozen=True)
class Product(ProductShape):
    """``u = Σ_t g_t a_tᵀ``: a ``(d_out, d_in)`` grid laid into a parameter slice.

    Attributes:
        inputs: ``(B, T, d_in)`` inputs at the ``T`` positions sharing the weight; None for a
            bias (``a_t = 1``, ``d_in = 1``).
        grads: ``(V, B, T, d_out)`` gradients of the columns w.r.t. the outputs.
        transposed: The slice stores the grid as ``(d_in, d_out)`` row-major (a weight used
            as ``x @ W``, such as HuggingFace's ``Conv1D``).
        shared: Scratch space shared by the segments of one layer in one batch, keyed by
            tensor: a weight and its bias have the same output factor ``G``, the query, key
            and value projections of self-attention the same input factor ``A``; each is
            formed once.
        sole_inputs: No other segment in ``shared`` has these inputs, so the input factor
            may be formed straight into a running total (:meth:`kron_into`).
    """

    inputs: Tensor | None
    grads: Tensor
    transposed: bool = False
    shared: dict[object, Tensor] = field(default_factory=dict, compare=False, repr=False)
    sole_inputs: bool = True

    @property
    def d_in(self) -> int:
        """Input size (1 for a bias)."""
        return 1 if self.inputs is None else self.inputs.shape[-1]

    def to(self, dtype: torch.dtype, memo: dict[int, Tensor]) -> Product:
        """Cast to ``dtype``."""
        inputs = None if self.inputs is None else cast(self.inputs, dtype, memo)
        grads = cast(self.grads, dtype, memo)
        return Product(inputs, grads, self.transposed, self.shared, self.sole_inputs)

    def _a(self) -> Tensor:
        if self.inputs is not None:
            return self.inputs
        return self.grads.new_ones(self.batch, self.positions, 1)

    def _flat(self, grid: Tensor) -> Tensor:
        return flat_grid(grid, self.transposed)

    def _grid(self, flat: Tensor) -> Tensor:
        return grid_of(flat, self.d_out, self.d_in, self.transposed)

    def per_sample(self) -> Tensor:
        """``u (V, B, size)``."""
        if self.inputs is None:
            return self.grads.sum(2)
        return self._flat(torch.einsum("vbto,bti->vboi", self.grads, self.inputs))

    def diag(self) -> Tensor:
        """Exact diagonal: one GEMM for ``T = 1``, per-sample chunks otherwise."""
        g = self.grads
        if self.positions == 1:
            squares = _sum_columns(g[:, :, 0].square())  # (B, d_out)
            if self.inputs is None:
                return squares.sum(0)
            return self._flat(squares.T @ self.inputs[:, 0].square())
        if self.inputs is None:
            return _sum_columns(g.sum(2).square()).sum(0)
        a = self.inputs
        total = a.new_zeros(self.n_columns * self.d_out, self.d_in)
        for part in self._per_sample_chunks():
            total += part.square_().sum(0)
        return self._flat(total.reshape(self.n_columns, self.d_out, self.d_in).sum(0))

    def _per_sample_chunks(self) -> Iterator[Tensor]:
        """The per-sample gradients ``(n, V·d_out, d_in)`` of ``n`` data at a time, in batch
        order, in one reused buffer (overwritten by the next chunk).

        A fresh ``(V, chunk, d_out, d_in)`` tensor per chunk, and its square, cost more in
        memory traffic than the product itself where T is small and d_in large (deep
        convolutions); the callers square the buffer in place.
        """
        n_cols, batch = self.n_columns, self.batch
        left = self.grads.permute(1, 0, 3, 2).reshape(batch, n_cols * self.d_out, self.positions)
        step = batch_chunks(n_cols, batch, self.size)
        a = self._a()
        buffer = a.new_empty(min(step, batch), n_cols * self.d_out, self.d_in)
        for start in range(0, batch, step):
            part = buffer[: min(step, batch - start)]
            torch.bmm(left[start : start + step], a[start : start + step], out=part)
            yield part

    def kron(self, approx: KfacApprox, *, inputs: bool = True) -> list[Tensor | None]:
        """Factors ``G = Σ g gᵀ`` and ``A = Σ a aᵀ`` over rows, and the row count (``A``
        and the count None where ``inputs`` is False).

        ``expand`` counts every (datum, position) as a row; ``reduce`` sums the output
        gradients and averages the inputs over the positions of each datum first.
        """
        reduce = approx is KfacApprox.REDUCE and self.positions > 1
        first: Tensor | None = self._output_factor(reduce)
        second = count = None
        if inputs:
            a_key = ("A", id(self.inputs), reduce)
            if self.inputs is None or a_key not in self.shared:
                a = self._a().mean(1, keepdim=True) if reduce else self._a()
                self.shared[a_key] = _row_gram(a)
            second = self.shared[a_key]
            rows = self.batch * (1 if reduce else self.positions)
            count = self.grads.new_full((), float(rows))  # a fill kernel, no host copy
        return [second, first, count] if self.transposed else [first, second, count]

    def _output_factor(self, reduce: bool) -> Tensor:
        """``G``, shared with the layer's bias."""
        key = ("G", id(self.grads), reduce)
        if key not in self.shared:
            g = self.grads.sum(2, keepdim=True) if reduce else self.grads
            self.shared[key] = _row_gram(g)
        return self.shared[key]

    def kron_into(self, approx: KfacApprox, totals: list[Tensor], *, inputs: bool = True) -> bool:
        """Add :meth:`kron` to running totals ``[first, second, count]`` in place, the input
        factor multiplied straight into its total (a fresh ``d × d`` per batch and its add
        cost as much as the product where rows are few); False (nothing added) for a bias,
        inputs another segment shares (their factor is formed once, in ``shared``), or
        totals of another dtype."""
        a_total, g_total = (totals[0], totals[1]) if self.transposed else (totals[1], totals[0])
        if (
            self.inputs is None
            or not self.sole_inputs
            or a_total.ndim != 2
            or a_total.dtype != self.inputs.dtype
        ):
            return False
        reduce = approx is KfacApprox.REDUCE and self.positions > 1
        g_total.add_(self._output_factor(reduce))
        if inputs:
            _row_gram(self.inputs.mean(1, keepdim=True) if reduce else self.inputs, a_total)
            totals[2].add_(self.batch * (1 if reduce else self.positions))
        return True

    def rotated(
        self, first: Tensor | None, second: Tensor | None, rotate: Rotate = matmul
    ) -> Product:
        """Rotate ``g`` and ``a`` into the eigenbases of their factors."""
        q_out, q_in = (second, first) if self.transposed else (first, second)
        g = self.grads if q_out is None else rotate(self.grads, q_out)
        a = self.inputs
        if q_in is not None:
            a = rotate(self._a(), q_in)
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
        step = batch_chunks(self.n_columns, self.batch, self.size)
        for start in range(0, self.batch, step):
            u = torch.einsum(
                "vbto,bti->vboi", g[:, start : start + step], self.inputs[start : start + step]
            )
            out.append(torch.einsum("vboi,wboi->bvw", u * w, u))
        return torch.cat(out)

    def gram_diagonal(self, weights: Tensor) -> Tensor:
        """``(B, V)``: ``g²`` against ``a²`` for ``T = 1``, chunks otherwise."""
        g = self.grads
        if self.inputs is None:
            return torch.einsum("vbo,o->bv", g.sum(2).square(), weights)
        w = self._grid(weights)
        if self.positions == 1:
            per_output = self.inputs[:, 0].square() @ w.T  # (B, d_out)
            return torch.einsum("vbo,bo->bv", g[:, :, 0].square(), per_output)
        out = []
        for part in self._per_sample_chunks():
            u2 = part.square_().reshape(part.shape[0], self.n_columns, self.d_out, self.d_in)
            out.append(torch.einsum("bvoi,oi->bv", u2, w))
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

    def tensors(self) -> list[Tensor]:
        """The tensors the segment holds."""
        return [self.grads] if self.inputs is None else [self.inputs, self.grads]


def _sum_columns(x: Tensor) -> Tensor:
    """``Σ_v x_v`` over the leading columns dimension; a single column is taken as it is (on
    CPU a reduction over a dimension of size 1 costs as much as a real one, 0.2 ms for a
    ``(1, 128, 256)`` tensor here)."""
    return x[0] if x.shape[0] == 1 else x.sum(0)


def _row_gram(x: Tensor, into: Tensor | None = None) -> Tensor:
    """``Σ_rows r rᵀ`` over the rows ``r`` of ``x (..., d)`` (added to ``into`` if given).

    Unfolded patches arrive as a contiguous ``(d, ...)`` tensor: it is the ``(d, rows)``
    matrix already. Convolution output gradients arrive as transposes of contiguous
    ``(..., d, T)`` tensors; for them the ``(d, rows)`` matrix is gathered in runs of ``T``
    contiguous entries, where laying out ``(rows, d)`` would transpose element by element.
    """
    d = x.shape[-1]
    if x.dim() > 2 and x.movedim(-1, 0).is_contiguous():
        return symmetric_gram(x.movedim(-1, 0).reshape(d, -1), into)
    if x.dim() > 2 and not x.is_contiguous() and x.transpose(-1, -2).is_contiguous():
        return symmetric_gram(x.transpose(-1, -2).movedim(-2, 0).reshape(d, -1), into)
    return symmetric_gram(x.reshape(-1, d).T, into)


def symmetric_gram(cols: Tensor, into: Tensor | None = None) -> Tensor:
    """``cols @ cols.T`` for ``cols (d, n)``, or ``into += cols @ cols.T`` in place for a
    symmetric ``into`` (a running sum over batches: no fresh ``d × d`` tensor per batch,
    which for the input factor of a 512-channel convolution is 85 MB).

    For ``d ≥ 512`` and ``d·n ≥ 2²¹``, only the blocks on and above the diagonal of a 4x4
    block grid are multiplied (10 of 16) and the rest mirrored, which took 20-30 % off the
    input factors of a ResNet's convolutions here; below that size the extra calls cost
    more than they save."""
    d = cols.shape[0]
    if d < SYMMETRIC_GRAM_MIN or cols.numel() < SYMMETRIC_GRAM_MIN_ENTRIES:
        return cols @ cols.T if into is None else into.addmm_(cols, cols.T)
    out = cols.new_empty(d, d) if into is None else into
    block = -(-d // 4)
    for start in range(0, d, block):
        end = min(start + block, d)
        if into is None:
            torch.mm(cols[start:end], cols[start:].T, out=out[start:end, start:])
        else:
            out[start:end, start:].addmm_(cols[start:end], cols[start:].T)
        out[end:, start:end] = out[start:end, end:].T
    return out


def stack_positions(products: list[Product]) -> Product:
    """Products of the same weight from several calls, stacked as more positions."""
    first = products[0]
    if len(products) == 1:  # no copy, and the factors it shares stay shared
        return first
    inputs = None
    if first.inputs is not None:
        inputs = join([p.inputs for p in products if p.inputs is not None], 1)
    return Product(inputs, join([p.grads for p in products], 2), first.transposed)
