"""Predictive distributions, samples and the posterior object, against independent oracles.

Every number is checked against a reference that does not use ``laplacefim``'s
predictive code:

* the GLM covariance ``J Σ Jᵀ`` with ``J`` from ``torch.func.jacrev`` (``reference.py``)
  and ``Σ`` the dense inverse of ``la.posterior_precision.to_dense()`` (which is built
  from the fitted curvature blocks, not from the eigendecomposition the predictive uses);
* link functions written out here from their formulas, and Monte-Carlo / Gauss-Hermite
  integrals of the Gaussian over the logits;
* weight samples drawn here from ``N(θ*, Σ)`` with a Cholesky factor, pushed through the
  model with ``functional_call``;
* ``torch.distributions.MultivariateNormal`` for densities and entropies.

Monte-Carlo tolerances are named constants of ``MC_Z`` standard errors, each standard
error computed from the reference moments and ``1/√S``. Tiny float64 models, local
generators only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch
from helpers import STRUCTURE_CASES, assert_close, generator
from torch import Tensor, nn
from torch.func import vmap

laplacefim = pytest.importorskip("laplacefim")
Laplace = laplacefim.Laplace

DTYPE = torch.float64
N_OUT = {"classification": 3, "regression": 2, "binary": 1}

# Dense reference (jacrev, dense inverse) against the structured eigenbasis path: float64
# reassociation and the conditioning of Σ (prior ≥ 0.5) only.
RTOL = 1e-10
# Chunked against unchunked evaluation of the same quantities.
CHUNK_RTOL = 1e-12
# Monte-Carlo checks allow MC_Z standard errors (a Gaussian-tail probability of ~6e-7 per
# entry; every draw comes from a fixed local generator, so the tests are deterministic).
MC_Z = 5.0
# The probit approximation σ(μ/√(1 + πv/8)) of E σ(z), z ~ N(μ, v), is never off by more
# than 0.0131 over μ ∈ [-6, 6], v ∈ [1e-2, 1e3] (Gauss-Hermite on a grid; the supremum of
# this error is ~0.013), so the binary probit must agree with quadrature to within this.
PROBIT_BINARY_TOL = 0.015
# The softmax generalisation of the probit uses only the marginal variances and ignores
# the correlations between logits, in particular their common shift (to which softmax is
# invariant and along which the classification GGN is flat, so only the prior bounds it).
# It has no uniform error bound; on the problem below (logit variances 0.4 to 3.5) it is
# measured at ~0.04 against a 200k-sample integral. This tolerance is loose on purpose.
PROBIT_TOL = 0.08
# The Laplace bridge maps the marginal Gaussians to a Dirichlet whose mean need not tend
# to softmax(μ) unless the variances have the shape a Dirichlet induces; on this problem
# its error against the integral is measured at ~0.2. A sanity bound, honestly loose: it
# still rejects e.g. a uniform or a permuted answer.
BRIDGE_TOL = 0.3


# --------------------------------------------------------------------------------------
# models and problems
# --------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """Conv2d → tanh → LayerNorm → Linear, plus a raw nn.Parameter on the output."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, dtype=DTYPE)
        self.norm = nn.LayerNorm(18, dtype=DTYPE)
        self.fc = nn.Linear(18, n_out, dtype=DTYPE)
        self.shift = nn.Parameter(torch.zeros(n_out, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(torch.tanh(self.conv(x)).flatten(1))
        return self.fc(h) + self.shift * 0.5


def _problem(arch: str, likelihood: str, seed: int, n: int = 8, n_test: int = 5):
    g = generator(1000 + seed)
    n_out = N_OUT[likelihood]
    if arch == "mlp":
        model = ref.mlp(n_out, g, d_in=4, hidden=5)
        shape: tuple[int, ...] = (4,)
    else:
        model = ref.init_(SmallCNN(n_out), g, scale=0.6)
        shape = (1, 5, 5)
    x = torch.randn(n, *shape, generator=g, dtype=DTYPE)
    y = ref.targets(likelihood, n, n_out, g)
    x_test = 1.5 * torch.randn(n_test, *shape, generator=g, dtype=DTYPE)
    return model, x, y, x_test


def _expected_names(model: nn.Module, subset: str, x: Tensor) -> list[str]:
    if subset == "last_layer":
        return ref.last_linear_names(model, x)
    return ref.select_names(model, subset)


def _glm_reference(la, model: nn.Module, names: list[str], x_test: Tensor):
    """Output mean (B, C), Σ (P, P), J (B, C, P) and J Σ Jᵀ (B, C, C), all dense."""
    sigma = torch.linalg.inv(la.posterior_precision.to_dense())
    sigma = 0.5 * (sigma + sigma.T)
    jac = ref.jacobian(model, names, x_test)
    cov = torch.einsum("bcp,pq,bdq->bcd", jac, sigma, jac)
    return ref.outputs(model, x_test), sigma, jac, cov


def _fit(model, x, y, likelihood, *, structure="full", subset="all", batch=5, **options):
    la = Laplace(model, likelihood, structure=structure, subset=subset, **options)
    return la.fit(ref.loader(x, y, batch))


# --------------------------------------------------------------------------------------
# 1. the GLM covariance against J Σ Jᵀ
# --------------------------------------------------------------------------------------
LIKELIHOOD_CASES = {
    "classification": ("classification", None),
    "regression_scalar_sigma": ("regression", 0.7),
    "regression_per_output_sigma": ("regression", (0.5, 1.3)),
    "binary": ("binary", None),
}


@pytest.mark.parametrize("case", list(LIKELIHOOD_CASES))
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_glm_covariance_matches_dense_jacobian(arch, structure, subset, case):
    likelihood, sigma = LIKELIHOOD_CASES[case]
    model, x, y, x_test = _problem(
        arch, likelihood, seed=list(LIKELIHOOD_CASES).index(case) + (10 if arch == "cnn" else 0)
    )
    options = {}
    if sigma is not None:
        options["sigma_noise"] = (
            torch.tensor(sigma, dtype=DTYPE) if isinstance(sigma, tuple) else sigma
        )
    la = _fit(
        model, x, y, likelihood, structure=structure, subset=subset, prior_precision=0.5, **options
    )
    names = _expected_names(model, subset, x)
    assert list(la.parameter_names) == names
    mean, _, _, cov = _glm_reference(la, model, names, x_test)
    var = cov.diagonal(dim1=-2, dim2=-1)

    chunked = la.predict(x_test, joint_outputs=True, chunk_size=2)  # 5 inputs: 2 + 2 + 1
    whole = la.predict(x_test, joint_outputs=True, chunk_size=256)
    # Without joint outputs the probit predictive forms the variances alone.
    alone = la.predict(x_test)
    assert alone.logit_cov is None
    assert_close(
        alone.logit_var if alone.mean is None else alone.epistemic_var,
        var.squeeze(-1) if likelihood == "binary" else var,
        RTOL,
    )
    for pred in (chunked, whole):
        if likelihood == "binary":
            assert pred.logit_mean.shape == (len(x_test),)
            assert_close(pred.logit_mean, mean[:, 0], RTOL)
            assert_close(pred.logit_var, var[:, 0], RTOL)
        elif likelihood == "classification":
            assert_close(pred.logit_mean, mean, RTOL)
            assert_close(pred.logit_var, var, RTOL)
            assert_close(pred.logit_cov, cov, RTOL)
        else:
            assert_close(pred.mean, mean, RTOL)
            assert_close(pred.epistemic_var, var, RTOL)
            assert_close(pred.logit_cov, cov, RTOL)
    for field in ("probs", "logit_mean", "logit_var", "logit_cov", "mean", "epistemic_var", "var"):
        a, b = getattr(chunked, field), getattr(whole, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert_close(a, b, CHUNK_RTOL)


# --------------------------------------------------------------------------------------
# 2. links
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier():
    """An MLP classifier with moderate logit variances (0.4 to 3.5) and its dense GLM."""
    g = generator(0)
    model = ref.mlp(3, g, d_in=4, hidden=5)
    x = torch.randn(40, 4, generator=g, dtype=DTYPE)
    y = ref.targets("classification", 40, 3, g)
    la = _fit(model, x, y, "classification", structure="full", batch=20, prior_precision=4.0)
    x_test = torch.randn(6, 4, generator=g, dtype=DTYPE)
    names = ref.trainable_names(model)
    mean, sigma, _, cov = _glm_reference(la, model, names, x_test)
    return {"la": la, "model": model, "x_test": x_test, "mean": mean, "cov": cov, "sigma": sigma}


def _mc_softmax(mean: Tensor, cov: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Monte-Carlo E softmax(z), z ~ N(mean, cov) per input, and its standard error."""
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(n, *mean.shape, generator=generator(seed), dtype=DTYPE)
    probs = (mean + torch.einsum("bcd,sbd->sbc", chol, z)).softmax(-1)
    return probs.mean(0), probs.std(0) / math.sqrt(n)


def test_probit_formula(classifier):
    la, mean, cov = classifier["la"], classifier["mean"], classifier["cov"]
    var = cov.diagonal(dim1=-2, dim2=-1)
    expected = torch.softmax(mean / torch.sqrt(1 + math.pi * var / 8), dim=-1)
    pred = la.predict(classifier["x_test"], link="probit")
    assert_close(pred.probs, expected, RTOL)
    # la(x) is la.predict(x)
    assert_close(la(classifier["x_test"]).probs, expected, RTOL)
    assert_close(
        la(classifier["x_test"], link="bridge").probs,
        la.predict(classifier["x_test"], link="bridge").probs,
        RTOL,
    )


def test_probit_and_bridge_against_integral(classifier):
    la, mean, cov, x_test = (
        classifier["la"],
        classifier["mean"],
        classifier["cov"],
        classifier["x_test"],
    )
    integral, _ = _mc_softmax(mean, cov, 200_000, seed=11)
    probit = la.predict(x_test, link="probit").probs
    bridge = la.predict(x_test, link="bridge").probs
    for probs in (probit, bridge):
        assert probs.shape == mean.shape
        assert bool((probs > 0).all())
        assert_close(probs.sum(-1), torch.ones(len(x_test), dtype=DTYPE), 1e-12)
    assert float((probit - integral).abs().max()) < PROBIT_TOL
    assert float((bridge - integral).abs().max()) < BRIDGE_TOL
    # the plug-in softmax(μ) ignores the uncertainty; the probit must do better than it
    plug_in = mean.softmax(-1)
    assert float((probit - integral).abs().max()) < float((plug_in - integral).abs().max())


def test_bridge_formula(classifier):
    la, mean, cov = classifier["la"], classifier["mean"], classifier["cov"]
    var = cov.diagonal(dim1=-2, dim2=-1)
    k = mean.shape[-1]
    # Hobbhahn et al. (2022): α_c = (1 − 2/K + e^{μ_c} Σ_l e^{−μ_l} / K²) / σ_c²
    alpha = (1 - 2 / k + mean.exp() * (-mean).exp().sum(-1, keepdim=True) / k**2) / var
    expected = alpha / alpha.sum(-1, keepdim=True)
    assert_close(la.predict(classifier["x_test"], link="bridge").probs, expected, RTOL)


def test_mc_link_reproducible_and_close_to_integral(classifier):
    la, mean, cov, x_test = (
        classifier["la"],
        classifier["mean"],
        classifier["cov"],
        classifier["x_test"],
    )
    n = 4000
    first = la.predict(x_test, link="mc", n_samples=n, generator=generator(5)).probs
    again = la.predict(x_test, link="mc", n_samples=n, generator=generator(5)).probs
    other = la.predict(x_test, link="mc", n_samples=n, generator=generator(6)).probs
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    integral, stderr_ref = _mc_softmax(mean, cov, 100_000, seed=12)
    # per-entry standard deviation of softmax(z), from the reference draws
    std = stderr_ref * math.sqrt(100_000)
    tol = MC_Z * std * math.sqrt(1 / n + 1 / 100_000) + 1e-12
    assert bool(((first - integral).abs() <= tol).all()), float(
        ((first - integral).abs() / tol).max()
    )
    assert_close(first.sum(-1), torch.ones(len(x_test), dtype=DTYPE), 1e-12)


@pytest.fixture(scope="module")
def binary():
    g = generator(3)
    model = ref.mlp(1, g, d_in=4, hidden=5)
    x = torch.randn(12, 4, generator=g, dtype=DTYPE)
    y = ref.targets("binary", 12, 1, g)
    la = _fit(model, x, y, "binary", structure="kron", prior_precision=0.5)
    x_test = 1.5 * torch.randn(6, 4, generator=g, dtype=DTYPE)
    mean, _, _, cov = _glm_reference(la, model, ref.trainable_names(model), x_test)
    return {"la": la, "x_test": x_test, "mean": mean[:, 0], "var": cov[:, 0, 0]}


def test_binary_probit(binary):
    la, mean, var, x_test = binary["la"], binary["mean"], binary["var"], binary["x_test"]
    pred = la.predict(x_test, link="probit")
    assert pred.probs.shape == (len(x_test),)
    assert_close(pred.probs, torch.sigmoid(mean / torch.sqrt(1 + math.pi * var / 8)), RTOL)
    # Gauss-Hermite (probabilists') quadrature of E σ(z), z ~ N(mean, var): exact to ~1e-15
    nodes, weights = (torch.from_numpy(a) for a in np.polynomial.hermite_e.hermegauss(120))
    integral = (torch.sigmoid(mean[:, None] + var.sqrt()[:, None] * nodes) * weights).sum(-1)
    integral = integral / weights.sum()
    assert float((pred.probs - integral).abs().max()) < PROBIT_BINARY_TOL
    # the MC link integrates the same Gaussian
    n = 20_000
    mc = la.predict(x_test, link="mc", n_samples=n, generator=generator(8)).probs
    assert float((mc - integral).abs().max()) < MC_Z * 0.5 / math.sqrt(n)


# --------------------------------------------------------------------------------------
# 3. regression
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.7, (0.5, 1.3)], ids=["scalar", "per_output"])
@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
def test_regression_prediction(structure, sigma):
    model, x, y, x_test = _problem("mlp", "regression", seed=4)
    sigma_t = torch.tensor(sigma, dtype=DTYPE)
    la = _fit(
        model, x, y, "regression", structure=structure, prior_precision=0.5, sigma_noise=sigma_t
    )
    mean, _, _, cov = _glm_reference(la, model, ref.trainable_names(model), x_test)
    pred = la.predict(x_test)
    epistemic = cov.diagonal(dim1=-2, dim2=-1)
    aleatoric = (sigma_t**2).expand_as(mean)
    assert_close(pred.mean, mean, RTOL)
    assert_close(pred.epistemic_var, epistemic, RTOL)
    torch.testing.assert_close(pred.aleatoric_var, aleatoric, rtol=1e-15, atol=0)
    assert_close(pred.var, epistemic + aleatoric, RTOL)
    assert pred.probs is None and pred.logit_cov is None  # joint_outputs defaults to False


# --------------------------------------------------------------------------------------
# 4. NN sampling
# --------------------------------------------------------------------------------------
def _entrywise_cov_tol(cov: Tensor, n: int) -> Tensor:
    """MC_Z standard errors of the entries of a sample covariance of n Gaussian draws."""
    var = cov.diagonal(dim1=-2, dim2=-1)
    return MC_Z * torch.sqrt((var[..., :, None] * var[..., None, :] + cov**2) / (n - 1))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_nn_sampling_exact_for_a_linear_model(likelihood):
    """For one Linear layer the model is linear in θ: NN samples are N(f, J Σ Jᵀ) exactly."""
    g = generator(21)
    n_out = N_OUT[likelihood]
    model = ref.init_(nn.Linear(3, n_out, dtype=DTYPE), g)
    x = torch.randn(6, 3, generator=g, dtype=DTYPE)
    y = ref.targets(likelihood, 6, n_out, g)
    la = _fit(model, x, y, likelihood, structure="kron", prior_precision=0.5)
    x_test = torch.randn(4, 3, generator=g, dtype=DTYPE)
    mean, _, _, cov = _glm_reference(la, model, ref.trainable_names(model), x_test)
    n = 4000
    pred = la.predict(x_test, method="nn", n_samples=n, generator=generator(22), joint_outputs=True)
    var = cov.diagonal(dim1=-2, dim2=-1)
    mean_nn = pred.logit_mean if likelihood == "classification" else pred.mean
    var_nn = pred.logit_var if likelihood == "classification" else pred.epistemic_var
    assert bool(((mean_nn - mean).abs() <= MC_Z * (var / n).sqrt()).all())
    assert bool(((pred.logit_cov - cov).abs() <= _entrywise_cov_tol(cov, n)).all())
    assert_close(var_nn, pred.logit_cov.diagonal(dim1=-2, dim2=-1), 1e-12)
    if likelihood == "regression":
        assert_close(pred.var, var_nn + 1.0, RTOL)
        assert torch.equal(pred.aleatoric_var, torch.ones_like(mean))


def test_nn_sampling_matches_own_weight_draws():
    """On a nonlinear MLP: E softmax(f(x; θ)) and E f(x; θ), θ ~ N(θ*, Σ), by own draws."""
    model, x, y, x_test = _problem("mlp", "classification", seed=9, n=20)
    la = _fit(model, x, y, "classification", structure="kron", prior_precision=1.0)
    names = ref.trainable_names(model)
    params_before = {k: v.clone() for k, v in model.state_dict().items()}
    out_before = ref.outputs(model, x_test)

    n, n_ref = 2000, 40_000
    pred = la.predict(x_test, method="nn", n_samples=n, generator=generator(31))
    again = la.predict(x_test, method="nn", n_samples=n, generator=generator(31))
    assert torch.equal(pred.probs, again.probs)
    # the model is left exactly as it was
    for k, v in model.state_dict().items():
        assert torch.equal(v, params_before[k]), k
    assert torch.equal(ref.outputs(model, x_test), out_before)

    sigma = torch.linalg.inv(la.posterior_precision.to_dense())
    chol = torch.linalg.cholesky(0.5 * (sigma + sigma.T))
    theta = ref.flat_params(model, names)
    draws = theta + torch.randn(n_ref, theta.numel(), generator=generator(32), dtype=DTYPE) @ chol.T
    f = ref.functional(model, names)
    logits = vmap(lambda t: f(t, x_test))(draws)  # (S, B, C)
    probs = logits.softmax(-1)
    for got, samples in ((pred.probs, probs), (pred.logit_mean, logits)):
        expected, std = samples.mean(0), samples.std(0)
        tol = MC_Z * std * math.sqrt(1 / n + 1 / n_ref)
        assert bool(((got - expected).abs() <= tol).all()), float(
            ((got - expected).abs() / tol).max()
        )


# --------------------------------------------------------------------------------------
# 5. weight samples and linearised function samples
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
def test_weight_samples_have_the_posterior_moments(structure):
    model, x, y, _ = _problem("mlp", "classification", seed=13)
    la = _fit(model, x, y, "classification", structure=structure, prior_precision=0.7)
    sigma = torch.linalg.inv(la.posterior_precision.to_dense())
    n = 20_000
    samples = la.sample(n, generator=generator(41))
    assert samples.shape == (n, la.n_params)
    assert torch.equal(samples, la.sample(n, generator=generator(41)))
    theta = ref.flat_params(model, ref.trainable_names(model))
    assert torch.equal(la.mean, theta)
    var = sigma.diagonal()
    assert bool(((samples.mean(0) - theta).abs() <= MC_Z * (var / n).sqrt()).all())
    sample_cov = torch.cov(samples.T)
    assert bool(((sample_cov - sigma).abs() <= _entrywise_cov_tol(sigma, n)).all())


@pytest.mark.parametrize(("structure", "subset"), [("full", "all"), ("kron", "last_layer")])
def test_predictive_samples_joint_covariance(structure, subset):
    model, x, y, _ = _problem("mlp", "classification", seed=17, n=10)
    la = _fit(
        model, x, y, "classification", structure=structure, subset=subset, prior_precision=0.5
    )
    g = generator(18)
    x_test = torch.randn(3, 4, generator=g, dtype=DTYPE)
    names = _expected_names(model, subset, x)
    mean, sigma, jac, _ = _glm_reference(la, model, names, x_test)
    b, c = mean.shape
    jac_flat = jac.reshape(b * c, -1)
    joint = jac_flat @ sigma @ jac_flat.T  # (B·C, B·C): J(x) Σ J(x')ᵀ for every pair

    n = 2000
    samples = la.predictive_samples(x_test, n, generator=generator(51))
    assert samples.shape == (n, b, c)
    assert torch.equal(samples, la.predictive_samples(x_test, n, generator=generator(51)))
    flat = samples.reshape(n, b * c)
    diag = joint.diagonal()
    assert bool(((flat.mean(0) - mean.reshape(-1)).abs() <= MC_Z * (diag / n).sqrt()).all())
    sample_cov = torch.cov(flat.T)
    excess = (sample_cov - joint).abs() / _entrywise_cov_tol(joint, n)
    assert float(excess.max()) <= 1.0, float(excess.max())

    # the test is only meaningful if the posterior does not make inputs fully correlated:
    # check the cross-input correlation of logit 0 at inputs 0 and 1 explicitly
    i, j = 0, c  # (input 0, logit 0) and (input 1, logit 0)
    rho_ref = joint[i, j] / (joint[i, i] * joint[j, j]).sqrt()
    rho = sample_cov[i, j] / (sample_cov[i, i] * sample_cov[j, j]).sqrt()
    assert abs(float(rho_ref)) < 0.9
    assert abs(float(rho - rho_ref)) < MC_Z * (1 - rho_ref**2) / math.sqrt(n - 3)


def test_predictive_samples_chunking():
    model, x, y, x_test = _problem("mlp", "regression", seed=19)
    la = _fit(model, x, y, "regression", structure="diag", prior_precision=0.5)
    a = la.predictive_samples(x_test, 24, generator=generator(3), chunk_size=2)
    b = la.predictive_samples(x_test, 24, generator=generator(3), chunk_size=256)
    assert a.shape == (24, len(x_test), 2)
    assert_close(a, b, CHUNK_RTOL)


# --------------------------------------------------------------------------------------
# 6. the posterior distribution
# --------------------------------------------------------------------------------------
POSTERIOR_TYPES = {
    "full": "MultivariateNormal",
    "diag": "Independent",
    "kron": "BlockDiagonalNormal",
}


@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
def test_posterior_distribution(structure):
    model, x, y, _ = _problem("cnn", "classification", seed=23)
    la = _fit(model, x, y, "classification", structure=structure, prior_precision=0.8)
    post = la.posterior
    import pyro.distributions as pd

    from laplacefim.distributions import BlockDiagonalNormal

    expected_type = {
        "full": pd.MultivariateNormal,
        "diag": pd.Independent,
    }.get(structure, BlockDiagonalNormal)
    assert isinstance(post, expected_type)
    if structure == "diag":
        assert isinstance(post.base_dist, pd.Normal)

    precision = la.posterior_precision.to_dense()
    covariance = torch.linalg.inv(precision)
    theta = ref.flat_params(model, ref.trainable_names(model))
    p = theta.numel()
    oracle = torch.distributions.MultivariateNormal(theta, precision_matrix=precision)

    assert post.event_shape == (p,) and post.batch_shape == ()
    torch.testing.assert_close(post.mean, theta, rtol=0, atol=0)
    assert_close(post.variance, covariance.diagonal(), RTOL)
    points = theta + 0.3 * torch.randn(4, p, generator=generator(61), dtype=DTYPE)
    points = torch.cat([theta[None], points])
    assert_close(post.log_prob(points), oracle.log_prob(points), RTOL)
    assert_close(post.entropy(), oracle.entropy(), RTOL)
    if structure != "diag":
        assert_close(post.covariance_matrix, covariance, RTOL)
        assert_close(post.precision_matrix, precision, RTOL)
    else:
        assert bool((precision - torch.diag(precision.diagonal()) == 0).all())

    # shapes; moments of sample() (pyro's global generator: not seeded here, so the bound
    # is one extra standard error wider)
    assert post.sample().shape == (p,)
    assert post.rsample((2, 3)).shape == (2, 3, p)
    n = 20_000
    draws = post.sample((n,))
    var = covariance.diagonal()
    assert bool(((draws.mean(0) - theta).abs() <= (MC_Z + 1) * (var / n).sqrt()).all())
    # variance of a sample variance of n Gaussian draws: 2 var² / (n − 1)
    assert bool(((draws.var(0) - var).abs() <= (MC_Z + 1) * var * math.sqrt(2 / (n - 1))).all())


# --------------------------------------------------------------------------------------
# 7. bad input
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted():
    model, x, y, x_test = _problem("mlp", "classification", seed=29)
    return _fit(model, x, y, "classification", structure="diag"), x_test


def test_predict_before_fit():
    model, _, _, x_test = _problem("mlp", "classification", seed=1)
    la = Laplace(model, "classification")
    with pytest.raises(RuntimeError, match="fit"):
        la.predict(x_test)
    with pytest.raises(RuntimeError):
        la.sample(3)
    with pytest.raises(RuntimeError):
        la.predictive_samples(x_test, 3)


def test_inputs_of_wrong_shape(fitted):
    la, x_test = fitted
    for bad in (x_test[:, :3], x_test[:, None, :], x_test[0]):
        with pytest.raises(ValueError, match="shape"):
            la.predict(bad)
    with pytest.raises(ValueError, match="shape"):
        la.predictive_samples(x_test[:, :3], 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_inputs_on_wrong_device(fitted):
    la, x_test = fitted
    with pytest.raises(ValueError, match="cpu"):
        la.predict(x_test.cuda())


def test_unknown_options_list_valid_values(fitted):
    la, x_test = fitted
    with pytest.raises(ValueError) as info:
        la.predict(x_test, method="laplace")
    assert "glm" in str(info.value) and "nn" in str(info.value)
    with pytest.raises(ValueError) as info:
        la.predict(x_test, link="logit")
    for valid in ("probit", "mc", "bridge"):
        assert valid in str(info.value)


def test_bridge_with_binary_is_refused(binary):
    with pytest.raises(ValueError, match="bridge"):
        binary["la"].predict(binary["x_test"], link="bridge")


@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
def test_zero_prior_with_singular_curvature(structure):
    # 3 data through a 4-5-3 MLP: 43 parameters, GGN rank <= 3·2. Input feature 0 is always
    # zero, so the weights reading it have exactly zero curvature even on the diagonal.
    g = generator(37)
    model = ref.mlp(3, g, d_in=4, hidden=5)
    x = torch.randn(3, 4, generator=g, dtype=DTYPE)
    x[:, 0] = 0.0
    y = ref.targets("classification", 3, 3, g)
    la = _fit(model, x, y, "classification", structure=structure, prior_precision=0.0)
    for call in (
        lambda: la.predict(x),
        lambda: la.predict(x, method="nn", n_samples=2),
        lambda: la.sample(2),
        lambda: la.posterior,
    ):
        with pytest.raises(ValueError, match=r"prior.precision"):
            call()
