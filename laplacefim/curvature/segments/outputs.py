"""Segments of a layer that gives the model's output: no backward pass, no ``(V, B, C)``
columns for the structures that need only sums.

When a linear layer's output *is* the model's output ``(B, C)``, the columns reaching it
are the columns themselves, and two cases need not form them per datum:

* :class:`CurvatureProduct` — the loss-Hessian columns ``s_v`` of datum ``b`` enter only
  through ``M_b = Σ_v s_v s_vᵀ``, which the likelihood gives in closed form
  (:class:`~laplacefim.likelihoods.base.OutputCurvature`: ``diag(d_b) − l_b l_bᵀ``). The
  Kronecker output factor ``Σ_b M_b`` costs ``B·C²`` (not the ``B·C³`` of
  ``Σ_{v,b} s sᵀ``) and the exact diagonal ``B·C·d``; any other question materialises the
  columns once and asks a :class:`Product`.
* :class:`SharedProduct` — columns shared by every datum, ``u_{v,b} = c_v a_bᵀ``: the
  Jacobian of the outputs (``c_v = e_v``). In a Kronecker eigenbasis the columns become
  the rows of ``Q``, so the diagonal of ``J Σ Jᵀ`` costs ``B·C²`` and nothing is
  ``(C, B, C)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from laplacefim.curvature.segments.base import Rotate, cast, flat_grid, grid_of, matmul
from laplacefim.curvature.segments.product import Product, symmetric_gram
from laplacefim.likelihoods.base import OutputCurvature
from laplacefim.options import KfacApprox


def _ones(like: Tensor, batch: int) -> Tensor:
    return like.new_ones(batch, 1)


@dataclass(frozen=True)
class CurvatureProduct:
    """``u_{v,b} = s_{v,b} a_bᵀ`` with ``Σ_v s_{v,b} s_{v,b}ᵀ = M_b`` known in closed form.

    Attributes:
        inputs: ``(B, d_in)``; None for a bias.
        curvature: ``M_b``.
        transposed: The slice stores the grid as ``(d_in, d_out)``.
        shared: Scratch space shared with the layer's other segment (weight and bias have
            the same output factor).
    """

    inputs: Tensor | None
    curvature: OutputCurvature
    transposed: bool = False
    shared: dict[object, Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def grads(self) -> Tensor:
        """``d`` (the segment's dtype and device)."""
        return self.curvature.diagonal

    @property
    def d_out(self) -> int:
        """Output size ``C``."""
        return self.curvature.diagonal.shape[1]

    @property
    def d_in(self) -> int:
        """Input size (1 for a bias)."""
        return 1 if self.inputs is None else self.inputs.shape[1]

    @property
    def size(self) -> int:
        """Number of parameters covered."""
        return self.d_out * self.d_in

    @property
    def n_columns(self) -> int:
        """``V``."""
        return self.curvature.n_columns

    @property
    def batch(self) -> int:
        """``B``."""
        return self.curvature.diagonal.shape[0]

    def to(self, dtype: torch.dtype, memo: dict[int, Tensor]) -> CurvatureProduct:
        """Cast to ``dtype``."""
        inputs = None if self.inputs is None else cast(self.inputs, dtype, memo)
        key = ("curvature", id(self.curvature), dtype)
        if key not in self.shared:  # the weight and the bias keep one curvature
            self.shared[key] = self.curvature.to(dtype)  # type: ignore[assignment]
        curvature: OutputCurvature = self.shared[key]  # type: ignore[assignment]
        return CurvatureProduct(inputs, curvature, self.transposed, self.shared)

    def _a(self) -> Tensor:
        return _ones(self.grads, self.batch) if self.inputs is None else self.inputs

    def product(self) -> Product:
        """The same segment with its columns formed (``(V, B, 1, C)``; shared by the layer)."""
        key = ("columns", id(self.curvature))
        if key not in self.shared:
            self.shared[key] = self.curvature.root()
        columns = self.shared[key][:, :, None]
        inputs = None if self.inputs is None else self.inputs[:, None]
        return Product(inputs, columns, self.transposed)

    def per_sample(self) -> Tensor:
        """``u (V, B, size)``, formed."""
        return self.product().per_sample()

    def diag(self) -> Tensor:
        """``diag(M_b)ᵀ a²``: ``B·C·d``."""
        return flat_grid(self.curvature.diagonals().T @ self._a().square(), self.transposed)

    def _output_factor(self) -> Tensor:
        """``G = Σ_b M_b``, shared with the layer's bias."""
        key = ("G", id(self.curvature))
        if key not in self.shared:
            self.shared[key] = self.curvature.total()
        return self.shared[key]

    def kron(self, approx: KfacApprox, *, inputs: bool = True) -> list[Tensor | None]:
        """``G = Σ_b M_b`` (``B·C²``), ``A = Σ_b a aᵀ``, count ``B`` (``A`` and the count
        None where ``inputs`` is False)."""
        first: Tensor | None = self._output_factor()
        second = count = None
        if inputs:
            a_key = ("A", id(self.inputs))
            if self.inputs is None or a_key not in self.shared:
                a = self._a()
                self.shared[a_key] = a.T @ a
            second = self.shared[a_key]
            count = self.grads.new_full((), float(self.batch))
        return [second, first, count] if self.transposed else [first, second, count]

    def kron_into(self, approx: KfacApprox, totals: list[Tensor], *, inputs: bool = True) -> bool:
        """Add :meth:`kron` to running totals ``[first, second, count]`` in place, the input
        factor multiplied straight into its total (a fresh ``d × d`` per batch, 16 MB for a
        2,048-feature head, cost as much as the product); False (nothing added) for a bias
        or totals of another dtype."""
        a_total, g_total = (totals[0], totals[1]) if self.transposed else (totals[1], totals[0])
        if self.inputs is None or a_total.ndim != 2 or a_total.dtype != self.inputs.dtype:
            return False
        g_total.add_(self._output_factor())
        if inputs:
            symmetric_gram(self.inputs.T, a_total)
            totals[2].add_(self.batch)
        return True

    def rotated(
        self, first: Tensor | None, second: Tensor | None, rotate: Rotate = matmul
    ) -> Product:
        """The formed segment, rotated."""
        return self.product().rotated(first, second, rotate)

    def gram(self, weights: Tensor) -> Tensor:
        """``(B, V, V)``, formed."""
        return self.product().gram(weights)

    def gram_diagonal(self, weights: Tensor) -> Tensor:
        """``(B, V)``, formed."""
        return self.product().gram_diagonal(weights)

    def dots(self, vectors: Tensor) -> Tensor:
        """``uᵀX`` ``(V, B, k)``, formed."""
        return self.product().dots(vectors)

    def combine(self, coefficients: Tensor) -> Tensor:
        """``Σ c u`` ``(k, size)``, formed."""
        return self.product().combine(coefficients)

    def total(self) -> Tensor:
        """``Σ_b u`` ``(V, size)``, formed."""
        return self.product().total()

    def tensors(self) -> list[Tensor]:
        """The tensors the segment holds (the columns are formed only on demand)."""
        held = [self.curvature.diagonal]
        if self.curvature.outer is not None:
            held.append(self.curvature.outer)
        return held if self.inputs is None else [self.inputs, *held]


@dataclass(frozen=True)
class SharedProduct:
    """``u_{v,b} = c_v a_bᵀ``: columns shared by every datum (the Jacobian: ``c_v = e_v``).

    Attributes:
        inputs: ``(B, d_in)``; None for a bias.
        columns: ``(V, d_out)``.
        batch: ``B``.
        identity: Whether ``columns`` is the identity (a rotation then just takes the
            basis).
        transposed: The slice stores the grid as ``(d_in, d_out)``.
    """

    inputs: Tensor | None
    columns: Tensor
    batch: int
    identity: bool = False
    transposed: bool = False

    @property
    def grads(self) -> Tensor:
        """The columns (the segment's dtype and device)."""
        return self.columns

    @property
    def d_out(self) -> int:
        """Output size."""
        return self.columns.shape[1]

    @property
    def d_in(self) -> int:
        """Input size (1 for a bias)."""
        return 1 if self.inputs is None else self.inputs.shape[1]

    @property
    def size(self) -> int:
        """Number of parameters covered."""
        return self.d_out * self.d_in

    @property
    def n_columns(self) -> int:
        """``V``."""
        return self.columns.shape[0]

    def to(self, dtype: torch.dtype, memo: dict[int, Tensor]) -> SharedProduct:
        """Cast to ``dtype``."""
        inputs = None if self.inputs is None else cast(self.inputs, dtype, memo)
        columns = cast(self.columns, dtype, memo)
        return SharedProduct(inputs, columns, self.batch, self.identity, self.transposed)

    def _a(self) -> Tensor:
        return _ones(self.columns, self.batch) if self.inputs is None else self.inputs

    def _flat(self, grid: Tensor) -> Tensor:
        return flat_grid(grid, self.transposed)

    def _grid(self, flat: Tensor) -> Tensor:
        return grid_of(flat, self.d_out, self.d_in, self.transposed)

    def per_sample(self) -> Tensor:
        """``u (V, B, size)``."""
        return self._flat(torch.einsum("vo,bi->vboi", self.columns, self._a()))

    def diag(self) -> Tensor:
        """``Σ_v c_v² ⊗ Σ_b a_b²``."""
        grid = torch.outer(self.columns.square().sum(0), self._a().square().sum(0))
        return self._flat(grid)

    def kron(self, approx: KfacApprox, *, inputs: bool = True) -> list[Tensor | None]:
        """``G = B·CᵀC``, ``A = Σ_b a aᵀ``, count ``B`` (``A`` and the count None where
        ``inputs`` is False)."""
        first: Tensor | None = self.batch * (self.columns.T @ self.columns)
        second = count = None
        if inputs:
            a = self._a()
            second = a.T @ a
            count = self.columns.new_full((), float(self.batch))
        return [second, first, count] if self.transposed else [first, second, count]

    def rotated(
        self, first: Tensor | None, second: Tensor | None, rotate: Rotate = matmul
    ) -> SharedProduct:
        """The columns and inputs in the factors' eigenbases; rotated identity columns are
        the output basis itself (no product)."""
        q_out, q_in = (second, first) if self.transposed else (first, second)
        columns = self.columns
        if q_out is not None:
            columns = q_out if self.identity else rotate(self.columns, q_out)
        inputs = self.inputs if q_in is None else rotate(self._a(), q_in)
        identity = self.identity and q_out is None
        return SharedProduct(inputs, columns, self.batch, identity, self.transposed)

    def _per_output(self, weights: Tensor) -> Tensor:
        """``Σ_i a_{b,i}² W_{o,i}``: ``(B, d_out)``."""
        return self._a().square() @ self._grid(weights).T

    def gram(self, weights: Tensor) -> Tensor:
        """``C diag(s_b) Cᵀ`` per datum, ``(B, V, V)``: ``B·V²·C`` (the full covariance)."""
        s = self._per_output(weights)
        return (self.columns[None] * s[:, None, :]) @ self.columns.T

    def gram_diagonal(self, weights: Tensor) -> Tensor:
        """``s (C²)ᵀ``, ``(B, V)``: ``B·V·C``."""
        return self._per_output(weights) @ self.columns.square().T

    def dots(self, vectors: Tensor) -> Tensor:
        """``uᵀX``: ``(V, B, k)``."""
        ax = torch.einsum("bi,koi->bko", self._a(), self._grid(vectors))
        return torch.einsum("vo,bko->vbk", self.columns, ax)

    def combine(self, coefficients: Tensor) -> Tensor:
        """``Σ c u``: ``(k, size)``."""
        cc = torch.einsum("vbk,vo->bko", coefficients, self.columns)
        return self._flat(torch.einsum("bko,bi->koi", cc, self._a()))

    def total(self) -> Tensor:
        """``Σ_b u``: ``(V, size)``."""
        return self._flat(torch.einsum("vo,i->voi", self.columns, self._a().sum(0)))

    def tensors(self) -> list[Tensor]:
        """The tensors the segment holds."""
        return [self.columns] if self.inputs is None else [self.inputs, self.columns]
