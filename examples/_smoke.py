"""Smoke mode for the examples.

With ``LAPLACEFIM_EXAMPLE_SMOKE=1`` in the environment (``tests/test_examples.py`` sets
it) every example runs with tiny sizes — one epoch, a few samples — to check that it still
runs end to end, not to show its results; without it they run as documented.
"""

from __future__ import annotations

import os

SMOKE = os.environ.get("LAPLACEFIM_EXAMPLE_SMOKE") == "1"


def size(full: int, smoke: int) -> int:
    """``full``, or ``smoke`` in smoke mode."""
    return smoke if SMOKE else full
