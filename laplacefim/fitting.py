"""The fit loop: batches in, summed curvature statistics and checks out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from laplacefim import distributed
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


def unpack(
    batch: object, index: int, x_key: str | None = None, y_key: str | None = None
) -> tuple[object, Tensor]:
    """Split a batch into inputs and targets, or raise a TypeError that says what came.

    A batch is an ``(inputs, targets)`` pair, or a mapping: then ``y_key`` names the
    targets and ``x_key`` the inputs (without ``x_key`` the model gets the mapping less
    the targets).
    """
    if isinstance(batch, Mapping):
        if y_key is None:
            raise TypeError(
                f"the loader yielded a mapping with keys {sorted(batch)} as batch {index}; "
                "pass y_key= (and x_key=, unless the model takes the mapping) to fit."
            )
        missing = [k for k in (x_key, y_key) if k is not None and k not in batch]
        if missing:
            raise ValueError(f"batch {index} has no keys {missing}; its keys are {sorted(batch)}.")
        x = batch[x_key] if x_key is not None else {k: v for k, v in batch.items() if k != y_key}
        y = batch[y_key]
    elif isinstance(batch, tuple | list) and len(batch) == 2:
        x, y = batch
    else:
        kind = type(batch).__name__
        size = f" of length {len(batch)}" if isinstance(batch, tuple | list) else ""
        raise TypeError(
            f"the loader yielded a {kind}{size} as batch {index}; laplacefim expects "
            "(inputs, targets) pairs, as a TensorDataset in a DataLoader yields, or mappings "
            "with x_key= / y_key=."
        )
    if not isinstance(y, Tensor):
        raise TypeError(f"batch {index}: targets must be a tensor, got {type(y).__name__}.")
    return x, y


def to_device(x: object, device: torch.device) -> object:
    """Move a tensor, or the tensors of a mapping, to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def _length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:  # generators, IterableDatasets without __len__
        return None


@dataclass
class _Sums:
    """What the loop accumulates on one rank."""

    selection: Selection
    last_layer: str | None
    accumulator: BlockDiagonal
    loss_stats: Tensor
    n_data: int
    input_shape: tuple[int, ...] | None


def _loop(
    la: Laplace,
    loader: Iterable[Any],
    progress: bool,
    generator: torch.Generator | None,
    x_key: str | None,
    y_key: str | None,
) -> _Sums:
    device = next(la.model.parameters()).device
    engine: CurvatureEngine | None = None
    sums: _Sums | None = None
    flags: list[Tensor] = []
    bar = tqdm(
        loader, total=_length(loader), disable=not progress, desc="laplacefim fit", unit="batch"
    )
    for index, batch in enumerate(bar):
        x, y = unpack(batch, index, x_key, y_key)
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        if engine is None or sums is None:
            last_layer = find_last_linear(la.model, x) if la.subset == "last_layer" else None
            selection = select(la.model, la.subset, last_layer)
            engine = la._engine(selection)
            shape = tuple(x.shape[1:]) if isinstance(x, Tensor) else None
            sums = _Sums(selection, last_layer, engine.zeros(), torch.zeros(()), 0, shape)
        try:
            stats = engine.batch(x, y, generator)
        except (ValueError, TypeError) as error:
            raise type(error)(f"batch {index}: {error}") from error
        sums.accumulator.add_(stats.contributions)
        sums.loss_stats = stats.loss_stats + (sums.loss_stats if sums.n_data else 0)
        sums.n_data += stats.n_data
        flags.append(torch.stack([stats.bad_outputs, stats.bad_targets]))
    if sums is None:
        raise ValueError(
            "the loader yielded no batch; fit needs at least one (inputs, targets) batch."
        )
    raise_on_flags(torch.stack(flags), la.likelihood)
    return sums


def run_fit(
    la: Laplace,
    loader: Iterable[Any],
    progress: bool,
    generator: torch.Generator | None,
    *,
    group: distributed.Group = None,
    reduce: bool = True,
    x_key: str | None = None,
    y_key: str | None = None,
) -> FitState:
    """Run the fit loop for ``la``: accumulate, check, and sum across ranks if distributed.

    With a process group, every rank fits its own shard, then all ranks exchange a status
    (so a failure on one rank raises on all) and sum their statistics in one bucketed
    all-reduce; each rank ends with the same posterior.
    """
    error: Exception | None = None
    sums: _Sums | None = None
    reduce = reduce and distributed.active(group)
    progress = progress and (not reduce or distributed.rank(group) == 0)
    try:
        sums = _loop(la, loader, progress, generator, x_key, y_key)
    except Exception as caught:  # re-raised below, after the other ranks have heard of it
        error = caught
    if not reduce:
        if error is not None or sums is None:
            raise error or RuntimeError("the fit loop returned nothing")
        return _state(la, sums, sums.n_data)
    device = next(la.model.parameters()).device
    n_failed, n_data = distributed.exchange_status(
        error is not None, 0 if sums is None else sums.n_data, device, group
    )
    if error is not None:
        raise error
    if n_failed or sums is None:
        raise RuntimeError(
            f"{n_failed} other rank(s) failed during fit (see their errors); this rank's "
            "statistics were not used and the Laplace is unchanged."
        )
    distributed.all_reduce_([*sums.accumulator.state(), sums.loss_stats], group)
    return _state(la, sums, n_data)


def _state(la: Laplace, sums: _Sums, n_data: int) -> FitState:
    return FitState(
        sums.selection,
        sums.last_layer,
        sums.accumulator,
        sums.selection.flat(),
        sums.loss_stats,
        n_data,
        la.sigma_noise.clone(),
        layout_of(sums.selection, la.structure),
        sums.input_shape,
    )


def layout_of(selection: Selection, structure: Structure) -> Layout:
    """How the chosen parameters group into blocks (per the structure) and layers."""
    modules = [name.rpartition(".")[0] for name in selection.names]
    index = {module: i for i, module in enumerate(dict.fromkeys(modules))}
    tensor_sizes = tuple(param.numel() for param in selection.params)
    blocks = (selection.n_params,) if structure is Structure.FULL else tensor_sizes
    return Layout(blocks, tensor_sizes, tuple(index[m] for m in modules), len(index))


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
