"""The fit loop: batches in, summed curvature statistics and checks out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from laplacefim.curvature import CurvatureEngine
from laplacefim.marglik import Layout
from laplacefim.options import Likelihood, Structure
from laplacefim.structures import BlockDiagonal
from laplacefim.subsets import Selection, find_last_linear, select

if TYPE_CHECKING:
    from laplacefim.laplace import Laplace


@dataclass(frozen=True)
class FitState:
    """Everything a successful fit produced; swapped in whole so a failed fit changes nothing."""

    selection: Selection
    last_layer: str | None
    curvature: BlockDiagonal
    mean: Tensor
    loss_stats: Tensor
    n_data: int
    sigma_fit: Tensor
    layout: Layout
    input_shape: tuple[int, ...] | None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with the model in eval mode, restoring each module's mode after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def unpack(batch: object, index: int) -> tuple[object, Tensor]:
    """Split a batch into inputs and targets, or raise a TypeError that says what came."""
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        kind = type(batch).__name__
        size = f" of length {len(batch)}" if isinstance(batch, tuple | list) else ""
        raise TypeError(
            f"the loader yielded a {kind}{size} as batch {index}; laplacefim expects "
            "(inputs, targets) pairs, as a TensorDataset in a DataLoader yields."
        )
    x, y = batch
    if not isinstance(y, Tensor):
        raise TypeError(f"batch {index}: targets must be a tensor, got {type(y).__name__}.")
    return x, y


def run_fit(
    la: Laplace, loader: Iterable[Any], progress: bool, generator: torch.Generator | None
) -> FitState:
    """Run the fit loop for ``la``: accumulate the curvature, count the data, check flags."""
    device = next(la.model.parameters()).device
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    engine: CurvatureEngine | None = None
    accumulator: BlockDiagonal | None = None
    selection: Selection | None = None
    last_layer: str | None = None
    loss_stats: Tensor | None = None
    n_data = 0
    flags: list[Tensor] = []
    input_shape: tuple[int, ...] | None = None
    bar = tqdm(loader, total=total, disable=not progress, desc="laplacefim fit", unit="batch")
    for index, batch in enumerate(bar):
        x, y = unpack(batch, index)
        if isinstance(x, Tensor):
            x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if engine is None:
            input_shape = tuple(x.shape[1:]) if isinstance(x, Tensor) else None
            if la.subset == "last_layer":
                last_layer = find_last_linear(la.model, x)
            selection = select(la.model, la.subset, last_layer)
            engine = la._engine(selection)
            accumulator = engine.zeros()
        try:
            stats = engine.batch(x, y, generator)
        except (ValueError, TypeError) as error:
            raise type(error)(f"batch {index}: {error}") from error
        accumulator.add_(stats.contributions)  # type: ignore[union-attr]
        loss_stats = stats.loss_stats if loss_stats is None else loss_stats + stats.loss_stats
        n_data += stats.n_data
        flags.append(torch.stack([stats.bad_outputs, stats.bad_targets]))
    if engine is None or accumulator is None or selection is None or loss_stats is None:
        raise ValueError(
            "the loader yielded no batch; fit needs at least one (inputs, targets) batch."
        )
    raise_on_flags(torch.stack(flags), la.likelihood)
    layout = layout_of(selection, la.structure)
    return FitState(
        selection,
        last_layer,
        accumulator,
        selection.flat(),
        loss_stats,
        n_data,
        la.sigma_noise.clone(),
        layout,
        input_shape,
    )


def layout_of(selection: Selection, structure: Structure) -> Layout:
    """How the chosen parameters group into blocks (per the structure) and layers."""
    modules = [name.rpartition(".")[0] for name in selection.names]
    index = {module: i for i, module in enumerate(dict.fromkeys(modules))}
    layer_of_param = torch.cat(
        [
            torch.full((param.numel(),), index[module], dtype=torch.long)
            for module, param in zip(modules, selection.params, strict=True)
        ]
    )
    sizes = (
        (selection.n_params,)
        if structure is Structure.FULL
        else tuple(param.numel() for param in selection.params)
    )
    return Layout(sizes, layer_of_param.to(selection.params[0].device), len(index))


def raise_on_flags(flags: Tensor, likelihood: Likelihood) -> None:
    """Raise for the first batch whose outputs or targets were flagged on the device."""
    bad = flags.any(dim=0).tolist()  # one host sync, after the loop
    if bad[0]:
        index = int(flags[:, 0].nonzero()[0])
        raise ValueError(
            f"the model's outputs in batch {index} contain NaN or inf; check that batch's "
            "inputs and the model's weights."
        )
    if bad[1]:
        index = int(flags[:, 1].nonzero()[0])
        expected = {
            Likelihood.CLASSIFICATION: "class labels in [0, C)",
            Likelihood.REGRESSION: "finite targets",
            Likelihood.BINARY: "targets equal to 0 or 1",
        }[likelihood]
        raise ValueError(f"batch {index} has targets out of range; expected {expected}.")
