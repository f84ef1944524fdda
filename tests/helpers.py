"""Shared assertions and case lists for the tests (nothing here imports laplacefim)."""

from __future__ import annotations

import torch
from torch import Tensor

# Structures whose curvature tests/reference.py computes by brute force.
REFERENCE_STRUCTURES = ("full", "diag", "kron")

# Every registered structure, as (name, Laplace's `structure=` argument). A structure-agnostic
# test (persistence, predictive covariance against the package's own dense precision, the
# posterior, distributed fits) runs on all of them; tests/contracts/test_structures.py
# checks that this list covers the registry. A new structure is one line here.
STRUCTURE_CASES: dict[str, object] = {
    "full": "full",
    "diag": "diag",
    "kron": "kron",
    "ekfac": "ekfac",
    "lowrank": "lowrank",
}


def assert_close(actual: Tensor, expected: Tensor, rtol: float, atol: float | None = None) -> None:
    """``|actual − expected| ≤ atol + rtol·|expected|`` elementwise.

    ``atol`` defaults to ``rtol · max|expected|``, so entries near zero are compared on the
    scale of the whole tensor.
    """
    actual = actual.detach()
    expected = expected.detach().to(actual.device)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if atol is None:
        atol = rtol * float(expected.abs().max().clamp_min(1e-300)) if expected.numel() else 0.0
    error = (actual.to(expected.dtype) - expected).abs()
    bad = error > atol + rtol * expected.abs()
    assert not bool(bad.any()), (
        f"max abs error {float(error.max()):.3e} (atol {atol:.3e}, rtol {rtol:.1e}); first bad "
        f"entries at {bad.nonzero()[:5].tolist()}"
    )


def assert_max_close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """``max|actual − expected| ≤ rtol · max|expected|``."""
    scale = float(expected.abs().max())
    error = float((actual.detach() - expected).abs().max())
    assert error <= rtol * scale, f"max abs error {error:.3e} vs scale {scale:.3e}"


def generator(seed: int) -> torch.Generator:
    """A local CPU generator (the global seed is never touched)."""
    return torch.Generator().manual_seed(seed)
