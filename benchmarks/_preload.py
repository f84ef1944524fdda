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

for _name in (
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
