"""The fit loop: batches in, summed curvature statistics and checks out.

One pass over the data accumulates every block's statistics; structures that need more
(EKFAC, low-rank) get further passes. With a process group each pass ends in one
all-reduce of the pass's statistics, after a status exchange so that a failure on one
rank raises on all.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from laplacefim import distributed
from laplacefim.config import CurvatureConfig, FitState
from laplacefim.curvature import CurvatureEngine
from laplacefim.curvature.segments.base import drop_scratch, footprint
from laplacefim.inputs import to_device
from laplacefim.layout import Layout
from laplacefim.structures import BlockDiagonal, Plan
from laplacefim.structures.base import SegmentMap
from laplacefim.subsets import Selection, find_last_linear, select


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


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def make_engine(
    model: nn.Module, config: CurvatureConfig, selection: Selection, noise: Tensor
) -> CurvatureEngine:
    """The engine for ``config`` on ``selection``, after the structure's own checks.

    Raises:
        ValueError: If the structure refuses the fit (too many parameters for a dense
            block, a curvature kind it cannot use).
    """
    config.structure.check(selection.n_params, config.kind, config.max_full_params)
    dtype = config.accumulate_dtype or statistics_dtype(selection.params[0].dtype)
    return CurvatureEngine(
        model,
        selection,
        config.kind,
        config.likelihood,
        noise,
        config.io,
        fisher_samples=config.fisher_samples,
        dtype=dtype,
    )


def statistics_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are formed and summed in by default: the parameters', but at
    least float32 (half-precision models accumulate in float32)."""
    return param_dtype if torch.finfo(param_dtype).bits >= 32 else torch.float32


@dataclass(frozen=True)
class BatchLogLikelihood:
    """The log-likelihood of one batch under the model, differentiable in its parameters.

    Attributes:
        value: ``log p(y | f(x))`` summed over the batch, at the given noise.
        count: Data in the batch (rows, or non-ignored tokens for token-level targets).
        rows: Rows of the model's outputs ``(B, C)`` (``B·T`` for sequence outputs).
    """

    value: Tensor
    count: int | Tensor
    rows: int


def batch_log_likelihood(
    model: nn.Module, config: CurvatureConfig, x: object, y: Tensor, noise: Tensor
) -> BatchLogLikelihood:
    """Run ``model`` on inputs ``x`` (already on its device) and score targets ``y``."""
    likelihood = config.likelihood
    f = likelihood.outputs(config.io.call(model, x))
    targets = likelihood.targets(f.detach(), y)
    stats = likelihood.loss_stats(f, targets.values)
    value = likelihood.log_likelihood(stats, f.shape[0], noise.to(f))  # the count: constants
    return BatchLogLikelihood(value, targets.count, f.shape[0])


def _length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:  # generators, IterableDatasets without __len__
        return None


@dataclass
class _Sums:
    """What the loop accumulates on one rank."""

    engine: CurvatureEngine
    last_layer: str | None
    curvature: BlockDiagonal
    loss_stats: Tensor
    n_data: int | Tensor
    input_shape: tuple[int, ...] | None
    cache: list[tuple[SegmentMap, bool]] | None = None  # the first pass's segments, to replay
    cache_bytes: int = 0
    cache_counted: set[int] = field(default_factory=set)  # ids of this batch's kept tensors


def _first_pass(
    model: nn.Module,
    config: CurvatureConfig,
    noise: Tensor,
    bar: Iterable[Any],
    generator: torch.Generator | None,
) -> _Sums:
    device = model_device(model)
    sums: _Sums | None = None
    flags: list[Tensor] = []
    for index, batch in enumerate(bar):
        x, y = config.io.split(batch, index)
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        try:
            if sums is None:
                last = (
                    find_last_linear(model, x, config.io) if config.subset == "last_layer" else None
                )
                selection = select(model, config.subset, last)
                engine = make_engine(model, config, selection, noise)
                rows = engine.batch(x, y, generator)
                plan = Plan(
                    tuple(zip(selection.names, (p.numel() for p in selection.params), strict=True)),
                    rows.segments,
                    config.kind,
                    config.kfac_approx,
                    config.max_full_params,
                    engine.dtype,
                    device,
                )
                curvature = BlockDiagonal(config.structure.build(plan))
                del plan  # it holds this batch's segments
                shape = tuple(x.shape[1:]) if isinstance(x, Tensor) else None
                zero = torch.zeros((), dtype=engine.dtype, device=device)
                cache: list[tuple[SegmentMap, bool]] | None = (
                    None if config.structure.single_pass else []
                )
                sums = _Sums(engine, last, curvature, zero, 0, shape, cache)
            else:
                rows = sums.engine.batch(x, y, generator)
            rows.each_part(functools.partial(_add, sums, config.pass_cache_mb))
        except (ValueError, TypeError) as error:  # a later part's rules run in each_part
            raise type(error)(f"batch {index}: {error}") from error
        loss_stats: Tensor = rows.loss_stats  # type: ignore[assignment]
        sums.loss_stats = loss_stats + sums.loss_stats if sums.n_data else loss_stats
        sums.n_data += rows.n_data
        flags.append(torch.stack([rows.bad_outputs, rows.bad_targets]))  # type: ignore[list-item]
        del rows  # free this batch's inputs and gradients before the next forward pass
    if sums is None:
        raise ValueError(
            "the loader yielded no batch; fit needs at least one (inputs, targets) batch."
        )
    raise_on_flags(torch.stack(flags), config.likelihood.expected_targets)
    sums.n_data = int(sums.n_data)  # token counts sum on the device: one sync, here
    return sums


def _add(sums: _Sums, budget_mb: float, segments: SegmentMap, first: bool) -> None:
    """Add a part of a first-pass batch's columns to the sums, and keep it for later passes
    while the kept parts fit the budget (tensors shared by a batch's parts counted once)."""
    sums.curvature.accumulate_(segments, inputs=first)
    if sums.cache is None:
        return
    if first:
        sums.cache_counted = set()
    sums.cache_bytes += footprint(segments, sums.cache_counted)
    if sums.cache_bytes > budget_mb * 2**20:
        sums.cache = None  # too big: later passes run the model again
    else:
        drop_scratch(segments)
        sums.cache.append((segments, first))


def _next_pass(
    sums: _Sums,
    config: CurvatureConfig,
    bar: Iterable[Any],
    generator: torch.Generator | None,
) -> None:
    if sums.cache is not None:  # replay the first pass's inputs and output gradients
        for segments, first in sums.cache:
            sums.curvature.accumulate_(segments, inputs=first)
            drop_scratch(segments)  # what this pass formed, e.g. a rotation's columns
        return
    device = model_device(sums.engine.model)
    for index, batch in enumerate(bar):
        x, y = config.io.split(batch, index)
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        rows = sums.engine.batch(x, y, generator)
        rows.each_part(lambda segments, first: sums.curvature.accumulate_(segments, inputs=first))
        del rows


def fit_curvature(
    model: nn.Module,
    config: CurvatureConfig,
    noise: Tensor,
    loader: Iterable[Any],
    *,
    progress: bool = False,
    generator: torch.Generator | None = None,
    group: distributed.Group = None,
    reduce: bool = True,
) -> FitState:
    """Fit the curvature of ``config`` over the data of ``loader`` (in eval mode).

    Args:
        model: The model.
        config: What to fit.
        noise: The likelihood's noise at which the curvature is formed.
        loader: ``(inputs, targets)`` batches or mappings; re-iterable when the structure
            needs several passes.
        progress: Show a progress bar (on rank 0).
        generator: Random generator for the MC Fisher.
        group: Process group to reduce over (the default group if None).
        reduce: Sum across ranks when a process group is initialised.

    Raises:
        ValueError: For an empty loader, NaN outputs, targets out of range, a structure
            that needs several passes over a one-shot iterator, or a failed audit.
    """
    if not config.structure.single_pass and isinstance(loader, Iterator):
        raise ValueError(
            f"structure={config.structure.name!r} passes over the data more than once, but the "
            "loader is a one-shot iterator (a generator); give a DataLoader or a list."
        )
    reduce = reduce and distributed.active(group)
    progress = progress and (not reduce or distributed.rank(group) == 0)
    device = model_device(model)
    sums: _Sums | None = None
    n_data = 0
    with eval_mode(model):
        for pass_index in itertools.count():
            outcome = _run_pass(sums, model, config, noise, loader, progress, generator)
            if reduce:
                sums, total = _reduce(outcome, pass_index, device, group)
                n_data = total if pass_index == 0 else n_data
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                sums, n_data = outcome, int(outcome.n_data)
            if not sums.curvature.end_pass():
                break
    if sums is None:
        raise RuntimeError("the fit loop returned nothing.")
    selection = sums.engine.selection
    return FitState(
        selection,
        sums.last_layer,
        sums.curvature,
        selection.flat(),
        sums.loss_stats,
        n_data,
        noise.clone(),
        Layout.of(selection, sums.curvature.sizes),
        sums.input_shape,
    )


def _run_pass(
    sums: _Sums | None,
    model: nn.Module,
    config: CurvatureConfig,
    noise: Tensor,
    loader: Iterable[Any],
    progress: bool,
    generator: torch.Generator | None,
) -> _Sums | Exception:
    """One pass over the data; an error is returned (to be raised after the status
    exchange with the other ranks) rather than raised."""
    desc = "laplacefim fit" if sums is None else "laplacefim fit (next pass)"
    replay = sums is not None and sums.cache is not None
    bar = tqdm(
        loader, total=_length(loader), disable=not progress or replay, desc=desc, unit="batch"
    )
    try:
        if sums is None:
            return _first_pass(model, config, noise, bar, generator)
        _next_pass(sums, config, bar, generator)
        return sums
    except Exception as caught:  # raised by _reduce, after the other ranks have heard of it
        return caught


def _reduce(
    outcome: _Sums | Exception, pass_index: int, device: torch.device, group: distributed.Group
) -> tuple[_Sums, int]:
    """Exchange the status with the other ranks, raise an error if any rank failed, and
    all-reduce the pass's statistics; returns the sums and the total number of data."""
    failed = isinstance(outcome, Exception)
    n_failed, total = distributed.exchange_status(
        failed, 0 if isinstance(outcome, Exception) else int(outcome.n_data), device, group
    )
    if isinstance(outcome, Exception):
        raise outcome
    if n_failed:
        raise RuntimeError(
            f"{n_failed} other rank(s) failed during fit (see their errors); this rank's "
            "statistics were not used and the Laplace is unchanged."
        )
    extra = [outcome.loss_stats] if pass_index == 0 else []
    distributed.all_reduce_([*outcome.curvature.active_state(), *extra], group)
    return outcome, total


def raise_on_flags(flags: Tensor, expected: str) -> None:
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
        raise ValueError(f"batch {index} has targets out of range; expected {expected}.")
