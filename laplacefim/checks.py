"""Argument checks shared by every public entry point.

One exception type per kind of mistake: a count that is not an integer in range raises
``ValueError`` (``1.5`` samples is a bad value, whatever its type); an argument of the wrong
kind altogether (a string for a number, a list for a tensor) raises ``TypeError``; a number
out of its range raises ``ValueError``. Each message says what was expected and what was
given.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def integer(value: Any, name: str, *, minimum: int = 1) -> int:
    """An ``int`` (not a ``bool``) that is at least ``minimum``.

    Raises:
        ValueError: If ``value`` is not an int, or is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def number(value: Any, name: str, *, positive: bool = False, non_negative: bool = False) -> float:
    """A finite real number, optionally ``> 0`` or ``>= 0``.

    Raises:
        TypeError: If ``value`` is not an int or a float (or a 0-d tensor).
        ValueError: If it is not finite or out of range.
    """
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
    value = float(value)
    bound = " and > 0" if positive else " and >= 0" if non_negative else ""
    if not math.isfinite(value) or (positive and value <= 0) or (non_negative and value < 0):
        raise ValueError(f"{name} must be finite{bound}, got {value!r}.")
    return value


def scalar_if_single(tensor: Tensor) -> Tensor:
    """A one-element tensor ``(1,)`` as a 0-d one (laplace-torch's habit); others as given."""
    return tensor.reshape(()) if tensor.shape == (1,) else tensor


def hyperparameter(value: Any, name: str, *, allow_zero: bool) -> Tensor:
    """A prior precision, noise or temperature: a number or a floating tensor, finite and
    ``> 0`` (``>= 0`` with ``allow_zero``); Python numbers are kept in float64, and a
    one-element tensor ``(1,)`` is a scalar (laplace-torch's habit).

    Raises:
        TypeError: If ``value`` is neither a number nor a tensor.
        ValueError: If an entry is not finite or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | Tensor):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}.")
    if isinstance(value, Tensor):
        tensor = value.detach().clone()  # a copy: the caller's later in-place edits stay theirs
        if not tensor.dtype.is_floating_point:
            tensor = tensor.to(torch.float64)
        tensor = scalar_if_single(tensor)
    else:
        tensor = torch.tensor(float(value), dtype=torch.float64)
    bad = ~torch.isfinite(tensor) | (tensor < 0 if allow_zero else tensor <= 0)
    if bool(bad.any()):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}.")
    return tensor


def floating_dtype(value: Any, name: str) -> torch.dtype | None:
    """None or a floating ``torch.dtype``.

    Raises:
        TypeError: For anything else.
    """
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    raise TypeError(f"{name} must be a floating torch.dtype or None, got {value!r}.")


def tensor(value: Any, name: str) -> Tensor:
    """A tensor.

    Raises:
        TypeError: For anything else.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}.")
    return value
