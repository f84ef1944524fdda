"""laplacefim.plots: valid PNG files, clear errors, and the message without matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from laplacefim import metrics as M
from laplacefim import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib")


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000


def _classification(gen: torch.Generator, n: int = 200, c: int = 5) -> tuple:
    logits = 3 * torch.randn(n, c, generator=gen)
    labels = torch.randint(0, c, (n,), generator=gen)
    return logits.softmax(-1), labels


def test_reliability_diagram_writes_png(tmp_path: Path, gen: torch.Generator) -> None:
    probs, labels = _classification(gen)
    diagram = M.reliability(probs, labels, n_bins=10)
    out = plots.reliability_diagram(
        {"MAP": (probs, labels), "Laplace": diagram, "numpy": (probs.numpy(), labels.numpy())},
        tmp_path / "sub" / "rel.png",
        title="test",
    )
    assert out == tmp_path / "sub" / "rel.png"
    _assert_png(out)


def test_reliability_diagram_binary(tmp_path: Path, gen: torch.Generator) -> None:
    p = torch.rand(100, generator=gen)
    y = (torch.rand(100, generator=gen) < p).long()
    _assert_png(plots.reliability_diagram({"binary": (p, y)}, tmp_path / "bin.png"))


def test_shift_curves_writes_png(tmp_path: Path) -> None:
    table = {
        method: {
            angle: {"accuracy": 1 - angle / 100, "nll": angle / 10 * (1 + k), "ece": 0.1}
            for angle in (0, 15, 30)
        }
        for k, method in enumerate(["MAP", "KFAC"])
    }
    _assert_png(plots.shift_curves(table, tmp_path / "shift.png"))
    _assert_png(plots.shift_curves(table, tmp_path / "nll.png", "nll", xlabel="x"))


def test_regression_calibration_writes_png(tmp_path: Path, gen: torch.Generator) -> None:
    y = torch.randn(300, 2, generator=gen)
    mean = torch.zeros(300, 2)
    _assert_png(plots.regression_calibration(mean, torch.ones(300, 2), y, tmp_path / "a.png"))
    _assert_png(
        plots.regression_calibration(
            mean,
            {"narrow": torch.tensor(0.25), "wide": torch.full((300, 2), 4.0)},
            y,
            tmp_path / "b.png",
        )
    )


def test_bad_inputs_raise_clear_errors(tmp_path: Path, gen: torch.Generator) -> None:
    probs, labels = _classification(gen)
    with pytest.raises(ValueError, match="non-empty mapping"):
        plots.reliability_diagram({}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="ReliabilityDiagram or a"):
        plots.reliability_diagram({"a": probs}, tmp_path / "x.png")  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"ending in \.png"):
        plots.reliability_diagram({"a": (probs, labels)}, tmp_path / "x.pdf")
    with pytest.raises(ValueError, match="metric 'brier' is missing"):
        plots.shift_curves({"MAP": {0: {"nll": 1.0}}}, tmp_path / "x.png", ["brier"])
    with pytest.raises(ValueError, match="non-empty table"):
        plots.shift_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="positive"):
        plots.regression_calibration(
            torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3), tmp_path / "x.png"
        )
    assert not list(tmp_path.glob("*.png"))


def test_missing_matplotlib_names_the_extra(
    tmp_path: Path, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    probs, labels = _classification(gen)
    with pytest.raises(ModuleNotFoundError, match=r"pip install laplacefim\[plot\]"):
        plots.reliability_diagram({"MAP": (probs, labels)}, tmp_path / "rel.png")
    with pytest.raises(ModuleNotFoundError, match="matplotlib"):
        plots.shift_curves({"MAP": {0: {"nll": 1.0}}}, tmp_path / "s.png", ["nll"])
    assert not (tmp_path / "rel.png").exists()
