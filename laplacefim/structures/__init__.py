"""Curvature structures, by name: how the curvature is approximated.

Each structure is one class implementing :class:`~laplacefim.structures.base.StructureSpec`
(its blocks implement :class:`~laplacefim.structures.base.Block`) and one line in
:data:`STRUCTURES`. ``Laplace(structure=...)`` takes a registered name or an instance (for
a structure with options, e.g. ``LowRank(rank=30)``).
"""

from __future__ import annotations

from typing import Any

from laplacefim.registry import Registry
from laplacefim.structures.base import Block, BlockDiagonal, Plan, StructureSpec
from laplacefim.structures.diag import DiagBlock, Diagonal
from laplacefim.structures.ekfac import EKFAC
from laplacefim.structures.full import Full
from laplacefim.structures.kron import Kron, KronBlock
from laplacefim.structures.lowrank import LowRank

STRUCTURES: Registry[Any] = Registry("structure")
STRUCTURES.register("full", Full)
STRUCTURES.register("diag", Diagonal)
STRUCTURES.register("kron", Kron)
STRUCTURES.register("ekfac", EKFAC)
STRUCTURES.register("lowrank", LowRank)


def make_structure(spec: object, options: dict[str, Any] | None = None) -> StructureSpec:
    """A structure from a registered name (with ``options``) or an instance.

    Raises:
        ValueError: For an unknown name; the message lists the registered ones.
        TypeError: For an object that is neither.
    """
    if isinstance(spec, str):
        return STRUCTURES.get(spec)(**(options or {}))
    if isinstance(spec, tuple(STRUCTURES.entries())):
        return spec  # type: ignore[return-value]
    raise TypeError(
        f"structure must be one of {STRUCTURES.names} or an instance of a registered "
        f"structure class, got {type(spec).__name__}."
    )


def save_blocks(curvature: BlockDiagonal) -> list[list[Any]]:
    """Every block as ``[type name, spec, tensors]``: plain values and (copied) tensors."""
    out = []
    for block in curvature.blocks:
        spec, tensors = block.save()
        out.append([type(block).__name__, spec, [t.clone() for t in tensors]])
    return out


def restore_blocks(saved: list[Any]) -> BlockDiagonal:
    """Rebuild blocks saved by :func:`save_blocks` (``[type name, spec, tensors]`` each).

    Raises:
        ValueError: For a block type no registered structure builds.
    """
    types = {
        cls.__name__: cls
        for structure in STRUCTURES.entries()
        for cls in (*structure.block_types, DiagBlock)
    }
    blocks = []
    for name, spec, tensors in saved:
        if name not in types:
            raise ValueError(f"the saved curvature has a block of unknown type {name!r}.")
        blocks.append(types[name].restore(spec, tensors))
    return BlockDiagonal(blocks)


__all__ = [
    "STRUCTURES",
    "Block",
    "BlockDiagonal",
    "DiagBlock",
    "KronBlock",
    "LowRank",
    "Plan",
    "StructureSpec",
    "make_structure",
    "restore_blocks",
    "save_blocks",
]
