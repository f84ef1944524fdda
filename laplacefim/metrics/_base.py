"""Input checks shared by every metric, and the summable state behind every accumulator."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar, Union

import numpy as np
import torch
from torch import Tensor

from laplacefim.options import parse_option

ArrayLike = Union[Tensor, np.ndarray]  # noqa: UP007 (a runtime alias, also used under 3.10)
"""A torch tensor or a numpy array; metrics compute in float64 on the tensor's device."""

# Probabilities may leave [0, 1] and rows may miss a sum of 1 by this much (float32 or
# float16 softmax outputs); within it they are clamped to [0, 1], beyond it rejected.
PROB_ATOL = 1e-4
# Probabilities of the true class are floored here before the log, so one confidently
# wrong prediction costs at most -log(1e-12) ≈ 27.6 nats instead of infinity.
PROB_FLOOR = 1e-12

S = TypeVar("S", bound="SumState")


class Norm(str, Enum):
    """How the per-bin calibration gaps are combined."""

    L1 = "l1"
    L2 = "l2"
    MAX = "max"


def to_tensor(x: object, name: str) -> Tensor:
    """``x`` as a detached float64 tensor on its own device (numpy arrays go to the CPU).

    Raises:
        TypeError: If ``x`` is neither a tensor nor a numpy array, or is not real-valued.
        ValueError: If ``x`` holds NaN or infinite values.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers; got a numpy array of {x.dtype}.")
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be real-valued; got a tensor of {x.dtype}.")
        t = x.detach()
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy.ndarray; got {type(x).__name__}. "
            "Wrap lists with torch.as_tensor(...)."
        )
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return t


def probabilities(probs: object, name: str = "probs") -> Tensor:
    """Checked class probabilities: ``(B, C)`` rows on the simplex, or ``(B,)`` = P(y = 1).

    Raises:
        TypeError: If ``probs`` is not a tensor or numpy array.
        ValueError: On a bad shape, values outside ``[0, 1]`` or rows not summing to 1
            (each beyond ``PROB_ATOL``).
    """
    p = to_tensor(probs, name)
    if p.ndim not in (1, 2) or (p.ndim == 2 and p.shape[1] < 2):
        raise ValueError(
            f"{name} must have shape (B, C) with C >= 2, or (B,) for binary P(y = 1); got "
            f"{tuple(p.shape)}. For one binary column use probs[:, 0]."
        )
    if p.numel() and not bool(((p >= -PROB_ATOL) & (p <= 1 + PROB_ATOL)).all()):
        raise ValueError(
            f"{name} must lie in [0, 1]; got values in [{p.min().item():.6g}, "
            f"{p.max().item():.6g}]. Pass probabilities (e.g. logits.softmax(-1)), not logits."
        )
    if p.ndim == 2 and p.shape[0]:
        worst = (p.sum(1) - 1).abs().max().item()
        if worst > PROB_ATOL:
            raise ValueError(
                f"each row of {name} must sum to 1 (within {PROB_ATOL}); the worst row is off "
                f"by {worst:.3g}. Normalise with probs / probs.sum(-1, keepdim=True)."
            )
    return p.clamp(0.0, 1.0)


def as_classes(p: Tensor) -> Tensor:
    """``(B, C)`` probabilities from checked ones; a binary ``(B,)`` becomes ``[1 − p, p]``."""
    return torch.stack([1 - p, p], dim=1) if p.ndim == 1 else p


def class_labels(labels: object, n_classes: int, n_rows: int, device: torch.device) -> Tensor:
    """Checked integer labels ``(B,)`` in ``[0, n_classes)`` as int64 on ``device``.

    Raises:
        TypeError: If ``labels`` is not a tensor or numpy array.
        ValueError: On a bad shape, non-integer values or labels out of range.
    """
    y = to_tensor(labels, "labels")
    if y.shape != (n_rows,):
        raise ValueError(
            f"labels must have shape ({n_rows},) to match probs; got {tuple(y.shape)}."
        )
    if not bool((y == y.round()).all()):
        raise ValueError("labels must be integer class indices; got non-integer values.")
    if y.numel() and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(
            f"labels must lie in [0, {n_classes - 1}] for {n_classes} classes; got values in "
            f"[{int(y.min())}, {int(y.max())}]."
        )
    return y.to(device=device, dtype=torch.int64)


def positive_int(value: int, name: str, minimum: int = 1) -> int:
    """``value`` if it is an int of at least ``minimum``.

    Raises:
        TypeError: If ``value`` is not an int.
        ValueError: If ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}; got {value}.")
    return value


def parse_norm(norm: object) -> Norm:
    """The ``Norm`` member for ``norm``; ValueError listing the valid values otherwise."""
    return parse_option(norm, Norm, "norm")


class SumState:
    """Accumulator state kept as a list of tensors that add elementwise.

    Every accumulator stores only sums (per-bin counts, sums of confidences, of losses, …),
    so chunks, workers and ranks combine by adding states: ``merge`` adds another
    accumulator's, and ``state()`` returns the live tensors, so
    ``for t in metric.state(): torch.distributed.all_reduce(t)`` sums them in place
    across ranks (every rank must have allocated its state: see ``state``).

    Subclasses set ``_tensors`` (or leave it None until the first ``update``), describe their
    options in ``_config()`` and call ``_add`` from ``update``. State is float64.
    """

    def __init__(self, tensors: list[Tensor] | None = None) -> None:
        self._tensors: list[Tensor] | None = tensors
        self._layout: tuple[int, ...] | None = None

    def _config(self) -> tuple[object, ...]:
        """The options two accumulators must share to be merged."""
        return ()

    def state(self) -> list[Tensor]:
        """The live float64 state tensors (sums over everything seen so far).

        Raises:
            ValueError: If no state is allocated yet (an accumulator whose state's shape
                depends on the number of classes, before its first ``update``).
        """
        if self._tensors is None:
            raise ValueError(
                f"{type(self).__name__} has no state before its first update; pass n_classes "
                "to the constructor to allocate it up front (e.g. for an all-reduce)."
            )
        return self._tensors

    def merge(self: S, other: S) -> S:
        """Add ``other``'s state to this one and return ``self``.

        Raises:
            TypeError: If ``other`` is a different kind of accumulator.
            ValueError: If the two were built with different options or have seen data of
                different layouts (e.g. numbers of classes).
        """
        if type(other) is not type(self):
            raise TypeError(
                f"cannot merge {type(other).__name__} into {type(self).__name__}; merge "
                "accumulators of the same kind."
            )
        if other._config() != self._config():
            raise ValueError(
                f"cannot merge {type(self).__name__}s with different options: "
                f"{self._config()} and {other._config()}."
            )
        if other._layout is not None:
            self._check_layout(other._layout)
        if other._tensors is None:
            return self
        if self._tensors is None:
            self._tensors = [t.clone() for t in other._tensors]
        else:
            for mine, theirs in zip(self._tensors, other._tensors, strict=True):
                mine.add_(theirs.to(mine.device))
        return self

    def to_(self: S, device: torch.device | str) -> S:
        """Move the state to ``device`` and return ``self``.

        State starts on the CPU and follows the first update's device; call this on a rank
        that saw no data before an all-reduce over, e.g., NCCL.
        """
        if self._tensors is not None:
            self._tensors = [t.to(device) for t in self._tensors]
        return self

    def reset_(self: S) -> S:
        """Zero the state (keeping its shape, device and options) and return ``self``."""
        if self._tensors is not None:
            for t in self._tensors:
                t.zero_()
        self._layout = None
        return self

    def _check_layout(self, layout: tuple[int, ...]) -> None:
        """Fix the data layout on first use; raise if later data has another one."""
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise ValueError(
                f"{type(self).__name__} has seen inputs of layout {self._layout} (trailing "
                f"shape, () for binary (B,)), now {layout}; use one accumulator per layout."
            )

    def _add(self, values: list[Tensor]) -> None:
        """Add per-update sums (same shapes as the state) into the state."""
        if self._tensors is None:
            self._tensors = [torch.zeros_like(v, dtype=torch.float64) for v in values]
        device = values[0].device
        if self._tensors[0].device != device:
            self._tensors = [t.to(device) for t in self._tensors]
        for t, v in zip(self._tensors, values, strict=True):
            t.add_(v)

    def _sums(self) -> list[Tensor]:
        """The state for ``compute``; raises if nothing has been seen."""
        if self._tensors is None:
            raise ValueError(f"{type(self).__name__}.compute() called before any update.")
        return self._tensors


def zeros(*shapes: tuple[int, ...]) -> list[Tensor]:
    """Fresh float64 CPU state tensors of the given shapes."""
    return [torch.zeros(shape, dtype=torch.float64) for shape in shapes]


def mean_of(sums: list[Tensor], what: str) -> float:
    """``total / count`` from ``[total, count]`` as a float; ValueError if ``count`` is 0."""
    total, count = sums
    if count.item() == 0:
        raise ValueError(f"{what}: no samples have been seen; cannot average over none.")
    return float(total / count)
