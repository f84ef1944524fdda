"""The Python blocks of the README and docs/ run. Each file's blocks run in order in one
namespace holding what the prose assumes (`model`, `train_loader`, `x_test`, ... — a small
digits classifier); a block that cannot run here is preceded by a line
`<!-- skip-run: why -->`, and the reason is required."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from laplacefim import Laplace

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- skip-run: (?P<why>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: Path) -> list[tuple[int, str | None, str]]:
    text = page.read_text()
    return [
        (text[: m.start("code")].count("\n") + 1, m.group("why"), m.group("code"))
        for m in BLOCK.finditer(text)
    ]


@pytest.fixture(scope="module")
def digits_context() -> dict:
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    train, val, test = order[:1000], order[1000:1300], order[1300:]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        for rows in train.split(100):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimiser.step()
    with torch.no_grad():
        probs = model(x[test]).softmax(-1)
    return {
        "torch": torch,
        "nn": nn,
        "model": model,
        "train_loader": [(x[r], y[r]) for r in train.split(100)],
        "loader": [(x[r], y[r]) for r in train.split(100)],
        "val_loader": [(x[val], y[val])],
        "train_set": torch.utils.data.TensorDataset(x[train], y[train]),
        "x": x[test[:16]],
        "x_test": x[test],
        "y_test": y[test],
        "x_example": x[test[:8]],
        "x_probe": x[val[:32]],
        "y_probe": y[val[:32]],
        "probs": probs,
        "labels": y[test],
        "prob_samples": torch.stack([probs, probs.roll(1, 0)]),
        "mean": torch.zeros(20, 1),
        "var": torch.ones(20, 1),
        "y": torch.randn(20, 1, generator=g),
        "g": torch.Generator().manual_seed(1),
    }


def _make_mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def test_every_skip_says_why():
    for page in PAGES:
        for line, why, _ in blocks(page):
            assert why is None or why.strip(), f"{page.name}:{line} skips without a reason"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_blocks_run(page, digits_context, tmp_path, monkeypatch):
    found = blocks(page)
    runnable = [(line, code) for line, why, code in found if why is None]
    if not runnable:
        pytest.skip("no runnable Python block")
    monkeypatch.chdir(tmp_path)  # blocks may write files (laplace.pt, ...)
    model = copy.deepcopy(digits_context["model"])
    la = Laplace(model, "classification").fit(digits_context["train_loader"])  # "a fitted la"
    namespace = {
        **digits_context,
        "Laplace": Laplace,
        "model": model,
        "la": la,
        "make_mlp": _make_mlp,
    }
    for line, code in runnable:
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page.name}, block at line {line}: {error!r}") from error
