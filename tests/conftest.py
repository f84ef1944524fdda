"""Shared pytest configuration for the curvature tests."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# make ``import reference`` work whatever the import mode / package layout of tests/
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Run a test on the CPU and, where available, on CUDA."""
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    """A local CPU generator with a fixed seed (the global seed is never touched)."""
    g = torch.Generator()
    g.manual_seed(20240611)
    return g
