"""Half precision, ill-conditioned factors, weights that change under a fit, and float32
evidence at tiny priors: each either gives the right number or says what happened."""

from __future__ import annotations

import copy
import warnings

import pytest
import reference as ref
import torch
from helpers import assert_close, generator
from torch import nn

from laplacefim import Laplace
from laplacefim.structures import eigen

STRUCTURES = ["diag", "kron", "full", "ekfac", "lowrank"]
# Relative Frobenius distance between a 16-bit fit and the float32 fit of the same weights:
# the activations are rounded to 8 (bfloat16) or 11 (float16) significant bits.
HALF_RTOL = {torch.bfloat16: 0.05, torch.float16: 0.01}


def _mlp() -> nn.Module:
    g = generator(5)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def _data(n: int = 64):
    g = generator(6)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_fits_and_predicts(dtype, structure):
    x, y = _data()
    half = _mlp().to(dtype)
    single = copy.deepcopy(half).float()  # the same (exactly representable) weights
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    la = Laplace(half, structure=structure).fit([(a.to(dtype), b) for a, b in batches])
    reference = Laplace(single, structure=structure).fit(batches)
    state = la.curvature.state()
    assert all(t.dtype in (torch.float32, torch.int64) for t in state)  # statistics in float32
    dense, expected = la.curvature.to_dense(), reference.curvature.to_dense()
    assert float((dense - expected).norm() / expected.norm()) < HALF_RTOL[dtype]
    la.tune_prior()
    for prediction in (la.predict(x[:5].to(dtype)), la.predict(x[:5].to(dtype), method="nn")):
        assert prediction.probs.dtype == torch.float32
        assert_close(prediction.probs.sum(-1), torch.ones(5), 1e-6)
    assert la.sample(3).dtype == torch.float32


def test_eigh_failure_is_retried_in_float64_then_with_jitter(monkeypatch):
    real = torch.linalg.eigh
    matrix = torch.randn(6, 6, generator=generator(1))
    matrix = matrix @ matrix.T

    def fails_in_float32(value, *args, **kwargs):
        if value.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated")
        return real(value, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fails_in_float32)
    with pytest.warns(RuntimeWarning, match="float64"):
        values, vectors = eigen.symmetric_eigh(matrix)
    assert_close(vectors * values @ vectors.T, matrix, 1e-5)

    calls = {"n": 0}

    def fails_without_jitter(value, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:  # the float32 attempt and the plain float64 retry
            raise torch.linalg.LinAlgError("simulated")
        return real(value, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fails_without_jitter)
    with pytest.warns(RuntimeWarning, match=r"jitter of 1e-12"):
        values, vectors = eigen.symmetric_eigh(matrix)
    assert_close(vectors * values @ vectors.T, matrix, 1e-5)


def test_a_failing_factor_does_not_break_the_predictive(monkeypatch):
    x, y = _data()
    model = _mlp()
    expected = Laplace(model, structure="kron").fit(ref.loader(x, y, 16)).predict(x[:4]).probs
    la = Laplace(model, structure="kron").fit(ref.loader(x, y, 16))
    real = torch.linalg.eigh

    def fails_in_float32(value, *args, **kwargs):
        if value.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated")
        return real(value, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fails_in_float32)
    with pytest.warns(RuntimeWarning, match="float64"):
        probs = la.predict(x[:4]).probs
    assert_close(probs, expected, 1e-5)


def test_changed_weights_raise_warn_or_pass():
    x, y = _data()
    model = _mlp()
    la = Laplace(model, structure="kron").fit(ref.loader(x, y, 16))
    la.predict(x[:2], method="nn", n_samples=3)  # writes samples into the model and restores it
    la.predict(x[:2])
    weight = model[0].weight
    before = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.1)
    with pytest.raises(RuntimeError, match="weights changed"):
        la.predict(x[:2])
    warner = Laplace(model, structure="kron", weights_check="warn")
    with torch.no_grad():
        weight.copy_(before)
    warner.fit(ref.loader(x, y, 16))
    with torch.no_grad():
        weight.add_(0.1)
    with pytest.warns(RuntimeWarning, match="weights changed"):
        warner.predict(x[:2])
    with torch.no_grad():
        weight.copy_(before)  # the same values again: the posterior applies again
    la.predict(x[:2])


def test_load_checks_the_weights(tmp_path):
    x, y = _data()
    model = _mlp()
    la = Laplace(model, structure="diag").fit(ref.loader(x, y, 16))
    path = tmp_path / "la.pt"
    la.save(path)
    Laplace.load(path, model).predict(x[:2])  # the weights it was fitted at
    untrained = _mlp()
    with torch.no_grad():
        untrained[3].weight.mul_(2.0)
    with pytest.raises(ValueError, match="differ from the fitted mean"):
        Laplace.load(path, untrained)
    loose = Laplace.load(path, untrained, strict=False, weights_check="off")
    assert torch.equal(loose.mean, la.mean)
    loose.predict(x[:2])


def test_float32_evidence_at_a_tiny_prior_warns_and_float64_is_exact():
    from sklearn.datasets import load_iris

    features, labels = load_iris(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(labels)
    model = _iris_model(x, y)
    batches = [(x[i : i + 30], y[i : i + 30]) for i in range(0, 150, 30)]
    exact = Laplace(copy.deepcopy(model).double(), structure="full", prior_precision=1e-3)
    exact.fit([(a.double(), b) for a, b in batches])
    la64 = Laplace(model, structure="full", prior_precision=1e-3, accumulate_dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value64 = la64.fit(batches).log_marginal_likelihood()
    assert abs(float(value64) - float(exact.log_marginal_likelihood())) < 1e-5
    la32 = Laplace(model, structure="full", prior_precision=1e-3).fit(batches)
    with pytest.warns(RuntimeWarning, match="accumulate_dtype=torch.float64"):
        la32.log_marginal_likelihood()


def _iris_model(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    g = generator(9)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


class _Residual(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.linear = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        if self.inplace:
            h += x  # changes the recorded output of self.linear in place
            return h
        return h + x


def _inplace_model(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(inplace=inplace), _Residual(inplace), nn.Tanh(), nn.Linear(6, 3)
    ).double()


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_outputs_changed_in_place_get_their_exact_curvature(structure):
    """``ReLU(inplace=True)`` and ``h += x`` rewrite a recorded layer output after the layer
    returned it; the engine notices (version counters) and records those layers through
    copies, so the curvature equals that of the same model without in-place operations."""
    g = generator(31)
    x, y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,))
    model, plain = _inplace_model(True), _inplace_model(False)
    la = Laplace(model, structure=structure, curvature="ggn").fit(ref.loader(x, y, 4))
    expected = ref.CurvatureReference(plain, ref.trainable_names(plain), x, "classification")
    assert_close(la.curvature.to_dense(), expected.ggn(structure), 1e-10)
