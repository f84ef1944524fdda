"""The structure protocol: blocks that accumulate statistics, and their decompositions.

A *structure* (``"kron"``, ``"diag"``, ...) lays blocks along the flat parameter vector
from the first batch's segments. A **block** accumulates summable statistics from each
batch's segments (so a distributed fit is one all-reduce), possibly over several passes
over the data, and decomposes once. A **decomposition** turns into a posterior
**precision** for any prior cheaply; the precision answers everything the evidence,
the predictives and sampling need. Nothing outside a structure's own file asks which
structure it is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from laplacefim.curvature.segments import Samples, Segment
from laplacefim.options import CurvatureKind, KfacApprox

SegmentMap = Mapping[str, list[Segment]]
T = TypeVar("T")


class Precision(Protocol):
    """A decomposed posterior-precision block ``P = s·F + diag(prior)``."""

    @property
    def elementwise(self) -> bool:
        """Whether ``P`` is diagonal."""
        ...

    @property
    def dense(self) -> bool:
        """Whether ``P`` is an unstructured dense matrix."""
        ...

    @property
    def numel(self) -> int:
        """Number of parameters covered."""
        ...

    def logdet(self) -> Tensor:
        """``log det P``."""
        ...

    def solve(self, v: Tensor) -> Tensor:
        """``Σ v`` for row vectors ``(..., p)``."""
        ...

    def quad(self, v: Tensor) -> Tensor:
        """``vᵀ P v`` for row vectors ``(..., p)``."""
        ...

    def sample(self, z: Tensor) -> Tensor:
        """Map standard normal rows ``(..., p)`` to ``N(0, Σ)`` draws."""
        ...

    def covariance_diagonal(self) -> Tensor:
        """``diag(Σ)`` ``(p,)``."""
        ...

    def functional_variance(self, segments: Sequence[Segment]) -> Tensor:
        """``J Σ Jᵀ`` per datum ``(B, V, V)`` for the block's segments of a Jacobian."""
        ...

    def functional_variance_diagonal(self, segments: Sequence[Segment]) -> Tensor:
        """The diagonal of :meth:`functional_variance`, ``(B, V)``, without the rest."""
        ...

    def eigenvalue_range(self) -> tuple[Tensor, Tensor]:
        """Smallest and largest eigenvalue of ``P`` (0-d each)."""
        ...

    def to_dense(self) -> Tensor:
        """Dense ``P`` ``(p, p)`` (small blocks only)."""
        ...

    def covariance(self) -> Tensor:
        """Dense ``Σ`` ``(p, p)`` (small blocks only)."""
        ...

    def to(self, dtype: torch.dtype) -> Precision:
        """The same precision in ``dtype``."""
        ...


class Decomposition(Protocol):
    """A fitted curvature block, decomposed once."""

    def with_prior(self, scale: Tensor | float, prior: Tensor) -> Precision:
        """``scale·F + diag(prior)`` (``prior`` 0-d or ``(p,)``), decomposed."""
        ...

    def eigenvalues(self) -> Tensor:
        """Eigenvalues of the curvature block ``(p,)``."""
        ...


class Block(Protocol):
    """A block of the curvature over consecutive parameters.

    Attributes:
        active: Whether it accumulates in the current pass over the data.
    """

    active: bool

    @property
    def names(self) -> tuple[str, ...]:
        """The chosen parameters whose segments it reads."""
        ...

    @property
    def numel(self) -> int:
        """Number of parameters covered."""
        ...

    def statistics(self, segments: SegmentMap, *, inputs: bool = True) -> Sequence[Tensor | None]:
        """One batch's contribution, laid out as :meth:`state`.

        Most statistics are sums over the backpropagated columns, and a batch's columns
        may come in parts (:class:`~laplacefim.curvature.engine.BatchRows`). With
        ``inputs=False`` the segments are a later part, and a statistic that depends on
        the inputs only (a Kronecker input factor, a row count) is None: the first part
        counted it."""
        ...

    def covered(self, segments: SegmentMap) -> list[Segment] | None:
        """The block's segments of a batch in flat order (None if none of its modules ran)."""
        ...

    def state(self) -> list[Tensor]:
        """Tensors that add up over batches and ranks (in the current pass)."""
        ...

    def end_pass(self) -> None:
        """Finish a pass (after the all-reduce); set ``active`` for the next one."""
        ...

    def to_dense(self) -> Tensor:
        """The block as a dense matrix (small blocks only)."""
        ...

    def diagonal(self) -> Tensor:
        """The block's diagonal."""
        ...

    def decompose(self) -> Decomposition:
        """Decompose the fitted block."""
        ...

    def save(self) -> tuple[dict[str, Any], list[Tensor]]:
        """Plain values and tensors from which :meth:`restore` rebuilds the block."""
        ...


@dataclass(frozen=True)
class Plan:
    """What a structure lays its blocks out from.

    Attributes:
        params: ``(name, numel)`` of every chosen parameter, in flat order.
        segments: The first batch's segments.
        kind: The curvature kind.
        approx: The Kronecker flavour for weights shared over positions.
        max_dense: Largest number of parameters a dense block may cover.
        dtype: Dtype of the statistics.
        device: Device of the statistics.
    """

    params: tuple[tuple[str, int], ...]
    segments: SegmentMap
    kind: CurvatureKind
    approx: KfacApprox
    max_dense: int
    dtype: torch.dtype
    device: torch.device

    def zeros(self, *shape: int) -> Tensor:
        """A zero tensor in the statistics' dtype and device."""
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def n_params(self) -> int:
        """Number of parameters ``P``."""
        return sum(n for _, n in self.params)


class StructureSpec(Protocol):
    """A registered structure.

    Attributes:
        name: Its registry name.
        single_pass: Whether one pass over the data suffices (needed by natural gradient).
        block_types: The block classes it builds (for restoring saved fits).
    """

    name: str
    single_pass: bool
    block_types: tuple[type, ...]

    def options(self) -> dict[str, Any]:
        """Constructor arguments (kept when saving)."""
        ...

    def check(self, n_params: int, kind: CurvatureKind, max_dense: int) -> None:
        """Raise ``ValueError`` if the structure refuses this fit, before any data pass."""
        ...

    def build(self, plan: Plan) -> list[Block]:
        """Blocks in flat order, their states zero."""
        ...


def for_part(method: Callable[..., T], *args: Any, inputs: bool) -> T:
    """``method(*args)`` for a batch's first (or only) column part, ``method(*args,
    inputs=False)`` for a later one: the keyword is passed only where it matters, so a block
    or segment written before it existed keeps working where the columns fit one part."""
    return method(*args) if inputs else method(*args, inputs=False)


def add_statistics(block: Block, segments: SegmentMap, *, inputs: bool = True) -> None:
    """Add a batch's :meth:`Block.statistics` to the block's state in place (None: none)."""
    found = for_part(block.statistics, segments, inputs=inputs)
    for total, part in zip(block.state(), found, strict=True):
        if part is not None:
            total.add_(part.to(total.dtype))


def zeros_like(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Zero tensors shaped as ``tensors``."""
    return [torch.zeros_like(t) for t in tensors]


def gather(
    segments: SegmentMap,
    names: Sequence[str],
    sizes: Sequence[int],
    fn: Callable[[Segment], Tensor],
) -> Tensor | None:
    """``fn`` of every segment of ``names``, concatenated along the last dimension in flat
    order, with zeros for a parameter whose modules did not run; None if none ran."""
    parts: list[Tensor | None] = []
    for name in names:
        segs = segments.get(name)
        parts.append(None if segs is None else torch.cat([fn(s) for s in segs], dim=-1))
    like = next((p for p in parts if p is not None), None)
    if like is None:
        return None
    filled = [
        like.new_zeros(*like.shape[:-1], size) if part is None else part
        for part, size in zip(parts, sizes, strict=True)
    ]
    return torch.cat(filled, dim=-1)


def whole(segments: SegmentMap, names: Sequence[str], sizes: Sequence[int]) -> list[Segment] | None:
    """All segments of ``names`` in flat order, zeros standing in for a parameter whose
    modules did not run; None if none ran."""
    found = [segments.get(name) for name in names]
    like = next((f[0] for f in found if f), None)
    if like is None:
        return None
    out: list[Segment] = []
    for segs, size in zip(found, sizes, strict=True):
        if segs is None:
            out.append(Samples(like.grads.new_zeros(like.n_columns, like.batch, size)))
        else:
            out.extend(segs)
    return out


@dataclass
class BlockDiagonal:
    """Curvature blocks laid along the flat parameter vector, in order.

    Attributes:
        blocks: The blocks, in flat-parameter order.
    """

    blocks: list[Any]

    @property
    def numel(self) -> int:
        """Number of parameters covered."""
        return sum(block.numel for block in self.blocks)

    @property
    def sizes(self) -> list[int]:
        """Parameters covered by each block."""
        return [block.numel for block in self.blocks]

    def state(self) -> list[Tensor]:
        """The summable tensors of every block, block after block."""
        return [tensor for block in self.blocks for tensor in block.state()]

    def active_state(self) -> list[Tensor]:
        """The summable tensors of the blocks accumulating in the current pass."""
        return [tensor for block in self.blocks if block.active for tensor in block.state()]

    def accumulate_(self, segments: SegmentMap, *, inputs: bool = True) -> BlockDiagonal:
        """Add one batch's contribution to the active blocks' state, block by block (a
        block with ``accumulate_`` forms it in place), so that a batch never holds more
        than one block's fresh statistics; ``inputs=False`` for a later column part of
        the batch (see :meth:`Block.statistics`)."""
        for block in self.blocks:
            if block.active:
                own = getattr(block, "accumulate_", None)
                if own is None:
                    add_statistics(block, segments, inputs=inputs)
                else:
                    for_part(own, segments, inputs=inputs)
        return self

    def scale_(self, factor: float) -> BlockDiagonal:
        """Multiply every block's state by ``factor`` in place."""
        for tensor in self.state():
            tensor.mul_(factor)
        return self

    def zero_(self) -> BlockDiagonal:
        """Set every block's state to zero in place."""
        for tensor in self.state():
            tensor.zero_()
        return self

    def end_pass(self) -> bool:
        """Finish a pass over the data; True if another pass is needed."""
        for block in self.blocks:
            if block.active:
                block.end_pass()
        return any(block.active for block in self.blocks)

    def to_dense(self) -> Tensor:
        """The whole curvature as a dense ``(P, P)`` matrix."""
        return torch.block_diag(*(block.to_dense() for block in self.blocks))

    def diagonal(self) -> Tensor:
        """The diagonal ``(P,)``."""
        return torch.cat([block.diagonal() for block in self.blocks])

    def decompose(self) -> list[Decomposition]:
        """Every block's decomposition."""
        return [block.decompose() for block in self.blocks]

    def clone(self) -> BlockDiagonal:
        """A deep copy whose tensors share no memory with this one."""
        return copy.deepcopy(self)

    def zeros_like(self) -> BlockDiagonal:
        """A fresh accumulator of the same layout (single-pass blocks): every state tensor
        zero, every block active."""
        fresh = self.clone().zero_()
        for block in fresh.blocks:
            block.active = True
        return fresh
