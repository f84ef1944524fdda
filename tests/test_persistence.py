"""Saving and loading a fitted Laplace: exact round trips, plain state, clear refusals, atomic
writes. Tiny float64 models, local generators only."""

from __future__ import annotations

import os

import pytest
import reference as ref
import torch
from helpers import STRUCTURE_CASES, generator
from torch import Tensor, nn

laplacefim = pytest.importorskip("laplacefim")
Laplace = laplacefim.Laplace
pytestmark = pytest.mark.skipif(
    not hasattr(Laplace, "save"), reason="Laplace persistence not implemented yet"
)

DTYPE = torch.float64
N_OUT = {"classification": 3, "regression": 2, "binary": 1}


class SmallCNN(nn.Module):
    """Conv2d → tanh → LayerNorm → Linear, plus a raw nn.Parameter on the output."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, dtype=DTYPE)
        self.norm = nn.LayerNorm(18, dtype=DTYPE)
        self.fc = nn.Linear(18, n_out, dtype=DTYPE)
        self.shift = nn.Parameter(torch.zeros(n_out, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(torch.tanh(self.conv(x)).flatten(1))) + self.shift


def _problem(likelihood: str, arch: str = "mlp", seed: int = 0):
    g = generator(500 + seed)
    n_out = N_OUT[likelihood]
    if arch == "mlp":
        model = ref.mlp(n_out, g, d_in=4, hidden=5)
        shape: tuple[int, ...] = (4,)
    else:
        model = ref.init_(SmallCNN(n_out), g, scale=0.6)
        shape = (1, 5, 5)
    x = torch.randn(9, *shape, generator=g, dtype=DTYPE)
    y = ref.targets(likelihood, 9, n_out, g)
    x_test = torch.randn(4, *shape, generator=g, dtype=DTYPE)
    return model, x, y, x_test


def _fitted(likelihood="classification", structure="kron", subset="all", arch="mlp", **options):
    model, x, y, x_test = _problem(likelihood, arch)
    defaults = {"prior_precision": 0.37, "temperature": 0.9}
    if likelihood == "regression":
        defaults["sigma_noise"] = 0.6
    defaults.update(options)
    la = Laplace(model, likelihood, structure=structure, subset=subset, **defaults)
    la.fit(ref.loader(x, y, 4))
    return la, model, x_test


def _assert_same(la, other, x_test: Tensor) -> None:
    """Every fitted number and every prediction is bit-for-bit the same."""
    assert other.likelihood == la.likelihood
    assert other.structure == la.structure
    assert other.curvature_kind == la.curvature_kind
    assert other.temperature == la.temperature
    assert other.n_data == la.n_data
    assert other.parameter_names == la.parameter_names
    assert other.last_layer == la.last_layer
    assert torch.equal(other.mean, la.mean)
    assert torch.equal(other.prior_precision, la.prior_precision)
    assert torch.equal(other.sigma_noise, la.sigma_noise)
    assert torch.equal(other.posterior_precision.to_dense(), la.posterior_precision.to_dense())
    for link in ("probit", "mc") if la.likelihood != "regression" else ("probit",):
        a = la.predict(x_test, link=link, generator=generator(1), n_samples=16, joint_outputs=True)
        b = other.predict(
            x_test, link=link, generator=generator(1), n_samples=16, joint_outputs=True
        )
        for field in (
            "probs",
            "logit_mean",
            "logit_var",
            "logit_cov",
            "mean",
            "epistemic_var",
            "var",
        ):
            va, vb = getattr(a, field), getattr(b, field)
            assert (va is None) == (vb is None), field
            if va is not None:
                assert torch.equal(va, vb), field
    assert torch.equal(
        la.sample(5, generator=generator(2)), other.sample(5, generator=generator(2))
    )
    assert torch.equal(la.log_marginal_likelihood(), other.log_marginal_likelihood())


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
def test_state_dict_round_trip(structure, likelihood):
    la, model, x_test = _fitted(likelihood, structure)
    # a fresh Laplace with the same structural options but default prior / noise / temperature
    other = Laplace(model, likelihood, structure=structure, subset="all")
    other.load_state_dict(la.state_dict())
    _assert_same(la, other, x_test)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_round_trip_cnn_last_layer_and_names(structure):
    la, model, x_test = _fitted("classification", structure, subset="last_layer", arch="cnn")
    other = Laplace(model, "classification", structure=structure, subset="last_layer")
    other.load_state_dict(la.state_dict())
    _assert_same(la, other, x_test)

    names = ["conv.weight", "norm.weight", "shift"]
    la, model, x_test = _fitted("classification", structure, subset=names, arch="cnn")
    other = Laplace(model, "classification", structure=structure, subset=names)
    other.load_state_dict(la.state_dict())
    _assert_same(la, other, x_test)


def test_round_trip_per_parameter_prior_and_per_output_noise():
    model, x, y, x_test = _problem("regression")
    p = sum(q.numel() for q in model.parameters())
    prior = torch.linspace(0.2, 3.0, p, dtype=DTYPE)
    sigma = torch.tensor([0.4, 1.7], dtype=DTYPE)
    la = Laplace(model, "regression", structure="diag", prior_precision=prior, sigma_noise=sigma)
    la.fit(ref.loader(x, y, 4))
    other = Laplace(model, "regression", structure="diag")
    other.load_state_dict(la.state_dict())
    _assert_same(la, other, x_test)


def test_state_dict_does_not_alias_the_laplace():
    la, _, x_test = _fitted("classification", "kron")
    before = la.predict(x_test).probs
    state = la.state_dict()

    def scribble(obj):
        if isinstance(obj, Tensor) and obj.is_floating_point():
            obj.add_(1.0)
        elif isinstance(obj, dict):
            for v in obj.values():
                scribble(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                scribble(v)

    scribble(state)
    assert torch.equal(la.predict(x_test).probs, before)


def test_unfitted_round_trip():
    model, _, _, x_test = _problem("classification")
    la = Laplace(model, "classification", structure="diag", prior_precision=2.5)
    other = Laplace(model, "classification", structure="diag")
    other.load_state_dict(la.state_dict())
    assert torch.equal(other.prior_precision, la.prior_precision)
    with pytest.raises(RuntimeError):
        other.predict(x_test)


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("structure", "subset", "likelihood"),
    [
        ("kron", "all", "classification"),
        ("full", "last_layer", "regression"),
        ("diag", "all", "binary"),
    ],
)
def test_save_and_load(tmp_path, structure, subset, likelihood):
    la, model, x_test = _fitted(likelihood, structure, subset=subset)
    path = tmp_path / "laplace.pt"
    la.save(path)
    assert sorted(os.listdir(tmp_path)) == ["laplace.pt"]
    loaded = Laplace.load(path, model)
    _assert_same(la, loaded, x_test)
    # the subset comes back as the spec or as the list of the names it selected
    assert loaded.subset in (la.subset, list(la.parameter_names))
    on_cpu = Laplace.load(str(path), model, map_location="cpu")
    _assert_same(la, on_cpu, x_test)
    assert on_cpu.mean.device.type == "cpu"
    # the file holds tensors and plain values only: the safe loader reads it
    state = torch.load(path, weights_only=True)
    _walk_plain(state)


PLAIN = (str, int, float, bool, type(None))


def _walk_plain(obj, where: str = "state") -> None:
    if isinstance(obj, Tensor):
        assert type(obj) is Tensor, f"{where} is a {type(obj).__name__}, not a plain tensor"
        return
    if isinstance(obj, dict):
        assert type(obj) is dict, where
        for key, value in obj.items():
            assert type(key) is str, f"{where} has a key {key!r} that is not a string"
            _walk_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, list | tuple):
        assert type(obj) in (list, tuple), where
        for i, value in enumerate(obj):
            _walk_plain(value, f"{where}[{i}]")
        return
    assert type(obj) in PLAIN, f"{where} is a {type(obj).__name__}: {obj!r}"


@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_state_is_tensors_and_plain_values(structure, subset):
    la, _, _ = _fitted("regression", structure, subset=subset)
    _walk_plain(la.state_dict())
    model, _, _, _ = _problem("regression")
    _walk_plain(Laplace(model, "regression").state_dict())  # unfitted too


# --------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------
def _check_refused(la, other, x_test, match: str) -> None:
    """Loading raises a ValueError and leaves ``other`` exactly as it was."""
    before = other.predict(x_test).probs if other._fit is not None else None
    prior = other.prior_precision.clone()
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(la.state_dict())
    assert torch.equal(other.prior_precision, prior)
    if before is not None:
        assert torch.equal(other.predict(x_test).probs, before)


def test_refuses_other_structure():
    la, model, x_test = _fitted("classification", "kron")
    for structure in ("full", "diag"):
        _check_refused(
            la, Laplace(model, "classification", structure=structure), x_test, "structure"
        )


def test_refuses_other_likelihood():
    la, model, x_test = _fitted("classification", "kron")
    _check_refused(la, Laplace(model, "binary", structure="kron"), x_test, "likelihood")


def test_refuses_other_curvature_kind():
    la, model, x_test = _fitted("classification", "diag")
    other = Laplace(model, "classification", structure="diag", curvature="empirical_fisher")
    _check_refused(la, other, x_test, "curvature")


SUBSET_CASES = {
    # saved subset, target subset, whether the target is fitted before the load
    "all_into_names": ("all", ["0.weight"], False),
    "all_into_last_layer": ("all", "last_layer", False),
    "all_into_fitted_last_layer": ("all", "last_layer", True),
    "last_layer_into_all": ("last_layer", "all", False),
}


@pytest.mark.parametrize("case", list(SUBSET_CASES))
def test_refuses_other_subset(case):
    saved, target, fit_target = SUBSET_CASES[case]
    la, model, x_test = _fitted("classification", "kron", subset=saved)
    if fit_target:
        other, _, _ = _fitted("classification", "kron", subset=target)
    else:
        other = Laplace(model, "classification", structure="kron", subset=target)
    # the message must say that the subset (the chosen parameters) differs
    _check_refused(la, other, x_test, "subset|parameters")


def test_refuses_a_model_with_other_shapes():
    for structure in STRUCTURE_CASES:
        la, _, _ = _fitted("classification", structure)  # 4 → 5 → 3: 43 parameters
        g = generator(99)
        wider = ref.mlp(3, g, d_in=4, hidden=6)  # same names, other shapes and P
        x_wide = torch.randn(4, 4, generator=g, dtype=DTYPE)
        _check_refused(la, Laplace(wider, "classification", structure=structure), x_wide, "shape")


@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
def test_refuses_a_model_with_other_shapes_but_the_same_size(structure):
    # 6 → 4 → 3 has the same names and the same 43 parameters as 4 → 5 → 3
    la, _, _ = _fitted("classification", structure)
    g = generator(98)
    other_model = ref.mlp(3, g, d_in=6, hidden=4)
    assert sum(p.numel() for p in other_model.parameters()) == la.n_params
    with pytest.raises(ValueError, match="shape"):
        Laplace(other_model, "classification", structure=structure).load_state_dict(la.state_dict())


def test_load_file_into_other_model_is_refused(tmp_path):
    la, _, _ = _fitted("classification", "kron")
    path = tmp_path / "la.pt"
    la.save(path)
    wider = ref.mlp(3, generator(97), d_in=4, hidden=6)
    with pytest.raises(ValueError, match="shape"):
        Laplace.load(path, wider)


# --------------------------------------------------------------------------------------
# atomic save
# --------------------------------------------------------------------------------------
def test_save_is_atomic(tmp_path, monkeypatch):
    la, model, _ = _fitted("classification", "kron")
    path = tmp_path / "laplace.pt"
    la.save(path)
    original = path.read_bytes()

    # a later save of another state crashes half-way through writing
    la.prior_precision = 5.0
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        if isinstance(f, str | os.PathLike):
            with open(f, "wb") as handle:
                handle.write(b"half a file")
        else:
            f.write(b"half a file")
            f.flush()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        la.save(path)
    monkeypatch.setattr(torch, "save", real_save)

    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["laplace.pt"], "a temporary file was left behind"
    restored = Laplace.load(path, model)
    assert float(restored.prior_precision) == pytest.approx(0.37, rel=0, abs=0)

    # a crash on the first save of a path leaves nothing at all
    fresh = tmp_path / "fresh.pt"
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError):
        la.save(fresh)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["laplace.pt"]

    # and a successful save replaces the file
    la.save(path)
    assert float(Laplace.load(path, model).prior_precision) == 5.0
    assert sorted(os.listdir(tmp_path)) == ["laplace.pt"]
