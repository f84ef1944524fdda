"""How the flat parameters group into structure blocks and into layers, for priors.

Kept as plain integers per parameter tensor (not one index per parameter), so the layout
costs nothing next to the model and needs no device work.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from laplacefim.options import PriorStructure
from laplacefim.subsets import Selection


@dataclass(frozen=True)
class Layout:
    """Blocks and layers along the flat parameter vector.

    Attributes:
        block_sizes: Number of parameters of each block, in flat order.
        tensor_sizes: Number of parameters of each chosen parameter tensor, in flat order.
        tensor_layers: Layer index of each chosen parameter tensor.
        n_layers: Number of layers (modules owning chosen parameters).
    """

    block_sizes: tuple[int, ...]
    tensor_sizes: tuple[int, ...]
    tensor_layers: tuple[int, ...]
    n_layers: int

    @classmethod
    def of(cls, selection: Selection, block_sizes: Sequence[int] | None = None) -> Layout:
        """The layout of a selection: a layer per module; one block unless ``block_sizes``."""
        modules = [name.rpartition(".")[0] for name in selection.names]
        index = {module: i for i, module in enumerate(dict.fromkeys(modules))}
        sizes = tuple(param.numel() for param in selection.params)
        blocks = tuple(block_sizes) if block_sizes is not None else (sum(sizes),)
        if sum(blocks) != sum(sizes):
            raise ValueError(f"blocks cover {sum(blocks)} parameters, the selection {sum(sizes)}.")
        return cls(blocks, sizes, tuple(index[m] for m in modules), len(index))

    @property
    def n_params(self) -> int:
        """Number of parameters ``P``."""
        return sum(self.tensor_sizes)

    def prior_structure(self, prior: Tensor) -> PriorStructure:
        """Which structure a prior tensor has, from its shape.

        Raises:
            ValueError: If the shape fits none: ``()``, ``(n_layers,)`` or ``(P,)``.
        """
        if prior.ndim == 0:
            return PriorStructure.SCALAR
        if prior.ndim == 1 and prior.numel() == self.n_params:
            return PriorStructure.DIAGONAL
        if prior.ndim == 1 and prior.numel() == self.n_layers:
            return PriorStructure.LAYERWISE
        raise ValueError(
            f"a prior precision of shape {tuple(prior.shape)} fits neither a scalar, one value "
            f"per layer ({self.n_layers},) nor one per parameter ({self.n_params},)."
        )

    def _expand(self, prior: Tensor, start: int, stop: int) -> Tensor:
        """A layerwise prior expanded over the flat range ``[start, stop)``."""
        layers, counts = [], []
        offsets = itertools.accumulate(self.tensor_sizes, initial=0)
        for first, size, layer in zip(offsets, self.tensor_sizes, self.tensor_layers, strict=False):
            overlap = min(stop, first + size) - max(start, first)
            if overlap > 0:
                layers.append(layer)
                counts.append(overlap)
        index = torch.tensor(layers, device=prior.device)
        return prior[index.repeat_interleave(torch.tensor(counts, device=prior.device))]

    def per_param(self, prior: Tensor) -> Tensor:
        """The prior expanded to every parameter ``(P,)``."""
        structure = self.prior_structure(prior)
        if structure is PriorStructure.SCALAR:
            return prior.expand(self.n_params)
        if structure is PriorStructure.LAYERWISE:
            return self._expand(prior, 0, self.n_params)
        return prior

    def per_block(self, prior: Tensor) -> list[Tensor]:
        """The prior of each block: 0-d where it is constant on the block, else ``(p,)``."""
        structure = self.prior_structure(prior)
        if structure is PriorStructure.SCALAR:
            return [prior for _ in self.block_sizes]
        if structure is PriorStructure.DIAGONAL:
            return list(prior.split(list(self.block_sizes)))
        out = []
        for start, size in zip(
            itertools.accumulate(self.block_sizes, initial=0), self.block_sizes, strict=False
        ):
            layers = self._layers(start, start + size)
            single = len(layers) == 1
            out.append(prior[layers[0]] if single else self._expand(prior, start, start + size))
        return out

    def _layers(self, start: int, stop: int) -> list[int]:
        found = []
        offsets = itertools.accumulate(self.tensor_sizes, initial=0)
        for first, size, layer in zip(offsets, self.tensor_sizes, self.tensor_layers, strict=False):
            if min(stop, first + size) > max(start, first) and layer not in found:
                found.append(layer)
        return found
