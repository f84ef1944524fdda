"""Every example runs end to end in smoke mode (tiny sizes: examples/_smoke.py), so that
an API change that breaks one fails CI. Their results are not checked here; the numbers
they print in full mode are quoted in the docs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# What each example prints when it got to its end.
LAST_WORDS = {
    "quickstart.py": "log-likelihood at the MAP",
    "classification_uncertainty.py": "reloaded predictions identical: True",
    "natural_gradient_finetune.py": "test accuracy (MAP)",
    "marglik_training.py": "last model's history",
    "structures_and_likelihoods.py": "aleatoric",
    "lora_transformer.py": "",
    "fisher_geometry.py": "",
    "serve_classifier.py": "exported predictive",
}


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAPLACEFIM_EXAMPLE_SMOKE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_every_example_is_listed():
    found = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert found == {*LAST_WORDS, "distributed_fit.py"}


@pytest.mark.parametrize("name", sorted(LAST_WORDS))
def test_example_runs(name, tmp_path):
    if name == "lora_transformer.py":
        pytest.importorskip("transformers")
        pytest.importorskip("peft")
    if name == "serve_classifier.py":
        pytest.importorskip("fastapi")
        pytest.importorskip("uvicorn")
    if name == "fisher_geometry.py":
        pytest.importorskip("matplotlib")
    done = _run([sys.executable, str(EXAMPLES / name)], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert LAST_WORDS[name] in done.stdout


def test_distributed_example_runs_on_two_ranks(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(EXAMPLES / "distributed_fit.py"),
    ]
    done = _run(command, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "single process" in done.stdout
