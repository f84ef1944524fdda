"""Fisher geometry and the monitor against dense float64 brute force (torch.func)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import generator
from torch import nn
from torch.func import functional_call, hessian, jacrev

from laplacefim import Laplace
from laplacefim.geometry import (
    effective_dimension,
    fisher_distance,
    ggn_vector_product,
    hessian_vector_product,
    layer_sensitivity,
    plot_spectral_density,
    predictive_kl,
    spectral_density,
    structure_eigenvalues,
    structure_trace,
    top_eigenvalues,
    trace,
)
from laplacefim.monitor import FisherMonitor

DTYPE = torch.float64
N_OUT = {"classification": 3, "regression": 2, "binary": 1}
SIGMA = 0.7
# Hutchinson estimates must fall within this many of their own standard errors.
HUTCHINSON_SE = 4.0


def _problem(likelihood: str, n: int = 14, seed: int = 0):
    g = generator(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, N_OUT[likelihood])).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE))
    x = torch.randn(n, 3, generator=g, dtype=DTYPE)
    if likelihood == "classification":
        y = torch.randint(0, 3, (n,), generator=g)
    elif likelihood == "regression":
        y = torch.randn(n, 2, generator=g, dtype=DTYPE)
    else:
        y = torch.randint(0, 2, (n,), generator=g).to(DTYPE)
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    return model, loader, x, y


def _kwargs(likelihood: str) -> dict:
    return {"sigma_noise": SIGMA} if likelihood == "regression" else {}


def _dense(model: nn.Module, x, y, likelihood: str):
    """Brute-force GGN and Hessian of the summed NLL, (P, P), via torch.func."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t):
        out, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            out[name] = t[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    def f(t):
        return functional_call(model, unflat(t), (x,))

    def nll_of_outputs(out):
        if likelihood == "classification":
            return nn.functional.cross_entropy(out, y, reduction="sum")
        if likelihood == "regression":
            return 0.5 * ((out - y) / SIGMA).square().sum()
        return nn.functional.binary_cross_entropy_with_logits(out[:, 0], y, reduction="sum")

    jac = jacrev(f)(theta)  # (N, C, P)
    out = f(theta)
    lam = torch.stack([hessian(nll_of_outputs)(out)[i, :, i, :] for i in range(len(x))])
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, lam, jac)
    hess = hessian(lambda t: nll_of_outputs(f(t)))(theta)
    return ggn, hess, theta


@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
def test_products_match_dense(likelihood):
    model, loader, x, y = _problem(likelihood)
    ggn, hess, _ = _dense(model, x, y, likelihood)
    v = torch.randn(4, ggn.shape[0], generator=generator(1), dtype=DTYPE)
    kw = _kwargs(likelihood)
    torch.testing.assert_close(ggn_vector_product(model, loader, likelihood, v, **kw), v @ ggn)
    torch.testing.assert_close(hessian_vector_product(model, loader, likelihood, v, **kw), v @ hess)
    torch.testing.assert_close(
        ggn_vector_product(model, loader, likelihood, v[0], **kw), ggn @ v[0]
    )


def _check_eigenvectors(vectors, values, matrix):
    for vec, val in zip(vectors, values, strict=True):
        torch.testing.assert_close(matrix @ vec, val * vec, atol=1e-6 * matrix.abs().max(), rtol=0)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_top_eigen_ggn_and_hessian(likelihood):
    model, loader, x, y = _problem(likelihood)
    ggn, hess, _ = _dense(model, x, y, likelihood)
    for name, dense in (("ggn", ggn), ("hessian", hess)):
        exact = torch.linalg.eigvalsh(dense).flip(0)
        eig = top_eigenvalues(
            model,
            loader,
            likelihood,
            k=4,
            matrix=name,
            tol=1e-10,
            generator=generator(0),
            **_kwargs(likelihood),
        )
        assert eig.converged
        torch.testing.assert_close(eig.eigenvalues, exact[:4], rtol=1e-6, atol=1e-8 * exact[0])
        _check_eigenvectors(eig.eigenvectors, eig.eigenvalues, dense)
        dense_vectors = torch.linalg.eigh(dense).eigenvectors.flip(1)[:, :4].T
        overlap = (eig.eigenvectors * dense_vectors).sum(1).abs()  # up to sign
        torch.testing.assert_close(overlap, torch.ones(4, dtype=DTYPE), rtol=0, atol=1e-6)


def test_ggn_psd_hessian_indefinite_and_smallest():
    """A tanh net away from a minimum: the Hessian has negative eigenvalues, the GGN none."""
    model, loader, x, y = _problem("classification", seed=3)
    ggn, hess, _ = _dense(model, x, y, "classification")
    exact_h = torch.linalg.eigvalsh(hess)
    assert exact_h[0] < -1e-3 * exact_h[-1], "the construction should be indefinite"
    assert torch.linalg.eigvalsh(ggn)[0] > -1e-10 * exact_h[-1]
    low = top_eigenvalues(
        model,
        loader,
        "classification",
        k=2,
        matrix="hessian",
        which="smallest",
        tol=1e-10,
        generator=generator(0),
    )
    torch.testing.assert_close(low.eigenvalues, exact_h[:2], rtol=1e-8, atol=1e-8 * exact_h[-1])
    g_low = top_eigenvalues(
        model, loader, "classification", k=1, which="smallest", tol=1e-10, generator=generator(0)
    )
    assert g_low.eigenvalues[0] >= -1e-8 * exact_h[-1]


def test_saddle_of_linear_network():
    """f(x) = w₂ w₁ x at w = 0 is a saddle: H has ±|Σ x y| eigenvalues, the GGN is 0."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x = torch.tensor([[1.0], [2.0]], dtype=DTYPE)
    y = torch.tensor([[1.0], [3.0]], dtype=DTYPE)
    loader = [(x, y)]
    low = top_eigenvalues(model, loader, "regression", k=1, matrix="hessian", which="smallest")
    high = top_eigenvalues(model, loader, "regression", k=1, matrix="hessian")
    torch.testing.assert_close(low.eigenvalues, torch.tensor([-7.0], dtype=DTYPE))
    torch.testing.assert_close(high.eigenvalues, torch.tensor([7.0], dtype=DTYPE))
    torch.testing.assert_close(
        trace(model, loader, "regression").estimate, torch.zeros((), dtype=DTYPE)
    )


@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
def test_trace_exact_and_hutchinson(likelihood):
    model, loader, x, y = _problem(likelihood)
    ggn, hess, _ = _dense(model, x, y, likelihood)
    kw = _kwargs(likelihood)
    exact = trace(model, loader, likelihood, **kw)
    torch.testing.assert_close(exact.estimate, ggn.trace())
    assert float(exact.standard_error) == 0.0
    torch.testing.assert_close(
        trace(model, loader, likelihood, matrix="hessian", **kw).estimate, hess.trace()
    )
    for matrix, dense in (("ggn", ggn), ("hessian", hess)):
        est = trace(
            model, loader, likelihood, matrix=matrix, n_probes=200, generator=generator(5), **kw
        )
        assert est.n_probes == 200 and est.standard_error > 0
        assert abs(float(est.estimate - dense.trace())) <= HUTCHINSON_SE * float(est.standard_error)


def test_trace_refuses_large_exact_hessian():
    model = nn.Linear(100, 50).to(DTYPE)
    loader = [(torch.randn(4, 100, dtype=DTYPE), torch.randn(4, 50, dtype=DTYPE))]
    with pytest.raises(ValueError, match="n_probes"):
        trace(model, loader, "regression", matrix="hessian")


def test_options_are_validated():
    model, loader, _, _ = _problem("classification")
    with pytest.raises(ValueError, match="'ggn', 'hessian'"):
        top_eigenvalues(model, loader, "classification", matrix="fisher")
    with pytest.raises(ValueError, match="'largest', 'smallest'"):
        top_eigenvalues(model, loader, "classification", which="middle")
    with pytest.raises(ValueError, match="shape"):
        ggn_vector_product(model, loader, "classification", torch.ones(3, dtype=DTYPE))


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_structure_eigenvalues_and_trace(structure):
    model, loader, _, _ = _problem("classification")
    la = Laplace(model, "classification", structure=structure).fit(loader)
    dense = la.curvature.to_dense()
    exact = torch.linalg.eigvalsh(dense).flip(0).clamp_min(0)
    values = structure_eigenvalues(la)
    torch.testing.assert_close(values, exact, rtol=1e-8, atol=1e-10 * float(exact[0]))
    torch.testing.assert_close(structure_trace(la), dense.trace())
    if structure == "full":  # the full structure is the exact GGN
        top = top_eigenvalues(
            model, loader, "classification", k=3, tol=1e-10, generator=generator(0)
        )
        torch.testing.assert_close(top.eigenvalues, values[:3])


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_effective_dimension_against_dense(structure):
    model, loader, _, _ = _problem("regression")
    la = Laplace(model, "regression", structure=structure, sigma_noise=SIGMA, temperature=2.0)
    la.fit(loader)
    curvature = la.curvature.to_dense() * la.posterior_precision.scale
    for prior in (0.5, torch.tensor([0.3, 2.0])):
        per_param = (
            torch.full((la.n_params,), prior)
            if isinstance(prior, float)
            else prior[torch.tensor([0] * 16 + [1] * 10)]
        ).to(DTYPE)
        if structure == "kron" and not isinstance(prior, float):
            continue
        expected = torch.trace(curvature @ torch.linalg.inv(curvature + torch.diag(per_param)))
        torch.testing.assert_close(effective_dimension(la, prior), expected)
    diag_prior = torch.linspace(0.2, 3.0, la.n_params, dtype=DTYPE)
    if structure != "kron":
        expected = torch.trace(curvature @ torch.linalg.inv(curvature + torch.diag(diag_prior)))
        torch.testing.assert_close(effective_dimension(la, diag_prior), expected)


def test_effective_dimension_is_mackay_fixed_point():
    model, loader, _, _ = _problem("classification")
    la = Laplace(model, "classification", structure="full").fit(loader)
    tuned = la.tune_prior(tol=1e-12, max_iter=200)
    assert tuned.converged
    alpha = la.prior_precision
    gamma = effective_dimension(la)
    torch.testing.assert_close(alpha * la.mean.square().sum(), gamma, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
def test_fisher_distance_and_kl(likelihood):
    model, loader, x, y = _problem(likelihood)
    ggn, _, theta = _dense(model, x, y, likelihood)
    kw = _kwargs(likelihood)
    direction = torch.randn(theta.shape, generator=generator(2), dtype=DTYPE)
    d2 = fisher_distance(model, loader, likelihood, theta, theta + direction, **kw)
    torch.testing.assert_close(d2, direction @ ggn @ direction)
    ratios = []
    for scale in (1e-2, 1e-3, 1e-4):
        delta = scale * direction
        kl = predictive_kl(model, loader, likelihood, theta, theta + delta, **kw)
        half = 0.5 * fisher_distance(model, loader, likelihood, theta, theta + delta, **kw)
        ratios.append(float(half / kl))
    errors = [abs(r - 1) for r in ratios]
    assert errors[2] < errors[1] < errors[0] and errors[2] < 1e-3  # the error is O(δ)


def test_layer_sensitivity():
    model, loader, x, y = _problem("classification")
    ggn, _, _theta = _dense(model, x, y, "classification")
    sens = layer_sensitivity(
        model, loader, "classification", k=2, step=1e-3, generator=generator(0)
    )
    sizes = [p.numel() for p in model.parameters()]
    expected = torch.stack([block.sum() for block in ggn.diagonal().split(sizes)])
    torch.testing.assert_close(sens.layer_traces, expected)
    torch.testing.assert_close(sens.layer_shares.sum(), torch.ones((), dtype=DTYPE))
    torch.testing.assert_close(sens.datum_traces.sum(), ggn.trace())
    assert sens.datum_traces.shape == (len(x),)
    half_quadratic = 0.5 * 1e-6 * sens.directions.eigenvalues
    torch.testing.assert_close(sens.direction_kl, half_quadratic, rtol=1e-2, atol=0)


def test_spectral_density_integrates_and_plots(tmp_path):
    model, loader, x, y = _problem("classification")
    ggn, _, _ = _dense(model, x, y, "classification")
    sd = spectral_density(
        model, loader, "classification", n_probes=3, n_steps=ggn.shape[0], generator=generator(0)
    )
    mass = torch.trapezoid(sd.density, sd.grid)
    assert abs(float(mass) - 1.0) < 1e-3
    exact = torch.linalg.eigvalsh(ggn)
    torch.testing.assert_close(sd.nodes.max(), exact.max(), rtol=1e-8, atol=0)
    # the quadrature's mean equals trace / P for every full-length probe in expectation
    path = tmp_path / "density.png"
    plot_spectral_density(sd, path)
    assert path.stat().st_size > 0


def test_monitor_records_match_direct_calls(tmp_path):
    model, _loader, x, y = _problem("classification")
    probe = (x, y)
    monitor = FisherMonitor(
        "classification",
        probe,
        every=2,
        prior_precision=0.5,
        eig_steps=30,
        n_probes=None,
        generator=generator(0),
    )
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(5):
        monitor.step(model)
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    assert [r.step for r in monitor.records] == [0, 2, 4]
    last = monitor.records[-1]
    # the model has not changed since the last record (step 4 came before the update)
    optimiser.zero_grad()
    monitor2 = FisherMonitor(
        "classification", probe, every=1, prior_precision=0.5, eig_steps=30, n_probes=None
    )
    record = monitor2.step(model)
    direct_trace = trace(model, [probe], "classification").estimate
    assert record is not None
    assert math.isclose(record.trace, float(direct_trace), rel_tol=1e-10)
    top = top_eigenvalues(model, [probe], "classification", k=1, tol=1e-10, generator=generator(0))
    assert math.isclose(record.top_eigenvalue, float(top.eigenvalues[0]), rel_tol=1e-8)
    la = Laplace(model, "classification", structure="diag", prior_precision=0.5).fit([probe])
    assert math.isclose(record.effective_dimension, float(effective_dimension(la)), rel_tol=1e-10)
    sens = layer_sensitivity(model, [probe], "classification", k=1, per_datum=False)
    torch.testing.assert_close(torch.tensor(record.layer_traces, dtype=DTYPE), sens.layer_traces)
    assert last.trace > 0
    monitor.to_csv(tmp_path / "m.csv")
    monitor.to_json(tmp_path / "m.json")
    monitor.plot(tmp_path / "m.png")
    assert (tmp_path / "m.csv").read_text().count("\n") == 4
    assert "layer:0.weight" in (tmp_path / "m.csv").read_text()


def test_monitor_hutchinson_and_jump_warning():
    model, _loader, x, y = _problem("classification")
    monitor = FisherMonitor("classification", (x, y), every=1, n_probes=400, generator=generator(4))
    record = monitor.step(model)
    exact = float(trace(model, [(x, y)], "classification").estimate)
    assert abs(record.trace - exact) <= HUTCHINSON_SE * record.trace_standard_error
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(30.0)
    with pytest.warns(RuntimeWarning, match="jump_factor"):
        monitor.step(model)
    quiet = FisherMonitor("classification", (x, y), every=1, n_probes=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.step(model)
        quiet.step(model)
