"""The package builds into an sdist and a wheel that `twine check --strict` accepts, with
the one version, the type marker and the license inside."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import laplacefim

ROOT = Path(__file__).resolve().parents[1]


def test_build_and_twine_check(tmp_path):
    pytest.importorskip("build")
    pytest.importorskip("twine")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "deprecated" not in done.stdout + done.stderr  # e.g. the license table
    (wheel,) = tmp_path.glob("*.whl")
    (sdist,) = tmp_path.glob("*.tar.gz")
    assert wheel.name == f"laplacefim-{laplacefim.__version__}-py3-none-any.whl"
    check = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    names = zipfile.ZipFile(wheel).namelist()
    assert "laplacefim/py.typed" in names
    assert any(name.endswith("licenses/LICENSE") for name in names)
    assert "laplacefim/serving/server.py" in names
    assert not any(name.startswith("tests/") for name in names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert f"Version: {laplacefim.__version__}" in text
    assert "License-Expression: MIT" in text
    assert "Provides-Extra: serve" in text
