"""The exported predictive (torch.export) against la.predict, also in an interpreter that
cannot import laplacefim."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close, generator
from serving_models import BagOfTokens
from torch import nn

from laplacefim import Laplace
from laplacefim.cli import main

DT = torch.float64


def _model(n_out: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    g = generator(seed)
    model = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, n_out)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=DT))
    return model, torch.randn(120, 4, generator=g, dtype=DT)


def _load(path):
    return torch.export.load(str(path)).module()


@pytest.mark.parametrize(
    ("likelihood", "structure", "n_out"),
    [
        ("classification", "kron", 3),
        ("classification", "full", 3),
        ("binary", "diag", 1),
        ("regression", "full", 2),
        ("heteroscedastic", "kron", 4),
    ],
)
def test_glm_export_equals_la_predict(tmp_path, likelihood, structure, n_out):
    model, x = _model(n_out, 0)
    g = generator(1)
    if likelihood == "classification":
        y = torch.randint(0, 3, (120,), generator=g)
    elif likelihood == "binary":
        y = torch.randint(0, 2, (120,), generator=g).double()
    else:
        y = torch.randn(120, 2, generator=g, dtype=DT)
    la = Laplace(model, likelihood, subset="last_layer", structure=structure)
    la.fit([(x[:80], y[:80])])
    la.prior_precision = 1.5
    la.export(tmp_path / "p.pt2", x[:3])
    out = _load(tmp_path / "p.pt2")(x[80:])  # another batch size than the example's
    pred = la.predict(x[80:])
    for name, value in out.items():
        assert_close(value, getattr(pred, name), 1e-10)
    assert set(out) == {k for k, v in vars(pred).items() if v is not None}


def test_sampled_export_equals_la_predict_nn(tmp_path):
    model, x = _model(3, 2)
    y = torch.randint(0, 3, (120,), generator=generator(3))
    la = Laplace(model, "classification", subset="all", structure="kron")
    la.fit([(x[:80], y[:80])])
    la.export(tmp_path / "s.pt2", x[:2], method="nn", n_samples=6, generator=generator(9))
    out = _load(tmp_path / "s.pt2")(x[80:])
    pred = la.predict(x[80:], method="nn", n_samples=6, generator=generator(9))
    assert torch.equal(out["probs"], pred.probs)


def test_glm_export_of_a_mapping_model(tmp_path):
    g = generator(4)
    model = BagOfTokens().to(DT)
    ids = torch.randint(0, 20, (40, 5), generator=g)
    mask = torch.ones(40, 5, dtype=torch.long)
    mask[::2, 3:] = 0
    y = torch.randint(0, 2, (40,), generator=g)
    la = Laplace(model, "classification", subset="last_layer", call_kwargs=True)
    la.fit([({"input_ids": ids, "attention_mask": mask}, y)])
    la.export(tmp_path / "m.pt2", {"input_ids": ids[:2], "attention_mask": mask[:2]})
    batch = {"input_ids": ids[10:17], "attention_mask": mask[10:17]}
    out = _load(tmp_path / "m.pt2")(batch)
    assert_close(out["probs"], la.predict(batch).probs, 1e-10)


def test_export_refusals(tmp_path):
    model, x = _model(3, 5)
    y = torch.randint(0, 3, (120,), generator=generator(6))
    la = Laplace(model, "classification", subset="all", structure="kron")
    la.fit([(x[:80], y[:80])])
    with pytest.raises(ValueError, match="method='nn'"):
        la.export(tmp_path / "a.pt2", x[:4])
    with pytest.raises(ValueError, match="at least 2 inputs"):
        la.export(tmp_path / "a.pt2", x[:1], method="nn")
    with pytest.raises(ValueError, match="do not match the training inputs"):
        la.export(tmp_path / "a.pt2", torch.zeros(3, 5, dtype=DT), method="nn")
    assert not (tmp_path / "a.pt2").exists()


def test_artifact_runs_where_laplacefim_cannot_be_imported(tmp_path):
    model, x = _model(3, 7)
    y = torch.randint(0, 3, (120,), generator=generator(8))
    la = Laplace(model, "classification", subset="last_layer", structure="kron")
    la.fit([(x[:80], y[:80])])
    la.export(tmp_path / "p.pt2", x[:4])
    torch.save(x[80:], tmp_path / "x.pt")
    torch.save(la.predict(x[80:]).probs, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["laplacefim"] = None  # any import of laplacefim now fails
        import torch
        program = torch.export.load({str(tmp_path / "p.pt2")!r}).module()
        x = torch.load({str(tmp_path / "x.pt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        error = (program(x)["probs"] - expected).abs().max().item()
        assert not any(name.startswith("laplacefim") for name in sys.modules if sys.modules[name])
        print(error)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-12


def test_export_command(tmp_path):
    model, x = _model(3, 9)
    model = model.float()
    x = x.float()
    y = torch.randint(0, 3, (120,), generator=generator(10))
    la = Laplace(model, "classification", subset="last_layer", structure="kron")
    la.fit([(x[:80], y[:80])])
    la.save(tmp_path / "la.pt")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "net.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3))\n"
    )
    import numpy as np

    np.savez(tmp_path / "example.npz", X=x[:4].numpy())
    status = main(
        [
            "export",
            "--model",
            str(tmp_path / "net.py") + ":make",
            "--weights",
            str(tmp_path / "w.pt"),
            "--laplace",
            str(tmp_path / "la.pt"),
            "--example",
            str(tmp_path / "example.npz"),
            "--out",
            str(tmp_path / "cli.pt2"),
        ]
    )
    assert status == 0
    out = _load(tmp_path / "cli.pt2")(x[80:])
    assert_close(out["probs"], la.predict(x[80:]).probs, 1e-6)
