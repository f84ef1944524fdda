"""The documentation site builds with `mkdocs build --strict`: a broken link, a missing
page or an API reference that no longer resolves fails it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = (tmp_path / "reference" / "index.html").read_text()
    for name in ("calibrate_abstention", "train_marglik", "Predictor", "risk_coverage"):
        assert name in reference, name
    assert (tmp_path / "benchmarks" / "index.html").exists()
