"""Curvature structures: diagonal, dense and Kronecker blocks in a block diagonal."""

from laplacefim.structures.blockdiag import Block, BlockDiagonal
from laplacefim.structures.dense import DenseBlock, LinearDenseBlock
from laplacefim.structures.diag import DiagBlock
from laplacefim.structures.kron import KronBlock

__all__ = ["Block", "BlockDiagonal", "DenseBlock", "DiagBlock", "KronBlock", "LinearDenseBlock"]
