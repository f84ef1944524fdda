"""The Laplace log marginal likelihood and prior / noise tuning, against independent oracles.

Every number is compared with a reference that does not use ``laplacefim``:

* the evidence ``log p(D|θ*)/T − ½ θ*ᵀP₀θ* − ½ (log det P − log det P₀)`` built densely in
  float64 from the curvature of ``reference.py`` (torch.func Jacobians / per-sample
  gradients, a loop-based KFAC) and a log-likelihood written out by hand, with the noise
  put into the curvature directly (not by rescaling);
* scikit-learn's ``BayesianRidge`` (MacKay's evidence fixed point for a linear-Gaussian
  model) on the diabetes data, for joint prior / noise tuning;
* stationarity of the evidence (autograd gradient and Newton decrement on the
  log-hyperparameters), a brute-force grid, and MacKay's fixed-point equations with the
  covariance from a dense inverse.

Tiny float64 models, local generators only.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from helpers import REFERENCE_STRUCTURES, assert_close, generator
from torch import Tensor, nn

laplacefim = pytest.importorskip("laplacefim")
Laplace = laplacefim.Laplace
from laplacefim.marglik import DIAGONAL_HYPERPRIOR_STRENGTH  # noqa: E402

DTYPE = torch.float64
N_DATA = 16
BATCH = 6  # uneven last batch
N_OUT = {"classification": 3, "regression": 2, "binary": 1}
LIKELIHOODS = ["classification", "regression", "binary"]
STRUCTURES = list(REFERENCE_STRUCTURES)

# Dense reference against O(P) eigenvalue path: float64 reassociation only.
RTOL = 1e-9
# Central finite differences in float64 with a relative step of FD_STEP: truncation error
# ~ FD_STEP² and rounding ~ eps / FD_STEP, both far below FD_RTOL.
FD_STEP = 1e-5
FD_RTOL = 1e-6


# --------------------------------------------------------------------------------------
# problems and the dense reference
# --------------------------------------------------------------------------------------
def _mlp_problem(likelihood: str, seed: int = 0, n: int = N_DATA, d_in: int = 3, hidden: int = 4):
    g = generator(7000 + seed)
    model = ref.mlp(N_OUT[likelihood], g, d_in=d_in, hidden=hidden)
    x = torch.randn(n, d_in, generator=g, dtype=DTYPE)
    y = ref.targets(likelihood, n, N_OUT[likelihood], g)
    return model, x, y


class _Scaled(nn.Module):
    """A module owning a raw parameter *and* a child Linear: two layers, own one first."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, dtype=DTYPE)
        self.scale = nn.Parameter(torch.ones(d_out, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) * self.scale


class _Reversed(nn.Module):
    """Registers ``first`` before ``second`` but runs ``second`` first: layer order follows
    registration (named_parameters), not execution."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.first = nn.Linear(4, n_out, dtype=DTYPE)
        self.block = _Scaled(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.first(torch.tanh(self.block(x)))


def _reversed_problem(likelihood: str, seed: int = 0):
    g = generator(7100 + seed)
    model = ref.init_(_Reversed(N_OUT[likelihood]), g)
    x = torch.randn(N_DATA, 3, generator=g, dtype=DTYPE)
    y = ref.targets(likelihood, N_DATA, N_OUT[likelihood], g)
    return model, x, y


def _fit(model, likelihood, x, y, structure, *, batch=BATCH, **kw) -> Laplace:
    la = Laplace(model, likelihood, structure=structure, **kw)
    return la.fit(ref.loader(x, y, batch))


def _layer_index(names: list[str]) -> list[int]:
    """Layer (module owning the parameter) of each name, numbered by first appearance."""
    modules = [name.rpartition(".")[0] for name in names]
    order: dict[str, int] = {}
    for m in modules:
        order.setdefault(m, len(order))
    return [order[m] for m in modules]


def _per_param(model: nn.Module, names: list[str], prior: Tensor) -> Tensor:
    """Expand a 0-d, per-layer or per-parameter prior to every parameter, independently."""
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]
    total = sum(sizes)
    prior = prior.to(DTYPE)
    if prior.ndim == 0:
        return prior.expand(total)
    layers = _layer_index(names)
    n_layers = max(layers) + 1
    if prior.numel() == total:
        return prior
    assert prior.numel() == n_layers
    return torch.cat([prior[layer].expand(size) for layer, size in zip(layers, sizes, strict=True)])


def _log_likelihood(likelihood: str, f: Tensor, y: Tensor, sigma) -> Tensor:
    """Log-likelihood of the data, written out by hand."""
    if likelihood == "classification":
        return torch.log_softmax(f, dim=-1).gather(1, y[:, None]).sum()
    if likelihood == "binary":
        z = f.reshape(-1)
        yy = y.reshape(-1).to(DTYPE)
        return (yy * nn.functional.logsigmoid(z) + (1 - yy) * nn.functional.logsigmoid(-z)).sum()
    n, k = f.shape
    s = torch.as_tensor(sigma, dtype=DTYPE)
    s = s.expand(k) if s.ndim == 0 else s
    yy = y.reshape(n, k)
    return (
        -0.5 * (((yy - f) / s) ** 2).sum() - n * s.log().sum() - 0.5 * n * k * math.log(2 * math.pi)
    )


def _ref_curvature(model, names, x, y, likelihood, structure, kind, sigma) -> Tensor:
    """F (sum over data, noise included) from reference.py, never from laplacefim."""
    return ref.reference_curvature(model, names, x, y, likelihood, structure, kind, sigma)


def _ref_lml(
    curvature: Tensor, theta: Tensor, prior_vec: Tensor, loglik: Tensor, temperature: float
) -> Tensor:
    """The evidence from its definition, densely."""
    precision = curvature / temperature + torch.diag(prior_vec)
    sign, logdet = torch.linalg.slogdet(precision)
    assert sign > 0
    return (
        loglik / temperature
        - 0.5 * (prior_vec * theta.square()).sum()
        - 0.5 * (logdet - prior_vec.log().sum())
    )


class _Reference:
    """Evidence of a fitted problem as a function of (prior, sigma), densely, independently."""

    def __init__(self, model, names, x, y, likelihood, structure, kind, temperature):
        self.model, self.names, self.x, self.y = model, list(names), x, y
        self.likelihood, self.structure, self.kind = likelihood, structure, kind
        self.temperature = temperature
        self.theta = ref.flat_params(model, self.names)
        self.f = ref.outputs(model, x)
        self._cache: dict[tuple, Tensor] = {}

    def curvature(self, sigma) -> Tensor:
        key = tuple(torch.as_tensor(sigma, dtype=DTYPE).reshape(-1).tolist())
        if key not in self._cache:
            self._cache[key] = _ref_curvature(
                self.model,
                self.names,
                self.x,
                self.y,
                self.likelihood,
                self.structure,
                self.kind,
                sigma,
            )
        return self._cache[key]

    def __call__(self, prior: Tensor, sigma=1.0) -> Tensor:
        prior_vec = _per_param(self.model, self.names, torch.as_tensor(prior, dtype=DTYPE))
        loglik = _log_likelihood(self.likelihood, self.f, self.y, sigma)
        return _ref_lml(self.curvature(sigma), self.theta, prior_vec, loglik, self.temperature)


def _snapshot(la: Laplace) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        la.posterior_precision.to_dense().clone(),
        la.prior_precision.clone(),
        la.sigma_noise.clone(),
        la.log_likelihood.detach().clone(),
    )


def _assert_same_state(la: Laplace, before) -> None:
    after = _snapshot(la)
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape
        assert torch.equal(a, b)


def _priors(model, names) -> list[Tensor]:
    """A scalar, a per-layer and a per-parameter prior, none of them round numbers."""
    n_layers = max(_layer_index(names)) + 1
    n_params = sum(dict(model.named_parameters())[n].numel() for n in names)
    g = generator(99)
    return [
        torch.tensor(0.37, dtype=DTYPE),
        torch.tensor(3.1, dtype=DTYPE),
        torch.linspace(0.2, 2.5, n_layers, dtype=DTYPE),
        0.1 + 3 * torch.rand(n_params, generator=g, dtype=DTYPE),
    ]


# --------------------------------------------------------------------------------------
# 1. the evidence against the dense formula
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_lml_matches_dense_reference(likelihood, structure, temperature):
    model, x, y = _mlp_problem(likelihood)
    sigma_fit = 0.8
    kw = {"sigma_noise": sigma_fit} if likelihood == "regression" else {}
    la = _fit(
        model, likelihood, x, y, structure, temperature=temperature, prior_precision=0.5, **kw
    )
    names = ref.trainable_names(model)
    reference = _Reference(model, names, x, y, likelihood, structure, "ggn", temperature)
    sigmas = [sigma_fit, 0.45, 1.9] if likelihood == "regression" else [1.0]
    before = _snapshot(la)
    for prior in _priors(model, names):
        for sigma in sigmas:
            sigma_arg = sigma if likelihood == "regression" else None
            if structure == "kron" and prior.numel() == la.n_params:
                # A per-parameter prior does not commute with Kronecker factors: refused.
                with pytest.raises(ValueError, match="kron"):
                    la.log_marginal_likelihood(prior, sigma_arg)
                continue
            value = la.log_marginal_likelihood(prior, sigma_arg)
            assert value.ndim == 0
            assert_close(value, reference(prior, sigma), RTOL, atol=1e-10)
    # defaults: the object's own prior (0.5) and noise
    assert_close(
        la.log_marginal_likelihood(), reference(torch.tensor(0.5), sigma_fit), RTOL, atol=1e-10
    )
    _assert_same_state(la, before)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_lml_layers_follow_named_parameters(likelihood, structure):
    """Three layers (``first``, ``block``'s own raw scale, ``block.lin``), executed in another
    order than registered; the raw parameter gets a diagonal block under KFAC."""
    model, x, y = _reversed_problem(likelihood)
    names = ref.trainable_names(model)
    assert _layer_index(names) == [0, 0, 1, 2, 2]
    la = _fit(model, likelihood, x, y, structure, temperature=1.7)
    reference = _Reference(model, names, x, y, likelihood, structure, "ggn", 1.7)
    for prior in (torch.tensor([0.3, 2.0, 5.0], dtype=DTYPE), torch.tensor([4.0, 0.2, 1.1])):
        assert_close(la.log_marginal_likelihood(prior), reference(prior), RTOL, atol=1e-10)
    prior = _priors(model, names)[-1]
    if structure != "kron":
        assert_close(la.log_marginal_likelihood(prior), reference(prior), RTOL, atol=1e-10)


def test_lml_last_layer_subset():
    model, x, y = _mlp_problem("classification", seed=3)
    la = Laplace(model, "classification", subset="last_layer", structure="full")
    la.fit(ref.loader(x, y, BATCH))
    names = ref.last_linear_names(model, x)
    assert list(la.parameter_names) == names
    reference = _Reference(model, names, x, y, "classification", "full", "ggn", 1.0)
    for prior in (torch.tensor(0.7, dtype=DTYPE), torch.tensor([1.3], dtype=DTYPE)):
        assert_close(la.log_marginal_likelihood(prior), reference(prior), RTOL, atol=1e-10)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_lml_empirical_fisher(likelihood, structure):
    """The empirical Fisher scales like 1/σ⁴ in regression; the reference recomputes it at σ."""
    model, x, y = _mlp_problem(likelihood, seed=1)
    kw = {"sigma_noise": 1.3} if likelihood == "regression" else {}
    la = _fit(
        model, likelihood, x, y, structure, curvature="empirical_fisher", temperature=2.0, **kw
    )
    names = ref.trainable_names(model)
    reference = _Reference(model, names, x, y, likelihood, structure, "empirical_fisher", 2.0)
    sigmas = [1.3, 0.6, 2.2] if likelihood == "regression" else [1.0]
    for prior in _priors(model, names)[:3]:
        for sigma in sigmas:
            sigma_arg = sigma if likelihood == "regression" else None
            assert_close(
                la.log_marginal_likelihood(prior, sigma_arg),
                reference(prior, sigma),
                RTOL,
                atol=1e-10,
            )


def test_lml_per_output_sigma_regression():
    model, x, y = _mlp_problem("regression", seed=2)
    sigma = torch.tensor([0.5, 1.7], dtype=DTYPE)
    la = _fit(model, "regression", x, y, "full", sigma_noise=sigma, temperature=0.8)
    names = ref.trainable_names(model)
    reference = _Reference(model, names, x, y, "regression", "full", "ggn", 0.8)
    for prior in _priors(model, names):
        assert_close(la.log_marginal_likelihood(prior), reference(prior, sigma), RTOL, atol=1e-10)
        assert_close(
            la.log_marginal_likelihood(prior, sigma.clone()),
            reference(prior, sigma),
            RTOL,
            atol=1e-10,
        )


def test_lml_mc_fisher_noise_scaling():
    """An MC-Fisher fit at σ₁, evaluated at σ₂, equals the fit at σ₂ on the same draws:
    the sampled gradients are ε/σ, so F ∝ 1/σ²."""
    model, x, y = _mlp_problem("regression", seed=4)
    fits = {}
    for sigma in (1.0, 0.4):
        la = Laplace(model, "regression", structure="full", curvature="fisher", sigma_noise=sigma)
        fits[sigma] = la.fit(ref.loader(x, y, BATCH), generator=generator(5))
    prior = torch.tensor(0.9, dtype=DTYPE)
    assert_close(
        fits[1.0].log_marginal_likelihood(prior, 0.4),
        fits[0.4].log_marginal_likelihood(prior),
        RTOL,
        atol=1e-10,
    )
    assert_close(
        fits[0.4].log_marginal_likelihood(prior, 1.0),
        fits[1.0].log_marginal_likelihood(prior),
        RTOL,
        atol=1e-10,
    )
    # and the evidence formula on the package's own sampled curvature at prior 0
    la = fits[0.4]
    curvature = la.curvature.to_dense()
    f = ref.outputs(model, x)
    loglik = _log_likelihood("regression", f, y, 0.4)
    expected = _ref_lml(curvature, la.mean, prior.expand(la.n_params), loglik, 1.0)
    assert_close(la.log_marginal_likelihood(prior), expected, RTOL, atol=1e-10)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_lml_does_not_mutate(likelihood, structure):
    model, x, y = _mlp_problem(likelihood, seed=5)
    kw = {"sigma_noise": 0.9} if likelihood == "regression" else {}
    la = _fit(model, likelihood, x, y, structure, prior_precision=1.5, **kw)
    before = _snapshot(la)
    default = la.log_marginal_likelihood()
    names = ref.trainable_names(model)
    for prior in _priors(model, names)[:3]:
        p = prior.clone().requires_grad_(True)
        s = torch.tensor(0.5, dtype=DTYPE, requires_grad=True)
        value = la.log_marginal_likelihood(p, s if likelihood == "regression" else None)
        value.backward()
        _assert_same_state(la, before)
    assert torch.equal(la.log_marginal_likelihood(), default)
    assert not la.prior_precision.requires_grad and not la.sigma_noise.requires_grad


def _fd_grad(fn, point: Tensor) -> Tensor:
    grads = torch.empty_like(point)
    flat = point.reshape(-1)
    for i in range(flat.numel()):
        h = FD_STEP * max(abs(float(flat[i])), 1e-3)
        up, down = flat.clone(), flat.clone()
        up[i] += h
        down[i] -= h
        grads.reshape(-1)[i] = (fn(up.reshape(point.shape)) - fn(down.reshape(point.shape))) / (
            2 * h
        )
    return grads


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
def test_lml_gradient_matches_finite_differences(likelihood, structure):
    model, x, y = _mlp_problem(likelihood, seed=6)
    kw = {"sigma_noise": 0.7} if likelihood == "regression" else {}
    la = _fit(model, likelihood, x, y, structure, temperature=1.3, **kw)
    names = ref.trainable_names(model)
    reference = _Reference(model, names, x, y, likelihood, structure, "ggn", 1.3)
    regression = likelihood == "regression"
    sigma0 = torch.tensor(1.1, dtype=DTYPE)
    for prior0 in _priors(model, names)[1:]:
        if structure == "kron" and prior0.numel() == la.n_params:
            continue
        prior = prior0.clone().requires_grad_(True)
        sigma = sigma0.clone().requires_grad_(True)
        value = la.log_marginal_likelihood(prior, sigma if regression else None)
        inputs = [prior, sigma] if regression else [prior]
        grads = torch.autograd.grad(value, inputs)

        def of_prior(p: Tensor) -> float:
            with torch.no_grad():
                return float(la.log_marginal_likelihood(p, sigma0 if regression else None))

        assert_close(grads[0], _fd_grad(of_prior, prior0), FD_RTOL, atol=1e-7)
        # and against autograd through the dense reference (exact derivative)
        p_ref = prior0.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(reference(p_ref, 1.1), [p_ref])
        assert_close(grads[0], g_ref, 1e-7, atol=1e-9)
        if regression:

            def of_sigma(s: Tensor, p: Tensor = prior0) -> float:
                with torch.no_grad():
                    return float(la.log_marginal_likelihood(p, s))

            assert_close(grads[1], _fd_grad(of_sigma, sigma0), FD_RTOL, atol=1e-7)


# --------------------------------------------------------------------------------------
# 2. BayesianRidge: joint prior and noise tuning on a linear-Gaussian model
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diabetes():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import BayesianRidge

    del sklearn
    X, y = load_diabetes(return_X_y=True)
    br = BayesianRidge(
        fit_intercept=False,
        tol=1e-12,
        max_iter=100000,
        alpha_1=0,
        alpha_2=0,
        lambda_1=0,
        lambda_2=0,
    ).fit(X, y)
    x = torch.as_tensor(X, dtype=DTYPE)
    t = torch.as_tensor(y, dtype=DTYPE)[:, None]
    return x, t, br


def _linear(coef) -> nn.Module:
    model = nn.Linear(10, 1, bias=False, dtype=DTYPE)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(coef, dtype=DTYPE)[None])
    return model


def test_kfac_is_exact_for_one_scalar_output_linear_layer(diabetes):
    """For Linear(10, 1) without bias, G = Σₙ 1/σ² = n/σ² is 1×1 and A = XᵀX, so
    (G ⊗ A)/n = XᵀX/σ² is the exact GGN; the diagonal is not."""
    x, t, br = diabetes
    dense = {}
    for structure in STRUCTURES:
        la = _fit(
            _linear(br.coef_),
            "regression",
            x,
            t,
            structure,
            batch=100,
            prior_precision=0.0,
            sigma_noise=2.0,
        )
        dense[structure] = la.posterior_precision.to_dense()
    exact = x.T @ x / 4.0
    assert_close(dense["full"], exact, 1e-10, atol=1e-10)
    assert_close(dense["kron"], exact, 1e-10, atol=1e-10)
    assert_close(dense["diag"], torch.diag(torch.diagonal(exact)), 1e-10, atol=1e-10)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_tune_prior_matches_bayesian_ridge(diabetes, structure):
    x, t, br = diabetes
    model = _linear(br.coef_)
    la = _fit(model, "regression", x, t, structure, batch=100)
    result = la.tune_prior()
    assert result.converged and result.n_iter >= 1
    assert result.prior_precision.ndim == 0 and result.sigma_noise.ndim == 0
    assert_close(result.prior_precision, torch.tensor(br.lambda_, dtype=DTYPE), 1e-4, atol=0)
    assert_close(1 / result.sigma_noise**2, torch.tensor(br.alpha_, dtype=DTYPE), 1e-4, atol=0)
    # it set them on the object, and reports the evidence there
    assert torch.equal(la.prior_precision, result.prior_precision)
    assert torch.equal(la.sigma_noise, result.sigma_noise)
    assert_close(result.log_marginal_likelihood, la.log_marginal_likelihood(), 1e-12, atol=1e-10)

    # the exact evidence of the linear-Gaussian model, log N(y | 0, σ²I + XXᵀ/δ), at the
    # sklearn optimum equals the Laplace evidence there (θ* is the posterior mean)
    delta, sigma = float(br.lambda_), float(br.alpha_) ** -0.5
    cov = sigma**2 * torch.eye(len(t), dtype=DTYPE) + x @ x.T / delta
    exact = torch.distributions.MultivariateNormal(
        torch.zeros(len(t), dtype=DTYPE), covariance_matrix=cov
    ).log_prob(t[:, 0])
    assert_close(la.log_marginal_likelihood(delta, sigma), exact, 1e-9, atol=1e-10)

    # a stationary point in the log-hyperparameters ...
    log_h = torch.stack([result.prior_precision.log(), result.sigma_noise.log()])
    log_h = log_h.clone().requires_grad_(True)
    value = la.log_marginal_likelihood(log_h[0].exp(), log_h[1].exp())
    grad = torch.autograd.grad(value, [log_h])[0]
    # the terms of ∂/∂log δ are O(P) and those of ∂/∂log σ are O(n)
    assert float(grad[0].abs()) < 1e-6 * la.n_params
    assert float(grad[1].abs()) < 1e-6 * la.n_data
    # ... and a maximum: no nearby value is better
    best = float(value.detach())
    for a in (-0.1, -0.01, 0.0, 0.01, 0.1):
        for b in (-0.1, -0.01, 0.0, 0.01, 0.1):
            near = la.log_marginal_likelihood(
                result.prior_precision * math.exp(a), result.sigma_noise * math.exp(b)
            )
            assert float(near) <= best + 1e-9 * abs(best)


def test_tune_prior_diag_structure_bayesian_ridge_is_stationary(diabetes):
    """The diagonal GGN is not exact here, so no sklearn match: only a stationary maximum."""
    x, t, br = diabetes
    la = _fit(_linear(br.coef_), "regression", x, t, "diag", batch=100)
    result = la.tune_prior()
    assert result.converged
    _assert_stationary(la, result, tune_noise=True)


# --------------------------------------------------------------------------------------
# 3. tuning: a stationary maximum of the evidence
# --------------------------------------------------------------------------------------
def _assert_stationary(
    la: Laplace, result, *, tune_noise: bool, decrement_tol: float = 1e-9, penalty=None
):
    """Gradient of the evidence (plus ``penalty(prior)``, a log hyperprior) in the
    log-hyperparameters ≈ 0 and −Hessian ≻ 0."""
    prior = result.prior_precision
    n_prior = prior.numel()
    log_h = prior.log().reshape(-1)
    if tune_noise:
        log_h = torch.cat([log_h, result.sigma_noise.log().reshape(1)])

    def objective(v: Tensor) -> Tensor:
        p = v[:n_prior].exp().reshape(prior.shape)
        s = v[n_prior].exp() if tune_noise else None
        value = la.log_marginal_likelihood(p, s)
        return value if penalty is None else value + penalty(p)

    grad = torch.autograd.functional.jacobian(objective, log_h)
    hess = torch.autograd.functional.hessian(objective, log_h)
    eigenvalues = torch.linalg.eigvalsh(-hess)
    assert bool((eigenvalues > 0).all()), eigenvalues
    decrement = 0.5 * float(grad @ torch.linalg.solve(-hess, grad))
    assert decrement < decrement_tol, (decrement, grad)
    assert float(grad.abs().max()) < 1e-4, grad


@pytest.mark.parametrize("prior_structure", ["scalar", "layerwise"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_tune_prior_classification(structure, prior_structure):
    model, x, y = _mlp_problem("classification", seed=8, n=30)
    la = _fit(model, "classification", x, y, structure, prior_precision=2.0)
    sigma_before = la.sigma_noise.clone()
    result = la.tune_prior(prior_structure=prior_structure)
    assert result.converged and result.n_iter >= 1
    expected_shape = () if prior_structure == "scalar" else (2,)
    assert tuple(result.prior_precision.shape) == expected_shape
    assert torch.equal(la.prior_precision, result.prior_precision)
    assert torch.equal(la.sigma_noise, sigma_before)
    assert_close(result.log_marginal_likelihood, la.log_marginal_likelihood(), 1e-12, atol=1e-10)
    _assert_stationary(la, result, tune_noise=False)
    # the evidence at the result, by the dense reference
    names = ref.trainable_names(model)
    reference = _Reference(model, names, x, y, "classification", structure, "ggn", 1.0)
    assert_close(
        result.log_marginal_likelihood, reference(result.prior_precision), RTOL, atol=1e-10
    )

    if prior_structure == "scalar":
        # brute force: a fine grid over log δ (±3 decades around the result) on the dense
        # reference finds no better value, and its best point is next to the result
        log_best = float(result.prior_precision.log())
        grid = torch.linspace(
            log_best - 3 * math.log(10), log_best + 3 * math.log(10), 601, dtype=DTYPE
        )
        curvature = reference.curvature(1.0)
        loglik = _log_likelihood("classification", reference.f, y, 1.0)
        deltas = grid.exp()
        eye = torch.eye(la.n_params, dtype=DTYPE)
        _, logdets = torch.linalg.slogdet(curvature + deltas[:, None, None] * eye)
        values = (
            loglik
            - 0.5 * deltas * reference.theta.square().sum()
            - 0.5 * (logdets - la.n_params * deltas.log())
        )
        assert_close(values[300], reference(result.prior_precision), 1e-9, atol=1e-10)
        best = float(result.log_marginal_likelihood)
        assert float(values.max()) <= best + 1e-10 * abs(best)
        spacing = float(grid[1] - grid[0])
        assert abs(float(grid[values.argmax()]) - log_best) <= spacing
    else:
        # coordinate-wise: no nearby per-layer value is better
        best = float(result.log_marginal_likelihood)
        for i in range(2):
            for a in (-0.05, 0.05):
                p = result.prior_precision.clone()
                p[i] *= math.exp(a)
                assert float(la.log_marginal_likelihood(p)) <= best


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("likelihood", ["regression", "binary"])
def test_tune_prior_other_likelihoods(likelihood, structure):
    model, x, y = _mlp_problem(likelihood, seed=9, n=30)
    la = _fit(model, likelihood, x, y, structure, temperature=0.7)
    result = la.tune_prior(prior_structure="layerwise")
    assert result.converged and result.n_iter >= 1
    tune_noise = likelihood == "regression"
    if not tune_noise:
        assert torch.equal(result.sigma_noise, torch.tensor(1.0, dtype=DTYPE))
    _assert_stationary(la, result, tune_noise=tune_noise)
    # the posterior precision follows the tuned values
    names = ref.trainable_names(model)
    sigma = float(result.sigma_noise)
    expected = _ref_curvature(model, names, x, y, likelihood, structure, "ggn", sigma) / 0.7
    expected = expected + torch.diag(_per_param(model, names, result.prior_precision))
    assert_close(la.posterior_precision.to_dense(), expected, 1e-8, atol=1e-10)


@pytest.mark.parametrize("start", [1e-3, 1e3])
def test_tune_prior_independent_of_start(start):
    """The scalar evidence is unimodal in δ: any starting prior reaches the same maximum."""
    model, x, y = _mlp_problem("classification", seed=8, n=30)
    la = _fit(model, "classification", x, y, "full", prior_precision=1.0)
    # Newton stops once the predicted gain ½ gᵀ(−H)⁻¹g < tol, so log δ is known to about
    # √(2·tol / |H|); a tight tol makes the two runs agree closely.
    reference = la.tune_prior(tol=1e-16).prior_precision
    la.prior_precision = start
    result = la.tune_prior(tol=1e-16)
    assert result.converged
    assert_close(result.prior_precision, reference, 1e-8, atol=0)


def test_tune_prior_without_noise_keeps_sigma():
    model, x, y = _mlp_problem("regression", seed=10, n=30)
    la = _fit(model, "regression", x, y, "kron", sigma_noise=0.35)
    result = la.tune_prior(tune_noise=False)
    assert result.converged
    assert torch.equal(la.sigma_noise, torch.tensor(0.35, dtype=DTYPE))
    _assert_stationary(la, result, tune_noise=False)


# --------------------------------------------------------------------------------------
# 4. one prior per parameter: MacKay's fixed point
# --------------------------------------------------------------------------------------
def _mackay_problem(likelihood: str):
    g = generator(7300)
    d_in = 3
    model = nn.Linear(d_in, N_OUT[likelihood], dtype=DTYPE)
    with torch.no_grad():
        # weights well away from 0, so every δ_p = γ_p / θ_p² is moderate
        model.weight.copy_(
            torch.sign(torch.randn(model.weight.shape, generator=g, dtype=DTYPE))
            * (0.5 + torch.rand(model.weight.shape, generator=g, dtype=DTYPE))
        )
        model.bias.copy_(0.4 + torch.rand(model.bias.shape, generator=g, dtype=DTYPE))
    n = 200
    x = torch.randn(n, d_in, generator=g, dtype=DTYPE)
    if likelihood == "regression":
        with torch.no_grad():
            y = model(x) + 0.3 * torch.randn(n, N_OUT[likelihood], generator=g, dtype=DTYPE)
    else:
        y = ref.targets(likelihood, n, N_OUT[likelihood], g)
    return model, x, y


def _layerwise_center(model, likelihood, x, y, structure, tune_noise):
    """The hyperprior's modes: the layer-wise evidence optimum, per parameter."""
    la = _fit(model, likelihood, x, y, structure, batch=64, temperature=1.0)
    result = la.tune_prior(prior_structure="layerwise", tune_noise=tune_noise, tol=1e-12)
    return _per_param(model, ref.trainable_names(model), result.prior_precision)


@pytest.mark.parametrize(
    ("likelihood", "structure"),
    [
        ("regression", "diag"),
        ("classification", "diag"),
        ("regression", "full"),
        ("classification", "full"),
    ],
)
def test_diagonal_prior_fixed_point_under_its_hyperprior(likelihood, structure):
    """δₚ = (γₚ + κ) / (θₚ² + κ / cₚ) with cₚ the layer-wise optimum, and the evidence
    plus the Gamma hyperprior is stationary there in every log δₚ (and log σ)."""
    model, x, y = _mackay_problem(likelihood)
    regression = likelihood == "regression"
    center = _layerwise_center(model, likelihood, x, y, structure, regression)
    la = _fit(model, likelihood, x, y, structure, batch=64, temperature=1.0)
    result = la.tune_prior(prior_structure="diagonal", tol=1e-12, max_iter=5000)
    assert result.converged and result.n_iter >= 1
    assert result.n_iter < 200  # a contraction: geometric convergence
    delta = result.prior_precision
    assert delta.shape == (la.n_params,)
    names = ref.trainable_names(model)
    theta = ref.flat_params(model, names)
    sigma = float(result.sigma_noise)
    if regression:
        assert sigma != 1.0  # the noise was tuned too
    curvature = _ref_curvature(model, names, x, y, likelihood, structure, "ggn", sigma)
    covariance = torch.linalg.inv(curvature + torch.diag(delta))
    gamma = 1 - delta * torch.diagonal(covariance)
    kappa = DIAGONAL_HYPERPRIOR_STRENGTH
    assert_close(delta, (gamma + kappa) / (theta.square() + kappa / center), 1e-7, atol=0)
    _assert_stationary(
        la,
        result,
        tune_noise=regression,
        decrement_tol=1e-8,
        # log Gamma(δ; shape 1 + κ/2, rate κ/(2c)) up to a constant: mode at c
        penalty=lambda p: 0.5 * kappa * (p.log() - p / center).sum(),
    )


def test_diagonal_prior_keeps_undetermined_parameters_at_the_prior_scale():
    """Weights on an input that is always 0 have no curvature; the plain evidence would send
    their prior to 0 (variance to infinity). Under the hyperprior each equals the closed
    form root of its (separable, diag-structure) stationarity equation, and stays within a
    factor of its layer's prior; samples of them stay at that scale."""
    g = generator(7301)
    model = nn.Linear(4, 3, dtype=DTYPE)
    x = torch.randn(300, 4, generator=g, dtype=DTYPE)
    x[:, 3] = 0.0
    y = ref.targets("classification", 300, 3, g)
    center = _layerwise_center(model, "classification", x, y, "diag", False)
    la = _fit(model, "classification", x, y, "diag", batch=64, temperature=1.0)
    result = la.tune_prior(prior_structure="diagonal", tol=1e-12)
    assert result.converged, result.n_iter
    delta = result.prior_precision
    names = ref.trainable_names(model)
    theta = ref.flat_params(model, names)
    lam = torch.diagonal(_ref_curvature(model, names, x, y, "classification", "diag", "ggn", 1.0))
    # ½[1/δ − 1/(λ+δ) − θ²] + κ/(2δ) − κ/(2c) = 0  ⇔  a δ² − b δ − (1+κ)λ = 0, a = θ² + κ/c
    kappa = DIAGONAL_HYPERPRIOR_STRENGTH
    a = theta.square() + kappa / center
    b = kappa - a * lam
    root = (b + torch.sqrt(b.square() + 4 * a * (1 + kappa) * lam)) / (2 * a)
    assert_close(delta, root, 1e-8, atol=0)
    dead = torch.zeros_like(delta, dtype=torch.bool)
    dead[: 3 * 4].view(3, 4)[:, 3] = True  # weight column of the zero input
    assert bool((lam[dead] == 0).all()) and bool((lam[~dead] > 0).all())
    ratio = delta[dead] / center[dead]
    assert bool((ratio > 0.2).all() and (ratio <= 1.0).all()), ratio
    samples = la.sample(4000, generator=generator(5)) - la.mean
    assert float(samples[:, dead].std(0).max()) < 3 / float(center[dead].min()) ** 0.5


# --------------------------------------------------------------------------------------
# 5. bad input
# --------------------------------------------------------------------------------------
def _small_fitted(likelihood="classification", structure="full", **kw) -> Laplace:
    model, x, y = _mlp_problem(likelihood, seed=11)
    return _fit(model, likelihood, x, y, structure, **kw)


def test_unfitted_raises_runtime_error():
    model, _, _ = _mlp_problem("classification")
    la = Laplace(model, "classification")
    with pytest.raises(RuntimeError, match="fit"):
        la.tune_prior()
    with pytest.raises(RuntimeError, match="fit"):
        la.log_marginal_likelihood()


def test_unknown_options_list_valid_values():
    la = _small_fitted()
    before = _snapshot(la)
    with pytest.raises(ValueError, match="marglik") as info:
        la.tune_prior(method="evidence")
    assert "gridsearch" in str(info.value) and "evidence" in str(info.value)
    with pytest.raises(ValueError, match="scalar") as info:
        la.tune_prior(prior_structure="blockwise")
    message = str(info.value)
    assert "layerwise" in message and "diagonal" in message and "blockwise" in message
    _assert_same_state(la, before)


def test_diagonal_prior_with_kron_refused():
    la = _small_fitted(structure="kron", prior_precision=0.8)
    before = _snapshot(la)
    with pytest.raises(ValueError, match="kron") as info:
        la.tune_prior(prior_structure="diagonal")
    message = str(info.value)
    assert "scalar" in message and "layerwise" in message
    _assert_same_state(la, before)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_lml_rejects_bad_prior_and_sigma(bad):
    la = _small_fitted("regression", structure="diag")
    before = _snapshot(la)
    with pytest.raises(ValueError, match="prior_precision"):
        la.log_marginal_likelihood(bad)
    with pytest.raises(ValueError, match="prior_precision"):
        la.log_marginal_likelihood(torch.tensor([1.0, bad], dtype=DTYPE))  # per layer
    with pytest.raises(ValueError, match="sigma_noise"):
        la.log_marginal_likelihood(1.0, bad)
    _assert_same_state(la, before)


def test_lml_at_prior_zero_on_the_object_is_refused():
    """Prior 0 is allowed on the object (to read F), but the evidence needs > 0."""
    la = _small_fitted("classification", structure="full", prior_precision=0.0)
    with pytest.raises(ValueError, match="prior_precision"):
        la.log_marginal_likelihood()
    # a Python float and a float64 tensor give the same evidence
    assert torch.equal(
        la.log_marginal_likelihood(1.0), la.log_marginal_likelihood(torch.tensor(1.0, dtype=DTYPE))
    )


def test_lml_rejects_prior_of_wrong_shape():
    la = _small_fitted("classification", structure="diag")
    with pytest.raises(ValueError, match="per layer"):
        la.log_marginal_likelihood(torch.ones(5, dtype=DTYPE))


def test_per_output_sigma_cannot_be_tuned_or_changed():
    sigma = torch.tensor([0.5, 1.2], dtype=DTYPE)
    la = _small_fitted("regression", structure="kron", sigma_noise=sigma)
    before = _snapshot(la)
    with pytest.raises(ValueError, match="tune_noise=False"):
        la.tune_prior(tune_noise=True)
    _assert_same_state(la, before)
    with pytest.raises(ValueError, match="refit"):
        la.sigma_noise = torch.tensor([0.6, 1.2], dtype=DTYPE)
    with pytest.raises(ValueError, match="refit"):
        la.sigma_noise = 0.5  # a scalar cannot replace a fitted per-output noise either
    with pytest.raises(ValueError, match="refit"):
        la.log_marginal_likelihood(None, torch.tensor([0.6, 1.2], dtype=DTYPE))
    _assert_same_state(la, before)
    la.sigma_noise = sigma.clone()  # the same value is fine
    result = la.tune_prior(tune_noise=False)  # prior-only tuning works
    assert result.converged
    assert torch.equal(la.sigma_noise, sigma)
    _assert_stationary(la, result, tune_noise=False)
