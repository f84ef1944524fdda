"""Imported once by the fork server, so that every job process starts with the
libraries already loaded (each job then costs milliseconds to start instead of
seconds of imports, and every job starts from the same resident set).

A library that fails to import is skipped here; the job that needs it then
fails on its own import and reports the error.
"""

from __future__ import annotations

import contextlib
import importlib

import torch  # noqa: F401

# tqdm creates a multiprocessing lock (a named semaphore) the first time a bar is
# made, in every job process, which the resource tracker then reports as leaked
# at shutdown; a thread lock set here, before the fork, avoids that.
with contextlib.suppress(Exception):
    import threading

    import tqdm

    tqdm.tqdm.set_lock(threading.RLock())

for _name in (
    # torch imports sympy lazily, through torch.fx.experimental.symbolic_shapes, the first
    # time autograd.grad is given grad_outputs or torch.func runs (~45 MB): charged to
    # whichever fit does it first in a process, it is import, not fit memory (memory.py
    # preloads it for the same reason).
    "torch.fx.experimental.symbolic_shapes",
    "laplace",
    "laplace.curvature",
    "curvlinops",
    "backpack",
    "backpack.extensions",
    "asdl",
    "laplacefim",
    "_workloads",
    "_runners",
    "_worker",
):
    with contextlib.suppress(Exception):  # reported by the job that needs it
        importlib.import_module(_name)
